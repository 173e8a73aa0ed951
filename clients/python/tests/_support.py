"""Plain helpers shared by the client's tests (the fixtures are in ``conftest.py``).

Test modules import these as ``from _support import ...``; they cannot import
from ``conftest``, since pytest registers every ``conftest.py`` of this
session as the same top-level module name.  Like the client's tests, this
imports nothing from the daemon's package ``signd``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization

from signd_client.protocol import (
    BadRequest,
    FrameDecoder,
    Message,
    Request,
    decode_request,
    encode_error,
    encode_result,
)


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


class AnsweringListener:
    """A Unix socket that answers each request with ``answer(request)``: a
    daemon's bytes without a daemon, for what a client does with an answer
    the real daemon of this session cannot be made to give."""

    def __init__(self, path: str, answer: Callable[[Request], Message]) -> None:
        self.path = path
        self.requests: list[Request] = []
        self._answer = answer
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(8)
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        decoder = FrameDecoder()
        with conn:
            while data := conn.recv(65536):
                decoder.receive_data(data)
                for body in decoder.frames():
                    event = decode_request(body)
                    if isinstance(event, BadRequest):
                        conn.sendall(encode_error(event.id, event.error))
                        continue
                    self.requests.append(event)
                    conn.sendall(encode_result(event.id, self._answer(event)))

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._accepter.join(timeout=10)
        for thread in self._threads:
            thread.join(timeout=10)
