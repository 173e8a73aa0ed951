"""Version retention (``max_versions``, pruning) and verify with many versions.

In-process: the service runs against a token kept in memory (records and
keypairs, no PKCS#11) and trio's mock clock, so a key gets many versions and
hours of lifecycle in milliseconds.  The real daemon and token are tested in
``test_key_lifecycle.py`` (pruning, the cap, over the wire) and at the end
here (verify with many versions through the token workers).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signd.access.policy import Policy, Principal
from signd.config import ConfigError, load_config
from signd.errors import Conflict, DeletionNotAllowed, InvalidArgument, TokenUnavailable
from signd.keys import algorithms
from signd.keys.records import DESTROYED, ENABLED, KeyRecord, KeySettings
from signd.metrics import Metrics
from signd.service.core import Service
from signd.service.signing import INLINE_VERIFY_CANDIDATES
from signd.token.ipc import MetadataBlob, VerifyJob
from signd.token.pool import Entry
from signd.token.profiles import PROFILES
from signd.token.verify import Verifier
from signd_client import errors
from signd_client.protocol import (
    CreateKeyArgs,
    Message,
    Request,
    RotateArgs,
    UpdateKeyArgs,
    VerifyArgs,
    decode_response,
)

if TYPE_CHECKING:
    from conftest import Daemon  # the root conftest.py

T0 = 1_750_000_000.0
ROOT = Principal(
    uid=0, gid=0, pid=os.getpid(), user="root", groups=frozenset(), group_names=frozenset()
)


# --------------------------------------------------------------------------
# a token in memory


class Crash(Exception):
    """The daemon dies here (a kill -9 between two token calls)."""


class MemoryToken:
    """What ``Service`` asks of its token pool, kept in memory: key records
    (compare-and-swap by revision, as on the token) and EC keypairs."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[int, bytes]] = {}
        #: object id -> [SPKI DER, private key or None once destroyed]
        self.keys: dict[bytes, list[Any]] = {}
        #: every change, in order: ("write", name, record) or ("destroy", object id)
        self.changes: list[tuple[Any, ...]] = []
        self.generated = 0
        self.full_reads = 0
        self.crash_on_destroy = False
        self.info = None
        self.is_open = True
        self.pending = 0
        #: (source, entries) handed to the workers
        self.enqueued: list[Sequence[Entry]] = []

    async def load_metadata(self, name: str | None = None) -> list[MetadataBlob]:
        await trio.sleep(0)
        if name is None:
            self.full_reads += 1
            if self.full_reads > 1000:  # a busy loop: fail, and let the clock move
                raise TokenUnavailable("too many reads")
        return [
            MetadataBlob(n, rev, value)
            for n, (rev, value) in self.records.items()
            if name in (None, n)
        ]

    async def write_metadata(self, name: str, revision: int, value: bytes) -> None:
        await trio.sleep(0)
        if self.records.get(name, (0, b""))[0] != revision - 1:
            raise Conflict(f"key {name!r} was changed by another process")
        self.records[name] = (revision, value)
        self.changes.append(("write", name, self.record(name)))

    async def public_keys(self, object_ids: Sequence[bytes]) -> dict[bytes, tuple[bytes, bool]]:
        await trio.sleep(0)
        return {i: (self.keys[i][0], self.keys[i][1] is not None) for i in object_ids}

    async def destroy_keys(self, object_id: bytes, *, public: bool = False) -> int:
        await trio.sleep(0)
        if self.crash_on_destroy:
            raise Crash
        self.keys[object_id][1] = None
        self.changes.append(("destroy", object_id))
        return 1

    async def generate(
        self, key_type: str, object_id: bytes, label: str, backup: bool = False
    ) -> bytes:
        await trio.sleep(0)
        assert key_type == "ec-p256"
        assert not backup  # no wrap key here (backups: tests/fakes.py, test_wrapkey.py)
        private = ec.generate_private_key(ec.SECP256R1())
        spki = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.keys[object_id] = [spki, private]
        self.generated += 1
        return spki

    def enqueue(self, source: object, entries: Sequence[Entry]) -> None:
        self.enqueued.append(entries)

    def pump(self) -> None:
        """The workers start on what was enqueued (they answer in ``work``)."""

    def work(self) -> None:
        """Answer the verifications enqueued, as a token worker does."""
        verifier = Verifier()
        for entries in self.enqueued:
            for entry in entries:
                assert isinstance(entry.job, VerifyJob)
                ok, value = True, verifier.verify(entry.job)
                entry.callback(ok, tuple(value) if value is not None else None)
        self.enqueued.clear()

    # ---- for the tests

    def record(self, name: str) -> KeyRecord:
        revision, value = self.records[name]
        return KeyRecord.from_bytes(name, revision, value)

    def sign(self, name: str, version: int, message: bytes) -> bytes:
        oid = next(v.object_id for v in self.record(name).versions if v.version == version)
        private = self.keys[oid][1]
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        return private.sign(message, ec.ECDSA(hashes.SHA256()))

    def has_private(self, name: str, version: int) -> bool:
        oid = next(v.object_id for v in self.record(name).versions if v.version == version)
        return self.keys[oid][1] is not None


def make_service(token: MemoryToken, **kw: Any) -> Service:
    """A service on ``token`` whose wall clock is trio's (mock) clock."""
    kw.setdefault("min_rotate_period", 1.0)
    kw.setdefault("sync_interval", 1.0)
    return Service(
        token,  # type: ignore[arg-type]
        token,  # type: ignore[arg-type]  # its records, written as the token's own
        Policy(()),
        None,
        Metrics(),
        clock=lambda: T0 + trio.current_time(),
        profile=PROFILES["softhsm"],
        **kw,
    )


_ids = itertools.count(1)


async def call(service: Service, op: str, args: Message) -> Any:
    """One request through ``Service.handle``: the result map, or the error raised."""
    answers: list[bytes] = []
    req = Request(next(_ids), op, args)
    for work in service.handle(
        [req], lambda _rid, frame, _outcome: answers.append(frame), object(), ROOT
    ):
        await work()
    if service.token.enqueued:  # type: ignore[attr-defined]
        service.token.work()  # type: ignore[attr-defined]
    assert len(answers) == 1
    resp = decode_response(answers[0][4:])
    if resp.error is not None:
        raise resp.error
    return resp.result


def states(service: Service, name: str) -> dict[int, str]:
    key = service.keystore.get(name).at(T0 + trio.current_time())
    return {n: v.state for n, v in sorted(key.versions.items())}


# --------------------------------------------------------------------------
# the record's rules, alone


def test_retention_rules_of_a_record() -> None:
    settings = KeySettings(verify_grace=10.0, max_versions=3)
    r = KeyRecord.new("k", algorithms.key_type("ec-p256"), 0.0, b"\x01", settings)
    for t, oid in ((1.0, b"\x02"), (2.0, b"\x03")):
        r = r.rotated(t, oid)
    assert r.live == 3
    # Full; versions 1 and 2 still verify (grace): nothing to prune, and without
    # deletion_allowed nothing ever is.
    with pytest.raises(DeletionNotAllowed, match="does not allow deletion"):
        r.room_for_one_more(5.0, 3)
    assert r.prunable(100.0) == []
    with pytest.raises(DeletionNotAllowed, match="max_versions is 3"):
        r.room_for_one_more(100.0, 3)
    assert r.room_for_one_more(5.0, 4) == []  # room: nothing is pruned
    allowed = r.with_settings(KeySettings(verify_grace=10.0, max_versions=3, deletion_allowed=True))
    with pytest.raises(DeletionNotAllowed, match="no older version is retired yet"):
        allowed.room_for_one_more(5.0, 3)
    assert allowed.prunable(11.5) == [1]  # v1 retired 10 s after v2 (t=1)
    assert allowed.prunable(100.0) == [1, 2]
    # A disabled version is an operator's decision: never pruned.
    disabled = allowed.with_state([1], "disabled")
    assert disabled.prunable(100.0) == [2]
    # Pruned in the same change as the rotation: one revision.
    rotated = allowed.rotated(100.0, b"\x09", prune=allowed.room_for_one_more(100.0, 3))
    assert rotated.revision == allowed.revision + 1
    assert [v.state for v in rotated.versions] == [DESTROYED, DESTROYED, ENABLED, ENABLED]
    assert rotated.live == 2
    # Stored only when set: a record without it is what older daemons wrote.
    assert "max_versions" not in KeySettings().to_json()
    assert KeySettings.from_json(settings.to_json()) == settings
    with pytest.raises(ValueError, match="out of range"):
        KeySettings.from_json({"max_versions": -1})
    assert settings.version_cap(100, 1000) == 3
    assert KeySettings().version_cap(100, 1000) == 100
    assert KeySettings(max_versions=5000).version_cap(100, 1000) == 1000
    with pytest.raises(InvalidArgument, match="max_versions"):
        KeySettings(max_versions=11).check(1, 1.0, 10)


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("default_max_versions = 0", "keys.default_max_versions"),
        ("max_versions_limit = 0", "keys.max_versions_limit"),
        ('default_max_versions = "5"', "keys.default_max_versions"),
        ("default_max_versions = 50\nmax_versions_limit = 20", "above keys.max_versions_limit"),
    ],
)
def test_retention_config_is_checked(tmp_path: Path, extra: str, error: str) -> None:
    path = tmp_path / "signd.toml"
    (tmp_path / "pin").write_text("1234\n")
    (tmp_path / "pin").chmod(0o600)
    path.write_text(
        f'[token]\nmodule = "/x.so"\nlabel = "t"\npin_file = "{tmp_path}/pin"\n[keys]\n{extra}\n'
    )
    with pytest.raises(ConfigError, match=error):
        load_config(str(path))


def test_retention_config_defaults(tmp_path: Path) -> None:
    path = tmp_path / "signd.toml"
    (tmp_path / "pin").write_text("1234\n")
    (tmp_path / "pin").chmod(0o600)
    path.write_text(f'[token]\nmodule = "/x.so"\nlabel = "t"\npin_file = "{tmp_path}/pin"\n')
    keys = load_config(str(path)).keys
    assert (keys.default_max_versions, keys.max_versions_limit) == (100, 1000)


# --------------------------------------------------------------------------
# the service, in process


async def test_a_rotation_beyond_max_versions_is_refused_and_makes_nothing() -> None:
    token = MemoryToken()
    s = make_service(token, default_max_versions=4, max_versions_limit=10)
    info = await call(s, "create_key", CreateKeyArgs(key="k", type="ec-p256", max_versions=3))
    assert info["max_versions"] == 3
    for _ in range(2):
        await call(s, "rotate", RotateArgs(key="k"))
    before = (token.generated, token.records["k"])
    with pytest.raises(errors.DeletionNotAllowed, match="max_versions is 3") as exc:
        await call(s, "rotate", RotateArgs(key="k"))
    assert int(exc.value.code) == 304
    assert (token.generated, token.records["k"]) == before  # no keypair, no record
    # Out of range: the daemon's limit, and no negative numbers.
    for bad in (11, -1):
        with pytest.raises(errors.InvalidArgument, match="max_versions"):
            await call(s, "update_key", UpdateKeyArgs(key="k", max_versions=bad))
    with pytest.raises(errors.InvalidArgument, match="max_versions"):
        await call(s, "create_key", CreateKeyArgs(key="k2", type="ec-p256", max_versions=11))
    # Raised: one more fits.  Back to 0: the daemon's default (4) applies.
    await call(s, "update_key", UpdateKeyArgs(key="k", max_versions=4))
    await call(s, "rotate", RotateArgs(key="k"))
    info = await call(s, "update_key", UpdateKeyArgs(key="k", max_versions=0))
    assert (info["max_versions"], info["current_version"]) == (4, 4)
    with pytest.raises(errors.DeletionNotAllowed):
        await call(s, "rotate", RotateArgs(key="k"))


async def test_a_full_key_rotates_by_pruning_its_retired_versions(
    autojump_clock: trio.testing.MockClock,
) -> None:
    token = MemoryToken()
    s = make_service(token)
    args = CreateKeyArgs(
        key="k", type="ec-p256", verify_grace=60.0, deletion_allowed=True, max_versions=2
    )
    await call(s, "create_key", args)
    await call(s, "rotate", RotateArgs(key="k"))
    with pytest.raises(errors.DeletionNotAllowed, match="no older version is retired yet"):
        await call(s, "rotate", RotateArgs(key="k"))
    await trio.sleep(61)  # version 1's grace is over
    writes = len([c for c in token.changes if c[0] == "write"])
    info = await call(s, "rotate", RotateArgs(key="k"))
    assert [v["state"] for v in info["versions"]] == ["destroyed", "verify-only", "active"]
    # One write made version 3 and destroyed version 1; then its private key went.
    assert len([c for c in token.changes if c[0] == "write"]) == writes + 1
    assert token.changes[-2][0] == "write"
    assert token.changes[-1][0] == "destroy"
    assert not token.has_private("k", 1)
    assert token.has_private("k", 2)


async def test_lifecycle_prunes_retired_versions_only_where_deletion_is_allowed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    token = MemoryToken()
    s = make_service(token)
    pruned: list[tuple[str, list[int]]] = []

    async def audit(key: Any, versions: list[int]) -> None:
        pruned.append((key.record.name, versions))

    s.on_auto_prune = audit
    for name, allowed in (("keep", False), ("prune", True)):
        await call(s, "create_key", CreateKeyArgs(key=name, type="ec-p256", verify_grace=30.0))
        await call(s, "update_key", UpdateKeyArgs(key=name, deletion_allowed=allowed))
        for _ in range(2):
            await call(s, "rotate", RotateArgs(key=name))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.run_lifecycle)
        await trio.sleep(20)
        assert states(s, "prune") == {1: "verify-only", 2: "verify-only", 3: "active"}
        assert pruned == []
        await trio.sleep(20)  # past the grace, and a lifecycle pass
        nursery.cancel_scope.cancel()
    assert pruned == [("prune", [1, 2])]
    assert states(s, "prune") == {1: "destroyed", 2: "destroyed", 3: "active"}
    assert [v.state for v in token.record("prune").versions] == [DESTROYED, DESTROYED, ENABLED]
    assert not token.has_private("prune", 1)
    assert not token.has_private("prune", 2)
    # The record said destroyed before each private key went (crash-safe order).
    write = next(
        i
        for i, c in enumerate(token.changes)
        if c[0] == "write" and c[1] == "prune" and c[2].versions[0].state == DESTROYED
    )
    destroys = [i for i, c in enumerate(token.changes) if c[0] == "destroy"]
    assert len(destroys) == 2
    assert min(destroys) > write
    # No deletion allowed: retired, not destroyed, private keys kept.
    assert states(s, "keep") == {1: "retired", 2: "retired", 3: "active"}
    assert token.has_private("keep", 1)
    assert token.has_private("keep", 2)


async def test_a_prune_cut_short_after_its_record_is_finished_on_load(
    autojump_clock: trio.testing.MockClock,
) -> None:
    token = MemoryToken()
    s = make_service(token)
    args = CreateKeyArgs(key="k", type="ec-p256", verify_grace=5.0, deletion_allowed=True)
    await call(s, "create_key", args)
    await call(s, "rotate", RotateArgs(key="k"))
    await trio.sleep(6)
    token.crash_on_destroy = True
    with pytest.raises(Crash):
        await s._prune("k")
    # The record says destroyed: version 1 never signs or verifies again ...
    assert token.record("k").versions[0].state == DESTROYED
    assert token.has_private("k", 1)  # ... but its private key is still there
    token.crash_on_destroy = False
    restarted = make_service(token)
    await restarted.load()
    assert not token.has_private("k", 1)
    assert states(restarted, "k") == {1: "destroyed", 2: "active"}


async def test_a_scheduled_rotation_refused_by_the_cap_waits_for_a_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Refused, the key is not tried again on every pass (nor in a busy loop),
    and rotates again once its record changes."""
    token = MemoryToken()
    s = make_service(token, sync_interval=1.0)
    args = CreateKeyArgs(key="k", type="ec-p256", auto_rotate_period=10.0, max_versions=2)
    await call(s, "create_key", args)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.run_lifecycle)
        await trio.sleep(60)
        assert token.generated == 2  # version 2 at t=10; version 3 refused
        # One pass per sync_interval at most: a refused rotation is not retried
        # at once (that would spin without the clock moving).
        assert token.full_reads <= 60 / 1.0 + 5
        await call(s, "update_key", UpdateKeyArgs(key="k", max_versions=3))
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert token.generated == 3
    assert states(s, "k") == {1: "verify-only", 2: "verify-only", 3: "active"}


async def test_verify_with_many_versions_leaves_the_loop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lone verify with few versions is answered inline, as before; with
    many it goes to the token workers, or to a thread when none is up; the
    answers are the same."""
    token = MemoryToken()
    s = make_service(token)
    await call(s, "create_key", CreateKeyArgs(key="few", type="ec-p256"))
    await call(s, "create_key", CreateKeyArgs(key="many", type="ec-p256"))
    n = 3 * INLINE_VERIFY_CANDIDATES
    for _ in range(n - 1):
        await call(s, "rotate", RotateArgs(key="many"))
    message = b"checked against every version"
    digest = hashlib.sha256(message).digest()
    old, new = token.sign("many", 1, message), token.sign("many", n, message)
    bad = token.sign("few", 1, message)  # another key's signature
    cases = [
        (VerifyArgs(key="many", signature=old, message=message), (True, 1)),
        (VerifyArgs(key="many", signature=new, digest=digest, hash="sha256"), (True, n)),
        (VerifyArgs(key="many", signature=bad, message=message), (False, None)),
        (VerifyArgs(key="many", signature=old, message=message + b"!"), (False, None)),
    ]

    def outcome(result: dict[str, Any]) -> tuple[bool, int | None]:
        return result["valid"], result.get("version")

    # Few versions: inline.
    answers: list[bytes] = []

    def reply(_rid: int, frame: bytes, _outcome: object) -> None:
        answers.append(frame)

    good = VerifyArgs(key="few", signature=bad, message=message)
    slow = s.handle([Request(1, "verify", good)], reply, None, ROOT)
    assert (slow, token.enqueued, len(answers)) == ([], [], 1)
    # Many: to the workers, never answered on the spot.
    for args, expected in cases:
        answers.clear()
        slow = s.handle([Request(2, "verify", args)], reply, None, ROOT)
        assert (slow, answers, len(token.enqueued)) == ([], [], 1)
        token.work()
        result = decode_response(answers[0][4:]).result
        assert result is not None
        assert outcome(result) == expected
    # No worker up: a thread answers.
    token.is_open = False
    for args, expected in cases:
        answers.clear()
        slow = s.handle([Request(3, "verify", args)], reply, None, ROOT)
        assert len(slow) == 1
        assert answers == []
        await slow[0]()
        result = decode_response(answers[0][4:]).result
        assert result is not None
        assert outcome(result) == expected
    # Bad options are an error whichever way it goes.
    with pytest.raises(errors.InvalidArgument):
        await call(s, "verify", VerifyArgs(key="many", signature=old))


# --------------------------------------------------------------------------
# the real daemon: verify through the token workers


def test_verify_with_many_versions_on_the_daemon(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon()
    versions = 3 * INLINE_VERIFY_CANDIDATES + 1
    message = b"many versions"
    with d.client() as c:
        info = c.create_key(key_name, "ec-p256", max_versions=versions)
        assert info.max_versions == versions
        first = c.sign(key_name, message).signature
        for _ in range(versions - 1):
            c.rotate(key_name)
        newest = c.sign(key_name, message).signature
        before = d.gauge("signd_token_batch_size_count")
        assert c.verify(key_name, first, message).version == 1
        assert c.verify(key_name, newest, message).version == versions
        bad = bytearray(first)
        bad[-1] ^= 1
        assert not c.verify(key_name, bytes(bad), message).valid
        assert not c.verify(key_name, first, message + b"!").valid
        assert c.verify(key_name, first, message, version=1).version == 1
        # Each lone verify of a key with many versions went to a token worker.
        assert d.gauge("signd_token_batch_size_count") >= before + 4
