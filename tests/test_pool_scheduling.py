"""The token pool's queue (``signd.token.scheduler``) and outage state in-process: fake workers
(lanes that record what they are handed), trio's MockClock, no process."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from signd import errors
from signd.keys.algorithms import Scheme
from signd.metrics import Metrics
from signd.token import ipc
from signd.token.ipc import IpcDecoder, SignJob
from signd.token.outage import OUTAGE_LOG_EVERY, Outage
from signd.token.scheduler import ADMISSION_JOBS, Entry, Scheduler, SchedulerSettings


@dataclass
class FakeLane:
    """A signing worker that keeps what it is handed."""

    alive: bool = True
    retiring: bool = False
    batches: int = 0
    handed: list[tuple[int, list[Entry], bytes]] = field(default_factory=list)

    def hand(self, tag: int, pending: Any, frame: bytes) -> None:
        self.handed.append((tag, pending, frame))


@dataclass
class Outcomes:
    """Every callback's outcome, by job data."""

    got: dict[bytes, tuple[bool, Any]] = field(default_factory=dict)

    def entry(self, data: bytes, deadline: float = float("inf"), bulk: bool = False) -> Entry:
        def done(ok: bool, value: Any) -> None:
            assert data not in self.got, "answered twice"
            self.got[data] = (ok, value)

        return Entry(SignJob(b"\x01" * 16, Scheme.ECDSA, None, data), done, deadline, bulk)

    def entries(
        self, prefix: str, n: int, deadline: float = float("inf"), bulk: bool = False
    ) -> list[Entry]:
        return [self.entry(f"{prefix}{i}".encode(), deadline, bulk) for i in range(n)]


class Unavailable:
    def __init__(self) -> None:
        self.asked = 0

    def __call__(self) -> errors.TokenUnavailable:
        self.asked += 1
        return errors.TokenUnavailable("no token worker is running; retry")


def make(
    lanes: list[FakeLane | None],
    *,
    metrics: Metrics | None = None,
    queue_limit: int = 1000,
    batch_max: int = 8,
    depth: int = 2,
    quantum: int = 4,
    bulk_from: int | None = None,
) -> Scheduler:
    s = Scheduler(
        SchedulerSettings(queue_limit, batch_max, depth, quantum, bulk_from),
        metrics if metrics is not None else Metrics(),
        lanes,
        Unavailable(),
        trio.current_time,
    )
    for lane in lanes:
        if lane is not None and lane.alive:
            s.lane_up()
    return s


def data_of(entries: list[Entry]) -> list[bytes]:
    return [e.job.data for e in entries if isinstance(e.job, SignJob)]


async def test_a_flood_does_not_starve_a_small_source() -> None:
    lane = FakeLane()
    s = make([lane], batch_max=8, quantum=4, depth=1)
    out = Outcomes()
    s.enqueue("flood", out.entries("f", 100))
    s.enqueue("small", out.entries("s", 2))
    s.pump()
    ((_, batch, _),) = lane.handed
    assert data_of(batch) == [b"f0", b"f1", b"f2", b"f3", b"s0", b"s1", b"f4", b"f5"]
    assert s.pending == 102


async def test_round_robin_over_sources_quantum_at_a_time() -> None:
    lane = FakeLane()
    s = make([lane], batch_max=7, quantum=2, depth=1)
    out = Outcomes()
    for name in ("a", "b", "c"):
        s.enqueue(name, out.entries(name, 3))
    s.pump()
    ((_, batch, _),) = lane.handed
    assert data_of(batch) == [b"a0", b"a1", b"b0", b"b1", b"c0", b"c1", b"a2"]


async def test_the_batch_is_one_jobs_frame_with_its_tag() -> None:
    lane = FakeLane()
    s = make([lane])
    out = Outcomes()
    s.enqueue("a", out.entries("a", 3))
    s.pump()
    ((tag, batch, frame),) = lane.handed
    decoder = IpcDecoder()
    decoder.receive_data(frame)
    (msg,) = decoder.messages()
    request = ipc.decode_request(msg)
    assert request.tag == tag
    assert request.call == ipc.RunJobs([e.job for e in batch])


async def test_pump_fills_the_least_busy_worker_up_to_depth() -> None:
    lanes: list[FakeLane | None] = [FakeLane(), FakeLane(), None]
    s = make(lanes, batch_max=2, quantum=2, depth=2)
    out = Outcomes()
    s.enqueue("a", out.entries("a", 20))
    s.pump()
    a, b = lanes[0], lanes[1]
    assert a is not None
    assert b is not None
    # Alternating: each time the worker with fewer batches gets the next one.
    assert [len(a.handed), len(b.handed)] == [2, 2]
    assert data_of(a.handed[0][1]) == [b"a0", b"a1"]
    assert data_of(b.handed[0][1]) == [b"a2", b"a3"]
    assert data_of(a.handed[1][1]) == [b"a4", b"a5"]
    assert s.pending == 20  # queued or in hand
    # A worker answering makes room for one more batch, no more.
    a.batches -= 1
    s.pump()
    assert [len(a.handed), len(b.handed)] == [3, 2]


async def test_a_bulk_worker_takes_only_bulk_work() -> None:
    lanes: list[FakeLane | None] = [FakeLane(), FakeLane()]
    s = make(lanes, batch_max=2, quantum=2, depth=2, bulk_from=1)
    general, bulk = lanes[0], lanes[1]
    assert general is not None
    assert bulk is not None
    out = Outcomes()
    # Single requests: only the general worker, however many are queued.
    s.enqueue("one", out.entries("o", 8))
    s.pump()
    assert [len(general.handed), len(bulk.handed)] == [2, 0]
    # A sign_batch behind them on another connection: the bulk worker takes
    # its items, passing over the connection whose next entry is not bulk.
    s.enqueue("many", out.entries("m", 5, bulk=True))
    s.pump()
    assert [len(general.handed), len(bulk.handed)] == [2, 2]
    assert data_of(bulk.handed[0][1]) == [b"m0", b"m1"]
    assert data_of(bulk.handed[1][1]) == [b"m2", b"m3"]
    # The general worker, once it has room, goes on round-robin: the single
    # requests kept their turn.
    general.batches -= 1
    s.pump()
    assert data_of(general.handed[2][1]) == [b"o4", b"o5"]
    assert s.pending == 13


async def test_bulk_work_queued_behind_other_work_does_not_spin() -> None:
    lanes: list[FakeLane | None] = [FakeLane(batches=2), FakeLane()]
    s = make(lanes, batch_max=4, quantum=4, depth=2, bulk_from=1)
    out = Outcomes()
    s.enqueue("a", out.entries("o", 1))
    s.enqueue("a", out.entries("m", 3, bulk=True))
    s.pump()  # returns: the bulk items wait behind the single one
    bulk = lanes[1]
    assert bulk is not None
    assert bulk.handed == []
    assert s.pending == 4


async def test_with_no_general_worker_up_a_bulk_worker_takes_anything() -> None:
    lanes: list[FakeLane | None] = [FakeLane(alive=False), FakeLane()]
    s = make(lanes, batch_max=4, depth=2, bulk_from=1)
    out = Outcomes()
    s.enqueue("a", out.entries("o", 3))
    s.pump()
    bulk = lanes[1]
    assert bulk is not None
    assert data_of(bulk.handed[0][1]) == [b"o0", b"o1", b"o2"]


async def test_retiring_and_dead_workers_get_nothing() -> None:
    retiring, dead, fresh = FakeLane(retiring=True), FakeLane(alive=False), FakeLane()
    s = make([retiring, dead, fresh], depth=5)
    out = Outcomes()
    s.enqueue("a", out.entries("a", 3))
    s.pump()
    assert retiring.handed == []
    assert dead.handed == []
    assert len(fresh.handed) == 1


async def test_queue_limit_refuses_all_or_nothing() -> None:
    lane = FakeLane(batches=2)  # full: everything stays queued
    s = make([lane], queue_limit=10, depth=2)
    out = Outcomes()
    s.enqueue("a", out.entries("a", 6))
    with pytest.raises(errors.Busy, match="token queue is full"):
        s.enqueue("b", out.entries("b", 5))
    with pytest.raises(errors.InvalidArgument, match="exceed the token queue of 10"):
        s.enqueue("c", out.entries("c", 11))
    assert s.pending == 6
    s.enqueue("b", out.entries("b", 4))
    assert s.pending == 10
    assert out.got == {}


async def test_a_saturated_token_refuses_what_it_cannot_finish_in_time() -> None:
    lane = FakeLane()
    s = make([lane], batch_max=ADMISSION_JOBS, quantum=ADMISSION_JOBS, depth=1)
    out = Outcomes()
    s.enqueue("a", out.entries("a", ADMISSION_JOBS))
    s.pump()
    ((_, batch, _),) = lane.handed
    # The token took a second a job.
    s.completed(batch, float(ADMISSION_JOBS), [[True, b"sig"]] * ADMISSION_JOBS)
    now = trio.current_time()
    s.enqueue("b", out.entries("b", 2, deadline=now + 3))  # 2 s of work, 3 s to wait
    with pytest.raises(errors.Busy, match="saturated"):
        s.enqueue("c", out.entries("c", 2, deadline=now + 3))  # 4 s of work
    s.enqueue("c", out.entries("c", 2, deadline=now + 5))


async def test_no_admission_estimate_before_enough_jobs() -> None:
    lane = FakeLane()
    s = make([lane], batch_max=4, quantum=4, depth=1)
    out = Outcomes()
    s.enqueue("a", out.entries("a", 4))
    s.pump()
    s.completed(lane.handed[0][1], 400.0, [[True, b"sig"]] * 4)  # 100 s a job, but 4 jobs
    s.enqueue("b", out.entries("b", 2, deadline=trio.current_time() + 1))


async def test_drop_answers_only_what_is_still_queued() -> None:
    lane = FakeLane()
    s = make([lane], batch_max=2, quantum=2, depth=1)
    out = Outcomes()
    s.enqueue("gone", out.entries("g", 5))
    s.enqueue("stays", out.entries("s", 1))
    s.pump()  # g0, g1 in the worker's hands
    closed = errors.ShuttingDown("the connection closed")
    assert s.drop("gone", closed) == 3
    assert out.got == {b"g2": (False, closed), b"g3": (False, closed), b"g4": (False, closed)}
    assert s.drop("gone", closed) == 0
    assert s.drop("never", closed) == 0
    assert s.pending == 3  # g0, g1 in hand, s0 queued
    lane.batches = 0
    s.pump()
    assert data_of(lane.handed[-1][1]) == [b"s0"]


async def test_work_past_its_deadline_never_reaches_a_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lane = FakeLane(batches=1)
    s = make([lane], depth=1)
    out = Outcomes()
    now = trio.current_time()
    s.enqueue("a", [out.entry(b"late", now + 1), out.entry(b"on-time", now + 60)])
    await trio.sleep(2)
    lane.batches = 0
    s.pump()
    ok, err = out.got[b"late"]
    assert not ok
    assert isinstance(err, errors.DeadlineExceeded)
    ((_, batch, _),) = lane.handed
    assert data_of(batch) == [b"on-time"]


async def test_completed_answers_each_entry_and_counts_the_batch() -> None:
    lane = FakeLane()
    metrics = Metrics()
    s = make([lane], metrics=metrics)
    out = Outcomes()
    s.enqueue("a", out.entries("a", 2))
    s.pump()
    ((_, batch, _),) = lane.handed
    s.completed(batch, 0.5, [[True, b"sig"], [False, 502, "token failed sign: GeneralError"]])
    assert out.got[b"a0"] == (True, b"sig")
    ok, err = out.got[b"a1"]
    assert not ok
    assert isinstance(err, errors.TokenError)
    assert err.message == "token failed sign: GeneralError"
    assert s.pending == 0
    assert sum(metrics.token_batch_size.counts) == 1
    assert metrics.token_batch_size.sum == 2


async def test_a_callback_that_raises_does_not_stop_the_others() -> None:
    lane = FakeLane()
    s = make([lane])
    out = Outcomes()

    def broken(ok: bool, value: Any) -> None:
        raise RuntimeError("a bug in a callback")

    s.enqueue("a", [Entry(SignJob(b"", Scheme.ECDSA, None, b"x"), broken), out.entry(b"y")])
    s.pump()
    s.completed(lane.handed[0][1], 0.1, [[True, b"1"], [True, b"2"]])
    assert out.got[b"y"] == (True, b"2")


async def test_a_stopped_worker_answers_what_it_held() -> None:
    lane = FakeLane()
    s = make([lane])
    out = Outcomes()
    s.enqueue("a", out.entries("a", 2))
    s.pump()
    stopped = errors.TokenUnavailable("the token worker stopped; retry")
    s.abandoned(lane.handed[0][1], stopped)
    assert out.got == {b"a0": (False, stopped), b"a1": (False, stopped)}
    assert s.pending == 0


async def test_losing_the_last_worker_fails_everything_queued() -> None:
    lane = FakeLane(batches=2)
    s = make([lane], depth=2)
    out = Outcomes()
    s.enqueue("a", out.entries("a", 3))
    s.enqueue("b", out.entries("b", 2))
    s.pump()
    assert out.got == {}  # the worker is full: all queued
    lane.alive = False
    s.lane_down()
    s.pump()
    assert set(out.got) == {b"a0", b"a1", b"a2", b"b0", b"b1"}
    assert all(not ok and isinstance(v, errors.TokenUnavailable) for ok, v in out.got.values())
    assert s.pending == 0
    with pytest.raises(errors.TokenUnavailable):
        s.enqueue("c", out.entries("c", 1))


async def test_tags_are_never_reused() -> None:
    lane = FakeLane()
    s = make([lane], batch_max=1, quantum=1, depth=100)
    out = Outcomes()
    s.enqueue("a", out.entries("a", 3))
    first = s.new_tag()
    s.pump()
    tags = [first, *(tag for tag, _, _ in lane.handed), s.new_tag()]
    assert len(set(tags)) == len(tags) == 5


# ---------------------------------------------------------------- the outage state


async def test_an_outage_says_since_when_and_ends_once_found(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outage = Outage(trio.current_time)
    assert "no token worker is running" in outage.unavailable().message
    assert outage.lost("DeviceRemoved")
    assert not outage.lost("again")  # known already
    assert outage.losses == 1
    back = outage.back
    await trio.sleep(2.5)
    assert "lost 2.5 s ago" in outage.unavailable().message
    outage.found(0)
    assert back.is_set()
    assert not outage.down
    assert outage.lost("and again")
    assert outage.losses == 2
    assert not outage.back.is_set()


async def test_failed_starts_are_logged_once_per_period(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    outage = Outage(trio.current_time)
    with caplog.at_level(logging.WARNING, "signd.workers"):
        outage.start_failed(1, "login failed")
        outage.start_failed(1, "login failed")
        await trio.sleep(OUTAGE_LOG_EVERY)
        outage.start_failed(1, "login failed")
    failed = [r for r in caplog.records if r.getMessage() == "token worker failed to start"]
    assert len(failed) == 2
