"""The daemon's side of the token workers: processes, scheduling, hand-overs.

``open_token_pool`` starts ``workers`` processes (``python -m signd.token``),
each logged in to the token on its own, and supervises them: a worker that
dies is replaced, with back-off, and what it had in hand is answered
``token_unavailable``.

Signatures are *queued* here, never sent one by one:

* ``enqueue(source, entries)`` appends to the queue of ``source`` (a
  connection) and returns at once; a full pool answers ``busy``.  ``pump``
  then hands out what workers have room for.
* Whenever a worker has room (fewer than ``depth`` batches in hand), a batch of
  up to ``batch_max`` signatures is taken **round-robin** over the sources with
  queued work, ``quantum`` at a time, so a connection that floods cannot
  starve the others; and it goes to the worker in one frame.
* A worker answers a whole batch in one frame; every entry's callback then
  runs in trio.  No thread, task or event per signature.

An entry still queued at its deadline is answered ``deadline_exceeded`` and
never reaches the token.

**Writes go to a process of their own.**  SoftHSM's file store rescans the
token when its generation counter has moved; a process that writes moves the
counter for itself, and then misses what *other* processes wrote before, until
the token changes again (measured: it would go on signing with a version
another daemon disabled).  So the signing workers never write after their
login: they see every change on their next search, and they make every read a
decision rests on.  Every write (a key generated, a record stored, keys
destroyed) goes to one more worker, the *writer*, which never signs.

The writer is started with the others, not per write, because a login is a
write too: SoftHSM rewrites ``token.object`` in place at every ``C_Login``
(measured), and a ``kill -9`` in the middle of that leaves it empty, and the
token unusable.  Logins therefore happen only at start (or to replace a worker
that died), never as part of a key change.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import trio

from ..errors import (
    Busy,
    Conflict,
    DeadlineExceeded,
    ErrorCode,
    InvalidArgument,
    TokenUnavailable,
    WireError,
    error_from_wire,
)
from ..metrics import Metrics
from ..protocol import HEADER, FrameDecoder
from ..server.outbox import Outbox
from .session import IPC_MAX_FRAME, MetadataBlob, SignJob, TokenInfo, VerifyJob

__all__ = ["Entry", "PoolSettings", "TokenPool", "open_token_pool"]

log = logging.getLogger("signd.workers")

#: Back-off between attempts to replace a dead worker (or to find a lost
#: token again): capped at 1 s, so a token that is back serves within ~1.5 s.
RESPAWN_BACKOFF: Final = (0.05, 0.1, 0.2, 0.5, 1.0)
#: A login that takes longer than this is taken for a hung token.
LOGIN_TIMEOUT: Final = 30.0
#: Jobs the token must have done before the pool refuses work its queue
#: cannot finish in time (one early sample is not a speed).
ADMISSION_JOBS: Final = 32
#: Signatures a worker answers before its RSS is taken as its baseline.
RECYCLE_WARMUP: Final = 10_000
#: Waits for a signing worker to see a record the writer just stored.
SEEN_WRITE_BACKOFF: Final = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
#: After a record write looked unopposed, seconds before it is checked again for
#: one another process wrote at the same moment (key records change rarely).
SAME_WRITE_RECHECK: Final = 0.05
#: Seconds a signing worker may take over a call (reading keys, not signing)
#: before it is taken for hung.
CALL_STALL: Final = 60.0
#: While the token is away, a failed attempt to log in again is logged this often.
OUTAGE_LOG_EVERY: Final = 30.0

Callback = Callable[[bool, Any], None]  # (True, signature) or (False, WireError)


@dataclass(slots=True)
class Entry:
    """One job waiting for a worker; ``callback`` gets its outcome."""

    job: SignJob | VerifyJob
    callback: Callback
    deadline: float = math.inf


@dataclass(frozen=True, slots=True)
class PoolSettings:
    module: str
    token_label: str
    pin: str
    workers: int = 1
    queue_limit: int = 65536
    batch_max: int = 64
    depth: int = 2
    quantum: int = 4
    #: seconds a worker polls for the next batch before it sleeps
    spin: float = 0.0
    log_level: str = "info"
    #: seconds between ``C_GetTokenInfo`` probes by idle workers
    probe_interval: float = 1.0
    #: seconds a signing worker may hold work without answering (then: hung)
    stall_timeout: float = 5.0
    #: MB a signing worker's RSS may grow (past its warm-up) before a fresh
    #: process takes over from it; 0: never
    recycle_mb: float = 0.0
    #: the token profile's name (see ``profiles.py``)
    profile: str = "softhsm"


@dataclass(eq=False)
class _Worker:
    index: int
    process: trio.Process
    stream: trio.SocketStream
    outbox: Outbox
    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(IPC_MAX_FRAME))
    #: tag -> entries of a sign batch, or the (event, box) of a call
    waiting: dict[int, Any] = field(default_factory=dict)
    batches: int = 0
    alive: bool = True
    #: when it last answered, or was handed work while it had none
    progress_at: float = 0.0
    #: cancels its reader and writer tasks (set while it serves)
    scope: trio.CancelScope | None = None
    #: signatures it answered, and its RSS once it had answered ``RECYCLE_WARMUP``
    signed: int = 0
    rss_base: int | None = None
    #: set when it should hand over to a fresh process (see ``_recycle``)
    recycle: trio.Event = field(default_factory=trio.Event)
    #: it hands over to a fresh process: it gets no more work
    retiring: bool = False
    #: set when it holds nothing more (only while it hands over)
    drained: trio.Event | None = None

    def hand(self, tag: int, pending: Any, frame: bytes) -> None:
        if not self.waiting:
            self.progress_at = time.monotonic()
        self.waiting[tag] = pending
        self.outbox.write(frame)


def _rss(pid: int) -> int | None:
    """Resident set size of process ``pid`` in bytes (None: it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
#: what a worker's ``waiting`` holds for a probe
_PROBE: Final = "probe"


def _frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def _error(code: int, message: str) -> WireError:
    try:
        name = ErrorCode(code).name.lower()
    except ValueError:
        name = "unknown"
    return error_from_wire(code, name, message)


class TokenPool:
    """Token workers behind one queue.  Create it with ``open_token_pool``."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.info: TokenInfo | None = None
        self._workers: list[_Worker | None] = [None] * settings.workers
        #: the worker that makes every write to the token (index ``settings.workers``)
        self._writer: _Worker | None = None
        #: where batch sizes and token times are counted (set by the daemon)
        self.metrics: Metrics | None = None
        self._queues: dict[object, deque[Entry]] = {}
        self._ready: deque[object] = deque()
        self._queued = 0
        self._inflight = 0
        #: seconds of token time per job: a low estimate, which falls at once
        #: to a faster batch and rises by 10% a batch, so one slow batch (a
        #: pause, a busy machine) never makes the pool refuse work
        self._per_job = 0.0
        #: jobs measured so far; the estimate is used from ADMISSION_JOBS on
        self._measured = 0
        self._tags = 0
        self._closing = False
        #: workers logged in and serving
        self.alive_workers = 0
        self.respawns = 0
        #: signing workers replaced by a fresh process because their RSS grew
        self.recycles = 0
        #: the token was lost and has not been found again
        self.down = False
        self.down_since = 0.0
        self.losses = 0
        self._back = trio.Event()  # set when the token is found again
        #: when a failed start was last logged, by worker index
        self._failure_logged: dict[int, float] = {}
        #: batches handed to workers, and the signatures in them
        self.batches_sent = 0
        self.entries_sent = 0

    # ------------------------------------------------------------ state

    @property
    def pending(self) -> int:
        """Signatures queued or in a worker's hands."""
        return self._queued + self._inflight

    @property
    def is_open(self) -> bool:
        return self.info is not None and self.alive_workers > 0

    # ------------------------------------------------------------ hot path

    def enqueue(self, source: object, entries: Sequence[Entry]) -> None:
        """Queue ``entries`` for ``source``; call ``pump`` once after enqueuing.

        Callbacks run later, in trio.  All of ``entries`` are queued, or none.

        Raises:
            Busy: the pool already holds ``queue_limit`` signatures.
            InvalidArgument: ``entries`` alone exceed ``queue_limit``.
            TokenUnavailable: no worker is up.
        """
        if not self.is_open:
            raise self._unavailable()
        n = len(entries)
        if n > self.settings.queue_limit:
            raise InvalidArgument(
                f"{n} signatures in one request exceed the token queue of "
                f"{self.settings.queue_limit} (limits.token_queue)"
            )
        if self.pending + n > self.settings.queue_limit:
            raise Busy(f"the token queue is full ({self.pending} signatures waiting)")
        if self._measured >= ADMISSION_JOBS and n:
            # A slow device (a YubiHSM signs ~10/s) must not collect requests
            # it cannot finish in time: each would wait out its deadline, and
            # the queue would grow with work nobody waits for any more.
            wait = (self.pending + n) * self._per_job / max(1, self.alive_workers)
            left = min(e.deadline for e in entries) - time.monotonic()
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
        for e in q:
            e.callback(False, error)
        return len(q)

    def _take(self) -> list[Entry]:
        """Up to ``batch_max`` entries, ``quantum`` per source, round-robin."""
        s = self.settings
        batch: list[Entry] = []
        ready, queues = self._ready, self._queues
        while ready and len(batch) < s.batch_max:
            source = ready.popleft()
            q = queues[source]
            for _ in range(min(s.quantum, s.batch_max - len(batch), len(q))):
                batch.append(q.popleft())
            if q:
                ready.append(source)
            else:
                del queues[source]
        self._queued -= len(batch)
        return batch

    def pump(self) -> None:
        """Hand batches to every worker that has room, while work is queued."""
        depth = self.settings.depth
        while self._ready:
            worker = None
            for w in self._workers:
                if w is not None and w.alive and w.batches < depth and not w.retiring:
                    if worker is None or w.batches < worker.batches:
                        worker = w
            if worker is None:
                if self.alive_workers == 0:
                    self._fail_queued(self._unavailable())
                return
            now = time.monotonic()
            batch = []
            for e in self._take():
                if e.deadline < now:
                    e.callback(False, DeadlineExceeded("the request waited too long for the token"))
                else:
                    batch.append(e)
            if not batch:
                continue
            self._tags += 1
            worker.batches += 1
            self.batches_sent += 1
            self.entries_sent += len(batch)
            self._inflight += len(batch)
            worker.hand(
                self._tags, batch, _frame([self._tags, "jobs", [[e.job.to_ipc() for e in batch]]])
            )

    def _unavailable(self) -> TokenUnavailable:
        if self.down:
            return TokenUnavailable(
                f"the token is unavailable (lost {time.monotonic() - self.down_since:.1f} s ago; "
                "signd is reconnecting); retry"
            )
        return TokenUnavailable("no token worker is running; retry")

    def _fail_queued(self, error: WireError) -> None:
        while self._ready:
            for e in self._take():
                e.callback(False, error)

    # ------------------------------------------------------------ rare operations

    async def load_metadata(self, name: str | None = None) -> list[MetadataBlob]:
        rows = await self._call("load_metadata", [name])
        return [MetadataBlob(n, r, v) for n, r, v in rows]

    async def write_metadata(self, name: str, revision: int, value: bytes) -> None:
        """Store revision ``revision`` of a key's record, then drop older ones.

        A compare-and-swap, as far as PKCS#11 allows: the newest revision on
        the token must be ``revision - 1`` (the one the change was made on),
        and if a writer in another process got the same revision in at the
        same moment, ours is taken back.  Both checks are made by a signing
        worker, which never writes and so sees what other processes wrote.

        Raises: Conflict (nothing was changed), TokenUnavailable, TokenError.
        """
        revisions = await self._revisions(name, revision - 1)
        newest = max(revisions, default=0)
        if newest != revision - 1:
            raise Conflict(
                f"key {name!r} was changed by another process (its record is at revision "
                f"{newest}, this change was made on {revision - 1}); nothing was changed"
            )
        await self._on_writer("create_metadata", [name, revision, value])
        revisions = await self._revisions(name, revision)
        if revisions.count(revision) == 1 and max(revisions) == revision:
            # Looked again a moment later: another process's record of the
            # same revision may become visible to this one only after ours
            # did (SoftHSM's lag between processes, longer under load), and
            # then both would keep theirs.  Seen now, both drop theirs.
            await trio.sleep(SAME_WRITE_RECHECK)
            revisions = await self._call("revisions", [name])
        if revisions.count(revision) != 1 or max(revisions) != revision:
            await self._on_writer("drop_created", [])
            raise Conflict(
                f"key {name!r} was changed by another process at the same moment; "
                "nothing was changed"
            )
        await self._on_writer("drop_older", [name, revision])

    async def _revisions(self, name: str, expected: int) -> list[int]:
        """The revisions of a key's record, as a signing worker sees them.

        SoftHSM lets another process see a new object only once the token's
        generation counter has moved, which can lag the write a little
        (measured: about 1 rotation in 200 looked like a conflict).  So
        while the newest revision seen is below ``expected`` (the one just
        written), it is asked again, briefly; a newer one is a real conflict.
        """
        revisions: list[int] = []
        for wait in (0.0, *SEEN_WRITE_BACKOFF):
            await trio.sleep(wait)
            revisions = await self._call("revisions", [name])
            if max(revisions, default=0) >= expected:
                break
        return revisions

    async def public_keys(self, object_ids: Sequence[bytes]) -> dict[bytes, tuple[bytes, bool]]:
        """(SPKI DER, whether its private key exists) by object id."""
        rows = await self._call("public_keys", [list(object_ids)])
        return {oid: (spki, has_private) for oid, spki, has_private in rows}

    async def destroy_keys(self, object_id: bytes, *, public: bool = False) -> int:
        """Delete a private key on the token, and its public key if ``public``;
        returns how many objects were deleted."""
        result = await self._on_writer("destroy_keys", [object_id, public])
        assert isinstance(result, int)
        return result

    async def generate(self, key_type: str, object_id: bytes, label: str) -> bytes:
        result = await self._on_writer("generate", [key_type, object_id, label])
        assert isinstance(result, bytes)
        return result

    async def _on_writer(self, op: str, args: list[Any]) -> Any:
        writer = self._writer
        if writer is None or not writer.alive:
            raise (
                self._unavailable()
                if self.down
                else TokenUnavailable("the token writer is not running; retry")
            )
        return await self._call_on(writer, op, args)

    async def _call(self, op: str, args: list[Any]) -> Any:
        alive = [w for w in self._workers if w is not None and w.alive]
        # One handing over still answers, if it is the only one.
        worker = next((w for w in alive if not w.retiring), alive[0] if alive else None)
        if worker is None:
            raise self._unavailable()
        return await self._call_on(worker, op, args)

    async def _call_on(self, worker: _Worker, op: str, args: list[Any]) -> Any:
        self._tags += 1
        done = trio.Event()
        box: list[Any] = []
        worker.hand(self._tags, (done, box), _frame([self._tags, op, args]))
        await done.wait()
        ok, value = box
        if not ok:
            raise value
        return value

    # ------------------------------------------------------------ workers

    async def _spawn(self, index: int) -> _Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The role, "sign" or "write", is for people reading ``ps`` (and the tests).
            role = "write" if index == self.settings.workers else "sign"
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "signd.token", str(child.fileno()), role],
                pass_fds=(child.fileno(),),
            )
        finally:
            child.close()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent))
        return _Worker(index, process, stream, Outbox(stream))

    async def _supervise(self, index: int, task_status: trio.TaskStatus[TokenInfo]) -> None:
        """Keep worker ``index`` running: start, log in, serve, replace if it dies.

        The first login's failure is raised (the daemon cannot start); later
        ones are logged and retried with back-off.
        """
        started = False
        failures = 0
        delay = 0.0
        successor: list[_Worker] = []  # a fresh worker taking over (``_recycle``)
        while not self._closing:
            if successor:  # it took over from the worker that just stopped
                self.pump()
                await self._serve_worker(successor.pop(), index, successor)
                continue
            if started and self.down and index != 0:
                # While the token is away only worker 0 looks for it: a
                # process start per attempt is not free.
                await self._back.wait()
                if self._closing:
                    return
                delay = 0.0
            worker = await self._spawn(index)
            try:
                # The back-off runs while the new process starts up (Python
                # and its imports take longer than the login itself).
                await trio.sleep(delay)
                with trio.fail_after(LOGIN_TIMEOUT):
                    info = await self._login(worker)
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    await self._reap(worker)
                if not isinstance(exc, WireError | trio.TooSlowError):
                    raise
                if not started:
                    if isinstance(exc, trio.TooSlowError):
                        raise TokenUnavailable(
                            f"the token did not answer the login within {LOGIN_TIMEOUT:.0f} s"
                        ) from None
                    raise
                self._login_failed(index, exc)
            else:
                if self._closing:  # it logged in while the pool was closing
                    with trio.CancelScope(shield=True):
                        await self._reap(worker)
                    return
                if index == self.settings.workers:
                    self._writer = worker
                else:
                    self._workers[index] = worker
                    self.alive_workers += 1
                failures = 0
                if not started:
                    started = True
                    task_status.started(info)
                else:
                    self.respawns += 1
                    self._found(index)
                    self.pump()
                await self._serve_worker(worker, index, successor)
                if successor:
                    continue
            delay = RESPAWN_BACKOFF[min(failures, len(RESPAWN_BACKOFF) - 1)]
            failures += 1

    async def _serve_worker(self, worker: _Worker, index: int, successor: list[_Worker]) -> None:
        """Run ``worker`` until it stops; a successor it handed over to is
        appended to ``successor``."""
        try:
            async with trio.open_nursery() as nursery:
                worker.scope = nursery.cancel_scope
                nursery.start_soon(self._write, worker)
                nursery.start_soon(self._read, worker, nursery.cancel_scope)
                if index < self.settings.workers:
                    nursery.start_soon(self._recycle, worker, index, successor)
        finally:
            with trio.CancelScope(shield=True):
                await self._reap(worker)

    async def _recycle(self, old: _Worker, index: int, successor: list[_Worker]) -> None:
        """When asked (``old.recycle``), start a fresh process for worker
        ``index``, log it in while ``old`` goes on signing, then swap them:
        ``old`` gets no more work, answers what it holds, and stops.  No gap,
        even with one signing worker.

        Why: SoftHSM 2.6.1 leaks about 66 bytes per Ed25519 signature
        (fixed upstream, not in Debian 12), so a long-lived worker grows
        without bound; see ``PoolSettings.recycle_mb``.
        """
        await old.recycle.wait()
        new = await self._spawn(index)  # (reaped by the supervisor once it serves)
        try:
            with trio.fail_after(LOGIN_TIMEOUT):
                await self._login(new)
        except (WireError, trio.TooSlowError) as exc:
            with trio.CancelScope(shield=True):
                await self._reap(new)
            log.warning("token worker not recycled", extra={"worker": index, "error": str(exc)})
            return  # the old one goes on; it is not asked again
        old.retiring = True  # no more work for it (queued work waits: briefly)
        with trio.move_on_after(max(CALL_STALL, self.settings.stall_timeout)):
            if old.waiting:
                old.drained = trio.Event()
                await old.drained.wait()
        if self._closing or not old.alive or self._workers[index] is not old:
            with trio.CancelScope(shield=True):
                await self._reap(new)
            return
        self._workers[index] = new  # before ``old`` stops, so it never counts as lost
        self.recycles += 1
        successor.append(new)
        assert old.scope is not None
        old.scope.cancel()

    def _login_failed(self, index: int, exc: BaseException) -> None:
        """A worker could not be started again.  With no signing worker left,
        that is a lost token (whatever killed the last one): from then on
        only one worker tries, and the log says so every ``OUTAGE_LOG_EVERY``
        seconds rather than at every attempt."""
        error = str(exc) or f"no answer within {LOGIN_TIMEOUT:.0f} s"
        if not self.down and self.alive_workers == 0 and index < self.settings.workers:
            self.token_lost(error)
            return
        now = time.monotonic()
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

    def _found(self, index: int) -> None:
        """A worker logged in again (after a loss, or a crash of its own)."""
        if self.down:
            self.down = False
            self._back.set()
            log.warning(
                "token back; serving again",
                extra={"after_seconds": round(time.monotonic() - self.down_since, 2)},
            )
        else:
            log.info("token worker replaced", extra={"worker": index})

    def token_lost(self, reason: str) -> None:
        """The token is gone (or hung): answer everything in the workers' hands
        ``token_unavailable``, stop them all, and look for the token again.

        Every worker goes, not only the one that noticed: their sessions are
        dead too, and a module instance that lost its token may not recover
        in the same process (p11-kit's client does not).  Until a worker logs
        in again, requests fail at once, and readiness is false.
        """
        if self.down or self._closing:
            return
        self.down = True
        self.down_since = time.monotonic()
        self.losses += 1
        self._back = trio.Event()
        self._failure_logged = {0: self.down_since}
        log.error(
            "token lost; requests fail token_unavailable until it is back", extra={"reason": reason}
        )
        for w in [*self._workers, self._writer]:
            if w is not None:
                self._lost(w)
                if w.scope is not None:
                    w.scope.cancel()

    async def _login(self, worker: _Worker) -> TokenInfo:
        """The ``open`` handshake, before the worker takes any other work.

        Raises:
            TokenUnavailable: the module, the token or the login failed.
        """
        s = self.settings
        await worker.stream.send_all(
            _frame(
                [
                    0,
                    "open",
                    [s.module, s.token_label, s.pin, s.log_level, s.spin, s.profile],
                ]
            )
        )
        while True:
            for body in worker.decoder.frames():
                msg = msgpack.unpackb(body, raw=False)
                if not msg[1]:
                    raise _error(msg[2], msg[3])
                return TokenInfo(*msg[2])
            try:
                data = await worker.stream.receive_some(1 << 16)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                raise TokenUnavailable("the token worker exited while logging in")
            worker.decoder.receive_data(data)

    async def _reap(self, worker: _Worker) -> None:
        await worker.stream.aclose()
        with trio.move_on_after(5):
            await worker.process.wait()
            return
        log.error("token worker did not exit; killing it", extra={"worker": worker.index})
        worker.process.kill()
        await worker.process.wait()

    async def _write(self, worker: _Worker) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await worker.outbox.run()  # the reader sees the end too

    async def _read(self, worker: _Worker, scope: trio.CancelScope) -> None:
        # Into one buffer: ``receive_some(n)`` allocates n bytes a call and
        # shrinks them, which fragments the heap (see token._receive).
        buf = memoryview(bytearray(1 << 16))
        sock = worker.stream.socket
        try:
            while True:
                data = buf[: await sock.recv_into(buf)]
                if not data:
                    return
                worker.progress_at = time.monotonic()
                worker.decoder.receive_data(data)
                for body in worker.decoder.frames():
                    if not worker.alive:
                        return
                    self._deliver(worker, msgpack.unpackb(body, raw=False))
                self.pump()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._lost(worker)
            scope.cancel()

    async def _close(self) -> None:
        """Stop every worker: they exit when their socket closes."""
        self._closing = True
        self._back.set()
        log.info(
            "token workers stopping",
            extra={"batches": self.batches_sent, "signatures": self.entries_sent},
        )
        for w in [*self._workers, self._writer]:
            if w is not None:
                await w.stream.aclose()

    def _deliver(self, worker: _Worker, msg: list[Any]) -> None:
        tag, ok = msg[0], msg[1]
        if tag == 0:  # the worker found the token gone, and exits
            self.token_lost(msg[3])
            return
        pending = worker.waiting.pop(tag)
        if worker.drained is not None and not worker.waiting:
            worker.drained.set()
        if pending is _PROBE:
            return  # a failed probe is followed by the tag-0 message
        if isinstance(pending, tuple):
            done, box = pending
            box.extend([True, msg[2]] if ok else [False, _error(msg[2], msg[3])])
            done.set()
            return
        worker.batches -= 1
        worker.signed += len(pending)
        self._inflight -= len(pending)
        seconds, outcomes = msg[2]
        per_job = seconds / len(pending)
        self._per_job = per_job if not self._measured else min(per_job, 1.1 * self._per_job)
        self._measured += len(pending)
        if self.metrics is not None:
            self.metrics.token_batch(len(pending), seconds)
        for entry, outcome in zip(pending, outcomes, strict=True):
            try:
                if outcome[0]:
                    entry.callback(True, outcome[1])
                else:
                    entry.callback(False, _error(outcome[1], outcome[2]))
            except Exception:
                log.exception("a signature could not be delivered")

    def _lost(self, worker: _Worker) -> None:
        """The worker is gone: answer what it had in hand."""
        if not worker.alive:
            return
        worker.alive = False
        if worker.index < len(self._workers) and self._workers[worker.index] is worker:
            self.alive_workers -= 1
        error = TokenUnavailable("the token worker stopped; retry")
        for pending in worker.waiting.values():
            if pending is _PROBE:
                continue
            if isinstance(pending, tuple):
                done, box = pending
                box.extend([False, error])
                done.set()
            else:
                self._inflight -= len(pending)
                for entry in pending:
                    entry.callback(False, error)
        worker.waiting.clear()
        worker.batches = 0
        retired = worker.index < len(self._workers) and self._workers[worker.index] is not worker
        if not self._closing and not self.down and not retired:
            log.error("token worker stopped", extra={"worker": worker.index})
        self.pump()  # answers queued work if no worker is left

    def _check_growth(self, w: _Worker) -> None:
        """Ask a signing worker to hand over once its RSS grew ``recycle_mb``."""
        if w.signed < RECYCLE_WARMUP or w.recycle.is_set():
            return
        rss = _rss(w.process.pid)
        if rss is None:
            return
        if w.rss_base is None:
            w.rss_base = rss
        elif rss - w.rss_base > self.settings.recycle_mb * 1e6:
            log.info(
                "token worker recycled: its memory grew",
                extra={
                    "worker": w.index,
                    "rss_mb": round(rss / 1e6, 1),
                    "grew_mb": round((rss - w.rss_base) / 1e6, 1),
                    "signatures": w.signed,
                },
            )
            w.recycle.set()

    def _patience(self, worker: _Worker) -> float:
        """How long ``worker`` may go without answering: signatures and probes
        are quick, but reading every key of a large token is not."""
        if any(isinstance(p, tuple) for p in worker.waiting.values()):
            return max(CALL_STALL, self.settings.stall_timeout)
        return self.settings.stall_timeout

    async def _watch(self, scope: trio.CancelScope) -> None:
        """Find a token that went away while nobody signed, and one that hangs.

        Every ``probe_interval`` each idle signing worker asks the token for
        its info; a worker that finds it gone says so (and the pool reacts as
        to any loss).  A signing worker that holds work without answering for
        ``stall_timeout`` (``CALL_STALL`` for a call such as reading the keys)
        is taken for hung on the token: it is killed (signing workers never
        write, so that is safe), and the token is treated as lost.  The writer is exempt: generating
        a large RSA key may take seconds, and killing it mid-write could
        damage SoftHSM's files.
        """
        with scope:
            await self._watch_loop()

    async def _watch_loop(self) -> None:
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
                        self._tags += 1
                        w.hand(self._tags, _PROBE, _frame([self._tags, "probe", []]))
                elif now - w.progress_at > self._patience(w):
                    log.error(
                        "token worker stalled; killing it",
                        extra={"worker": w.index, "seconds": round(now - w.progress_at, 1)},
                    )
                    self.token_lost(f"a token call gave no answer for {s.stall_timeout} s")
                    w.process.kill()


@asynccontextmanager
async def open_token_pool(settings: PoolSettings) -> AsyncIterator[TokenPool]:
    """Start the workers and log each in; stop them all on exit.

    Raises:
        TokenUnavailable: a worker could not open the module, find the token,
            or log in (the message says which).
    """
    pool = TokenPool(settings)
    async with trio.open_nursery() as nursery:
        try:
            # The signing workers, then the writer (index ``workers``).
            for index in range(settings.workers + 1):
                info = await nursery.start(pool._supervise, index)
                if pool.info is None:
                    pool.info = info
        except BaseException:
            await pool._close()
            raise
        watch = trio.CancelScope()
        nursery.start_soon(pool._watch, watch)
        try:
            yield pool
        finally:
            watch.cancel()
            with trio.CancelScope(shield=True):
                await pool._close()
