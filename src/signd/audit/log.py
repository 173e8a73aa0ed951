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
  answer it stores the frame there, or queues one tuple (``Entry``, relaxed).
  The writer thread decodes the answer and builds the record.  Only the
  loop changes a ``Pending``'s ``answer`` and ``durable``, only the writer
  its ``seq`` and ``offset``; the writer reads ``answer`` once per request
  record, so no lock is needed.
* The record's canonical JSON is filled into a template (``_seal_entry``)
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
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import re
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, Final, Protocol

import msgpack
import trio

from signd_client.audit import (
    AUDIT_KEY,
    CHAIN_MISMATCH,
    CHECKPOINT,
    GENESIS,
    checkpoint_message,
    line_of,
    seal,
)

from ..access.policy import Principal
from ..errors import Conflict, WireError
from ..protocol import HEADER, AuditHead, Message, Request
from ..trusted import NotTrusted, open_trusted_dir

__all__ = [
    "AUDIT_KEY",
    "AuditError",
    "AuditLog",
    "Checkpointer",
    "TokenHead",
    "Entry",
    "Notes",
    "Pending",
    "Recipient",
    "Who",
    "data_digest",
    "notes_of",
    "record_own_action",
    "who_fields",
]

log = logging.getLogger("signd.audit")

MODES: Final = ("strict", "relaxed")
_STOP: Final = object()
#: An audit file's name: audit-NNNNNN.jsonl (more digits past 999,999).
FILE_RE: Final = re.compile(r"audit-(\d{6,})\.jsonl")
#: Seconds a checkpoint's signature and head write may take before it is given up.
CHECKPOINT_TIMEOUT: Final = 10.0


class AuditError(Exception):
    """The audit log cannot be used as it is (its directory or a file in it is
    unsafe, or the log does not match the chain head on the token)."""


class Recipient(Protocol):
    """Who gets an answer once its record is written (a connection)."""

    def audited(self, request_id: int | None, frame: bytes, ok: bool) -> None:
        """``frame``'s record is written (durably, in strict mode) if ``ok``;
        if not, the answer must be withheld.  Runs in trio."""


#: A connection's principal as canonical JSON values, (exe, gid, pid, uid, user):
#: the same on every record of the connection, so encoded once (``who_fields``).
Who = tuple[str, str, str, str, str]
#: What a request's record needs from the request, noted when it is read
#: (``notes_of``): (op, key, data_sha256, items, version, time.perf_counter_ns()).
Notes = tuple[str, str | None, str | None, int | None, int | None, int]
#: What the loop queues per answer: (who, the request's notes or None when the
#: answer is to no known request, perf_counter_ns of the answer, the answer's
#: frame, whom to hand it back to or None (relaxed mode), the request id).
Entry = tuple[Who, Notes | None, int, bytes, Recipient | None, int | None]

#: How long an outcome record may wait, written but not yet fsync'd, for the
#: next group commit before the idle writer syncs it by itself (seconds).
OUTCOME_SYNC: Final = 0.1
#: Strict mode overlaps a request's record with the token's work while at most
#: this many requests are in flight; past it, one combined record per request.
OVERLAP_INFLIGHT: Final = 8


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
        #: (perf_counter_ns when answered, the answer's frame), set by the loop
        self.answer: tuple[int, bytes] | None = None
        #: the loop's: None until the writer hands the request back
        self.durable: bool | None = None
        #: the writer's: the request record's seq, 0 for a combined record
        self.seq = 0
        #: the writer's: the clock offset of the request record, for its outcome's ``ts``
        self.offset = 0
        #: not queued when read (under load): one combined record with its answer
        self.deferred = False


def data_digest(args: Message) -> tuple[str | None, int | None]:
    """SHA-256 (hex) of what a request asks to sign or verify, and its item count."""
    for single in ("message", "digest"):
        value = getattr(args, single, None)
        if value is not None:
            return hashlib.sha256(value).hexdigest(), None
    for many in ("messages", "digests"):
        values = getattr(args, many, None)
        if values is not None:
            h = hashlib.sha256()
            for v in values:
                h.update(hashlib.sha256(v).digest())
            return h.hexdigest(), len(values)
    return None, None


def notes_of(request: Request, now: int) -> Notes:
    """What ``request``'s record needs from it; ``now`` is ``time.perf_counter_ns()``
    when it was read.  Plain values only, so that the request itself can go."""
    args = request.args
    digest, items = data_digest(args)
    # A request naming a key version (disable, enable, destroy...) is recorded
    # with that version; others with the version their answer names.
    version = getattr(args, "version", None)
    return (request.op, getattr(args, "key", None), digest, items, version, now)


# ---------------------------------------------------------------- record encoding
#
# A record is written exactly as ``signd_client.audit.canonical`` would write
# it (sorted keys, compact, ensure_ascii=False), or its hash would not verify.
# ``json.dumps`` costs several microseconds per record (it builds an encoder
# per call, sorts, and formats through generic code); the record's shape is
# fixed, so ``_seal_entry`` fills a template in sorted key order, and
# ``_json`` encodes each value the way ``json.dumps`` does.  The tests check
# the result against ``canonical`` byte for byte.


def _json(value: object) -> str:
    """``value`` as canonical JSON, exactly as ``json.dumps`` in ``canonical`` writes it."""
    if type(value) is str:
        # The very function json.dumps(ensure_ascii=False) uses for strings.
        return encode_basestring(value)
    if type(value) is int:  # not bool, an int subclass; json.dumps uses int.__repr__
        return int.__repr__(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    # Anything else (a float, a container): rare, and json.dumps is the reference.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _utf8(text: str | None) -> str | None:
    """``text`` as valid Unicode.  A path or user name the kernel gives in bytes that
    are not UTF-8 decodes to lone surrogates (``surrogateescape``), which cannot be
    written as UTF-8; such bytes are written as ``\\xNN`` instead."""
    if text is None:
        return None
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that surrogateescape did not make
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def who_fields(who: Principal) -> Who:
    """The principal's part of a record, encoded once per connection."""
    return (
        _json(_utf8(who.exe)),
        _json(who.gid),
        _json(who.pid),
        _json(who.uid),
        _json(_utf8(who.user)),
    )


def _seal_entry(
    entry: Entry, seq: int, prev: str, clock_offset: int, request: int | None = None
) -> tuple[bytes, str]:
    """The record of one answer, chained after ``prev``: (its line with newline, its hash).

    ``clock_offset`` is ``time.time_ns() - time.perf_counter_ns()``, read by
    the writer once per batch, so that the loop reads one clock per request.
    With ``request`` (the seq of the request's own record, written earlier)
    it is an outcome record: ``"phase":"outcome"`` and ``"request"`` added.

    Raises:
        Exception: the answer cannot be decoded or the record encoded; the
            caller withholds that answer.
    """
    (exe, gid, pid, uid, user), notes, ended, frame, _, _ = entry
    if notes is not None:
        op_, key_, digest, items, version, started = notes
        op, key = _json(op_), _json(key_)
        data = "" if digest is None else f'"data_sha256":"{digest}",'
        counted = "" if items is None else f'"items":{_json(items)},'
        # µs resolution for both, written by float.__repr__ as json.dumps does.
        latency = f'"latency_ms":{float.__repr__((ended - started) // 1000 / 1e3)},'
    else:  # an answer to no known request: when it was answered, nothing else
        op = key = "null"
        data = counted = latency = ""
        version = None
        started = ended
    ts = float.__repr__((started + clock_offset) // 1000 / 1e6)

    answer = msgpack.unpackb(frame[HEADER.size :])
    error = answer.get("error")
    valid = ""
    if error is not None:
        result = _json(error.get("name"))
        code = _json(error.get("code"))
    else:
        result, code = '"ok"', "0"
        value = answer.get("result") or {}
        if version is None:
            # A create or rotate names the version it made (a replay of one
            # by its idempotency key too, whatever was rotated since).
            version = value.get(
                "version", value.get("created_version", value.get("current_version"))
            )
        if "valid" in value:
            valid = f',"valid":{_json(value["valid"])}'
    versioned = "" if version is None else f',"version":{_json(version)}'
    phase = asked = ""
    if request is not None:
        phase, asked = '"phase":"outcome",', f'"request":{int.__repr__(request)},'

    # Every member in sorted key order; the optional ones carry their own comma.
    body = (
        f'{{"code":{code},{data}"exe":{exe},"gid":{gid},{counted}"key":{key},{latency}'
        f'"op":{op},{phase}"pid":{pid},"prev":"{prev}",{asked}"result":{result},"seq":{seq},'
        f'"ts":{ts},"uid":{uid},"user":{user}{valid}{versioned}}}'
    )
    return line_of(body.encode())


def _seal_request(
    who: Who, notes: Notes, seq: int, prev: str, clock_offset: int
) -> tuple[bytes, str]:
    """The record of a request whose answer is not ready yet, chained after
    ``prev``: who asked for what, ``"phase":"request"``, no result.  Its
    outcome follows in a later record naming this one's seq in ``request``.
    (``clock_offset`` as for ``_seal_entry``.)
    """
    exe, gid, pid, uid, user = who
    op, key, digest, items, version, started = notes
    data = "" if digest is None else f'"data_sha256":"{digest}",'
    counted = "" if items is None else f'"items":{_json(items)},'
    versioned = "" if version is None else f',"version":{_json(version)}'
    ts = float.__repr__((started + clock_offset) // 1000 / 1e6)
    body = (
        f'{{{data}"exe":{exe},"gid":{gid},{counted}"key":{_json(key)},"op":{_json(op)},'
        f'"phase":"request","pid":{pid},"prev":"{prev}","seq":{seq},"ts":{ts},'
        f'"uid":{uid},"user":{user}{versioned}}}'
    )
    return line_of(body.encode())


class AuditLog:
    def __init__(
        self,
        directory: str,
        *,
        mode: str = "strict",
        max_bytes: int = 64 << 20,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 60.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"audit mode must be one of {MODES}")
        self.directory = Path(directory)
        self.mode = mode
        self.max_bytes = max_bytes
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self._dirfd = -1
        #: checkpoint state, writer thread only (see ``_checkpoint_step``)
        self._ask: Callable[[_Ask], None] | None = None
        self._since_checkpoint = 0
        self._asked_at = time.monotonic()
        self._pending = False
        self._older_file = ""  # the file before the current one, if any
        self.checkpoints_written = 0
        #: signs the checkpoints (set once the token's keys are loaded)
        self.checkpointer: Checkpointer | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: strict: requests read and not answered yet (the loop's alone)
        self._inflight = 0
        self._thread: threading.Thread | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._seq = 0
        self._prev = GENESIS
        self._index = 0
        self._file: Any = None
        self.records_written = 0
        self.failures = 0
        #: called from the writer thread with the seconds each group commit took
        self.on_write: Callable[[float], None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Find where the chain ends, open the current file, start the writer.

        Raises:
            OSError: the directory cannot be used.
        """
        await trio.to_thread.run_sync(self._resume)
        self._trio_token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._main, name="signd-audit", daemon=True)
        self._thread.start()
        log.info(
            "audit log open",
            extra={"file": str(self._path(self._index)), "seq": self._seq, "mode": self.mode},
        )

    async def aclose(self) -> None:
        """Write what is queued, then stop."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._thread.join)
        self._thread = None
        if self._dirfd >= 0:
            os.close(self._dirfd)
            self._dirfd = -1

    # ------------------------------------------------------------ hot path

    def record(
        self,
        who: Who,
        notes: Notes | None,
        frame: bytes,
        recipient: Recipient,
        request_id: int | None,
    ) -> None:
        """Queue the record of answer ``frame`` (to the request ``notes`` describe);
        ``recipient.audited`` runs in trio once it is written (strict: durable).

        In relaxed mode it runs at once.  For an answer to a request that went
        through ``asked``, use ``answered``.
        """
        if self.mode == "relaxed":
            self._queue.put((who, notes, time.perf_counter_ns(), frame, None, request_id))
            recipient.audited(request_id, frame, True)
        else:
            self._queue.put((who, notes, time.perf_counter_ns(), frame, recipient, request_id))

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

    def answered(self, pending: Pending, frame: bytes) -> None:
        """``frame`` answers the request ``pending`` stands for; ``recipient.audited``
        runs once the request's record is durable (strict), at once if it already
        is (the outcome record then follows, without holding the answer), or at
        once in relaxed mode."""
        if self.mode == "relaxed":
            self._queue.put(
                (
                    pending.who,
                    pending.notes,
                    time.perf_counter_ns(),
                    frame,
                    None,
                    pending.request_id,
                )
            )
            pending.recipient.audited(pending.request_id, frame, True)
            return
        pending.answer = (time.perf_counter_ns(), frame)
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
        ended, frame = p.answer
        self._queue.put((p.who, p.notes, ended, frame, p.recipient, p.request_id))

    # ------------------------------------------------------------ writer thread

    def _path(self, index: int) -> Path:
        return self.directory / _name(index)

    def _resume(self) -> None:
        """Check the directory, find where the chain ends, open the current file.

        Every file is opened relative to the directory, never through a
        symlink, and must be a regular file with one link.

        Raises:
            AuditError, OSError.
        """
        self._dirfd = _open_directory(self.directory)
        names = _log_files(self._dirfd, self.directory)
        if not names:
            self._index = 1
        else:
            self._index = int(FILE_RE.fullmatch(names[-1])[1])  # type: ignore[index]
            self._seq, self._prev = _chain_end(self._dirfd, self.directory, names)
            if len(names) > 1:
                self._older_file = names[-2]
        self._file = _open_log(self._dirfd, self.directory, _name(self._index))

    def files(self) -> list[str]:
        """The names of the log's files, oldest first."""
        return _log_files(self._dirfd, self.directory)

    def _main(self) -> None:
        assert self._trio_token is not None
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
            stop = any(i is _STOP for i in items)
            controls = [i for i in items if isinstance(i, _Control)]
            batch: list[Entry | Pending] = [
                i for i in items if i is not _STOP and not isinstance(i, _Control)
            ]
            lines, answered, withheld, settled, failed = self._seal_batch(batch)
            ok = True
            if lines:
                started = time.perf_counter()
                try:
                    self._file.write(b"".join(lines))
                    self._file.flush()
                    now = time.monotonic()
                    if self.mode == "strict":
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
                    if self.on_write is not None:
                        self.on_write(time.perf_counter() - started)
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
                        self._trio_token.run_sync_soon(_finish, done, written)
                for cells, written in ((settled, ok), (failed, False)):
                    if cells:
                        self._trio_token.run_sync_soon(self._settle, cells, written)
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
                        line, digest = _seal_entry(
                            (item.who, item.notes, answer[0], answer[1], None, None),
                            seq,
                            self._prev,
                            item.offset,  # the same ts as its request record
                            item.seq,
                        )
                    elif answer is not None:  # answered already: one record
                        line, digest = _seal_entry(
                            (item.who, item.notes, answer[0], answer[1], None, None),
                            seq,
                            self._prev,
                            clock_offset,
                        )
                        item.seq = 0
                        settled.append(item)
                    else:
                        line, digest = _seal_request(
                            item.who, item.notes, seq, self._prev, clock_offset
                        )
                        item.seq, item.offset = seq, clock_offset
                        settled.append(item)
                else:
                    line, digest = _seal_entry(item, seq, self._prev, clock_offset)
                    if item[4] is not None:
                        answered.append(item)
            except Exception:
                # One bad record must not stop the writer: every later answer
                # would wait for it forever.
                log.exception("an audit record could not be encoded")
                self.failures += 1
                if isinstance(item, Pending):
                    if not item.durable:
                        failed.append(item)
                elif item[4] is not None:
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
        self._older_file = _name(self._index)
        self._index += 1
        self._file = _open_log(self._dirfd, self.directory, _name(self._index))
        os.fsync(self._dirfd)

    # ------------------------------------------------------------ checkpoints
    #
    # The writer thread decides when a checkpoint is due (every
    # ``checkpoint_every`` records, every ``checkpoint_interval`` seconds when
    # records were written, at rotation, at start and at shutdown) and asks
    # trio for it with the chain head at that moment; it goes on writing.  A
    # trio task (``Checkpointer``) signs the head on the token, stores it on
    # the token as the chain head, and queues the checkpoint record back here,
    # where it is chained like any record.

    def _head_file(self) -> str:
        """The file the newest record is in."""
        if self._file is not None and self._file.tell() == 0 and self._older_file:
            return self._older_file
        return _name(self._index)

    def _ask_checkpoint(self, reason: str, done: trio.Event | None = None) -> None:
        if self._ask is None:
            if done is not None:
                self._wake(done)
            return
        if self.mode == "relaxed":
            # The token will say this head exists: it must be on disk first.
            self._file.flush()
            os.fsync(self._file.fileno())
        self._pending = True
        self._since_checkpoint = 0
        self._asked_at = time.monotonic()
        self._ask(_Ask(self._seq, self._prev, self._head_file(), reason, done))

    def _wake(self, done: trio.Event) -> None:
        assert self._trio_token is not None
        with contextlib.suppress(trio.RunFinishedError):
            self._trio_token.run_sync_soon(done.set)

    def _checkpoint_step(self, controls: list[_Control], written: int) -> None:
        """After a group commit: append what trio handed back, ask for what is due."""
        self._since_checkpoint += written
        for c in controls:
            if isinstance(c, _Append):
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
            elif isinstance(c, _Unsigned):
                self._pending = False
            elif isinstance(c, _Now):
                if c.reason == "shutdown" and self._since_checkpoint == 0 and not self._pending:
                    self._wake(c.done)  # the newest record is a checkpoint already
                else:
                    self._ask_checkpoint(c.reason, c.done)
            elif (  # _Tick
                self._since_checkpoint
                and not self._pending
                and time.monotonic() - self._asked_at >= self.checkpoint_interval
            ):
                self._ask_checkpoint("interval")
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
        None if no file holds it.  Any thread."""
        names = self.files()
        for name in reversed(names):
            first = None
            for rec in _records(self._dirfd, self.directory, name):
                s = rec.get("seq")
                if type(s) is not int:
                    continue
                first = s if first is None else first
                if s == seq:
                    return str(rec.get("hash")), name
            if first is not None and first <= seq:
                return None
        return None

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the newest record; read before the writer starts."""
        return self._seq, self._prev


class _Control:
    """What trio hands the writer thread besides answers."""


@dataclass(frozen=True, slots=True)
class _Ask:
    """The writer asks trio to sign this head (a checkpoint)."""

    seq: int
    hash: str
    file: str
    reason: str
    done: trio.Event | None


@dataclass(frozen=True, slots=True)
class _Append(_Control):
    """A record the daemon made, to chain and write (a checkpoint, a mismatch)."""

    record: dict[str, Any]
    done: trio.Event | None = None


@dataclass(frozen=True, slots=True)
class _Unsigned(_Control):
    """A checkpoint asked for could not be made."""


@dataclass(frozen=True, slots=True)
class _Now(_Control):
    """Checkpoint now (start, shutdown); ``done`` is set once it is written."""

    reason: str
    done: trio.Event


@dataclass(frozen=True, slots=True)
class _Tick(_Control):
    """Time passed: a checkpoint may be due (``checkpoint_interval``)."""


# ---------------------------------------------------------------- files, safely


def _name(index: int) -> str:
    return f"audit-{index:06d}.jsonl"


def _open_directory(directory: Path) -> int:
    """The audit directory, opened (made if missing, mode 0750), after checking
    it and every directory above it as ``trusted.py`` does: owned by root or
    this process's user, and no one else may write in it.

    Raises:
        AuditError, OSError.
    """
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    try:
        where, _ = open_trusted_dir(str(directory), "audit.dir")
    except NotTrusted as exc:
        raise AuditError(str(exc)) from None
    try:
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=where)
    finally:
        os.close(where)


def _log_files(dirfd: int, directory: Path) -> list[str]:
    """The log's files by index; anything by that name that is not a plain
    regular file (a symlink, a FIFO, a hard link) is refused.

    Raises:
        AuditError.
    """
    found = []
    for name in os.listdir(dirfd):
        m = FILE_RE.fullmatch(name)
        if m is None:
            continue
        _check_file(os.stat(name, dir_fd=dirfd, follow_symlinks=False), directory / name)
        found.append((int(m[1]), name))
    return [name for _, name in sorted(found)]


def _check_file(st: os.stat_result, path: Path) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise AuditError(f"{path} is a symlink; the audit log never follows one: remove it")
    if not stat.S_ISREG(st.st_mode):
        raise AuditError(f"{path} is not a regular file: remove it")
    if st.st_nlink != 1:
        raise AuditError(f"{path} has {st.st_nlink} hard links; an audit file has one")


def _open_at(dirfd: int, directory: Path, name: str, flags: int, mode: int = 0o640) -> int:
    """Open ``name`` in the directory: never through a symlink, never a
    FIFO or device (O_NONBLOCK: no wait on one), checked once open.

    Raises:
        AuditError, OSError.
    """
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(name, flags, mode, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: a symlink
            raise AuditError(
                f"{directory / name} is a symlink; the audit log never follows one: remove it"
            ) from None
        raise
    try:
        _check_file(os.fstat(fd), directory / name)
    except AuditError:
        os.close(fd)
        raise
    return fd


def _open_log(dirfd: int, directory: Path, name: str) -> Any:
    """Open an audit file for appending; mode 0640."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    fd = _open_at(dirfd, directory, name, flags)
    os.fchmod(fd, 0o640)
    return os.fdopen(fd, "ab")


def _records(dirfd: int, directory: Path, name: str) -> list[dict[str, Any]]:
    """The records of one file that parse (others are skipped: verify names them)."""
    fd = _open_at(dirfd, directory, name, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    out = []
    for line in data.split(b"\n"):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _chain_end(dirfd: int, directory: Path, names: list[str]) -> tuple[int, str]:
    """(seq, hash) of the last intact record.  A torn tail (a last line with no
    newline: a crash mid-write, never acknowledged) is cut off; a complete line
    that is not a record is left for ``signctl audit verify`` to report, and
    the chain goes on from the record before it.  An empty last file continues
    the one before."""
    for name in reversed(names):
        fd = _open_at(dirfd, directory, name, os.O_RDWR)
        with os.fdopen(fd, "r+b") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                log.warning("cutting a torn audit record", extra={"file": str(directory / name)})
                f.truncate(keep)
                data = data[:keep]
        for line in reversed(data.split(b"\n")):
            try:
                rec = json.loads(line)
                seq, digest = rec["seq"], rec["hash"]
            except (ValueError, KeyError, TypeError, RecursionError):
                continue
            if type(seq) is int and isinstance(digest, str):
                return seq, digest
    return 0, GENESIS


def _finish(entries: list[Entry], ok: bool) -> None:
    for _, _, _, frame, recipient, request_id in entries:
        try:
            if recipient is not None:  # always: only those are handed back
                recipient.audited(request_id, frame, ok)
        except Exception:
            log.exception("an audited answer could not be sent")


class _Wait:
    """A ``Recipient`` that just waits for its record."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ok = False

    def audited(self, request_id: int | None, frame: bytes, ok: bool) -> None:
        self.ok = ok
        self.done.set()


async def record_own_action(audit: AuditLog, op: str, key: str, frame: bytes) -> bool:
    """Record something the daemon did by itself (a scheduled rotation) and wait
    until the record is written; its principal is the daemon's own process.

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
    audit.record(
        who_fields(me), (op, key, None, None, None, time.perf_counter_ns()), frame, wait, None
    )
    await wait.done.wait()
    return wait.ok


# ---------------------------------------------------------------- checkpoints, trio side


class Signer(Protocol):
    """Signs checkpoints with the audit key (the service)."""

    def audit_key_version(self) -> int:
        """The audit key's version that signs now.  Raises: WireError."""

    async def sign_audit(self, version: int, message: bytes) -> bytes:
        """A signature of ``message`` by that version.  Raises: WireError."""


class MetadataStore(Protocol):
    """Where the chain head is kept: data objects on the token (the token pool)."""

    async def load_metadata(self, name: str | None = None) -> list[Any]: ...

    async def write_metadata(self, name: str, revision: int, value: bytes) -> None: ...


def head_label(directory: Path) -> str:
    """The token object that holds a log's chain head: one per audit directory,
    so daemons sharing a token keep one each.  Not a valid key name (``:``),
    so no client's key record can ever take it."""
    where = os.fsencode(os.path.realpath(directory))
    return "signd:audit-head:" + hashlib.sha256(where).hexdigest()[:16]


class TokenHead:
    """The chain head on the token: the newest checkpoint's (seq, hash, file)."""

    def __init__(self, store: MetadataStore, label: str) -> None:
        self.store = store
        self.label = label
        self.revision = 0
        self.head: AuditHead | None = None

    async def read(self) -> AuditHead | None:
        """Raises: WireError (the token), AuditError (the object is unreadable)."""
        blobs = await self.store.load_metadata(self.label)
        if not blobs:
            return None
        self.revision = blobs[0].revision
        try:
            value = json.loads(blobs[0].value)
            self.head = AuditHead(
                chain=str(value["chain"]),
                seq=int(value["seq"]),
                hash=str(value["hash"]),
                file=str(value["file"]),
                time=float(value["time"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(
                f"the chain head on the token ({self.label}) is unreadable: {exc}"
            ) from None
        return self.head

    async def write(self, head: AuditHead) -> None:
        """Raises: WireError."""
        value = json.dumps(
            {
                "chain": head.chain,
                "seq": head.seq,
                "hash": head.hash,
                "file": head.file,
                "time": head.time,
            },
            sort_keys=True,
        ).encode()
        try:
            await self.store.write_metadata(self.label, self.revision + 1, value)
        except Conflict:  # written elsewhere meanwhile (a second daemon on the same dir?)
            await self.read()
            await self.store.write_metadata(self.label, self.revision + 1, value)
        self.revision += 1
        self.head = head


class Checkpointer:
    """Signs the checkpoints the writer thread asks for, keeps the chain head
    on the token, and checks at start that the log matches that head.

    ``on_mismatch``: ``refuse`` (``start`` raises AuditError) or
    ``continue`` (a ``chain_mismatch`` record is written and the chain goes on).
    """

    def __init__(
        self,
        audit: AuditLog,
        signer: Signer,
        head: TokenHead,
        *,
        token: str,
        on_mismatch: str = "refuse",
    ) -> None:
        self.audit = audit
        self.signer = signer
        self.token_head = head
        self.token = token
        self.on_mismatch = on_mismatch
        self.chain = head.label
        self.chain_ok = True
        self.mismatches = 0
        self.failures = 0
        self._send, self._receive = trio.open_memory_channel[_Ask](math.inf)
        self._trio_token: trio.lowlevel.TrioToken | None = None

    @property
    def head(self) -> AuditHead | None:
        """The chain head as the newest checkpoint signed it."""
        return self.token_head.head

    async def start(self, nursery: trio.Nursery) -> None:
        """Check the log against the token's head, then checkpoint its start.

        Raises:
            AuditError: the log does not match and ``on_mismatch`` is refuse.
            WireError: the token cannot be read.
        """
        self._trio_token = trio.lowlevel.current_trio_token()
        head = await self.token_head.read()
        problem = None
        if head is not None:
            problem = await trio.to_thread.run_sync(self._mismatch, head)
        if problem is not None:
            self.chain_ok = False
            self.mismatches += 1
            log.error(
                "AUDIT LOG DOES NOT MATCH THE CHAIN HEAD ON THE TOKEN",
                extra={
                    "problem": problem,
                    "dir": str(self.audit.directory),
                    "on_mismatch": self.on_mismatch,
                },
            )
            if self.on_mismatch != "continue":
                raise AuditError(
                    f"the audit log in {self.audit.directory} does not match the chain head "
                    f"on the token: {problem}. Restore the missing or altered files, or set "
                    '[audit] on_mismatch = "continue" to start a new chain segment (see '
                    "OPERATIONS.md)"
                )
        self.audit._ask = self._ask_from_writer
        nursery.start_soon(self._run)
        nursery.start_soon(self._tick)
        if problem is not None and head is not None:
            self.audit._queue.put(
                _Append(
                    {
                        "kind": CHAIN_MISMATCH,
                        "detail": problem,
                        "expected_seq": head.seq,
                        "expected_hash": head.hash,
                        "ts": round(time.time(), 6),
                    }
                )
            )
        await self.now("start")

    def _mismatch(self, head: AuditHead) -> str | None:
        """What is wrong with the log, given the token's chain head; None if nothing."""
        seq, _ = self.audit.head
        if head.seq == 0:
            return None  # the head of an empty log: every log starts there
        if head.seq > seq:
            return (
                f"the token's chain head is record {head.seq} (checkpoint of "
                f"{_utc(head.time)}, in {head.file}), but the log ends at record {seq}: "
                "records or files were removed"
            )
        found = self.audit.find(head.seq)
        if found is None:
            return (
                f"record {head.seq}, the token's chain head (in {head.file}), is not in the "
                "log: its files were removed or replaced"
            )
        digest, name = found
        if digest != head.hash:
            return (
                f"record {head.seq} in {name} is not the one the token's chain head names "
                "(another hash): the log was rewritten"
            )
        if name != head.file:
            return f"record {head.seq} is in {name}, but the token's chain head says {head.file}"
        return None

    async def now(self, reason: str) -> bool:
        """Checkpoint the chain as it is now and wait until it is written
        (``reason``: start, shutdown); False if that did not happen in time."""
        done = trio.Event()
        self.audit._queue.put(_Now(reason, done))
        with trio.move_on_after(2 * CHECKPOINT_TIMEOUT):
            await done.wait()
        return done.is_set()

    def _ask_from_writer(self, ask: _Ask) -> None:
        """The writer thread asks for a checkpoint."""
        assert self._trio_token is not None
        try:
            self._trio_token.run_sync_soon(self._send.send_nowait, ask)
        except trio.RunFinishedError:
            self.audit._queue.put(_Unsigned())

    async def _tick(self) -> None:
        while True:
            await trio.sleep(max(0.01, self.audit.checkpoint_interval / 4))
            self.audit._queue.put(_Tick())

    async def _run(self) -> None:
        async for ask in self._receive:
            await self._checkpoint(ask)

    async def _checkpoint(self, ask: _Ask) -> None:
        fields: dict[str, Any] = {
            "chain": self.chain,
            "file": ask.file,
            "head_hash": ask.hash,
            "head_seq": ask.seq,
            "key": AUDIT_KEY,
            "reason": ask.reason,
            "token": self.token,
            "ts": round(time.time(), 6),
        }
        try:
            with trio.fail_after(CHECKPOINT_TIMEOUT):
                fields["version"] = self.signer.audit_key_version()
                sig = await self.signer.sign_audit(fields["version"], checkpoint_message(fields))
        except (WireError, trio.TooSlowError) as exc:
            self.failures += 1
            log.error("an audit checkpoint could not be signed", extra={"error": str(exc)})
            self.audit._queue.put(_Unsigned())
            if ask.done is not None:
                ask.done.set()
            return
        # The head on the token first: once the record is in the log, the
        # token must not be behind it (a crash in between leaves the token
        # naming a record the log has, which is no mismatch).
        head = AuditHead(self.chain, ask.seq, ask.hash, ask.file, fields["ts"])
        try:
            with trio.fail_after(CHECKPOINT_TIMEOUT):
                await self.token_head.write(head)
        except (WireError, trio.TooSlowError) as exc:
            self.failures += 1
            log.error(
                "the audit chain head could not be stored on the token",
                extra={"error": str(exc), "seq": ask.seq},
            )
        record = {"kind": CHECKPOINT, **fields, "sig": base64.b64encode(sig).decode()}
        self.audit._queue.put(_Append(record, ask.done))
        log.debug("audit checkpoint", extra={"seq": ask.seq, "reason": ask.reason})


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
