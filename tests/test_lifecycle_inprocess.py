"""The key lifecycle, in process: ``Service.run_lifecycle`` on trio's mock clock.

Automatic rotation on schedule, grace windows ending, pruning with
``max_versions``, and the sync with records other daemons write to the same
token (here: written straight into the FakePool).  Hours pass in
milliseconds, and every time is exact.  The real token and two real daemons
are tested in test_key_lifecycle.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fakes import T0, FakePool, open_harness, principal, wall
from signd.errors import Conflict, VersionNotUsable
from signd.keys.store import DESTROYED, DISABLED, KeySettings
from signd.protocol import (
    CreateKeyArgs,
    DestroyArgs,
    Empty,
    KeyInfo,
    KeyRefArgs,
    RotateArgs,
    SignArgs,
    UpdateKeyArgs,
    VerifyArgs,
    VersionRefArgs,
)

ROOT = principal(0, user="root")
HOUR = 3600.0


def states(info: KeyInfo) -> list[str]:
    return [v.state for v in info.versions]


async def test_rotation_on_schedule(autojump_clock: Any) -> None:
    async with open_harness(lifecycle=True, sync_interval=600.0) as h:
        c = h.connect(ROOT)
        args = CreateKeyArgs(key="k", type="ec-p256", auto_rotate_period=HOUR)
        created = (await c.call("create_key", args)).versions[0].created
        info = await c.call("key_info", KeyRefArgs(key="k"))
        assert info.next_rotation == created + HOUR
        await trio.sleep_until(created - T0 + HOUR - 0.01)
        assert h.pool.record("k").latest.version == 1
        await trio.sleep(0.02)
        record = h.pool.record("k")
        assert record.latest.version == 2
        assert record.latest.created == pytest.approx(created + HOUR, abs=1e-3)
        assert h.service.metrics.rotations == {("k", "scheduled"): 1}
        info = await c.call("key_info", KeyRefArgs(key="k"))
        assert states(info) == ["verify-only", "active"]  # verify_grace 0: no limit
        assert info.next_rotation == pytest.approx(created + 2 * HOUR, abs=1e-3)
        assert (await c.call("sign", SignArgs(key="k", message=b"x"))).version == 2
        # And again a period after that rotation, not before.
        await trio.sleep_until(created - T0 + 2 * HOUR - 0.01)
        assert h.pool.record("k").latest.version == 2
        await trio.sleep(0.02)
        assert h.pool.record("k").latest.version == 3


async def test_the_daemons_floor_applies_to_a_period_another_daemon_set(
    autojump_clock: Any,
) -> None:
    pool = FakePool()
    pool.add_key("k", settings=KeySettings(auto_rotate_period=HOUR))  # made at T0
    async with open_harness(pool, lifecycle=True, min_rotate_period=2 * HOUR, sync_interval=600):
        await trio.sleep(2 * HOUR - 1)
        assert pool.record("k").latest.version == 1
        await trio.sleep(2)
        assert pool.record("k").latest.version == 2


async def test_a_daemon_that_missed_periods_rotates_once(autojump_clock: Any) -> None:
    pool = FakePool()
    pool.add_key("k", created=T0 - 10 * HOUR, settings=KeySettings(auto_rotate_period=HOUR))
    async with open_harness(pool, lifecycle=True, sync_interval=600) as h:
        await trio.sleep(60)
        record = pool.record("k")
        assert record.latest.version == 2
        assert record.latest.created == pytest.approx(T0, abs=1e-3)
        assert h.service.metrics.rotations == {("k", "scheduled"): 1}


async def test_grace_ends_then_the_version_retires_and_is_pruned(autojump_clock: Any) -> None:
    async with open_harness(lifecycle=True, sync_interval=5.0) as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="g", type="ec-p256", verify_grace=100.0))
        old = (await c.call("sign", SignArgs(key="g", message=b"m"))).signature
        rotated = await c.call("rotate", RotateArgs(key="g"))
        ends = rotated.versions[1].created + 100.0
        assert rotated.versions[0].verify_until == pytest.approx(ends)
        verify = VerifyArgs(key="g", signature=old, message=b"m")
        await trio.sleep_until(ends - T0 - 0.01)
        assert (await c.call("verify", verify)).version == 1
        with pytest.raises(VersionNotUsable, match="verify-only"):
            await c.call("sign", SignArgs(key="g", message=b"m", version=1))
        await trio.sleep(0.02)
        assert (await c.call("verify", verify)).valid is False
        assert states(await c.call("key_info", KeyRefArgs(key="g"))) == ["retired", "active"]
        # Deletion is not allowed: retired, never pruned.
        await trio.sleep(60)
        assert h.pool.has_private("g", 1)
        await c.call("update_key", UpdateKeyArgs(key="g", deletion_allowed=True))
        await trio.sleep(5.01)  # within sync_interval
        assert states(await c.call("key_info", KeyRefArgs(key="g"))) == ["destroyed", "active"]
        assert not h.pool.has_private("g", 1)
        assert h.pool.has_private("g", 2)


async def test_max_versions_prunes_in_the_rotation_that_needs_the_room(
    autojump_clock: Any,
) -> None:
    async with open_harness(lifecycle=True, sync_interval=10_000.0) as h:
        c = h.connect(ROOT)
        args = CreateKeyArgs(
            key="m",
            type="ec-p256",
            auto_rotate_period=100.0,
            verify_grace=10.0,
            deletion_allowed=True,
            max_versions=2,
        )
        await c.call("create_key", args)
        await trio.sleep(50.0)  # between two rotations
        for _ in range(10):
            await trio.sleep(100.0)
            assert h.pool.record("m").live <= 2
        record = h.pool.record("m")
        assert record.latest.version == 11
        live = [v.version for v in record.versions if v.state != DESTROYED]
        assert live == [10, 11]
        assert [h.pool.has_private("m", n) for n in range(1, 12)] == [False] * 9 + [True] * 2
        assert h.service.metrics.rotations[("m", "scheduled")] == 10


async def test_a_full_key_without_deletion_waits_for_a_change(autojump_clock: Any) -> None:
    async with open_harness(lifecycle=True, sync_interval=50.0) as h:
        c = h.connect(ROOT)
        args = CreateKeyArgs(key="f", type="ec-p256", auto_rotate_period=100.0, max_versions=2)
        await c.call("create_key", args)
        await trio.sleep(150.0)
        assert h.pool.record("f").latest.version == 2
        await trio.sleep(1000.0)  # due since t=200, refused, and not tried again
        assert h.pool.record("f").latest.version == 2
        assert h.pool.count("generate") == 2
        refused = [
            k for k in h.service.metrics.errors if k[1:] == ("deletion_not_allowed", "rotate")
        ]
        assert refused
        # The record changes: the rotation is tried again, and now fits.
        await c.call("update_key", UpdateKeyArgs(key="f", max_versions=3))
        await trio.sleep(1.0)
        assert h.pool.record("f").latest.version == 3


async def test_a_destroyed_key_does_not_rotate_and_disabled_versions_are_never_pruned(
    autojump_clock: Any,
) -> None:
    async with open_harness(lifecycle=True, sync_interval=5.0) as h:
        c = h.connect(ROOT)
        gone = CreateKeyArgs(
            key="gone", type="ec-p256", auto_rotate_period=100, deletion_allowed=True
        )
        await c.call("create_key", gone)
        await c.call("destroy", DestroyArgs(key="gone", all=True))
        kept = CreateKeyArgs(key="kept", type="ec-p256", verify_grace=10.0, deletion_allowed=True)
        await c.call("create_key", kept)
        await c.call("rotate", RotateArgs(key="kept"))
        await c.call("disable", VersionRefArgs(key="kept", version=1))
        await trio.sleep(1000.0)
        assert h.pool.record("gone").latest.version == 1
        assert (await c.call("key_info", KeyRefArgs(key="gone"))).next_rotation is None
        assert states(await c.call("key_info", KeyRefArgs(key="kept"))) == ["disabled", "active"]
        assert h.pool.has_private("kept", 1)


async def test_a_disabled_newest_version_does_not_stop_the_schedule(autojump_clock: Any) -> None:
    """What the code does today (PROTOCOL.md: the daemon rotates "exactly as
    rotate does"): a scheduled rotation makes a new active version; the
    disabled one stays disabled."""
    async with open_harness(lifecycle=True, sync_interval=600.0) as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="d", type="ec-p256", auto_rotate_period=100))
        await c.call("disable", VersionRefArgs(key="d", version=1))
        await trio.sleep(101.0)
        assert states(await c.call("key_info", KeyRefArgs(key="d"))) == ["disabled", "active"]


async def test_sync_picks_up_what_another_daemon_wrote(autojump_clock: Any) -> None:
    async with open_harness(lifecycle=True, sync_interval=5.0) as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="s", type="ec-p256"))
        await trio.sleep(1.0)
        # Another daemon disables version 1 and makes a key of its own.
        h.pool.write_record(h.pool.record("s").with_state([1], DISABLED))
        h.pool.add_key("elsewhere", created=wall())
        # Until the next sync this daemon serves what it has cached.
        assert (await c.call("sign", SignArgs(key="s", message=b"x"))).version == 1
        assert [k.name for k in (await c.call("list_keys", Empty())).keys] == ["s"]
        await trio.sleep(4.1)  # the sync at t=5 s (the lifecycle started at 0)
        with pytest.raises(VersionNotUsable, match="disabled"):
            await c.call("sign", SignArgs(key="s", message=b"x"))
        assert [k.name for k in (await c.call("list_keys", Empty())).keys] == ["elsewhere", "s"]
        signature = (await c.call("sign", SignArgs(key="elsewhere", message=b"m"))).signature
        theirs = h.pool.private_key("elsewhere", 1)
        assert isinstance(theirs, ec.EllipticCurvePrivateKey)
        theirs.public_key().verify(signature, b"m", ec.ECDSA(hashes.SHA256()))
        # Another daemon turns on automatic rotation: this one schedules it.
        record = h.pool.record("s")
        settings = KeySettings(auto_rotate_period=100.0)
        h.pool.write_record(record.with_settings(settings))
        await trio.sleep(5.0)
        assert h.pool.record("s").latest.version == 1
        await trio.sleep_until(record.latest.created - T0 + 100.01)
        assert h.pool.record("s").latest.version == 2


async def test_a_rotation_that_loses_a_race_leaves_no_keypair_and_is_tried_again(
    autojump_clock: Any,
) -> None:
    async with open_harness(lifecycle=True, sync_interval=5.0) as h:
        c = h.connect(ROOT)
        args = CreateKeyArgs(key="r", type="ec-p256", auto_rotate_period=100)
        await c.call("create_key", args)
        h.pool.fail_next["write_metadata"] = Conflict("another daemon wrote revision 2")
        await trio.sleep(100.5)
        # The first try lost: its keypair, which no record names, was deleted
        # again; the next pass (at once: the rotation is still due) made it.
        assert h.pool.calls.count(("write_metadata", "r")) == 3
        assert h.pool.count("generate") == 3
        assert h.pool.record("r").latest.version == 2
        assert len(h.pool.pairs) == 2
        assert h.service.metrics.rotations == {("r", "scheduled"): 1}


async def test_a_pass_while_the_token_is_away_is_tried_again(autojump_clock: Any) -> None:
    async with open_harness(lifecycle=True, sync_interval=5.0) as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="t", type="ec-p256", auto_rotate_period=100))
        await trio.sleep(90.0)
        h.pool.lose()
        await trio.sleep(30.0)
        assert h.pool.record("t").latest.version == 1
        h.pool.restore()
        await trio.sleep(10.1)  # a failed pass waits sync_interval, then the next one
        assert h.pool.record("t").latest.version == 2


async def test_two_daemons_rotating_one_key_make_each_version_once(autojump_clock: Any) -> None:
    pool = FakePool()
    async with (
        open_harness(pool, lifecycle=True, sync_interval=5.0) as one,
        open_harness(pool, lifecycle=True, sync_interval=5.0) as two,
    ):
        args = CreateKeyArgs(key="both", type="ec-p256", auto_rotate_period=100)
        await one.connect(ROOT).call("create_key", args)
        await trio.sleep(1000.5)  # both are due at the same moments
        record = pool.record("both")
        assert record.latest.version == 11
        assert len(pool.pairs) == 11  # the loser of each race deleted its keypair
        assert pool.count("generate") > 11  # they did race (and each race had one winner)
        rotations = one.service.metrics.rotations.get(("both", "scheduled"), 0)
        rotations += two.service.metrics.rotations.get(("both", "scheduled"), 0)
        assert rotations == 10
        await trio.sleep(5.0)
        for h in (one, two):
            info = await h.connect(ROOT).call("key_info", KeyRefArgs(key="both"))
            assert info.current_version == 11
