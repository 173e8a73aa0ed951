"""The ssh-agent front end in process: ``AgentFront`` on a ``Service`` over a
token in memory (``fakes``), spoken to over memory streams or a socketpair,
with a recording audit log.  Real OpenSSH is in test_ssh_agent.py.

The principals are built here, so a uid with no grant is tested without root.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from fakes import FakePool, Harness, open_harness, principal, wall
from signd.access.policy import Policy, Principal, Rule
from signd.agent import wire
from signd.agent.front import EXTENSIONS, AgentFront
from signd.audit.facts import Outcome
from signd.config import LimitsConfig
from signd.protocol import CreateKeyArgs, PublicKeyArgs, RotateArgs

ROOT = principal(0, user="root")
#: a uid no rule grants anything, and not trusted (not root, not the daemon's)
STRANGER = principal(4242, user="stranger")
#: a uid that may sign with ssh-* keys only
SIGNER = principal(4343, user="signer")
POLICY = Policy(
    [Rule(keys=("ssh-*",), operations=frozenset({"sign"}), uids=frozenset({SIGNER.uid}))]
)


def s(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class Recorded:
    """An audit log that keeps (op, key, version, result) per record; ``ok``
    False: every write fails (a strict log on a full disk)."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.records: list[tuple[str, str | None, int | None, str]] = []

    def _keep(self, notes: Any, outcome: Outcome) -> None:
        result = "ok" if outcome.error is None else outcome.error.name
        self.records.append((notes[0], notes[1], notes[4], result))

    def record(
        self, who: Any, notes: Any, frame: bytes, outcome: Outcome, to: Any, rid: Any
    ) -> None:
        self._keep(notes, outcome)
        to.audited(rid, frame, self.ok)

    def asked(self, who: Any, notes: Any, to: Any, rid: Any) -> Any:
        return (notes, to, rid)

    def answered(self, pending: Any, frame: bytes, outcome: Outcome) -> None:
        notes, to, rid = pending
        self._keep(notes, outcome)
        to.audited(rid, frame, self.ok)


class Peer:
    """The client end of one agent connection."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = b""

    async def call(self, body: bytes) -> bytes:
        await self.stream.send_all(framed(body))
        answer = await self.read()
        assert answer is not None, "the agent closed the connection"
        return answer

    async def read(self) -> bytes | None:
        """One message, or None at EOF."""
        while len(self.buf) < 4 or len(self.buf) < 4 + struct.unpack(">I", self.buf[:4])[0]:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                assert self.buf == b"", "EOF inside a message"
                return None
            self.buf += chunk
        (n,) = struct.unpack(">I", self.buf[:4])
        body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
        return body


def identities(answer: bytes) -> list[tuple[bytes, str]]:
    assert answer[0] == wire.IDENTITIES_ANSWER
    (count,) = struct.unpack(">I", answer[1:5])
    out, pos = [], 5
    for _ in range(count):
        items = []
        for _ in range(2):
            (n,) = struct.unpack(">I", answer[pos : pos + 4])
            items.append(answer[pos + 4 : pos + 4 + n])
            pos += 4 + n
        out.append((items[0], items[1].decode()))
    assert pos == len(answer)
    return out


def sign_request(blob: bytes, data: bytes, flags: int = 0) -> bytes:
    return bytes([wire.SIGN_REQUEST]) + s(blob) + s(data) + struct.pack(">I", flags)


def signature_of(answer: bytes) -> tuple[str, bytes]:
    assert answer[0] == wire.SIGN_RESPONSE, answer
    (n,) = struct.unpack(">I", answer[1:5])
    blob = answer[5 : 5 + n]
    (m,) = struct.unpack(">I", blob[:4])
    alg = blob[4 : 4 + m].decode()
    (k,) = struct.unpack(">I", blob[4 + m : 8 + m])
    return alg, blob[8 + m : 8 + m + k]


@dataclasses.dataclass
class Setup:
    h: Harness
    front: AgentFront
    audit: Recorded
    nursery: trio.Nursery

    def connect(self, who: Principal) -> Peer:
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.front.converse, server, who)
        return Peer(client)

    async def public_key(self, name: str) -> Any:
        c = self.h.connect(ROOT)
        pem = (await c.call("public_key", PublicKeyArgs(key=name))).public_key_pem
        return serialization.load_pem_public_key(pem.encode())


async def make_keys(h: Harness, keys: dict[str, str]) -> None:
    c = h.connect(ROOT)
    for name, kt in keys.items():
        await c.call("create_key", CreateKeyArgs(key=name, type=kt))


KEYS = {
    "ssh-p256": "ec-p256",
    "ssh-p384": "ec-p384",
    "ssh-ed": "ed25519",
    "ssh-rsa": "rsa-2048",
    "ssh-mac": "hmac-sha256",  # no SSH form (nor public key): never listed
    "hidden-p256": "ec-p256",  # not exposed
}


@pytest.fixture
async def setup(autojump_clock: Any) -> Any:
    async with open_harness(policy=POLICY) as h:
        await make_keys(h, KEYS)
        audit = Recorded()
        front = AgentFront(
            h.service,
            ["ssh-*"],
            LimitsConfig(idle_timeout=60.0),
            metrics=h.service.metrics,
            audit=audit,  # type: ignore[arg-type]
            clock=wall,
        )
        async with trio.open_nursery() as nursery:
            yield Setup(h, front, audit, nursery)
            nursery.cancel_scope.cancel()


async def test_the_exposed_keys_with_an_ssh_form_are_listed(setup: Setup) -> None:
    listed = identities(await setup.connect(SIGNER).call(b"\x0b"))
    assert [c for _, c in listed] == ["ssh-ed:v1", "ssh-p256:v1", "ssh-p384:v1", "ssh-rsa:v1"]
    for blob, comment in listed:
        pub = await setup.public_key(comment.split(":")[0])
        assert blob == wire.ssh_public_blob(pub)
    assert setup.audit.records == [("agent_identities", None, None, "ok")]


async def test_a_uid_without_the_sign_grant_sees_none_and_cannot_sign(setup: Setup) -> None:
    peer = setup.connect(STRANGER)
    assert identities(await peer.call(b"\x0b")) == []
    blob = wire.ssh_public_blob(await setup.public_key("ssh-p256"))
    assert blob is not None
    assert await peer.call(sign_request(blob, b"data")) == bytes([wire.FAILURE])
    assert setup.audit.records == [
        ("agent_identities", None, None, "permission_denied"),
        ("agent_sign", "ssh-p256", 1, "permission_denied"),
    ]
    m = setup.h.service.metrics.agent_requests
    assert m[("request_identities", "permission_denied")] == 1
    assert m[("sign_request", "permission_denied")] == 1


@pytest.mark.parametrize(
    ("name", "flags", "alg"),
    [
        ("ssh-p256", 0, "ecdsa-sha2-nistp256"),
        ("ssh-p384", 0, "ecdsa-sha2-nistp384"),
        ("ssh-ed", 0, "ssh-ed25519"),
        ("ssh-rsa", wire.RSA_SHA2_256, "rsa-sha2-256"),
        ("ssh-rsa", wire.RSA_SHA2_512, "rsa-sha2-512"),
    ],
)
async def test_signatures_verify(setup: Setup, name: str, flags: int, alg: str) -> None:
    pub = await setup.public_key(name)
    blob = wire.ssh_public_blob(pub)
    assert blob is not None
    got_alg, sig = signature_of(await setup.connect(SIGNER).call(sign_request(blob, b"m", flags)))
    assert got_alg == alg
    if isinstance(pub, ec.EllipticCurvePublicKey):
        n = (pub.curve.key_size + 7) // 8
        r = int.from_bytes(sig[4 : 4 + struct.unpack(">I", sig[:4])[0]], "big")
        rest = sig[4 + struct.unpack(">I", sig[:4])[0] :]
        s_ = int.from_bytes(rest[4:], "big")
        h = hashes.SHA256() if n == 32 else hashes.SHA384()
        pub.verify(encode_dss_signature(r, s_), b"m", ec.ECDSA(h))
    elif isinstance(pub, ed25519.Ed25519PublicKey):
        pub.verify(sig, b"m")
    else:
        assert isinstance(pub, rsa.RSAPublicKey)
        h2 = hashes.SHA256() if alg == "rsa-sha2-256" else hashes.SHA512()
        pub.verify(sig, b"m", padding.PKCS1v15(), h2)
    assert setup.audit.records == [("agent_sign", name, 1, "ok")]
    assert setup.h.service.metrics.agent_requests[("sign_request", "ok")] == 1


async def test_ssh_rsa_sha1_is_refused(setup: Setup) -> None:
    blob = wire.ssh_public_blob(await setup.public_key("ssh-rsa"))
    assert blob is not None
    assert await setup.connect(SIGNER).call(sign_request(blob, b"m")) == bytes([wire.FAILURE])
    assert setup.audit.records == [("agent_sign", "ssh-rsa", 1, "unsupported_algorithm")]


async def test_only_the_current_version_of_an_exposed_key_signs(setup: Setup) -> None:
    peer = setup.connect(SIGNER)
    old = wire.ssh_public_blob(await setup.public_key("ssh-p256"))
    assert old is not None
    await setup.h.connect(ROOT).call("rotate", RotateArgs(key="ssh-p256"))
    listed = dict((c, b) for b, c in identities(await peer.call(b"\x0b")))
    assert "ssh-p256:v2" in listed
    assert "ssh-p256:v1" not in listed
    assert listed["ssh-p256:v2"] != old
    assert await peer.call(sign_request(old, b"m")) == bytes([wire.FAILURE])
    assert signature_of(await peer.call(sign_request(listed["ssh-p256:v2"], b"m")))
    # A key the config does not expose, and a blob of no key at all.
    hidden = wire.ssh_public_blob(await setup.public_key("hidden-p256"))
    assert hidden is not None
    assert await peer.call(sign_request(hidden, b"m")) == bytes([wire.FAILURE])
    assert await peer.call(sign_request(b"junk", b"m")) == bytes([wire.FAILURE])
    assert [r for r in setup.audit.records if r[0] == "agent_sign"] == [
        ("agent_sign", None, None, "key_not_found"),
        ("agent_sign", "ssh-p256", 2, "ok"),
        ("agent_sign", None, None, "key_not_found"),
        ("agent_sign", None, None, "key_not_found"),
    ]


async def test_a_reload_changes_the_keys_exposed(setup: Setup) -> None:
    peer = setup.connect(SIGNER)
    setup.front.apply(["ssh-ed"], setup.front.limits)
    assert [c for _, c in identities(await peer.call(b"\x0b"))] == ["ssh-ed:v1"]
    setup.front.apply([], setup.front.limits)
    assert identities(await peer.call(b"\x0b")) == []


@pytest.mark.parametrize(
    "kind", [17, 18, 19, 20, 21, 22, 23, 25, 26, 99], ids=lambda k: wire.message_name(k)
)
async def test_key_changes_and_other_messages_fail_and_change_nothing(
    setup: Setup, kind: int
) -> None:
    peer = setup.connect(SIGNER)
    before = identities(await peer.call(b"\x0b"))
    assert await peer.call(bytes([kind]) + b"whatever") == bytes([wire.FAILURE])
    assert identities(await peer.call(b"\x0b")) == before
    assert (f"agent_{wire.message_name(kind)}", None, None, "unknown_operation") in (
        setup.audit.records
    )


async def test_extensions(setup: Setup) -> None:
    peer = setup.connect(SIGNER)
    query = await peer.call(b"\x1b" + s(b"query"))
    assert query == bytes([wire.EXTENSION_RESPONSE]) + s(b"query") + b"".join(
        s(n.encode()) for n in EXTENSIONS
    )
    bind = s(b"hostkey") + s(b"session") + s(b"signature") + b"\0"
    assert await peer.call(b"\x1b" + s(b"session-bind@openssh.com") + bind) == b"\x06"
    bad = b"\x1b" + s(b"session-bind@openssh.com") + bind[:-1]
    assert await peer.call(bad) == bytes([wire.EXTENSION_FAILURE])
    assert await peer.call(b"\x1b" + s(b"nope@example.org")) == bytes([wire.FAILURE])
    assert identities(await peer.call(b"\x0b"))  # the connection is still good


@pytest.mark.parametrize(
    "junk",
    [
        struct.pack(">I", wire.MAX_MESSAGE + 1),  # oversized: closed at once
        struct.pack(">I", 0),  # empty
        framed(b"\x0b\x00"),  # identities request with contents
        framed(b"\x0d\0\0\1\0abc"),  # truncated sign request
    ],
    ids=["oversized", "empty", "trailing", "truncated"],
)
async def test_bad_input_closes_that_connection_only(setup: Setup, junk: bytes) -> None:
    good, bad = setup.connect(SIGNER), setup.connect(SIGNER)
    await bad.stream.send_all(junk)
    assert await bad.read() is None  # closed, no answer
    assert len(identities(await good.call(b"\x0b"))) == 4
    assert setup.h.service.metrics.agent_requests[("malformed", "closed")] == 1


async def test_a_huge_declared_length_holds_no_memory(setup: Setup) -> None:
    peer = setup.connect(SIGNER)
    # Just under the limit, never completed: the decoder waits, holding only what came.
    await peer.stream.send_all(struct.pack(">I", wire.MAX_MESSAGE) + b"\x11" * 1000)
    await trio.testing.wait_all_tasks_blocked()
    await peer.stream.send_all(b"\x11" * (wire.MAX_MESSAGE - 1000))
    assert await peer.read() == bytes([wire.FAILURE])  # an add: refused


async def test_an_idle_connection_is_closed(setup: Setup, autojump_clock: Any) -> None:
    peer = setup.connect(SIGNER)
    assert identities(await peer.call(b"\x0b"))
    start = trio.current_time()
    assert await peer.read() is None
    assert trio.current_time() - start >= 60.0
    assert setup.h.service.metrics.limit_hits["idle_timeout"] == 1


async def test_an_unwritable_audit_log_withholds_the_answer(setup: Setup) -> None:
    setup.audit.ok = False
    blob = wire.ssh_public_blob(await setup.public_key("ssh-p256"))
    assert blob is not None
    peer = setup.connect(SIGNER)
    assert await peer.call(b"\x0b") == bytes([wire.FAILURE])
    assert await peer.call(sign_request(blob, b"m")) == bytes([wire.FAILURE])


async def test_connections_per_uid_are_limited(setup: Setup) -> None:
    setup.front.apply(["ssh-*"], LimitsConfig(max_connections_per_uid=1, idle_timeout=0))
    socks = [trio.socket.socketpair() for _ in range(2)]
    for _, server in socks:  # one after the other
        setup.nursery.start_soon(setup.front._accepted, trio.SocketStream(server))
        await trio.testing.wait_all_tasks_blocked()
    first, second = (Peer(trio.SocketStream(client)) for client, _ in socks)
    try:
        assert await second.read() is None  # refused: this uid holds its one connection
        assert len(identities(await first.call(b"\x0b"))) == 4  # as this process' uid
        assert setup.h.service.metrics.limit_hits["max_connections_per_uid"] == 1
    finally:
        for peer in (first, second):
            await peer.stream.aclose()


async def test_a_client_that_does_not_read_its_answers_is_closed(
    setup: Setup, autojump_clock: Any
) -> None:
    client, server = trio.testing.lockstep_stream_pair()  # a send waits for its reader
    done = trio.Event()

    async def serve() -> None:
        await setup.front.converse(server, SIGNER)
        done.set()

    setup.nursery.start_soon(serve)
    await client.send_all(framed(b"\x0b"))  # and never reads the answer
    with trio.fail_after(120):
        await done.wait()
    assert setup.h.service.metrics.limit_hits["idle_timeout"] == 1
    await client.aclose()


async def test_shutdown_answers_the_message_in_flight_then_closes(mock_clock: Any) -> None:
    """SIGTERM (``shutdown``): an idle connection is closed at once; one whose
    signature is on the token gets it, then is closed; ``drain`` waits for
    that, as the main socket drains its requests in flight."""
    pool = FakePool()
    async with open_harness(pool, policy=POLICY) as h:
        await make_keys(h, {"ssh-p256": "ec-p256"})
        pool.latency = 1.0  # from now on the token takes a second (of trio's clock)
        front = AgentFront(
            h.service,
            ["ssh-*"],
            LimitsConfig(idle_timeout=60.0),
            metrics=h.service.metrics,
            audit=None,
            clock=wall,
        )
        async with trio.open_nursery() as nursery:
            peers = []
            for _ in range(2):
                client, server = trio.testing.memory_stream_pair()
                nursery.start_soon(front.converse, server, SIGNER)
                peers.append(Peer(client))
            busy, idle = peers
            ((blob, _),) = identities(await busy.call(bytes([wire.REQUEST_IDENTITIES])))
            await busy.stream.send_all(framed(sign_request(blob, b"in flight")))
            await trio.testing.wait_all_tasks_blocked()
            assert not await front.drain(trio.current_time())  # the token holds it
            front.shutdown()
            assert await idle.read() is None
            mock_clock.jump(1.0)  # the token answers
            assert await front.drain(trio.current_time() + 10.0)
            answer = await busy.read()
            assert answer is not None
            alg, _sig = signature_of(answer)
            assert alg == "ecdsa-sha2-nistp256"
            assert await busy.read() is None
            nursery.cancel_scope.cancel()
