"""Replay protection in memory: signing watermarks and the nonces of
replay-checked verifies.  Pure logic, no I/O (``signd.state`` makes it durable).

**Watermarks.**  A watermarked key's *mark* is the highest position signd
has signed (or burned) for it; a position at or below it is refused with
``PositionUsed``, naming the mark.

**Nonces.**  A replay-checked ``verify`` names a timestamp and a nonce.  A
nonce is remembered per key until its timestamp leaves the window (``now -
window``).  At most ``max_nonces`` are held (all keys together): when full,
the oldest is evicted and its key's *floor* raised to its timestamp, so a
request at or below the floor is ``stale``: an evicted nonce can never be
accepted again.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Iterator
from typing import Final

from signd_client.replay import REPLAYED, STALE

from ..errors import PositionUsed

__all__ = ["DEFAULT_MAX_NONCES", "DEFAULT_WINDOW", "Marks", "Nonces"]

#: Defaults of ``[replay] window`` (seconds) and ``max_nonces``.
DEFAULT_WINDOW: Final = 300
DEFAULT_MAX_NONCES: Final = 1_000_000


class Marks:
    """Each watermarked key's mark."""

    __slots__ = ("_marks",)

    def __init__(self) -> None:
        self._marks: dict[str, int] = {}

    def get(self, name: str) -> int | None:
        """``name``'s mark; None: it has signed no position yet."""
        return self._marks.get(name)

    def check(self, name: str, first: int) -> None:
        """Raises: PositionUsed (``first`` is at or below the mark of ``name``)."""
        mark = self._marks.get(name)
        if mark is not None and first <= mark:
            raise PositionUsed(
                f"key {name!r}: position {first} is at or below its mark {mark} (the highest "
                f"position signed); sign at {mark + 1} or above"
            )

    def claim(self, name: str, first: int, last: int) -> None:
        """Burn positions ``first`` to ``last`` of ``name``: its mark is ``last`` now.

        Raises: PositionUsed (``first`` is at or below the mark; nothing changed).
        """
        self.check(name, first)
        self._marks[name] = last

    def raise_to(self, name: str, position: int) -> bool:
        """The mark of ``name`` at least ``position``; whether it went up."""
        mark = self._marks.get(name)
        if mark is not None and mark >= position:
            return False
        self._marks[name] = position
        return True

    def items(self) -> Iterator[tuple[str, int]]:
        return iter(list(self._marks.items()))


class Nonces:
    """The nonces accepted within the window, per key, bounded in number."""

    __slots__ = ("_floor", "_heap", "_seen", "max_nonces", "window")

    def __init__(self, window: int = DEFAULT_WINDOW, max_nonces: int = DEFAULT_MAX_NONCES) -> None:
        self.window = window
        self.max_nonces = max_nonces
        #: key -> nonce -> timestamp
        self._seen: dict[str, dict[bytes, int]] = {}
        #: key -> the newest evicted timestamp: at or below it is stale
        self._floor: dict[str, int] = {}
        #: (timestamp, nonce, key) of every nonce held, oldest first
        self._heap: list[tuple[int, bytes, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def floor(self, name: str) -> int | None:
        return self._floor.get(name)

    def check(self, name: str, timestamp: int, nonce: bytes, now: float) -> str | None:
        """``stale``, ``replayed``, or None: ``nonce`` may be accepted (``add`` it)."""
        floor = self._floor.get(name)
        if abs(timestamp - now) > self.window or (floor is not None and timestamp <= floor):
            return STALE
        seen = self._seen.get(name)
        if seen is not None and nonce in seen:
            return REPLAYED
        return None

    def add(self, name: str, timestamp: int, nonce: bytes, now: float) -> None:
        """Remember ``nonce``: forget those out of the window, then evict the
        oldest while over ``max_nonces`` (raising their keys' floors)."""
        self.expire(now)
        name = sys.intern(name)  # one string per key, shared by its nonces
        seen = self._seen.get(name)
        if seen is None:
            seen = self._seen[name] = {}
        if nonce in seen:
            return
        seen[nonce] = timestamp
        heapq.heappush(self._heap, (timestamp, nonce, name))
        while len(self._heap) > self.max_nonces:
            ts, old, key = heapq.heappop(self._heap)
            self._forget(key, old)
            if self._floor.get(key, -1) < ts:
                self._floor[key] = ts

    def raise_floor(self, name: str, floor: int) -> None:
        if self._floor.get(name, -1) < floor:
            self._floor[name] = floor

    def expire(self, now: float) -> None:
        """Forget the nonces whose timestamp left the window: any request
        with them is stale now (no floor needed)."""
        heap = self._heap
        oldest = now - self.window
        while heap and heap[0][0] < oldest:
            _, nonce, key = heapq.heappop(heap)
            self._forget(key, nonce)

    def _forget(self, key: str, nonce: bytes) -> None:
        seen = self._seen[key]
        del seen[nonce]
        if not seen:
            del self._seen[key]

    def floors(self) -> Iterator[tuple[str, int]]:
        return iter(list(self._floor.items()))

    def held(self) -> list[tuple[int, bytes, str]]:
        """Every nonce held: (timestamp, nonce, key) (a copy)."""
        return list(self._heap)
