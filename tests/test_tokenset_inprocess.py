"""Several tokens behind one ``TokenSet``, in process: fake tokens, mock time.

The tokens are ``FakeTokenPool``s made with one wrap secret (two tokens from
one ceremony); the service runs on the set as the daemon builds it (a
``RecordStore`` over the set, the set's watch task), or the set is called
directly.  A token is lost and restored with ``lose``/``restore``; a call
held at a gate (``FakeTokenPool.hold``) shows what happened before it.  The
same rules on real SoftHSM tokens, under load, are in test_several_tokens.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fakes import Conn, FakeTokenPool, Gate, open_set_harness, principal
from signd.errors import TokenError, TokenUnavailable
from signd.protocol import (
    CreateKeyArgs,
    DestroyArgs,
    Empty,
    Health,
    KeyInfo,
    KeyRefArgs,
    RotateArgs,
    SignArgs,
    SignBatchArgs,
    SignBatchResult,
    SignResult,
    UpdateKeyArgs,
)
from signd.token.tokenset import WATCH_INTERVAL, TokenSet

ROOT = principal(0, user="root")


def _two() -> list[FakeTokenPool]:
    """Tokens "a" (the primary while it serves) and "b", from one ceremony."""
    return [FakeTokenPool("a"), FakeTokenPool("b")]


def _states(ts: TokenSet) -> list[str]:
    return [state for _, state in ts.states()]


async def _until(ready: Callable[[], bool], what: str) -> None:
    """Let mock time pass, a watch interval at a time, until ``ready()`` (at
    most 100 intervals: the watch acts within one)."""
    for _ in range(100):
        if ready():
            return
        await trio.sleep(WATCH_INTERVAL)
    raise AssertionError(f"never happened: {what}")


async def _reached(gate: Gate) -> None:
    """Wait (mock time, bounded) for the held call to arrive at ``gate``."""
    with trio.fail_after(10 * WATCH_INTERVAL):
        await gate.reached.wait()


def _ids(fake: FakeTokenPool, name: str) -> dict[int, bytes]:
    """Version -> object id, from ``fake``'s record of key ``name``."""
    return {v.version: v.object_id for v in fake.record(name).versions}


def _private_der(fake: FakeTokenPool, object_id: bytes) -> bytes:
    private = fake.pairs[object_id].private
    assert private is not None
    return private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check(spki: bytes, signature: bytes, message: bytes) -> None:
    """An independent check of an ECDSA P-256 signature.  Raises: InvalidSignature."""
    pub = serialization.load_der_public_key(spki)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(signature, message, ec.ECDSA(hashes.SHA256()))


async def _create(c: Conn, name: str, *, backup: bool, **settings: Any) -> KeyInfo:
    info = await c.call(
        "create_key", CreateKeyArgs(key=name, type="ec-p256", backup=backup, **settings)
    )
    assert isinstance(info, KeyInfo)
    return info


def _sign(c: Conn, name: str, message: bytes) -> int:
    """Send one signature request (its own read of the connection); its id."""
    (rid,) = c.send([("sign", SignArgs(key=name, message=message))])
    return rid


def _sign_many(c: Conn, name: str, n: int) -> tuple[int, list[bytes]]:
    """Send one sign_batch of ``n`` messages; its id and the messages."""
    messages = [b"message %d" % i for i in range(n)]
    (rid,) = c.send([("sign_batch", SignBatchArgs(key=name, messages=tuple(messages)))])
    return rid, messages


# ---------------------------------------------------------------- routing


async def test_signatures_go_to_the_less_busy_token_holding_the_key(autojump_clock: Any) -> None:
    async with open_set_harness(_two()) as h:
        a, b = h.fakes
        c = h.connect(ROOT)
        await _create(c, "k", backup=True)
        a.latency = b.latency = 1.0  # answers take a while: the queues fill
        batch, messages = _sign_many(c, "k", 5)  # both idle: the first token
        assert (a.pending, b.pending) == (5, 0)
        singles = [_sign(c, "k", b"single %d" % i) for i in range(3)]
        assert (a.pending, b.pending) == (5, 3)  # each to the less busy one
        assert h.tokens.pending == 8
        spki = a.pairs[_ids(a, "k")[1]].spki
        answered = await c.replies.answer(batch, "sign_batch")
        assert isinstance(answered, SignBatchResult)
        for item, message in zip(answered.results, messages, strict=True):
            assert item.signature is not None
            _check(spki, item.signature, message)
        for i, rid in enumerate(singles):
            result = await c.replies.answer(rid, "sign")
            assert isinstance(result, SignResult)
            _check(spki, result.signature, b"single %d" % i)
        assert (a.jobs_done, b.jobs_done) == (5, 3)
        assert h.tokens.pending == 0


async def test_a_key_without_backup_signs_on_its_token_only_and_is_unavailable_while_it_is_away(
    autojump_clock: Any,
) -> None:
    async with open_set_harness(_two()) as h:
        a, b = h.fakes
        c = h.connect(ROOT)
        await _create(c, "solo", backup=False)
        await _create(c, "both", backup=True)
        oid = _ids(a, "solo")[1]
        assert (a.holds(oid), b.holds(oid)) == ("pair", "public")
        a.latency = 1.0
        batch, _ = _sign_many(c, "solo", 5)
        single = _sign(c, "solo", b"still on a")  # a is busier, b is idle: a all the same
        assert (a.pending, b.pending) == (6, 0)
        await c.replies.answer(batch, "sign_batch")
        await c.replies.answer(single, "sign")
        assert (a.jobs_done, b.jobs_done) == (6, 0)

        a.lose()
        with pytest.raises(TokenUnavailable) as raised:
            await c.call("sign", SignArgs(key="solo", message=b"its token is away"))
        assert raised.value.retryable
        signed = await c.call("sign", SignArgs(key="both", message=b"on b"))
        assert (signed.version, b.jobs_done) == (1, 1)


# ---------------------------------------------------------------- failover


async def test_signatures_queued_on_a_lost_token_are_answered_by_the_other(
    autojump_clock: Any,
) -> None:
    async with open_set_harness(_two()) as h:
        a, b = h.fakes
        c = h.connect(ROOT)
        await _create(c, "k", backup=True)
        a.latency = b.latency = 1.0
        rid, messages = _sign_many(c, "k", 10)
        assert (a.pending, b.pending) == (10, 0)
        a.lose()  # its ten are answered token_unavailable: queued on b instead
        answered = await c.replies.answer(rid, "sign_batch")
        spki = a.pairs[_ids(a, "k")[1]].spki
        for item, message in zip(answered.results, messages, strict=True):
            assert item.error is None
            assert item.signature is not None
            _check(spki, item.signature, message)
        assert b.jobs_done == 10


async def test_a_lost_tokens_signatures_fail_when_no_other_token_holds_the_key(
    autojump_clock: Any,
) -> None:
    async with open_set_harness(_two()) as h:
        a, b = h.fakes
        c = h.connect(ROOT)
        await _create(c, "solo", backup=False)  # on a only
        await _create(c, "both", backup=True)
        a.latency = b.latency = 1.0
        rid, _ = _sign_many(c, "solo", 3)
        a.lose()
        answered = await c.replies.answer(rid, "sign_batch")
        assert [i.error.name if i.error else None for i in answered.results] == [
            "token_unavailable"
        ] * 3
        assert b.jobs_done == 0

        await _until(lambda: not h.tokens.serving[0], "a to stop serving")
        a.restore()
        await _until(lambda: _states(h.tokens) == ["serving", "serving"], "a caught up")
        b.lose()  # now the other holder of "both" is away too
        rid, _ = _sign_many(c, "both", 3)
        assert a.pending == 3
        a.lose()
        answered = await c.replies.answer(rid, "sign_batch")
        assert {i.error.name if i.error else None for i in answered.results} == {
            "token_unavailable"
        }


# ---------------------------------------------------------------- generate


async def test_generate_with_backup_puts_the_keypair_on_every_serving_token(
    autojump_clock: Any,
) -> None:
    async with open_set_harness(_two(), watch=False) as h:
        a, b = h.fakes
        spki = await h.tokens.generate("ec-p256", b"id-1", "g/v1", backup=True)
        for fake in (a, b):
            assert fake.holds(b"id-1") == "pair"
            assert fake.pairs[b"id-1"].spki == spki
            assert fake.pairs[b"id-1"].label == "g/v1"
        assert _private_der(a, b"id-1") == _private_der(b, b"id-1")  # unwrapped on b
        assert b.args_of("restore_keypair") == [b"id-1"]

        await h.tokens.generate("ec-p256", b"id-2", "g/v2", backup=False)
        assert a.holds(b"id-2") == "pair"
        assert b.holds(b"id-2") != "pair"
        assert b.args_of("restore_keypair") == [b"id-1"]

        b.lose()  # not serving: made on a only
        await h.tokens.generate("ec-p256", b"id-3", "g/v3", backup=True)
        assert (a.holds(b"id-3"), b.holds(b"id-3")) == ("pair", "none")


async def test_a_token_that_fails_the_mirrored_keypair_stops_serving(autojump_clock: Any) -> None:
    async with open_set_harness(_two(), watch=False) as h:
        a, b = h.fakes
        b.fail_next["restore_keypair"] = TokenError("the token refused the unwrap")
        await h.tokens.generate("ec-p256", b"id-1", "g/v1", backup=True)
        assert (a.holds(b"id-1"), b.holds(b"id-1")) == ("pair", "none")
        assert _states(h.tokens) == ["serving", "catching_up"]
        assert not h.tokens.serving[1]


async def test_a_key_whose_keypair_one_token_refused_is_on_it_once_it_is_caught_up(
    autojump_clock: Any,
) -> None:
    async with open_set_harness(_two()) as h:
        a, b = h.fakes
        c = h.connect(ROOT)
        b.fail_next["restore_keypair"] = TokenError("the token refused the unwrap")
        await _create(c, "k", backup=True)
        await _until(lambda: _states(h.tokens) == ["serving", "serving"], "b caught up")
        oid = _ids(a, "k")[1]
        assert b.holds(oid) == "pair"
        assert b.records["k"] == a.records["k"]
        a.lose()
        signed = await c.call("sign", SignArgs(key="k", message=b"on b"))
        _check(a.pairs[oid].spki, signed.signature, b"on b")


# ---------------------------------------------------------------- records


async def test_record_writes_are_mirrored_to_every_serving_token(autojump_clock: Any) -> None:
    async with open_set_harness(_two()) as h:
        a, b = h.fakes
        c = h.connect(ROOT)
        await _create(c, "k", backup=True)
        await c.call("rotate", RotateArgs(key="k"))
        await c.call("update_key", UpdateKeyArgs(key="k", deletion_allowed=True))
        assert a.records["k"][0] == 3
        assert b.records["k"] == a.records["k"]
        assert a.older == b.older == {}  # the older revisions dropped on both
        for fake in (a, b):
            assert fake.count("create_metadata") == 3
            assert fake.count("drop_older") == 3
        assert a.count("revisions") > 0
        assert b.count("revisions") == 0  # the compare-and-swap's reads: the primary's

        # Straight on the set: each step reaches every serving token, not one away.
        value = a.records["k"][1]  # the same record again, as revision 4
        await h.tokens.create_metadata("k", 4, value)
        assert a.older["k"] == b.older["k"] == [3]
        await h.tokens.drop_older("k", 4)
        assert a.records["k"] == b.records["k"] == (4, value)
        assert a.older == b.older == {}
        b.lose()
        await h.tokens.create_metadata("signd:head", 1, b"chain head")
        await h.tokens.drop_older("signd:head", 1)
        assert a.records["signd:head"] == (1, b"chain head")
        assert "signd:head" not in b.records
        assert not h.tokens.serving[1]


async def test_a_destroyed_versions_private_keys_go_after_its_record_is_on_every_token(
    autojump_clock: Any,
) -> None:
    async with open_set_harness(_two()) as h:
        a, b = h.fakes
        c = h.connect(ROOT)
        await _create(c, "k", backup=True, deletion_allowed=True)
        await c.call("rotate", RotateArgs(key="k"))
        v1 = _ids(a, "k")[1]
        mirrored = b.hold("create_metadata")  # the record, written on a, reaching b
        (rid,) = c.send([("destroy", DestroyArgs(key="k", version=1))])
        await _reached(mirrored)
        assert (a.holds(v1), b.holds(v1)) == ("pair", "pair")
        mirrored.release()
        await c.replies.answer(rid, "destroy")
        assert b.records["k"] == a.records["k"]
        assert (a.holds(v1), b.holds(v1)) == ("public", "public")


async def test_a_returning_token_is_caught_up_before_it_serves(autojump_clock: Any) -> None:
    async with open_set_harness(_two()) as h:
        a, b = h.fakes
        ts = h.tokens
        c = h.connect(ROOT)
        await _create(c, "k", backup=True, deletion_allowed=True)
        await c.call("rotate", RotateArgs(key="k"))
        b.lose()
        await _until(lambda: not ts.serving[1], "b to stop serving")
        # While b is away: a new version, and an old one destroyed.
        await c.call("rotate", RotateArgs(key="k"))
        await c.call("destroy", DestroyArgs(key="k", version=1))
        ids = _ids(a, "k")
        assert (a.holds(ids[1]), a.holds(ids[3])) == ("public", "pair")
        assert (b.holds(ids[1]), b.holds(ids[3])) == ("pair", "none")
        assert b.records["k"][0] < a.records["k"][0]

        last = b.hold("drop_older")  # the catch-up's last step on b
        b.restore()
        await _reached(last)
        assert _states(ts) == ["serving", "catching_up"]
        assert b.holds(ids[3]) == "pair"
        assert _private_der(b, ids[3]) == _private_der(a, ids[3])  # unwrapped from a's
        assert b.holds(ids[1]) == "public"  # destroyed meanwhile: its private key goes
        assert b.holds(ids[2]) == "pair"
        assert b.records["k"] == a.records["k"]
        last.release()
        await _until(lambda: _states(ts) == ["serving", "serving"], "b to serve")
        assert ts.catch_ups[1] == 2  # at start, and now

        a.lose()  # version 3 signs on b, the returned token
        signed = await c.call("sign", SignArgs(key="k", message=b"on b"))
        assert signed.version == 3
        _check(a.pairs[ids[3]].spki, signed.signature, b"on b")


async def test_at_start_a_record_newer_on_the_second_token_is_copied_to_the_first(
    autojump_clock: Any,
) -> None:
    a, b = _two()
    async with open_set_harness([a, b]) as h:
        await _create(h.connect(ROOT), "k", backup=True)
    async with open_set_harness([b]) as h:  # b alone: a rotation a does not see
        c = h.connect(ROOT)
        await c.call("rotate", RotateArgs(key="k"))
        await _create(c, "only-b", backup=True)
    assert a.records["k"][0] == 1
    assert b.records["k"][0] == 2
    async with open_set_harness([a, b], watch=False) as h:
        assert _states(h.tokens) == ["serving", "serving"]
        assert h.tokens.catch_ups == [1, 1]
        assert a.records["k"] == b.records["k"]
        assert a.records["only-b"] == b.records["only-b"]
        ids = _ids(b, "k")
        assert a.holds(ids[2]) == "pair"
        assert _private_der(a, ids[2]) == _private_der(b, ids[2])
        assert a.holds(_ids(b, "only-b")[1]) == "pair"
        c = h.connect(ROOT)
        info = await c.call("key_info", KeyRefArgs(key="k"))
        assert info.current_version == 2
        b.lose()  # the copied version signs on a
        signed = await c.call("sign", SignArgs(key="k", message=b"on a"))
        assert signed.version == 2
        _check(b.pairs[ids[2]].spki, signed.signature, b"on a")


async def test_with_the_primary_away_reads_and_writes_go_to_the_next_and_it_returns_primary(
    autojump_clock: Any,
) -> None:
    async with open_set_harness(_two()) as h:
        a, b = h.fakes
        ts = h.tokens
        c = h.connect(ROOT)
        await _create(c, "k", backup=True)
        assert ts.info is not None
        assert ts.info.label == "a"
        a.lose()
        assert ts.info is not None
        assert ts.info.label == "b"  # at once (the watch: soon)
        await _until(lambda: not ts.serving[0], "a to stop serving")
        reads = (a.count("load_metadata"), b.count("load_metadata"))
        assert [blob.name for blob in await ts.load_metadata()] == ["k"]
        assert (a.count("load_metadata"), b.count("load_metadata")) == (reads[0], reads[1] + 1)
        info = await c.call("rotate", RotateArgs(key="k"))  # the write: on b
        assert info.current_version == 2
        assert (a.records["k"][0], b.records["k"][0]) == (1, 2)
        ids = _ids(b, "k")
        assert (a.holds(ids[2]), b.holds(ids[2])) == ("none", "pair")
        assert (await c.call("sign", SignArgs(key="k", message=b"x"))).version == 2

        a.restore()
        await _until(lambda: _states(ts) == ["serving", "serving"], "a caught up")
        assert ts.info is not None
        assert ts.info.label == "a"  # primary again
        assert a.records["k"] == b.records["k"]
        assert a.holds(ids[2]) == "pair"
        reads = (a.count("load_metadata"), b.count("load_metadata"))
        await ts.load_metadata("k")
        assert (a.count("load_metadata"), b.count("load_metadata")) == (reads[0] + 1, reads[1])
        await c.call("update_key", UpdateKeyArgs(key="k", verify_grace=60.0))
        assert a.records["k"][0] == b.records["k"][0] == 3


# ---------------------------------------------------------------- state


async def _health(c: Conn) -> Health:
    health = await c.call("health", Empty())
    assert isinstance(health, Health)
    return health


async def test_states_is_open_and_pending(autojump_clock: Any) -> None:
    async with open_set_harness(_two()) as h:
        a, b = h.fakes
        ts = h.tokens
        c = h.connect(ROOT)
        await _create(c, "k", backup=True)
        assert _states(ts) == ["serving", "serving"]
        assert [info.label if info else None for info, _ in ts.states()] == ["a", "b"]
        assert ts.is_open
        assert h.service.ready
        health = await _health(c)
        assert health.status == "ok"
        assert health.tokens is not None
        assert [(t.label, t.state) for t in health.tokens] == [("a", "serving"), ("b", "serving")]

        b.lose()
        assert _states(ts) == ["serving", "unavailable"]  # at once (the watch: soon)
        health = await _health(c)
        assert (health.status, health.detail) == ("degraded", "token 2 of 2 not serving")
        await _until(lambda: not ts.serving[1], "b to stop serving")
        first = b.hold("load_metadata")  # the catch-up's first read on b
        b.restore()
        await _reached(first)
        assert _states(ts) == ["serving", "catching_up"]
        assert (await _health(c)).status == "degraded"
        first.release()
        await _until(lambda: _states(ts) == ["serving", "serving"], "b caught up")

        a.latency = b.latency = 1.0
        rid, _ = _sign_many(c, "k", 4)
        assert ts.pending == a.pending + b.pending == 4
        await c.replies.answer(rid, "sign_batch")
        assert ts.pending == 0

        a.lose()
        b.lose()
        await _until(lambda: ts.serving == [False, False], "both to stop serving")
        assert _states(ts) == ["unavailable", "unavailable"]
        assert not ts.is_open
        assert not h.service.ready
        assert (await _health(c)).status == "unavailable"
        with pytest.raises(TokenUnavailable):
            await c.call("sign", SignArgs(key="k", message=b"nobody"))
        with pytest.raises(TokenUnavailable):
            await ts.load_metadata()

        b.restore()  # the only one there: serves, with nothing to catch up from
        await _until(lambda: _states(ts) == ["unavailable", "serving"], "b alone")
        assert ts.is_open
        a.restore()
        await _until(lambda: _states(ts) == ["serving", "serving"], "a caught up")


# ---------------------------------------------------------------- bugs found


async def test_a_token_caught_up_during_a_rotation_gets_the_new_version(
    autojump_clock: Any,
) -> None:
    """b returns while a rotation's keypair is being made on a alone: the
    watch catches b up (before the new record exists), then the record is
    written on b too.  The version it names must be on b as well."""
    async with open_set_harness(_two()) as h:
        a, b = h.fakes
        ts = h.tokens
        c = h.connect(ROOT)
        await _create(c, "k", backup=True)
        b.lose()
        await _until(lambda: not ts.serving[1], "b to stop serving")
        wrapping = a.hold("wrap_private")  # inside the set's generate
        (rid,) = c.send([("rotate", RotateArgs(key="k"))])
        await _reached(wrapping)
        b.restore()
        # The watch wants to catch b up: it waits for the set's lock (generate has it).
        await _until(lambda: ts._lock.statistics().tasks_waiting == 1, "the catch-up to wait")
        wrapping.release()
        rotated = await c.replies.answer(rid, "rotate")
        assert rotated.current_version == 2
        await _until(lambda: _states(ts) == ["serving", "serving"], "b to serve")
        assert b.records["k"] == a.records["k"]
        v2 = _ids(a, "k")[2]
        assert b.holds(v2) == "pair"
        a.lose()
        signed = await c.call("sign", SignArgs(key="k", message=b"v2 on b"))
        assert signed.version == 2
        _check(a.pairs[v2].spki, signed.signature, b"v2 on b")


async def test_a_key_without_backup_can_be_changed_while_its_token_is_away(
    autojump_clock: Any,
) -> None:
    """Every token holds the public key of every version its records name, so
    a key whose only private key is away is unavailable, not broken."""
    async with open_set_harness(_two()) as h:
        a, b = h.fakes
        c = h.connect(ROOT)
        await _create(c, "solo", backup=False)
        oid = _ids(a, "solo")[1]
        assert (a.holds(oid), b.holds(oid)) == ("pair", "public")
        a.lose()
        await _until(lambda: not h.tokens.serving[0], "a to stop serving")
        info = await c.call("update_key", UpdateKeyArgs(key="solo", verify_grace=60.0))
        assert info.verify_grace == 60.0
        with pytest.raises(TokenUnavailable):
            await c.call("sign", SignArgs(key="solo", message=b"its token is away"))
        a.restore()
        await _until(lambda: _states(h.tokens) == ["serving", "serving"], "a caught up")
        assert a.records["solo"] == b.records["solo"]
        signed = await c.call("sign", SignArgs(key="solo", message=b"back"))
        _check(a.pairs[oid].spki, signed.signature, b"back")


async def test_a_record_this_version_cannot_read_is_copied_as_it_is(autojump_clock: Any) -> None:
    """A record written by another signd version (here: a key type this one
    does not know) is the service's to skip; the set copies it, without
    keypairs, at start and when a token returns, and goes on."""
    future = b'{"format": 1, "name": "future", "type": "ml-dsa-65", "versions": []}'
    a, b = _two()
    b.records["future"] = (1, future)  # on b only, at start
    async with open_set_harness([a, b]) as h:
        assert a.records["future"] == b.records["future"] == (1, future)
        c = h.connect(ROOT)
        await _create(c, "k", backup=True)
        b.lose()
        await _until(lambda: not h.tokens.serving[1], "b to stop serving")
        a.records["future"] = (2, future)  # newer on a while b is away
        b.restore()
        await _until(lambda: _states(h.tokens) == ["serving", "serving"], "b caught up")
        assert b.records["future"] == (2, future)
        assert b.records["k"] == a.records["k"]


async def test_a_destroy_one_token_failed_is_finished_when_it_is_caught_up(
    autojump_clock: Any,
) -> None:
    """The record (destroyed) reached b, the private key's deletion failed
    there: b stops serving, and its catch-up deletes it (the records' revisions
    are the same by then)."""
    async with open_set_harness(_two()) as h:
        a, b = h.fakes
        c = h.connect(ROOT)
        await _create(c, "k", backup=True, deletion_allowed=True)
        await c.call("rotate", RotateArgs(key="k"))
        v1 = _ids(a, "k")[1]
        b.fail_next["destroy_keys"] = TokenError("the token refused the deletion")
        await c.call("destroy", DestroyArgs(key="k", version=1))
        assert b.records["k"] == a.records["k"]
        assert (a.holds(v1), b.holds(v1)) == ("public", "pair")
        await _until(lambda: h.tokens.catch_ups[1] == 2, "b caught up again")
        assert _states(h.tokens) == ["serving", "serving"]
        assert b.holds(v1) == "public"
