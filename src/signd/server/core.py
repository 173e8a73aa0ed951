"""The trio transport: ``Server`` accepts, reads, dispatches and flushes.

The listening socket is made in ``listener.py``, a connection's buffers and
audit bookkeeping are in ``connection.py``, the memory budget over all
connections in ``budget.py``.

A connection's reader takes whatever one ``receive_some`` delivered, splits it
into frames, and hands every request in it to the service's ``handle`` at once.
Answers are appended to the connection's output buffer; the writer sends
everything buffered with one ``send_all``.  There is no task and no event per
request.

Per connection, requests in flight are bounded (``max_inflight``) and so are
unsent answers (``max_output``): past either, the reader stops reading, so a
flooding or non-reading client is slowed by the socket's own flow control and
cannot grow the daemon's memory.

A connection with nothing in flight and nothing unsent that has sent nothing
for ``idle_timeout`` is closed by a sweeper task, which looks at every
connection a tenth of that apart: nothing on the hot path but one counter per
read.  The close never consumes a byte the client sent: a request that crosses
it stays unread, so the client's read fails with ECONNRESET (or its send with
EPIPE), never with a plain EOF, and knows that the request was not carried out.

Every limit that stops something is counted in ``signd_limit_hits_total``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import socket
import struct
import termios
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Final, Protocol

import trio

from ..access.policy import Principal
from ..audit.log import AuditLog
from ..config import LimitsConfig
from ..errors import Busy, FrameTooLarge, ShuttingDown, WireError
from ..metrics import Limit, Metrics
from ..protocol import BadRequest, Request, decode_request, encode_error
from ..service.core import Reply, SlowWork
from .budget import Budget
from .connection import Connection

__all__ = ["Handler", "Server"]

log = logging.getLogger("signd.server")

RECEIVE_SIZE: Final = 65536
#: Rounds with at most this many requests or answers count as light traffic.
WARM_AFTER: Final = 2
#: How long a closing connection discards what its client still sends.
LINGER: Final = 1.0
#: The idle sweeper looks at the connections ``idle_timeout / IDLE_SWEEPS``
#: apart, and at least every ``IDLE_SWEEP_MAX`` seconds: an idle connection is
#: closed after ``idle_timeout`` and at most about a fifth more.
IDLE_SWEEPS: Final = 10
IDLE_SWEEP_MAX: Final = 5.0


def _unread(sock: trio.socket.SocketType) -> int:
    """Bytes the peer has sent on ``sock`` that are not read yet."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    count: int = struct.unpack("i", raw)[0]
    return count


class Handler(Protocol):
    """What the server hands the requests it reads to (the service)."""

    def handle(
        self,
        requests: Sequence[Request],
        reply: Reply,
        source: object,
        who: Principal,
        sha256s: Sequence[bytes | None] | None = None,
    ) -> list[SlowWork]:
        """Answer ``requests`` of connection ``source`` through ``reply``;
        returns the slow ones, for the server to run as tasks.  ``sha256s``
        (with audit on): the SHA-256 of each request's one message, or None."""
        ...


class Server:
    """Serves ``service`` on a listening socket until ``shutdown`` is called.

    ``drop(connection, error)`` fails that connection's requests still queued
    (for the token) with ``error``: an evicted connection's.
    """

    def __init__(
        self,
        service: Handler,
        limits: LimitsConfig,
        *,
        metrics: Metrics,
        drop: Callable[[Connection, WireError], object],
        audit: AuditLog | None,
        keep_warm: float = 0.0,
    ) -> None:
        self.audit = audit
        self.service = service
        self.metrics = metrics
        self.limits = limits
        self.connections = 0
        #: the connections being served (for the in-flight gauge)
        self.live: set[Connection] = set()
        #: connections being served, by the peer's uid
        self.connections_by_uid: dict[int, int] = {}
        self.budget = Budget(limits, self.live, metrics, drop)
        self._accepting = trio.CancelScope()
        self._readers: set[trio.CancelScope] = set()
        self._stopping = False
        self._drain_deadline = math.inf
        self._flushes: list[Connection] = []
        self._flush_wake = trio.lowlevel.ParkingLot()
        self.keep_warm = keep_warm
        self._warm_until = 0.0
        self._warm_wake = trio.lowlevel.ParkingLot()
        self._sweep_wake = trio.lowlevel.ParkingLot()

    @property
    def buffered(self) -> int:
        """Bytes the connections hold now (requests, answers, partial frames)."""
        return self.budget.buffered

    def apply_limits(self, limits: LimitsConfig) -> None:
        """New limits, for the connections already open too (a reload).

        Must be called from trio (it wakes the idle sweeper, so a new
        ``idle_timeout`` applies at once).
        """
        self.limits = limits
        self.budget.limits = limits
        for conn in list(self.live):
            conn.limits = limits
            conn.decoder.max_frame = limits.max_frame
        self._sweep_wake.unpark_all()

    def shutdown(self) -> None:
        """Stop accepting; answer what clients already sent, then close.

        Must be called from trio (it reads the trio clock).
        """
        if self._stopping:
            return
        self._stopping = True
        self._drain_deadline = trio.current_time() + self.limits.drain_timeout
        self._accepting.cancel()
        # What each client sent before now is answered; what it sends later
        # is not read (it waits for the next process, or the client retries).
        for conn in self.live:
            conn.owed = _unread(conn.stream.socket)
        for scope in list(self._readers):
            scope.cancel()

    async def serve(
        self,
        sock: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with trio.open_nursery() as outer:
            outer.start_soon(self._flusher)
            outer.start_soon(self._sweep_idle)
            if self.keep_warm > 0:
                outer.start_soon(self._keep_warm)
            async with trio.open_nursery() as nursery:
                with self._accepting:
                    task_status.started()
                    if on_ready is not None:
                        on_ready()
                    while True:
                        try:
                            stream = await listener.accept()
                        except OSError as exc:
                            if exc.errno in (
                                errno.EMFILE,
                                errno.ENFILE,
                                errno.ENOBUFS,
                                errno.ENOMEM,
                            ):
                                log.error("accept failed", extra={"error": exc.strerror})
                                await trio.sleep(0.1)
                                continue
                            raise
                        nursery.start_soon(self._serve_connection, stream)
                await listener.aclose()
            # Every connection is done; nothing is left to flush.
            outer.cancel_scope.cancel()

    def _schedule_flush(self, conn: Connection) -> None:
        self._flushes.append(conn)
        if len(self._flushes) == 1:
            self._flush_wake.unpark()

    async def _flusher(self) -> None:
        """Send what each connection was answered, once per scheduling round.

        Answers come from anywhere (a reader, a token batch, a slow task).
        Woken by the first of them, this task runs only after the task that
        produced them yields, so every answer of that round goes out in one
        write per connection.
        """
        while True:
            if not self._flushes:
                await self._flush_wake.park()
            flushes, self._flushes = self._flushes, []
            for conn in flushes:
                conn.flush()
                self.budget.account(conn)
            if len(flushes) <= WARM_AFTER:
                self._warm()

    def _warm(self) -> None:
        """Light traffic: keep the loop polling a little before it sleeps."""
        if self.keep_warm > 0:
            self._warm_until = time.perf_counter() + self.keep_warm
            self._warm_wake.unpark()

    async def _keep_warm(self) -> None:
        """After light activity, keep the event loop polling instead of sleeping.

        Waking an idle process costs more than a signature here (tens of µs
        in a VM).  While this task is runnable, trio polls for I/O without
        blocking, so the worker's answer and the client's next request are
        picked up at once.  It yields between polls, so it blocks nothing;
        under heavy load it stays parked (``WARM_AFTER``) and costs nothing.
        """
        while True:
            await self._warm_wake.park()
            while time.perf_counter() < self._warm_until:
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def _sweep_idle(self) -> None:
        """Close the connections that have been quiet for ``idle_timeout``.

        A connection is marked when first found quiet (nothing in flight or
        unsent) with its read count; if a later sweep finds it still quiet
        and not read from since, it has been idle at least since the mark,
        and once that is ``idle_timeout`` ago its reader is stopped.  A
        connection is never closed early, at worst a sweep or two late.
        """
        while True:
            idle = self.limits.idle_timeout
            if idle <= 0 or self._stopping:
                await self._sweep_wake.park()  # until a reload sets one
                continue
            with trio.move_on_after(min(idle / IDLE_SWEEPS, IDLE_SWEEP_MAX)):
                await self._sweep_wake.park()
            idle = self.limits.idle_timeout
            if idle <= 0 or self._stopping:
                continue
            now = trio.current_time()
            for conn in list(self.live):
                if conn.idle_closed:
                    continue
                if not conn.quiet():
                    conn.idle_mark = None
                    continue
                mark = conn.idle_mark
                if mark is None or mark[0] != conn.reads:
                    conn.idle_mark = (conn.reads, now)
                elif now - mark[1] >= idle:
                    conn.idle_closed = True
                    if conn.read_scope is not None:
                        conn.read_scope.cancel()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        # Whatever happens on one connection stays on it: this task never
        # raises, so no client can take the daemon or its other clients down.
        self.connections += 1
        uid: int | None = None
        conn: Connection | None = None
        try:
            if self.connections > self.limits.max_connections:
                await self._refuse(stream, Busy("too many connections; try again later"))
            elif self._stopping:
                await self._refuse(stream, ShuttingDown("signd is shutting down"))
            else:
                conn = Connection(
                    stream, self.limits, self._schedule_flush, self.metrics, self.audit
                )
                held = self.connections_by_uid.get(conn.principal.uid, 0)
                if held >= self.limits.max_connections_per_uid:
                    await self._refuse(
                        stream,
                        Busy(
                            f"uid {conn.principal.uid} has {held} connections open, its "
                            "limit (limits.max_connections_per_uid); close one or try again later"
                        ),
                        "max_connections_per_uid",
                    )
                    return
                uid = conn.principal.uid
                self.connections_by_uid[uid] = held + 1
                conn.outbox.on_sent = partial(self.budget.account, conn)
                self.live.add(conn)
                try:
                    await self._converse(conn)
                finally:
                    self.live.discard(conn)
                    self.budget.release(conn)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer went away; there is no one left to answer
        except* Exception as group:
            log.error("connection failed", exc_info=group)
        finally:
            self.connections -= 1
            if uid is not None:
                left = self.connections_by_uid[uid] - 1
                if left:
                    self.connections_by_uid[uid] = left
                else:
                    del self.connections_by_uid[uid]
            with trio.CancelScope(shield=True):
                await stream.aclose()
            if conn is not None and conn.closed_idle:
                # After the close, so that whoever reads the count (a test, an
                # operator) finds the connection closed, not about to be.
                self.metrics.limit_hit("idle_timeout")
                log.debug(
                    "idle connection closed",
                    extra={"pid": conn.principal.pid, "idle_timeout": conn.limits.idle_timeout},
                )

    async def _converse(self, conn: Connection) -> None:
        async with trio.open_nursery() as nursery:
            conn.scope = nursery.cancel_scope
            nursery.start_soon(conn.outbox.run)
            await self._read(conn, nursery)
            if conn.idle_closed and conn.quiet():
                # Quiet, and nothing read since: no answer is owed, and no
                # linger either, so a request that crossed the close is left
                # unread (the client's read fails with ECONNRESET: not done).
                # Counted once the socket is closed (``_serve_connection``).
                conn.closed_idle = True
                nursery.cancel_scope.cancel()
                return
            # Every answer in flight is still sent, within the drain time-out.
            nursery.cancel_scope.deadline = min(
                self._drain_deadline, trio.current_time() + self.limits.drain_timeout
            )
            await conn.wait_settled()
            if conn.fatal is not None:
                # After the answers to every request read before it, as
                # PROTOCOL.md promises: a client that fails what is still
                # outstanding on an id-nil error then fails nothing carried out.
                conn.send(conn.fatal)
                await conn.wait_settled()
            if not conn.eof:
                await self._linger(conn)
            nursery.cancel_scope.cancel()
        if conn.evicted:
            if conn.fatal is not None and not conn.eof:
                await self._linger(conn)  # so the busy frame is not lost to a reset
            return
        if nursery.cancel_scope.cancelled_caught and conn.inflight:
            log.warning("drain timed out", extra={"inflight": conn.inflight})

    async def _linger(self, conn: Connection) -> None:
        """Close politely when the client may still be sending.

        Closing a Unix socket with unread bytes resets the peer, which may
        then lose the answers it has not read yet.  So: send EOF, and discard
        what still arrives until the client closes too, or briefly.
        """
        await conn.stream.send_eof()
        with trio.move_on_after(LINGER):
            while await conn.stream.receive_some(RECEIVE_SIZE):
                pass

    async def _refuse(
        self,
        stream: trio.SocketStream,
        error: Busy | ShuttingDown,
        limit: Limit = "max_connections",
    ) -> None:
        self.metrics.error(None, error)
        if isinstance(error, Busy):
            self.metrics.limit_hit(limit)
        with trio.move_on_after(1.0):
            await stream.send_all(encode_error(None, error))

    async def _read(self, conn: Connection, nursery: trio.Nursery) -> None:
        """Read and dispatch until EOF, a fatal frame, or the end of a shutdown.

        On shutdown a blocked read is interrupted, and the reader takes only
        the bytes the client had sent by then (``owed``: its requests already
        sent are in flight, and are answered), within the drain deadline.
        Requests sent later are left unread: a client that keeps its
        connection busy cannot hold the shutdown up, and since they were never
        read, none of them was carried out; the client retries them on a new
        connection, which the next process accepts.
        """
        while True:
            if self._stopping:
                with trio.move_on_at(self._drain_deadline):
                    while conn.owed > 0:
                        await conn.wait_readable()
                        data = await conn.stream.receive_some(min(conn.owed, RECEIVE_SIZE))
                        if not data:
                            conn.eof = True
                            return
                        conn.owed -= len(data)
                        conn.decoder.receive_data(data)
                        keep_open = self._dispatch(conn, nursery)
                        self.budget.account(conn)
                        if not keep_open:
                            return
                return
            await conn.wait_readable()
            if conn.idle_closed:
                return  # found idle while this reader was about to read again
            scope = trio.CancelScope()
            self._readers.add(scope)
            conn.read_scope = scope
            try:
                with scope:
                    data = await conn.stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        conn.eof = True
                        return
                    conn.reads += 1
                    conn.idle_closed = False  # the bytes came first: not idle after all
                    conn.decoder.receive_data(data)
                    keep_open = self._dispatch(conn, nursery)
                    self.budget.account(conn)
                    if not keep_open:
                        return
            finally:
                conn.read_scope = None
                self._readers.discard(scope)
            if conn.idle_closed:
                return

    def _dispatch(self, conn: Connection, nursery: trio.Nursery) -> bool:
        """Handle every complete frame; False when the stream must be closed."""
        requests: list[Request] = []
        keep_open = True
        try:
            for body in conn.decoder.frames():
                event = decode_request(body)
                if isinstance(event, BadRequest):
                    self.metrics.error(None, event.error)
                    conn.send(encode_error(event.id, event.error))
                else:
                    requests.append(event)
                    conn.hold(event.id, len(body))
        except FrameTooLarge as exc:
            # The stream cannot be resynchronised: stop reading; the error goes
            # out after the answers to the requests read before it, then close.
            self.metrics.error(None, exc)
            self.metrics.limit_hit("max_frame")
            conn.fatal = encode_error(None, exc)
            keep_open = False
        if requests:
            conn.inflight += len(requests)
            sha256s = conn.opened(requests) if conn.audit is not None else None
            who = conn.principal
            for work in self.service.handle(requests, conn.answered, conn, who, sha256s):
                nursery.start_soon(work)
            if len(requests) <= WARM_AFTER:
                self._warm()
        return keep_open
