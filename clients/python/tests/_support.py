"""Plain helpers shared by the client's tests (the fixtures are in ``conftest.py``).

Test modules import these as ``from _support import ...``; they cannot import
from ``conftest``, since pytest registers every ``conftest.py`` of this
session as the same top-level module name.  Like the client's tests, this
imports nothing from the daemon's package ``signd``.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from cryptography.hazmat.primitives import serialization


def load_public_key(pem: bytes | str) -> Any:
    """A PEM public key, loaded by ``cryptography`` (not by signd's code)."""
    return serialization.load_pem_public_key(pem if isinstance(pem, bytes) else pem.encode())


class SilentListener:
    """A Unix socket that accepts every connection and never answers."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(64)
        self._sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.connections.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for conn in self.connections:
            conn.close()
        self._sock.close()
