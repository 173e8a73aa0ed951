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

A connection with nothing in flight and nothing unsent that has sent nothing
for ``idle_timeout`` is closed by a sweeper task, which looks at every
connection a tenth of that apart: nothing on the hot path but one counter per
read.  The close never consumes a byte the client sent: a request that crosses
it stays unread, so the client's read fails with ECONNRESET (or its send with
EPIPE), never with a plain EOF, and knows that the request was not carried out.

Every limit that stops something is counted in ``signd_limit_hits_total``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import math
import os
import socket
import stat
import struct
import termios
import time
from collections.abc import Callable
from functools import partial
from typing import Final

import trio

from ..access.policy import principal_of
from ..audit.log import AuditLog, Pending, notes_of, who_fields
from ..config import LimitsConfig
from ..errors import Busy, FrameTooLarge, InternalError, ShuttingDown
from ..metrics import Limit, Metrics
from ..protocol import BadRequest, FrameDecoder, Request, decode_request, encode_error
from ..service.core import Service
from ..trusted import NotTrusted, open_trusted_dir
from .outbox import Outbox

__all__ = ["ListenerError", "Server", "open_listener", "systemd_socket"]

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
SD_LISTEN_FDS_START: Final = 3


class ListenerError(Exception):
    """The listening socket could not be set up; the message says why."""


def _unread(sock: trio.socket.SocketType) -> int:
    """Bytes the peer has sent on ``sock`` that are not read yet."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    count: int = struct.unpack("i", raw)[0]
    return count


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


def _in_dir(dir_fd: int, name: str, fallback: str) -> str:
    """A path to ``name`` in the directory open as ``dir_fd`` that does not
    walk the directory's path again (``/proc/self/fd/N/name``), if /proc is
    there and the path fits ``sun_path``; else ``fallback``."""
    via = f"/proc/self/fd/{dir_fd}/{name}"
    if len(via.encode()) < 108 and os.path.isdir(f"/proc/self/fd/{dir_fd}"):
        return via
    return fallback


def _socket_dir(path: str) -> tuple[int, str]:
    """The socket's directory, checked as OpenSSH's StrictModes would (see
    ``trusted.py``): an ``O_PATH`` fd of it and the socket's file name.

    Raises:
        ListenerError: the directory is missing, or another user could change it.
    """
    parent, name = os.path.split(path)
    if not name:
        raise ListenerError(f"server.socket: {path} names a directory, not a socket")
    try:
        dir_fd, _ = open_trusted_dir(parent or ".", f"server.socket {path}")
    except NotTrusted as exc:
        raise ListenerError(str(exc)) from None
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise ListenerError(f"directory {parent} of the socket does not exist") from None
        raise ListenerError(f"directory {parent} of the socket: {exc.strerror}") from None
    return dir_fd, name


def _remove_stale(dir_fd: int, name: str, path: str) -> None:
    """Remove a dead socket left at ``name``; refuse anything else there."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; refusing to remove it")
    if _probe_live(_in_dir(dir_fd, name, path)):
        raise ListenerError(f"another daemon is already listening on {path}")
    log.info("removing stale socket", extra={"socket": path})
    os.unlink(name, dir_fd=dir_fd)


def _own_socket(dir_fd: int, name: str, path: str, mode: int, gid: int | None) -> None:
    """Give the socket just bound at ``name`` its group and check its mode,
    without following a symbolic link: if something else is there now (a
    link swapped in after the bind), nothing is changed and the start fails.

    Raises:
        ListenerError: ``name`` is no longer this daemon's socket.
    """
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise ListenerError(f"{path} was replaced after it was bound; not touching it")
        # Through the fd: the inode just checked, whatever the name points to now.
        target = f"/proc/self/fd/{fd}"
        if gid is not None and st.st_gid != gid:
            if os.path.exists(target):
                os.chown(target, -1, gid)
            else:  # no /proc: the name, but never through a link
                os.chown(name, -1, gid, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_IMODE(st.st_mode) != mode:  # bind honours the umask, not a default ACL
            if not os.path.exists(target):
                raise ListenerError(
                    f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, not {mode:04o}, and "
                    "without /proc it cannot be changed safely; remove the directory's "
                    "default ACL"
                )
            os.chmod(target, mode)
    finally:
        os.close(fd)


def open_listener(
    path: str, mode: int, group: str | int | None = None, backlog: int = 1024
) -> socket.socket:
    """Bind and listen on ``path``; remove a stale socket file only if dead.

    The socket's directory must be one no other user can change (owned by
    root or signd's user, not writable by group or others unless root-owned
    and sticky).  Nothing done to the socket's path follows a symbolic link:
    everything is done relative to the directory's fd, and the socket gets
    its mode at bind time (from the umask).

    Raises:
        ListenerError: another daemon is live there, or the path is unusable.
    """
    gid = _gid(group) if group is not None else None
    dir_fd, name = _socket_dir(path)
    bound = False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _remove_stale(dir_fd, name, path)
        # Bind with a restrictive umask so the socket is never briefly too open.
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(_in_dir(dir_fd, name, path))
        finally:
            os.umask(old)
        bound = True
        _own_socket(dir_fd, name, path, mode, gid)
        sock.listen(backlog)
        sock.setblocking(False)
    except (OSError, ListenerError) as exc:
        sock.close()
        if bound:  # unlink never follows a link: at worst it removes one swapped in
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
        os.close(dir_fd)
        if isinstance(exc, ListenerError):
            raise
        raise ListenerError(f"cannot listen on {path}: {exc.strerror}") from None
    os.close(dir_fd)
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
        "charged",
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
        schedule_flush: Callable[[_Connection], None],
        audit: AuditLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.stream = stream
        self.limits = limits
        self.metrics = metrics if metrics is not None else Metrics()
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

    def answered(self, request_id: int, frame: bytes) -> None:
        """The service's reply: the request's bytes are let go, then ``reply``."""
        more = self.dup_sizes.get(request_id) if self.dup_sizes else None
        if more:
            self.in_bytes -= more.pop()
            if not more:
                del self.dup_sizes[request_id]
        else:
            self.in_bytes -= self.sizes.pop(request_id, 0)
        self.reply(request_id, frame)

    def reply(self, request_id: int | None, frame: bytes) -> None:
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
            audit.record(who, None, frame, None, self, request_id)
        else:
            audit.answered(pending, frame)

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

    def opened(self, requests: list[Request]) -> None:
        """Note what ``requests`` (read together) ask, and when, for their audit
        records; in strict mode those records are queued now, to be made
        durable while the requests are carried out."""
        audit, who = self.audit, self.audit_who
        assert audit is not None
        assert who is not None
        now = time.perf_counter_ns()
        for req in requests:
            pending = audit.asked(who, notes_of(req, now), self, req.id)
            if self.audit_open.setdefault(req.id, pending) is not pending:
                self.audit_more.setdefault(req.id, []).append(pending)

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
        #: connections being served, by the peer's uid
        self.connections_by_uid: dict[int, int] = {}
        #: bytes the connections hold (``_Connection.held``), in all and by uid
        self.buffered = 0
        self.buffered_by_uid: dict[int, int] = {}
        self._evicting = False
        self._accepting = trio.CancelScope()
        self._readers: set[trio.CancelScope] = set()
        self._stopping = False
        self._drain_deadline = math.inf
        self._flushes: list[_Connection] = []
        self._flush_wake = trio.lowlevel.ParkingLot()
        self.keep_warm = keep_warm
        self._warm_until = 0.0
        self._warm_wake = trio.lowlevel.ParkingLot()
        self._sweep_wake = trio.lowlevel.ParkingLot()

    def apply_limits(self, limits: LimitsConfig) -> None:
        """New limits, for the connections already open too (a reload).

        Must be called from trio (it wakes the idle sweeper, so a new
        ``idle_timeout`` applies at once).
        """
        self.limits = limits
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
                self._account(conn)
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
        try:
            if self.connections > self.limits.max_connections:
                await self._refuse(stream, Busy("too many connections; try again later"))
            elif self._stopping:
                await self._refuse(stream, ShuttingDown("signd is shutting down"))
            else:
                conn = _Connection(
                    stream, self.limits, self._schedule_flush, self.audit, self.service.metrics
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
                conn.outbox.on_sent = partial(self._account, conn)
                self.live.add(conn)
                try:
                    await self._converse(conn)
                finally:
                    self.live.discard(conn)
                    self._release(conn)
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

    # ------------------------------------------------------------ the memory budget

    def _account(self, conn: _Connection) -> None:
        """Count what ``conn`` holds now; past a limit, close the biggest holder.

        Called after each read, each flush and each send of a backlog: a
        connection's bytes only grow by reading (a partial frame, requests)
        or by answers, which pass through a flush within their round.
        """
        held = conn.held()
        delta = held - conn.charged
        if not delta:
            return
        conn.charged = held
        uid = conn.principal.uid
        by_uid = self.buffered_by_uid
        now = by_uid.get(uid, 0) + delta
        if now:
            by_uid[uid] = now
        else:
            del by_uid[uid]
        self.buffered += delta
        if delta > 0 and not self._evicting:
            self._enforce(uid)

    def _release(self, conn: _Connection) -> None:
        """``conn`` is gone: nothing it held is counted any more."""
        if conn.charged:
            uid = conn.principal.uid
            left = self.buffered_by_uid[uid] - conn.charged
            if left:
                self.buffered_by_uid[uid] = left
            else:
                del self.buffered_by_uid[uid]
            self.buffered -= conn.charged
            conn.charged = 0

    def _enforce(self, uid: int) -> None:
        """Close connections until ``uid`` is within its share and all are
        within the budget: each time the one holding the most, of ``uid``
        first, then of the uid holding the most.  So a uid that floods loses
        its own connections, never another's, while the others hold less."""
        lim = self.limits
        self._evicting = True
        try:
            while self.buffered_by_uid.get(uid, 0) > lim.max_buffered_bytes_per_uid:
                if not self._evict_largest(uid, "max_buffered_bytes_per_uid"):
                    break
            while self.buffered > lim.max_buffered_bytes and self.buffered_by_uid:
                top = max(self.buffered_by_uid, key=self.buffered_by_uid.__getitem__)
                if not self._evict_largest(top, "max_buffered_bytes"):
                    break
        finally:
            self._evicting = False

    def _evict_largest(self, uid: int, limit: Limit) -> bool:
        victim: _Connection | None = None
        for c in self.live:
            if c.principal.uid == uid and not c.evicted and c.charged > 0:
                if victim is None or c.charged > victim.charged:
                    victim = c
        if victim is None:
            return False
        self._evict(victim, limit)
        return True

    def _evict(self, conn: _Connection, limit: Limit) -> None:
        """Close ``conn`` at once and let go of everything it holds.

        The client gets ``busy`` with id nil, when the stream is at a frame
        boundary (a client that reads; one that does not would never see
        it), then the end of the stream.  Its requests still queued for the
        token are dropped; answers still to come are not sent.
        """
        uid, held = conn.principal.uid, conn.charged
        lim = self.limits
        setting = getattr(lim, limit)
        error = Busy(
            f"connection closed: it held {held} bytes of requests and unread answers, and "
            f"uid {uid} {self.buffered_by_uid.get(uid, 0)} bytes, past limits.{limit} "
            f"({setting} bytes); read the answers as they come, or send less at once"
        )
        self.service.metrics.limit_hit(limit)
        self.service.metrics.error(None, error)
        log.warning(
            "connection closed: over its memory budget",
            extra={"uid": uid, "pid": conn.principal.pid, "held": held, "limit": limit},
        )
        conn.evicted = True
        conn.pending.clear()
        conn.pending_bytes = 0
        conn.decoder = FrameDecoder(lim.max_frame)
        self.service.token.drop(conn, Busy("the connection was closed before this was signed"))
        if conn.outbox.abandon():
            conn.fatal = encode_error(None, error)
            conn.outbox.write(conn.fatal)
        if conn.scope is not None:
            conn.scope.cancel()
        self._account(conn)

    async def _converse(self, conn: _Connection) -> None:
        async with trio.open_nursery() as nursery:
            conn.scope = nursery.cancel_scope
            nursery.start_soon(conn.outbox.run)
            await self._read(conn, nursery)
            if conn.idle_closed and conn.quiet():
                # Quiet, and nothing read since: no answer is owed, and no
                # linger either, so a request that crossed the close is left
                # unread (the client's read fails with ECONNRESET: not done).
                self.service.metrics.limit_hit("idle_timeout")
                log.debug(
                    "idle connection closed",
                    extra={"pid": conn.principal.pid, "idle_timeout": conn.limits.idle_timeout},
                )
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

    async def _refuse(
        self,
        stream: trio.SocketStream,
        error: Busy | ShuttingDown,
        limit: Limit = "max_connections",
    ) -> None:
        self.service.metrics.error(None, error)
        if isinstance(error, Busy):
            self.service.metrics.limit_hit(limit)
        with trio.move_on_after(1.0):
            await stream.send_all(encode_error(None, error))

    async def _read(self, conn: _Connection, nursery: trio.Nursery) -> None:
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
                        self._account(conn)
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
                    self._account(conn)
                    if not keep_open:
                        return
            finally:
                conn.read_scope = None
                self._readers.discard(scope)
            if conn.idle_closed:
                return

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
                    conn.hold(event.id, len(body))
        except FrameTooLarge as exc:
            # The stream cannot be resynchronised: stop reading; the error goes
            # out after the answers to the requests read before it, then close.
            self.service.metrics.error(None, exc)
            self.service.metrics.limit_hit("max_frame")
            conn.fatal = encode_error(None, exc)
            keep_open = False
        if requests:
            conn.inflight += len(requests)
            if conn.audit is not None:
                conn.opened(requests)
            for work in self.service.handle(requests, conn.answered, conn, conn.principal):
                nursery.start_soon(work)
            if len(requests) <= WARM_AFTER:
                self._warm()
        return keep_open
