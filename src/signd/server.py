"""The trio transport: the listening socket and one reader/writer per connection.

A connection's reader takes whatever one ``receive_some`` delivered, splits it
into frames, and hands every request in it to ``Service.handle`` at once.
Answers are appended to the connection's output buffer; the writer sends
everything buffered with one ``send_all``.  There is no task and no event per
request.

Per connection, requests in flight are bounded (``max_inflight``) and so are
unsent answers (``max_output``): past either, the reader stops reading, so a
flooding or non-reading client is slowed by the socket's own flow control and
cannot grow the daemon's memory.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import math
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Final

import trio

from .audit import AuditLog, Notes, notes_of, who_fields
from .config import LimitsConfig
from .errors import Busy, FrameTooLarge, InternalError, ShuttingDown
from .outbox import Outbox
from .policy import principal_of
from .protocol import BadRequest, FrameDecoder, Request, decode_request, encode_error
from .service import Service

__all__ = ["ListenerError", "Server", "open_listener", "systemd_socket"]

log = logging.getLogger("signd.server")

RECEIVE_SIZE: Final = 65536
#: During shutdown, a connection whose client sent nothing for this long is done.
DRAIN_IDLE: Final = 0.05
#: Rounds with at most this many requests or answers count as light traffic.
WARM_AFTER: Final = 2
#: How long a closing connection discards what its client still sends.
LINGER: Final = 1.0
SD_LISTEN_FDS_START: Final = 3


class ListenerError(Exception):
    """The listening socket could not be set up; the message says why."""


def _probe_live(path: str) -> bool:
    """True if something accepts connections on the Unix socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        return True  # e.g. EAGAIN: a live listener with a full backlog
    finally:
        probe.close()


def systemd_socket(environ: dict[str, str] | None = None) -> socket.socket | None:
    """The listening socket systemd passed (``LISTEN_FDS``), if any.

    Raises:
        ListenerError: the passed fd is not a listening Unix stream socket.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") not in (None, str(os.getpid())):
        return None
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        raise ListenerError("LISTEN_FDS is not a number") from None
    if count < 1:
        return None
    if count > 1:
        raise ListenerError(f"systemd passed {count} sockets; signd takes exactly one")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ListenerError("the socket systemd passed is not a Unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ListenerError("the socket systemd passed is not listening")
    sock.setblocking(False)
    return sock


def _gid(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenerError(f"socket group {group!r} does not exist") from None


def open_listener(
    path: str, mode: int, group: str | int | None = None, backlog: int = 1024
) -> socket.socket:
    """Bind and listen on ``path``; remove a stale socket file only if dead.

    Raises:
        ListenerError: another daemon is live there, or the path is unusable.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(f"{path} exists and is not a socket; refusing to remove it")
        if _probe_live(path):
            raise ListenerError(f"another daemon is already listening on {path}")
        log.info("removing stale socket", extra={"socket": path})
        os.unlink(path)
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ListenerError(f"directory {parent} of the socket does not exist")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bind with a restrictive umask so the socket is never briefly too open.
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if group is not None:
            os.chown(path, -1, _gid(group))
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except (OSError, ListenerError) as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(exc, ListenerError):
            raise
        raise ListenerError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


class _Connection:
    """One client.  Answers are collected per scheduling round and flushed
    together by the server's flusher: one system call per connection per
    round, no writer task woken per answer."""

    __slots__ = (
        "_can_read",
        "_settled",
        "audit",
        "audit_more",
        "audit_open",
        "audit_who",
        "decoder",
        "dirty",
        "eof",
        "inflight",
        "limits",
        "outbox",
        "pending",
        "pending_bytes",
        "principal",
        "schedule_flush",
        "stream",
    )

    def __init__(
        self,
        stream: trio.SocketStream,
        limits: LimitsConfig,
        schedule_flush: Callable[[_Connection], None],
        audit: AuditLog | None = None,
    ) -> None:
        self.stream = stream
        self.limits = limits
        self.decoder = FrameDecoder(limits.max_frame)
        self.outbox = Outbox(stream)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.dirty = False
        self.eof = False
        self.principal = principal_of(stream.socket)
        self.audit = audit
        # Requests in flight, by id, for their audit records; a client that
        # reuses an id still in flight has the later ones wait in audit_more.
        self.audit_open: dict[int, Notes] = {}
        self.audit_more: dict[int, list[Notes]] = {}
        self.audit_who = who_fields(self.principal) if audit is not None else None
        self.schedule_flush = schedule_flush
        self.inflight = 0
        self._can_read = trio.lowlevel.ParkingLot()
        self._settled = trio.lowlevel.ParkingLot()

    def reply(self, request_id: int | None, frame: bytes) -> None:
        audit, who = self.audit, self.audit_who
        if audit is None or who is None:
            self.inflight -= 1
            self.send(frame)
            return
        notes = None
        if request_id is not None:
            notes = self.audit_open.pop(request_id, None)
            if self.audit_more:
                waiting = self.audit_more.get(request_id)
                if waiting:  # the next request that reused this id
                    self.audit_open[request_id] = waiting.pop(0)
                    if not waiting:
                        del self.audit_more[request_id]
        audit.record(who, notes, frame, self, request_id)

    def audited(self, request_id: int | None, frame: bytes, ok: bool) -> None:
        """The audit log has the record of answer ``frame``: send it."""
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

    def opened(self, requests: list[Request]) -> None:
        """Note what ``requests`` (read together) ask, and when, for their audit records."""
        now = time.perf_counter_ns()
        for req in requests:
            notes = notes_of(req, now)
            if self.audit_open.setdefault(req.id, notes) is not notes:
                self.audit_more.setdefault(req.id, []).append(notes)

    def send(self, frame: bytes) -> None:
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

    async def wait_readable(self) -> None:
        """Wait while too many requests are in flight or too many bytes unsent."""
        lim = self.limits
        while True:
            if self.outbox.backlog_bytes + self.pending_bytes >= lim.max_output_buffer:
                await self.outbox.wait_empty()
            elif self.inflight >= lim.max_inflight_per_connection:
                await self._can_read.park()
            else:
                return

    async def wait_settled(self) -> None:
        """Return once every request is answered and every answer sent."""
        while self.inflight > 0 or self.dirty:
            await self._settled.park()
        await self.outbox.wait_empty()


class Server:
    """Serves ``service`` on a listening socket until ``shutdown`` is called."""

    def __init__(
        self,
        service: Service,
        limits: LimitsConfig,
        keep_warm: float = 0.0,
        audit: AuditLog | None = None,
    ) -> None:
        self.audit = audit
        self.service = service
        self.limits = limits
        self.connections = 0
        #: the connections being served (for the in-flight gauge)
        self.live: set[_Connection] = set()
        self._accepting = trio.CancelScope()
        self._readers: set[trio.CancelScope] = set()
        self._stopping = False
        self._drain_deadline = math.inf
        self._flushes: list[_Connection] = []
        self._flush_wake = trio.lowlevel.ParkingLot()
        self.keep_warm = keep_warm
        self._warm_until = 0.0
        self._warm_wake = trio.lowlevel.ParkingLot()

    def apply_limits(self, limits: LimitsConfig) -> None:
        """New limits, for the connections already open too (a reload)."""
        self.limits = limits
        for conn in list(self.live):
            conn.limits = limits
            conn.decoder.max_frame = limits.max_frame

    def shutdown(self) -> None:
        """Stop accepting; answer what clients already sent, then close.

        Must be called from trio (it reads the trio clock).
        """
        if self._stopping:
            return
        self._stopping = True
        self._drain_deadline = trio.current_time() + self.limits.drain_timeout
        self._accepting.cancel()
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

    def _schedule_flush(self, conn: _Connection) -> None:
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

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        # Whatever happens on one connection stays on it: this task never
        # raises, so no client can take the daemon or its other clients down.
        self.connections += 1
        try:
            if self.connections > self.limits.max_connections:
                await self._refuse(stream, Busy("too many connections; try again later"))
            elif self._stopping:
                await self._refuse(stream, ShuttingDown("signd is shutting down"))
            else:
                conn = _Connection(stream, self.limits, self._schedule_flush, self.audit)
                self.live.add(conn)
                try:
                    await self._converse(conn)
                finally:
                    self.live.discard(conn)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer went away; there is no one left to answer
        except* Exception as group:
            log.error("connection failed", exc_info=group)
        finally:
            self.connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _converse(self, conn: _Connection) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.outbox.run)
            await self._read(conn, nursery)
            # Every answer in flight is still sent, within the drain time-out.
            nursery.cancel_scope.deadline = min(
                self._drain_deadline, trio.current_time() + self.limits.drain_timeout
            )
            await conn.wait_settled()
            if not conn.eof:
                await self._linger(conn)
            nursery.cancel_scope.cancel()
        if nursery.cancel_scope.cancelled_caught and conn.inflight:
            log.warning("drain timed out", extra={"inflight": conn.inflight})

    async def _linger(self, conn: _Connection) -> None:
        """Close politely when the client may still be sending.

        Closing a Unix socket with unread bytes resets the peer, which may
        then lose the answers it has not read yet.  So: send EOF, and discard
        what still arrives until the client closes too, or briefly.
        """
        await conn.stream.send_eof()
        with trio.move_on_after(LINGER):
            while await conn.stream.receive_some(RECEIVE_SIZE):
                pass

    async def _refuse(self, stream: trio.SocketStream, error: Busy | ShuttingDown) -> None:
        self.service.metrics.error(None, error)
        with trio.move_on_after(1.0):
            await stream.send_all(encode_error(None, error))

    async def _read(self, conn: _Connection, nursery: trio.Nursery) -> None:
        """Read and dispatch until EOF, a fatal frame, or the end of a shutdown.

        On shutdown a blocked read is interrupted, and the reader goes on only
        while the client's bytes keep arriving (requests it already sent are
        in flight, and are answered), until the socket stays idle for
        ``DRAIN_IDLE`` or the drain deadline passes.
        """
        while True:
            await conn.wait_readable()
            if self._stopping:
                idle = min(DRAIN_IDLE, self._drain_deadline - trio.current_time())
                with trio.move_on_after(max(idle, 0)):
                    data = await conn.stream.receive_some(RECEIVE_SIZE)
                    if data:
                        conn.decoder.receive_data(data)
                        if not self._dispatch(conn, nursery):
                            return
                        continue
                    conn.eof = True
                    return
                return  # idle: the client has sent nothing more
            scope = trio.CancelScope()
            self._readers.add(scope)
            try:
                with scope:
                    data = await conn.stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        conn.eof = True
                        return
                    conn.decoder.receive_data(data)
                    if not self._dispatch(conn, nursery):
                        return
            finally:
                self._readers.discard(scope)

    def _dispatch(self, conn: _Connection, nursery: trio.Nursery) -> bool:
        """Handle every complete frame; False when the stream must be closed."""
        requests: list[Request] = []
        keep_open = True
        try:
            for body in conn.decoder.frames():
                event = decode_request(body)
                if isinstance(event, BadRequest):
                    self.service.metrics.error(None, event.error)
                    conn.send(encode_error(event.id, event.error))
                else:
                    requests.append(event)
        except FrameTooLarge as exc:
            # The stream cannot be resynchronised: answer, then close this one only.
            self.service.metrics.error(None, exc)
            conn.send(encode_error(None, exc))
            keep_open = False
        if requests:
            conn.inflight += len(requests)
            if conn.audit is not None:
                conn.opened(requests)
            for work in self.service.handle(requests, conn.reply, conn, conn.principal):
                nursery.start_soon(work)
            if len(requests) <= WARM_AFTER:
                self._warm()
        return keep_open
