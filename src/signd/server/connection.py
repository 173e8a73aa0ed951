"""One client connection: its buffers, its limits, its audit bookkeeping.

Answers are collected per scheduling round and flushed together by the
server's flusher: one system call per connection per round, no writer task
woken per answer.  What a connection holds (a partial frame, requests read
and not answered, answers not sent) is counted here (``held``) for the
server's memory budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from ..access.policy import principal_of
from ..audit.facts import Outcome
from ..audit.log import AuditLog
from ..audit.records import notes_of, who_fields
from ..audit.writer import Pending
from ..config import LimitsConfig
from ..errors import InternalError
from ..metrics import Limit, Metrics
from ..outbox import Outbox
from ..protocol import FrameDecoder, Request, encode_error

__all__ = ["Connection"]


class Connection:
    """One client, served by ``Server``: answers go through ``send`` and
    leave in the next ``flush``."""

    __slots__ = (
        "_can_read",
        "_settled",
        "audit",
        "audit_more",
        "audit_open",
        "audit_who",
        "charged",
        "closed_idle",
        "decoder",
        "dirty",
        "dup_sizes",
        "eof",
        "evicted",
        "fatal",
        "idle_closed",
        "idle_mark",
        "in_bytes",
        "inflight",
        "limits",
        "metrics",
        "outbox",
        "owed",
        "pending",
        "pending_bytes",
        "principal",
        "read_scope",
        "reads",
        "schedule_flush",
        "scope",
        "sizes",
        "stream",
    )

    def __init__(
        self,
        stream: trio.SocketStream,
        limits: LimitsConfig,
        schedule_flush: Callable[[Connection], None],
        metrics: Metrics,
        audit: AuditLog | None,
    ) -> None:
        self.stream = stream
        self.limits = limits
        self.metrics = metrics
        self.decoder = FrameDecoder(limits.max_frame)
        self.outbox = Outbox(stream)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.dirty = False
        self.eof = False
        #: On shutdown: the bytes the client had sent and the daemon not read yet.
        self.owed = 0
        #: the id-nil error frame to send once every request read is answered,
        #: then close (``frame_too_large``): the reader has stopped
        self.fatal: bytes | None = None
        self.principal = principal_of(stream.socket)
        self.audit = audit
        # Requests in flight, by id, for their audit records; a client that
        # reuses an id still in flight has the later ones wait in audit_more.
        self.audit_open: dict[int, Pending] = {}
        self.audit_more: dict[int, list[Pending]] = {}
        self.audit_who = who_fields(self.principal) if audit is not None else None
        self.schedule_flush = schedule_flush
        self.inflight = 0
        #: reads that brought bytes; the idle sweeper compares it between sweeps
        self.reads = 0
        #: (reads, when) as the idle sweeper last found this connection quiet
        self.idle_mark: tuple[int, float] | None = None
        #: set by the idle sweeper: the reader stops, and the connection is closed
        self.idle_closed = False
        #: it was closed for its idle time-out (counted once the socket is closed)
        self.closed_idle = False
        #: the scope of the read waiting now, for the idle sweeper to cancel
        self.read_scope: trio.CancelScope | None = None
        self._can_read = trio.lowlevel.ParkingLot()
        self._settled = trio.lowlevel.ParkingLot()
        #: body bytes of the requests read and not answered yet, in all and by
        #: id (an id reused while in flight keeps its further sizes in dup_sizes)
        self.in_bytes = 0
        self.sizes: dict[int, int] = {}
        self.dup_sizes: dict[int, list[int]] = {}
        #: the bytes this connection holds as the server's budget last counted them
        self.charged = 0
        #: closed for holding too much memory: nothing more is read or sent
        self.evicted = False
        #: the conversation's cancel scope (an eviction cancels it)
        self.scope: trio.CancelScope | None = None

    def held(self) -> int:
        """Bytes this connection holds now: a partial frame, requests read and
        not answered, answers not sent."""
        return (
            self.decoder.buffered + self.in_bytes + self.pending_bytes + self.outbox.backlog_bytes
        )

    def hold(self, request_id: int, size: int) -> None:
        """Request ``request_id`` of ``size`` body bytes was read."""
        self.in_bytes += size
        if request_id in self.sizes:
            self.dup_sizes.setdefault(request_id, []).append(size)
        else:
            self.sizes[request_id] = size

    def answered(self, request_id: int, frame: bytes, outcome: Outcome) -> None:
        """The service's reply: the request's bytes are let go, then ``reply``."""
        more = self.dup_sizes.get(request_id) if self.dup_sizes else None
        if more:
            self.in_bytes -= more.pop()
            if not more:
                del self.dup_sizes[request_id]
        else:
            self.in_bytes -= self.sizes.pop(request_id, 0)
        self.reply(request_id, frame, outcome)

    def reply(self, request_id: int | None, frame: bytes, outcome: Outcome) -> None:
        """Send ``frame``, the answer to ``request_id``, once the audit log has
        its record (with ``outcome``, the facts the audit log records about it:
        it never decodes the frame)."""
        audit, who = self.audit, self.audit_who
        if audit is None or who is None:
            self.inflight -= 1
            self.send(frame)
            return
        pending = None
        if request_id is not None:
            pending = self.audit_open.pop(request_id, None)
            if self.audit_more:
                waiting = self.audit_more.get(request_id)
                if waiting:  # the next request that reused this id
                    self.audit_open[request_id] = waiting.pop(0)
                    if not waiting:
                        del self.audit_more[request_id]
        if pending is None:  # an answer to no request read here: recorded alone
            audit.record(who, None, frame, outcome, self, request_id)
        else:
            audit.answered(pending, frame, outcome)

    def audited(self, request_id: int | None, frame: bytes, ok: bool) -> None:
        """The audit log has the record of the request answered by ``frame``
        (strict: durable): send it."""
        self.inflight -= 1
        if ok:
            self.send(frame)
        else:  # strict: no answer without its record
            self.send(
                encode_error(
                    request_id,
                    InternalError("the audit log could not be written; the answer is withheld"),
                )
            )

    def opened(self, requests: list[Request]) -> list[bytes | None]:
        """Note what ``requests`` (read together) ask, and when, for their audit
        records; in strict mode those records are queued now, to be made
        durable while the requests are carried out.

        Returns, per request, the SHA-256 of its one ``message`` that its
        record states (None where it has none): what a SHA-256 algorithm
        signs, so that the service need not hash the message again.
        """
        audit, who = self.audit, self.audit_who
        assert audit is not None
        assert who is not None
        now = time.perf_counter_ns()
        sha256s: list[bytes | None] = []
        for req in requests:
            notes = notes_of(req, now)
            pending = audit.asked(who, notes, self, req.id)
            if self.audit_open.setdefault(req.id, pending) is not pending:
                self.audit_more.setdefault(req.id, []).append(pending)
            # data_sha256 is the SHA-256 of the message itself only for one
            # message (not a digest, not a batch's items).
            one = notes[3] is None and getattr(req.args, "message", None) is not None
            sha256s.append(notes[2] if one else None)
        return sha256s

    def send(self, frame: bytes) -> None:
        if self.evicted:
            return  # closed: no one is reading, and the memory must go
        self.pending.append(frame)
        self.pending_bytes += len(frame)
        if not self.dirty:
            self.dirty = True
            self.schedule_flush(self)

    def flush(self) -> None:
        self.dirty = False
        if self.pending:
            data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
            self.pending.clear()
            self.pending_bytes = 0
            self.outbox.write(data)
        self._can_read.unpark_all()
        if self.inflight == 0:
            self._settled.unpark_all()

    def quiet(self) -> bool:
        """Nothing in flight, nothing unsent: all that is left is to read."""
        return (
            self.inflight == 0
            and not self.dirty
            and not self.pending
            and self.outbox.backlog_bytes == 0
        )

    async def wait_readable(self) -> None:
        """Wait while too many requests are in flight or too many bytes unsent.

        Each pause is counted once, under the limit that caused it.
        """
        lim = self.limits
        paused: Limit | None = None
        while True:
            if self.outbox.backlog_bytes + self.pending_bytes >= lim.max_output_buffer:
                if paused != "max_output_buffer":
                    paused = "max_output_buffer"
                    self.metrics.limit_hit(paused)
                if self.dirty:
                    # Answers of this round not yet handed to the outbox (one
                    # read can make more than the limit): the flusher must run
                    # first, or wait_empty would return at once, forever.
                    await self._can_read.park()
                else:
                    await self.outbox.wait_empty()
            elif self.inflight >= lim.max_inflight_per_connection:
                if paused != "max_inflight":
                    paused = "max_inflight"
                    self.metrics.limit_hit(paused)
                await self._can_read.park()
            else:
                return

    async def wait_settled(self) -> None:
        """Return once every request is answered and every answer sent."""
        while self.inflight > 0 or self.dirty:
            await self._settled.park()
        await self.outbox.wait_empty()
