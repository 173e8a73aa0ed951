"""Writing to a stream socket without a task switch per write.

``Outbox.write`` hands bytes to the kernel at once (a non-blocking ``send``)
when nothing is waiting before them, which is nearly always; only what the
kernel does not take is kept, and ``run`` (a task) sends it as the socket
drains.  So an answer costs one system call, not a wake-up of a writer task
plus the call, and the bytes waiting are bounded by the caller, who reads
``backlog_bytes``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

__all__ = ["Outbox"]


class Outbox:
    __slots__ = (
        "_backlog",
        "_empty",
        "_error",
        "_fd",
        "_sending",
        "_stream",
        "_wake",
        "backlog_bytes",
        "on_sent",
    )

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._fd = stream.socket.fileno()
        self._backlog: list[bytes] = []
        self.backlog_bytes = 0
        self._sending = False
        self._error: OSError | None = None
        self._wake = trio.lowlevel.ParkingLot()
        self._empty = trio.lowlevel.ParkingLot()
        #: called after ``run`` sent part of the backlog (``backlog_bytes`` fell)
        self.on_sent: Callable[[], None] | None = None

    def write(self, data: bytes) -> None:
        """Send ``data`` now if the kernel takes it, else keep it for ``run``.

        A failed send is kept too, and raised from ``run``.
        """
        if self._backlog or self._sending or self._error is not None:
            self._keep(data)
            return
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._error = exc
            self._wake.unpark_all()
            return
        if sent < len(data):
            self._keep(data[sent:])

    def _keep(self, data: bytes) -> None:
        self._backlog.append(data)
        self.backlog_bytes += len(data)
        self._wake.unpark_all()

    async def run(self) -> None:
        """Send the backlog as the socket drains; runs until cancelled.

        Raises:
            trio.BrokenResourceError: the peer is gone.
        """
        while True:
            if self._error is not None:
                raise trio.BrokenResourceError("send failed") from self._error
            if self._backlog:
                data = b"".join(self._backlog)
                self._backlog.clear()
                self._sending = True
                try:
                    await self._stream.send_all(data)
                finally:
                    self._sending = False
                    self.backlog_bytes -= len(data)
                if self.on_sent is not None:
                    self.on_sent()
                if not self._backlog:
                    self._empty.unpark_all()
                continue
            await self._wake.park()

    def abandon(self) -> bool:
        """Drop what is kept back (not what ``run`` is sending now).

        Returns True if nothing was kept back or being sent, so the stream is
        at a frame boundary and one more frame may still be written.
        """
        clean = not self._backlog and not self._sending
        self.backlog_bytes -= sum(len(b) for b in self._backlog)
        self._backlog.clear()
        return clean

    async def wait_empty(self) -> None:
        """Return once nothing is kept back."""
        while self._backlog or self._sending:
            await self._empty.park()
