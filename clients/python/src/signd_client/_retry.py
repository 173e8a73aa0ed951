"""The one retry loop of a call, shared by the blocking and the async client.

``attempts`` is a generator that does no I/O (compare h11, and httpcore's one
core for both clients): it yields *steps* (get a connection, send the call on
it, sleep, give the connection back) and the client that drives it carries
each one out and sends back its result, or throws in its exception.  So which
failure is retried, how often, after how long and on which connection is
written once, here; ``Client.call`` and ``AsyncClient.call`` only do the I/O.

    steps = attempts(call, settings)
    step = next(steps)
    while True:                     # until StopIteration carries the result
        try:
            outcome = do(step)      # blocking, or awaited
        except BaseException as exc:
            step = steps.throw(exc)
        else:
            step = steps.send(outcome)
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ._calls import Call
from ._common import (
    Settings,
    Unsent,
    parse_response,
    retry_allowed,
    retry_delay,
    with_idempotency_key,
)
from .errors import SigndError
from .protocol import Message, Response

__all__ = ["Connect", "Pooled", "Release", "Send", "Sleep", "Step", "attempts"]

R = TypeVar("R", bound=Message)


class Pooled(Protocol):
    """What the loop needs to know of a connection."""

    #: requests sent on it: more than one means it came from the pool
    @property
    def requests(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Connect:
    """Answer with a connection: an idle pooled one that is still open, or
    (when ``fresh``, or none is idle) a new one opened before ``deadline``."""

    fresh: bool
    deadline: float


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``call`` on ``conn`` and answer with its ``Response``; raise
    ``Unsent`` when the daemon surely did not read it."""

    conn: Any
    call: Call[Any]
    deadline: float


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` before the next attempt."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Release:
    """Done with ``conn``: back to the pool if ``reuse`` (and there is room), else closed."""

    conn: Any
    reuse: bool


Step = Connect | Send | Sleep | Release


def attempts(call: Call[R], settings: Settings) -> Generator[Step, Any, R]:
    """The steps of one call, its retries included; returns the typed result.

    Retried (see ``retry_allowed``): idempotent calls after a broken
    connection or a retryable answer, and any call that provably never reached
    the daemon.  A pooled connection the daemon closed as the request went out
    (its idle time-out) is not a failure, and not an attempt: the call goes
    once more, on a new connection.  Whatever the driver throws in that the
    loop does not retry (a cancellation too) closes the connection in use
    and goes on.

    Raises: the call's wire error; ``ConnectionFailed``; ``RequestTimeout``.
    """
    call = with_idempotency_key(call)
    deadline = time.monotonic() + settings.timeout
    attempt = 0
    fresh = False
    while True:
        attempt += 1
        conn: Pooled | None = None
        try:
            conn = yield Connect(fresh, deadline)
            fresh = False
            resp: Response = yield Send(conn, call, deadline)
        except SigndError as exc:
            if conn is not None:
                yield Release(conn, reuse=False)
            if isinstance(exc, Unsent) and conn is not None and conn.requests > 1:
                attempt -= 1
                fresh = True
                continue
            if retry_allowed(call, exc, attempt, settings.retries, deadline):
                yield Sleep(retry_delay(exc, attempt))
                continue
            raise
        except GeneratorExit:
            raise  # the generator was dropped: it may yield nothing more
        except BaseException:
            if conn is not None:  # cancelled mid-request: the connection is unusable
                yield Release(conn, reuse=False)
            raise
        # id nil: a connection-level answer, after which this connection is done
        yield Release(conn, reuse=resp.id is not None)
        try:
            return parse_response(call, resp)
        except SigndError as exc:
            if retry_allowed(call, exc, attempt, settings.retries, deadline):
                yield Sleep(retry_delay(exc, attempt))
                continue
            raise
