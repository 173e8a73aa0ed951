"""The blocking client: a small pool of connections, safe to share between threads."""

from __future__ import annotations

import itertools
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from . import _calls
from ._calls import Call
from ._common import (
    Settings,
    Unsent,
    encode_call,
    parse_response,
    resolve_socket,
    retry_allowed,
    retry_delay,
    take_response,
    was_reset,
    with_idempotency_key,
)
from .errors import ConnectionFailed, RequestTimeout, SigndError
from .keys import SigndPrivateKey, load_private_key
from .protocol import DEFAULT_MAX_FRAME, MAX_RESPONSE_FRAME, FrameDecoder, Message, Response

__all__ = ["Client"]

P = ParamSpec("P")
R = TypeVar("R", bound=Message)


class _Connection:
    """One socket, one request at a time."""

    def __init__(self, path: str, max_frame: int, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except TimeoutError:
            self.sock.close()
            raise RequestTimeout(f"connecting to {path} timed out") from None
        except OSError as exc:
            self.sock.close()
            raise ConnectionFailed(f"cannot connect to signd at {path}: {exc.strerror}") from None
        self.max_frame = max_frame  # for requests; answers may be larger
        self.decoder = FrameDecoder(MAX_RESPONSE_FRAME)
        self.ids = itertools.count(1)
        #: requests sent on it: more than none means it came from the pool
        self.requests = 0

    def alive(self) -> bool:
        """False when the daemon has closed this idle connection (its idle
        time-out, or a restart), or sent on it unasked: do not reuse it."""
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        return not poll.poll(0)

    def request(self, call: Call[Any], deadline: float) -> Response:
        """Raises: ``Unsent`` when the daemon surely did not read the request."""
        rid = next(self.ids)
        self.requests += 1
        frame = encode_call(rid, call, self.max_frame)
        answered = False
        try:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                self.sock.sendall(frame)
            except OSError as exc:
                if isinstance(exc, TimeoutError):
                    raise
                # Not all of the frame went out: the daemon cannot have read it.
                raise Unsent(f"connection to signd broke: {exc.strerror}") from None
            while True:
                resp = take_response(self.decoder, rid)
                if resp is not None:
                    return resp
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionFailed("signd closed the connection")
                answered = True
                self.decoder.receive_data(data)
        except TimeoutError:
            raise RequestTimeout(f"no answer to {call.op} in time") from None
        except OSError as exc:
            if not answered and was_reset(exc):
                raise Unsent(f"signd closed the connection unread: {exc.strerror}") from None
            raise ConnectionFailed(f"connection to signd broke: {exc.strerror}") from None

    def close(self) -> None:
        self.sock.close()


def _method(builder: Callable[P, Call[R]]) -> Callable[Concatenate[Client, P], R]:
    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.call(builder(*args, **kwargs))

    method.__name__ = builder.__name__
    method.__doc__ = builder.__doc__
    return method


class Client:
    """Blocking signd client.  Thread-safe: each call borrows a pooled connection.

    The socket is ``socket_path``, else ``$SIGND_SOCKET``, else
    ``/run/signd/signd.sock``.  Idempotent calls (sign, verify, reads, and the
    other admin calls) are retried on a new connection if the old one broke;
    so are ``create_key`` and ``rotate``, which always carry an idempotency key
    (one is made up per call when the caller gives none), so a retry after a
    lost answer gets that answer instead of a second key or rotation.

    Raises (every method): the ``signd_client.errors`` class of the daemon's
    answer; ``ConnectionFailed``; ``RequestTimeout``.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        timeout: float = 30.0,
        pool_size: int = 8,
        retries: int = 3,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.settings = Settings(resolve_socket(socket_path), timeout, retries, max_frame)
        self._pool_size = pool_size
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def call(self, call: Call[R]) -> R:
        """Send one prepared call; the typed methods below all come here."""
        s = self.settings
        call = with_idempotency_key(call)
        deadline = time.monotonic() + s.timeout
        attempt = 0
        fresh = False
        while True:
            attempt += 1
            conn = None
            try:
                conn = self._checkout(deadline, fresh)
                fresh = False
                resp = conn.request(call, deadline)
            except SigndError as exc:
                if conn is not None:
                    conn.close()
                if isinstance(exc, Unsent) and conn is not None and conn.requests > 1:
                    # A pooled connection the daemon closed as the request
                    # went out (its idle time-out): not a failure, and not
                    # an attempt.  Once, on a new connection.
                    attempt -= 1
                    fresh = True
                    continue
                if retry_allowed(call, exc, attempt, s.retries, deadline):
                    time.sleep(retry_delay(exc, attempt))
                    continue
                raise
            if resp.id is None:  # a connection-level answer: this connection is done
                conn.close()
            else:
                self._checkin(conn)
            try:
                return parse_response(call, resp)
            except SigndError as exc:
                if retry_allowed(call, exc, attempt, s.retries, deadline):
                    time.sleep(retry_delay(exc, attempt))
                    continue
                raise

    def _checkout(self, deadline: float, fresh: bool = False) -> _Connection:
        """A pooled connection that is still open, else (or if ``fresh``) a new one."""
        while not fresh:
            with self._lock:
                if self._closed:
                    raise ConnectionFailed("client is closed")
                if not self._idle:
                    break
                conn = self._idle.pop()
            if conn.alive():
                return conn
            conn.close()  # closed by the daemon while idle: a new one, transparently
        with self._lock:
            if self._closed:
                raise ConnectionFailed("client is closed")
        return _Connection(
            self.settings.socket_path,
            self.settings.max_frame,
            max(deadline - time.monotonic(), 0.001),
        )

    def _checkin(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._pool_size:
                self._idle.append(conn)
                return
        conn.close()

    create_key = _method(_calls.create_key)
    list_keys = _method(_calls.list_keys)
    key_info = _method(_calls.key_info)
    public_key = _method(_calls.public_key)
    jwks = _method(_calls.jwks)
    sign = _method(_calls.sign)
    sign_batch = _method(_calls.sign_batch)
    verify = _method(_calls.verify)
    rotate = _method(_calls.rotate)
    update_key = _method(_calls.update_key)
    disable = _method(_calls.disable)
    enable = _method(_calls.enable)
    destroy = _method(_calls.destroy)
    health = _method(_calls.health)
    whoami = _method(_calls.whoami)

    def private_key(self, name: str, version: int | None = None) -> SigndPrivateKey:
        """A ``cryptography`` private key object for ``name`` that signs
        through this client, bound to ``version`` (by default the key's
        current version now).  See ``signd_client.keys``.

        Raises: KeyNotFound, VersionNotFound.
        """
        return load_private_key(self, name, version)
