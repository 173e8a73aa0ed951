"""Rate limits, in process: token buckets per peer and per key, on trio's mock clock.

The limiter's clock is trio's, so "wait as told" is a jump of the mock clock,
not a sleep.  The real daemon's limits (and the client's waiting) are tested
in test_rate_limits.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio

from fakes import Conn, Harness, open_harness, principal
from signd.access.policy import OPERATIONS, Policy, Rule
from signd.access.ratelimit import RateLimiter
from signd.errors import InvalidArgument, KeyNotFound, RateLimited, WireError
from signd.protocol import (
    CreateKeyArgs,
    KeyRefArgs,
    RotateArgs,
    SignArgs,
    SignBatchArgs,
    VerifyArgs,
)

ALICE = principal(70001, user="alice")
BOB = principal(70002, user="bob")
ROOT = principal(0, user="root")


#: alice and bob may do anything with any key: only the limits refuse them
POLICY = Policy(
    [Rule(keys=("*",), operations=frozenset(OPERATIONS), uids=frozenset({70001, 70002}))]
)


def limiter(
    per_principal: tuple[float, float] | None = None, per_key: tuple[float, float] | None = None
) -> RateLimiter:
    return RateLimiter(per_principal, per_key, clock=trio.current_time)


async def _keys(h: Harness, *names: str) -> None:
    root = h.connect(ROOT)
    for name in names:
        await root.call("create_key", CreateKeyArgs(key=name, type="ed25519"))


async def _outcomes(c: Conn, requests: Sequence[tuple[str, Any]]) -> list[Any]:
    """Send ``requests`` in one read; each answer, or the error it got."""
    out: list[Any] = []
    for rid, (op, _) in zip(c.send(requests), requests, strict=True):
        try:
            out.append(await c.replies.answer(rid, op))
        except WireError as exc:
            out.append(exc)
    return out


def _signs(key: str, n: int) -> list[tuple[str, Any]]:
    return [("sign", SignArgs(key=key, message=b"%d" % i)) for i in range(n)]


async def test_per_peer_bucket(autojump_clock: Any) -> None:
    async with open_harness(policy=POLICY, limiter=limiter(per_principal=(5, 5))) as h:
        await _keys(h, "k", "k2")  # create_key is not limited (root made them: 2 requests)
        alice = h.connect(ALICE)
        answers = await _outcomes(alice, _signs("k", 10))
        limited = [a for a in answers if isinstance(a, RateLimited)]
        assert len(limited) == 5
        assert all(not isinstance(a, WireError) for a in answers[:5])
        for err in limited:
            assert err.retryable
            assert err.retry_after is not None
            assert 0 < err.retry_after <= 0.2 + 1e-9  # one token at 5/s
        # Another peer has a bucket of its own, on the same key.
        bob = h.connect(BOB)
        assert not any(isinstance(a, WireError) for a in await _outcomes(bob, _signs("k", 5)))
        # The bucket is per peer, not per key: another key does not help alice.
        with pytest.raises(RateLimited, match="uid 70001"):
            await alice.call("sign", SignArgs(key="k2", message=b"x"))
        # Verifications cost one too.
        with pytest.raises(RateLimited):
            await alice.call("verify", VerifyArgs(key="k", signature=b"s" * 64, message=b"x"))
        # Waiting as told is enough, and not a moment less is needed.
        await trio.sleep(max(e.retry_after or 0.0 for e in limited))
        assert (await alice.call("sign", SignArgs(key="k", message=b"later"))).version == 1
        # Admin and read operations are not limited.
        await alice.call("key_info", KeyRefArgs(key="k"))
        await h.connect(ROOT).call("rotate", RotateArgs(key="k"))


async def test_refill_rate(autojump_clock: Any) -> None:
    async with open_harness(policy=POLICY, limiter=limiter(per_principal=(2, 4))) as h:
        await _keys(h, "k")
        alice = h.connect(ALICE)
        assert (
            len([a for a in await _outcomes(alice, _signs("k", 4)) if isinstance(a, WireError)])
            == 0
        )
        await trio.sleep(1.0)  # two tokens back at 2/s, not more
        answers = await _outcomes(alice, _signs("k", 3))
        assert [isinstance(a, RateLimited) for a in answers] == [False, False, True]
        assert answers[2].retry_after == pytest.approx(0.5)


async def test_per_key_bucket_leaves_other_keys_alone(autojump_clock: Any) -> None:
    async with open_harness(policy=POLICY, limiter=limiter(per_key=(3, 3))) as h:
        await _keys(h, "hot", "cold")
        alice, bob = h.connect(ALICE), h.connect(BOB)
        answers = await _outcomes(alice, _signs("hot", 3))
        assert not any(isinstance(a, WireError) for a in answers)
        # The key's bucket is shared by every peer.
        with pytest.raises(RateLimited, match="key 'hot'"):
            await bob.call("sign", SignArgs(key="hot", message=b"x"))
        assert not any(isinstance(a, WireError) for a in await _outcomes(bob, _signs("cold", 3)))


async def test_a_batch_costs_its_items_and_a_refusal_costs_nothing(autojump_clock: Any) -> None:
    async with open_harness(policy=POLICY, limiter=limiter(per_principal=(1, 10))) as h:
        await _keys(h, "k")
        alice = h.connect(ALICE)
        six = SignBatchArgs(key="k", messages=tuple(b"%d" % i for i in range(6)))
        assert len((await alice.call("sign_batch", six)).results) == 6
        with pytest.raises(RateLimited) as refused:
            await alice.call("sign_batch", six)  # 4 left: refused whole
        assert refused.value.retry_after == pytest.approx(2.0)
        # The refusal took nothing: the 4 tokens left are all still there.
        four = SignBatchArgs(key="k", messages=tuple(b"%d" % i for i in range(4)))
        assert len((await alice.call("sign_batch", four)).results) == 4
        with pytest.raises(RateLimited):
            await alice.call("sign", SignArgs(key="k", message=b"x"))


async def test_a_batch_larger_than_the_burst_is_refused_naming_the_limit(
    autojump_clock: Any,
) -> None:
    async with open_harness(
        policy=POLICY, limiter=limiter(per_principal=(100, 5), per_key=(100, 8))
    ) as h:
        await _keys(h, "k")
        alice = h.connect(ALICE)
        six = SignBatchArgs(key="k", messages=tuple(b"%d" % i for i in range(6)))
        with pytest.raises(InvalidArgument, match=r"burst of 5 .*per_principal_burst"):
            await alice.call("sign_batch", six)
        # Nothing was taken: a whole burst still goes through at once.
        five = SignBatchArgs(key="k", messages=tuple(b"%d" % i for i in range(5)))
        assert len((await alice.call("sign_batch", five)).results) == 5
    async with open_harness(policy=POLICY, limiter=limiter(per_key=(100, 3))) as h:
        await _keys(h, "k")
        four = SignBatchArgs(key="k", messages=tuple(b"%d" % i for i in range(4)))
        with pytest.raises(InvalidArgument, match="per_key_burst"):
            await h.connect(ALICE).call("sign_batch", four)


async def test_a_refusal_by_the_key_gives_back_the_peers_tokens(autojump_clock: Any) -> None:
    async with open_harness(
        policy=POLICY, limiter=limiter(per_principal=(1, 5), per_key=(1, 3))
    ) as h:
        await _keys(h, "a", "b")
        alice = h.connect(ALICE)
        answers = await _outcomes(alice, _signs("a", 4))
        assert [isinstance(a, RateLimited) for a in answers] == [False, False, False, True]
        assert "key 'a'" in answers[3].message
        # alice paid for 3 signatures, not 4: 2 of her 5 are left, for another key.
        answers = await _outcomes(alice, _signs("b", 3))
        assert [isinstance(a, RateLimited) for a in answers] == [False, False, True]
        assert "uid 70001" in answers[2].message


async def test_looking_up_an_unknown_name_costs_a_token(autojump_clock: Any) -> None:
    async with open_harness(policy=POLICY, limiter=limiter(per_principal=(1, 2))) as h:
        await _keys(h, "k")
        alice = h.connect(ALICE)
        for name in ("absent-1", "absent-2"):
            with pytest.raises(KeyNotFound):
                await alice.call("sign", SignArgs(key=name, message=b"x"))
        with pytest.raises(RateLimited):
            await alice.call("sign", SignArgs(key="k", message=b"x"))
