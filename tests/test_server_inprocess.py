"""The trio transport in one process: a real ``Server`` on a real Unix socket,
a fake service behind it, trio's MockClock (autojump) for every time-out.

What is tested here is the server's own logic (framing, limits, the memory
budget, pipelining, the idle sweep, the drain); the whole daemon with its
token is tested elsewhere.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from signd.access.policy import Principal
from signd.audit.facts import Outcome
from signd.config import LimitsConfig
from signd.errors import Busy, FrameTooLarge, WireError
from signd.metrics import Metrics
from signd.protocol import (
    Empty,
    FrameDecoder,
    JwksArgs,
    KeyRefArgs,
    Request,
    Response,
    SignArgs,
    SignBatchArgs,
    VerifyArgs,
    decode_response,
    encode_error,
    encode_request,
    encode_result,
)
from signd.server.core import Server
from signd.service.core import Reply, SlowWork


@dataclass
class FakeService:
    """Answers ``health`` at once; queues ``key_info`` (as the token pool
    queues work) until ``release`` or ``drop``; answers ``list_keys`` from a
    task once ``gate`` is set.  Records what it was asked."""

    asked: list[int] = field(default_factory=list)
    queued: list[tuple[object, int, Reply]] = field(default_factory=list)
    dropped: list[tuple[object, WireError]] = field(default_factory=list)
    gate: trio.Event = field(default_factory=trio.Event)
    #: by request id: the SHA-256 of its message the server handed along
    #: (absent: the server handed none for the whole read)
    sha256s: dict[int, bytes | None] = field(default_factory=dict)

    def handle(
        self,
        requests: Sequence[Request],
        reply: Reply,
        source: object,
        who: Principal,
        sha256s: Sequence[bytes | None] | None = None,
    ) -> list[SlowWork]:
        slow: list[SlowWork] = []
        for i, req in enumerate(requests):
            self.asked.append(req.id)
            if sha256s is not None:
                self.sha256s[req.id] = sha256s[i]
            if req.op in ("health", "sign", "sign_batch", "verify"):
                reply(req.id, encode_result(req.id, Empty()), Outcome())
            elif req.op == "jwks":  # an answer with its facts for the audit log
                reply(req.id, encode_result(req.id, Empty()), OUTCOME)
            elif req.op == "key_info":
                self.queued.append((source, req.id, reply))
            elif req.op == "list_keys":
                slow.append(self._answer_later(req.id, reply))
        return slow

    def _answer_later(self, request_id: int, reply: Reply) -> SlowWork:
        async def work() -> None:
            await self.gate.wait()
            reply(request_id, encode_result(request_id, Empty()), Outcome())

        return work

    def release(self) -> None:
        """Answer every queued request."""
        queued, self.queued = self.queued, []
        for _, request_id, reply in queued:
            reply(request_id, encode_result(request_id, Empty()), Outcome())

    def drop(self, source: object, error: WireError) -> int:
        """Fail what ``source`` has queued with ``error`` (as the pool does)."""
        self.dropped.append((source, error))
        mine = [q for q in self.queued if q[0] is source]
        self.queued = [q for q in self.queued if q[0] is not source]
        for _, request_id, reply in mine:
            reply(request_id, encode_error(request_id, error), Outcome(error=error))
        return len(mine)


OUTCOME = Outcome(version=7)


@dataclass
class FakeAudit:
    """Records what the server tells the audit log; relaxed: every record is
    written at once."""

    answered_with: list[tuple[bytes, Outcome | None]] = field(default_factory=list)

    def asked(self, who: object, notes: object, recipient: Any, request_id: int | None) -> Any:
        return (recipient, request_id)

    def answered(self, pending: Any, frame: bytes, outcome: Outcome | None = None) -> None:
        self.answered_with.append((frame, outcome))
        recipient, request_id = pending
        recipient.audited(request_id, frame, True)


class Peer:
    """A client connection speaking raw frames."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(1 << 24)
        self.ready: list[Response] = []

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def responses(self, count: int) -> list[Response]:
        """The next ``count`` responses.

        Raises:
            EOFError: the server closed the stream first.
        """
        while len(self.ready) < count:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(f"closed after {len(self.ready)} of {count} responses")
            self.decoder.receive_data(data)
            self.ready.extend(decode_response(body) for body in self.decoder.frames())
        out, self.ready = self.ready[:count], self.ready[count:]
        return out

    async def closed(self) -> bool:
        """True once the server ends the stream (EOF or reset), with nothing more."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            return True
        return data == b""


@dataclass
class Rig:
    server: Server
    service: FakeService
    metrics: Metrics
    path: str

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Peer]:
        stream = await trio.open_unix_socket(self.path)
        async with stream:
            yield Peer(stream)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # A short path: sun_path holds 108 bytes, pytest's tmp_path may not fit.
    path = Path(tempfile.mkdtemp(prefix="sd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def serving(socket_dir: Path, audit: Any = None, **limits: Any) -> AsyncIterator[Rig]:
    path = str(socket_dir / "s.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    sock.setblocking(False)
    service = FakeService()
    metrics = Metrics()
    server = Server(
        service,
        LimitsConfig(**limits),
        metrics=metrics,
        drop=service.drop,
        audit=audit,
    )
    with sock:  # serve closes it only when it returns, not when cancelled
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, sock)
            yield Rig(server, service, metrics, path)
            nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool]) -> None:
    """Return once ``condition()`` holds, looking again each virtual millisecond
    (the server's side of a socket event has no event of its own to wait on)."""
    with trio.fail_after(60):
        while not condition():
            await trio.sleep(0.001)


def health(request_id: int) -> bytes:
    return encode_request(request_id, "health", Empty())


def queued(request_id: int, pad: int = 0) -> bytes:
    return encode_request(request_id, "key_info", KeyRefArgs(key="k" * max(1, pad)))


def slow(request_id: int) -> bytes:
    return encode_request(request_id, "list_keys", Empty())


async def test_pipelined_requests_are_answered_in_order_on_one_connection(
    socket_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(socket_dir) as rig, rig.connect() as peer:
        # One write, many frames, a malformed one among them: every request
        # gets its answer, in order, and the bad one its error in its place.
        bad = msgpack.packb({"v": 1, "id": 50, "op": "no_such_op", "args": {}})
        frames = [health(i) for i in range(1, 50)]
        frames.append(struct.pack(">I", len(bad)) + bad)
        frames += [health(i) for i in range(51, 101)]
        await peer.send(b"".join(frames))
        answers = await peer.responses(100)
        # The service's answers keep the order of their requests; the bad
        # frame's error is not held back behind them (ids tell them apart).
        assert sorted(a.id for a in answers if a.id is not None) == list(range(1, 101))
        assert [a.id for a in answers if a.id != 50] == [i for i in range(1, 101) if i != 50]
        (error,) = [a for a in answers if a.id == 50]
        assert error.error is not None
        assert all(a.error is None for a in answers if a.id != 50)
        assert rig.service.asked == [i for i in range(1, 101) if i != 50]
        # The connection is still usable after the bad request.
        await peer.send(health(101))
        assert [a.id for a in await peer.responses(1)] == [101]


async def test_a_framing_error_closes_only_that_connection(
    socket_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        serving(socket_dir, max_frame=1024) as rig,
        rig.connect() as good,
        rig.connect() as bad,
    ):
        await good.send(health(1))
        assert [a.id for a in await good.responses(1)] == [1]
        # A request read before the oversized frame is still answered first.
        await bad.send(health(7) + struct.pack(">I", 4096) + b"x" * 100)
        first, fatal = await bad.responses(2)
        assert first.id == 7
        assert first.error is None
        assert fatal.id is None
        assert isinstance(fatal.error, FrameTooLarge)
        assert await bad.closed()
        await good.send(health(2))
        assert [a.id for a in await good.responses(1)] == [2]
        assert rig.metrics.limit_hits["max_frame"] == 1


async def test_the_per_uid_connection_limit_refuses_with_busy(
    socket_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        serving(socket_dir, max_connections_per_uid=2) as rig,
        rig.connect() as one,
        rig.connect() as two,
    ):
        for i, peer in enumerate((one, two)):
            await peer.send(health(i))
            assert [a.id for a in await peer.responses(1)] == [i]
        async with rig.connect() as three:
            (refused,) = await three.responses(1)
            assert refused.id is None
            assert isinstance(refused.error, Busy)
            assert "max_connections_per_uid" in str(refused.error)
            assert await three.closed()
        assert rig.metrics.limit_hits["max_connections_per_uid"] == 1
        # Once one closes, the uid may connect again.
        await one.stream.aclose()
        await until(lambda: rig.server.connections == 1)
        async with rig.connect() as again:
            await again.send(health(9))
            assert [a.id for a in await again.responses(1)] == [9]


async def test_a_connection_over_its_memory_budget_is_evicted_with_busy(
    socket_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        serving(socket_dir, max_buffered_bytes_per_uid=8192) as rig,
        rig.connect() as small,
        rig.connect() as big,
    ):
        await small.send(queued(1, pad=10))
        # 16 requests of about 1 kB, none answered: past the uid's 8 kB share.
        await big.send(b"".join(queued(i, pad=1000) for i in range(16)))
        (evicted,) = await big.responses(1)
        assert evicted.id is None
        assert isinstance(evicted.error, Busy)
        assert "max_buffered_bytes_per_uid" in str(evicted.error)
        assert await big.closed()
        assert rig.metrics.limit_hits["max_buffered_bytes_per_uid"] == 1
        # The biggest holder went; its queued work was dropped, not the other's.
        assert len(rig.service.dropped) == 1
        assert isinstance(rig.service.dropped[0][1], Busy)
        rig.service.release()
        assert [a.id for a in await small.responses(1)] == [1]
        assert rig.server.budget.buffered == 0


async def test_an_idle_connection_is_closed_after_idle_timeout_and_a_busy_one_is_not(
    socket_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A connection waiting for a slow answer is not idle: an idle connection
    whose last request came after the slow one's is closed, the slow one not."""
    async with serving(socket_dir, idle_timeout=10.0) as rig:
        async with rig.connect() as waiting, rig.connect() as quiet:
            await waiting.send(slow(1))
            await until(lambda: rig.service.asked == [1])
            await quiet.send(health(2))
            await quiet.responses(1)
            start = trio.current_time()
            with trio.fail_after(12.5):  # the sweeps are a tenth of it apart
                assert await quiet.closed()
            assert trio.current_time() - start >= 10.0
            # counted once the server's side is closed too, right after the client saw it
            await until(lambda: rig.metrics.limit_hits["idle_timeout"] == 1)
            # A request in flight for far longer does not make it idle.
            await trio.sleep(100)
            rig.service.gate.set()
            assert [a.id for a in await waiting.responses(1)] == [1]


async def test_an_oversized_frame_is_answered_after_every_request_read_before_it(
    socket_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """PROTOCOL.md: the answers to requests read before an oversized frame
    come first, then ``frame_too_large`` with id nil, then the end of the
    stream, however long those requests take."""
    async with serving(socket_dir, max_frame=1024) as rig, rig.connect() as peer:
        await peer.send(queued(1) + health(2) + slow(3) + struct.pack(">I", 1025))
        assert [a.id for a in await peer.responses(1)] == [2]
        with trio.move_on_after(5):  # within limits.drain_timeout (10 s)
            await peer.responses(1)
            pytest.fail("something came before the requests in flight were answered")
        rig.service.release()
        assert [a.id for a in await peer.responses(1)] == [1]
        rig.service.gate.set()
        answer, fatal = await peer.responses(2)
        assert answer.id == 3
        assert answer.error is None
        assert fatal.id is None
        assert isinstance(fatal.error, FrameTooLarge)
        assert await peer.closed()


async def test_a_reload_with_a_shorter_idle_timeout_applies_to_open_connections(
    socket_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(socket_dir, idle_timeout=0.0) as rig, rig.connect() as peer:
        await peer.send(health(1))
        await peer.responses(1)
        with trio.move_on_after(1000) as scope:
            await peer.closed()
        assert scope.cancelled_caught, "idle_timeout 0 closed a connection"
        rig.server.apply_limits(LimitsConfig(idle_timeout=5.0))
        with trio.fail_after(7.0):  # virtual seconds; the sweeper was woken
            assert await peer.closed()


async def test_shutdown_answers_what_was_sent_then_closes(
    socket_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(socket_dir) as rig, rig.connect() as peer:
        await peer.send(queued(1) + slow(2) + health(3))
        assert [a.id for a in await peer.responses(1)] == [3]
        rig.server.shutdown()
        rig.service.release()
        assert [a.id for a in await peer.responses(1)] == [1]
        rig.service.gate.set()
        assert [a.id for a in await peer.responses(1)] == [2]
        assert await peer.closed()


async def test_an_answers_outcome_goes_to_the_audit_log_with_it(
    socket_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    audit = FakeAudit()
    async with serving(socket_dir, audit=audit) as rig, rig.connect() as peer:
        await peer.send(encode_request(1, "jwks", JwksArgs(keys=("k",))))
        (answer,) = await peer.responses(1)
        assert answer.id == 1
        assert answer.error is None
        assert audit.answered_with == [(encode_result(1, Empty()), OUTCOME)]


@pytest.mark.parametrize("audited", [True, False], ids=["audit-on", "audit-off"])
async def test_the_audit_records_sha256_of_one_message_goes_to_the_service(
    socket_dir: Path, autojump_clock: trio.testing.MockClock, audited: bool
) -> None:
    """With audit on, the SHA-256 of a request's one message (its record's
    data_sha256) is handed to the service, which then need not hash it again;
    a digest or a batch hands none.  With audit off nothing is computed."""
    digest = hashlib.sha256(b"d").digest()
    async with (
        serving(socket_dir, audit=FakeAudit() if audited else None) as rig,
        rig.connect() as peer,
    ):
        await peer.send(
            encode_request(1, "sign", SignArgs(key="k", message=b"one"))
            + encode_request(2, "sign", SignArgs(key="k", digest=digest, hash="sha256"))
            + encode_request(3, "sign_batch", SignBatchArgs(key="k", messages=(b"a", b"b")))
            + encode_request(4, "verify", VerifyArgs(key="k", message=b"four", signature=b"s"))
            + health(5)
        )
        assert [a.id for a in await peer.responses(5)] == [1, 2, 3, 4, 5]
        if not audited:
            assert rig.service.sha256s == {}
            return
        assert rig.service.sha256s == {
            1: hashlib.sha256(b"one").digest(),
            2: None,
            3: None,
            4: hashlib.sha256(b"four").digest(),
            5: None,
        }


async def test_past_max_connections_a_connection_is_refused_with_busy(
    socket_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(socket_dir, max_connections=1) as rig, rig.connect() as one:
        await one.send(health(1))
        await one.responses(1)
        async with rig.connect() as two:
            (refused,) = await two.responses(1)
            assert refused.id is None
            assert isinstance(refused.error, Busy)
            assert await two.closed()
        assert rig.metrics.limit_hits["max_connections"] == 1
        await one.send(health(2))
        assert [a.id for a in await one.responses(1)] == [2]


async def test_past_max_inflight_the_server_stops_reading_until_answers_go_out(
    socket_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        serving(socket_dir, max_inflight_per_connection=4) as rig,
        rig.connect() as peer,
    ):
        await peer.send(b"".join(queued(i) for i in range(4)))
        await until(lambda: len(rig.service.asked) == 4)
        await peer.send(b"".join(queued(i) for i in range(4, 10)))
        await trio.sleep(10)  # nothing more is read, however long it waits
        assert rig.service.asked == [0, 1, 2, 3]
        assert rig.metrics.limit_hits["max_inflight"] == 1
        rig.service.release()  # answered: the rest is read
        await until(lambda: len(rig.service.asked) == 10)
        rig.service.release()
        assert sorted(a.id for a in await peer.responses(10)) == list(range(10))
