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
    ClientClosed,
    Progress,
    Settings,
    encode_call,
    mapped_connect_errors,
    parse_response,
    raise_mapped,
    resolve_socket,
    take_response,
)
from ._retry import Attempt, Sleep, Step, first_attempt, retries
from .errors import ConnectionFailed, SigndError
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
            with mapped_connect_errors(path):
                self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.max_frame = max_frame  # for requests; answers may be larger
        self.decoder = FrameDecoder(MAX_RESPONSE_FRAME)
        self.ids = itertools.count(1)
        #: requests sent on it: more than one means it came from the pool
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
        sock, decoder = self.sock, self.decoder
        sent = answered = False
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(frame)
            sent = True
            while True:
                resp = take_response(decoder, rid)
                if resp is not None:
                    return resp
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = sock.recv(65536)
                if not data:
                    raise ConnectionFailed("signd closed the connection")
                answered = True
                decoder.receive_data(data)
        except BaseException as exc:
            raise_mapped(exc, call.op, Progress(sent, answered))
            raise

    def close(self) -> None:
        self.sock.close()


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


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
        """Send one prepared call; the typed methods below all come here.

        The retry loop is ``_retry.retries``, shared with ``AsyncClient``;
        this only carries out its steps.
        """
        first = first_attempt(call, self.settings)
        try:
            resp = self._attempt(first)
            result: R = parse_response(first.call, resp)
            return result
        except SigndError as exc:
            failure = exc
        steps = retries(first, failure, self.settings)
        try:
            step = next(steps)
            while True:
                try:
                    outcome = self._do(step)
                except BaseException as exc:
                    step = steps.throw(exc)
                else:
                    step = steps.send(outcome)
        except StopIteration as done:
            retried: R = done.value
            return retried

    def _do(self, step: Step) -> Response | None:
        if type(step) is Sleep:
            time.sleep(step.seconds)
            return None
        assert type(step) is Attempt
        return self._attempt(step)

    def _attempt(self, step: Attempt) -> Response:
        conn = self._checkout(step.deadline, step.fresh)
        try:
            resp = conn.request(step.call, step.deadline)
        except BaseException:
            step.pooled = conn.requests > 1
            conn.close()
            raise
        if resp.id is None:  # a connection-level answer: this connection is done
            conn.close()
        else:
            self._checkin(conn)
        return resp

    def _checkout(self, deadline: float, fresh: bool = False) -> _Connection:
        """A pooled connection that is still open, else (or if ``fresh``) a new one."""
        while not fresh:
            with self._lock:
                if self._closed:
                    raise ClientClosed("client is closed")
                if not self._idle:
                    break
                conn = self._idle.pop()
            if conn.alive():
                return conn
            conn.close()  # closed by the daemon while idle: a new one, transparently
        with self._lock:
            if self._closed:
                raise ClientClosed("client is closed")
        return _Connection(self.settings.socket_path, self.settings.max_frame, _left(deadline))

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
    backup = _method(_calls.backup)
    restore = _method(_calls.restore)
    import_params = _method(_calls.import_params)
    import_key = _method(_calls.import_key)

    def private_key(self, name: str, version: int | None = None) -> SigndPrivateKey:
        """A ``cryptography`` private key object for ``name`` that signs
        through this client, bound to ``version`` (by default the key's
        current version now).  See ``signd_client.keys``.

        Raises: KeyNotFound, VersionNotFound.
        """
        return load_private_key(self, name, version)
