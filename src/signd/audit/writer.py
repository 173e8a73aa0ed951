"""The audit log's writer thread: it chains records and writes them with
group commit, rotates files, and decides when a checkpoint is due.

It takes what the event loop queues (``Entry`` tuples, ``Pending`` requests,
and controls from the checkpoint side), and hands answers back to trio
(``Recipient.audited``, or ``settle`` for pending requests) once their
records are written: durably, in strict mode.  See ``log.py`` for the
protocol between the two.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from signd_client.audit import CHECKPOINT, GENESIS, seal

from .facts import Outcome
from .files import FILE_RE, chain_end, file_name, find, log_files, open_directory, open_log
from .records import Entry, Notes, Recipient, Who, seal_entry, seal_request

__all__ = [
    "OUTCOME_SYNC",
    "STOP",
    "Append",
    "CheckpointAsk",
    "Control",
    "Now",
    "Pending",
    "Start",
    "Tick",
    "Unsigned",
    "Writer",
]

log = logging.getLogger("signd.audit")

#: Queued to stop the writer once what is before it is written.
STOP: Final = object()
#: How long an outcome record may wait, written but not yet fsync'd, for the
#: next group commit before the idle writer syncs it by itself (seconds).
OUTCOME_SYNC: Final = 0.1


class Pending:
    """A request in flight (``AuditLog.asked``), from when it is read until its
    answer is released.

    In strict mode it is queued to the writer at once, as the request's record.
    The event loop sets ``answer`` when the answer is ready; the writer only
    reads it, once, when it takes the request: already there, it writes one
    combined record; not yet, a request record.  Either way it hands the
    request back (``AuditLog._settle``) once that record is durable, and sets
    ``seq`` first: 0 for a combined record, else the request record's seq.
    ``durable`` is the loop's alone: None until then, then whether the
    request record was written.  An answer that comes after it is released at
    once, and the same object is queued again as its outcome record.
    """

    __slots__ = (
        "answer",
        "deferred",
        "durable",
        "notes",
        "offset",
        "recipient",
        "request_id",
        "seq",
        "who",
    )

    def __init__(
        self, who: Who, notes: Notes, recipient: Recipient, request_id: int | None
    ) -> None:
        self.who = who
        self.notes = notes
        self.recipient = recipient
        self.request_id = request_id
        #: (perf_counter_ns when answered, the answer's frame, its outcome), set by the loop
        self.answer: tuple[int, bytes, Outcome | None] | None = None
        #: the loop's: None until the writer hands the request back
        self.durable: bool | None = None
        #: the writer's: the request record's seq, 0 for a combined record
        self.seq = 0
        #: the writer's: the clock offset of the request record, for its outcome's ``ts``
        self.offset = 0
        #: not queued when read (under load): one combined record with its answer
        self.deferred = False


@dataclass(frozen=True, slots=True)
class CheckpointAsk:
    """The writer asks trio to sign this head (a checkpoint); ``number`` counts
    the writer's asks, from 1."""

    seq: int
    hash: str
    file: str
    reason: str
    done: trio.Event | None
    number: int


class Writer:
    """The writer thread's state: the current file, the chain's head, and the
    checkpoint schedule.  Only the thread touches it once it runs (the
    counters are read by metrics from the loop: plain ints)."""

    def __init__(
        self,
        directory: Path,
        items: queue.SimpleQueue[Any],
        settle: Callable[[list[Pending], bool], None],
        asks: trio.MemorySendChannel[CheckpointAsk],
        *,
        strict: bool,
        max_bytes: int,
        checkpoint_every: int,
        on_write: Callable[[float], None] | None,
    ) -> None:
        self.directory = directory
        self._queue = items
        self._settle = settle
        self._ask_send = asks
        self.strict = strict
        self.max_bytes = max_bytes
        self.checkpoint_every = checkpoint_every
        self._on_write = on_write
        self._dirfd = -1
        #: checkpoint state (see ``_checkpoint_step``)
        self._asking = False
        self._asks = 0
        self._since_checkpoint = 0
        self._pending = False
        self._older_file = ""  # the file before the current one, if any
        self.checkpoints_written = 0
        #: set before the thread starts
        self.trio_token: trio.lowlevel.TrioToken | None = None
        self._seq = 0
        self._prev = GENESIS
        self._index = 0
        self._file: Any = None
        self.records_written = 0
        self.failures = 0

    @property
    def file_path(self) -> str:
        """The current file's path."""
        return str(self.directory / file_name(self._index))

    def close_directory(self) -> None:
        """Once the thread has stopped: let the directory go."""
        if self._dirfd >= 0:
            os.close(self._dirfd)
            self._dirfd = -1

    def resume(self) -> None:
        """Check the directory, find where the chain ends, open the current file.

        Every file is opened relative to the directory, never through a
        symlink, and must be a regular file with one link.

        Raises:
            AuditError, OSError.
        """
        self._dirfd = open_directory(self.directory)
        names = log_files(self._dirfd, self.directory)
        if not names:
            self._index = 1
        else:
            self._index = int(FILE_RE.fullmatch(names[-1])[1])  # type: ignore[index]
            self._seq, self._prev = chain_end(self._dirfd, self.directory, names)
            if len(names) > 1:
                self._older_file = names[-2]
        self._file = open_log(self._dirfd, self.directory, file_name(self._index))

    def files(self) -> list[str]:
        """The names of the log's files, oldest first."""
        return log_files(self._dirfd, self.directory)

    def main(self) -> None:
        """The thread: write what is queued until ``STOP``."""
        assert self.trio_token is not None
        last_sync = time.monotonic()
        #: strict: outcome records are written but not fsync'd yet
        unsynced = False
        while True:
            if unsynced:
                try:
                    first = self._queue.get(timeout=OUTCOME_SYNC)
                except queue.Empty:
                    # Nothing came to share a group commit with: sync them now.
                    unsynced = False
                    try:
                        os.fsync(self._file.fileno())
                    except OSError as exc:
                        log.error("audit write failed", extra={"error": str(exc)})
                    continue
            else:
                first = self._queue.get()
            items = [first]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(i is STOP for i in items)
            controls = [i for i in items if isinstance(i, Control)]
            batch: list[Entry | Pending] = [
                i for i in items if i is not STOP and not isinstance(i, Control)
            ]
            lines, answered, withheld, settled, failed = self._seal_batch(batch)
            ok = True
            if lines:
                started = time.perf_counter()
                try:
                    self._file.write(b"".join(lines))
                    self._file.flush()
                    now = time.monotonic()
                    if self.strict:
                        # Only a record that an answer waits for needs its
                        # fsync now; outcome records alone wait for the next.
                        if answered or settled:
                            os.fsync(self._file.fileno())
                            unsynced = False
                        else:
                            unsynced = True
                    elif now - last_sync >= 1.0:
                        os.fsync(self._file.fileno())
                        last_sync = now
                    self.records_written += len(lines)
                    if self._on_write is not None:
                        self._on_write(time.perf_counter() - started)
                    if self._file.tell() >= self.max_bytes:
                        self._rotate()
                        unsynced = False
                except OSError as exc:
                    ok = False
                    self.failures += len(lines)
                    log.error("audit write failed", extra={"error": str(exc)})
            try:
                for done, written in ((answered, ok), (withheld, False)):
                    if done:
                        self.trio_token.run_sync_soon(_finish, done, written)
                for cells, written in ((settled, ok), (failed, False)):
                    if cells:
                        self.trio_token.run_sync_soon(self._settle, cells, written)
            except trio.RunFinishedError:
                pass
            if controls or lines:
                self._checkpoint_step(controls, len(lines) if ok else 0)
            if stop:
                with contextlib.suppress(OSError):
                    self._file.flush()
                    os.fsync(self._file.fileno())
                    self._file.close()
                return

    def _seal_batch(
        self, batch: list[Entry | Pending]
    ) -> tuple[list[bytes], list[Entry], list[Entry], list[Pending], list[Pending]]:
        """Chain ``batch``: (its lines; the entries to answer once they are written;
        those that could not be recorded, whose answers are withheld; the pending
        requests to hand back once written; those that could not be recorded)."""
        lines: list[bytes] = []
        answered: list[Entry] = []
        withheld: list[Entry] = []
        settled: list[Pending] = []
        failed: list[Pending] = []
        if not batch:
            return lines, answered, withheld, settled, failed
        clock_offset = time.time_ns() - time.perf_counter_ns()
        for item in batch:
            seq = self._seq + 1
            try:
                if isinstance(item, Pending):
                    answer = item.answer  # read once: the loop may set it meanwhile
                    if item.durable:  # the outcome of a request already recorded
                        assert answer is not None
                        line, digest = seal_entry(
                            (item.who, item.notes, answer[0], answer[1], answer[2], None, None),
                            seq,
                            self._prev,
                            item.offset,  # the same ts as its request record
                            item.seq,
                        )
                    elif answer is not None:  # answered already: one record
                        line, digest = seal_entry(
                            (item.who, item.notes, answer[0], answer[1], answer[2], None, None),
                            seq,
                            self._prev,
                            clock_offset,
                        )
                        item.seq = 0
                        settled.append(item)
                    else:
                        line, digest = seal_request(
                            item.who, item.notes, seq, self._prev, clock_offset
                        )
                        item.seq, item.offset = seq, clock_offset
                        settled.append(item)
                else:
                    line, digest = seal_entry(item, seq, self._prev, clock_offset)
                    if item[5] is not None:
                        answered.append(item)
            except Exception:
                # One bad record must not stop the writer: every later answer
                # would wait for it forever.
                log.exception("an audit record could not be encoded")
                self.failures += 1
                if isinstance(item, Pending):
                    if not item.durable:
                        failed.append(item)
                elif item[5] is not None:
                    withheld.append(item)
                continue
            self._seq = seq
            self._prev = digest
            lines.append(line)
        return lines, answered, withheld, settled, failed

    def _rotate(self) -> None:
        os.fsync(self._file.fileno())
        # The file ends here: a checkpoint says so (signed later, written
        # into the next file).
        self._ask_checkpoint("rotation")
        self._file.close()
        self._older_file = file_name(self._index)
        self._index += 1
        self._file = open_log(self._dirfd, self.directory, file_name(self._index))
        os.fsync(self._dirfd)

    # ------------------------------------------------------------ checkpoints, writer side
    #
    # The writer thread decides when a checkpoint is due (every
    # ``checkpoint_every`` records, at rotation, at start and at shutdown; every
    # ``checkpoint_interval`` seconds when records were written, as trio's clock
    # says: ``checkpoint_due``) and asks trio for it with the chain head at that
    # moment; it goes on writing.  A trio task (``Checkpointer``) signs the
    # head on the token, stores it on the token as the chain head, and hands
    # the checkpoint record back here (``append``), where it is chained like
    # any record.

    def _head_file(self) -> str:
        """The file the newest record is in."""
        if self._file is not None and self._file.tell() == 0 and self._older_file:
            return self._older_file
        return file_name(self._index)

    def _ask_checkpoint(self, reason: str, done: trio.Event | None = None) -> None:
        if not self._asking:
            if done is not None:
                self._wake(done)
            return
        if not self.strict:
            # The token will say this head exists: it must be on disk first.
            self._file.flush()
            os.fsync(self._file.fileno())
        self._pending = True
        self._since_checkpoint = 0
        self._asks += 1
        ask = CheckpointAsk(self._seq, self._prev, self._head_file(), reason, done, self._asks)
        assert self.trio_token is not None
        try:
            self.trio_token.run_sync_soon(self._ask_send.send_nowait, ask)
        except trio.RunFinishedError:
            self._pending = False

    def _wake(self, done: trio.Event) -> None:
        assert self.trio_token is not None
        with contextlib.suppress(trio.RunFinishedError):
            self.trio_token.run_sync_soon(done.set)

    def _checkpoint_step(self, controls: list[Control], written: int) -> None:
        """After a group commit: append what trio handed back, ask for what is due."""
        self._since_checkpoint += written
        for c in controls:
            if isinstance(c, Append):
                try:
                    self._append(c.record)
                except OSError as exc:
                    self.failures += 1
                    log.error("audit write failed", extra={"error": str(exc)})
                if c.record.get("kind") == CHECKPOINT:
                    self._pending = False
                    self.checkpoints_written += 1
                if c.done is not None:
                    self._wake(c.done)
            elif isinstance(c, Unsigned):
                self._pending = False
            elif isinstance(c, Now):
                if c.reason == "shutdown" and self._since_checkpoint == 0 and not self._pending:
                    self._wake(c.done)  # the newest record is a checkpoint already
                else:
                    self._ask_checkpoint(c.reason, c.done)
            elif isinstance(c, Tick):
                # Due unless an ask came after the one the clock was read from.
                if c.asks_seen == self._asks and self._since_checkpoint and not self._pending:
                    self._ask_checkpoint("interval")
            elif isinstance(c, Start):
                self._asking = True
        if self._since_checkpoint >= self.checkpoint_every and not self._pending:
            self._ask_checkpoint("count")

    def _append(self, record: dict[str, Any]) -> None:
        """Chain and write one record the daemon made (a checkpoint), durably."""
        line, digest = seal(record, self._seq + 1, self._prev)
        self._file.write(line.encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._seq += 1
        self._prev = digest

    def find(self, seq: int) -> tuple[str, str] | None:
        """(hash, file name) of record ``seq``, searched from the newest file back;
        None if no file holds it.  Any thread.

        Raises:
            AuditError, OSError.
        """
        return find(self._dirfd, self.directory, seq)

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the newest record; read before the writer starts."""
        return self._seq, self._prev


class Control:
    """What trio hands the writer thread besides answers."""


@dataclass(frozen=True, slots=True)
class Append(Control):
    """A record the daemon made, to chain and write (a checkpoint, a mismatch)."""

    record: dict[str, Any]
    done: trio.Event | None = None


@dataclass(frozen=True, slots=True)
class Unsigned(Control):
    """A checkpoint asked for could not be made."""


@dataclass(frozen=True, slots=True)
class Now(Control):
    """Checkpoint now (start, shutdown); ``done`` is set once it is written."""

    reason: str
    done: trio.Event


@dataclass(frozen=True, slots=True)
class Tick(Control):
    """``checkpoint_interval`` passed since the ask numbered ``asks_seen``."""

    asks_seen: int


@dataclass(frozen=True, slots=True)
class Start(Control):
    """Checkpoints may be asked for from now on."""


def _finish(entries: list[Entry], ok: bool) -> None:
    for _, _, _, frame, _, recipient, request_id in entries:
        try:
            if recipient is not None:  # always: only those are handed back
                recipient.audited(request_id, frame, ok)
        except Exception:
            log.exception("an audited answer could not be sent")
