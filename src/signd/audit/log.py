"""The audit log: hash-chained JSON lines, written by their own thread.

Records are queued from the event loop and written by a writer thread with
*group commit*: everything queued is written, and in strict mode made durable
with one ``fsync``, then handed back to trio at once.  The format and its
verification live in ``signd_client.audit`` (``signctl audit verify``).

Strict mode (the default): no answer before the record of its request
-------------------------------------------------------------------------
The promise: **no answer leaves the daemon before a durable record says who
asked for what** (principal, op, key, version asked, SHA-256 of the data, item
count).  The durable write overlaps the token's work instead of following it,
so a lone client pays about the larger of the two (token time, ``fsync``),
not their sum:

1. When a request is read, its record is queued at once (``asked``: a
   ``Pending``), before the request is carried out.
2. The writer takes it.  If its answer is already there (cheap ops such as
   ``health`` or reads, refusals, or a writer busy with an earlier group
   commit), it writes **one combined record** as before: request and outcome
   (``result``, ``code``, the version used, ``latency_ms``).  If not, it
   writes a **request record**: ``"phase":"request"``, no ``result``.
3. The answer is released when both are true: it is ready, and the record of
   its request is durable (``_settle`` or ``answered``, whichever comes
   second).
4. After a request record, the answer's **outcome record** follows without
   holding the answer: the same fields as a combined record, plus
   ``"phase":"outcome"`` and ``"request"``, the seq of its request record
   (and the same ``ts``).  It is written at once, and made durable by the
   next group commit, or by the writer itself once nothing else has come for
   ``OUTCOME_SYNC`` seconds.

Under load the overlap buys nothing and costs a second record per request
(the writer's CPU, taken from the event loop through the GIL): group commit
already shares one ``fsync`` among many answers.  So while more than
``OVERLAP_INFLIGHT`` requests are in flight, a request is not queued when
read; its answer is queued with it as one combined record, and released once
that record is durable (the promise holds the same way).

What a crash (``kill -9``, power loss) can leave: a request record without
its outcome, which means *asked, outcome unknown* (it may have been signed,
and the answer may even have reached the client after the request record was
durable); never an answer without a durable record of its request.  Records
of one connection are chained in the order the writer took them, so an
outcome always comes after its request.  If the request record cannot be
written (disk full), its answer is tried once more as a combined record, as
below, and withheld (``internal_error``) if that fails too.

Answers to no known request, and the daemon's own acts
(``record_own_action``), go the old way (``record``): one record, the answer
sent once it is durable.  Relaxed mode answers at once, writes one combined
record per request, and syncs every second.

What it costs per request is kept small, in three ways:

* The event loop does little: when a request is read it notes what its record
  needs (``notes_of``) in a ``Pending`` (strict: queued at once); with its
  answer it stores the frame and its ``Outcome`` there, or queues one tuple
  (``Entry``, relaxed).
  The writer thread builds the record from the notes and the answer's
  ``Outcome`` (facts the service hands over; no frame is decoded).  Only the
  loop changes a ``Pending``'s ``answer`` and ``durable``, only the writer
  its ``seq`` and ``offset``; the writer reads ``answer`` once per request
  record, so no lock is needed.
* The record's canonical JSON is filled into a template (``records.py``)
  rather than made by ``json.dumps``, several times cheaper; the principal's
  part is encoded once per connection (``who_fields``).
* Few objects for the garbage collector per request.  In strict mode an
  answer waits a millisecond or so for its ``fsync``, and what it holds
  meanwhile is traversed, and promoted, by the collections that run in
  between.  So there is no closure per answer (the writer calls
  ``Recipient.audited``), and the notes on a request are plain values, not
  the request.

The writer thread holds the GIL while it builds lines, so that work is not
free for the event loop either: what counts is that it is cheap.

Records never hold signed data or PINs: only the SHA-256 of what was signed.
This module is the event loop's side; the writer thread is ``writer.py``,
record encoding ``records.py``, the directory and its files ``files.py``, the
signed checkpoints ``checkpoint.py``, what an answer tells ``facts.py``.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import trio

from signd_client.audit import AUDIT_KEY

from ..access.policy import Principal
from .facts import Outcome
from .records import Notes, Recipient, Who, who_fields
from .writer import (
    STOP,
    Append,
    CheckpointAsk,
    Now,
    Pending,
    Start,
    Tick,
    Unsigned,
    Writer,
)

__all__ = ["AUDIT_KEY", "MODES", "OVERLAP_INFLIGHT", "AuditLog", "record_own_action"]

log = logging.getLogger("signd.audit")

MODES: Final = ("strict", "relaxed")
#: Strict mode overlaps a request's record with the token's work while at most
#: this many requests are in flight; past it, one combined record per request.
OVERLAP_INFLIGHT: Final = 8


class AuditLog:
    """The hash-chained log of every request and answer (see the module's doc).

    ``on_write`` is called from the writer thread with the seconds each group
    commit took (a metric).  Checkpoints are asked for on ``checkpoint_asks``
    once a ``Checkpointer`` has started (``checkpoint.py``).
    """

    def __init__(
        self,
        directory: str,
        *,
        mode: str = "strict",
        max_bytes: int = 64 << 20,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 60.0,
        on_write: Callable[[float], None] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"audit mode must be one of {MODES}")
        self.directory = Path(directory)
        self.mode = mode
        self.max_bytes = max_bytes
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self._ask_send, self.checkpoint_asks = trio.open_memory_channel[CheckpointAsk](math.inf)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer = Writer(
            self.directory,
            self._queue,
            self._settle,
            self._ask_send,
            strict=mode == "strict",
            max_bytes=max_bytes,
            checkpoint_every=checkpoint_every,
            on_write=on_write,
        )
        #: strict: requests read and not answered yet (the loop's alone)
        self._inflight = 0
        self._thread: threading.Thread | None = None

    @property
    def records_written(self) -> int:
        """Records written since the log was opened (checkpoints not counted)."""
        return self._writer.records_written

    @property
    def failures(self) -> int:
        """Records that could not be encoded or written."""
        return self._writer.failures

    @property
    def checkpoints_written(self) -> int:
        """Checkpoint records written since the log was opened."""
        return self._writer.checkpoints_written

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the newest record; read before the writer starts."""
        return self._writer.head

    def files(self) -> list[str]:
        """The names of the log's files, oldest first.

        Raises:
            AuditError, OSError.
        """
        return self._writer.files()

    def find(self, seq: int) -> tuple[str, str] | None:
        """(hash, file name) of record ``seq``, searched from the newest file back;
        None if no file holds it.  Any thread.

        Raises:
            AuditError, OSError.
        """
        return self._writer.find(seq)

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Find where the chain ends, open the current file, start the writer.

        Raises:
            AuditError, OSError: the directory cannot be used.
        """
        w = self._writer
        await trio.to_thread.run_sync(w.resume)
        w.trio_token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=w.main, name="signd-audit", daemon=True)
        self._thread.start()
        log.info("audit log open", extra={"file": w.file_path, "seq": w.head[0], "mode": self.mode})

    async def aclose(self) -> None:
        """Write what is queued, then stop."""
        if self._thread is None:
            return
        self._queue.put(STOP)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._thread.join)
        self._thread = None
        self._writer.close_directory()

    # ------------------------------------------------------------ hot path

    def record(
        self,
        who: Who,
        notes: Notes | None,
        frame: bytes,
        outcome: Outcome,
        recipient: Recipient,
        request_id: int | None,
    ) -> None:
        """Queue the record of answer ``frame`` (to the request ``notes`` describe),
        which ended as ``outcome``; ``recipient.audited`` runs in trio once it is
        written (strict: durable).  In relaxed mode it runs at once.  For an
        answer to a request that went through ``asked``, use ``answered``.
        """
        if self.mode == "relaxed":
            self._queue.put((who, notes, time.perf_counter_ns(), frame, outcome, None, request_id))
            recipient.audited(request_id, frame, True)
        else:
            self._queue.put(
                (who, notes, time.perf_counter_ns(), frame, outcome, recipient, request_id)
            )

    def asked(
        self, who: Who, notes: Notes, recipient: Recipient, request_id: int | None
    ) -> Pending:
        """A request was read: in strict mode, queue its record at once, so that
        it is made durable while the token works.  Pass what this returns to
        ``answered`` with the request's answer."""
        pending = Pending(who, notes, recipient, request_id)
        if self.mode == "strict":
            self._inflight += 1
            if self._inflight <= OVERLAP_INFLIGHT:
                self._queue.put(pending)
            else:  # under load: one combined record, queued with the answer
                pending.deferred = True
        return pending

    def answered(self, pending: Pending, frame: bytes, outcome: Outcome) -> None:
        """``frame`` answers the request ``pending`` stands for, which ended as
        ``outcome``;
        ``recipient.audited`` runs once the request's record is durable
        (strict), at once if it already is (the outcome record then follows,
        without holding the answer), or at once in relaxed mode."""
        if self.mode == "relaxed":
            self._queue.put(
                (
                    pending.who,
                    pending.notes,
                    time.perf_counter_ns(),
                    frame,
                    outcome,
                    None,
                    pending.request_id,
                )
            )
            pending.recipient.audited(pending.request_id, frame, True)
            return
        pending.answer = (time.perf_counter_ns(), frame, outcome)
        self._inflight = max(0, self._inflight - 1)
        if pending.deferred:
            self._combined(pending)
            return
        durable = pending.durable
        if durable:
            self._queue.put(pending)  # its outcome record
            pending.recipient.audited(pending.request_id, frame, True)
        elif durable is False:
            self._combined(pending)
        # else: the writer has it, and ``_settle`` releases it.

    def _settle(self, cells: list[Pending], ok: bool) -> None:
        """In trio: the records of ``cells`` are durable (``ok``) or could not be written."""
        for p in cells:
            try:
                answer = p.answer
                if not ok:
                    p.durable = False
                    if answer is not None:
                        self._combined(p)
                elif p.seq == 0:  # one combined record, with its answer
                    assert answer is not None
                    p.recipient.audited(p.request_id, answer[1], True)
                else:
                    p.durable = True
                    if answer is not None:
                        self._queue.put(p)  # its outcome record
                        p.recipient.audited(p.request_id, answer[1], True)
            except Exception:
                log.exception("an audited answer could not be sent")

    def _combined(self, p: Pending) -> None:
        """One combined record for the answered request ``p``, as for ``record``;
        its answer is released once it is durable, or withheld if it cannot be
        written (``p`` was not queued, under load; or its request record could
        not be written)."""
        assert p.answer is not None
        ended, frame, outcome = p.answer
        self._queue.put((p.who, p.notes, ended, frame, outcome, p.recipient, p.request_id))

    # ------------------------------------------------------------ checkpoints, trio side

    def start_checkpoints(self) -> None:
        """From now on the writer asks for checkpoints on ``checkpoint_asks``
        (the log was checked against the chain head on the token)."""
        self._queue.put(Start())

    def checkpoint_now(self, reason: str, done: trio.Event) -> None:
        """Ask for a checkpoint of the chain as it is when the writer gets to
        this; ``done`` is set once it is written (at once if the newest record
        is a checkpoint already at shutdown, or if checkpoints are off)."""
        self._queue.put(Now(reason, done))

    def checkpoint_due(self, asks_seen: int) -> None:
        """``checkpoint_interval`` has passed since ask number ``asks_seen``, the
        newest the caller has seen: a checkpoint is due if records were written
        since and no other was asked for meanwhile."""
        self._queue.put(Tick(asks_seen))

    def append(self, record: dict[str, Any], done: trio.Event | None = None) -> None:
        """Chain and write ``record`` (a checkpoint, a mismatch), durably; set
        ``done`` once it is."""
        self._queue.put(Append(record, done))

    def unsigned(self) -> None:
        """A checkpoint asked for could not be made."""
        self._queue.put(Unsigned())


class _Wait:
    """A ``Recipient`` that just waits for its record."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ok = False

    def audited(self, request_id: int | None, frame: bytes, ok: bool) -> None:
        self.ok = ok
        self.done.set()


async def record_own_action(audit: AuditLog, op: str, key: str, outcome: Outcome) -> bool:
    """Record something the daemon did by itself (a scheduled rotation), which
    ended as ``outcome``, and wait until the record is written; its principal
    is the daemon's own process.

    Returns False if the record could not be written (the failure is logged).
    """
    me = Principal(
        uid=os.getuid(),
        gid=os.getgid(),
        pid=os.getpid(),
        user="signd",
        groups=frozenset(),
        group_names=frozenset(),
        exe=sys.executable,
    )
    wait = _Wait()
    notes = (op, key, None, None, None, time.perf_counter_ns())
    audit.record(who_fields(me), notes, b"", outcome, wait, None)
    await wait.done.wait()
    return wait.ok
