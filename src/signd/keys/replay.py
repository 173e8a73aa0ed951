"""Replay protection in memory: signing watermarks and the nonces of
replay-checked verifies.  Pure logic, no I/O (``signd.state`` makes it durable).

**Watermarks.**  A watermarked key's *mark* is the highest position signd
has signed (or burned) for it; a position at or below it is refused with
``PositionUsed``, naming the mark.

**Nonces.**  A replay-checked ``verify`` names a timestamp and a nonce.  A
nonce is remembered per key until its timestamp leaves the window (``now -
window``).  At most ``max_nonces`` are held (all keys together): when full,
a nonce is evicted, the oldest of the key adding if it holds at least an equal
share, else of the key holding the most, and that key's *floor* is raised to
its timestamp, so a request at or below the floor is ``stale``: an evicted
nonce can never be accepted again, and one key's flood never raises another
key's floor.
"""

from __future__ import annotations

import heapq
import math
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
    """The nonces accepted within the window, per key, bounded in number.

    When full, the key that gives up its oldest nonce is the one adding, if
    it holds at least an equal share of the memory, else the key holding the
    most: a caller who floods one key's nonces raises that key's floor only,
    never another key's.
    """

    __slots__ = ("_count", "_floor", "_heaps", "_next_expiry", "_seen", "max_nonces", "window")

    def __init__(self, window: int = DEFAULT_WINDOW, max_nonces: int = DEFAULT_MAX_NONCES) -> None:
        self.window = window
        self.max_nonces = max_nonces
        #: key -> nonce -> timestamp
        self._seen: dict[str, dict[bytes, int]] = {}
        #: key -> (timestamp, nonce) of each of its nonces, oldest first
        self._heaps: dict[str, list[tuple[int, bytes]]] = {}
        #: key -> the newest evicted timestamp: at or below it is stale
        self._floor: dict[str, int] = {}
        self._count = 0
        #: no nonce held is older than this (``expire`` has nothing to do before)
        self._next_expiry: float = math.inf

    def __len__(self) -> int:
        return self._count

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
        """Remember ``nonce``: forget those out of the window, then, while over
        ``max_nonces``, evict (see the class) and raise that key's floor."""
        self.expire(now)
        name = sys.intern(name)  # one string per key, shared by its nonces
        seen = self._seen.get(name)
        if seen is None:
            seen = self._seen[name] = {}
            self._heaps[name] = []
        if nonce in seen:
            return
        seen[nonce] = timestamp
        heapq.heappush(self._heaps[name], (timestamp, nonce))
        self._count += 1
        if timestamp < self._next_expiry:
            self._next_expiry = timestamp
        while self._count > self.max_nonces:
            self._evict(name)

    def _evict(self, adding: str) -> None:
        seen = self._seen
        victim = adding
        if adding not in seen or len(seen[adding]) * len(seen) < self._count:
            victim = max(seen, key=lambda k: len(seen[k]))
        ts, old = heapq.heappop(self._heaps[victim])
        self._forget(victim, old)
        if self._floor.get(victim, -1) < ts:
            self._floor[victim] = ts

    def raise_floor(self, name: str, floor: int) -> None:
        if self._floor.get(name, -1) < floor:
            self._floor[name] = floor

    def expire(self, now: float) -> None:
        """Forget the nonces whose timestamp left the window: any request
        with them is stale now (no floor needed)."""
        oldest = now - self.window
        if self._next_expiry >= oldest:
            return
        after = math.inf
        for key, heap in list(self._heaps.items()):
            while heap and heap[0][0] < oldest:
                _, nonce = heapq.heappop(heap)
                self._forget(key, nonce)
            if heap and heap[0][0] < after:
                after = heap[0][0]
        self._next_expiry = after

    def _forget(self, key: str, nonce: bytes) -> None:
        seen = self._seen[key]
        del seen[nonce]
        self._count -= 1
        if not seen:
            del self._seen[key]
            del self._heaps[key]

    def floors(self) -> Iterator[tuple[str, int]]:
        return iter(list(self._floor.items()))

    def held(self) -> list[tuple[int, bytes, str]]:
        """Every nonce held: (timestamp, nonce, key) (a copy)."""
        return [(ts, nonce, key) for key, heap in self._heaps.items() for ts, nonce in heap]
