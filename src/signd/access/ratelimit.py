"""Token buckets per peer (uid) and per key.

Each bucket holds up to ``burst`` tokens and refills at ``rate`` per second; a
request takes as many tokens as signatures it asks for (a ``sign_batch`` of
100 takes 100).  A request that finds too few is refused with
``rate_limited`` and told when enough will be there.  A request that costs
more than a whole bucket could never be served, so it is refused with
``invalid_argument`` naming the limit (a retryable error would be retried
forever); it takes nothing from any bucket.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from ..errors import InvalidArgument, RateLimited

__all__ = ["Bucket", "RateLimiter"]

K = TypeVar("K", int, str)


@dataclass(slots=True)
class Bucket:
    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, cost: float, now: float) -> float:
        """Take ``cost`` tokens; 0.0 if taken, else the seconds until they are there."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


class RateLimiter:
    def __init__(
        self,
        per_principal: tuple[float, float] | None,
        per_key: tuple[float, float] | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        refused: Mapping[str, int] | None = None,
    ) -> None:
        """``per_*`` is (rate per second, burst), or None for no limit;
        ``refused``: the counts of the limiter this one replaces (a reload),
        which carry on (they are metrics)."""
        self.per_principal = per_principal
        self.per_key = per_key
        self._clock = clock
        self._principals: dict[int, Bucket] = {}
        self._keys: dict[str, Bucket] = {}
        #: requests refused, by the limit that refused them ("principal" or "key")
        self.refused = {"principal": 0, "key": 0, **(refused or {})}

    @staticmethod
    def _bucket(table: dict[K, Bucket], who: K, limit: tuple[float, float], now: float) -> Bucket:
        b = table.get(who)
        if b is None:
            rate, burst = limit
            b = table[who] = Bucket(rate, burst, burst, now)
        return b

    def charge(self, uid: int, cost: int) -> None:
        """Take ``cost`` tokens from ``uid``'s bucket only (work not for a key
        that exists, such as looking a name up on the token).

        Raises:
            RateLimited: too few tokens now, with ``retry_after``.
        """
        if self.per_principal is None:
            return
        now = self._clock()
        wait = self._bucket(self._principals, uid, self.per_principal, now).take(cost, now)
        if wait:
            self.refused["principal"] += 1
            raise RateLimited(
                f"uid {uid} is over its rate limit; retry after {wait:.3f} s", round(wait, 3)
            )

    def check(self, uid: int, key: str, cost: int) -> None:
        """Take ``cost`` tokens from ``uid``'s bucket and from ``key``'s.

        Raises:
            InvalidArgument: ``cost`` exceeds a bucket's burst (it never fits).
            RateLimited: too few tokens now, with ``retry_after``.
        """
        for limit, scope, setting in (
            (self.per_principal, f"uid {uid}", "per_principal_burst"),
            (self.per_key, f"key {key!r}", "per_key_burst"),
        ):
            if limit is not None and cost > limit[1]:
                raise InvalidArgument(
                    f"a request of {cost} signatures exceeds the rate-limit burst of "
                    f"{limit[1]:g} for {scope} (rate_limits.{setting}); "
                    f"send at most {int(limit[1])} per request"
                )
        now = self._clock()
        if self.per_principal is not None:
            b = self._bucket(self._principals, uid, self.per_principal, now)
            wait = b.take(cost, now)
            if wait:
                self.refused["principal"] += 1
                raise RateLimited(
                    f"uid {uid} is over its rate limit; retry after {wait:.3f} s", round(wait, 3)
                )
        if self.per_key is not None:
            b = self._bucket(self._keys, key, self.per_key, now)
            wait = b.take(cost, now)
            if wait:
                if self.per_principal is not None:  # give back what the peer was charged
                    self._principals[uid].tokens += cost
                self.refused["key"] += 1
                raise RateLimited(
                    f"key {key!r} is over its rate limit; retry after {wait:.3f} s",
                    round(wait, 3),
                )
