"""The pool's liveness watch: a token that went away, a worker that hangs,
a worker whose memory grew.

Every ``probe_interval`` each idle signing worker asks the token for its
info (``Probe``); a worker that finds it gone says so (and the pool reacts as
to any loss).  A signing worker that holds work without answering for
``stall_timeout`` (``CALL_STALL`` for a call such as reading the keys) is
taken for hung on the token: it is killed (signing workers never write, so
that is safe), and the token is treated as lost.  The writer is exempt:
generating a large RSA key may take seconds, and killing it mid-write could
damage SoftHSM's files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

import trio

from .ipc import Probe, encode_request
from .process import WorkerProcess, rss

if TYPE_CHECKING:
    from .settings import PoolSettings

__all__ = ["CALL_STALL", "PROBE", "RECYCLE_WARMUP", "Watch"]

log = logging.getLogger("signd.workers")

#: Signatures a worker answers before its RSS is taken as its baseline.
RECYCLE_WARMUP: Final = 10_000
#: Seconds a signing worker may take over a call (reading keys, not signing)
#: before it is taken for hung.
CALL_STALL: Final = 60.0
#: what a worker's ``waiting`` holds for a probe
PROBE: Final = "probe"


class Watch:
    """Watches the signing workers in ``workers`` (the pool's own list).

    ``new_tag`` gives a probe its tag; ``token_lost`` is what a hung worker
    means.
    """

    def __init__(
        self,
        settings: PoolSettings,
        workers: Sequence[WorkerProcess | None],
        new_tag: Callable[[], int],
        token_lost: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self._workers = workers
        self._new_tag = new_tag
        self._token_lost = token_lost

    async def run(self, scope: trio.CancelScope) -> None:
        """Watch until ``scope`` is cancelled."""
        with scope:
            await self._loop()

    async def _loop(self) -> None:
        s = self.settings
        tick = min(s.probe_interval, s.stall_timeout / 4)
        next_probe = time.monotonic() + s.probe_interval
        while True:
            await trio.sleep(tick)
            now = time.monotonic()
            probe = now >= next_probe
            if probe:
                next_probe = now + s.probe_interval
            for w in self._workers:
                if w is None or not w.alive or w.retiring:
                    continue
                if probe and s.recycle_mb > 0:
                    self._check_growth(w)
                if not w.waiting:
                    if probe:
                        tag = self._new_tag()
                        w.hand(tag, PROBE, encode_request(tag, Probe()))
                elif now - w.progress_at > self._patience(w):
                    log.error(
                        "token worker stalled; killing it",
                        extra={"worker": w.index, "seconds": round(now - w.progress_at, 1)},
                    )
                    self._token_lost(f"a token call gave no answer for {s.stall_timeout} s")
                    w.process.kill()

    def _check_growth(self, w: WorkerProcess) -> None:
        """Ask a signing worker to hand over once its RSS grew ``recycle_mb``."""
        if w.signed < RECYCLE_WARMUP or w.recycle.is_set():
            return
        size = rss(w.process.pid)
        if size is None:
            return
        if w.rss_base is None:
            w.rss_base = size
        elif size - w.rss_base > self.settings.recycle_mb * 1e6:
            log.info(
                "token worker recycled: its memory grew",
                extra={
                    "worker": w.index,
                    "rss_mb": round(size / 1e6, 1),
                    "grew_mb": round((size - w.rss_base) / 1e6, 1),
                    "signatures": w.signed,
                },
            )
            w.recycle.set()

    def _patience(self, worker: WorkerProcess) -> float:
        """How long ``worker`` may go without answering: signatures and probes
        are quick, but reading every key of a large token is not."""
        if any(isinstance(p, tuple) for p in worker.waiting.values()):
            return max(CALL_STALL, self.settings.stall_timeout)
        return self.settings.stall_timeout
