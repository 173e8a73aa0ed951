"""The peers signd is measured against, on the same machine and key type.

Two programs do signd's job over a Unix socket and are in Debian:

* **p11-kit's server** remotes a PKCS#11 token: ``p11-kit server`` listens on a
  socket and forks one ``p11-kit-remote`` per connection, which loads the real
  module (SoftHSM) and serves the client's ``p11-kit-client.so``.  Clients are
  separate processes, each with its own connection, login and session, signing
  a 32-byte digest with ``CKM_ECDSA`` on the same ECDSA P-256 key as signd.
* **ssh-agent** holds an ECDSA P-256 key in memory and signs what one client
  sends it over the agent protocol (draft-miller-ssh-agent).  It never touches
  the token, so it is a floor for "a signing service behind a socket", not a
  like-for-like PKCS#11 comparison; its row says so.

Each ``measure_*`` function returns one :class:`~signd_bench._measure.Row`, with
the server side's CPU time (the server and its children over the measured
interval) and peak RSS.  Every row is checked: the last signature of each client
is verified with ``cryptography`` before the row is returned.

Every wait has a deadline, every process started here is stopped (by pid) and
every temporary file and socket is removed, whatever happens.  Something that
cannot start raises :class:`PeerUnavailable`; a peer that answers wrongly raises
:class:`PeerError` (:class:`PeerBadSignature` for a signature that does not
verify).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from ._measure import Row, process_tree, reset_peak_rss, usage_of

__all__ = [
    "DIGEST",
    "PeerBadSignature",
    "PeerError",
    "PeerUnavailable",
    "measure_p11kit_server",
    "measure_ssh_agent",
    "p11kit_available",
    "p11kit_client_module",
    "ssh_agent_available",
]

#: The fixed 32-byte digest (or ssh-agent data blob) every peer signs.
DIGEST = hashlib.sha256(b"signd bench: peer digest").digest()

#: Latencies kept per client (a sample: the first calls of the run).
MAX_SAMPLES = 200_000

#: Deadlines, in seconds, for the waits that have nothing to do with `seconds`.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

KEY_TYPE = "ec-p256"


class PeerError(Exception):
    """A peer ran but did not do its job (refused, crashed, answered nonsense)."""


class PeerUnavailable(PeerError):
    """A peer cannot be measured here: not installed, or it did not start."""


class PeerBadSignature(PeerError):
    """A peer returned a signature that does not verify under its public key."""


# --------------------------------------------------------------------- helpers --


def _which(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise PeerUnavailable(f"{tool} is not installed")
    return path


def _listening(path: str) -> bool:
    """Whether a Unix socket bound to ``path`` is listening (from /proc/net/unix).

    Polling this instead of connecting matters for p11-kit's server, which forks
    and execs a ``p11-kit-remote`` for every connection, even a probe.
    """
    try:
        with open("/proc/net/unix") as f:
            next(f)  # header
            for line in f:
                parts = line.split(None, 7)
                # Flags 0x10000 is __SO_ACCEPTCON: listen() has been called.
                if len(parts) == 8 and parts[7].rstrip("\n") == path:
                    if int(parts[3], 16) & 0x10000:
                        return True
    except (OSError, StopIteration, ValueError):
        return False
    return False


def _wait_listening(proc: subprocess.Popen[bytes], path: str, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    delay = 0.001
    while not _listening(path):
        if proc.poll() is not None:
            raise PeerUnavailable(
                f"{what} exited with status {proc.returncode} before listening: {_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise PeerUnavailable(f"{what} did not listen on {path} within {START_TIMEOUT}s")
        time.sleep(delay)  # polling a condition that has no event to wait on
        delay = min(delay * 2, 0.05)


def _tail(path: Path, limit: int = 500) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no output)"
    return text[-limit:] if text else "(no output)"


def _alive_comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Signal a process this module started and reap it; SIGKILL if it lingers."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _kill_leftovers(pids: Sequence[int], comm_prefix: str) -> None:
    """SIGKILL processes we started (known by pid) that outlived their parent.

    The command name is checked first so a recycled pid is never touched.
    """
    for pid in pids:
        comm = _alive_comm(pid)
        if comm is not None and comm.startswith(comm_prefix):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _server_usage(pid: int) -> Iterator[_Usage]:
    """CPU seconds and peak RSS of ``pid``'s process tree over the ``with`` body."""
    pids = process_tree(pid)
    reset_peak_rss(pids)
    before = usage_of(pids)
    out = _Usage()
    yield out
    # Children forked during the interval count too; ones that already exited
    # are lost (their CPU went to the parent's cutime), so callers keep their
    # connections open until this is taken.
    after_pids = sorted(set(pids) | set(process_tree(pid)))
    after = usage_of(after_pids)
    out.cpu = max(0.0, after.cpu - before.cpu)
    out.peak_rss_mb = after.peak_rss_mb


@dataclass
class _Usage:
    cpu: float = 0.0
    peak_rss_mb: float = 0.0


def _p256_public_key(point: bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 key from an X9.62 point, bare or in a DER OCTET STRING (CKA_EC_POINT)."""
    if len(point) == 67 and point[0] == 0x04 and point[1] == 65:
        point = point[2:]
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise PeerError(f"not a P-256 public point: {point.hex()}") from exc


def _point_of(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


# -------------------------------------------------------------- p11-kit server --

#: Where Debian (and others) install p11-kit's client module.
_P11KIT_CLIENT_DIRS = (
    "/usr/lib/x86_64-linux-gnu/pkcs11",
    f"/usr/lib/{sysconfig.get_config_var('MULTIARCH') or 'x86_64-linux-gnu'}/pkcs11",
    "/usr/lib64/pkcs11",
    "/usr/lib/pkcs11",
)


def p11kit_client_module() -> str | None:
    """The path of ``p11-kit-client.so``, or None if it is not installed."""
    for d in _P11KIT_CLIENT_DIRS:
        path = os.path.join(d, "p11-kit-client.so")
        if os.path.exists(path):
            return path
    return None


def p11kit_available() -> str | None:
    """None if p11-kit's server can be measured here, else the reason why not."""
    exe = shutil.which("p11-kit")
    if exe is None:
        return "p11-kit is not installed (Debian package p11-kit)"
    if p11kit_client_module() is None:
        return "p11-kit-client.so is not installed (Debian package p11-kit-modules)"
    if importlib.util.find_spec("pkcs11") is None:
        return "python-pkcs11 is not installed"
    try:
        out = subprocess.run(
            [exe, "server", "--help"],
            capture_output=True,
            timeout=START_TIMEOUT,
            check=False,
            env=_without(os.environ, ("P11_KIT_",)),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"p11-kit server --help failed: {exc}"
    if out.returncode != 0 or b"p11-kit server" not in out.stdout + out.stderr:
        return "p11-kit has no server command (p11-kit-server is not installed)"
    return None


def _without(env: Any, prefixes: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(prefixes)}


#: The client process: ``python -c _P11KIT_DRIVER``.  It speaks JSON lines:
#: stdin  -> {config, PIN included}, then "go", then EOF (= exit, at any point)
#: stdout <- {"ready"...} or {"error"...}, then the result {"count", ...}
#: The PIN arrives on stdin only: never argv, never the environment.
_P11KIT_DRIVER = r"""
import json, sys, time

def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

def main():
    import pkcs11
    from pkcs11 import Attribute, Mechanism, ObjectClass

    line = sys.stdin.readline()
    if not line:
        return 0
    cfg = json.loads(line)
    pin = cfg.pop("pin")
    session = None
    try:
        lib = pkcs11.lib(cfg["client_module"])
        token = lib.get_token(token_label=cfg["token_label"])
        session = token.open(user_pin=pin)
        del pin
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=cfg["key_label"])
        pub = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=cfg["key_label"])
        point = bytes(pub[Attribute.EC_POINT])
        digest = bytes.fromhex(cfg["digest"])
        mech = Mechanism.ECDSA
        sig = key.sign(digest, mechanism=mech)  # warm-up, and proof the key signs
    except Exception as exc:
        emit({"error": "%s: %s" % (type(exc).__name__, exc)})
        return 1
    emit({"ready": True, "ec_point": point.hex()})

    if sys.stdin.readline().strip() != "go":
        return 0
    seconds = float(cfg["seconds"])
    cap = int(cfg["max_samples"])
    lat = []
    append = lat.append
    perf = time.perf_counter
    sign = key.sign
    count = 0
    error = None
    t0 = now = perf()
    end = t0 + seconds
    try:
        while now < end:
            sig = sign(digest, mechanism=mech)
            t = perf()
            if count < cap:
                append(t - now)
            count += 1
            now = t
    except Exception as exc:
        error = "%s: %s" % (type(exc).__name__, exc)
        now = perf()
    emit({"count": count, "elapsed": now - t0, "latencies": lat,
          "signature": sig.hex(), "error": error})
    # Stay connected until told: the server's per-connection process must be
    # alive when the parent reads its CPU time.
    sys.stdin.readline()
    try:
        session.close()
    except Exception:
        pass
    return 0

sys.exit(main())
"""


@dataclass
class _Client:
    index: int
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    buf: bytearray = field(default_factory=bytearray)
    ready: bool = False
    ec_point: bytes = b""
    result: dict[str, Any] | None = None
    failure: str | None = None

    def send(self, line: str) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(line.encode() + b"\n")
            stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise PeerError(f"client {self.index} is gone ({exc})") from exc

    def read(self, deadline: float) -> dict[str, Any]:
        """The next JSON line from the client, or PeerError (EOF, garbage, timeout)."""
        stdout = self.proc.stdout
        assert stdout is not None
        fd = stdout.fileno()
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise PeerError(f"client {self.index} wrote {line[:80]!r}") from exc
                if not isinstance(obj, dict):
                    raise PeerError(f"client {self.index} wrote {line[:80]!r}")
                return obj
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerError(f"client {self.index} did not answer in time")
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                self.proc.poll()
                raise PeerError(
                    f"client {self.index} exited (status {self.proc.returncode}): "
                    f"{_tail(self.stderr_path)}"
                )
            self.buf += chunk


def measure_p11kit_server(
    *,
    module: str,
    token_label: str,
    pin: str,
    key_label: str,
    processes: int,
    seconds: float,
    softhsm_conf: str,
    public_key: ec.EllipticCurvePublicKey | None = None,
) -> Row:
    """Sign through ``p11-kit server`` from ``processes`` client processes at once.

    ``module`` is the token's PKCS#11 module (SoftHSM), which the server loads;
    the key pair labelled ``key_label`` (ECDSA P-256) must already be on the token.
    If ``public_key`` is given, signatures are verified against it and the public
    key the token reports through the server must be the same one.

    Clients connect and log in one after another (many connecting at once made
    p11-kit's server fail with ``GeneralError``), then all start signing together
    for ``seconds``.  A client that fails is reported in the row's note.

    Raises:
        PeerUnavailable: p11-kit is missing, the server did not start, or no
            client could log in and find the key.
        PeerBadSignature: a client's signature does not verify.
        PeerError: the clients did not report back in time, or mid-run failures
            left nothing measured.
    """
    if processes < 1:
        raise ValueError("processes must be at least 1")
    reason = p11kit_available()
    if reason is not None:
        raise PeerUnavailable(reason)
    exe = _which("p11-kit")
    client_module = p11kit_client_module()
    assert client_module is not None

    tmp = Path(tempfile.mkdtemp(prefix="signd-p11kit-"))
    sock = str(tmp / "p11kit.sock")
    server: subprocess.Popen[bytes] | None = None
    clients: list[_Client] = []
    server_pids: list[int] = []
    measured = False
    try:
        server_env = _without(os.environ, ("P11_KIT_SERVER_",))
        server_env["SOFTHSM2_CONF"] = softhsm_conf
        server_log = tmp / "server.log"
        with open(server_log, "wb") as log:
            server = subprocess.Popen(
                [
                    exe,
                    "server",
                    "--provider",
                    module,
                    "-f",
                    "-n",
                    sock,
                    "pkcs11:token=" + urllib.parse.quote(token_label, safe=""),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=server_env,
                cwd=tmp,
                start_new_session=True,  # a terminal's Ctrl-C is ours to forward
            )
        _wait_listening(server, sock, "p11-kit server", server_log)

        client_env = _without(os.environ, ("P11_KIT_SERVER_",))
        client_env["P11_KIT_SERVER_ADDRESS"] = "unix:path=" + urllib.parse.quote(sock, safe="/-_.~")
        # All interpreters start (and import pkcs11) in parallel; each connects
        # only when handed its config, one after another.
        for i in range(processes):
            err = tmp / f"client-{i}.err"
            with open(err, "wb") as errf:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _P11KIT_DRIVER],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=errf,
                    env=client_env,
                    cwd=tmp,
                    bufsize=0,
                )
            clients.append(_Client(i, proc, err))

        config = {
            "client_module": client_module,
            "token_label": token_label,
            "key_label": key_label,
            "digest": DIGEST.hex(),
            "seconds": seconds,
            "max_samples": MAX_SAMPLES,
        }
        for c in clients:
            try:
                c.send(json.dumps({**config, "pin": pin}))
                answer = c.read(time.monotonic() + START_TIMEOUT)
            except PeerError as exc:
                c.failure = str(exc)
                continue
            if "error" in answer:
                c.failure = f"client {c.index}: {answer['error']}"
                continue
            c.ready = True
            c.ec_point = bytes.fromhex(str(answer["ec_point"]))

        ready = [c for c in clients if c.ready]
        if not ready:
            failures = "; ".join(c.failure or "?" for c in clients)
            raise PeerUnavailable(
                f"no p11-kit client could sign: {failures}; server: {_tail(server_log)}"
            )

        with _server_usage(server.pid) as usage:
            for c in ready:
                try:
                    c.send("go")
                except PeerError as exc:
                    c.failure = str(exc)
            deadline = time.monotonic() + seconds + START_TIMEOUT
            for c in ready:
                if c.failure is not None:
                    continue
                try:
                    c.result = c.read(deadline)
                except PeerError as exc:
                    c.failure = str(exc)
                    continue
                if c.result.get("error"):
                    c.failure = f"client {c.index} failed mid-run: {c.result['error']}"
        server_pids = process_tree(server.pid)
        measured = True
        return _p11kit_row(clients, processes, usage, public_key)
    finally:
        for c in clients:  # EOF on stdin: every client state ends with that
            if c.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    c.proc.stdin.close()
            if not measured and c.proc.poll() is None:
                # Interrupted (or failed) mid-run: do not wait for the loops to end.
                with contextlib.suppress(ProcessLookupError):
                    c.proc.terminate()
        for c in clients:
            try:
                c.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _stop(c.proc, signal.SIGKILL)
            _stop(c.proc)
        if server is not None:
            server_pids = sorted(set(server_pids) | set(process_tree(server.pid)))
            _stop(server)
            _kill_leftovers([p for p in server_pids if p != server.pid], "p11-kit")
        shutil.rmtree(tmp, ignore_errors=True)


def _p11kit_row(
    clients: list[_Client],
    processes: int,
    usage: _Usage,
    public_key: ec.EllipticCurvePublicKey | None,
) -> Row:
    measured = [c for c in clients if c.result is not None and int(c.result["count"]) > 0]
    notes = [c.failure for c in clients if c.failure is not None]
    if not measured:
        raise PeerError("no p11-kit client completed a signature: " + "; ".join(notes))

    expected = _point_of(public_key) if public_key is not None else None
    for c in measured:
        assert c.result is not None
        token_key = _p256_public_key(c.ec_point)
        if expected is not None and _point_of(token_key) != expected:
            raise PeerBadSignature(
                f"client {c.index}: the token's public key for this label is not the expected one"
            )
        raw = bytes.fromhex(str(c.result["signature"]))
        _verify_p256(public_key or token_key, raw, what=f"p11-kit client {c.index}")

    latencies: list[float] = []
    for c in measured:
        assert c.result is not None
        latencies.extend(float(x) for x in c.result["latencies"])
    operations = sum(int(c.result["count"]) for c in measured if c.result is not None)
    elapsed = max(float(c.result["elapsed"]) for c in measured if c.result is not None)
    plural = "client process" if processes == 1 else "client processes"
    note = (
        f"p11-kit server remoting SoftHSM, CKM_ECDSA on a 32-byte digest; "
        f"clients ok: {len(measured)}/{processes}; "
        f"server side = p11-kit server + one p11-kit-remote per client; "
        f"verified {len(measured)} signature(s)"
    )
    if notes:
        note += "; failures: " + "; ".join(notes)
    return Row(
        name=f"p11-kit server, {processes} {plural}",
        key_type=KEY_TYPE,
        operations=operations,
        seconds=elapsed,
        latencies=latencies,
        server_cpu=usage.cpu,
        server_peak_rss_mb=usage.peak_rss_mb,
        note=note,
    )


def _verify_p256(key: ec.EllipticCurvePublicKey, raw: bytes, *, what: str) -> None:
    """Check a PKCS#11 raw ``r || s`` ECDSA signature over :data:`DIGEST`."""
    if len(raw) != 64:
        raise PeerBadSignature(f"{what}: signature is {len(raw)} bytes, not 64 (r || s)")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        key.verify(der, DIGEST, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature as exc:
        raise PeerBadSignature(f"{what}: signature does not verify") from exc


# ------------------------------------------------------------------- ssh-agent --

SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14
SSH_AGENT_FAILURE = 5
_SSH_KEY_TYPE = b"ecdsa-sha2-nistp256"


def ssh_agent_available() -> str | None:
    """None if ssh-agent can be measured here, else the reason why not."""
    for tool in ("ssh-agent", "ssh-keygen", "ssh-add"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package openssh-client)"
    return None


def _ssh_string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


class _SshReader:
    """Reads the agent protocol's wire types from one message."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise PeerError("truncated ssh-agent message")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def string(self) -> bytes:
        return self.take(self.uint32())

    def mpint(self) -> int:
        return int.from_bytes(self.string(), "big", signed=True)


class _AgentConnection:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(START_TIMEOUT)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def call(self, payload: bytes) -> bytes:
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)
        return self.receive()

    def receive(self) -> bytes:
        buf = self.buf
        while len(buf) < 4:
            buf += self._recv()
        n = struct.unpack(">I", buf[:4])[0]
        while len(buf) < 4 + n:
            buf += self._recv()
        self.buf = buf[4 + n :]
        return buf[4 : 4 + n]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise PeerError("ssh-agent closed the connection")
        return chunk


def measure_ssh_agent(*, seconds: float) -> Row:
    """Sign a 32-byte blob through ssh-agent from one synchronous client.

    A throw-away ECDSA P-256 key is made with ssh-keygen and loaded into a fresh
    ``ssh-agent -D``; this process then speaks the agent protocol on its socket.
    The agent signs with its in-memory key (SHA-256 over the data), not through
    the token.

    Raises:
        PeerUnavailable: the OpenSSH tools are missing or the agent did not start.
        PeerBadSignature: the agent's signature does not verify.
        PeerError: the agent refused a request or answered nonsense.
    """
    reason = ssh_agent_available()
    if reason is not None:
        raise PeerUnavailable(reason)
    agent_exe, keygen, add = _which("ssh-agent"), _which("ssh-keygen"), _which("ssh-add")
    tmp = Path(tempfile.mkdtemp(prefix="signd-sshagent-"))
    sock_path = str(tmp / "agent.sock")
    key_path = tmp / "id_ecdsa"
    env = _without(os.environ, ("SSH_AUTH_SOCK", "SSH_AGENT_PID"))
    agent: subprocess.Popen[bytes] | None = None
    conn: _AgentConnection | None = None
    try:
        _run_tool(
            [
                keygen,
                "-q",
                "-t",
                "ecdsa",
                "-b",
                "256",
                "-N",
                "",
                "-C",
                "signd-bench",
                "-f",
                str(key_path),
            ],
            env,
            "ssh-keygen",
        )
        log = tmp / "agent.log"
        with open(log, "wb") as logf:
            agent = subprocess.Popen(
                [agent_exe, "-D", "-a", sock_path],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=logf,
                env=env,
                cwd=tmp,
                start_new_session=True,
            )
        _wait_listening(agent, sock_path, "ssh-agent", log)
        _run_tool([add, "-q", str(key_path)], {**env, "SSH_AUTH_SOCK": sock_path}, "ssh-add")

        # The public key as ssh-keygen wrote it: the identity the agent must hold.
        pub_fields = (tmp / "id_ecdsa.pub").read_text().split()
        key_blob = base64.b64decode(pub_fields[1])
        public_key = _ssh_p256_public_key(key_blob)

        conn = _AgentConnection(sock_path)
        _require_identity(conn, key_blob)
        request = (
            bytes([SSH_AGENTC_SIGN_REQUEST])
            + _ssh_string(key_blob)
            + _ssh_string(DIGEST)
            + struct.pack(">I", 0)
        )
        frame = struct.pack(">I", len(request)) + request
        conn.call(request)  # warm-up

        latencies: list[float] = []
        append = latencies.append
        perf = time.perf_counter
        sendall, receive = conn.sock.sendall, conn.receive
        count = 0
        response = b""
        with _server_usage(agent.pid) as usage:
            t0 = now = perf()
            end = t0 + seconds
            while now < end:
                sendall(frame)
                response = receive()
                t = perf()
                if response[:1] != b"\x0e":  # SSH_AGENT_SIGN_RESPONSE
                    raise PeerError(f"ssh-agent answered type {response[:1].hex()} to a sign")
                if count < MAX_SAMPLES:
                    append(t - now)
                count += 1
                now = t
            elapsed = now - t0

        _verify_ssh_signature(public_key, response)
        return Row(
            name="ssh-agent, 1 client",
            key_type=KEY_TYPE,
            operations=count,
            seconds=elapsed,
            latencies=latencies,
            server_cpu=usage.cpu,
            server_peak_rss_mb=usage.peak_rss_mb,
            note=(
                "ssh-agent signs with its own in-memory key (not the token), "
                "SHA-256 over 32 bytes of data; one synchronous client; "
                "verified the last signature"
            ),
        )
    finally:
        if conn is not None:
            conn.close()
        _stop(agent)
        shutil.rmtree(tmp, ignore_errors=True)


def _run_tool(argv: list[str], env: dict[str, str], what: str) -> None:
    try:
        out = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=START_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable(f"{what} failed: {exc}") from exc
    if out.returncode != 0:
        msg = out.stderr.decode(errors="replace").strip()
        raise PeerUnavailable(f"{what} exited with status {out.returncode}: {msg}")


def _ssh_p256_public_key(blob: bytes) -> ec.EllipticCurvePublicKey:
    r = _SshReader(blob)
    if r.string() != _SSH_KEY_TYPE or r.string() != b"nistp256":
        raise PeerError("not an ecdsa-sha2-nistp256 key blob")
    return _p256_public_key(r.string())


def _require_identity(conn: _AgentConnection, key_blob: bytes) -> None:
    answer = conn.call(bytes([SSH_AGENTC_REQUEST_IDENTITIES]))
    r = _SshReader(answer)
    kind = r.take(1)[0]
    if kind != SSH_AGENT_IDENTITIES_ANSWER:
        raise PeerError(f"ssh-agent answered type {kind} to request-identities")
    blobs = []
    for _ in range(r.uint32()):
        blobs.append(r.string())
        r.string()  # comment
    if key_blob not in blobs:
        raise PeerError("ssh-agent does not hold the key ssh-add was given")


def _verify_ssh_signature(key: ec.EllipticCurvePublicKey, response: bytes) -> None:
    r = _SshReader(response)
    if r.take(1)[0] != SSH_AGENT_SIGN_RESPONSE:
        raise PeerError("not a sign response")
    sig = _SshReader(r.string())
    if sig.string() != _SSH_KEY_TYPE:
        raise PeerBadSignature("ssh-agent signature is not ecdsa-sha2-nistp256")
    inner = _SshReader(sig.string())
    der = encode_dss_signature(inner.mpint(), inner.mpint())
    try:
        key.verify(der, DIGEST, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise PeerBadSignature("ssh-agent: signature does not verify") from exc
