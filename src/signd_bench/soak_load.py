"""The soak test's run: every connection's task, the RSS samples and the
counts (see :mod:`signd_bench.soak`)."""

from __future__ import annotations

import math
import os
import random
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from signd_client import AsyncClient

from ._measure import process_tree, usage_of
from .bench import _rss_mb
from .soak_specs import (
    KEY_TYPES,
    TRANSPORT_ERRORS,
    WEIGHTS,
    SignSpec,
    SoakKey,
    _progress,
    _random_spec,
    _sha256,
    signature_ok,
)

R = TypeVar("R")


@dataclass
class Sample:
    t: float  # seconds since the soak began
    rss_mb: float  # the daemon's main process
    workers_rss_mb: float  # its token workers, together
    workers: int
    fds: int | None  # the daemon's open file descriptors, when readable


@dataclass
class Stats:
    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # "op: ErrorName"
    latencies: dict[str, array[float]] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # the first few failures, in words
    signatures: int = 0
    checked: int = 0
    bad_signatures: int = 0
    verify_valid: int = 0
    verify_invalid: int = 0
    wrong: int = 0
    rotations: int = 0
    connected: int = 0
    held: int = 0
    reconnects: int = 0

    def note(self, what: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(what)

    def wrong_answer(self, what: str) -> None:
        self.wrong += 1
        self.note(f"wrong answer: {what}")


@dataclass
class _Conn:
    """What one connection's task remembers."""

    client: AsyncClient
    rng: random.Random
    broken: bool = False
    requests: int = 0
    #: the last signature made here: (key, version, spec, signature), to verify
    last: tuple[SoakKey, int, SignSpec, bytes] | None = None


class Soak:
    def __init__(
        self,
        socket: str,
        *,
        connections: int,
        duration: float,
        think: float,
        check_every: int,
        rotate_every: float,
        ops: Sequence[str] = tuple(WEIGHTS),
        key_types: Sequence[str] = KEY_TYPES,
        pid: int | None,
        sample_every: float,
        warmup: float,
        seed: int,
    ) -> None:
        self.socket = socket
        self.connections = connections
        self.duration = duration
        self.think = think
        self.check_every = max(1, check_every)
        self.rotate_every = rotate_every
        self.ops = [op for op in WEIGHTS if op in ops]
        self.key_types = [kt for kt in KEY_TYPES if kt in key_types]
        self.weights = [WEIGHTS[op] for op in self.ops]
        self.pid = pid
        self.sample_every = sample_every
        self.warmup = warmup
        self.seed = seed
        self.stats = Stats()
        self.samples: list[Sample] = []
        self.keys: list[SoakKey] = []
        self.rotating: SoakKey | None = None
        self.started = 0.0  # trio clock when every connection was open
        self.elapsed = 0.0
        self.daemon_cpu: float | None = None
        self._next_rotation = math.inf
        self._all_connected = trio.Event()
        self._arrivals = 0
        self._finished = 0
        self._all_finished = trio.Event()
        self._release = trio.Event()
        self._connect_limit = trio.CapacityLimiter(64)

    # -------------------------------------------------------- set-up

    async def make_keys(self) -> None:
        tag = uuid.uuid4().hex[:8]
        async with AsyncClient(self.socket, timeout=120) as c:
            for suffix, key_type in (*((kt, kt) for kt in self.key_types), ("rot", "ec-p256")):
                info = await c.create_key(f"soak-{tag}-{suffix}", key_type)
                key = SoakKey(info.name, key_type)
                for v in info.versions:
                    key.learn(v.version, v.public_key_pem)
                self.keys.append(key)
        self.rotating = self.keys[-1]

    # -------------------------------------------------------- the run

    async def run(self) -> None:
        await self.make_keys()
        cpu_before = self._daemon_cpu()
        async with trio.open_nursery() as nursery:
            for i in range(self.connections):
                nursery.start_soon(self._connection, i)
            with trio.move_on_after(max(120.0, self.connections * 0.1)):
                await self._all_connected.wait()
            if not self._all_connected.is_set():
                self.stats.note("not every connection was open in time")
                self._begin()
            await self._sample_until_done()
            self.elapsed = trio.current_time() - self.started
            cpu_after = self._daemon_cpu()
            if cpu_before is not None and cpu_after is not None:
                self.daemon_cpu = cpu_after - cpu_before
            self._release.set()

    async def _sample_until_done(self) -> None:
        end = self.started + self.duration
        step = max(1, round(30 / self.sample_every))  # a progress line every ~30 s
        while not self._all_finished.is_set():
            self._sample()
            if len(self.samples) % step == 0:
                s, n = self.samples[-1], sum(self.stats.requests.values())
                _progress(
                    f"{s.t:.0f}/{self.duration:.0f} s: {n:,} requests, "
                    f"{sum(self.stats.errors.values())} errors, daemon RSS {s.rss_mb:.1f} MB, "
                    f"workers {s.workers_rss_mb:.1f} MB"
                )
            left = end - trio.current_time()
            with trio.move_on_after(self.sample_every if left > 0 else 60.0):
                await self._all_finished.wait()
        self._sample()  # the end: every connection is still open

    def _sample(self) -> None:
        if self.pid is None:
            return
        rss = _rss_mb(self.pid)
        workers = [p for p in process_tree(self.pid) if p != self.pid]
        try:
            fds: int | None = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            fds = None
        t = trio.current_time() - self.started
        self.samples.append(Sample(t, rss, sum(_rss_mb(p) for p in workers), len(workers), fds))

    def _daemon_cpu(self) -> float | None:
        return None if self.pid is None else usage_of(process_tree(self.pid)).cpu

    async def _connection(self, i: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + i)  # noqa: S311 - load, not secrets
        # One connection per task: the client keeps one, and never retries (a
        # retry would hide a failure the soak must count).
        async with AsyncClient(self.socket, timeout=60, pool_size=1, retries=0) as client:
            conn = _Conn(client, rng)
            async with self._connect_limit:
                health = await self._timed(conn, "health", client.health())
            if health is not None:
                self.stats.connected += 1
            self._arrived()
            await self._all_connected.wait()
            if health is not None:
                end = self.started + self.duration
                while True:
                    pause = rng.uniform(0, 2 * self.think)
                    if trio.current_time() + pause >= end:
                        break
                    await trio.sleep(pause)
                    await self._one(conn)
                self.stats.held += not conn.broken
            self._finished += 1
            if self._finished == self.connections:
                self._all_finished.set()
            await self._release.wait()

    def _arrived(self) -> None:
        self._arrivals += 1
        if self._arrivals == self.connections:
            self._begin()

    def _begin(self) -> None:
        """Every connection is open (or failed): the clock starts."""
        self.started = trio.current_time()
        if self.rotate_every > 0:
            self._next_rotation = self.started + self.rotate_every
        self._all_connected.set()

    async def _timed(self, conn: _Conn, op: str, call: Awaitable[R]) -> R | None:
        """Await one request; count it, time it, or count its failure."""
        self.stats.requests[op] += 1
        conn.requests += 1
        t0 = time.perf_counter()
        try:
            result = await call
        except Exception as exc:
            name = type(exc).__name__
            self.stats.errors[f"{op}: {name}"] += 1
            self.stats.note(f"{op}: {name}: {exc}")
            if isinstance(exc, TRANSPORT_ERRORS):
                conn.broken = True
                self.stats.reconnects += 1
            return None
        lat = self.stats.latencies.setdefault(op, array("d"))
        lat.append(time.perf_counter() - t0)
        return result

    async def _one(self, conn: _Conn) -> None:
        if trio.current_time() >= self._next_rotation:
            self._next_rotation += self.rotate_every
            await self._rotate(conn)
            return
        if not self.ops:
            return
        op = conn.rng.choices(self.ops, weights=self.weights)[0]
        if op == "sign":
            await self._sign(conn)
        elif op == "sign_batch":
            await self._sign_batch(conn)
        elif op == "verify":
            await self._verify(conn)
        elif op == "public_key":
            await self._public_key(conn)
        elif op == "key_info":
            await self._key_info(conn)
        elif op == "list_keys":
            await self._list_keys(conn)
        else:
            await self._health(conn)

    def _checking(self, conn: _Conn) -> bool:
        return conn.requests % self.check_every == 0

    async def _check(
        self, conn: _Conn, key: SoakKey, version: int, spec: SignSpec, signature: bytes
    ) -> None:
        public = key.publics.get(version)
        if public is None:  # a version made by a rotation since
            info = await self._timed(conn, "public_key", conn.client.public_key(key.name, version))
            if info is None:
                return
            if info.version != version:
                self.stats.wrong_answer(f"public_key of {key.name} v{version}: v{info.version}")
                return
            key.learn(version, info.public_key_pem)
            public = key.publics[version]
        self.stats.checked += 1
        if not signature_ok(public, signature, spec):
            self.stats.bad_signatures += 1
            self.stats.note(f"bad signature from {key.name} v{version} for {spec}")

    async def _sign(self, conn: _Conn) -> None:
        key = conn.rng.choice(self.keys)
        spec = _random_spec(key.type, conn.rng)
        check = self._checking(conn)
        res = await self._timed(
            conn,
            "sign",
            conn.client.sign(key.name, spec.message, **spec.options()),
        )
        if res is None:
            return
        self.stats.signatures += 1
        if res.key != key.name:
            self.stats.wrong_answer(f"sign with {key.name} answered for {res.key}")
        conn.last = (key, res.version, spec, res.signature)
        if check:
            await self._check(conn, key, res.version, spec, res.signature)

    async def _sign_batch(self, conn: _Conn) -> None:
        rng = conn.rng
        key = rng.choice(self.keys)
        first = _random_spec(key.type, rng)
        specs = [first]
        for _ in range(rng.randint(1, 15)):  # one form and one set of options for all
            data = rng.randbytes(rng.randint(1, 96))
            specs.append(
                first.like(digest=_sha256(data)) if first.digest else first.like(message=data)
            )
        check = self._checking(conn)
        by_digest = first.digest is not None
        res = await self._timed(
            conn,
            "sign_batch",
            conn.client.sign_batch(
                key.name,
                None if by_digest else [s.message or b"" for s in specs],
                digests=[s.digest or b"" for s in specs] if by_digest else None,
                hash=first.hash,
                padding=first.padding,
                format=first.format,
            ),
        )
        if res is None:
            return
        if len(res.results) != len(specs):
            self.stats.wrong_answer(f"sign_batch of {len(specs)} gave {len(res.results)} results")
            return
        for spec, item in zip(specs, res.results, strict=True):
            if item.error is not None or item.signature is None:
                name = item.error.name if item.error is not None else "no signature"
                self.stats.errors[f"sign_batch item: {name}"] += 1
                self.stats.note(f"sign_batch item: {item.error}")
                continue
            self.stats.signatures += 1
            if check:
                await self._check(conn, key, res.version, spec, item.signature)

    async def _verify(self, conn: _Conn) -> None:
        if conn.last is None:
            await self._sign(conn)  # something to verify next time
            return
        key, version, spec, signature = conn.last
        valid = conn.rng.random() < 0.5
        asked = spec if valid else spec.tampered()
        res = await self._timed(
            conn,
            "verify",
            conn.client.verify(key.name, signature, asked.message, **asked.options()),
        )
        if res is None:
            return
        if res.valid != valid or (valid and res.version != version):
            self.stats.wrong_answer(
                f"verify of a {'valid' if valid else 'wrong'} {key.type} signature by "
                f"{key.name} v{version}: valid={res.valid} version={res.version}"
            )
        elif valid:
            self.stats.verify_valid += 1
        else:
            self.stats.verify_invalid += 1

    async def _public_key(self, conn: _Conn) -> None:
        key = conn.rng.choice(self.keys)
        res = await self._timed(conn, "public_key", conn.client.public_key(key.name))
        if res is None:
            return
        same = key.learn(res.version, res.public_key_pem)
        if res.name != key.name or res.type != key.type or not same:
            self.stats.wrong_answer(
                f"public_key of {key.name}: {res.name} {res.type} v{res.version}"
            )

    async def _key_info(self, conn: _Conn) -> None:
        key = conn.rng.choice(self.keys)
        res = await self._timed(conn, "key_info", conn.client.key_info(key.name))
        if res is None:
            return
        versions = {v.version for v in res.versions}
        same = all([key.learn(v.version, v.public_key_pem) for v in res.versions])
        if (
            res.name != key.name
            or res.type != key.type
            or res.current_version not in versions
            or not same
        ):
            self.stats.wrong_answer(f"key_info of {key.name}: {res.name} v{res.current_version}")

    async def _list_keys(self, conn: _Conn) -> None:
        res = await self._timed(conn, "list_keys", conn.client.list_keys())
        if res is None:
            return
        missing = {k.name for k in self.keys} - {k.name for k in res.keys}
        if missing:
            self.stats.wrong_answer(f"list_keys lacks {sorted(missing)}")

    async def _health(self, conn: _Conn) -> None:
        res = await self._timed(conn, "health", conn.client.health())
        if res is not None and not (res.live and res.ready):
            self.stats.wrong_answer(f"health: {res.status} live={res.live} ready={res.ready}")

    async def _rotate(self, conn: _Conn) -> None:
        key = self.rotating
        assert key is not None
        res = await self._timed(conn, "rotate", conn.client.rotate(key.name))
        if res is None:
            return
        self.stats.rotations += 1
        same = all([key.learn(v.version, v.public_key_pem) for v in res.versions])
        if res.current_version < 2 or not same:
            self.stats.wrong_answer(f"rotate of {key.name}: now v{res.current_version}")
