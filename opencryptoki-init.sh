#!/usr/bin/env bash
# opencryptoki-init.sh - idempotently set up opencryptoki's software token
# (swtok) for signd's tests and development: signd's second, independent
# PKCS#11 implementation.
#
# Run with --help for the full description. PINs are never printed and never
# passed on any command line: they live only in files under the state
# directory and are fed to pkcsconf's prompts on its standard input.

set -euo pipefail

# Byte-oriented string handling (label length, PIN validation) and stable
# tool output.
export LC_ALL=C
unset CDPATH
# pkcsslotd and pkcsconf live in /usr/sbin, which a non-login shell may lack.
PATH=$PATH:/usr/sbin:/sbin

readonly PROG=opencryptoki-init
readonly LABEL_MAX=32
# opencryptoki 3.8's soft token accepts PINs of 4..8 bytes (MIN_PIN_LEN and
# MAX_PIN_LEN in usr/lib/pkcs11/common/defs.h; C_InitPIN answers
# CKR_PIN_LEN_RANGE otherwise).
readonly PIN_MIN=4
readonly PIN_MAX=8
readonly DEFAULT_SO_PIN=87654321

readonly OCK_CONF=/etc/opencryptoki/opencryptoki.conf
readonly OCK_LIB_DIR=/var/lib/opencryptoki
readonly OCK_LOCK_DIR=/var/lock/opencryptoki
readonly SLOTD_PIDFILE=/var/run/pkcsslotd.pid
readonly SLOTD_SOCKET=/var/run/pkcsslotd.socket
readonly SW_STDLL=libpkcs11_sw.so

readonly EX_OK=0
readonly EX_USAGE=2
readonly EX_DEPS=3
readonly EX_INIT=4
readonly EX_STATE=5
readonly EX_SYSTEM=6

state_dir=./state/opencryptoki
label=signd-dev
module=
quiet=
reset=
tmp_files=()

usage() {
    cat <<'EOF'
Usage: opencryptoki-init.sh [--state-dir DIR] [--label LABEL] [--module PATH]
                            [--reset] [--quiet] [--help]

Idempotently prepare opencryptoki's software token (the "swtok" of Debian's
opencryptoki package, 3.8) for signd and print what a signd config needs.
Must run as root: it may write the system-wide opencryptoki configuration
and starts the pkcsslotd daemon.

opencryptoki 3.8 keeps its token system-wide, not in DIR: the slot table is
/etc/opencryptoki/opencryptoki.conf, the token lives in
/var/lib/opencryptoki/swtok (cached in /dev/shm/var.lib.opencryptoki.swtok),
and every process talks to the one pkcsslotd.  (Its PKCS_APP_STORE variable
is broken in 3.8.1: the token's files land in "/".)  There is one soft token
per machine; DIR holds only its PINs and the settings printed below.

What it does (each step only when needed, so re-running is safe):
  1. creates DIR (mode 0700)
  2. creates the "pkcs11" group, the token and lock directories
     (/var/lib/opencryptoki/swtok/TOK_OBJ, /var/lock/opencryptoki/swtok;
     root:pkcs11, mode 0770)
  3. adds a soft-token slot to /etc/opencryptoki/opencryptoki.conf if it has
     none (Debian's file has one: slot 3); pkcsslotd is restarted then
  4. starts pkcsslotd if it is not running
  5. if the soft token is labelled LABEL and DIR/user.pin logs in: nothing
     more (the token, and every key on it, is reused; a user PIN locked by
     three wrong logins is first unlocked with DIR/so.pin).
     If the token is still in its factory state (SO PIN 87654321): reads or
     generates DIR/so.pin and DIR/user.pin, then with pkcsconf initializes
     the token with LABEL (C_InitToken), sets the SO PIN (C_SetPIN) and the
     user PIN (C_InitPIN).
     Anything else (another label, a user PIN that is not DIR's) is an error
     unless --reset is given.  Without --reset a token is never wiped.
  6. checks that the user PIN logs in (C_Login, then a search for objects)

Options:
  --state-dir DIR, --state-dir=DIR
                 state directory (default: ./state/opencryptoki; printed as an
                 absolute path)
  --label LABEL, --label=LABEL
                 token label, 1..32 bytes, no leading/trailing whitespace or
                 control characters (default: signd-dev)
  --module PATH, --module=PATH
                 opencryptoki's PKCS#11 module (default: the first of
                 /usr/lib/<multiarch>/pkcs11/libopencryptoki.so,
                 /usr/lib/<multiarch>/opencryptoki/libopencryptoki.so,
                 /usr/lib64/opencryptoki/libopencryptoki.so that exists)
  --reset        start from an empty token, DESTROYING EVERY OBJECT ON IT:
                 unless it is already in its factory state, wipe the token's
                 files (NVTOK.DAT, MK_SO, MK_USER, TOK_OBJ/*) and its /dev/shm
                 cache, then initialize it as in step 5.  (A C_InitToken with
                 a non-default SO PIN would be cleaner, but 3.8.1 then fails
                 every SO login with CKR_FUNCTION_FAILED.)  Refused while
                 another process has opencryptoki loaded.
  -q, --quiet    suppress progress messages (errors are still printed)
  -h, --help     show this help and exit

Files in DIR:
  so.pin         Security Officer PIN (mode 0600)
  user.pin       user PIN, used by signd to log in (mode 0600)
  opencryptoki.env
                 the lines printed on stdout (see Output)
  token.toml     a [token] table for signd's config (module, label, pin_file)
  .opencryptoki-init.lock
                 lock file that serialises runs using this DIR (runs using
                 other DIRs are serialised by /run/lock/opencryptoki-init.lock)

PINs:
  If so.pin / user.pin exist, their content is used (one trailing newline is
  stripped). A PIN must be 4..8 printable ASCII characters without
  whitespace (opencryptoki 3.8's limit), the SO PIN must not be the factory
  default 87654321, and the file must not be accessible by group or others
  (chmod 600). Missing PIN files are generated (8 random hex characters, no
  trailing newline, mode 0600) before a token is initialized. PINs are never
  printed and never appear on a command line: pkcsconf reads them from its
  standard input (a pipe from this script's shell builtins).

Output:
  stdout: shell assignments, safe to eval:
            export OCK_MODULE=<module path>
            export OCK_SLOT=<slot number of the soft token>
            export OCK_LABEL=<label>
            export OCK_PIN_FILE=<DIR/user.pin>
            export OCK_TOKEN_DIR=<the token's directory>
  stderr: progress messages prefixed "opencryptoki-init: " (silenced by
          --quiet) and errors prefixed "opencryptoki-init: error: " (always)

Environment:
  PYTHON         Python 3 interpreter used to check the login
                 (default: python3; needs only ctypes)

Exit codes:
  0  success (token initialized, or already present and usable)
  2  usage error (unknown option, missing argument, invalid label)
  3  missing dependency (opencryptoki not installed, module or python3 missing)
  4  token initialization or verification failed
  5  state directory or PIN file problem (not creatable, bad permissions,
     invalid PIN content, PIN file missing for an existing token)
  6  system problem (not root, opencryptoki.conf unusable, pkcsslotd does not
     start, token in use during --reset)

Processes using the token (signd and its workers) must run as root or in
the pkcs11 group, and need pkcsslotd only to start (C_Initialize fails
CKR_HOST_MEMORY without it); no environment variable is needed.

Example:
  eval "$(sudo ./opencryptoki-init.sh --state-dir ./state/ock --label signd-dev --quiet)"
  { printf '[server]\nsocket = "/tmp/signd.sock"\n\n'; cat ./state/ock/token.toml; } >signd.toml
  signd serve --config signd.toml
EOF
}

info() {
    [[ -n $quiet ]] || printf '%s: %s\n' "$PROG" "$*" >&2
}

die() {
    local code=$1
    shift
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit "$code"
}

usage_error() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    printf "Try 'opencryptoki-init.sh --help' for more information.\n" >&2
    exit "$EX_USAGE"
}

# shellcheck disable=SC2317  # invoked via the EXIT trap
cleanup() {
    local f
    for f in "${tmp_files[@]}"; do
        [[ -n $f ]] && rm -f -- "$f"
    done
    return 0
}
trap cleanup EXIT

# ---------------------------------------------------------------- arguments --

need_arg() {
    (( $2 >= 2 )) || usage_error "option $1 requires an argument"
}

while (( $# > 0 )); do
    case $1 in
        -h | --help)
            usage
            exit "$EX_OK"
            ;;
        -q | --quiet)
            quiet=1
            ;;
        --reset)
            reset=1
            ;;
        --state-dir)
            need_arg "$1" "$#"
            state_dir=$2
            shift
            ;;
        --state-dir=*)
            state_dir=${1#*=}
            ;;
        --label)
            need_arg "$1" "$#"
            label=$2
            shift
            ;;
        --label=*)
            label=${1#*=}
            ;;
        --module)
            need_arg "$1" "$#"
            module=$2
            shift
            ;;
        --module=*)
            module=${1#*=}
            ;;
        --)
            shift
            (( $# == 0 )) || usage_error "unexpected argument: $1"
            break
            ;;
        -*)
            usage_error "unknown option: $1"
            ;;
        *)
            usage_error "unexpected argument: $1"
            ;;
    esac
    shift
done

[[ -n $state_dir ]] || usage_error "--state-dir must not be empty"
[[ $state_dir != *$'\n'* ]] || usage_error "--state-dir must not contain a newline"
[[ -n $label ]] || usage_error "--label must not be empty"
(( ${#label} <= LABEL_MAX )) \
    || usage_error "label is ${#label} bytes long; PKCS#11 token labels are at most $LABEL_MAX bytes"
[[ $label != *[[:cntrl:]]* ]] || usage_error "label must not contain control characters"
[[ $label != [[:space:]]* && $label != *[[:space:]] ]] \
    || usage_error "label must not start or end with whitespace"
if [[ -n $module ]]; then
    [[ $module != *$'\n'* ]] || usage_error "--module must not contain a newline"
fi

# ------------------------------------------------------------- dependencies --

(( EUID == 0 )) || die "$EX_SYSTEM" "must run as root (it configures and starts opencryptoki's pkcsslotd)"

for tool in pkcsslotd pkcsconf; do
    command -v "$tool" >/dev/null 2>&1 \
        || die "$EX_DEPS" "$tool not found (install the opencryptoki package)"
done

if [[ -z $module ]]; then
    multiarch=$(gcc -print-multiarch 2>/dev/null || dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || true)
    candidates=()
    [[ -n $multiarch ]] && candidates+=("/usr/lib/$multiarch/pkcs11/libopencryptoki.so"
                                        "/usr/lib/$multiarch/opencryptoki/libopencryptoki.so")
    candidates+=(/usr/lib/*/pkcs11/libopencryptoki.so /usr/lib/*/opencryptoki/libopencryptoki.so
                 /usr/lib64/opencryptoki/libopencryptoki.so /usr/lib/opencryptoki/libopencryptoki.so
                 /usr/lib/*/opencryptoki/libopencryptoki.so.0)
    for candidate in "${candidates[@]}"; do
        if [[ -e $candidate ]]; then
            module=$candidate
            break
        fi
    done
    [[ -n $module ]] || die "$EX_DEPS" "opencryptoki's PKCS#11 module (libopencryptoki.so) not found" \
        "(install the opencryptoki package, or use --module PATH)"
fi
[[ -f $module && -r $module ]] || die "$EX_DEPS" "PKCS#11 module not found or not readable: $module"
[[ $module == /* ]] || module=$(cd -- "$(dirname -- "$module")" && pwd)/$(basename -- "$module")

python=${PYTHON:-python3}
command -v -- "$python" >/dev/null 2>&1 \
    || die "$EX_DEPS" "Python interpreter '$python' not found (set PYTHON or install python3)"
"$python" -c 'import sys, ctypes; sys.exit(0 if sys.version_info >= (3, 6) else 1)' >/dev/null 2>&1 \
    || die "$EX_DEPS" "'$python' is not a working Python >= 3.6 with ctypes"

# ---------------------------------------------------------- state directory --

if [[ ! -e $state_dir ]]; then
    ( umask 077 && mkdir -p -- "$state_dir" ) 2>/dev/null \
        || die "$EX_STATE" "cannot create state directory: $state_dir"
    chmod 700 -- "$state_dir" 2>/dev/null \
        || die "$EX_STATE" "cannot set mode 0700 on state directory: $state_dir"
    created_state=1
else
    created_state=
fi
[[ -d $state_dir ]] || die "$EX_STATE" "state directory path exists but is not a directory: $state_dir"
state_dir=$(cd -- "$state_dir" && pwd) \
    || die "$EX_STATE" "cannot access state directory: $state_dir"
[[ -w $state_dir && -x $state_dir ]] \
    || die "$EX_STATE" "state directory is not writable: $state_dir"
[[ -n $created_state ]] && info "created state directory $state_dir"

umask 077

user_pin_file=$state_dir/user.pin
so_pin_file=$state_dir/so.pin
env_file=$state_dir/opencryptoki.env
toml_file=$state_dir/token.toml

# The token is system-wide: serialise every run, whatever its DIR, and the
# runs on one DIR also on a lock inside it.
if command -v flock >/dev/null 2>&1; then
    { exec 8>>/run/lock/opencryptoki-init.lock; } 2>/dev/null \
        || { exec 8>>"$state_dir/.opencryptoki-init.lock"; } 2>/dev/null \
        || die "$EX_STATE" "cannot create a lock file"
    flock -w 120 8 || die "$EX_STATE" "timed out waiting for the opencryptoki-init lock"
    { exec 9>>"$state_dir/.opencryptoki-init.lock"; } 2>/dev/null \
        || die "$EX_STATE" "cannot create lock file: $state_dir/.opencryptoki-init.lock"
    flock -w 120 9 || die "$EX_STATE" "timed out waiting for lock: $state_dir/.opencryptoki-init.lock"
fi

tmp_path=
new_temp() {
    tmp_path=$(mktemp -- "${1%/*}/.${1##*/}.XXXXXX") || return 1
    tmp_files+=("$tmp_path")
}

# write_file FILE MODE CONTENT: atomically (re)writes FILE if its content differs.
write_file() {
    local f=$1 mode=$2 content=$3
    new_temp "$f" || die "$EX_STATE" "cannot create a temporary file next to $f"
    printf '%s\n' "$content" >"$tmp_path" || die "$EX_STATE" "cannot write $tmp_path"
    if [[ -f $f ]] && cmp -s -- "$tmp_path" "$f"; then
        rm -f -- "$tmp_path"
        return 0
    fi
    chmod "$mode" -- "$tmp_path" || die "$EX_STATE" "cannot chmod $tmp_path"
    mv -f -- "$tmp_path" "$f" || die "$EX_STATE" "cannot write $f"
}

# ------------------------------------------------------- system-wide set-up --

if ! getent group pkcs11 >/dev/null 2>&1; then
    groupadd --system pkcs11 || die "$EX_SYSTEM" "cannot create the pkcs11 group"
    info "created the pkcs11 group"
fi

# ensure_dir DIR: root:pkcs11, mode 0770 (what the package and pkcsslotd's
# init script create; /var/lock is a tmpfs that a reboot empties).
ensure_dir() {
    if [[ ! -d $1 ]]; then
        mkdir -p -- "$1" || die "$EX_SYSTEM" "cannot create $1"
        info "created $1"
    fi
    chown root:pkcs11 -- "$1" || die "$EX_SYSTEM" "cannot set the owner of $1"
    chmod 0770 -- "$1" || die "$EX_SYSTEM" "cannot set the mode of $1"
}

# sw_slots: "SLOT TOKNAME" for each slot of opencryptoki.conf whose stdll is
# the soft token ("-" when it has no tokname), in file order.
sw_slots() {
    awk -v stdll="$SW_STDLL" '
        { sub(/#.*/, "") }
        /^[ \t]*slot[ \t]+[0-9]+/ { match($0, /[0-9]+/); slot = substr($0, RSTART, RLENGTH); lib = ""; tok = "-"; next }
        slot != "" && /=/ {
            line = $0; gsub(/[ \t"]/, "", line); split(line, kv, "=")
            if (kv[1] == "stdll") lib = kv[2]
            if (kv[1] == "tokname") tok = kv[2]
        }
        slot != "" && /}/ { if (lib == stdll) print slot, tok; slot = "" }
    ' "$OCK_CONF"
}

# used_slots: every slot number of opencryptoki.conf.
used_slots() {
    awk '{ sub(/#.*/, "") } /^[ \t]*slot[ \t]+[0-9]+/ { match($0, /[0-9]+/); print substr($0, RSTART, RLENGTH) }' "$OCK_CONF"
}

slotd_pid() {
    local pid
    [[ -r $SLOTD_PIDFILE ]] || return 1
    pid=
    read -r pid <"$SLOTD_PIDFILE" 2>/dev/null || true    # no trailing newline
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == pkcsslotd ]] || return 1
    printf '%s\n' "$pid"
}

slotd_running() {
    slotd_pid >/dev/null && [[ -S $SLOTD_SOCKET ]]
}

start_slotd() {
    local i
    # One that is still exiting (pid alive, socket gone) is waited for.
    for (( i = 0; i < 40; i++ )); do
        slotd_pid >/dev/null || break
        sleep 0.05
    done
    slotd_pid >/dev/null && die "$EX_SYSTEM" "pkcsslotd (pid $(slotd_pid)) is running without its socket $SLOTD_SOCKET"
    ensure_dir "$OCK_LOCK_DIR"
    # A pidfile left by a killed pkcsslotd does not stop a new one (it also
    # reclaims its old shared memory).
    # Without our lock descriptors: the daemon would hold the locks forever.
    ( umask 022 && exec pkcsslotd 8>&- 9>&- ) || die "$EX_SYSTEM" "pkcsslotd failed to start"
    for (( i = 0; i < 100; i++ )); do
        if slotd_running; then
            info "started pkcsslotd (pid $(slotd_pid))"
            return 0
        fi
        sleep 0.05
    done
    die "$EX_SYSTEM" "pkcsslotd did not come up (no live $SLOTD_PIDFILE / $SLOTD_SOCKET); see syslog"
}

stop_slotd() {
    local pid i
    pid=$(slotd_pid) || return 0
    kill "$pid" 2>/dev/null || true
    for (( i = 0; i < 100; i++ )); do
        [[ -d /proc/$pid ]] || return 0
        sleep 0.05
    done
    die "$EX_SYSTEM" "pkcsslotd (pid $pid) did not stop"
}

conf_changed=
mkdir -p -- "${OCK_CONF%/*}" || die "$EX_SYSTEM" "cannot create ${OCK_CONF%/*}"
[[ -e $OCK_CONF ]] || : >>"$OCK_CONF" || die "$EX_SYSTEM" "cannot create $OCK_CONF"
[[ -f $OCK_CONF && -r $OCK_CONF ]] || die "$EX_SYSTEM" "$OCK_CONF is not a readable file"
read -r slot tokname < <(sw_slots) || true
if [[ -z ${slot:-} ]]; then
    slot=3
    while used_slots | grep -qx "$slot"; do
        slot=$((slot + 1))
    done
    printf '\n# Added by signd'"'"'s opencryptoki-init.sh: the software token.\nslot %s\n{\nstdll = %s\n}\n' \
        "$slot" "$SW_STDLL" >>"$OCK_CONF" || die "$EX_SYSTEM" "cannot append to $OCK_CONF"
    tokname=-
    conf_changed=1
    info "added a soft-token slot ($slot) to $OCK_CONF"
fi
if [[ $tokname == - ]]; then
    token_dir=$OCK_LIB_DIR/swtok
    lock_sub=swtok
else
    token_dir=$OCK_LIB_DIR/$tokname
    lock_sub=$tokname
fi
# The token's cache in shared memory is named after its directory
# (/var/lib/opencryptoki/swtok -> /dev/shm/var.lib.opencryptoki.swtok).
shm_name=${token_dir#/}
shm_file=/dev/shm/${shm_name//\//.}

ensure_dir "$OCK_LIB_DIR"
ensure_dir "$token_dir"
ensure_dir "$token_dir/TOK_OBJ"
ensure_dir "$OCK_LOCK_DIR"
ensure_dir "$OCK_LOCK_DIR/$lock_sub"

if slotd_running; then
    if [[ -n $conf_changed ]]; then
        info "restarting pkcsslotd to load the new slot"
        stop_slotd
        start_slotd
    fi
else
    start_slotd
fi

# ------------------------------------------------------------------ tokens --

# token_info: sets tok_label / tok_flags / tok_model from `pkcsconf -t` for
# $slot; exits with EX_INIT if there is no such token.
tok_label=
tok_flags=
tok_model=
token_info() {
    local out line
    out=$(pkcsconf -c "$slot" -t 2>&1) \
        || die "$EX_INIT" "pkcsconf -c $slot -t failed: $(tr '\n' ' ' <<<"$out")"
    tok_label=
    tok_flags=
    tok_model=
    while IFS= read -r line; do
        if [[ $line =~ ^[[:space:]]*Label:\ (.*)$ ]]; then
            tok_label=${BASH_REMATCH[1]%"${BASH_REMATCH[1]##*[! ]}"}
        elif [[ $line =~ ^[[:space:]]*Flags:\ 0x[0-9A-Fa-f]+\ \((.*)\)$ ]]; then
            tok_flags="|${BASH_REMATCH[1]}"
        elif [[ $line =~ ^[[:space:]]*Model:\ (.*)$ ]]; then
            tok_model=${BASH_REMATCH[1]%"${BASH_REMATCH[1]##*[! ]}"}
        fi
    done <<<"$out"
    [[ -n $tok_flags ]] || die "$EX_INIT" "slot $slot has no token (pkcsconf -c $slot -t: $(tr '\n' ' ' <<<"$out"))"
    [[ $tok_model == "IBM SoftTok" ]] \
        || die "$EX_SYSTEM" "the token in slot $slot is '$tok_model', not opencryptoki's soft token"
}

has_flag() {
    [[ $tok_flags == *"|$1|"* ]]
}

# read_pin FILE: the PIN in FILE (validated), in $pin_value.
pin_value=
read_pin() {
    local f=$1 mode size
    [[ -f $f ]] || die "$EX_STATE" "PIN file is not a regular file: $f"
    [[ -r $f ]] || die "$EX_STATE" "PIN file is not readable: $f"
    mode=$(stat -L -c %a -- "$f") || die "$EX_STATE" "cannot stat PIN file: $f"
    if (( 8#$mode & 8#077 )); then
        die "$EX_STATE" "PIN file $f is accessible by group/others (mode $mode); run: chmod 600 '$f'"
    fi
    size=$(stat -L -c %s -- "$f") || die "$EX_STATE" "cannot stat PIN file: $f"
    (( size <= PIN_MAX + 1 )) || die "$EX_STATE" "PIN in $f is too long (opencryptoki takes $PIN_MIN..$PIN_MAX characters)"
    pin_value=
    IFS= read -r -d '' pin_value <"$f" || true
    (( ${#pin_value} == size )) || die "$EX_STATE" "PIN file $f contains a NUL byte"
    pin_value=${pin_value%$'\n'}
    if (( ${#pin_value} < PIN_MIN || ${#pin_value} > PIN_MAX )); then
        die "$EX_STATE" "PIN in $f must be $PIN_MIN..$PIN_MAX characters long (has ${#pin_value})"
    fi
    [[ $pin_value != *[![:graph:]]* ]] \
        || die "$EX_STATE" "PIN in $f must consist of printable ASCII characters without whitespace"
}

ensure_pin_file() {
    local f=$1 what=$2
    if [[ -e $f || -L $f ]]; then
        read_pin "$f"
        info "using existing $what PIN from $f"
        return 0
    fi
    new_temp "$f" || die "$EX_STATE" "cannot create a temporary file in $state_dir"
    # 4 random bytes -> 8 hex characters (opencryptoki's longest PIN),
    # written straight into the file.
    od -An -N4 -tx1 /dev/urandom | tr -d ' \n' >"$tmp_path" \
        || die "$EX_STATE" "cannot generate a random PIN into $tmp_path"
    chmod 600 -- "$tmp_path" || die "$EX_STATE" "cannot chmod $tmp_path"
    read_pin "$tmp_path"
    mv -f -- "$tmp_path" "$f" || die "$EX_STATE" "cannot write $f"
    info "generated $what PIN in $f"
}

# pkcsconf_stdin WHAT ARGS... : runs pkcsconf with the lines of $stdin_lines
# on its standard input.  pkcsconf's exit status is not enough (-u and -P
# exit 0 when C_InitPIN / C_SetPIN fail): its messages are checked too.
stdin_lines=
pkcsconf_stdin() {
    local what=$1 out rc=0
    shift
    # umask 007: the token files it writes stay usable by the pkcs11 group.
    out=$(umask 007 && printf '%s' "$stdin_lines" | pkcsconf -c "$slot" "$@" 2>&1) || rc=$?
    stdin_lines=
    if (( rc != 0 )) || [[ $out == *Incorrect* || $out == *Error* ]]; then
        pkcsconf_error=$(tr '\n' ' ' <<<"$out" | sed 's/Enter[^:]*: //g; s/Re-enter[^:]*: //g')
        info "$what failed: $pkcsconf_error"
        return 1
    fi
}
pkcsconf_error=

# check_login: logs in as the user with user.pin and searches for objects.
# Prints nothing on success; else the PKCS#11 error's name on stdout and
# returns 1.
check_login() {
    umask 007    # (in the caller's $(...) subshell)
    "$python" - "$module" "$user_pin_file" "$label" <<'PYEOF'
import ctypes
import sys

module_path, pin_path, label = sys.argv[1:4]
label = label.encode()
CK_ULONG = ctypes.c_ulong
NAMES = {0x05: "CKR_GENERAL_ERROR", 0x06: "CKR_FUNCTION_FAILED", 0x02: "CKR_HOST_MEMORY",
         0xA0: "CKR_PIN_INCORRECT", 0xA1: "CKR_PIN_INVALID", 0xA2: "CKR_PIN_LEN_RANGE",
         0xA3: "CKR_PIN_EXPIRED", 0xA4: "CKR_PIN_LOCKED", 0xE0: "CKR_TOKEN_NOT_PRESENT",
         0x101: "CKR_USER_NOT_LOGGED_IN", 0x104: "CKR_USER_PIN_NOT_INITIALIZED"}


class TokenInfo(ctypes.Structure):
    _fields_ = [("label", ctypes.c_char * 32), ("rest", ctypes.c_ubyte * 256)]


with open(pin_path, "rb") as fh:
    pin = fh.read()
if pin.endswith(b"\n"):
    pin = pin[:-1]
lib = ctypes.CDLL(module_path)


def call(name, *args):
    rv = getattr(lib, name)(*args)
    if rv:
        print("%s from %s" % (NAMES.get(rv, "0x%X" % rv), name))
        sys.exit(1)


call("C_Initialize", None)
count = CK_ULONG(0)
call("C_GetSlotList", ctypes.c_ubyte(1), None, ctypes.byref(count))
slots = (CK_ULONG * max(count.value, 1))()
call("C_GetSlotList", ctypes.c_ubyte(1), slots, ctypes.byref(count))
slot = None
for i in range(count.value):
    info = TokenInfo()
    if lib.C_GetTokenInfo(CK_ULONG(slots[i]), ctypes.byref(info)) == 0 and info.label.rstrip(b" ") == label:
        slot = CK_ULONG(slots[i])
        break
if slot is None:
    print("no token labelled %r" % label.decode())
    sys.exit(1)
session = CK_ULONG(0)
call("C_OpenSession", slot, CK_ULONG(6), None, None, ctypes.byref(session))
call("C_Login", session, CK_ULONG(1), ctypes.c_char_p(pin), CK_ULONG(len(pin)))
call("C_FindObjectsInit", session, None, CK_ULONG(0))
handles = (CK_ULONG * 1)()
found = CK_ULONG(0)
call("C_FindObjects", session, handles, CK_ULONG(1), ctypes.byref(found))
call("C_FindObjectsFinal", session)
lib.C_Logout(session)
lib.C_CloseSession(session)
lib.C_Finalize(None)
PYEOF
}

# token_users: PIDs (other than ours) that have opencryptoki loaded.
token_users() {
    local maps pid
    for maps in /proc/[0-9]*/maps; do
        pid=${maps#/proc/}
        pid=${pid%/maps}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        grep -qs -e libopencryptoki -e "$SW_STDLL" -e "${shm_file}" "$maps" && printf '%s ' "$pid"
    done
    return 0
}

# factory_reset: wipes the token's files and its shared-memory cache, so the
# next process finds it in the factory state (SO PIN 87654321).
factory_reset() {
    local users
    users=$(token_users)
    [[ -z $users ]] || die "$EX_SYSTEM" "the token is in use (PIDs: $users); stop those processes, then rerun"
    info "wiping the soft token in $token_dir back to its factory state"
    rm -f -- "$token_dir"/NVTOK.DAT "$token_dir"/MK_SO "$token_dir"/MK_USER "$token_dir"/TOK_OBJ/* "$shm_file" \
        || die "$EX_SYSTEM" "cannot wipe $token_dir"
}

# initialize: from the factory state (SO PIN 87654321), C_InitToken with
# LABEL, C_SetPIN of the SO PIN, C_InitPIN of the user PIN.
#
# Only ever from the factory state: in 3.8.1, C_InitToken with any other SO
# PIN leaves the token's master key wrapped under the *default* SO PIN while
# the PIN check uses the new one (init_token_data in common/utility.c), so
# every later SO C_Login fails CKR_FUNCTION_FAILED (measured).
initialize() {
    local so user
    read_pin "$so_pin_file"
    so=$pin_value
    read_pin "$user_pin_file"
    user=$pin_value
    pin_value=''
    stdin_lines=$(printf '%s\n%s' "$DEFAULT_SO_PIN" "$label")$'\n'
    pkcsconf_stdin "C_InitToken" -I || return 1
    stdin_lines=$(printf '%s\n%s\n%s' "$DEFAULT_SO_PIN" "$so" "$so")$'\n'
    pkcsconf_stdin "setting the SO PIN" -P || return 1
    stdin_lines=$(printf '%s\n%s\n%s' "$so" "$user" "$user")$'\n'
    so='' user=''
    pkcsconf_stdin "setting the user PIN" -u || return 1
}

# Validates the PIN files that exist before any missing one is generated, so
# a bad file does not leave a half-written state behind.
validate_existing_pins() {
    if [[ -e $user_pin_file || -L $user_pin_file ]]; then
        read_pin "$user_pin_file"
    fi
    if [[ -e $so_pin_file || -L $so_pin_file ]]; then
        read_pin "$so_pin_file"
        [[ $pin_value != "$DEFAULT_SO_PIN" ]] \
            || die "$EX_STATE" "$so_pin_file holds the factory SO PIN $DEFAULT_SO_PIN, which C_SetPIN refuses; choose another"
    fi
    pin_value=
}

token_info
factory=
if ! has_flag TOKEN_INITIALIZED && has_flag SO_PIN_TO_BE_CHANGED; then
    factory=1
fi

reused=
if [[ -z $reset && -z $factory ]]; then
    if [[ $tok_label != "$label" ]]; then
        die "$EX_INIT" "the soft token (slot $slot) is labelled '$tok_label', not '$label';" \
            "rerun with --reset to re-initialize it as '$label' (destroys every object on it)"
    fi
    has_flag USER_PIN_INITIALIZED \
        || die "$EX_INIT" "token '$label' has no user PIN; rerun with --reset"
    [[ -e $user_pin_file || -L $user_pin_file ]] \
        || die "$EX_STATE" "token '$label' already exists but $user_pin_file is missing; restore it," \
            "or rerun with --reset (destroys every object on the token)"
    read_pin "$user_pin_file"
    if has_flag USER_PIN_LOCKED; then
        # Three wrong user logins lock the PIN for every process (measured).
        # The SO unlocks it by setting it again (C_InitPIN).
        [[ -e $so_pin_file ]] \
            || die "$EX_INIT" "the user PIN of token '$label' is locked and $so_pin_file is missing;" \
                "rerun with --reset (destroys every object on the token)"
        user=$pin_value
        read_pin "$so_pin_file"
        stdin_lines=$(printf '%s\n%s\n%s' "$pin_value" "$user" "$user")$'\n'
        user=''
        pkcsconf_stdin "unlocking the user PIN" -u \
            || die "$EX_INIT" "cannot unlock the user PIN of token '$label' with $so_pin_file;" \
                "rerun with --reset (destroys every object on the token)"
        info "unlocked the user PIN of token '$label' (it had been locked by wrong logins)"
    fi
    pin_value=
    if ! why=$(check_login); then
        die "$EX_INIT" "the user PIN in $user_pin_file does not log in to token '$label' ($why);" \
            "rerun with --reset (destroys every object on the token)"
    fi
    [[ -e $so_pin_file ]] || info "warning: $so_pin_file is missing; the SO PIN of token '$label' is unknown"
    info "token '$label' already present (slot $slot); reusing it and its objects"
    reused=1
fi

if [[ -z $reused ]]; then
    validate_existing_pins
    ensure_pin_file "$so_pin_file" SO
    ensure_pin_file "$user_pin_file" user
    pin_value=
    if [[ -z $factory ]]; then
        # --reset of an initialized token: back to the factory state (see
        # initialize for why not C_InitToken).
        factory_reset
        token_info
        if has_flag TOKEN_INITIALIZED || ! has_flag SO_PIN_TO_BE_CHANGED; then
            die "$EX_INIT" "the token is not in its factory state after the wipe (flags ${tok_flags#|})"
        fi
    fi
    info "initializing the soft token (slot $slot) as '$label'"
    initialize || die "$EX_INIT" "token initialization failed"
    token_info
    [[ $tok_label == "$label" ]] || die "$EX_INIT" "token initialized but labelled '$tok_label'"
    if ! has_flag TOKEN_INITIALIZED || ! has_flag USER_PIN_INITIALIZED || has_flag USER_PIN_TO_BE_CHANGED; then
        die "$EX_INIT" "token initialized but its flags are ${tok_flags#|}"
    fi
    if ! why=$(check_login); then
        die "$EX_INIT" "token '$label' was initialized but the user PIN does not log in ($why)"
    fi
    info "token '$label' initialized (slot $slot)"
fi

# ------------------------------------------------------------------- output --

toml_escape() {
    local s=${1//\\/\\\\}
    printf '"%s"' "${s//\"/\\\"}"
}

env_content=$(
    printf 'export OCK_MODULE=%q\n' "$module"
    printf 'export OCK_SLOT=%q\n' "$slot"
    printf 'export OCK_LABEL=%q\n' "$label"
    printf 'export OCK_PIN_FILE=%q\n' "$user_pin_file"
    printf 'export OCK_TOKEN_DIR=%q\n' "$token_dir"
)
toml_content="# signd [token] settings for opencryptoki's soft token (written by opencryptoki-init.sh)
[token]
module = $(toml_escape "$module")
label = $(toml_escape "$label")
pin_file = $(toml_escape "$user_pin_file")"
write_file "$env_file" 600 "$env_content"
write_file "$toml_file" 600 "$toml_content"

printf '%s\n' "$env_content"
exit "$EX_OK"
