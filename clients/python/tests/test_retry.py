"""The retry loop and the exception map, in-process: no socket, no daemon.

``_retry.attempts`` yields the steps both clients carry out; here a scripted
driver answers each step, so every retry rule is checked step by step.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from signd_client import _calls
from signd_client._common import (
    ClientClosed,
    Progress,
    Settings,
    Unsent,
    foreign_connect_error,
    foreign_error,
    mapped_errors,
)
from signd_client._retry import Attempt, Sleep, attempts
from signd_client.errors import (
    Busy,
    ConnectionFailed,
    KeyNotFound,
    RateLimited,
    RequestTimeout,
    SigndError,
)
from signd_client.protocol import Empty, Health, Response

SETTINGS = Settings("/nonexistent", timeout=30.0, retries=3)
HEALTH = Health(
    status="ok",
    live=True,
    ready=True,
    daemon_version="0",
    protocol_version=1,
    uptime=1.0,
    keys=0,
)


@dataclass
class Conn:
    name: str
    requests: int = 1


def ok(rid: int | None = 1) -> Response:
    return Response(rid, HEALTH.to_wire(), None)


def drive(call: _calls.Call[Any], send: Callable[[Conn, int], Response]) -> tuple[Any, list[Any]]:
    """Run ``attempts`` as a client does: attempt N goes on a new connection
    ``Conn(f"c{N}")`` (``"pooled"`` for the first if ``pooled``);
    ``send(conn, n)`` answers the n-th attempt (or raises).  Returns the
    result (or the exception) and the steps, as (kind, detail) pairs, with
    what the driver then did with the connection."""
    steps = attempts(call, SETTINGS)
    log: list[Any] = []
    sends = 0
    try:
        step = next(steps)
        while True:
            try:
                if isinstance(step, Sleep):
                    log.append(("sleep", step.seconds))
                    outcome: Any = None
                else:
                    assert isinstance(step, Attempt)
                    sends += 1
                    conn = Conn(f"c{sends}")
                    log.append(("send", conn.name, step.fresh))
                    try:
                        outcome = send(conn, sends)
                    except BaseException:
                        step.pooled = conn.requests > 1
                        log.append(("close", conn.name))
                        raise
                    log.append(("close" if outcome.id is None else "pool", conn.name))
            except BaseException as exc:
                step = steps.throw(exc)
            else:
                step = steps.send(outcome)
    except StopIteration as done:
        return done.value, log
    except BaseException as exc:
        return exc, log


def test_an_answer_returns_the_typed_result_and_pools_the_connection() -> None:
    result, log = drive(_calls.health(), lambda conn, n: ok())
    assert result == HEALTH
    assert log == [("send", "c1", False), ("pool", "c1")]


def test_a_connection_level_answer_closes_the_connection() -> None:
    busy = Response(None, None, Busy("too many connections"))
    result, log = drive(_calls.health(), lambda conn, n: busy if n == 1 else ok())
    assert result == HEALTH
    assert log[:3] == [("send", "c1", False), ("close", "c1"), log[2]]
    assert log[2][0] == "sleep"


def test_broken_connection_is_retried_up_to_retries_then_raised() -> None:
    def broken(conn: Conn, n: int) -> Response:
        raise ConnectionFailed("connection to signd broke")

    result, log = drive(_calls.health(), broken)
    assert isinstance(result, ConnectionFailed)
    assert [entry[0] for entry in log].count("send") == SETTINGS.retries + 1
    sleeps = [entry[1] for entry in log if entry[0] == "sleep"]
    assert sleeps == pytest.approx([0.05, 0.1, 0.15])  # 50 ms x attempt
    assert [entry[0] for entry in log].count("close") == SETTINGS.retries + 1


def test_a_non_retryable_answer_is_raised_at_once() -> None:
    missing = Response(1, None, KeyNotFound("no key named 'k'"))
    result, log = drive(_calls.key_info("k"), lambda conn, n: missing)
    assert isinstance(result, KeyNotFound)
    assert log == [("send", "c1", False), ("pool", "c1")]


def test_rate_limited_waits_at_least_retry_after() -> None:
    limited = Response(1, None, RateLimited("slow down", retry_after=0.75))
    result, log = drive(_calls.health(), lambda conn, n: limited if n == 1 else ok())
    assert result == HEALTH
    assert ("sleep", 0.75) in log


def test_unsent_on_a_pooled_connection_is_resent_fresh_and_not_counted() -> None:
    """The daemon's idle close crossed the request: once more on a new
    connection, without a back-off and without using up a retry."""
    settings_retries_0 = Settings("/nonexistent", timeout=30.0, retries=0)
    steps = attempts(_calls.rotate("k"), settings_retries_0)
    first = next(steps)
    assert isinstance(first, Attempt)
    assert not first.fresh
    assert first.call.idempotency_key is not None  # made once per call
    first.pooled = True  # the driver: it had carried a request before
    again = steps.throw(Unsent("signd closed the connection unread"))
    assert isinstance(again, Attempt)  # no sleep, and not counted: retries=0
    assert again.fresh
    assert again.call == first.call  # the same idempotency key
    with pytest.raises(Unsent):  # on a new connection it is a failure like any other
        steps.throw(Unsent("signd closed the connection unread"))


def test_unsent_on_a_new_connection_counts_as_an_attempt() -> None:
    def unsent(conn: Conn, n: int) -> Response:
        raise Unsent("signd closed the connection unread")

    result, log = drive(_calls.health(), unsent)
    assert isinstance(result, Unsent)
    assert [entry[0] for entry in log].count("send") == SETTINGS.retries + 1


def test_client_closed_is_never_retried() -> None:
    steps = attempts(_calls.health(), SETTINGS)
    next(steps)
    with pytest.raises(ClientClosed):
        steps.throw(ClientClosed("client is closed"))


def test_a_cancellation_mid_request_closes_the_connection_and_goes_on() -> None:
    class Cancelled(BaseException):
        pass

    def cancelled(conn: Conn, n: int) -> Response:
        raise Cancelled

    result, log = drive(_calls.health(), cancelled)
    assert isinstance(result, Cancelled)
    assert log == [("send", "c1", False), ("close", "c1")]


def test_malformed_result_is_a_protocol_violation() -> None:
    bad = Response(1, {"status": 1}, None)
    result, _ = drive(_calls.health(), lambda conn, n: bad)
    assert isinstance(result, SigndError)
    assert type(result).__name__ == "ProtocolViolation"


# --------------------------------------------------------------------------
# the exception map


@pytest.mark.parametrize(
    ("exc", "progress", "expected"),
    [
        pytest.param(TimeoutError(), Progress(), RequestTimeout, id="timeout"),
        pytest.param(trio.TooSlowError(), Progress(True, True), RequestTimeout, id="trio-timeout"),
        pytest.param(BrokenPipeError(errno.EPIPE, "EPIPE"), Progress(), Unsent, id="send-failed"),
        pytest.param(
            ConnectionResetError(errno.ECONNRESET, "reset"),
            Progress(sent=True),
            Unsent,
            id="reset-unread",
        ),
        pytest.param(
            ConnectionResetError(errno.ECONNRESET, "reset"),
            Progress(sent=True, answered=True),
            ConnectionFailed,
            id="reset-mid-answer",
        ),
        pytest.param(
            OSError(errno.EIO, "I/O error"), Progress(sent=True), ConnectionFailed, id="oserror"
        ),
        pytest.param(
            trio.BrokenResourceError(), Progress(sent=True), ConnectionFailed, id="trio-broken"
        ),
        pytest.param(
            trio.ClosedResourceError(), Progress(), Unsent, id="trio-closed-before-sending"
        ),
    ],
)
def test_foreign_exceptions_map_to_signd_errors(
    exc: BaseException, progress: Progress, expected: type[SigndError]
) -> None:
    mapped = foreign_error(exc, "sign", progress)
    assert type(mapped) is expected
    with pytest.raises(expected), mapped_errors("sign", progress):
        raise exc


def test_other_exceptions_pass_through_the_map() -> None:
    assert foreign_error(ValueError("bug"), "sign", Progress()) is None
    with pytest.raises(ValueError, match="bug"), mapped_errors("sign", Progress()):
        raise ValueError("bug")
    with pytest.raises(KeyNotFound), mapped_errors("sign", Progress()):
        raise KeyNotFound("no key")


def test_connect_errors_name_the_socket() -> None:
    refused = foreign_connect_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "/s")
    assert isinstance(refused, ConnectionFailed)
    assert "cannot connect to signd at /s: refused" in str(refused)
    assert isinstance(foreign_connect_error(TimeoutError(), "/s"), RequestTimeout)
    assert foreign_connect_error(KeyError("x"), "/s") is None


def test_empty_is_what_whoami_sends() -> None:
    assert _calls.whoami().args == Empty()
