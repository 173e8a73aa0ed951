"""What one ``Service.handle`` call carries to the handlers of the op table."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..access.policy import Principal
from ..audit.facts import Outcome
from ..protocol import Request
from ..token.pool import Entry

__all__ = ["Batch", "Reply", "SlowWork"]

#: ``reply(request_id, frame, outcome)``: hand one encoded response to the
#: transport, with the facts it states (for the audit log).
Reply = Callable[[int, bytes, Outcome], None]
SlowWork = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class Batch:
    """The requests one read of a connection delivered, as the handlers see
    them: who asks, for whom to answer, and what they leave to do.

    Not frozen: the handlers add to ``entries`` (token work, submitted together
    once every request was seen) and ``slow`` (coroutines for the transport to
    run as tasks).
    """

    reply: Reply
    #: the connection, for the token queue's fair queueing
    source: object
    who: Principal
    #: the wall clock (key states), once for the whole batch
    now: float
    #: ``time.monotonic()`` by which the token must have answered
    deadline: float
    #: ``time.perf_counter()`` when the batch came in (latency metrics)
    started: float
    #: a lone request with the token idle: a verification is fastest inline
    inline_ok: bool
    #: the SHA-256 of the one ``message`` of the request being handled, when
    #: the transport computed it already (its audit record's ``data_sha256``):
    #: a SHA-256 algorithm signs or verifies it instead of hashing again.
    #: ``Service.handle`` sets it before each handler; None: not known.
    sha256: bytes | None = None
    #: (request, its token entries), submitted once the batch is seen
    entries: list[tuple[Request, list[Entry]]] = field(default_factory=list)
    slow: list[SlowWork] = field(default_factory=list)
