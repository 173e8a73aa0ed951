"""What the blocking and the async client share: settings, retry rules,
framing of one call, and the one map from foreign exceptions to signd errors."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ._calls import Call
from .errors import (
    ConnectionFailed,
    FrameTooLarge,
    InvalidArgument,
    ProtocolViolation,
    RateLimited,
    RequestTimeout,
    SigndError,
    WireError,
)
from .protocol import (
    DEFAULT_MAX_FRAME,
    HEADER,
    FrameDecoder,
    Message,
    Response,
    Retry,
    decode_response,
    encode_request,
)

DEFAULT_SOCKET: Final = "/run/signd/signd.sock"
RETRY_BACKOFF: Final = 0.05

R = TypeVar("R", bound=Message)


class Unsent(ConnectionFailed):
    """The connection broke before the daemon had read the request whole, so
    it was not carried out: the send failed, or the daemon closed the
    connection with the request still unread (on a Unix socket the kernel then
    resets it, ECONNRESET, where a daemon that had read it and then died would
    give a plain end of stream).  Any request may be sent again, even one that
    is not idempotent."""


class ClientClosed(ConnectionFailed):
    """A call on a client after ``close()``/``aclose()``: never retried."""


@dataclass(frozen=True, slots=True)
class Settings:
    socket_path: str
    timeout: float
    retries: int
    max_frame: int = DEFAULT_MAX_FRAME


def resolve_socket(path: str | None) -> str:
    """The argument, else ``$SIGND_SOCKET``, else ``/run/signd/signd.sock``."""
    return path or os.environ.get("SIGND_SOCKET") or DEFAULT_SOCKET


def with_idempotency_key(call: Call[R]) -> Call[R]:
    """``call`` carrying a fresh idempotency key, if its op takes one and it has none.

    Made once per call, not per attempt: every retry of it carries the same
    key, so a ``create_key`` or ``rotate`` whose answer was lost is answered
    again instead of done twice.
    """
    if call.retry is not Retry.WITH_KEY or call.idempotency_key is not None:
        return call
    args = dataclasses.replace(call.args, idempotency_key=uuid.uuid4().hex)  # type: ignore[type-var]
    return dataclasses.replace(call, args=args)


def retry_allowed(
    call: Call[Any], exc: SigndError, attempt: int, retries: int, deadline: float
) -> bool:
    """Retry idempotent calls after a broken connection or a retryable answer
    (``create_key`` and ``rotate`` are, when they carry an idempotency key), and
    any call that provably never reached the daemon (``Unsent``)."""
    if isinstance(exc, ClientClosed):
        return False
    if attempt > retries or time.monotonic() + retry_delay(exc, attempt) >= deadline:
        return False
    if isinstance(exc, Unsent):
        return True
    if not call.idempotent:
        return False
    return isinstance(exc, ConnectionFailed) or (isinstance(exc, WireError) and exc.retryable)


def retry_delay(exc: SigndError, attempt: int) -> float:
    """How long to wait before retry ``attempt``: a short back-off, and never
    less than a rate limit's ``retry_after``."""
    delay = RETRY_BACKOFF * attempt
    if isinstance(exc, RateLimited) and exc.retry_after is not None:
        delay = max(delay, exc.retry_after)
    return delay


# --------------------------------------------------------------------------
# The client's edge: foreign exceptions -> signd_client errors, in one place


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError):  # socket time-outs; asyncio.timeout
        return True
    trio = sys.modules.get("trio")  # imported only by a trio caller
    return trio is not None and isinstance(exc, trio.TooSlowError)


def _is_broken(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    trio = sys.modules.get("trio")
    return trio is not None and isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError)


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


@dataclass(slots=True)
class Progress:
    """How far one request got, which decides what a broken connection means."""

    #: the whole frame went out
    sent: bool = False
    #: some bytes of the answer came in
    answered: bool = False


def foreign_error(exc: BaseException, op: str, progress: Progress) -> SigndError | None:
    """The signd error a foreign exception raised while doing ``op`` stands for,
    or None if it is not one of the client's I/O failures (a bug, or a
    cancellation, which must go on as it is).

    ======================================  ====================================
    raised                                  becomes
    ======================================  ====================================
    TimeoutError, trio.TooSlowError         RequestTimeout
    OSError, trio.BrokenResourceError,      Unsent if the frame did not all go
    trio.ClosedResourceError                out, or the connection was reset
                                            before any byte of the answer (the
                                            daemon closed it unread); else
                                            ConnectionFailed
    ======================================  ====================================

    msgpack's errors are mapped where frames are decoded (``protocol``):
    MalformedFrame, which a client reports as ProtocolViolation.
    """
    if _is_timeout(exc):
        return RequestTimeout(f"no answer to {op} in time")
    if _is_broken(exc):
        if not progress.sent:
            return Unsent(f"connection to signd broke: {_reason(exc)}")
        if not progress.answered and was_reset(exc):
            return Unsent(f"signd closed the connection unread: {_reason(exc)}")
        return ConnectionFailed(f"connection to signd broke: {_reason(exc)}")
    return None


def foreign_connect_error(exc: BaseException, path: str) -> SigndError | None:
    """As ``foreign_error``, for opening a connection to ``path``."""
    if _is_timeout(exc):
        return RequestTimeout(f"connecting to {path} timed out")
    if _is_broken(exc):
        return ConnectionFailed(f"cannot connect to signd at {path}: {_reason(exc)}")
    return None


class mapped_errors:
    """Raise the signd error for a foreign exception of the block (``foreign_error``).

    A plain ``with`` works around ``await`` too, so the blocking and the async
    connection share it.  A class rather than ``contextlib.contextmanager``:
    it is around every request, and a generator-based one costs a few µs more.
    """

    __slots__ = ("op", "progress")

    def __init__(self, op: str, progress: Progress) -> None:
        self.op = op
        self.progress = progress

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is not None:
            raise_mapped(exc, self.op, self.progress)


def raise_mapped(exc: BaseException, op: str, progress: Progress) -> None:
    """Raise the signd error ``exc`` (raised doing ``op``) stands for, if it
    is a foreign one (``foreign_error``); return if it is a signd error or
    not the client's business (the caller re-raises it as it is).  For a
    ``try``/``except`` around a blocking request: on the path of every call,
    where a ``with`` block costs two method calls more."""
    if isinstance(exc, SigndError) or not isinstance(exc, Exception):
        return  # a signd error, or a cancellation: as it is
    mapped = foreign_error(exc, op, progress)
    if mapped is not None:
        raise mapped from None


@contextlib.contextmanager
def mapped_connect_errors(path: str) -> Iterator[None]:
    """As ``mapped_errors``, while connecting to ``path``."""
    try:
        yield
    except SigndError:
        raise
    except Exception as exc:
        mapped = foreign_connect_error(exc, path)
        if mapped is None:
            raise
        raise mapped from None


def was_reset(exc: BaseException | None) -> bool:
    """True if ``exc`` or one of its causes is a connection reset: on a Unix
    socket, the daemon closed it with bytes of ours unread."""
    while exc is not None:
        if isinstance(exc, ConnectionResetError):
            return True
        exc = exc.__cause__
    return False


def encode_call(request_id: int, call: Call[Any], max_frame: int) -> bytes:
    """The request's frame.

    Raises:
        FrameTooLarge: the frame would exceed ``max_frame`` (checked here, so a
            request the daemon would refuse is never sent).
    """
    frame = encode_request(request_id, call.op, call.args)
    if len(frame) - HEADER.size > max_frame:
        raise FrameTooLarge(
            f"{call.op} request of {len(frame) - HEADER.size} bytes exceeds the frame limit "
            f"of {max_frame} bytes"
        )
    return frame


def take_response(decoder: FrameDecoder, request_id: int) -> Response | None:
    """The answer to ``request_id`` among the frames buffered, if it has come.

    A connection carries one request at a time, so any other id is a
    protocol violation; id nil is a connection-level error meant for it.

    Raises:
        ProtocolViolation, FrameTooLarge.
    """
    for body in decoder.frames():
        resp = decode_response(body)
        if resp.id == request_id or resp.id is None:
            return resp
        raise ProtocolViolation(f"answer to unknown request id {resp.id}")
    return None


def parse_response(call: Call[R], resp: Response) -> R:
    if resp.error is not None:
        raise resp.error
    assert resp.result is not None
    try:
        return call.result.from_wire(resp.result, strict=False)
    except InvalidArgument as exc:
        raise ProtocolViolation(f"malformed {call.op} result: {exc.message}") from None
