"""Replay protection in process: watermarked signing and replay-checked verify,
on a FakePool with trio's MockClock moved by hand, and the state journal
(``signd.state``) on disk in a temporary directory.

The whole daemon under ``kill -9`` is ``test_replay_kill.py``.
"""

from __future__ import annotations

import json
import os
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fakes import FakePool, Harness, open_harness, principal, wall
from signd.errors import InvalidArgument, PositionUsed, TokenUnavailable
from signd.keys.replay import Marks, Nonces
from signd.protocol import (
    BackupArgs,
    CreateKeyArgs,
    KeyInfo,
    KeyRefArgs,
    RotateArgs,
    SignArgs,
    SignBatchArgs,
    UpdateKeyArgs,
    VerifyArgs,
)
from signd.state import JOURNAL, State, StateError, mark_record, nonce_record, replay_journal
from signd_client.bundle import restore_calls
from signd_client.replay import REPLAYED, signed_payload

ROOT = principal(0, user="root")
VECTORS = Path(__file__).parent / "vectors" / "replay.json"
WINDOW = 300


@contextmanager
def opened(directory: Path, *, max_nonces: int = 1000) -> Iterator[State]:
    state = State.open(str(directory), window=WINDOW, max_nonces=max_nonces, now=wall())
    try:
        yield state
    finally:
        state.close()


def journal(directory: Path) -> tuple[Marks, Nonces]:
    """What the journal on disk holds now (read as a restart would)."""
    marks, nonces = Marks(), Nonces(WINDOW, 1_000_000)
    replay_journal((directory / JOURNAL).read_bytes(), marks, nonces, wall(), "test")
    return marks, nonces


def check(info: KeyInfo, signature: bytes, message: bytes) -> None:
    """An independent verification with ``cryptography``.  Raises: InvalidSignature."""
    pub = serialization.load_pem_public_key(info.versions[-1].public_key_pem.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(signature, message, ec.ECDSA(hashes.SHA256()))


async def _watermarked(h: Harness, name: str = "chain") -> KeyInfo:
    info: KeyInfo = await h.connect(ROOT).call(
        "create_key", CreateKeyArgs(key=name, type="ec-p256", watermark=True, backup=True)
    )
    return info


# ---------------------------------------------------------------- watermarks


async def test_a_position_signs_once_and_the_mark_names_itself(
    mock_clock: Any, tmp_path: Path
) -> None:
    with opened(tmp_path / "state") as state:
        async with open_harness(state=state) as h:
            c = h.connect(ROOT)
            info = await _watermarked(h)
            assert info.watermark is True
            assert info.mark is None
            await c.call("create_key", CreateKeyArgs(key="plain", type="ec-p256"))
            signed = await c.call("sign", SignArgs(key="chain", message=b"at 5", position=5))
            check(info, signed.signature, b"at 5")
            assert (await c.call("key_info", KeyRefArgs(key="chain"))).mark == 5
            for position in (5, 3, 0):
                with pytest.raises(PositionUsed, match="at or below its mark 5"):
                    await c.call("sign", SignArgs(key="chain", message=b"x", position=position))
            with pytest.raises(InvalidArgument, match=r"must carry a 'position'.*above 5"):
                await c.call("sign", SignArgs(key="chain", message=b"x"))
            with pytest.raises(InvalidArgument, match="no watermark"):
                await c.call("sign", SignArgs(key="plain", message=b"x", position=1))
            # a refused request burns nothing
            assert state.mark("chain") == 5
            await c.call("sign", SignArgs(key="chain", message=b"at 6", position=6))
            await c.call("sign", SignArgs(key="chain", message=b"at 100", position=100))
            assert state.mark("chain") == 100
            # keys are separate
            await _watermarked(h, "other")
            await c.call("sign", SignArgs(key="other", message=b"x", position=1))
            assert (state.mark("chain"), state.mark("other")) == (100, 1)


async def test_concurrent_requests_for_one_position_sign_it_once(
    mock_clock: Any, tmp_path: Path
) -> None:
    with opened(tmp_path / "state") as state:
        async with open_harness(state=state) as h:
            info = await _watermarked(h)
            a, b = h.connect(ROOT), h.connect(ROOT)
            # One read of a connection, and another connection, before any answer.
            positions = [10, 10, 11, 9, 12, 12]
            ids = a.send(
                [("sign", SignArgs(key="chain", message=b"%d" % p, position=p)) for p in positions]
            )
            (other,) = b.send([("sign", SignArgs(key="chain", message=b"11", position=11))])
            outcomes = []
            for rid, p in zip(ids, positions, strict=True):
                try:
                    result = await a.replies.answer(rid, "sign")
                except PositionUsed:
                    outcomes.append((p, "used"))
                else:
                    check(info, result.signature, b"%d" % p)
                    outcomes.append((p, "signed"))
            assert outcomes == [
                (10, "signed"),
                (10, "used"),
                (11, "signed"),
                (9, "used"),
                (12, "signed"),
                (12, "used"),
            ]
            with pytest.raises(PositionUsed):
                await b.replies.answer(other, "sign")
            # All of them went to disk in one sync (group commit).
            assert state.syncs <= 2


class _Watching(FakePool):
    """A pool that reads the journal on disk whenever a job reaches it."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        self.marks_seen: list[int | None] = []

    def enqueue(self, source: object, entries: Any) -> None:
        self.marks_seen.append(journal(self.directory)[0].get("chain"))
        super().enqueue(source, entries)


async def test_the_mark_is_on_disk_before_the_token_signs(mock_clock: Any, tmp_path: Path) -> None:
    directory = tmp_path / "state"
    with opened(directory) as state:
        pool = _Watching(directory)
        async with open_harness(pool, state=state) as h:
            await _watermarked(h)
            c = h.connect(ROOT)
            for p in (1, 2, 7):
                await c.call("sign", SignArgs(key="chain", message=b"m", position=p))
            await c.call(
                "sign_batch", SignBatchArgs(key="chain", messages=(b"a", b"b"), position=8)
            )
            assert pool.marks_seen == [1, 2, 7, 9]


async def test_a_failed_signature_burns_its_position(mock_clock: Any, tmp_path: Path) -> None:
    with opened(tmp_path / "state") as state:
        async with open_harness(state=state) as h:
            await _watermarked(h)
            c = h.connect(ROOT)
            h.pool.lose()
            with pytest.raises(TokenUnavailable):
                await c.call("sign", SignArgs(key="chain", message=b"m", position=4))
            h.pool.restore()
            with pytest.raises(PositionUsed, match="mark 4"):
                await c.call("sign", SignArgs(key="chain", message=b"m", position=4))
            await c.call("sign", SignArgs(key="chain", message=b"m", position=5))


async def test_sign_batch_burns_consecutive_positions(mock_clock: Any, tmp_path: Path) -> None:
    with opened(tmp_path / "state") as state:
        async with open_harness(state=state) as h:
            info = await _watermarked(h)
            c = h.connect(ROOT)
            messages = (b"p100", b"p101", b"p102")
            result = await c.call(
                "sign_batch", SignBatchArgs(key="chain", messages=messages, position=100)
            )
            for item, message in zip(result.results, messages, strict=True):
                assert item.signature is not None
                check(info, item.signature, message)
            assert state.mark("chain") == 102
            with pytest.raises(PositionUsed, match="mark 102"):
                await c.call(
                    "sign_batch", SignBatchArgs(key="chain", messages=(b"x",), position=101)
                )
            # an item refused on its own still burns its position
            digests = (b"\0" * 32, b"short")
            result = await c.call(
                "sign_batch",
                SignBatchArgs(key="chain", digests=digests, hash="sha256", position=103),
            )
            assert result.results[1].error is not None
            assert state.mark("chain") == 104
            # a batch refused whole burns nothing
            with pytest.raises(InvalidArgument):
                await c.call("sign_batch", SignBatchArgs(key="chain", messages=(), position=200))
            with pytest.raises(InvalidArgument, match="past 2"):
                await c.call(
                    "sign_batch",
                    SignBatchArgs(key="chain", messages=(b"a", b"b"), position=(1 << 64) - 1),
                )
            assert state.mark("chain") == 104


async def test_marks_survive_a_restart(mock_clock: Any, tmp_path: Path) -> None:
    directory = tmp_path / "state"
    pool = FakePool()
    with opened(directory) as state:
        async with open_harness(pool, state=state) as h:
            await _watermarked(h)
            await h.connect(ROOT).call("sign", SignArgs(key="chain", message=b"m", position=7))
    # The journal was compacted on the way in; a second daemon on the same
    # directory is refused while the first holds it.
    with opened(directory) as state:
        with pytest.raises(StateError, match="another signd"):
            State.open(str(directory), window=WINDOW, max_nonces=10, now=wall())
        assert state.mark("chain") == 7
        async with open_harness(pool, state=state) as h:
            c = h.connect(ROOT)
            with pytest.raises(PositionUsed, match="mark 7"):
                await c.call("sign", SignArgs(key="chain", message=b"m", position=7))
            await c.call("sign", SignArgs(key="chain", message=b"m", position=8))


async def test_raise_mark_by_hand(mock_clock: Any, tmp_path: Path) -> None:
    with opened(tmp_path / "state") as state:
        async with open_harness(state=state) as h:
            await _watermarked(h)
            c = h.connect(ROOT)
            await c.call("create_key", CreateKeyArgs(key="plain", type="ec-p256"))
            info = await c.call("update_key", UpdateKeyArgs(key="chain", raise_mark=1000))
            assert info.mark == 1000
            info = await c.call("update_key", UpdateKeyArgs(key="chain", raise_mark=10))
            assert info.mark == 1000  # never lowered
            with pytest.raises(PositionUsed, match="mark 1000"):
                await c.call("sign", SignArgs(key="chain", message=b"m", position=1000))
            with pytest.raises(InvalidArgument, match="no watermark"):
                await c.call("update_key", UpdateKeyArgs(key="plain", raise_mark=5))
        assert journal(tmp_path / "state")[0].get("chain") == 1000


async def test_backup_carries_the_mark_and_restore_takes_the_max(
    mock_clock: Any, tmp_path: Path
) -> None:
    with opened(tmp_path / "a") as state:
        async with open_harness(state=state) as h:
            await _watermarked(h)
            await h.connect(ROOT).call("sign", SignArgs(key="chain", message=b"m", position=50))
            bundle = (await h.connect(ROOT).call("backup", BackupArgs())).bundle
    # A fresh daemon (its state directory lost): the bundle's mark.
    with opened(tmp_path / "b") as state:
        async with open_harness(FakePool(), state=state) as h:
            c = h.connect(ROOT)
            for call in restore_calls(bundle, check=True):
                await c.call(call.op, call.args)
            assert state.mark("chain") is None  # a check writes nothing
            for call in restore_calls(bundle):
                await c.call(call.op, call.args)
            assert state.mark("chain") == 50
            with pytest.raises(PositionUsed, match="mark 50"):
                await c.call("sign", SignArgs(key="chain", message=b"m", position=50))
    # A daemon that signed further than the bundle keeps its own mark.
    with opened(tmp_path / "c") as state:
        state.raise_mark("chain", 80)
        async with open_harness(FakePool(), state=state) as h:
            c = h.connect(ROOT)
            for call in restore_calls(bundle):
                await c.call(call.op, call.args)
            assert state.mark("chain") == 80


async def test_without_a_state_directory_both_are_refused(mock_clock: Any) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        with pytest.raises(InvalidArgument, match=r"state directory"):
            await _watermarked(h)
        await c.call("create_key", CreateKeyArgs(key="api", type="ec-p256"))
        with pytest.raises(InvalidArgument, match=r"state directory"):
            await c.call(
                "verify",
                VerifyArgs(key="api", signature=b"x", message=b"m", timestamp=1, nonce=b"n" * 8),
            )


# ---------------------------------------------------------------- replay-checked verify


async def _sign_replay(c: Any, key: str, message: bytes, ts: int, nonce: bytes) -> bytes:
    result = await c.call("sign", SignArgs(key=key, message=signed_payload(message, ts, nonce)))
    signature: bytes = result.signature
    return signature


async def _status(c: Any, key: str, sig: bytes, message: bytes, ts: int, nonce: bytes) -> str:
    args = VerifyArgs(key=key, signature=sig, message=message, timestamp=ts, nonce=nonce)
    result = await c.call("verify", args)
    assert result.valid == (result.status == "valid")
    status: str = result.status
    return status


async def test_valid_once_then_replayed_stale_and_invalid(mock_clock: Any, tmp_path: Path) -> None:
    with opened(tmp_path / "state") as state:
        async with open_harness(state=state) as h:
            c = h.connect(ROOT)
            await c.call("create_key", CreateKeyArgs(key="api", type="ec-p256"))
            await c.call("create_key", CreateKeyArgs(key="hooks", type="ed25519"))
            now = int(wall())
            nonce = b"nonce-01"
            sig = await _sign_replay(c, "api", b"GET /", now, nonce)
            # a wrong signature is invalid, and spends no nonce
            assert await _status(c, "api", sig, b"GET /x", now, nonce) == "invalid"
            assert await _status(c, "api", sig, b"GET /", now + 1, nonce) == "invalid"
            assert await _status(c, "api", sig, b"GET /", now, nonce) == "valid"
            assert await _status(c, "api", sig, b"GET /", now, nonce) == "replayed"
            # the same nonce on another key is another request
            sig2 = await _sign_replay(c, "hooks", b"GET /", now, nonce)
            assert await _status(c, "hooks", sig2, b"GET /", now, nonce) == "valid"
            # outside the window, either way
            for ts in (now - WINDOW - 1, now + WINDOW + 1):
                old = await _sign_replay(c, "api", b"m", ts, b"other-nonce")
                assert await _status(c, "api", old, b"m", ts, b"other-nonce") == "stale"
            # at the window's edges: accepted
            for ts in (now - WINDOW, now + WINDOW):
                edge = await _sign_replay(c, "api", b"m", ts, b"edge-%d" % ts)
                assert await _status(c, "api", edge, b"m", ts, b"edge-%d" % ts) == "valid"
            # the window moves on: the first request is stale now, not replayed
            mock_clock.jump(WINDOW + 1)
            assert await _status(c, "api", sig, b"GET /", now, nonce) == "stale"
            assert len(state.nonces) == 1  # only the one from now + WINDOW is held
            with pytest.raises(InvalidArgument, match="nonce"):
                await _status(c, "api", sig, b"m", now, b"short")
            with pytest.raises(InvalidArgument, match="both"):
                await c.call(
                    "verify", VerifyArgs(key="api", signature=sig, message=b"m", timestamp=1)
                )
            with pytest.raises(InvalidArgument, match="not a 'digest'"):
                await c.call(
                    "verify",
                    VerifyArgs(
                        key="api",
                        signature=sig,
                        digest=b"\0" * 32,
                        hash="sha256",
                        timestamp=now,
                        nonce=nonce,
                    ),
                )


async def test_eviction_raises_the_floor(mock_clock: Any, tmp_path: Path) -> None:
    with opened(tmp_path / "state", max_nonces=3) as state:
        async with open_harness(state=state) as h:
            c = h.connect(ROOT)
            await c.call("create_key", CreateKeyArgs(key="api", type="ec-p256"))
            now = int(wall())
            sigs = {}
            for i in range(4):  # the 4th evicts the oldest (timestamp now - 10)
                ts, nonce = now - 10 + i, b"nonce-%03d" % i
                sigs[i] = await _sign_replay(c, "api", b"m", ts, nonce)
                assert await _status(c, "api", sigs[i], b"m", ts, nonce) == "valid"
            assert len(state.nonces) == 3
            assert state.nonces.floor("api") == now - 10
            # the evicted nonce can never be accepted again: stale, not valid
            assert await _status(c, "api", sigs[0], b"m", now - 10, b"nonce-000") == "stale"
            # a new nonce at the floor is stale too; above it, fine
            late = await _sign_replay(c, "api", b"m", now - 10, b"new-nonce")
            assert await _status(c, "api", late, b"m", now - 10, b"new-nonce") == "stale"
            fresh = await _sign_replay(c, "api", b"m", now - 9, b"new-nonce")
            assert await _status(c, "api", fresh, b"m", now - 9, b"new-nonce") == "valid"
        # the floor survives a restart (compaction writes it)
    with opened(tmp_path / "state", max_nonces=3) as state:
        floor = state.nonces.floor("api")
        assert floor is not None
        assert floor >= now - 10


async def test_a_nonce_accepted_before_a_restart_is_replayed_after(
    mock_clock: Any, tmp_path: Path
) -> None:
    directory = tmp_path / "state"
    pool = FakePool()
    with opened(directory) as state:
        async with open_harness(pool, state=state) as h:
            c = h.connect(ROOT)
            await c.call("create_key", CreateKeyArgs(key="api", type="ec-p256"))
            now = int(wall())
            sig = await _sign_replay(c, "api", b"pay 10", now, b"restart-nonce")
            assert await _status(c, "api", sig, b"pay 10", now, b"restart-nonce") == "valid"
        # on disk before 'valid' was answered
        assert len(journal(directory)[1]) == 1
    with opened(directory) as state:
        async with open_harness(pool, state=state) as h:
            c = h.connect(ROOT)
            assert await _status(c, "api", sig, b"pay 10", now, b"restart-nonce") == "replayed"


async def test_concurrent_verifies_share_syncs(mock_clock: Any, tmp_path: Path) -> None:
    with opened(tmp_path / "state") as state:
        async with open_harness(state=state) as h:
            c = h.connect(ROOT)
            await c.call("create_key", CreateKeyArgs(key="api", type="ec-p256"))
            now = int(wall())
            requests = []
            for i in range(50):
                nonce = b"group-%04d" % i
                sig = await _sign_replay(c, "api", b"m", now, nonce)
                requests.append(
                    (
                        "verify",
                        VerifyArgs(
                            key="api", signature=sig, message=b"m", timestamp=now, nonce=nonce
                        ),
                    )
                )
            requests.append(requests[0])  # the same request twice in one read
            before = state.syncs
            ids = c.send(requests)
            statuses = [(await c.replies.answer(rid, "verify")).status for rid in ids]
            # the first 49 once each; the request sent twice: once valid, once replayed
            assert statuses[1:50] == ["valid"] * 49
            assert sorted((statuses[0], statuses[50])) == ["replayed", "valid"]
            assert state.syncs - before <= 2  # 50 nonces, one or two fdatasyncs


# ---------------------------------------------------------------- the journal


async def test_a_torn_last_record_is_ignored(mock_clock: Any, tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    now = int(wall())
    whole = mark_record("chain", 41) + nonce_record("api", now, b"12345678")
    torn = mark_record("chain", 99)[:-3]
    (directory / JOURNAL).write_bytes(whole + torn)
    (directory / JOURNAL).chmod(0o600)
    with opened(directory) as state:
        assert state.mark("chain") == 41
        assert state.nonces.check("api", now, b"12345678", now) == "replayed"
    # compacted on open: the torn bytes are gone
    assert torn not in (directory / JOURNAL).read_bytes()
    # zeros a crash left after the last record are a torn tail too
    with open(directory / JOURNAL, "ab") as f:
        f.write(b"\0" * 40)
    with opened(directory) as state:
        assert state.mark("chain") == 41


async def test_damage_before_the_end_refuses_to_start(mock_clock: Any, tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    first = bytearray(mark_record("chain", 41))
    first[-1] ^= 1  # a flipped bit, with a good record after it
    (directory / JOURNAL).write_bytes(bytes(first) + mark_record("chain", 42))
    (directory / JOURNAL).chmod(0o600)
    with pytest.raises(StateError, match="damaged"):
        State.open(str(directory), window=WINDOW, max_nonces=10, now=wall())


async def test_an_untrusted_state_directory_is_refused(mock_clock: Any, tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    directory.chmod(0o777)
    with pytest.raises(StateError, match="writable"):
        State.open(str(directory), window=WINDOW, max_nonces=10, now=wall())
    directory.chmod(0o700)
    os.symlink("/etc/passwd", directory / JOURNAL)
    with pytest.raises(StateError, match="symlink"):
        State.open(str(directory), window=WINDOW, max_nonces=10, now=wall())


# ---------------------------------------------------------------- memory and vectors

#: The documented bound (README, "Replay protection"): bytes per nonce held,
#: with 16-byte nonces and one key; longer nonces add their extra length.
BYTES_PER_NONCE = 260


def test_100k_nonces_stay_within_the_documented_bound() -> None:
    nonces = Nonces(window=WINDOW, max_nonces=100_000)
    now = 1_750_000_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(150_000):  # 50,000 more than it may hold: those are evicted
            nonces.add("api", now - WINDOW + i // 1000, os.urandom(16), now)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(nonces) == 100_000
    per_nonce = used / len(nonces)
    print(f"nonce memory: {used} bytes for {len(nonces)} nonces, {per_nonce:.0f} per nonce")
    assert used <= BYTES_PER_NONCE * 100_000


def test_golden_vectors() -> None:
    doc = json.loads(VECTORS.read_text())
    assert doc["vectors"]
    for v in doc["vectors"]:
        payload = signed_payload(
            bytes.fromhex(v["message"]), v["timestamp"], bytes.fromhex(v["nonce"])
        )
        assert payload.hex() == v["payload"], v["name"]


async def test_verify_runs_in_the_service_for_any_entry(mock_clock: Any, tmp_path: Path) -> None:
    """Many versions: the replay-checked verify goes through the token workers."""
    with opened(tmp_path / "state") as state:
        async with open_harness(state=state) as h:
            c = h.connect(ROOT)
            await c.call("create_key", CreateKeyArgs(key="api", type="ec-p256"))
            for _ in range(5):
                await c.call("rotate", RotateArgs(key="api"))
            await c.call("update_key", UpdateKeyArgs(key="api", verify_grace=0.0))
            now = int(wall())
            sig = await _sign_replay(c, "api", b"m", now, b"many-versions")
            before = h.pool.jobs_done
            assert await _status(c, "api", sig, b"m", now, b"many-versions") == "valid"
            assert h.pool.jobs_done == before + 1  # the worker verified it
            assert await _status(c, "api", sig, b"m", now, b"many-versions") == "replayed"


async def test_the_journal_is_compacted_while_running(
    mock_clock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its size threshold the journal is rewritten from memory; nothing is lost."""
    import signd.state

    monkeypatch.setattr(signd.state, "COMPACT_AT", 2000)
    directory = tmp_path / "state"
    with opened(directory) as state:
        now = int(wall())
        for p in range(1, 200):  # 199 mark records of one key: ~4 kB
            state.claim("chain", p, p)
            await state.commit()
        state.accept_nonce("api", now, b"kept-nonce", now)
        await state.commit()
        size = (directory / JOURNAL).stat().st_size
        assert size < 2000  # rewritten: one mark, one nonce, and what came after
        # appending goes on into the new file
        state.claim("chain", 500, 500)
        await state.commit()
        assert (directory / JOURNAL).stat().st_size > size
    with opened(directory) as state:
        assert state.mark("chain") == 500
        assert state.nonces.check("api", now, b"kept-nonce", now) == "replayed"


def test_one_keys_flood_never_raises_another_keys_floor() -> None:
    """A caller who may sign and replay-verify on one key fills the memory
    with that key's nonces: that key gives up its own oldest (its floor
    rises), and another key's nonces, older than the flood, stay remembered."""
    nonces = Nonces(window=WINDOW, max_nonces=100)
    now = 1_750_000_000
    quiet = [b"quiet-%d" % i for i in range(10)]
    for nonce in quiet:
        nonces.add("quiet", now - 50, nonce, now)
    for i in range(1000):  # newer than every quiet nonce
        nonces.add("noisy", now - 40 + i // 50, os.urandom(16), now)
    assert len(nonces) == 100
    assert nonces.floor("quiet") is None
    assert all(nonces.check("quiet", now - 50, n, now) == REPLAYED for n in quiet)
    assert nonces.check("quiet", now - 50, b"fresh", now) is None
    noisy_floor = nonces.floor("noisy")
    assert noisy_floor is not None
    assert noisy_floor > now - 40
    # A key under its share that adds takes the place of the key holding the most.
    nonces.add("third", now, b"t", now)
    assert len(nonces) == 100
    assert (nonces.floor("third"), nonces.floor("quiet")) == (None, None)
    assert nonces.check("third", now, b"t", now) == REPLAYED
