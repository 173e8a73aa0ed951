"""ssh-agent as a peer: an ECDSA P-256 key in memory, signing over the agent
protocol (see :mod:`signd_bench.peers`); and signd's own ssh-agent socket
(``[agent]``), measured the same way in the same run."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ._measure import Row
from ._peer_support import (
    DIGEST,
    KEY_TYPE,
    MAX_SAMPLES,
    START_TIMEOUT,
    PeerBadSignature,
    PeerError,
    PeerUnavailable,
    _p256_public_key,
    _server_usage,
    _stop,
    _wait_listening,
    _which,
    _without,
)

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
        request = _sign_request(key_blob)
        conn.call(request)  # warm-up
        with _server_usage(agent.pid) as usage:
            count, elapsed, latencies, response = _time_signs(conn, request, seconds, "ssh-agent")
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


def measure_signd_agent(socket_path: str, pid: int, key: str, *, seconds: float) -> Row:
    """Sign the same 32 bytes as the ssh-agent row through signd's agent socket
    (``[agent] socket``), from one synchronous client, with the current version
    of ``key`` (an ec-p256 key the socket lists); ``pid`` is the daemon's, for
    its process tree's CPU and RSS (the token workers included).

    Raises:
        PeerUnavailable: the socket does not answer, or does not list ``key``.
        PeerBadSignature: the last signature does not verify.
        PeerError: a sign request was refused, or answered nonsense.
    """
    try:
        conn = _AgentConnection(socket_path)
    except OSError as exc:
        raise PeerUnavailable(f"signd's agent socket {socket_path}: {exc}") from exc
    try:
        key_blob = _listed_blob(conn, f"{key}:v")
        if key_blob is None:
            raise PeerUnavailable(f"signd's agent socket does not list {key}")
        public_key = _ssh_p256_public_key(key_blob)
        request = _sign_request(key_blob)
        if conn.call(request)[:1] != b"\x0e":  # warm-up
            raise PeerError("signd's agent socket refused a sign request")
        with _server_usage(pid) as usage:
            count, elapsed, latencies, response = _time_signs(
                conn, request, seconds, "signd's agent"
            )
        _verify_ssh_signature(public_key, response)
        return Row(
            name="signd ssh-agent front end, 1 client",
            key_type=KEY_TYPE,
            operations=count,
            seconds=elapsed,
            latencies=latencies,
            server_cpu=usage.cpu,
            server_peak_rss_mb=usage.peak_rss_mb,
            note=(
                "signd's [agent] socket, signed on the token (SHA-256 over the same "
                "32 bytes as the ssh-agent row); one synchronous client; "
                "verified the last signature"
            ),
        )
    finally:
        conn.close()


def _listed_blob(conn: _AgentConnection, prefix: str) -> bytes | None:
    """The blob of the first identity whose comment starts with ``prefix``."""
    answer = conn.call(bytes([SSH_AGENTC_REQUEST_IDENTITIES]))
    r = _SshReader(answer)
    if r.take(1)[0] != SSH_AGENT_IDENTITIES_ANSWER:
        raise PeerError("the agent did not answer request-identities")
    for _ in range(r.uint32()):
        blob, comment = r.string(), r.string()
        if comment.decode(errors="replace").startswith(prefix):
            return blob
    return None


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


def _sign_request(key_blob: bytes) -> bytes:
    """A SIGN_REQUEST of the rows' 32 bytes with the key ``key_blob`` (no flags)."""
    return (
        bytes([SSH_AGENTC_SIGN_REQUEST])
        + _ssh_string(key_blob)
        + _ssh_string(DIGEST)
        + struct.pack(">I", 0)
    )


def _time_signs(
    conn: _AgentConnection, request: bytes, seconds: float, who: str
) -> tuple[int, float, list[float], bytes]:
    """Send ``request`` over ``conn`` one at a time for ``seconds``: (signatures,
    seconds taken, latencies (the first MAX_SAMPLES), the last answer).

    Raises: PeerError (an answer that is not a SIGN_RESPONSE).
    """
    frame = struct.pack(">I", len(request)) + request
    latencies: list[float] = []
    append = latencies.append
    perf = time.perf_counter
    sendall, receive = conn.sock.sendall, conn.receive
    count = 0
    response = b""
    t0 = now = perf()
    end = t0 + seconds
    while now < end:
        sendall(frame)
        response = receive()
        t = perf()
        if response[:1] != b"\x0e":  # SSH_AGENT_SIGN_RESPONSE
            raise PeerError(f"{who} answered type {response[:1].hex()} to a sign")
        if count < MAX_SAMPLES:
            append(t - now)
        count += 1
        now = t
    return count, now - t0, latencies, response
