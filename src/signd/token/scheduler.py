"""Which signature goes to which worker, and when: the pool's queue.

Pure bookkeeping, no process and no I/O: the pool's supervisor gives it the
list of worker slots (``Lane``) it keeps up to date, and the scheduler hands
batches to them.  Signatures are *queued* here, never sent one by one:

* ``enqueue(source, entries)`` appends to the queue of ``source`` (a
  connection) and returns at once; a full pool answers ``busy``.  ``pump``
  then hands out what workers have room for.
* Whenever a worker has room (fewer than ``depth`` batches in hand), a batch of
  up to ``batch_max`` signatures is taken **round-robin** over the sources with
  queued work, ``quantum`` at a time, so a connection that floods cannot
  starve the others; and it goes to the worker in one frame.
* **Bulk workers** (the lanes from ``bulk_from`` on) take only bulk entries
  (``Entry.bulk``: the items of a ``sign_batch``), unless no other worker is
  up.  Per-request traffic is bounded by the daemon's own loop, and a second
  worker on the same cores only takes CPU from it; a ``sign_batch`` costs the
  loop little per item, so there a second worker adds throughput.
* A worker answers a whole batch in one frame (``completed``); every entry's
  callback then runs in trio.  No thread, task or event per signature.

An entry still queued at its deadline is answered ``deadline_exceeded`` and
never reaches the token.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from ..errors import Busy, DeadlineExceeded, InvalidArgument, TokenUnavailable, WireError
from ..metrics import Metrics
from .ipc import Outcome, SignJob, VerifyJob, encode_jobs, error_from_ipc

__all__ = ["ADMISSION_JOBS", "Callback", "Entry", "Lane", "Scheduler", "SchedulerSettings"]

log = logging.getLogger("signd.workers")

#: Jobs the token must have done before the pool refuses work its queue
#: cannot finish in time (one early sample is not a speed).
ADMISSION_JOBS: Final = 32

Callback = Callable[[bool, Any], None]  # (True, signature) or (False, WireError)


@dataclass(slots=True)
class Entry:
    """One job waiting for a worker; ``callback`` gets its outcome."""

    job: SignJob | VerifyJob
    callback: Callback
    deadline: float = math.inf
    #: an item of a bulk request (``sign_batch``): a bulk worker may take it
    bulk: bool = False


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    queue_limit: int = 65536
    batch_max: int = 64
    depth: int = 2
    quantum: int = 4
    #: lanes from this index on are bulk workers; None: there are none
    bulk_from: int | None = None


class Lane(Protocol):
    """A signing worker as the scheduler sees it."""

    @property
    def alive(self) -> bool: ...
    @property
    def retiring(self) -> bool: ...

    batches: int

    def hand(self, tag: int, pending: Any, frame: bytes) -> None:
        """Send ``frame``; ``pending`` is what its answer (by ``tag``) is for."""


class Scheduler:
    """The queue of signatures and verifications in front of the workers.

    ``lanes`` is the supervisor's own list of signing workers (a slot is None
    until its worker first logs in); ``unavailable`` makes the error to
    answer while none is up; ``clock`` is the clock entries' deadlines are on.
    """

    def __init__(
        self,
        settings: SchedulerSettings,
        metrics: Metrics,
        lanes: Sequence[Lane | None],
        unavailable: Callable[[], TokenUnavailable],
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self._lanes = lanes
        self._unavailable = unavailable
        self._clock = clock
        self._queues: dict[object, deque[Entry]] = {}
        self._ready: deque[object] = deque()
        self._queued = 0
        #: bulk entries among the queued ones
        self._bulk_queued = 0
        self._inflight = 0
        #: seconds of token time per job: a low estimate, which falls at once
        #: to a faster batch and rises by 10% a batch, so one slow batch (a
        #: pause, a busy machine) never makes the pool refuse work
        self._per_job = 0.0
        #: jobs measured so far; the estimate is used from ADMISSION_JOBS on
        self._measured = 0
        self._tags = 0
        #: signing workers up (the supervisor says when: ``lane_up``, ``lane_down``)
        self.alive = 0
        #: batches handed to workers, and the signatures in them
        self.batches_sent = 0
        self.entries_sent = 0

    def new_tag(self) -> int:
        """A tag no message in any worker's hands has (shared with the pool's calls)."""
        self._tags += 1
        return self._tags

    @property
    def pending(self) -> int:
        """Signatures queued or in a worker's hands."""
        return self._queued + self._inflight

    def lane_up(self) -> None:
        """A signing worker logged in and takes work (call ``pump`` next)."""
        self.alive += 1

    def lane_down(self) -> None:
        """A signing worker stopped (call ``pump`` next: with none left, it
        answers what is queued)."""
        self.alive -= 1

    def enqueue(self, source: object, entries: Sequence[Entry]) -> None:
        """Queue ``entries`` (one request's: all bulk, or none) for
        ``source``; call ``pump`` once after enqueuing.

        Callbacks run later, in trio.  All of ``entries`` are queued, or none.

        Raises:
            Busy: the pool already holds ``queue_limit`` signatures.
            InvalidArgument: ``entries`` alone exceed ``queue_limit``.
            TokenUnavailable: no worker is up.
        """
        alive = self.alive
        if not alive:
            raise self._unavailable()
        s = self.settings
        n = len(entries)
        if n > s.queue_limit:
            raise InvalidArgument(
                f"{n} signatures in one request exceed the token queue of "
                f"{s.queue_limit} (limits.token_queue)"
            )
        if self.pending + n > s.queue_limit:
            raise Busy(f"the token queue is full ({self.pending} signatures waiting)")
        if self._measured >= ADMISSION_JOBS and n:
            # A slow device (a YubiHSM signs ~10/s) must not collect requests
            # it cannot finish in time: each would wait out its deadline, and
            # the queue would grow with work nobody waits for any more.
            wait = (self.pending + n) * self._per_job / alive
            left = min(e.deadline for e in entries) - self._clock()
            if wait > left:
                raise Busy(
                    f"the token is saturated: about {wait:.2f} s of work is queued, more "
                    f"than the {max(0.0, left):.2f} s this request may wait; retry later"
                )
        q = self._queues.get(source)
        if q is None:
            q = self._queues[source] = deque()
            self._ready.append(source)
        q.extend(entries)
        self._queued += n
        if n and entries[0].bulk:  # one request's entries: all bulk, or none
            self._bulk_queued += n

    def drop(self, source: object, error: WireError) -> int:
        """Answer ``error`` to every entry ``source`` still has queued (not
        those a worker holds already), so a closed connection's work never
        reaches the token and its memory goes at once; the number dropped."""
        q = self._queues.pop(source, None)
        if q is None:
            return 0
        with contextlib.suppress(ValueError):
            self._ready.remove(source)
        self._queued -= len(q)
        self._bulk_queued -= sum(1 for e in q if e.bulk)
        for e in q:
            e.callback(False, error)
        return len(q)

    def _take(self, bulk_only: bool = False) -> list[Entry]:
        """Up to ``batch_max`` entries, ``quantum`` per source, round-robin;
        ``bulk_only``: bulk entries only (a source whose next entry is not
        bulk keeps its turn)."""
        s = self.settings
        batch: list[Entry] = []
        ready, queues = self._ready, self._queues
        passed: list[object] = []
        while ready and len(batch) < s.batch_max:
            source = ready.popleft()
            q = queues[source]
            for _ in range(min(s.quantum, s.batch_max - len(batch), len(q))):
                if bulk_only and not q[0].bulk:
                    break
                batch.append(q.popleft())
            if not q:
                del queues[source]
            elif bulk_only and not q[0].bulk:
                passed.append(source)
            else:
                ready.append(source)
        if passed:
            ready.extendleft(reversed(passed))
        self._queued -= len(batch)
        if self._bulk_queued:
            self._bulk_queued -= sum(1 for e in batch if e.bulk)
        return batch

    def pump(self) -> None:
        """Hand batches to every worker that has room, while work is queued;
        with no worker up, answer everything queued ``token_unavailable``."""
        depth = self.settings.depth
        bulk_from = self.settings.bulk_from
        bulk_heads = True  # False once a bulk-only take found nothing
        while self._ready:
            worker: Lane | None = None
            bulk_only = False
            others_up = False
            for i, w in enumerate(self._lanes):
                if w is None or not w.alive or w.retiring:
                    continue
                bulk_lane = bulk_from is not None and i >= bulk_from
                if not bulk_lane:
                    others_up = True
                elif others_up and not (self._bulk_queued and bulk_heads):
                    continue  # a bulk worker, and no bulk work for it
                if w.batches < depth and (worker is None or w.batches < worker.batches):
                    worker, bulk_only = w, bulk_lane and others_up
            if worker is None:
                if not self.alive:
                    self.fail_queued(self._unavailable())
                return
            now = self._clock()
            batch = []
            taken = self._take(bulk_only)
            if bulk_only and not taken:
                bulk_heads = False  # bulk work is queued, behind other work
                continue
            for e in taken:
                if e.deadline < now:
                    e.callback(False, DeadlineExceeded("the request waited too long for the token"))
                else:
                    batch.append(e)
            if not batch:
                continue
            tag = self.new_tag()
            worker.batches += 1
            self.batches_sent += 1
            self.entries_sent += len(batch)
            self._inflight += len(batch)
            worker.hand(tag, batch, encode_jobs(tag, [e.job for e in batch]))

    def fail_queued(self, error: WireError) -> None:
        """Answer ``error`` to everything queued."""
        while self._ready:
            for e in self._take():
                e.callback(False, error)

    def completed(self, batch: list[Entry], seconds: float, outcomes: list[Outcome]) -> None:
        """A worker answered ``batch``: the token took ``seconds``."""
        self._inflight -= len(batch)
        per_job = seconds / len(batch)
        self._per_job = per_job if not self._measured else min(per_job, 1.1 * self._per_job)
        self._measured += len(batch)
        self._metrics.token_batch(len(batch), seconds)
        for entry, outcome in zip(batch, outcomes, strict=True):
            try:
                if outcome[0]:
                    entry.callback(True, outcome[1])
                else:
                    entry.callback(False, error_from_ipc(outcome[1], outcome[2]))
            except Exception:
                log.exception("a signature could not be delivered")

    def abandoned(self, batch: list[Entry], error: WireError) -> None:
        """The worker holding ``batch`` stopped: answer ``error`` to all of it."""
        self._inflight -= len(batch)
        for entry in batch:
            entry.callback(False, error)
