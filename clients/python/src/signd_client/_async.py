"""The async client, usable from trio and from asyncio.

The library in use is detected when a connection is opened, and a small
stream adapter for it does the I/O; framing, retries and result parsing are
the same code the blocking client uses.  Concurrent calls each borrow a
pooled connection.
"""

from __future__ import annotations

import asyncio
import itertools
import select
import time
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from . import _calls
from ._calls import Call
from ._common import (
    ClientClosed,
    Progress,
    Settings,
    encode_call,
    mapped_connect_errors,
    mapped_errors,
    parse_response,
    resolve_socket,
    take_response,
)
from ._retry import Attempt, Sleep, Step, first_attempt, retries
from .errors import ConnectionFailed, SigndError
from .keys import AsyncSigndPrivateKey, load_async_private_key
from .protocol import DEFAULT_MAX_FRAME, MAX_RESPONSE_FRAME, FrameDecoder, Message, Response

__all__ = ["AsyncClient"]

P = ParamSpec("P")
R = TypeVar("R", bound=Message)


class _Stream(Protocol):
    async def send(self, data: bytes, timeout: float) -> None: ...
    async def receive(self, timeout: float) -> bytes: ...
    async def close(self) -> None: ...
    def alive(self) -> bool: ...


def _quiet(fd: int) -> bool:
    """True if nothing (no byte, no end of stream, no error) waits on ``fd``."""
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return not poll.poll(0)


class _AsyncioStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: str, timeout: float) -> _AsyncioStream:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def send(self, data: bytes, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            self.writer.write(data)
            await self.writer.drain()

    async def receive(self, timeout: float) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.read(65536)

    async def close(self) -> None:
        self.writer.close()

    def alive(self) -> bool:
        r, w = self.reader, self.writer
        if w.is_closing() or r.at_eof() or r.exception() is not None:
            return False
        sock = w.get_extra_info("socket")
        return sock is None or _quiet(sock.fileno())


class _TrioStream:
    def __init__(self, stream: Any) -> None:
        self.stream = stream

    @classmethod
    async def connect(cls, path: str, timeout: float) -> _TrioStream:
        import trio

        with trio.fail_after(timeout):
            return cls(await trio.open_unix_socket(path))

    async def send(self, data: bytes, timeout: float) -> None:
        import trio

        with trio.fail_after(timeout):
            await self.stream.send_all(data)

    async def receive(self, timeout: float) -> bytes:
        import trio

        with trio.fail_after(timeout):
            data: bytes = await self.stream.receive_some(65536)
            return data

    async def close(self) -> None:
        import trio

        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    def alive(self) -> bool:
        return _quiet(self.stream.socket.fileno())


def _running_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _AsyncConnection:
    def __init__(self, stream: _Stream, max_frame: int) -> None:
        self.stream = stream
        self.max_frame = max_frame  # for requests; answers may be larger
        self.decoder = FrameDecoder(MAX_RESPONSE_FRAME)
        self.ids = itertools.count(1)
        #: requests sent on it: more than none means it came from the pool
        self.requests = 0

    @classmethod
    async def open(cls, settings: Settings, timeout: float) -> _AsyncConnection:
        path = settings.socket_path
        with mapped_connect_errors(path):
            if _running_asyncio():
                stream: _Stream = await _AsyncioStream.connect(path, timeout)
            else:
                stream = await _TrioStream.connect(path, timeout)
        return cls(stream, settings.max_frame)

    async def request(self, call: Call[Any], deadline: float) -> Response:
        """Raises: ``Unsent`` when the daemon surely did not read the request."""
        rid = next(self.ids)
        self.requests += 1
        frame = encode_call(rid, call, self.max_frame)
        progress = Progress()
        with mapped_errors(call.op, progress):
            await self.stream.send(frame, _left(deadline))
            progress.sent = True
            while True:
                resp = take_response(self.decoder, rid)
                if resp is not None:
                    return resp
                data = await self.stream.receive(_left(deadline))
                if not data:
                    raise ConnectionFailed("signd closed the connection")
                progress.answered = True
                self.decoder.receive_data(data)

    async def close(self) -> None:
        await self.stream.close()


async def _sleep(seconds: float) -> None:
    if _running_asyncio():
        await asyncio.sleep(seconds)
    else:
        import trio

        await trio.sleep(seconds)


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def _method(
    builder: Callable[P, Call[R]],
) -> Callable[Concatenate[AsyncClient, P], Awaitable[R]]:
    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self.call(builder(*args, **kwargs))

    method.__name__ = builder.__name__
    method.__doc__ = builder.__doc__
    return method


class AsyncClient:
    """Async signd client for trio or asyncio; concurrent calls are fine.

    Same socket resolution, retries and errors as ``Client``.  Use it as
    ``async with AsyncClient() as c:`` or call ``aclose()``.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        timeout: float = 30.0,
        pool_size: int = 16,
        retries: int = 3,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.settings = Settings(resolve_socket(socket_path), timeout, retries, max_frame)
        self._pool_size = pool_size
        self._idle: list[_AsyncConnection] = []
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    async def call(self, call: Call[R]) -> R:
        """Send one prepared call; the typed methods below all come here.

        The retry loop is ``_retry.retries``, shared with ``Client``; this
        only carries out its steps.
        """
        first = first_attempt(call, self.settings)
        try:
            resp = await self._attempt(first)
            result: R = parse_response(first.call, resp)
            return result
        except SigndError as exc:
            failure = exc
        steps = retries(first, failure, self.settings)
        try:
            step = next(steps)
            while True:
                try:
                    outcome = await self._do(step)
                except BaseException as exc:
                    step = steps.throw(exc)
                else:
                    step = steps.send(outcome)
        except StopIteration as done:
            retried: R = done.value
            return retried

    async def _do(self, step: Step) -> Response | None:
        if type(step) is Sleep:
            await _sleep(step.seconds)
            return None
        assert type(step) is Attempt
        return await self._attempt(step)

    async def _attempt(self, step: Attempt) -> Response:
        conn = await self._checkout(step.deadline, step.fresh)
        try:
            resp = await conn.request(step.call, step.deadline)
        except BaseException:
            step.pooled = conn.requests > 1
            await conn.close()
            raise
        if resp.id is not None and not self._closed and len(self._idle) < self._pool_size:
            self._idle.append(conn)
        else:  # a connection-level answer (this connection is done), or no room
            await conn.close()
        return resp

    async def _checkout(self, deadline: float, fresh: bool) -> _AsyncConnection:
        """A pooled connection that is still open, else (or if ``fresh``) a new one."""
        if self._closed:
            raise ClientClosed("client is closed")
        while not fresh and self._idle:
            conn = self._idle.pop()
            if conn.stream.alive():
                return conn
            await conn.close()  # closed by the daemon while idle: a new one, transparently
        return await _AsyncConnection.open(self.settings, _left(deadline))

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

    async def private_key(self, name: str, version: int | None = None) -> AsyncSigndPrivateKey:
        """The key's ``version`` (by default its current version now) with its
        public key, for this client; see ``signd_client.keys``.

        Raises: KeyNotFound, VersionNotFound.
        """
        return await load_async_private_key(self, name, version)
