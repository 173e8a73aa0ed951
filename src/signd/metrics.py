"""Prometheus metrics: counted on the hot path in plain dicts, exported at scrape time.

A ``prometheus_client`` counter or histogram costs about a microsecond per
update with its labels and locks; at 20,000 signatures a second that would be
a visible share of the event loop.  So the loop only bumps numbers in plain
dicts (it is the only writer, one thread), and ``Collector`` turns them into
metric families when Prometheus scrapes.  Nothing is global: ``Metrics`` is
made by the daemon and handed to what counts, and its registry is its own.

Labels are bounded: key names the daemon knows, their versions, algorithms,
wire error names and codes, and fixed enums; never pids, uids or request ids.
A request refused before its key is known (bad name, ``key_not_found``) or
before the policy allowed it (``permission_denied``) is counted in
``signd_errors_total`` only, so a client can neither grow a label set by
asking for random names nor move a key's series with requests it may not make.

Key names are not for everyone: ``Collector(per_key=False)``, the view served
when no metrics token is configured (or to a scrape without it), sums every
family labelled ``key`` into one series whose ``key`` (and ``version``) label
is empty.  The HTTP endpoint that serves them is ``server/http.py``.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from . import __version__
from .errors import WireError

__all__ = [
    "DURATION_BUCKETS",
    "LIMITS",
    "KeyState",
    "Limit",
    "Metrics",
    "Snapshot",
]

log = logging.getLogger("signd")

DURATION_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
#: Seconds the per-key signatures-per-second gauge averages over.
WINDOW: Final = 10
#: The ``limit`` label values of ``signd_limit_hits_total``: each the setting
#: of ``[limits]`` it counts (``max_inflight`` is ``max_inflight_per_connection``).
Limit = Literal[
    "max_connections",
    "max_connections_per_uid",
    "max_buffered_bytes",
    "max_buffered_bytes_per_uid",
    "max_inflight",
    "max_frame",
    "idle_timeout",
    "request_timeout",
    "max_output_buffer",
    "token_queue",
]
LIMITS: Final[tuple[Limit, ...]] = get_args(Limit)


class Histogram:
    """Bucket counts and a sum; ``observe`` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def cumulative(self) -> list[tuple[str, float]]:
        out = []
        total = 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, float(total)))
        return out


class Window:
    """Events per second over the last ``WINDOW`` whole seconds."""

    __slots__ = ("counts", "stamps")

    def __init__(self) -> None:
        self.counts = [0] * WINDOW
        self.stamps = [-1] * WINDOW

    def add(self, n: int, now: float) -> None:
        second = int(now)
        i = second % WINDOW
        if self.stamps[i] != second:
            self.stamps[i] = second
            self.counts[i] = 0
        self.counts[i] += n

    def rate(self, now: float) -> float:
        second = int(now)
        done = sum(
            c
            for c, s in zip(self.counts, self.stamps, strict=True)
            if second - WINDOW <= s < second
        )
        return done / WINDOW


@dataclass(frozen=True, slots=True)
class KeyState:
    """What the gauges say about one key, read at scrape time."""

    name: str
    current_version: int
    current_created: float
    next_rotation: float | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The gauges that are read, not counted: filled by the daemon's parts."""

    token_up: bool = False
    ready: bool = False
    connections_open: int = 0
    requests_in_flight: int = 0
    token_queue_depth: int = 0
    token_reconnects: int = 0
    audit_records: int = 0
    audit_failures: int = 0
    audit_checkpoints: int = 0
    audit_checkpoint_failures: int = 0
    #: False once the daemon found its log not matching the chain head on the token
    audit_chain_ok: bool = True
    audit_chain_mismatches: int = 0
    #: bytes the connections hold (partial frames, unanswered requests, unsent answers)
    buffered_bytes: int = 0
    #: (scope, requests refused) per rate limit: "principal", "key"
    rate_limited: tuple[tuple[str, int], ...] = ()
    keys: tuple[KeyState, ...] = ()
    #: with several tokens: (label, state) of each (``TokenSet.states``)
    tokens: tuple[tuple[str, str], ...] = ()


@dataclass
class Metrics:
    """Every number signd exports.  Update methods run in the event loop only,
    except ``audit_write`` (the audit writer thread: a float and a list index,
    safe under the GIL)."""

    clock: Callable[[], float] = time.time
    #: (key, version, algorithm, result) -> requests
    sign_requests: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    #: (key, version, algorithm) -> signatures
    signatures: dict[tuple[str, str, str], int] = field(default_factory=dict)
    #: (key, result) -> requests
    verify_requests: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (key, trigger) -> rotations
    rotations: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (code, name, op) -> error answers
    errors: dict[tuple[int, str, str], int] = field(default_factory=dict)
    #: limit (one of ``LIMITS``) -> times it stopped something
    limit_hits: dict[Limit, int] = field(default_factory=lambda: dict.fromkeys(LIMITS, 0))
    sign_duration: dict[str, Histogram] = field(default_factory=dict)
    token_sign_duration: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    token_batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    audit_write_duration: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    windows: dict[str, Window] = field(default_factory=dict)
    #: token searches for key names this process had not loaded
    key_lookups: int = 0
    #: (message, result) -> messages on the agent socket (``signd.agent``); its
    #: two main series exist from the start (at 0), so that rates of them work
    agent_requests: dict[tuple[str, str], int] = field(
        default_factory=lambda: {("request_identities", "ok"): 0, ("sign_request", "ok"): 0}
    )

    # ------------------------------------------------------------ hot path

    def signed(
        self, key: str, version: int, algorithm: str, count: int, started: float, now: float
    ) -> None:
        """A sign (``count`` 1) or sign_batch request answered with ``count`` signatures."""
        v = str(version)
        k = (key, v, algorithm, "ok")
        self.sign_requests[k] = self.sign_requests.get(k, 0) + 1
        if count:
            s = (key, v, algorithm)
            self.signatures[s] = self.signatures.get(s, 0) + count
            w = self.windows.get(key)
            if w is None:
                w = self.windows[key] = Window()
            w.add(count, now)  # perf_counter seconds, as at scrape time
        h = self.sign_duration.get(key)
        if h is None:
            h = self.sign_duration[key] = Histogram(DURATION_BUCKETS)
        h.observe(now - started)

    def sign_failed(self, key: str, version: int | None, algorithm: str, error: WireError) -> None:
        """A sign or sign_batch request of a known key answered with ``error``."""
        k = (key, "" if version is None else str(version), algorithm, error.name)
        self.sign_requests[k] = self.sign_requests.get(k, 0) + 1

    def verified(self, key: str, result: str) -> None:
        """``result``: valid, invalid, or a wire error name."""
        k = (key, result)
        self.verify_requests[k] = self.verify_requests.get(k, 0) + 1

    def error(self, op: str | None, error: WireError) -> None:
        k = (int(error.code), error.name, op or "")
        self.errors[k] = self.errors.get(k, 0) + 1

    def limit_hit(self, limit: Limit) -> None:
        """A limit of ``LIMITS`` refused, paused, timed out or closed something."""
        self.limit_hits[limit] += 1

    def agent_request(self, message: str, result: str) -> None:
        """A message on the agent socket answered: ``message`` a fixed name
        (``sign_request``, ``request_identities``...), ``result`` ok or why not."""
        k = (message, result)
        self.agent_requests[k] = self.agent_requests.get(k, 0) + 1

    def rotated(self, key: str, trigger: str) -> None:
        k = (key, trigger)
        self.rotations[k] = self.rotations.get(k, 0) + 1

    def token_batch(self, size: int, seconds: float) -> None:
        """A worker answered a batch of ``size`` jobs after ``seconds`` of work."""
        self.token_batch_size.observe(size)
        if size:
            self.token_sign_duration.observe(seconds / size)

    def audit_write(self, seconds: float) -> None:
        self.audit_write_duration.observe(seconds)

    # ------------------------------------------------------------ export

    def registry(
        self, snapshot: Callable[[], Snapshot], *, per_key: bool = True
    ) -> CollectorRegistry:
        """A registry of its own with these metrics in it (never the global one),
        and the gauges ``snapshot`` reads at scrape time from the daemon's parts.

        ``per_key`` False: every family labelled ``key`` is summed over the
        keys, so no key name (nor version) appears in the output.
        """
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(self, snapshot, per_key=per_key))
        return registry


class Collector:
    """Turns ``Metrics`` into metric families when Prometheus scrapes."""

    def __init__(
        self, metrics: Metrics, snapshot: Callable[[], Snapshot], *, per_key: bool = True
    ) -> None:
        self.m = metrics
        self.snapshot = snapshot
        self.per_key = per_key

    def _keyed(
        self, items: Iterable[tuple[tuple[str, ...], int]], hidden: int
    ) -> list[tuple[tuple[str, ...], int]]:
        """``items`` as they are, or with their first ``hidden`` labels (key,
        version) emptied and the counts summed."""
        items = list(items)
        if self.per_key:
            return items
        out: dict[tuple[str, ...], int] = {}
        for labels, n in items:
            k = ("",) * hidden + labels[hidden:]
            out[k] = out.get(k, 0) + n
        return list(out.items())

    def collect(self) -> Iterator[Metric]:
        m = self.m
        now = m.clock()
        snap = self.snapshot()
        yield _counter(
            "signd_sign_requests",
            "Sign and sign_batch requests of known keys, by result (ok or the error name).",
            ("key", "version", "algorithm", "result"),
            self._keyed(m.sign_requests.items(), 2),
        )
        yield _counter(
            "signd_signatures",
            "Signatures made (every sign_batch item counts).",
            ("key", "version", "algorithm"),
            self._keyed(m.signatures.items(), 2),
        )
        yield _counter(
            "signd_verify_requests",
            "Verify requests of known keys, by result (valid, invalid or the error name).",
            ("key", "result"),
            self._keyed(m.verify_requests.items(), 1),
        )
        yield _counter(
            "signd_rotations",
            "Key rotations, manual or scheduled.",
            ("key", "trigger"),
            self._keyed(m.rotations.items(), 1),
        )
        yield _counter(
            "signd_errors",
            "Error answers, by wire code, name and operation.",
            ("code", "name", "op"),
            [((str(c), n, o), v) for (c, n, o), v in list(m.errors.items())],
        )
        yield _counter(
            "signd_agent_requests",
            "Messages on the ssh-agent socket, by message and result (ok, or why not).",
            ("message", "result"),
            [((msg, r), v) for (msg, r), v in list(m.agent_requests.items())],
        )
        yield _counter(
            "signd_rate_limited",
            "Requests refused by a rate limit, by scope (principal or key).",
            ("scope",),
            [((s,), v) for s, v in snap.rate_limited],
        )
        yield _counter(
            "signd_limit_hits",
            "Times a [limits] setting refused a connection or request, paused reading "
            "a connection, answered deadline_exceeded or closed an idle connection.",
            ("limit",),
            [((k,), v) for k, v in list(m.limit_hits.items())],
        )
        yield _counter(
            "signd_key_lookups",
            "Token searches for key names this daemon had not loaded (one search "
            "answers every name waiting).",
            (),
            [((), m.key_lookups)],
        )
        yield _counter(
            "signd_token_reconnects",
            "Token workers started again after one died or lost its session.",
            (),
            [((), snap.token_reconnects)],
        )
        yield _counter(
            "signd_audit_records", "Audit records written.", (), [((), snap.audit_records)]
        )
        yield _counter(
            "signd_audit_write_failures",
            "Audit records that could not be written (their answers were withheld).",
            (),
            [((), snap.audit_failures)],
        )
        yield _counter(
            "signd_audit_checkpoints",
            "Audit checkpoints (the chain head signed on the token) written to the log.",
            (),
            [((), snap.audit_checkpoints)],
        )
        yield _counter(
            "signd_audit_checkpoint_failures",
            "Audit checkpoints that could not be signed or whose head could not be stored.",
            (),
            [((), snap.audit_checkpoint_failures)],
        )
        yield _counter(
            "signd_audit_chain_mismatches",
            "Starts on an audit log that did not match the chain head kept on the token.",
            (),
            [((), snap.audit_chain_mismatches)],
        )
        yield from _key_gauges(m, snap.keys, now, per_key=self.per_key)
        for name, doc, value in (
            ("signd_token_up", "1 when a token worker is logged in.", float(snap.token_up)),
            (
                "signd_audit_chain_ok",
                "0 when this daemon started on an audit log that did not match the chain "
                "head on the token (records removed or rewritten); 1 otherwise.",
                float(snap.audit_chain_ok),
            ),
            ("signd_ready", "1 when the token is reachable and the keys are loaded.", snap.ready),
            ("signd_connections_open", "Open client connections.", snap.connections_open),
            (
                "signd_requests_in_flight",
                "Requests read, not yet answered.",
                snap.requests_in_flight,
            ),
            (
                "signd_buffered_bytes",
                "Bytes held for client connections: partial frames, requests read and "
                "not answered, answers not sent (limits.max_buffered_bytes).",
                snap.buffered_bytes,
            ),
            (
                "signd_token_queue_depth",
                "Signatures and verifications queued for the token workers.",
                snap.token_queue_depth,
            ),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        if snap.tokens:
            serving = GaugeMetricFamily(
                "signd_token_serving",
                "With several tokens ([[token]]): 1 when the token serves, 0 when it is "
                "away or being caught up (state says which).",
                labels=["token", "state"],
            )
            for label, state in snap.tokens:
                serving.add_metric([label, state], float(state == "serving"))
            yield serving
        info = GaugeMetricFamily("signd_build_info", "signd's version.", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info
        sign = HistogramMetricFamily(
            "signd_sign_duration_seconds",
            "Sign request latency, from the read that brought it to its answer.",
            labels=["key"],
        )
        if self.per_key:
            for key, h in list(m.sign_duration.items()):
                sign.add_metric([key], h.cumulative(), h.sum)
        elif m.sign_duration:
            total = Histogram(DURATION_BUCKETS)
            for h in list(m.sign_duration.values()):
                total.counts = [a + b for a, b in zip(total.counts, h.counts, strict=True)]
                total.sum += h.sum
            sign.add_metric([""], total.cumulative(), total.sum)
        yield sign
        for name, doc, h in (
            (
                "signd_token_sign_duration_seconds",
                "Token time per signature: a worker's time for a batch over its size.",
                m.token_sign_duration,
            ),
            (
                "signd_token_batch_size",
                "Jobs per batch handed to a token worker.",
                m.token_batch_size,
            ),
            (
                "signd_audit_write_duration_seconds",
                "Writing and syncing one group commit of audit records.",
                m.audit_write_duration,
            ),
        ):
            fam = HistogramMetricFamily(name, doc)
            fam.add_metric([], h.cumulative(), h.sum)
            yield fam


def _counter(
    name: str, doc: str, labels: tuple[str, ...], values: Iterable[tuple[tuple[str, ...], int]]
) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=list(labels))
    for label_values, value in values:
        fam.add_metric(list(label_values), float(value))
    return fam


def _key_gauges(
    m: Metrics, keys: Iterable[KeyState], now: float, *, per_key: bool = True
) -> Iterator[Metric]:
    """Per key; or, without key names, the signature rate summed, the oldest
    active version's age, the earliest rotation due, and no current version
    (a sum of versions means nothing)."""
    current = GaugeMetricFamily(
        "signd_key_current_version", "The key's newest version.", labels=["key"]
    )
    age = GaugeMetricFamily(
        "signd_key_active_version_age_seconds",
        "Seconds since the key's newest version was made.",
        labels=["key"],
    )
    due = GaugeMetricFamily(
        "signd_key_next_rotation_timestamp_seconds",
        "When the key's automatic rotation is due (keys with auto-rotation only).",
        labels=["key"],
    )
    rate = GaugeMetricFamily(
        "signd_key_signatures_per_second",
        f"Signatures per second over the last {WINDOW} seconds.",
        labels=["key"],
    )
    ages: list[float] = []
    dues: list[float] = []
    rates: list[float] = []
    for k in keys:
        w = m.windows.get(k.name)
        ages.append(max(0.0, now - k.current_created))
        if k.next_rotation is not None:
            dues.append(k.next_rotation)
        rates.append(w.rate(time.perf_counter()) if w is not None else 0.0)
        if per_key:
            current.add_metric([k.name], float(k.current_version))
            age.add_metric([k.name], ages[-1])
            if k.next_rotation is not None:
                due.add_metric([k.name], k.next_rotation)
            rate.add_metric([k.name], rates[-1])
    if not per_key and ages:
        age.add_metric([""], max(ages))
        if dues:
            due.add_metric([""], min(dues))
        rate.add_metric([""], sum(rates))
    yield from (current, age, due, rate)
