"""The daemon's life: start, stop, its socket, its config, its logs and its PIN.

Every daemon here is a real ``signd serve`` process on the shared SoftHSM
token.  Each one's log is checked at the end of its test: every line is a JSON
object with ts, level and msg, and the user PIN appears nowhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from support import wait_until

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv  # the root conftest.py

HEADER = struct.Struct(">I")
LEVELS = {"debug", "info", "warning", "error", "critical"}
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)")


# --------------------------------------------------------------------------
# helpers


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def read_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame as a map, or None at EOF."""
    buf = b""
    while len(buf) < 4:
        chunk = sock.recv(4 - len(buf))
        if not chunk:
            assert not buf, "EOF inside a frame header"
            return None
        buf += chunk
    (length,) = HEADER.unpack(buf)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "EOF inside a frame body"
        body += chunk
    obj = msgpack.unpackb(body, raw=False)
    assert isinstance(obj, dict)
    return obj


def sign_request(rid: int, key: str, message: bytes) -> bytes:
    return frame({"v": 1, "id": rid, "op": "sign", "args": {"key": key, "message": message}})


def log_records(text: str) -> list[dict[str, Any]]:
    """Parse a daemon log; every line must be a JSON object with ts, level and msg."""
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"log line {n} is not JSON: {line!r}\n{text[-3000:]}")
        assert isinstance(rec, dict), line
        assert {"ts", "level", "msg"} <= rec.keys(), line
        assert TS.fullmatch(rec["ts"]), line
        assert rec["level"] in LEVELS, line
        assert isinstance(rec["msg"], str), line
        assert rec["msg"], line
        records.append(rec)
    return records


def find(records: list[dict[str, Any]], msg: str) -> list[dict[str, Any]]:
    return [r for r in records if r["msg"] == msg]


def assert_no_pin(text: str, *pins: str) -> None:
    for pin in pins:
        assert pin, "an empty PIN proves nothing"
        assert pin not in text, "the PIN appears in the daemon's output"


def signd_cmd(command: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "signd", command, "--config", str(config)]


def run_signd(
    token: TokenEnv, command: str, config: Path, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        signd_cmd(command, config),
        env=token.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def daemons(
    make_daemon: Callable[..., Daemon], token_env: TokenEnv
) -> Iterator[Callable[..., Daemon]]:
    """``make_daemon``, and at the end every daemon's log is JSON lines without the PIN."""
    made: list[tuple[Daemon, bool]] = []

    def make(*args: Any, json_log: bool = True, **kwargs: Any) -> Daemon:
        d = make_daemon(*args, **kwargs)
        made.append((d, json_log))
        return d

    yield make
    for d, json_log in made:
        text = d.logs()
        assert_no_pin(text, token_env.pin)
        if json_log:
            log_records(text)


@pytest.fixture(scope="module")
def key(signd: Daemon) -> tuple[str, ec.EllipticCurvePublicKey]:
    """An ec-p256 key on the token; every daemon started later loads it."""
    return signd.new_ec_key("life")


# --------------------------------------------------------------------------
# signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(
    daemons: Callable[..., Daemon], key: tuple[str, ec.EllipticCurvePublicKey], sig: int
) -> None:
    d = daemons()
    assert stat.S_ISSOCK(os.lstat(d.socket).st_mode)
    d.check_signs(key)
    assert d.stop(sig) == 0, d.logs()
    assert not os.path.lexists(d.socket), "the socket file was left behind"
    records = log_records(d.logs())
    assert [r["signal"] for r in find(records, "stopping")] == [signal.Signals(sig).name]
    assert len(find(records, "stopped")) == 1


@pytest.mark.parametrize(
    "n",
    [
        # ~35 KB of requests: the daemon takes them in with one read.
        pytest.param(500, id="500-requests"),
        # ~210 KB, and more than max_inflight_per_connection (1024): when the signal
        # comes, part of what the client wrote is still in the daemon's socket buffer.
        pytest.param(3000, id="3000-requests"),
    ],
)
def test_sigterm_answers_every_request_in_flight(
    daemons: Callable[..., Daemon], key: tuple[str, ec.EllipticCurvePublicKey], n: int
) -> None:
    d = daemons()
    name, public = key
    messages = {rid: f"in flight {rid}".encode() for rid in range(1, n + 1)}
    sock = d.connect_raw()
    sock.settimeout(30)
    answers: list[dict[str, Any]] = []
    failure: list[BaseException] = []

    def reader() -> None:
        try:
            while (resp := read_frame(sock)) is not None:
                answers.append(resp)
        except BaseException as exc:
            failure.append(exc)

    t = threading.Thread(target=reader, name="in-flight-reader")
    t.start()
    try:
        # Every request is written (taken by the kernel) before the signal is sent.
        sock.sendall(b"".join(sign_request(rid, name, msg) for rid, msg in messages.items()))
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert not t.is_alive(), "the daemon kept the connection open after SIGTERM"
    finally:
        sock.close()
        t.join(5)
    assert d.proc.wait(20) == 0, d.logs()
    assert not os.path.lexists(d.socket)
    ids = [a["id"] for a in answers]
    assert len(ids) == len(set(ids)), "a request was answered twice"
    missing = sorted(set(messages) - set(ids))
    assert not missing, (
        f"{len(missing)} of {n} requests written before SIGTERM got no answer "
        f"(the connection ended with {failure or 'EOF'})"
    )
    assert not failure, failure  # a clean EOF after the last answer, not a reset
    assert set(ids) == set(messages)
    for a in answers:
        if "error" in a:
            # The only acceptable error is "shutting down": it is still an answer.
            assert a["error"]["code"] == 504, a
            continue
        public.verify(a["result"]["signature"], messages[a["id"]], ec.ECDSA(hashes.SHA256()))


def test_new_connections_refused_after_sigterm(
    daemons: Callable[..., Daemon], key: tuple[str, ec.EllipticCurvePublicKey]
) -> None:
    d = daemons()
    d.check_signs(key)
    assert d.stop(signal.SIGTERM) == 0
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s,
        pytest.raises((FileNotFoundError, ConnectionRefusedError)),
    ):
        s.connect(d.socket)


# --------------------------------------------------------------------------
# the socket path


def test_stale_socket_is_removed(
    daemons: Callable[..., Daemon], key: tuple[str, ec.EllipticCurvePublicKey]
) -> None:
    d = daemons(start=False)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(d.socket)  # bound, never listening: what a crashed daemon leaves
    stale.close()
    before = os.lstat(d.socket)
    assert stat.S_ISSOCK(before.st_mode)
    d.start()
    d.check_signs(key)
    assert len(find(log_records(d.logs()), "removing stale socket")) == 1
    assert d.stop() == 0


def test_second_daemon_on_a_live_socket_refuses(
    daemons: Callable[..., Daemon],
    token_env: TokenEnv,
    tmp_path: Path,
    key: tuple[str, ec.EllipticCurvePublicKey],
) -> None:
    first = daemons()
    inode = os.lstat(first.socket).st_ino
    second = tmp_path / "second.toml"
    second.write_text(base_config(token_env, Path(first.socket)))
    out = run_signd(token_env, "serve", second)
    assert out.returncode == 1, out.stderr
    errors = [r for r in log_records(out.stderr) if r["level"] == "error"]
    assert errors, out.stderr
    assert any("already listening" in str(r) and first.socket in str(r) for r in errors), errors
    assert not find(log_records(out.stderr), "ready")
    assert_no_pin(out.stderr, token_env.pin)
    # The first one is untouched and keeps serving, on the same socket file.
    assert os.lstat(first.socket).st_ino == inode
    first.check_signs(key)
    assert first.proc is not None
    assert first.proc.poll() is None


def test_regular_file_at_socket_path_is_not_removed(daemons: Callable[..., Daemon]) -> None:
    d = daemons(start=False)
    Path(d.socket).write_text("precious\n")
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 1, d.logs()
    assert Path(d.socket).read_text() == "precious\n"
    errors = [r for r in log_records(d.logs()) if r["level"] == "error"]
    assert any("not a socket" in str(r) for r in errors), d.logs()


def test_socket_mode_is_applied(
    daemons: Callable[..., Daemon],
    token_env: TokenEnv,
    tmp_path: Path,
    key: tuple[str, ec.EllipticCurvePublicKey],
) -> None:
    d = daemons(start=False)
    cfg = tmp_path / "mode.toml"
    cfg.write_text(
        base_config(token_env, Path(d.socket)).replace(
            "[server]\n", '[server]\nsocket_mode = "0600"\n'
        )
    )
    d.start(argv=signd_cmd("serve", cfg))
    assert stat.S_IMODE(os.lstat(d.socket).st_mode) == 0o600
    d.check_signs(key)
    assert d.stop() == 0


def test_default_socket_mode(daemons: Callable[..., Daemon]) -> None:
    d = daemons()
    assert stat.S_IMODE(os.lstat(d.socket).st_mode) == 0o660


# --------------------------------------------------------------------------
# systemd socket activation


#: What systemd-socket-activate itself prints (the rest of the log is signd's).
ACTIVATE_LINE = re.compile(
    r"(Listening on \S+ as \d+|Communication attempt on fd \d+|Execing .*)\.?$"
)


def test_socket_activation(
    daemons: Callable[..., Daemon], key: tuple[str, ec.EllipticCurvePublicKey]
) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.fail("systemd-socket-activate is missing: run the README's test command (systemd)")
    # Its own "Listening on ..." lines are not signd's, so the JSON check is done below.
    d = daemons(start=False, json_log=False)
    argv = [activate, "-l", d.socket, "-E", "SOFTHSM2_CONF", *d.command()]
    d.start(wait=False, argv=argv)
    assert d.proc is not None
    wait_until(lambda: os.path.exists(d.socket), "systemd-socket-activate to listen")
    # The first connection makes systemd-socket-activate exec signd with the socket as fd 3;
    # a signd that ignored it would find the path in use and exit.
    d.check_signs(key)
    assert d.proc.poll() is None
    signd_lines = "\n".join(line for line in d.logs().splitlines() if not ACTIVATE_LINE.match(line))
    ready = find(log_records(signd_lines), "ready")
    assert len(ready) == 1
    assert ready[0]["socket"] == "systemd socket"
    assert ready[0]["pid"] == d.proc.pid  # exec'd in place: the same process
    d.check_signs(key)
    assert d.stop() == 0, d.logs()


# --------------------------------------------------------------------------
# configuration


def base_config(token: TokenEnv, sock: Path, pin_file: Path | None = None) -> str:
    return (
        f'[server]\nsocket = "{sock}"\n\n'
        f'[token]\nmodule = "{token.module}"\nlabel = "{token.label}"\n'
        f'pin_file = "{pin_file or token.pin_file}"\n'
    )


def append(text: str) -> Callable[[str], str]:
    return lambda c: c + text


def in_server(line: str) -> Callable[[str], str]:
    return lambda c: c.replace("[server]\n", f"[server]\n{line}\n")


def replace(pattern: str, repl: str) -> Callable[[str], str]:
    return lambda c: re.sub(pattern, repl, c, flags=re.MULTILINE)


# (id, edit of the good config, what the message must contain: the field's name)
BAD_CONFIGS = [
    ("max-frame-tiny", append("\n[limits]\nmax_frame = 12\n"), "limits.max_frame"),
    ("max-frame-str", append('\n[limits]\nmax_frame = "1MiB"\n'), "limits.max_frame"),
    ("max-frame-huge", append("\n[limits]\nmax_frame = 1073741824\n"), "limits.max_frame"),
    ("socket-mode-0666", in_server('socket_mode = "0666"'), "server.socket_mode"),
    ("socket-mode-not-octal", in_server('socket_mode = "rw-rw----"'), "server.socket_mode"),
    ("socket-mode-int", in_server("socket_mode = 432"), "server.socket_mode"),
    ("socket-int", replace(r'^socket = ".*"', "socket = 5"), "server.socket"),
    (
        "pin-file-missing",
        replace(r'pin_file = ".*"', 'pin_file = "/nonexistent"'),
        "token.pin_file",
    ),
    ("no-pin-source", replace(r'pin_file = ".*"\n', ""), "pin_file"),
    ("pin-file-and-credential", append('pin_credential = "signd-pin"\n'), "pin_credential"),
    ("unknown-section", append("\n[metrics]\nport = 9100\n"), "metrics"),
    ("unknown-key", in_server("listen_port = 1"), "server.listen_port"),
    ("module-relative", replace(r'module = ".*"', 'module = "softhsm2.so"'), "token.module"),
    ("label-too-long", replace(r'label = ".*"', f'label = "{"x" * 33}"'), "token.label"),
    ("log-level", append('\n[log]\nlevel = "loud"\n'), "log.level"),
    ("timeout-negative", append("\n[limits]\nrequest_timeout = -1\n"), "limits.request_timeout"),
    ("server-not-a-table", replace(r"^\[server\]", 'server = "x"\n[other]'), "server"),
    ("not-toml", append("\nthis is = not = toml\n"), "TOML"),
]


@pytest.mark.parametrize(("edit", "field"), [pytest.param(e, f, id=i) for i, e, f in BAD_CONFIGS])
def test_bad_config_exits_2_naming_the_field(
    token_env: TokenEnv, tmp_path: Path, edit: Callable[[str], str], field: str
) -> None:
    sock = tmp_path / "signd.sock"
    cfg = tmp_path / "signd.toml"
    cfg.write_text(edit(base_config(token_env, sock)))
    out = run_signd(token_env, "serve", cfg)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert field in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not sock.exists(), "a daemon with a bad config must not listen"
    assert_no_pin(out.stdout + out.stderr, token_env.pin)


def test_check_config(token_env: TokenEnv, tmp_path: Path) -> None:
    sock = tmp_path / "signd.sock"
    good = tmp_path / "good.toml"
    good.write_text(base_config(token_env, sock) + "\n[limits]\nmax_frame = 4096\n")
    out = run_signd(token_env, "check-config", good)
    assert out.returncode == 0, out.stderr
    assert "valid" in out.stdout
    assert not sock.exists()
    bad = tmp_path / "bad.toml"
    bad.write_text(base_config(token_env, sock) + "\n[limits]\nmax_frame = 12\n")
    out = run_signd(token_env, "check-config", bad)
    assert out.returncode == 2
    assert "limits.max_frame" in out.stderr
    assert_no_pin(out.stdout + out.stderr, token_env.pin)


def test_pin_file_readable_by_others_is_refused(token_env: TokenEnv, tmp_path: Path) -> None:
    pin_file = tmp_path / "user.pin"
    pin_file.write_text(token_env.pin + "\n")
    pin_file.chmod(0o644)
    sock = tmp_path / "signd.sock"
    cfg = tmp_path / "signd.toml"
    cfg.write_text(base_config(token_env, sock, pin_file))
    for command in ("serve", "check-config"):
        out = run_signd(token_env, command, cfg)
        assert out.returncode == 2, (command, out.stderr)
        assert "token.pin_file" in out.stderr
        assert "0644" in out.stderr
        assert_no_pin(out.stdout + out.stderr, token_env.pin)
    assert not sock.exists()
    pin_file.chmod(0o600)  # the same file, closed to others, is accepted
    assert run_signd(token_env, "check-config", cfg).returncode == 0


def test_wrong_pin_exits_1_without_showing_it(token_env: TokenEnv, tmp_path: Path) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    pin_file = tmp_path / "user.pin"
    pin_file.write_text(wrong + "\n")
    pin_file.chmod(0o600)
    sock = tmp_path / "signd.sock"
    cfg = tmp_path / "signd.toml"
    cfg.write_text(base_config(token_env, sock, pin_file))
    proc = subprocess.Popen(
        signd_cmd("serve", cfg),
        env=token_env.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The PIN is read from the file: it is not in the argv or the environment.
    try:
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        argv = environ = b""  # already gone; checked on the live daemons below
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1, stderr
    assert wrong.encode() not in argv + environ
    assert_no_pin(stdout + stderr, wrong, token_env.pin)
    errors = [r for r in log_records(stderr) if r["level"] == "error"]
    assert errors, stderr
    assert any("wrong PIN" in str(r) for r in errors), errors
    assert not find(log_records(stderr), "ready")
    assert not sock.exists(), "a daemon that cannot log in must not leave its socket behind"


def test_pin_not_in_argv_environment_or_log_of_a_running_daemon(
    signd: Daemon, daemons: Callable[..., Daemon], token_env: TokenEnv
) -> None:
    pin = token_env.pin.encode()
    for d in (signd, daemons()):
        assert d.proc is not None
        assert d.proc.poll() is None
        assert pin not in Path(f"/proc/{d.proc.pid}/cmdline").read_bytes()
        assert pin not in Path(f"/proc/{d.proc.pid}/environ").read_bytes()
        assert_no_pin(d.logs(), token_env.pin)
        log_records(d.logs())


def test_small_max_frame_is_enforced(
    daemons: Callable[..., Daemon], key: tuple[str, ec.EllipticCurvePublicKey]
) -> None:
    d = daemons("[limits]\nmax_frame = 1024\n")
    name, public = key
    s = d.connect_raw()
    try:
        small = b"s" * 900  # the frame stays under 1024 bytes
        s.sendall(sign_request(1, name, small))
        resp = read_frame(s)
        assert resp is not None
        assert resp["id"] == 1
        public.verify(resp["result"]["signature"], small, ec.ECDSA(hashes.SHA256()))
        s.sendall(sign_request(2, name, b"b" * 2000))  # a fine frame for the default limit
        resp = read_frame(s)
        assert resp is not None
        assert resp["id"] is None
        assert (resp["error"]["code"], resp["error"]["name"]) == (101, "frame_too_large")
        assert "1024" in resp["error"]["message"]
        assert read_frame(s) is None  # and this connection is closed
    finally:
        s.close()
    d.check_signs(key)  # the daemon itself goes on


def test_session_daemon_log(signd: Daemon, token_env: TokenEnv) -> None:
    """The shared daemon's log so far: JSON lines, no PIN, and it said it was ready."""
    records = log_records(signd.logs())
    assert_no_pin(signd.logs(), token_env.pin)
    ready = find(records, "ready")
    assert len(ready) == 1
    assert ready[0]["socket"] == signd.socket
    assert len(find(records, "token open")) == 1
