"""Names this process has not loaded, in process: looked up on the token together.

A request for a key the service has not cached is answered after a token
search, and the searches of many such requests coalesce: one at a time, each
looking for every name asked for while the previous one ran.  The token here
is slow (mock time), so the requests really do arrive during a search.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from fakes import FakePool, Harness, open_harness, principal
from signd.access.policy import OPERATIONS, Policy, Rule
from signd.errors import (
    Busy,
    DeadlineExceeded,
    InvalidArgument,
    KeyNotFound,
    PermissionDenied,
    WireError,
)
from signd.protocol import KeyRefArgs, SignArgs
from signd.service.core import MAX_LOOKUP_NAMES_PER_UID

ROOT = principal(0, user="root")
ALICE = principal(70001, user="alice")
BOB = principal(70002, user="bob")
POLICY = Policy([Rule(keys=("*",), operations=frozenset(OPERATIONS), uids=frozenset({70001}))])


def searches(h: Harness) -> int:
    return h.pool.count("load_metadata")


async def test_many_unknown_names_cost_two_searches(autojump_clock: Any) -> None:
    pool = FakePool(latency=0.5)
    async with open_harness(pool) as h:
        made = [f"made-{i}" for i in range(10)]
        for name in made:  # by another daemon, after this one loaded
            pool.add_key(name)
        absent = [f"absent-{i}" for i in range(20)]
        before, lookups = searches(h), h.service.metrics.key_lookups
        conns = [h.connect(ROOT) for _ in range(3)]
        sent = []
        for i, name in enumerate(made + absent):
            c = conns[i % 3]
            (rid,) = c.send([("sign", SignArgs(key=name, message=b"m"))])
            sent.append((c, rid, name))
        for c, rid, name in sent:
            if name in made:
                assert (await c.replies.answer(rid, "sign")).key == name
            else:
                with pytest.raises(KeyNotFound, match=name):
                    await c.replies.answer(rid, "sign")
        # One name alone (a search by label: the first task to run), then
        # every other one in one listing.
        first, listing = pool.args_of("load_metadata")[-2:]
        assert first in made + absent
        assert listing is None
        assert searches(h) - before == 2
        assert h.service.metrics.key_lookups - lookups == 2
        # Found ones are cached now: no search at all.
        await conns[0].call("key_info", KeyRefArgs(key="made-5"))
        assert searches(h) - before == 2


async def test_a_key_another_daemon_made_is_found_on_the_first_request(
    autojump_clock: Any,
) -> None:
    async with open_harness() as h:
        h.pool.add_key("new", "ed25519")
        c = h.connect(ROOT)
        assert (await c.call("sign", SignArgs(key="new", message=b"m"))).key == "new"
        assert h.pool.args_of("load_metadata")[-1] == "new"


async def test_a_uid_may_have_a_bounded_number_of_names_waiting(autojump_clock: Any) -> None:
    policy = Policy(
        [Rule(keys=("*",), operations=frozenset(OPERATIONS), uids=frozenset({70001, 70002}))]
    )
    async with open_harness(FakePool(latency=1.0), policy=policy) as h:
        alice, bob = h.connect(ALICE), h.connect(BOB)
        n = MAX_LOOKUP_NAMES_PER_UID + 8
        mine = alice.send([("key_info", KeyRefArgs(key=f"a-{i}")) for i in range(n)])
        theirs = bob.send([("key_info", KeyRefArgs(key=f"b-{i}")) for i in range(5)])
        outcomes: list[type[WireError]] = []
        for rid in mine:
            with pytest.raises(WireError) as err:
                await alice.replies.answer(rid, "key_info")
            outcomes.append(type(err.value))
        assert outcomes.count(Busy) == 8
        assert outcomes.count(KeyNotFound) == MAX_LOOKUP_NAMES_PER_UID
        for rid in theirs:  # another uid is not held up by alice's
            with pytest.raises(KeyNotFound):
                await bob.replies.answer(rid, "key_info")
        # Once answered, the names no longer count: alice may ask again.
        with pytest.raises(KeyNotFound):
            await alice.call("key_info", KeyRefArgs(key="a-again"))


async def test_a_search_outlives_a_request_that_gave_up(autojump_clock: Any) -> None:
    pool = FakePool(latency=40.0)
    async with open_harness(pool, request_timeout=30.0) as h:
        pool.add_key("slow")
        c = h.connect(ROOT)
        with pytest.raises(DeadlineExceeded, match="look-up timed out"):
            await c.call("sign", SignArgs(key="slow", message=b"m"))
        await trio.sleep(15.0)  # the search (shielded) finishes at t=40
        before = searches(h)
        pool.latency = 0.0
        assert (await c.call("sign", SignArgs(key="slow", message=b"m"))).key == "slow"
        assert searches(h) == before  # it was cached by the search that went on


async def test_no_search_for_a_name_the_peer_may_not_use_or_that_is_invalid(
    autojump_clock: Any,
) -> None:
    policy = Policy(
        [Rule(keys=("mine-*",), operations=frozenset(OPERATIONS), uids=frozenset({70001}))]
    )
    async with open_harness(policy=policy) as h:
        alice = h.connect(ALICE)
        before = searches(h)
        with pytest.raises(PermissionDenied):
            await alice.call("sign", SignArgs(key="theirs", message=b"m"))
        with pytest.raises(InvalidArgument, match="invalid key name"):
            await h.connect(ROOT).call("sign", SignArgs(key="-bad", message=b"m"))
        assert searches(h) == before
        with pytest.raises(KeyNotFound):
            await alice.call("sign", SignArgs(key="mine-1", message=b"m"))
        assert searches(h) == before + 1
