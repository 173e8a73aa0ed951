"""The one retry loop of a call, shared by the blocking and the async client.

``attempts`` is a generator that does no I/O (compare h11, and httpcore's one
core for both clients): it yields *steps* (an attempt of the call, or a
sleep before the next one) and the client that drives it carries each one
out and sends back its result, or throws in its exception.  So which failure
is retried, how often, after how long and on which kind of connection is
written once, here; ``Client.call`` and ``AsyncClient.call`` only do the I/O.

    first = first_attempt(call, settings)
    try:                            # the first attempt: no generator
        return parse_response(first.call, do(first))
    except SigndError as exc:
        failure = exc
    steps = retries(first, failure, settings)
    step = next(steps)
    while True:                     # until StopIteration carries the result
        try:
            outcome = do(step)      # blocking, or awaited
        except BaseException as exc:
            step = steps.throw(exc)
        else:
            step = steps.send(outcome)

(``attempts`` is the same steps as one generator, first attempt included.)
An attempt is one step, not three (connect, send, give back), and a call
that succeeds at once makes no generator at all, because that is every
request's path.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

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

__all__ = ["Attempt", "Sleep", "Step", "attempts", "first_attempt", "retries"]

R = TypeVar("R", bound=Message)


@dataclass(slots=True)
class Attempt:
    """Send ``call`` on a connection and answer with its ``Response``.

    The connection: an idle pooled one that is still open, else (or when
    ``fresh``) a new one opened before ``deadline``.  After an answer it goes
    back to the pool if the answer has an id (else it is closed: the daemon
    answered for the connection and closes it).  On a failure the driver
    closes it, sets ``pooled`` (it had carried a request before this one),
    and throws the exception in; ``Unsent`` means the daemon surely did not
    read the call.
    """

    call: Call[Any]
    deadline: float
    fresh: bool
    pooled: bool = False


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` before the next attempt."""

    seconds: float


Step = Attempt | Sleep


def first_attempt(call: Call[Any], settings: Settings) -> Attempt:
    """The first attempt of ``call``: it carries the idempotency key and the
    deadline every later attempt reuses."""
    return Attempt(with_idempotency_key(call), time.monotonic() + settings.timeout, False)


def attempts(call: Call[R], settings: Settings) -> Generator[Step, Any, R]:
    """The steps of one call, its retries included; returns the typed result.

    The first step is ``first_attempt``; after a failure the steps are those
    of ``retries``.  The clients drive the first attempt themselves and start
    ``retries`` only when it failed, so a call that succeeds at once makes no
    generator: it is on every request's path.
    """
    first = first_attempt(call, settings)
    try:
        resp: Response = yield first
        result: R = parse_response(first.call, resp)
        return result
    except SigndError as exc:
        retried: R = yield from retries(first, exc, settings)
        return retried


def retries(first: Attempt, exc: SigndError, settings: Settings) -> Generator[Step, Any, Any]:
    """The steps after ``first`` failed with ``exc``; returns the typed result.

    Retried (see ``retry_allowed``): idempotent calls after a broken
    connection or a retryable answer, and any call that provably never reached
    the daemon.  A pooled connection the daemon closed as the request went out
    (its idle time-out) is not a failure, and not an attempt: the call goes
    once more, on a new connection.  Whatever the driver throws in that the
    loop does not retry (a cancellation too) goes on as it is (the driver
    closed the connection it was using).

    Raises: the call's wire error; ``ConnectionFailed``; ``RequestTimeout``.
    """
    call, deadline = first.call, first.deadline
    step, attempt = first, 1
    while True:
        fresh = False
        if isinstance(exc, Unsent) and step.pooled:
            attempt -= 1
            fresh = True
        elif retry_allowed(call, exc, attempt, settings.retries, deadline):
            yield Sleep(retry_delay(exc, attempt))
        else:
            raise exc
        attempt += 1
        step = Attempt(call, deadline, fresh)
        try:
            resp: Response = yield step
            return parse_response(call, resp)
        except SigndError as failure:
            exc = failure
