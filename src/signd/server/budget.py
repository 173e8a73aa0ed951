"""The memory budget: what the connections hold, in all and per uid.

Every connection's bytes (a partial frame, requests read and not answered,
answers not sent: ``Connection.held``) are counted after each read, each
flush and each send of a backlog.  Past ``limits.max_buffered_bytes_per_uid``
or ``limits.max_buffered_bytes`` the connection holding the most is closed
with ``busy``: of the uid over its share first, then of the uid holding the
most, so a uid that floods loses its own connections, never another's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Set

from ..config import LimitsConfig
from ..errors import Busy, WireError
from ..metrics import Limit, Metrics
from ..protocol import FrameDecoder, encode_error
from .connection import Connection

__all__ = ["Budget"]

log = logging.getLogger("signd.server")


class Budget:
    """Counts the bytes ``live`` connections hold and evicts past the limits.

    ``drop(conn, error)`` fails the requests of ``conn`` still queued (for
    the token) with ``error``.
    """

    __slots__ = ("_evicting", "buffered", "buffered_by_uid", "drop", "limits", "live", "metrics")

    def __init__(
        self,
        limits: LimitsConfig,
        live: Set[Connection],
        metrics: Metrics,
        drop: Callable[[Connection, WireError], object],
    ) -> None:
        self.limits = limits
        self.live = live
        self.metrics = metrics
        self.drop = drop
        #: bytes the connections hold (``Connection.held``), in all and by uid
        self.buffered = 0
        self.buffered_by_uid: dict[int, int] = {}
        self._evicting = False

    def account(self, conn: Connection) -> None:
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

    def release(self, conn: Connection) -> None:
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
        first, then of the uid holding the most."""
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
        victim: Connection | None = None
        for c in self.live:
            if c.principal.uid == uid and not c.evicted and c.charged > 0:
                if victim is None or c.charged > victim.charged:
                    victim = c
        if victim is None:
            return False
        self._evict(victim, limit)
        return True

    def _evict(self, conn: Connection, limit: Limit) -> None:
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
        self.metrics.limit_hit(limit)
        self.metrics.error(None, error)
        log.warning(
            "connection closed: over its memory budget",
            extra={"uid": uid, "pid": conn.principal.pid, "held": held, "limit": limit},
        )
        conn.evicted = True
        conn.pending.clear()
        conn.pending_bytes = 0
        conn.decoder = FrameDecoder(lim.max_frame)
        self.drop(conn, Busy("the connection was closed before this was signed"))
        if conn.outbox.abandon():
            conn.fatal = encode_error(None, error)
            conn.outbox.write(conn.fatal)
        if conn.scope is not None:
            conn.scope.cancel()
        self.account(conn)
