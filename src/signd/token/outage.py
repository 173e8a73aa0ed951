"""Whether the token is there, and what the log says while it is not.

The pool tells an ``Outage`` what happens (the token was lost, a worker
failed to start, one logged in again); the outage keeps the state (``down``,
since when, how often), says it in the log without flooding it while the
token stays away, and makes the error requests get meanwhile.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Final

import trio

from ..errors import TokenUnavailable

__all__ = ["OUTAGE_LOG_EVERY", "Outage"]

log = logging.getLogger("signd.workers")

#: While the token is away, a failed attempt to log in again is logged this often.
OUTAGE_LOG_EVERY: Final = 30.0


class Outage:
    """The token's presence, as the pool has seen it; ``clock`` is monotonic."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        #: the token was lost and has not been found again
        self.down = False
        self.down_since = 0.0
        self.losses = 0
        #: set when the token is found again
        self.back = trio.Event()
        #: when a failed start was last logged, by worker index
        self._failure_logged: dict[int, float] = {}

    def unavailable(self) -> TokenUnavailable:
        """The error for a request while no worker is up."""
        if self.down:
            return TokenUnavailable(
                f"the token is unavailable (lost {self._clock() - self.down_since:.1f} s ago; "
                "signd is reconnecting); retry"
            )
        return TokenUnavailable("no token worker is running; retry")

    def lost(self, reason: str) -> bool:
        """The token is gone (or hung); False if that was known already."""
        if self.down:
            return False
        self.down = True
        self.down_since = self._clock()
        self.losses += 1
        self.back = trio.Event()
        self._failure_logged = {0: self.down_since}
        log.error(
            "token lost; requests fail token_unavailable until it is back", extra={"reason": reason}
        )
        return True

    def found(self, index: int) -> None:
        """Worker ``index`` logged in again (after a loss, or a crash of its own)."""
        if self.down:
            self.down = False
            self.back.set()
            log.warning(
                "token back; serving again",
                extra={"after_seconds": round(self._clock() - self.down_since, 2)},
            )
        else:
            log.info("token worker replaced", extra={"worker": index})

    def start_failed(self, index: int, error: str) -> None:
        """Worker ``index`` could not be started again: logged once every
        ``OUTAGE_LOG_EVERY`` seconds, not at every attempt."""
        now = self._clock()
        if now - self._failure_logged.get(index, -math.inf) < OUTAGE_LOG_EVERY:
            return
        self._failure_logged[index] = now
        if self.down:
            log.warning(
                "token still unavailable",
                extra={"for_seconds": round(now - self.down_since, 1), "error": error},
            )
        else:
            log.error("token worker failed to start", extra={"worker": index, "error": error})
