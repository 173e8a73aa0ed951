"""A slow link to a token: a Unix-socket relay in front of ``p11-kit server``
that holds every chunk the server sends for ``latency`` seconds.

The same relay as ``tests/test_slow_token.py``: a PKCS#11 call through it
costs at least one ``latency``, like a device on a serial line (a signature
from python-pkcs11, three: ``C_SignInit``, and ``C_Sign`` twice, the first
for the length).  ``latency`` may be changed at any time; it holds the
chunks that arrive from then on.  Each connection (one per client
process of ``p11-kit-client.so``) is relayed by threads of its own, so
connections are slow side by side, not one after another.  It counts the
chunks each connection sent upstream (about one per PKCS#11 call), so a
report can show how the calls spread over the connections.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["SlowRelay"]


class SlowRelay:
    """Relay connections on ``path`` to ``upstream``, holding each chunk from
    upstream ``latency`` seconds (in order; chunks that arrive together leave
    together).  Threads run until :meth:`close`."""

    def __init__(self, upstream: Path, path: Path, latency: float) -> None:
        self.upstream = upstream
        self.path = path
        self.latency = latency
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self._sockets: list[socket.socket] = [self.listener]
        self._threads: list[threading.Thread] = []
        #: chunks sent upstream, per accepted connection (in accept order)
        self.calls: list[int] = []
        self._lock = threading.Lock()
        self._spawn(self._accept)

    @property
    def address(self) -> str:
        """The relay as ``P11_KIT_SERVER_ADDRESS`` names it."""
        return f"unix:path={self.path}"

    def calls_snapshot(self) -> list[int]:
        with self._lock:
            return list(self.calls)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sockets += [client, server]
            try:
                server.connect(str(self.upstream))
            except OSError:
                client.close()
                continue
            with self._lock:
                index = len(self.calls)
                self.calls.append(0)
            held: queue.Queue[tuple[float, bytes]] = queue.Queue()
            self._spawn(self._forward, client, server, index)
            self._spawn(self._hold, server, held)
            self._spawn(self._release, held, client)

    def _forward(self, src: socket.socket, dst: socket.socket, index: int) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                with self._lock:
                    self.calls[index] += 1
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def _hold(self, src: socket.socket, held: queue.Queue[tuple[float, bytes]]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                held.put((time.monotonic() + self.latency, data))
        held.put((0.0, b""))

    @staticmethod
    def _release(held: queue.Queue[tuple[float, bytes]], dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                due, data = held.get()
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                # Holding the chunk is the point: the link is slow.
                time.sleep(max(0.0, due - time.monotonic()))
                dst.sendall(data)

    def close(self) -> None:
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(5)
