"""What the blocking and the async client share: settings, retries, results."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ._calls import Call
from .errors import (
    ConnectionFailed,
    FrameTooLarge,
    InvalidArgument,
    ProtocolViolation,
    RateLimited,
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
