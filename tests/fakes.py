"""A token pool in memory, and the one place that builds a ``Service`` on it.

``FakePool`` does what ``Service`` asks of ``TokenPool`` (and of the
``RecordStore`` it writes key records with), with no PKCS#11 and no worker
process: key records with a compare-and-swap by revision,
real keypairs made with ``cryptography`` (so a signature checks out with an
independent verifier), and a queue of sign and verify jobs that a task of its
own (``run``) answers through each entry's callback.  It can be told to lose
the token, to be slow (mock time), or to fail its next call of an operation.

Everything that knows how ``Service`` is built and called (its constructor,
``handle`` and the reply callback) is below ``# the service``: when those
change, this file is the one to adapt.

``FakeTokenPool`` is one token of several (``TokenSet``): a FakePool that
also keeps a key record's revisions the way a token's data objects do (for
the ``RecordStore`` calls), and can hold any call at a gate until the test
lets it go.  Two of them made with the default wrap secret are two tokens
from one ceremony; ``open_set_harness`` runs the service on a ``TokenSet``
of them, as the daemon builds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import itertools
import secrets
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio
from cryptography.hazmat.primitives import keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from signd.access.policy import Policy, Principal
from signd.access.ratelimit import RateLimiter
from signd.config import load_config
from signd.errors import (
    Busy,
    Conflict,
    InvalidArgument,
    TokenError,
    TokenUnavailable,
    UnsupportedAlgorithm,
    WireError,
)
from signd.keys import algorithms
from signd.keys.records import KeyRecord, KeySettings
from signd.keys.recordstore import RecordStore
from signd.metrics import Metrics
from signd.protocol import HEADER, OPS, Message, Request, decode_response
from signd.service.core import Service
from signd.token.ipc import MetadataBlob, SignJob, TokenInfo, VerifyJob
from signd.token.pool import Entry, PoolSettings
from signd.token.profiles import PROFILES
from signd.token.tokenset import TokenSet

__all__ = [
    "FAKE_INFO",
    "T0",
    "Conn",
    "FakePool",
    "FakeTokenPool",
    "Gate",
    "Harness",
    "Replies",
    "SetHarness",
    "open_harness",
    "open_set_harness",
    "policy_from_config",
    "principal",
    "wall",
]

#: The wall clock's reading at trio time 0: the service's clock is T0 + trio.current_time().
T0: Final = 1_750_000_000.0
#: The wrap key secret of FakePool tokens "from the same ceremony".
WRAP_SECRET: Final = bytes(range(32))

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def wall() -> float:
    """The service's wall clock in these tests: trio's (mock) clock, shifted."""
    return T0 + trio.current_time()


def _generate(key_type: str) -> PrivateKey:
    kt = algorithms.key_type(key_type)
    if kt.family is algorithms.Family.EC:
        curve = ec.SECP256R1() if kt.bits == 256 else ec.SECP384R1()
        return ec.generate_private_key(curve)
    if kt.family is algorithms.Family.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=kt.bits)


def _check_value(secret: bytes) -> bytes:
    """An HMAC secret's check value, as the token works it out."""
    mac = hmac.new(secret, algorithms.HMAC_CHECK_MESSAGE, hashlib.sha256).digest()
    return algorithms.hmac_check_value(mac)


def _sign(private: PrivateKey | bytes, job: SignJob) -> bytes:
    """What the token's C_Sign returns for ``job`` (ECDSA: raw r || s; an HMAC
    secret: the MAC of the message)."""
    scheme = algorithms.Scheme(job.scheme)
    if isinstance(private, bytes):
        assert scheme is algorithms.Scheme.HMAC
        assert job.hash is not None
        return hmac.new(private, job.data, job.hash).digest()
    if scheme is algorithms.Scheme.EDDSA:
        assert isinstance(private, ed25519.Ed25519PrivateKey)
        return private.sign(job.data)
    assert job.hash is not None
    h = algorithms.HASHES[job.hash]
    prehashed = utils.Prehashed(h.algorithm)
    if scheme is algorithms.Scheme.ECDSA:
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        r, s = utils.decode_dss_signature(private.sign(job.data, ec.ECDSA(prehashed)))
        size = (private.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    assert isinstance(private, rsa.RSAPrivateKey)
    if scheme is algorithms.Scheme.RSA_PKCS1:  # the input is DigestInfo || digest
        assert job.data.startswith(h.digest_info)
        return private.sign(job.data[len(h.digest_info) :], padding.PKCS1v15(), prehashed)
    pss = padding.PSS(mgf=padding.MGF1(h.algorithm), salt_length=padding.PSS.DIGEST_LENGTH)
    return private.sign(job.data, pss, prehashed)


def _verify(job: VerifyJob) -> tuple[bool, Any]:
    """A verification as a worker answers it: (True, [version, algorithm] or None)."""
    try:
        kt = algorithms.key_type(job.key_type)
        pairs = [(v, algorithms.load_public_key(kt, spki)) for v, spki in job.candidates]
        found = algorithms.verify_any(kt, pairs, job, job.sha256)
    except WireError as exc:
        return False, exc
    return True, list(found) if found is not None else None


@dataclass
class _Pair:
    spki: bytes  # an HMAC key: its check value
    private: PrivateKey | bytes | None  # None once destroyed; bytes: an HMAC secret
    label: str


FAKE_INFO: Final = TokenInfo(
    label="fake",
    manufacturer="signd tests",
    model="FakePool",
    serial="0",
    mechanisms=["CKM_ECDSA", "CKM_EDDSA", "CKM_RSA_PKCS", "CKM_RSA_PKCS_PSS"],
    key_types=dict.fromkeys(algorithms.KEY_TYPES),
)


class FakePool:
    """The part of ``TokenPool`` that ``Service`` uses, in memory.

    Jobs are answered by ``run`` (start it in a nursery), each batch after
    ``latency`` seconds of trio time; so are the rare operations.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        queue_limit: int = 65536,
        wrap_secret: bytes | None = WRAP_SECRET,
    ) -> None:
        self.info: TokenInfo | None = FAKE_INFO
        self.settings = PoolSettings(
            module="fake", token_label="fake", pin="", queue_limit=queue_limit
        )
        self.latency = latency
        self.alive_workers = 1
        self.respawns = 0
        #: key name -> (newest revision, record bytes)
        self.records: dict[str, tuple[int, bytes]] = {}
        self.pairs: dict[bytes, _Pair] = {}
        #: every rare call, in order: (operation, its first argument)
        self.calls: list[tuple[str, Any]] = []
        #: operation -> the error its next call raises (then forgotten)
        self.fail_next: dict[str, WireError] = {}
        #: jobs answered, sign and verify
        self.jobs_done = 0
        #: the token holds a wrap key (made from ``wrap_secret``: None, it has
        #: none); key types it cannot wrap (SoftHSM 2.6.1: Ed25519)
        self.wrap_secret = wrap_secret
        self.unwrappable: set[str] = {"ed25519"}
        #: keypairs made exportable under the wrap key
        self.backup_ids: set[bytes] = set()
        self._queue: deque[tuple[object, Entry]] = deque()
        self._inflight = 0
        self._wake = trio.Event()

    # ---- what Service uses

    @property
    def pending(self) -> int:
        return len(self._queue) + self._inflight

    @property
    def is_open(self) -> bool:
        return self.info is not None and self.alive_workers > 0

    def enqueue(self, source: object, entries: Sequence[Entry]) -> None:
        """Raises: TokenUnavailable, InvalidArgument, Busy (as ``TokenPool.enqueue``)."""
        if not self.is_open:
            raise TokenUnavailable("no token worker is running; retry")
        limit = self.settings.queue_limit
        if len(entries) > limit:
            raise InvalidArgument(f"{len(entries)} signatures exceed the token queue of {limit}")
        if self.pending + len(entries) > limit:
            raise Busy(f"the token queue is full ({self.pending} signatures waiting)")
        self._queue.extend((source, e) for e in entries)

    def pump(self) -> None:
        self._wake.set()

    def drop(self, source: object, error: WireError) -> int:
        mine = [e for s, e in self._queue if s is source]
        self._queue = deque((s, e) for s, e in self._queue if s is not source)
        for e in mine:
            e.callback(False, error)
        return len(mine)

    async def load_metadata(self, name: str | None = None) -> list[MetadataBlob]:
        await self._rare("load_metadata", name)
        return [
            MetadataBlob(n, rev, value)
            for n, (rev, value) in sorted(self.records.items())
            if name in (None, n)
        ]

    async def write_metadata(self, name: str, revision: int, value: bytes) -> None:
        """Raises: Conflict unless the newest revision is ``revision - 1``."""
        await self._rare("write_metadata", name)
        self._store(name, revision, value)

    async def public_keys(self, object_ids: Sequence[bytes]) -> dict[bytes, tuple[bytes, bool]]:
        await self._rare("public_keys", list(object_ids))
        return {
            oid: (p.spki, p.private is not None)
            for oid in object_ids
            if (p := self.pairs.get(oid)) is not None
        }

    async def destroy_keys(self, object_id: bytes, *, public: bool = False) -> int:
        await self._rare("destroy_keys", object_id)
        pair = self.pairs.get(object_id)
        if pair is None:
            return 0
        count = int(pair.private is not None)
        pair.private = None
        if public:
            del self.pairs[object_id]
            count += 1
        return count

    async def generate(
        self, key_type: str, object_id: bytes, label: str, backup: bool = False
    ) -> bytes:
        """Raises: Conflict if ``object_id`` is taken (the caller draws another);
        with ``backup``, as the real worker does: InvalidArgument without a wrap
        key, UnsupportedAlgorithm for a type in ``unwrappable``."""
        await self._rare("generate", key_type)
        if object_id in self.pairs:
            raise Conflict(f"object id {object_id.hex()} is taken")
        if backup and not self.wrap_key:
            raise InvalidArgument("backup needs a wrap key on the token")
        if backup and key_type in self.unwrappable:
            raise UnsupportedAlgorithm(f"this token cannot back up {key_type} keys")
        if backup:
            self.backup_ids.add(object_id)
        if algorithms.key_type(key_type).family is algorithms.Family.HMAC:
            secret = secrets.token_bytes(algorithms.key_type(key_type).bits // 8)
            self.pairs[object_id] = _Pair(_check_value(secret), secret, label)
            return self.pairs[object_id].spki
        private = _generate(key_type)
        spki = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.pairs[object_id] = _Pair(spki, private, label)
        return spki

    @property
    def wrap_key(self) -> bool:
        return self.wrap_secret is not None

    @wrap_key.setter
    def wrap_key(self, present: bool) -> None:
        self.wrap_secret = WRAP_SECRET if present else None

    async def wrap_private(self, object_id: bytes) -> bytes:
        """The private key's PKCS#8 DER wrapped with RFC 5649 under the wrap secret."""
        await self._rare("wrap_private", object_id)
        secret = self._wrap_secret()
        pair = self.pairs.get(object_id)
        if pair is None or pair.private is None:
            raise TokenError(f"expected one private key with id {object_id.hex()}")
        if object_id not in self.backup_ids:
            raise UnsupportedAlgorithm(f"the token cannot wrap the private key {object_id.hex()}")
        if isinstance(pair.private, bytes):  # an HMAC secret: wrapped as it is
            return keywrap.aes_key_wrap_with_padding(secret, pair.private)
        der = pair.private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return keywrap.aes_key_wrap_with_padding(secret, der)

    async def wrap_check_value(self) -> str | None:
        await self._rare("wrap_check_value", None)
        if self.wrap_secret is None:
            return None
        return hmac.new(self.wrap_secret, b"check", hashlib.sha256).hexdigest()[:16]

    async def backup_mac(self, data: bytes) -> bytes:
        await self._rare("backup_mac", len(data))
        return hmac.new(self._wrap_secret(), data, hashlib.sha256).digest()

    async def verify_backup_mac(self, data: bytes, mac: bytes) -> bool:
        await self._rare("verify_backup_mac", len(data))
        return hmac.compare_digest(
            hmac.new(self._wrap_secret(), data, hashlib.sha256).digest(), mac
        )

    async def restore_keypair(
        self, key_type: str, object_id: bytes, label: str, spki: bytes, wrapped: bytes | None
    ) -> None:
        """As the worker does: Conflict for an id in use, InvalidArgument for a
        blob that does not unwrap or does not match ``spki``."""
        await self._rare("restore_keypair", object_id)
        if object_id in self.pairs:
            raise Conflict(f"object id {object_id.hex()} is taken")
        secret = self._wrap_secret()
        private: PrivateKey | bytes | None = None
        if algorithms.key_type(key_type).family is algorithms.Family.HMAC:
            if wrapped is None:
                return  # a destroyed HMAC version: nothing is left of it on a token
            try:
                value = keywrap.aes_key_unwrap_with_padding(secret, wrapped)
            except keywrap.InvalidUnwrap:
                raise InvalidArgument(
                    "the wrapped key does not unwrap under this token's wrap key"
                ) from None
            if _check_value(value) != spki:
                raise InvalidArgument("the unwrapped secret does not match its check value")
            self.backup_ids.add(object_id)
            self.pairs[object_id] = _Pair(spki, value, label)
            return
        if wrapped is not None:
            try:
                der = keywrap.aes_key_unwrap_with_padding(secret, wrapped)
            except keywrap.InvalidUnwrap:
                raise InvalidArgument(
                    "the wrapped key does not unwrap under this token's wrap key"
                ) from None
            loaded = serialization.load_der_private_key(der, None)
            assert isinstance(loaded, PrivateKey)
            mine = loaded.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if mine != spki:
                raise InvalidArgument("the unwrapped private key does not match its public key")
            private = loaded
            self.backup_ids.add(object_id)
        self.pairs[object_id] = _Pair(spki, private, label)

    def _wrap_secret(self) -> bytes:
        if self.wrap_secret is None:
            raise InvalidArgument("the token has no trusted wrap key")
        return self.wrap_secret

    # ---- the workers

    async def run(self) -> None:
        """Answer queued jobs, a batch at a time, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queue:
                batch = list(self._queue)
                self._queue.clear()
                self._inflight += len(batch)
                if self.latency:
                    await trio.sleep(self.latency)
                self._inflight -= len(batch)
                for _, entry in batch:
                    self.jobs_done += 1
                    entry.callback(*self._answer(entry.job))

    def _answer(self, job: SignJob | VerifyJob) -> tuple[bool, Any]:
        if not self.is_open:
            return False, TokenUnavailable("the token is unavailable (lost); retry")
        if isinstance(job, VerifyJob):
            if algorithms.key_type(job.key_type).family is algorithms.Family.HMAC:
                return self._verify_mac(job)
            return _verify(job)
        pair = self.pairs.get(job.object_id)
        if pair is None or pair.private is None:
            return False, TokenError(f"expected one private key with id {job.object_id.hex()}")
        return True, _sign(pair.private, job)

    def _verify_mac(self, job: VerifyJob) -> tuple[bool, Any]:
        """An HMAC key's verification, as the worker's ``verify_mac``: the
        candidates are (version, object id)."""
        try:
            opts = algorithms.request_options(algorithms.key_type(job.key_type), job)
        except WireError as exc:
            return False, exc
        assert opts.hash is not None
        for version, oid in job.candidates:
            pair = self.pairs.get(oid)
            if pair is None or not isinstance(pair.private, bytes):
                return False, TokenError(f"expected one private key with id {oid.hex()}")
            assert job.message is not None
            mac = hmac.new(pair.private, job.message, opts.hash.name).digest()
            if hmac.compare_digest(mac, job.signature):
                return True, [version, opts.algorithm]
        return True, None

    async def _rare(self, op: str, arg: Any) -> None:
        self.calls.append((op, arg))
        await trio.sleep(self.latency)  # a checkpoint even when latency is 0
        if not self.is_open:
            raise TokenUnavailable("the token is unavailable (lost); retry")
        error = self.fail_next.pop(op, None)
        if error is not None:
            raise error

    def _store(self, name: str, revision: int, value: bytes) -> None:
        newest = self.records.get(name, (0, b""))[0]
        if newest != revision - 1:
            raise Conflict(
                f"key {name!r} was changed by another process (its record is at revision "
                f"{newest}, this change was made on {revision - 1}); nothing was changed"
            )
        self.records[name] = (revision, value)

    # ---- for the tests

    def lose(self) -> None:
        """The token is gone: no worker, every call and queued job fails."""
        self.alive_workers = 0
        self._wake.set()

    def restore(self) -> None:
        self.alive_workers = 1

    def record(self, name: str) -> KeyRecord:
        revision, value = self.records[name]
        return KeyRecord.from_bytes(name, revision, value)

    def write_record(self, record: KeyRecord) -> None:
        """Store ``record`` as another daemon sharing the token would.

        Raises: Conflict unless ``record.revision`` is the next one.
        """
        self._store(record.name, record.revision, record.to_bytes())

    def add_key(
        self,
        name: str,
        key_type: str = "ec-p256",
        *,
        created: float = T0,
        settings: KeySettings | None = None,
    ) -> KeyRecord:
        """A key made by another daemon sharing the token: a keypair and its record."""
        private = _generate(key_type)
        object_id = b"other-%d" % len(self.pairs)
        spki = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.pairs[object_id] = _Pair(spki, private, f"{name}/v1")
        kt = algorithms.key_type(key_type)
        record = KeyRecord.new(name, kt, created, object_id, settings or KeySettings())
        self.write_record(record)
        return record

    def private_key(self, name: str, version: int) -> PrivateKey:
        """The private key of a version (to sign as another daemon would)."""
        oid = next(v.object_id for v in self.record(name).versions if v.version == version)
        private = self.pairs[oid].private
        assert private is not None
        assert not isinstance(private, bytes)
        return private

    def secret(self, name: str, version: int) -> bytes:
        """The secret of an HMAC key's version (to MAC as another daemon would)."""
        oid = next(v.object_id for v in self.record(name).versions if v.version == version)
        private = self.pairs[oid].private
        assert isinstance(private, bytes)
        return private

    def has_private(self, name: str, version: int) -> bool:
        oid = next(v.object_id for v in self.record(name).versions if v.version == version)
        return self.pairs[oid].private is not None

    def args_of(self, op: str) -> list[Any]:
        """The first argument of every call of ``op`` so far, in order."""
        return [arg for o, arg in self.calls if o == op]

    def count(self, op: str) -> int:
        return len(self.args_of(op))


@dataclass
class Gate:
    """A call held before it reaches the fake token (``FakeTokenPool.hold``)."""

    #: set when the call arrived (and waits)
    reached: trio.Event = field(default_factory=trio.Event)
    #: set by the test to let it go on
    released: trio.Event = field(default_factory=trio.Event)

    def release(self) -> None:
        self.released.set()


class FakeTokenPool(FakePool):
    """One token of a ``TokenSet``, in memory: ``FakePool`` with the calls a
    ``RecordStore`` and a ``TokenSet`` make of a ``TokenPool``.

    A record write is the token's three steps (``create_metadata``, then
    ``drop_older``, or ``drop_created`` to take it back); until the older
    revisions are dropped ``revisions`` lists them too, as a token's data
    objects would.  ``records`` keeps the newest revision of each record.
    """

    def __init__(self, label: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.info = dataclasses.replace(FAKE_INFO, label=label, serial=label)
        self.settings = dataclasses.replace(self.settings, token_label=label)
        #: key name -> older revisions of its record still on the token
        self.older: dict[str, list[int]] = {}
        #: the record ``create_metadata`` stored last: (name, revision, the
        #: newest it replaced, or None if it went in as an older one)
        self._created: tuple[str, int, tuple[int, bytes] | None] | None = None
        #: operation -> the gate its next call waits at (then forgotten)
        self.gates: dict[str, Gate] = {}
        self._made: list[Gate] = []

    def hold(self, op: str) -> Gate:
        """Hold the next call of ``op`` until ``release``d (before it reaches the token)."""
        gate = self.gates[op] = Gate()
        self._made.append(gate)
        return gate

    def release_all(self) -> None:
        """Let every held call go on (a test that failed while one waits: the
        service shields some calls from cancellation, and would wait forever)."""
        self.gates.clear()
        for gate in self._made:
            gate.release()

    async def _rare(self, op: str, arg: Any) -> None:
        gate = self.gates.pop(op, None)
        if gate is not None:
            gate.reached.set()
            await gate.released.wait()
        await super()._rare(op, arg)

    async def load_metadata(
        self, name: str | None = None, *, writer: bool = False
    ) -> list[MetadataBlob]:
        return await super().load_metadata(name)

    async def public_keys(
        self, object_ids: Sequence[bytes], *, writer: bool = False
    ) -> dict[bytes, tuple[bytes, bool]]:
        return await super().public_keys(object_ids)

    async def revisions(self, name: str) -> list[int]:
        await self._rare("revisions", name)
        newest = [self.records[name][0]] if name in self.records else []
        return newest + self.older.get(name, [])

    async def create_metadata(self, name: str, revision: int, value: bytes) -> None:
        """Store a revision (no compare-and-swap: that is the RecordStore's)."""
        await self._rare("create_metadata", name)
        newest = self.records.get(name)
        if newest is not None and newest[0] >= revision:
            self.older.setdefault(name, []).append(revision)
            self._created = (name, revision, None)
            return
        if newest is not None:
            self.older.setdefault(name, []).append(newest[0])
        self.records[name] = (revision, value)
        self._created = (name, revision, newest or (0, b""))

    async def drop_created(self) -> None:
        await self._rare("drop_created", None)
        if self._created is None:
            return
        name, revision, replaced = self._created
        self._created = None
        if replaced is None:
            self.older[name].remove(revision)
        elif replaced[0] == 0:
            del self.records[name]
        else:
            self.older[name].remove(replaced[0])
            self.records[name] = replaced

    async def drop_older(self, name: str, revision: int) -> None:
        await self._rare("drop_older", name)
        self._created = None
        kept = [r for r in self.older.get(name, []) if r >= revision]
        if kept:
            self.older[name] = kept
        else:
            self.older.pop(name, None)

    def holds(self, object_id: bytes) -> str:
        """What the token holds of keypair ``object_id``: "pair", "public" or "none"."""
        pair = self.pairs.get(object_id)
        if pair is None:
            return "none"
        return "pair" if pair.private is not None else "public"


def principal(
    uid: int,
    *,
    user: str | None = None,
    gid: int | None = None,
    groups: Sequence[int] = (),
    group_names: Sequence[str] = (),
) -> Principal:
    """A peer as the kernel would describe it (gid defaults to uid)."""
    g = uid if gid is None else gid
    return Principal(
        uid=uid,
        gid=g,
        pid=4000 + uid,
        user=user,
        groups=frozenset({g, *groups}),
        group_names=frozenset(group_names),
    )


# --------------------------------------------------------------------------
# the service


def _result_type(op: str) -> type[Message]:
    spec: Any = OPS[op]
    result: type[Message] = spec.result if hasattr(spec, "result") else spec[1]
    return result  # (an OpSpec, or the older (args, result) pair)


class Replies:
    """The transport's reply callback: exactly one answer per request id."""

    def __init__(self) -> None:
        self.frames: dict[int, bytes] = {}
        self._changed = trio.Event()

    def __call__(self, request_id: int | None, frame: bytes, *outcome: object) -> None:
        assert request_id is not None
        assert request_id not in self.frames, f"request {request_id} answered twice"
        self.frames[request_id] = frame
        self._changed.set()

    async def answer(self, request_id: int, op: str) -> Any:
        """The decoded result of request ``request_id``, typed by ``op`` (waits for it).

        Raises: the WireError it was answered with.
        """
        while request_id not in self.frames:
            await self._changed.wait()
            self._changed = trio.Event()
        frame = self.frames[request_id]
        (length,) = HEADER.unpack_from(frame)
        assert length == len(frame) - HEADER.size
        response = decode_response(frame[HEADER.size :])
        assert response.id == request_id
        if response.error is not None:
            raise response.error
        assert response.result is not None
        return _result_type(op).from_wire(response.result)


_request_ids = itertools.count(1)


class Conn:
    """One peer's connection: requests go to ``Service.handle``, slow work to a task."""

    def __init__(self, harness: _Running, who: Principal) -> None:
        self.harness = harness
        self.who = who
        self.replies = Replies()

    def send(self, requests: Sequence[tuple[str, Message]]) -> list[int]:
        """Hand ``requests`` to the service as one read of a connection; their ids."""
        batch = [Request(next(_request_ids), op, args) for op, args in requests]
        h = self.harness
        for work in h.service.handle(batch, self.replies, self, self.who):
            h.nursery.start_soon(work)
        return [r.id for r in batch]

    async def call(self, op: str, args: Message) -> Any:
        """One request; its result (typed by the op).  Raises: its WireError."""
        (rid,) = self.send([(op, args)])
        return await self.replies.answer(rid, op)


@dataclass
class _Running:
    """A loaded ``Service`` whose tasks run in ``nursery``."""

    service: Service
    nursery: trio.Nursery

    def connect(self, who: Principal) -> Conn:
        return Conn(self, who)

    def start_lifecycle(self) -> None:
        self.nursery.start_soon(self.service.run_lifecycle)


@dataclass
class Harness(_Running):
    """The service on one token (``pool``)."""

    pool: FakePool


@dataclass
class SetHarness(_Running):
    """The service on several tokens: ``tokens`` (a ``TokenSet``) over ``fakes``."""

    tokens: TokenSet
    fakes: list[FakeTokenPool]


def _service(
    token: Any,
    records: Any,
    policy: Policy | None,
    limiter: RateLimiter | None,
    settings: dict[str, Any],
) -> Service:
    """The ``Service`` on ``token`` (its record writes through ``records``).
    ``settings``: its keyword settings (min_rotate_period and sync_interval
    default to 1 s here)."""
    settings.setdefault("min_rotate_period", 1.0)
    settings.setdefault("sync_interval", 1.0)
    settings.setdefault("profile", PROFILES["softhsm"])
    return Service(
        token,
        records,
        policy if policy is not None else Policy(()),
        limiter=limiter,
        metrics=Metrics(),
        clock=wall,
        **settings,
    )


@asynccontextmanager
async def open_harness(
    pool: FakePool | None = None,
    *,
    policy: Policy | None = None,
    limiter: RateLimiter | None = None,
    lifecycle: bool = False,
    **settings: Any,
) -> AsyncIterator[Harness]:
    """A loaded ``Service`` on ``pool`` (a new FakePool by default), with the
    pool's workers running, and its lifecycle task if ``lifecycle``; all
    cancelled on exit.  ``settings``: the Service's keyword settings
    (min_rotate_period and sync_interval default to 1 s here)."""
    pool = pool if pool is not None else FakePool()
    # Its records: the pool's own compare-and-swap (write_metadata).
    service = _service(pool, pool, policy, limiter, settings)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        await service.load()
        harness = Harness(service, nursery, pool)
        if lifecycle:
            harness.start_lifecycle()
        yield harness
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_set_harness(
    fakes: Sequence[FakeTokenPool],
    *,
    policy: Policy | None = None,
    limiter: RateLimiter | None = None,
    lifecycle: bool = False,
    watch: bool = True,
    deadline: float = 600.0,
    **settings: Any,
) -> AsyncIterator[SetHarness]:
    """A loaded ``Service`` on a ``TokenSet`` of ``fakes``, built as the
    daemon builds it: the set started (every open token caught up), its
    records written through a ``RecordStore``, its watch task running if
    ``watch``, and the lifecycle task if ``lifecycle``; all cancelled on exit.
    A test still inside after ``deadline`` seconds of trio time fails
    (TooSlowError) instead of hanging.  ``settings``: as for ``open_harness``."""
    tokens = TokenSet(
        fakes,  # type: ignore[arg-type]
        settings.get("profile", PROFILES["softhsm"]),
    )
    with trio.fail_after(deadline):
        async with trio.open_nursery() as nursery:
            for fake in fakes:
                nursery.start_soon(fake.run)
            await tokens.start()
            if watch:
                nursery.start_soon(tokens.run)
            service = _service(tokens, RecordStore(tokens), policy, limiter, settings)
            await service.load()
            harness = SetHarness(service, nursery, tokens, list(fakes))
            if lifecycle:
                harness.start_lifecycle()
            try:
                yield harness
            finally:
                for fake in fakes:
                    fake.release_all()
                nursery.cancel_scope.cancel()


def policy_from_config(directory: Path, access: str) -> Policy:
    """The policy a daemon builds from a config file whose ``[access]`` part is
    ``access`` (TOML, the syntax operators write), written in ``directory``.

    Raises: ConfigError, naming the field, for a bad access section.
    """
    (directory / "pin").write_text("1234\n")
    (directory / "pin").chmod(0o600)
    path = directory / "signd.toml"
    path.write_text(
        f'[token]\nmodule = "/x.so"\nlabel = "t"\npin_file = "{directory}/pin"\n\n{access}'
    )
    cfg = load_config(str(path))
    return Policy(cfg.access.rules, trust_root=cfg.access.trust_root)
