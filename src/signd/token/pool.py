"""The daemon's side of the token workers: processes, scheduling, hand-overs.

``open_token_pool`` starts ``workers`` processes (``python -m signd.token``),
each logged in to the token on its own, and supervises them: a worker that
dies is replaced, with back-off, and what it had in hand is answered
``token_unavailable``.

Signatures are queued and handed out in batches by the ``Scheduler``
(``scheduler.py``); this module keeps the processes (``process.py``) behind
it running, and makes the rare calls (reading keys and records, writes).
``watch.py`` finds a token that went away or hangs, ``outage.py`` keeps
whether it is there, and ``keys/recordstore.py`` makes a record write a
compare-and-swap out of the calls here.  All of them speak ``ipc.py``.

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
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import trio

from ..errors import TokenUnavailable, WireError
from ..metrics import Metrics
from .ipc import (
    Answer,
    BackupMac,
    Call,
    CreateMetadata,
    DestroyKeys,
    DropCreated,
    DropOlder,
    Generate,
    ImportKeypair,
    ImportPublic,
    LoadMetadata,
    MetadataBlob,
    Open,
    PublicKeys,
    RestoreKeypair,
    Revisions,
    RunJobs,
    TokenInfo,
    VerifyBackupMac,
    WrapCheckValue,
    WrapPrivate,
    decode_answer,
    encode_request,
)
from .outage import Outage
from .process import WorkerProcess, login, reap, spawn
from .scheduler import Entry, Scheduler, SchedulerSettings
from .settings import PoolSettings
from .watch import CALL_STALL, PROBE, Watch

__all__ = ["Entry", "PoolSettings", "TokenPool", "open_token_pool"]

log = logging.getLogger("signd.workers")

#: Back-off between attempts to replace a dead worker (or to find a lost
#: token again): capped at 1 s, so a token that is back serves within ~1.5 s.
RESPAWN_BACKOFF: Final = (0.05, 0.1, 0.2, 0.5, 1.0)
#: A login that takes longer than this is taken for a hung token.
LOGIN_TIMEOUT: Final = 30.0

R = TypeVar("R")


class TokenPool:
    """Token workers behind one queue.  Create it with ``open_token_pool``."""

    def __init__(
        self,
        settings: PoolSettings,
        workers: list[WorkerProcess | None],
        scheduler: Scheduler,
        outage: Outage,
    ) -> None:
        """``workers``: one empty slot per signing worker, the list
        ``scheduler`` hands work to (this pool fills it)."""
        self.settings = settings
        self.info: TokenInfo | None = None
        self._workers = workers
        #: the worker that makes every write to the token (index ``settings.workers``)
        self._writer: WorkerProcess | None = None
        self._closing = False
        self.outage = outage
        self.scheduler = scheduler
        # The hot path, without a call through the pool.
        self.enqueue = scheduler.enqueue
        self.drop = scheduler.drop
        self.pump = scheduler.pump
        self.respawns = 0
        #: signing workers replaced by a fresh process because their RSS grew
        self.recycles = 0

    # ------------------------------------------------------------ state

    @property
    def pending(self) -> int:
        """Signatures queued or in a worker's hands."""
        return self.scheduler.pending

    @property
    def alive_workers(self) -> int:
        """Signing workers logged in and serving."""
        return self.scheduler.alive

    @property
    def is_open(self) -> bool:
        return self.info is not None and self.scheduler.alive > 0

    @property
    def batches_sent(self) -> int:
        return self.scheduler.batches_sent

    @property
    def entries_sent(self) -> int:
        return self.scheduler.entries_sent

    # ------------------------------------------------------------ rare operations

    async def load_metadata(
        self, name: str | None = None, *, writer: bool = False
    ) -> list[MetadataBlob]:
        """The newest record of one key (``name``), or of every key (None).
        ``writer``: asked of the writer, not behind the signing workers' batches
        (catching a token up, while it signs for others)."""
        call = LoadMetadata(name)
        return await (self._on_writer(call) if writer else self._call(call))

    async def revisions(self, name: str) -> list[int]:
        """The revisions of a key's record, as a signing worker (one that
        never writes, so sees what other processes wrote) sees them."""
        return await self._call(Revisions(name))

    async def create_metadata(self, name: str, revision: int, value: bytes) -> None:
        await self._on_writer(CreateMetadata(name, revision, value))

    async def drop_created(self) -> None:
        await self._on_writer(DropCreated())

    async def drop_older(self, name: str, revision: int) -> None:
        await self._on_writer(DropOlder(name, revision))

    async def public_keys(
        self, object_ids: Sequence[bytes], *, writer: bool = False
    ) -> dict[bytes, tuple[bytes, bool]]:
        """(SPKI DER, whether its private key exists) by object id (``writer``:
        as for ``load_metadata``)."""
        call = PublicKeys(list(object_ids))
        return await (self._on_writer(call) if writer else self._call(call))

    async def destroy_keys(self, object_id: bytes, *, public: bool = False) -> int:
        """Delete a private key on the token, and its public key if ``public``;
        returns how many objects were deleted."""
        return await self._on_writer(DestroyKeys(object_id, public))

    async def generate(
        self, key_type: str, object_id: bytes, label: str, backup: bool = False
    ) -> bytes:
        return await self._on_writer(Generate(key_type, object_id, label, backup))

    # Backup and restore: the writer's session (one at a time, with key changes).

    async def wrap_private(self, object_id: bytes) -> bytes:
        """The backup-able private key ``object_id`` wrapped under the wrap key."""
        return await self._on_writer(WrapPrivate(object_id))

    async def wrap_check_value(self) -> str | None:
        """The check value of the token's wrap key (None if not recorded)."""
        return await self._on_writer(WrapCheckValue())

    async def backup_mac(self, data: bytes) -> bytes:
        return await self._on_writer(BackupMac(data))

    async def verify_backup_mac(self, data: bytes, mac: bytes) -> bool:
        return await self._on_writer(VerifyBackupMac(data, mac))

    async def restore_keypair(
        self, key_type: str, object_id: bytes, label: str, spki: bytes, wrapped: bytes | None
    ) -> None:
        await self._on_writer(RestoreKeypair(key_type, object_id, label, spki, wrapped))

    # Import (bring your own key): the writer's session too.

    async def import_public(self) -> tuple[bytes, str]:
        """The token's import key (made on first need): SPKI DER and id."""
        return await self._on_writer(ImportPublic())

    async def import_keypair(
        self,
        key_type: str,
        object_id: bytes,
        label: str,
        import_key_id: str,
        wrapped_key: bytes,
        wrapped_material: bytes,
        spki: bytes,
        backup: bool,
    ) -> bytes:
        """Unwrap an imported keypair onto the token; its SPKI DER."""
        return await self._on_writer(
            ImportKeypair(
                key_type,
                object_id,
                label,
                import_key_id,
                wrapped_key,
                wrapped_material,
                spki,
                backup,
            )
        )

    async def _on_writer(self, call: Call[R]) -> R:
        writer = self._writer
        if writer is None or not writer.alive:
            raise (
                self.outage.unavailable()
                if self.outage.down
                else TokenUnavailable("the token writer is not running; retry")
            )
        return await self._call_on(writer, call)

    async def _call(self, call: Call[R]) -> R:
        alive = [w for w in self._workers if w is not None and w.alive]
        # One handing over still answers, if it is the only one.
        worker = next((w for w in alive if not w.retiring), alive[0] if alive else None)
        if worker is None:
            raise self.outage.unavailable()
        return await self._call_on(worker, call)

    async def _call_on(self, worker: WorkerProcess, call: Call[R]) -> R:
        tag = self.scheduler.new_tag()
        done = trio.Event()
        box: list[Any] = []
        worker.hand(tag, (call, done, box), encode_request(tag, call))
        await done.wait()
        ok, value = box
        if not ok:
            raise value
        result: R = value
        return result

    # ------------------------------------------------------------ workers

    async def _spawn(self, index: int) -> WorkerProcess:
        return await spawn(index, "write" if index == self.settings.workers else "sign")

    async def _login(self, worker: WorkerProcess) -> TokenInfo:
        """Raises: TokenUnavailable (the module, the token or the login failed)."""
        s = self.settings
        return await login(
            worker, Open(s.module, s.token_label, s.pin, s.log_level, s.spin, s.profile)
        )

    async def _supervise(self, index: int, task_status: trio.TaskStatus[TokenInfo]) -> None:
        """Keep worker ``index`` running: start, log in, serve, replace if it dies.

        The first login's failure is raised (the daemon cannot start); later
        ones are logged and retried with back-off.
        """
        started = False
        failures = 0
        delay = 0.0
        successor: list[WorkerProcess] = []  # a fresh worker taking over (``_recycle``)
        while not self._closing:
            if successor:  # it took over from the worker that just stopped
                self.pump()
                await self._serve_worker(successor.pop(), index, successor)
                continue
            if started and self.outage.down and index != 0:
                # While the token is away only worker 0 looks for it: a
                # process start per attempt is not free.
                await self.outage.back.wait()
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
                    await reap(worker)
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
                        await reap(worker)
                    return
                if index == self.settings.workers:
                    self._writer = worker
                else:
                    self._workers[index] = worker
                    self.scheduler.lane_up()
                failures = 0
                if not started:
                    started = True
                    task_status.started(info)
                else:
                    self.respawns += 1
                    self.outage.found(index)
                    self.pump()
                await self._serve_worker(worker, index, successor)
                if successor:
                    continue
            delay = RESPAWN_BACKOFF[min(failures, len(RESPAWN_BACKOFF) - 1)]
            failures += 1

    async def _serve_worker(
        self, worker: WorkerProcess, index: int, successor: list[WorkerProcess]
    ) -> None:
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
                await reap(worker)

    async def _recycle(
        self, old: WorkerProcess, index: int, successor: list[WorkerProcess]
    ) -> None:
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
                await reap(new)
            log.warning("token worker not recycled", extra={"worker": index, "error": str(exc)})
            return  # the old one goes on; it is not asked again
        old.retiring = True  # no more work for it (queued work waits: briefly)
        with trio.move_on_after(max(CALL_STALL, self.settings.stall_timeout)):
            if old.waiting:
                old.drained = trio.Event()
                await old.drained.wait()
        if self._closing or not old.alive or self._workers[index] is not old:
            with trio.CancelScope(shield=True):
                await reap(new)
            return
        self._workers[index] = new  # before ``old`` stops, so it never counts as lost
        self.recycles += 1
        successor.append(new)
        assert old.scope is not None
        old.scope.cancel()

    def _login_failed(self, index: int, exc: BaseException) -> None:
        """A worker could not be started again.  With no signing worker left,
        that is a lost token (whatever killed the last one): from then on
        only one worker tries."""
        error = str(exc) or f"no answer within {LOGIN_TIMEOUT:.0f} s"
        if not self.outage.down and self.alive_workers == 0 and index < self.settings.workers:
            self.token_lost(error)
        else:
            self.outage.start_failed(index, error)

    def token_lost(self, reason: str) -> None:
        """The token is gone (or hung): answer everything in the workers' hands
        ``token_unavailable``, stop them all, and look for the token again.

        Every worker goes, not only the one that noticed: their sessions are
        dead too, and a module instance that lost its token may not recover
        in the same process (p11-kit's client does not).  Until a worker logs
        in again, requests fail at once, and readiness is false.
        """
        if self._closing or not self.outage.lost(reason):
            return
        for w in [*self._workers, self._writer]:
            if w is not None:
                self._lost(w)
                if w.scope is not None:
                    w.scope.cancel()

    async def _write(self, worker: WorkerProcess) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await worker.outbox.run()  # the reader sees the end too

    async def _read(self, worker: WorkerProcess, scope: trio.CancelScope) -> None:
        # Into one buffer: ``receive_some(n)`` allocates n bytes a call and
        # shrinks them, which fragments the heap (see worker._receive).
        buf = memoryview(bytearray(1 << 16))
        sock = worker.stream.socket
        try:
            while True:
                data = buf[: await sock.recv_into(buf)]
                if not data:
                    return
                worker.progress_at = time.monotonic()
                worker.decoder.receive_data(data)
                for msg in worker.decoder.messages():
                    if not worker.alive:
                        return
                    self._deliver(worker, msg)
                self.pump()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._lost(worker)
            scope.cancel()

    async def _close(self) -> None:
        """Stop every worker: they exit when their socket closes."""
        self._closing = True
        self.outage.back.set()
        log.info(
            "token workers stopping",
            extra={"batches": self.batches_sent, "signatures": self.entries_sent},
        )
        for w in [*self._workers, self._writer]:
            if w is not None:
                await w.stream.aclose()

    def _deliver(self, worker: WorkerProcess, msg: list[Any]) -> None:
        answer = decode_answer(msg)
        if not isinstance(answer, Answer):  # the worker found the token gone, and exits
            self.token_lost(answer.reason)
            return
        pending = worker.waiting.pop(answer.tag)
        if worker.drained is not None and not worker.waiting:
            worker.drained.set()
        if pending is PROBE:
            return  # a failed probe is followed by the token's loss
        if isinstance(pending, tuple):
            call, done, box = pending
            if answer.error is None:
                box.extend([True, call.decode_result(answer.value)])
            else:
                box.extend([False, answer.error])
            done.set()
            return
        worker.batches -= 1
        worker.signed += len(pending)
        if answer.error is not None:  # the whole batch failed (a bug on one side)
            self.scheduler.abandoned(pending, answer.error)
            return
        batch = RunJobs.decode_result(answer.value)
        self.scheduler.completed(pending, batch.seconds, batch.outcomes)

    def _lost(self, worker: WorkerProcess) -> None:
        """The worker is gone: answer what it had in hand."""
        if not worker.alive:
            return
        worker.alive = False
        if worker.index < len(self._workers) and self._workers[worker.index] is worker:
            self.scheduler.lane_down()
        error = TokenUnavailable("the token worker stopped; retry")
        for pending in worker.waiting.values():
            if pending is PROBE:
                continue
            if isinstance(pending, tuple):
                _, done, box = pending
                box.extend([False, error])
                done.set()
            else:
                self.scheduler.abandoned(pending, error)
        worker.waiting.clear()
        worker.batches = 0
        retired = worker.index < len(self._workers) and self._workers[worker.index] is not worker
        if not self._closing and not self.outage.down and not retired:
            log.error("token worker stopped", extra={"worker": worker.index})
        self.pump()  # answers queued work if no worker is left


@asynccontextmanager
async def open_token_pool(settings: PoolSettings, metrics: Metrics) -> AsyncIterator[TokenPool]:
    """Start the workers and log each in; stop them all on exit.

    Raises:
        TokenUnavailable: a worker could not open the module, find the token,
            or log in (the message says which).

    ``metrics`` counts the batches and the token's time for them.
    """
    workers: list[WorkerProcess | None] = [None] * settings.workers
    outage = Outage(time.monotonic)
    scheduler = Scheduler(
        SchedulerSettings(
            settings.queue_limit,
            settings.batch_max,
            settings.depth,
            settings.quantum,
            settings.workers - settings.bulk_workers if settings.bulk_workers else None,
        ),
        metrics,
        workers,
        outage.unavailable,
        time.monotonic,
    )
    pool = TokenPool(settings, workers, scheduler, outage)
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
        watch = Watch(settings, pool._workers, pool.scheduler.new_tag, pool.token_lost)
        scope = trio.CancelScope()
        nursery.start_soon(watch.run, scope)
        try:
            yield pool
        finally:
            scope.cancel()
            with trio.CancelScope(shield=True):
                await pool._close()
