#!/usr/bin/env bash
# softhsm-init.sh - idempotently set up a SoftHSM2 token for signd development.
#
# Run with --help for the full description. PINs are never printed and are
# never passed on any command line: they live only in files under the state
# directory and are handed to the PKCS#11 module by an inline Python (ctypes)
# helper that reads those files itself.

set -euo pipefail

# Byte-oriented string handling (label length, PIN validation) and stable
# tool output.
export LC_ALL=C
unset CDPATH

readonly PROG=softhsm-init
readonly LABEL_MAX=32
readonly PIN_MIN=4
readonly PIN_MAX=255

readonly EX_OK=0
readonly EX_USAGE=2
readonly EX_DEPS=3
readonly EX_INIT=4
readonly EX_STATE=5

state_dir=./state
label=signd-dev
module=
quiet=
tmp_files=()

usage() {
    cat <<'EOF'
Usage: softhsm-init.sh [--state-dir DIR] [--label LABEL] [--module PATH] [--quiet] [--help]

Idempotently prepare a SoftHSM2 token for signd development and print the
environment setting needed to use it.

What it does (each step only when needed, so re-running is safe):
  1. creates the state directory DIR (mode 0700)
  2. writes DIR/softhsm2.conf, or rewrites it if its content differs from
     what this script would write:
         directories.tokendir = DIR/tokens
         objectstore.backend = file
         log.level = ERROR
         slots.removable = false
  3. creates the token directory DIR/tokens (mode 0700)
  4. if no token labelled LABEL exists yet (per `softhsm2-util --show-slots`):
     reads or generates the SO and user PINs and initializes a free slot with
     that label, the SO PIN and the user PIN, then checks the token is listed

Options:
  --state-dir DIR, --state-dir=DIR
                 state directory (default: ./state, relative to the current
                 directory; printed as an absolute path)
  --label LABEL, --label=LABEL
                 token label, 1..32 bytes, no leading/trailing whitespace or
                 control characters (default: signd-dev)
  --module PATH, --module=PATH
                 SoftHSM2 PKCS#11 module (default: /usr/lib/softhsm/libsofthsm2.so,
                 else /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so)
  -q, --quiet    suppress progress messages (errors are still printed)
  -h, --help     show this help and exit

Files in DIR:
  softhsm2.conf  SoftHSM2 configuration (point SOFTHSM2_CONF here)
  tokens/        token storage (mode 0700)
  so.pin         Security Officer PIN (mode 0600)
  user.pin       user PIN, used by signd to log in (mode 0600)
  .softhsm-init.lock
                 lock file that serialises concurrent runs

PINs:
  If so.pin / user.pin exist, their content is used (one trailing newline is
  stripped). A PIN must be 4..255 printable ASCII characters without
  whitespace, and the file must not be accessible by group or others
  (chmod 600). Missing PIN files are generated (32 random hex characters, no
  trailing newline, mode 0600) before a token is initialized. PINs are never
  printed and never appear on a command line. All tokens initialized in the
  same state directory share the same PIN files.

Output:
  stdout: exactly one line, `export SOFTHSM2_CONF=<absolute path>`
  stderr: progress messages prefixed "softhsm-init: " (silenced by --quiet)
          and errors prefixed "softhsm-init: error: " (always shown)

Environment:
  PYTHON         Python 3 interpreter used to initialize the token
                 (default: python3)

Exit codes:
  0  success (token created, or already present)
  2  usage error (unknown option, missing argument, invalid label)
  3  missing dependency (softhsm2-util, the PKCS#11 module or python3)
  4  token initialization or verification failed
  5  state directory or PIN file problem (not creatable/writable, bad
     permissions, invalid PIN content, PIN file missing for an existing token)

Example:
  eval "$(./softhsm-init.sh --state-dir ./state --label signd-dev --quiet)"
  softhsm2-util --show-slots
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
    printf "Try 'softhsm-init.sh --help' for more information.\n" >&2
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
    # $1 option name, $2 number of remaining args (including the option)
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

command -v softhsm2-util >/dev/null 2>&1 \
    || die "$EX_DEPS" "softhsm2-util not found in PATH (install the softhsm2 package)"

if [[ -z $module ]]; then
    for candidate in /usr/lib/softhsm/libsofthsm2.so \
                     /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so; do
        if [[ -e $candidate ]]; then
            module=$candidate
            break
        fi
    done
    [[ -n $module ]] || die "$EX_DEPS" "SoftHSM2 PKCS#11 module not found" \
        "(looked in /usr/lib/softhsm/libsofthsm2.so and" \
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so; use --module PATH)"
fi
[[ -f $module && -r $module ]] || die "$EX_DEPS" "PKCS#11 module not found or not readable: $module"

python=${PYTHON:-python3}
command -v -- "$python" >/dev/null 2>&1 \
    || die "$EX_DEPS" "Python interpreter '$python' not found (set PYTHON or install python3)"
"$python" -c 'import sys, ctypes; sys.exit(0 if sys.version_info >= (3, 6) else 1)' >/dev/null 2>&1 \
    || die "$EX_DEPS" "'$python' is not a working Python >= 3.6 with ctypes"

# ---------------------------------------------------------- state directory --

if [[ ! -e $state_dir ]]; then
    # umask 077 + explicit chmod: the directory (and any parent we create)
    # ends up 0700.
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
if [[ -n $created_state ]]; then
    info "created state directory $state_dir"
fi

# Everything written from here on is private to the current user.
umask 077

conf_file=$state_dir/softhsm2.conf
token_dir=$state_dir/tokens
user_pin_file=$state_dir/user.pin
so_pin_file=$state_dir/so.pin
lock_file=$state_dir/.softhsm-init.lock

# Serialise concurrent runs on the same state directory (best effort if
# flock(1) is unavailable).
if command -v flock >/dev/null 2>&1; then
    { exec 9>>"$lock_file"; } 2>/dev/null \
        || die "$EX_STATE" "cannot create lock file: $lock_file"
    flock -w 120 9 || die "$EX_STATE" "timed out waiting for lock: $lock_file"
fi

# new_temp FILE: creates a temp file next to FILE (same directory, so a later
# mv is an atomic rename), registers it for cleanup and stores its path in
# $tmp_path.
tmp_path=
new_temp() {
    tmp_path=$(mktemp -- "${1%/*}/.${1##*/}.XXXXXX") || return 1
    tmp_files+=("$tmp_path")
}

# -------------------------------------------------------------- config file --

conf_content="# SoftHSM2 configuration for signd development.
# Generated by softhsm-init.sh; rewritten if it differs from this content.
directories.tokendir = $token_dir
objectstore.backend = file
log.level = ERROR
slots.removable = false"

if [[ -e $conf_file && ! -f $conf_file ]]; then
    die "$EX_STATE" "config path exists but is not a regular file: $conf_file"
fi
new_temp "$conf_file" || die "$EX_STATE" "cannot create a temporary file in $state_dir"
conf_tmp=$tmp_path
printf '%s\n' "$conf_content" >"$conf_tmp" || die "$EX_STATE" "cannot write $conf_tmp"
if [[ -f $conf_file ]] && cmp -s -- "$conf_tmp" "$conf_file"; then
    rm -f -- "$conf_tmp"
    info "config $conf_file is up to date"
else
    chmod 644 -- "$conf_tmp" || die "$EX_STATE" "cannot chmod $conf_tmp"
    if [[ -f $conf_file ]]; then
        info "rewriting $conf_file (content differed)"
    else
        info "writing $conf_file"
    fi
    mv -f -- "$conf_tmp" "$conf_file" || die "$EX_STATE" "cannot write $conf_file"
fi

if [[ ! -e $token_dir ]]; then
    mkdir -m 700 -- "$token_dir" 2>/dev/null \
        || die "$EX_STATE" "cannot create token directory: $token_dir"
    info "created token directory $token_dir"
fi
[[ -d $token_dir && -w $token_dir ]] \
    || die "$EX_STATE" "token directory is not a writable directory: $token_dir"

export SOFTHSM2_CONF=$conf_file

# ------------------------------------------------------------------ tokens --

# find_token LABEL: sets found_serial / found_user_pin_init and returns 0 if a
# token with exactly that label is listed by softhsm2-util, 1 if not, and
# exits with EX_INIT if softhsm2-util fails.
found_serial=
found_user_pin_init=
find_token() {
    local want=$1 out err line value serial='' pin_init='' count=0
    err=$(mktemp) || die "$EX_STATE" "cannot create a temporary file"
    tmp_files+=("$err")
    if ! out=$(softhsm2-util --show-slots 2>"$err"); then
        die "$EX_INIT" "softhsm2-util --show-slots failed: $(tr '\n' ' ' <"$err")"
    fi
    found_serial=
    found_user_pin_init=
    while IFS= read -r line; do
        if [[ $line =~ ^Slot[[:space:]] ]]; then
            serial=
            pin_init=
        elif [[ $line =~ ^[[:space:]]*Serial\ number:[[:space:]]*(.*)$ ]]; then
            serial=${BASH_REMATCH[1]%"${BASH_REMATCH[1]##*[! ]}"}
        elif [[ $line =~ ^[[:space:]]*User\ PIN\ init\.:[[:space:]]*(.*)$ ]]; then
            pin_init=${BASH_REMATCH[1]%"${BASH_REMATCH[1]##*[! ]}"}
        elif [[ $line =~ ^[[:space:]]*Label:[[:space:]]*(.*)$ ]]; then
            value=${BASH_REMATCH[1]}
            value=${value%"${value##*[! ]}"}   # trim trailing spaces
            if [[ -n $value && $value == "$want" ]]; then
                count=$((count + 1))
                found_serial=$serial
                found_user_pin_init=$pin_init
            fi
        fi
    done <<<"$out"
    if (( count > 1 )); then
        info "warning: $count tokens are labelled '$want'; using serial $found_serial"
    fi
    (( count > 0 ))
}

# check_pin_file FILE: validates permissions and content of an existing PIN
# file. The PIN is held only in a local variable and never printed.
check_pin_file() {
    local f=$1 mode size pin
    [[ -f $f ]] || die "$EX_STATE" "PIN file is not a regular file: $f"
    [[ -r $f ]] || die "$EX_STATE" "PIN file is not readable: $f"
    mode=$(stat -L -c %a -- "$f") || die "$EX_STATE" "cannot stat PIN file: $f"
    if (( 8#$mode & 8#077 )); then
        die "$EX_STATE" "PIN file $f is accessible by group/others (mode $mode); run: chmod 600 '$f'"
    fi
    size=$(stat -L -c %s -- "$f") || die "$EX_STATE" "cannot stat PIN file: $f"
    if (( size > PIN_MAX + 1 )); then
        die "$EX_STATE" "PIN in $f is too long (must be $PIN_MIN..$PIN_MAX characters)"
    fi
    pin=
    IFS= read -r -d '' pin <"$f" || true    # stops at EOF or at a NUL byte
    if (( ${#pin} != size )); then
        die "$EX_STATE" "PIN file $f contains a NUL byte"
    fi
    pin=${pin%$'\n'}                         # strip one trailing newline
    if (( ${#pin} < PIN_MIN || ${#pin} > PIN_MAX )); then
        die "$EX_STATE" "PIN in $f must be $PIN_MIN..$PIN_MAX characters long (has ${#pin})"
    fi
    if [[ $pin == *[![:graph:]]* ]]; then
        die "$EX_STATE" "PIN in $f must consist of printable ASCII characters without whitespace"
    fi
    pin=
}

# ensure_pin_file FILE WHAT: validates FILE if present, else generates it.
ensure_pin_file() {
    local f=$1 what=$2 tmp
    if [[ -e $f || -L $f ]]; then
        check_pin_file "$f"
        info "using existing $what PIN from $f"
        return 0
    fi
    new_temp "$f" || die "$EX_STATE" "cannot create a temporary file in $state_dir"
    tmp=$tmp_path
    # 16 random bytes -> 32 hex characters, written straight into the file
    # (the PIN never becomes a command-line argument).
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$tmp" \
        || die "$EX_STATE" "cannot generate a random PIN into $tmp"
    chmod 600 -- "$tmp" || die "$EX_STATE" "cannot chmod $tmp"
    check_pin_file "$tmp"
    mv -f -- "$tmp" "$f" || die "$EX_STATE" "cannot write $f"
    info "generated $what PIN in $f"
}

init_token() {
    # Arguments are file paths and the label; never PIN values.
    "$python" - "$module" "$so_pin_file" "$user_pin_file" "$label" <<'PYEOF'
import ctypes
import os
import sys

module_path, so_pin_path, user_pin_path = sys.argv[1:4]
label = os.fsencode(sys.argv[4])

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG
CK_SLOT_ID = CK_ULONG
CK_SESSION_HANDLE = CK_ULONG
CK_BYTE_P = ctypes.c_char_p

CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKF_TOKEN_INITIALIZED = 0x400
CKU_SO = 0
CKR_OK = 0

CKR_NAMES = {
    0x01: "CKR_CANCEL", 0x02: "CKR_HOST_MEMORY", 0x03: "CKR_SLOT_ID_INVALID",
    0x05: "CKR_GENERAL_ERROR", 0x06: "CKR_FUNCTION_FAILED",
    0x07: "CKR_ARGUMENTS_BAD", 0x30: "CKR_DEVICE_ERROR",
    0x31: "CKR_DEVICE_MEMORY", 0x32: "CKR_DEVICE_REMOVED",
    0xA0: "CKR_PIN_INCORRECT", 0xA1: "CKR_PIN_INVALID",
    0xA2: "CKR_PIN_LEN_RANGE", 0xA4: "CKR_PIN_LOCKED",
    0xB3: "CKR_SESSION_HANDLE_INVALID", 0xB6: "CKR_SESSION_EXISTS",
    0xE0: "CKR_TOKEN_NOT_PRESENT", 0xE2: "CKR_TOKEN_WRITE_PROTECTED",
    0x100: "CKR_USER_ALREADY_LOGGED_IN", 0x101: "CKR_USER_NOT_LOGGED_IN",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
    0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
}


class CK_VERSION(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class CK_TOKEN_INFO(ctypes.Structure):
    _fields_ = [
        ("label", ctypes.c_ubyte * 32),
        ("manufacturerID", ctypes.c_ubyte * 32),
        ("model", ctypes.c_ubyte * 16),
        ("serialNumber", ctypes.c_ubyte * 16),
        ("flags", CK_ULONG),
        ("ulMaxSessionCount", CK_ULONG),
        ("ulSessionCount", CK_ULONG),
        ("ulMaxRwSessionCount", CK_ULONG),
        ("ulRwSessionCount", CK_ULONG),
        ("ulMaxPinLen", CK_ULONG),
        ("ulMinPinLen", CK_ULONG),
        ("ulTotalPublicMemory", CK_ULONG),
        ("ulFreePublicMemory", CK_ULONG),
        ("ulTotalPrivateMemory", CK_ULONG),
        ("ulFreePrivateMemory", CK_ULONG),
        ("hardwareVersion", CK_VERSION),
        ("firmwareVersion", CK_VERSION),
        ("utcTime", ctypes.c_ubyte * 16),
    ]


def fail(msg):
    sys.stderr.write("softhsm-init: error: %s\n" % msg)
    sys.exit(1)


def read_pin(path):
    with open(path, "rb") as fh:
        data = fh.read()
    if data.endswith(b"\n"):
        data = data[:-1]
    if not (4 <= len(data) <= 255) or any(b < 0x21 or b > 0x7E for b in data):
        fail("invalid PIN in %s" % path)
    return data


def serial_of(info):
    return bytes(info.serialNumber).rstrip(b" \0").decode("ascii", "replace")


if len(label) > 32:
    fail("label longer than 32 bytes")
padded_label = label.ljust(32, b" ")
so_pin = read_pin(so_pin_path)
user_pin = read_pin(user_pin_path)

try:
    lib = ctypes.CDLL(module_path)
except OSError as exc:
    fail("cannot load PKCS#11 module %s: %s" % (module_path, exc))

PROTOS = {
    "C_Initialize": [ctypes.c_void_p],
    "C_Finalize": [ctypes.c_void_p],
    "C_GetSlotList": [ctypes.c_ubyte, ctypes.POINTER(CK_SLOT_ID), ctypes.POINTER(CK_ULONG)],
    "C_GetTokenInfo": [CK_SLOT_ID, ctypes.POINTER(CK_TOKEN_INFO)],
    "C_InitToken": [CK_SLOT_ID, CK_BYTE_P, CK_ULONG, CK_BYTE_P],
    "C_OpenSession": [CK_SLOT_ID, CK_ULONG, ctypes.c_void_p, ctypes.c_void_p,
                      ctypes.POINTER(CK_SESSION_HANDLE)],
    "C_CloseSession": [CK_SESSION_HANDLE],
    "C_Login": [CK_SESSION_HANDLE, CK_ULONG, CK_BYTE_P, CK_ULONG],
    "C_Logout": [CK_SESSION_HANDLE],
    "C_InitPIN": [CK_SESSION_HANDLE, CK_BYTE_P, CK_ULONG],
}
fn = {}
for name, argtypes in PROTOS.items():
    try:
        f = getattr(lib, name)
    except AttributeError:
        fail("PKCS#11 module %s does not export %s" % (module_path, name))
    f.argtypes = argtypes
    f.restype = CK_RV
    fn[name] = f

initialized = False
token_created = False
created_serial = ""


def call(name, *args):
    rv = fn[name](*args)
    if rv != CKR_OK:
        raise RuntimeError("%s failed: %s (0x%08X)" % (name, CKR_NAMES.get(rv, "CKR_?"), rv))


try:
    call("C_Initialize", None)
    initialized = True

    count = CK_ULONG(0)
    call("C_GetSlotList", 0, None, ctypes.byref(count))
    slots = (CK_SLOT_ID * max(count.value, 1))()
    call("C_GetSlotList", 0, slots, ctypes.byref(count))

    slot = None
    info = CK_TOKEN_INFO()
    for i in range(count.value):
        if fn["C_GetTokenInfo"](slots[i], ctypes.byref(info)) != CKR_OK:
            continue
        if not info.flags & CKF_TOKEN_INITIALIZED:
            slot = slots[i]
            break
    if slot is None:
        raise RuntimeError("no free (uninitialized) SoftHSM slot found")

    call("C_InitToken", slot, so_pin, len(so_pin), padded_label)
    token_created = True
    if fn["C_GetTokenInfo"](slot, ctypes.byref(info)) == CKR_OK:
        created_serial = serial_of(info)

    session = CK_SESSION_HANDLE(0)
    call("C_OpenSession", slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, None, None,
         ctypes.byref(session))
    try:
        call("C_Login", session, CKU_SO, so_pin, len(so_pin))
        try:
            call("C_InitPIN", session, user_pin, len(user_pin))
        finally:
            fn["C_Logout"](session)
    finally:
        fn["C_CloseSession"](session)
except RuntimeError as exc:
    # Report the serial of a half-initialized token so the caller can remove it.
    if token_created:
        sys.stdout.write("serial=%s\n" % created_serial)
    fail(str(exc))
finally:
    if initialized:
        fn["C_Finalize"](None)

sys.stdout.write("serial=%s\n" % created_serial)
PYEOF
}

if find_token "$label"; then
    if [[ $found_user_pin_init != yes ]]; then
        die "$EX_INIT" "token '$label' (serial $found_serial) exists but its user PIN is not" \
            "initialized; delete it with: SOFTHSM2_CONF='$conf_file' softhsm2-util" \
            "--delete-token --serial $found_serial"
    fi
    # The token already exists: its PINs cannot be regenerated, so the PIN
    # files must be present (and valid).
    # The token already exists, so its PINs cannot be regenerated: user.pin
    # (what signd logs in with) must be present and valid. A missing so.pin
    # only matters for administration, so it is merely reported.
    if [[ ! -e $user_pin_file && ! -L $user_pin_file ]]; then
        die "$EX_STATE" "token '$label' already exists but $user_pin_file is missing; restore it," \
            "or delete the token with: SOFTHSM2_CONF='$conf_file' softhsm2-util" \
            "--delete-token --serial $found_serial"
    fi
    check_pin_file "$user_pin_file"
    if [[ -e $so_pin_file || -L $so_pin_file ]]; then
        check_pin_file "$so_pin_file"
    else
        info "warning: $so_pin_file is missing; the SO PIN of token '$label' is unknown"
    fi
    info "token '$label' already present (serial $found_serial)"
else
    # Validate all existing PIN files before generating any missing one, so a
    # bad file does not leave a half-written state behind.
    for pin_file in "$so_pin_file" "$user_pin_file"; do
        if [[ -e $pin_file || -L $pin_file ]]; then
            check_pin_file "$pin_file"
        fi
    done
    ensure_pin_file "$so_pin_file" SO
    ensure_pin_file "$user_pin_file" user
    info "initializing token '$label'"
    py_out=
    if ! py_out=$(init_token); then
        created_serial=$(sed -n 's/^serial=//p' <<<"$py_out")
        if [[ -n $created_serial ]]; then
            info "removing partially initialized token (serial $created_serial)"
            softhsm2-util --delete-token --serial "$created_serial" >/dev/null 2>&1 \
                || printf '%s: error: %s\n' "$PROG" \
                    "could not remove partially initialized token (serial $created_serial)" >&2
        fi
        die "$EX_INIT" "token initialization failed"
    fi
    if ! find_token "$label"; then
        die "$EX_INIT" "token '$label' was initialized but is not listed by softhsm2-util --show-slots"
    fi
    if [[ $found_user_pin_init != yes ]]; then
        die "$EX_INIT" "token '$label' was initialized but reports no user PIN"
    fi
    info "token '$label' initialized (serial $found_serial)"
fi

printf 'export SOFTHSM2_CONF=%q\n' "$conf_file"
exit "$EX_OK"
