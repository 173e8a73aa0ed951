#!/usr/bin/env bash
# Development entry point for signd: set up a Debian 12 machine, then serve or test.
#
#   scripts/dev.sh serve   set up, make a development token and run signd in the foreground
#   scripts/dev.sh test    set up, then lint, type-check and run the whole test suite
#
# Both are idempotent: a second run reuses the apt packages, the virtualenv at
# .venv and the token in state/, and only redoes a step whose inputs changed.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/dev.sh COMMAND [ARGS...]

Commands:
  serve          Set everything up and run signd in the foreground on a
                 development SoftHSM token in ./state.  Prints one line
                 SIGND_SOCKET=<path> on stdout; export it in another shell to
                 use signctl or the client library.  Stop it with Ctrl-C.
  test [ARGS]    Set everything up, then run ruff check, ruff format --check,
                 mypy and pytest (ARGS are passed on to pytest).  Exits
                 non-zero if any of them fails.
  setup          Only the shared set-up step.
  -h, --help     Show this help.

Set-up (each part only when needed, so re-running is cheap):
  1. apt-get install the Debian packages signd needs (as root, or via sudo),
     plus nodejs and npm when there is no `node` on PATH
  2. a virtualenv at .venv (python3 -m venv)
  3. pip install -e clients/python -e '.[test]' into it, again only when a
     pyproject.toml changed since the last install
  4. npm ci in clients/node (the Node.js client), only when its
     package-lock.json changed since the last install

Environment:
  PYTHON         interpreter used to create .venv (default: python3)
  SIGND_TEST_WORKERS=N
                 pytest-xdist workers for `test` (default: the number of
                 cores, at least 2; 0 runs the tests in one process)
  SIGND_DEV_SKIP_APT=1
                 skip the apt step (the commands must already be installed)

Exit codes: 0 success, 1 a step or a test failed, 2 bad usage.
EOF
}

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
VENV="$ROOT/.venv"
STATE="$ROOT/state"
STAMP="$VENV/.signd-dev-installed"
NODE_DIR="$ROOT/clients/node"
NODE_STAMP="$NODE_DIR/node_modules/.signd-dev-installed"
LABEL=signd-dev
APT_PACKAGES=(softhsm2 opencryptoki openssl python3 python3-venv systemd p11-kit prometheus openssh-client openssh-server git)

say() { printf 'dev.sh: %s\n' "$*" >&2; }
die() {
    printf 'dev.sh: error: %s\n' "$*" >&2
    exit 1
}
section() { printf '\n==== %s ====\n' "$*"; }

# Run a command as root: directly if we are root, else through sudo.
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -- "$@"
    else
        die "need root to run '$*' and sudo is not installed; run this as root once"
    fi
}

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

ensure_packages() {
    if [[ ${SIGND_DEV_SKIP_APT:-} == 1 ]]; then
        return
    fi
    if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
        say "not a Debian system: skipping apt; install these yourself: ${APT_PACKAGES[*]} (and Node.js >= 18 with npm)"
        return
    fi
    local missing=() p wanted=("${APT_PACKAGES[@]}")
    # Node.js for clients/node: Debian's, unless a node is installed already.
    command -v node >/dev/null 2>&1 || wanted+=(nodejs npm)
    for p in "${wanted[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        return
    fi
    say "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" </dev/null
    # openssh-server is only for the tests, which start an sshd of their own on
    # 127.0.0.1: the system's sshd that installing it enables is switched off again.
    if [[ " ${missing[*]} " == *" openssh-server "* ]] && command -v systemctl >/dev/null 2>&1 \
        && [[ -d /run/systemd/system ]]; then
        say "openssh-server was installed for the tests: disabling the system's sshd it started"
        as_root systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
    fi
}

pyproject_hash() {
    cat "$ROOT/pyproject.toml" "$ROOT/clients/python/pyproject.toml" | sha256sum | cut -d' ' -f1
}

ensure_venv() {
    local python=${PYTHON:-python3}
    if [[ -e $VENV ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        say "$VENV is broken (its interpreter does not run): recreating it"
        rm -rf -- "$VENV"
    fi
    if [[ ! -e $VENV ]]; then
        command -v "$python" >/dev/null 2>&1 || die "'$python' not found (set PYTHON)"
        "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || die "signd needs Python >= 3.11; '$python' is $("$python" -V 2>&1)"
        say "creating virtualenv $VENV"
        "$python" -m venv "$VENV"
    fi
    local want
    want=$(pyproject_hash)
    if [[ -f $STAMP && $(<"$STAMP") == "$want" ]]; then
        return
    fi
    say "installing signd-client and signd[test] into $VENV (editable)"
    rm -f -- "$STAMP"
    (cd "$ROOT" && "$VENV/bin/python" -m pip install -q --progress-bar off \
        -e clients/python -e '.[test]')
    printf '%s\n' "$want" >"$STAMP"
}

ensure_node_modules() {
    local want
    want=$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)
    if [[ -f $NODE_STAMP && $(<"$NODE_STAMP") == "$want" ]]; then
        return
    fi
    command -v npm >/dev/null 2>&1 || die "npm not found: install Node.js >= 18 and npm"
    say "installing the Node.js client's dependencies (npm ci in $NODE_DIR)"
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
    printf '%s\n' "$want" >"$NODE_STAMP"
}

setup() {
    # Serialize set-up between concurrent runs (say `serve` in one shell and
    # `test` in another) by locking this script itself; released afterwards so
    # that the daemon exec'd by `serve` does not inherit it.
    exec 9<"${BASH_SOURCE[0]}"
    flock 9
    ensure_packages
    ensure_venv
    ensure_node_modules
    exec 9<&-
}

softhsm_module() {
    local m
    for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so; do
        if [[ -e $m ]]; then
            printf '%s\n' "$m"
            return
        fi
    done
    die "the SoftHSM PKCS#11 module libsofthsm2.so was not found (apt-get install softhsm2)"
}

cmd_serve() {
    (($# == 0)) || {
        usage >&2
        exit 2
    }
    setup
    cd "$ROOT"
    local conf_line
    conf_line=$(./softhsm-init.sh --state-dir "$STATE" --label "$LABEL")
    [[ $conf_line == "export SOFTHSM2_CONF="* ]] \
        || die "unexpected output from softhsm-init.sh: $conf_line"
    eval "$conf_line"

    local config="$STATE/signd.toml" socket="$STATE/signd.sock"
    if [[ ! -e $config ]]; then
        local module
        module=$(softhsm_module)
        say "writing $config"
        # signd refuses a config its group or others can write (umask 002 is common).
        (umask 077 && : >"$config")
        cat >"$config" <<EOF
# signd development config, written by scripts/dev.sh (edit freely; it is kept).
# Relative paths are relative to this file.  See README.md, Configuration reference.

[server]
socket = "signd.sock"
socket_mode = "0660"

[token]
module = "$module"
label = "$LABEL"
pin_file = "user.pin"

[audit]
# One hash-chained record per request; check it with: signctl audit verify state/audit/*.jsonl
dir = "audit"

[log]
level = "info"
EOF
    fi
    if [[ -n $(find "$config" -perm /022) ]]; then
        say "$config is writable by its group or others: signd would refuse it; chmod go-w"
        chmod go-w -- "$config"
    fi
    # sun_path holds 107 bytes plus the NUL.
    if ((${#socket} > 107)); then
        die "socket path $socket is too long for a Unix socket; move the checkout to a shorter path"
    fi

    printf 'SIGND_SOCKET=%s\n' "$socket"
    say "signd is starting on a development token; stop it with Ctrl-C."
    say "in another shell:  cd $ROOT && . .venv/bin/activate && export SIGND_SOCKET=$socket"
    exec "$VENV/bin/signd" serve --config "$config"
}

# pytest-xdist workers: one per core, at least two (three on two cores
# measured no faster than two: the daemons the tests start keep them busy).
default_workers() {
    local cores
    cores=$(nproc 2>/dev/null || echo 2)
    echo $((cores < 2 ? 2 : cores))
}

cmd_test() {
    setup
    cd "$ROOT"
    # Tests make their own token and daemons; keep a developer's daemon out of them.
    unset SIGND_SOCKET LISTEN_FDS LISTEN_PID LISTEN_FDNAMES
    local failed=() status
    run_step() {
        local name=$1
        shift
        section "$name: $*"
        status=0
        "$@" || status=$?
        if ((status != 0)); then
            failed+=("$name (exit $status)")
        fi
    }
    run_step "lint" "$VENV/bin/ruff" check .
    run_step "format" "$VENV/bin/ruff" format --check .
    run_step "types" "$VENV/bin/mypy"
    run_step "types (examples)" "$VENV/bin/mypy" --strict clients/python/examples
    # Tests run in parallel (pytest-xdist).  worksteal hands each worker a
    # run of neighbouring tests (so a module's fixtures are mostly made once)
    # and lets an idle worker take tests queued for a busy one, so no worker
    # idles at the end.  SIGND_TEST_WORKERS=0 runs them in this process.
    run_step "tests" "$VENV/bin/pytest" -n "${SIGND_TEST_WORKERS:-$(default_workers)}" \
        --dist worksteal "$@"
    section "summary"
    if ((${#failed[@]} > 0)); then
        printf 'FAILED: %s\n' "${failed[@]}"
        return 1
    fi
    echo "all checks passed: ruff check, ruff format --check, mypy, pytest"
}

main() {
    if (($# == 0)); then
        usage >&2
        exit 2
    fi
    local cmd=$1
    shift
    case $cmd in
    serve) cmd_serve "$@" ;;
    test) cmd_test "$@" ;;
    setup)
        (($# == 0)) || {
            usage >&2
            exit 2
        }
        setup
        ;;
    -h | --help | help)
        usage
        exit 0
        ;;
    *)
        printf 'dev.sh: unknown command: %s\n\n' "$cmd" >&2
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
