"""The ssh-agent socket with real OpenSSH and git: ssh-add, ssh-keygen -Y and -s,
git commit -S, and an ssh login to an sshd started here.

One daemon for the module, on the session's token, with an ``[agent]`` socket
exposing ``agent-*`` and ``other-*`` keys, a strict audit log, and rules that
let this test's uid sign only with the ``agent-*`` keys (``trust_root = false``,
so it holds the same whether the tests run as root or not).  Its keys (P-256,
P-384, Ed25519, RSA-3072, and an ``other-`` P-256 the uid may not sign with)
are made once.  Every signature here is checked by OpenSSH or git themselves.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import wait_until

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv  # the root conftest.py

ROOT = Path(__file__).resolve().parent.parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
TYPES = {
    "p256": ("ec-p256", "ecdsa-sha2-nistp256"),
    "p384": ("ec-p384", "ecdsa-sha2-nistp384"),
    "ed25519": ("ed25519", "ssh-ed25519"),
    "rsa": ("rsa-3072", "ssh-rsa"),
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/dev.sh installs it)")
    return path


@dataclass
class Agent:
    daemon: Daemon
    sock: str
    work: Path
    audit_dir: Path
    #: short name (p256, p384, ed25519, rsa, other) -> key name
    keys: dict[str, str]

    def env(self) -> dict[str, str]:
        home = self.work / "home"
        home.mkdir(exist_ok=True)
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "SSH_AUTH_SOCK": self.sock,
            "GIT_CONFIG_NOSYSTEM": "1",
            "LC_ALL": "C",
        }

    def run(self, *argv: str, input: bytes | None = None, cwd: Path | None = None) -> str:
        out = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            env=self.env(),
            cwd=cwd or self.work,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, f"{argv}: {out.returncode}\n{out.stdout!r}\n{out.stderr!r}"
        return out.stdout.decode()

    def listed(self) -> dict[str, str]:
        """``ssh-add -L``: comment -> "type base64"."""
        out = subprocess.run(
            [tool("ssh-add"), "-L"], capture_output=True, env=self.env(), timeout=30, check=False
        )
        if out.returncode == 1 and b"no identities" in out.stdout:
            return {}
        assert out.returncode == 0, out
        lines = [line.split() for line in out.stdout.decode().splitlines()]
        return {fields[2]: f"{fields[0]} {fields[1]}" for fields in lines}

    def pubkey_file(self, short: str) -> Path:
        """The key's current version as an OpenSSH public key file (from ``ssh-add -L``)."""
        name = self.keys[short]
        path = self.work / f"{name}.pub"
        path.write_text(self.listed()[f"{name}:v1"] + f" {name}\n")
        return path

    def records(self, **match: Any) -> list[dict[str, Any]]:
        out = []
        for f in sorted(self.audit_dir.glob("audit-*.jsonl")):
            for line in f.read_text().splitlines():
                rec = json.loads(line)
                if all(rec.get(k) == v for k, v in match.items()):
                    out.append(rec)
        return out


@pytest.fixture(scope="module")
def agent(
    token_env: TokenEnv,
    module_daemon: Callable[..., Daemon],
    tmp_path_factory: pytest.TempPathFactory,
) -> Agent:
    for name in ("ssh-add", "ssh-keygen"):
        tool(name)
    work = tmp_path_factory.mktemp("agent")
    audit_dir = work / "audit"
    audit_dir.mkdir(mode=0o700)
    uid = os.getuid()
    sock = work / "agent.sock"
    extra = f"""
[agent]
socket = "{sock}"
keys = ["agent-*", "other-*"]

[audit]
dir = "{audit_dir}"

[access]
trust_root = false

[[access.rules]]
keys = ["*"]
operations = ["create", "read", "verify"]
uids = [{uid}]

[[access.rules]]
keys = ["agent-*"]
operations = ["sign"]
uids = [{uid}]
"""
    d = module_daemon(token_env, extra)
    tag = uuid.uuid4().hex[:6]
    keys = {short: f"agent-{short}-{tag}" for short in TYPES}
    keys["other"] = f"other-p256-{tag}"
    with d.client(timeout=120) as c:
        for short, name in keys.items():
            c.create_key(name, TYPES.get(short, ("ec-p256",))[0])
    return Agent(d, str(sock), work, audit_dir, keys)


def ssh_line_of_pem(a: Agent, name: str) -> str:
    """``signctl pubkey NAME`` converted by ``ssh-keygen -i -m PKCS8``.

    OpenSSH before 9.6 cannot convert an Ed25519 SPKI ("unsupported pubkey
    type"); there ``cryptography`` converts it instead."""
    out = a.daemon.signctl("pubkey", name)
    assert out.returncode == 0, out.stderr
    pem = a.work / f"{name}.pem"
    pem.write_bytes(out.stdout)
    argv = [tool("ssh-keygen"), "-i", "-m", "PKCS8", "-f", str(pem)]
    conv = subprocess.run(argv, capture_output=True, env=a.env(), timeout=30, check=False)
    if conv.returncode != 0 and b"unsupported pubkey type" in conv.stderr:
        key = serialization.load_pem_public_key(out.stdout)
        assert isinstance(key, ed25519.Ed25519PublicKey), conv.stderr
        return key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode()
    assert conv.returncode == 0, conv
    return conv.stdout.decode().strip()


def test_ssh_add_lists_the_keys_the_uid_may_sign_with(agent: Agent) -> None:
    listed = agent.listed()
    mine = {c: line for c, line in listed.items() if c.split(":")[0] in agent.keys.values()}
    assert set(mine) == {f"{agent.keys[s]}:v1" for s in TYPES}
    for short, (_, ssh_type) in TYPES.items():
        name = agent.keys[short]
        assert mine[f"{name}:v1"].split()[0] == ssh_type
        assert mine[f"{name}:v1"] == ssh_line_of_pem(agent, name)
    # The uid may not sign with the other- key: not listed (it is exposed).
    assert not any(c.startswith("other-") for c in listed)
    assert agent.records(op="agent_identities", result="ok")


def sshsig_algorithm(armored: str) -> str:
    """The signature algorithm inside an SSHSIG file (PROTOCOL.sshsig)."""
    body = "".join(line for line in armored.splitlines() if not line.startswith("-----"))
    blob = base64.b64decode(body)
    assert blob[:6] == b"SSHSIG"
    pos = 10  # magic, uint32 version

    def string() -> bytes:
        nonlocal pos
        (n,) = struct.unpack(">I", blob[pos : pos + 4])
        pos += 4 + n
        return blob[pos - n : pos]

    for _ in range(4):  # public key, namespace, reserved, hash algorithm
        string()
    sig = string()
    (n,) = struct.unpack(">I", sig[:4])
    return sig[4 : 4 + n].decode()


@pytest.mark.parametrize("short", list(TYPES))
def test_ssh_keygen_signs_and_verifies_a_file(agent: Agent, short: str) -> None:
    keygen = tool("ssh-keygen")
    pub = agent.pubkey_file(short)
    data = agent.work / f"data-{short}.txt"
    data.write_text(f"a file signed through signd ({short})\n")
    agent.run(keygen, "-Y", "sign", "-f", str(pub), "-n", "file", str(data))
    sig = Path(f"{data}.sig")
    expected = {"rsa": "rsa-sha2-512"}.get(short, TYPES[short][1])
    assert sshsig_algorithm(sig.read_text()) == expected
    signers = agent.work / f"allowed-{short}"
    signers.write_text(
        f"release@example.org {pub.read_text().split(' ', 2)[0]} {pub.read_text().split()[1]}\n"
    )
    out = agent.run(
        keygen,
        "-Y",
        "verify",
        "-f",
        str(signers),
        "-I",
        "release@example.org",
        "-n",
        "file",
        "-s",
        str(sig),
        input=data.read_bytes(),
    )
    assert "Good" in out
    # Another signer, or other data: refused by ssh-keygen itself.
    bad = subprocess.run(
        [
            keygen,
            "-Y",
            "verify",
            "-f",
            str(signers),
            "-I",
            "release@example.org",
            "-n",
            "file",
            "-s",
            str(sig),
        ],
        input=data.read_bytes() + b"!",
        capture_output=True,
        env=agent.env(),
        check=False,
    )
    assert bad.returncode != 0
    name = agent.keys[short]
    assert agent.records(op="agent_sign", key=name, result="ok", version=1)


@pytest.mark.parametrize(("short", "algorithm"), [("rsa", "rsa-sha2-256"), ("ed25519", None)])
def test_ssh_keygen_issues_a_user_certificate(
    agent: Agent, short: str, algorithm: str | None
) -> None:
    keygen = tool("ssh-keygen")
    ca = agent.pubkey_file(short)
    user = agent.work / f"user-{short}"
    agent.run(keygen, "-q", "-t", "ed25519", "-N", "", "-C", "user", "-f", str(user))
    argv = [keygen, "-s", str(ca), "-U", "-I", f"alice-{short}", "-n", "alice", "-V", "+1h"]
    if algorithm is not None:
        argv += ["-t", algorithm]
    agent.run(*argv, f"{user}.pub")
    shown = agent.run(keygen, "-L", "-f", f"{user}-cert.pub")
    assert "Type: ssh-ed25519-cert-v01@openssh.com user certificate" in shown
    assert f'Key ID: "alice-{short}"' in shown
    assert "Valid: from" in shown
    fingerprint = agent.run(keygen, "-l", "-f", str(ca)).split()[1]
    assert f"Signing CA: {'RSA' if short == 'rsa' else 'ED25519'} {fingerprint}" in shown
    if algorithm is not None:
        assert f"(using {algorithm})" in shown


def test_git_signs_a_commit_and_verifies_it(agent: Agent) -> None:
    git = tool("git")
    repo = agent.work / "repo"
    repo.mkdir()
    pub = agent.pubkey_file("ed25519")
    signers = agent.work / "git-allowed"
    fields = pub.read_text().split()
    signers.write_text(f"dev@example.org {fields[0]} {fields[1]}\n")
    agent.run(git, "init", "-q", cwd=repo)
    for k, v in (
        ("user.name", "Dev"),
        ("user.email", "dev@example.org"),
        ("gpg.format", "ssh"),
        ("user.signingkey", f"key::{fields[0]} {fields[1]}"),
        ("gpg.ssh.allowedSignersFile", str(signers)),
    ):
        agent.run(git, "config", k, v, cwd=repo)
    agent.run(git, "commit", "-q", "-S", "--allow-empty", "-m", "signed by signd", cwd=repo)
    shown = agent.run(git, "verify-commit", "-v", "HEAD", cwd=repo)
    del shown  # git prints the verdict on stderr; the exit status is the verdict
    out = subprocess.run(
        [git, "verify-commit", "HEAD"],
        capture_output=True,
        env=agent.env(),
        cwd=repo,
        check=False,
    )
    assert out.returncode == 0
    assert b'Good "git" signature for dev@example.org' in out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def sshd(agent: Agent, authorized: Path) -> Iterator[int]:
    """An sshd of this test's own on 127.0.0.1 (its host key, its config)."""
    if not os.path.exists(SSHD):
        pytest.skip("sshd is not installed (Debian package openssh-server; scripts/dev.sh)")
    keygen = tool("ssh-keygen")
    d = agent.work / "sshd"
    d.mkdir()
    host_key = d / "host_ed25519"
    agent.run(keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation
    port = free_port()
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {d}/sshd.pid\n"
        f"AuthorizedKeysFile {authorized}\nUsePAM no\nStrictModes no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nLogLevel VERBOSE\n"
    )
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log, env=agent.env()
    )
    log.close()
    try:

        def listening() -> bool:
            assert proc.poll() is None, (d / "sshd.log").read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, "sshd to listen")
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_ssh_login_through_the_agent(agent: Agent) -> None:
    ssh = tool("ssh")
    pub = agent.pubkey_file("p256")
    authorized = agent.work / "authorized_keys"
    authorized.write_text(pub.read_text())
    before = len(agent.records(op="agent_sign", key=agent.keys["p256"], result="ok"))
    with sshd(agent, authorized) as port:
        out = agent.run(
            ssh,
            "-F",
            "/dev/null",
            "-p",
            str(port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            f"UserKnownHostsFile={agent.work}/known_hosts",
            "-o",
            f"IdentityFile={pub}",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"IdentityAgent={agent.sock}",
            f"{os.environ.get('USER') or 'root'}@127.0.0.1",
            "echo logged-in-by-signd",
        )
    assert out.strip() == "logged-in-by-signd"
    after = agent.records(op="agent_sign", key=agent.keys["p256"], result="ok")
    assert len(after) > before  # the login's signature was the agent's


def agent_call(path: str, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(struct.pack(">I", len(payload)) + payload)
        buf = b""
        while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
            chunk = s.recv(65536)
            assert chunk, "the agent closed the connection"
            buf += chunk
        return buf[4:]


def ssh_string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def test_a_key_the_uid_may_not_sign_with_is_refused_and_audited(agent: Agent) -> None:
    name = agent.keys["other"]
    blob = base64.b64decode(ssh_line_of_pem(agent, name).split()[1])
    request = bytes([13]) + ssh_string(blob) + ssh_string(b"data") + struct.pack(">I", 0)
    assert agent_call(agent.sock, request) == bytes([5])  # SSH_AGENT_FAILURE
    denied = agent.records(op="agent_sign", key=name, result="permission_denied")
    assert len(denied) == 1
    assert denied[0]["uid"] == os.getuid()
    # A blob of no exposed key: refused, recorded without a key.
    other = bytes([13]) + ssh_string(b"\0\0\0\x07ssh-rsa") + ssh_string(b"x") + b"\0\0\0\0"
    assert agent_call(agent.sock, other) == bytes([5])
    assert agent.records(op="agent_sign", key=None, result="key_not_found")
    # Adding a key changes nothing: FAILURE, recorded.
    assert agent_call(agent.sock, bytes([19])) == bytes([5])  # REMOVE_ALL_IDENTITIES
    assert agent.records(op="agent_remove_all_identities", result="unknown_operation")
    assert set(agent.keys[s] for s in TYPES) <= {c.split(":")[0] for c in agent.listed()}


def test_the_rsa_key_never_makes_sha1_signatures(agent: Agent) -> None:
    blob = base64.b64decode(agent.pubkey_file("rsa").read_text().split()[1])
    request = bytes([13]) + ssh_string(blob) + ssh_string(b"data") + struct.pack(">I", 0)
    assert agent_call(agent.sock, request) == bytes([5])
    assert agent.records(op="agent_sign", key=agent.keys["rsa"], result="unsupported_algorithm")


def test_the_agent_socket_unit_is_valid() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = ROOT / "systemd" / "signd-agent.socket"
    text = unit.read_text()
    assert "FileDescriptorName=agent" in text
    assert "Service=signd.service" in text
    out = subprocess.run(
        [analyze, "verify", str(unit), str(ROOT / "systemd" / "signd.socket")],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if line.strip() and "is not executable" not in line
    ]
    assert problems == [], problems


hostile_bodies = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.builds(
        lambda blob, data, flags: bytes([13]) + ssh_string(blob) + ssh_string(data) + flags,
        st.binary(max_size=100),
        st.binary(max_size=100),
        st.binary(max_size=6),
    ),
    st.builds(
        lambda name, rest: bytes([27]) + ssh_string(name) + rest,
        st.sampled_from([b"query", b"session-bind@openssh.com"]) | st.binary(max_size=20),
        st.binary(max_size=80),
    ),
    st.builds(lambda kind, rest: bytes([kind]) + rest, st.integers(0, 255), st.binary(max_size=40)),
)


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(hostile_bodies, min_size=1, max_size=4),
    st.sampled_from([b"", struct.pack(">I", 256 * 1024 + 1), b"\0\0"]),
)
def test_the_agent_socket_survives_adversarial_messages(
    agent: Agent, good: socket.socket, bodies: list[bytes], tail: bytes
) -> None:
    """Hostile messages on a connection of their own: each is answered or the
    connection is closed; a long-lived good connection keeps getting
    signatures that verify."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(agent.sock)
        s.sendall(b"".join(frame_of(b) for b in bodies) + tail)
        s.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while s.recv(65536):
                pass  # answers, until the agent closes
    check_good_signature(agent, good)


@pytest.fixture(scope="module")
def good(agent: Agent) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(agent.sock)
        yield s


def check_good_signature(agent: Agent, good: socket.socket) -> None:
    blob = base64.b64decode(agent.listed()[f"{agent.keys['ed25519']}:v1"].split()[1])
    data = os.urandom(16)
    good.sendall(frame_of(bytes([13]) + ssh_string(blob) + ssh_string(data) + b"\0\0\0\0"))
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        chunk = good.recv(65536)
        assert chunk, "the good connection was closed"
        buf += chunk
    answer = buf[4:]
    assert answer[0] == 14, answer  # SSH_AGENT_SIGN_RESPONSE
    raw = answer[5:]
    # string "ssh-ed25519", string signature (64 bytes)
    assert raw[:15] == ssh_string(b"ssh-ed25519")
    sig = raw[19:]
    pub = ed25519.Ed25519PublicKey.from_public_bytes(blob[-32:])
    pub.verify(sig, data)


def test_a_reload_changes_the_keys_offered(agent: Agent) -> None:
    d = agent.daemon
    original = d.extra_config
    only = agent.keys["ed25519"]
    try:
        d.reload(original.replace('keys = ["agent-*", "other-*"]', f'keys = ["{only}"]'))
        assert list(agent.listed()) == [f"{only}:v1"]
        d.reload(original.replace('keys = ["agent-*", "other-*"]', "keys = []"))
        assert agent.listed() == {}
    finally:
        d.reload(original)
    assert {f"{agent.keys[s]}:v1" for s in TYPES} <= set(agent.listed())


def test_socket_activation_passes_the_agent_socket_by_name(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """As under signd.socket and signd-agent.socket: systemd passes both, the
    agent's named "agent"; the first connection to it starts signd, and signd
    leaves both sockets in place when it stops."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    sock = tmp_path / "agent.sock"
    d = make_daemon(f'[agent]\nsocket = "{sock}"\nkeys = ["*"]\n', start=False)
    argv = [
        activate, "-l", d.socket, "-l", str(sock), "--fdname=signd.socket:agent",
        "-E", "SOFTHSM2_CONF",
        *(["-E", "PYTHONPATH"] if "PYTHONPATH" in os.environ else []),
        *d.command(),
    ]  # fmt: skip
    d.start(wait=False, argv=argv)
    assert d.proc is not None
    proc = d.proc

    def listening() -> bool:
        assert proc.poll() is None, d.logs()
        return sock.exists() and os.path.exists(d.socket)

    wait_until(listening, "systemd-socket-activate to listen")
    try:
        answer = agent_call(str(sock), bytes([11]))  # starts signd, which answers
    except OSError as exc:
        pytest.fail(f"{exc!r}\n{d.logs()}")
    assert answer[0] == 12, answer  # SSH_AGENT_IDENTITIES_ANSWER
    d.wait_ready()
    with d.client() as c:
        assert c.health().ready
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, d.logs()
    assert sock.exists()  # systemd's socket: signd does not remove it
    assert os.path.exists(d.socket)


def test_a_socket_signd_bound_itself_is_removed_when_it_stops(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    sock = tmp_path / "agent.sock"
    d = make_daemon(f'[agent]\nsocket = "{sock}"\nkeys = ["*"]\n')
    assert agent_call(str(sock), bytes([11]))[0] == 12
    assert d.stop() == 0, d.logs()
    assert not sock.exists()
    assert not os.path.exists(d.socket)
