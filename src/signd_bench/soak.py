"""The soak test: ``python -m signd_bench.soak``.

Holds ``--connections`` (default 1,000) connections to one signd at once, one
trio task per connection and each connection open for the whole run, and
sends mixed operations over all of them for ``--duration`` seconds (default
600): sign with ECDSA P-256, Ed25519 and RSA keys (messages and digests, DER
and raw, PKCS#1 v1.5 and PSS), sign_batch, verify (of valid signatures and of
deliberately wrong ones, whose ``valid=false`` is the correct answer),
public_key, key_info, list_keys, health, and every ``--rotate-every`` seconds
a rotate of a key kept for it.  Each connection waits a random think time
between its requests (0 to twice ``--think``), so this is a soak, not a
saturation benchmark; the throughput is reported all the same.  ``--ops`` and
``--types`` narrow the mix, to find where a growth comes from.

Every answer is checked: signatures with ``cryptography`` against the public
key of the version that made them (every one, or those of 1 request in
``--check-every``), verify answers against what was expected, and the other
answers for what they must contain.  The daemon's RSS (``VmRSS``), and
separately its token workers', is sampled every ``--sample-every`` seconds;
the baseline is the first sample after the warm-up (the first 10 % of the run).

The run passes (exit 0, else 1) when no request failed, no answer was wrong,
every checked signature verified, every connection was held to the end, the
daemon logged no error (when the soak started it), and neither the daemon's
RSS nor its workers' grew by ``--rss-bound`` (10 MB) or more from the baseline
to the end.

Without ``--socket`` it makes a SoftHSM token and starts signd on it, with the
default ``[limits]`` (``max_connections`` 1024) but for ``max_connections_per_uid``,
raised to 1024 because one process (one uid) holds every connection;
with ``--socket`` it uses a running daemon (four ``soak-*`` keys are created
on it, so it needs the admin operations) and watches the RSS of ``--pid``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from signd_client import AsyncClient
from signd_client.errors import ConnectionFailed, ProtocolViolation, RequestTimeout

from ._measure import percentile, process_tree, usage_of
from .run import Bench, _raise_fd_limit, _rss_mb

__all__ = ["SoakReport", "main", "soak"]

R = TypeVar("R")

#: Relative weights of the operations each connection picks from.
WEIGHTS: dict[str, int] = {
    "sign": 36,
    "sign_batch": 8,
    "verify": 22,
    "public_key": 8,
    "key_info": 8,
    "list_keys": 6,
    "health": 12,
}
#: A drop of an answer's transport: the connection is gone and a new one is made.
TRANSPORT_ERRORS = (ConnectionFailed, RequestTimeout, ProtocolViolation)
MB = 1024 * 1024
#: The key types signed with (the key that rotates is one more ec-p256 key).
KEY_TYPES = ("ec-p256", "ed25519", "rsa-2048")


def _progress(msg: str) -> None:
    print(f"signd-soak: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------ signatures


class _Options(TypedDict):
    digest: bytes | None
    hash: str | None
    padding: str | None
    format: str | None


@dataclass(frozen=True, slots=True)
class SignSpec:
    """One signature request's input and options (what ``cryptography`` needs too)."""

    message: bytes | None = None
    digest: bytes | None = None
    hash: str | None = None
    padding: str | None = None
    format: str | None = None

    def tampered(self) -> SignSpec:
        """The same request for other data: a signature of this one must not verify."""
        if self.digest is not None:
            return self.like(digest=bytes([self.digest[0] ^ 1]) + self.digest[1:])
        assert self.message is not None
        return self.like(message=self.message + b"!")

    def options(self) -> _Options:
        """The keyword arguments of ``sign`` and ``verify`` after the message."""
        return {
            "digest": self.digest,
            "hash": self.hash,
            "padding": self.padding,
            "format": self.format,
        }

    def like(self, *, message: bytes | None = None, digest: bytes | None = None) -> SignSpec:
        """Other data with the same options."""
        return SignSpec(message, digest, self.hash, self.padding, self.format)


def _random_spec(key_type: str, rng: random.Random) -> SignSpec:
    data = rng.randbytes(rng.randint(1, 96))
    if key_type == "ed25519":
        return SignSpec(message=data)
    by_digest = rng.random() < 0.5
    message, digest = (None, _sha256(data)) if by_digest else (data, None)
    hash_name = "sha256" if by_digest else None
    if key_type.startswith("rsa"):
        return SignSpec(message, digest, hash_name, padding=rng.choice(("pkcs1v15", "pss")))
    return SignSpec(message, digest, hash_name, format=rng.choice(("der", "raw")))


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def signature_ok(public: PublicKeyTypes, signature: bytes, spec: SignSpec) -> bool:
    """Whether ``signature`` is one of ``spec``'s data under ``public``, by ``cryptography``
    alone (signd's keys here hash with SHA-256; PSS salts are the digest's length)."""
    algorithm: hashes.HashAlgorithm | utils.Prehashed = hashes.SHA256()
    data = spec.message
    if spec.digest is not None:
        algorithm, data = utils.Prehashed(hashes.SHA256()), spec.digest
    assert data is not None
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, data)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            if spec.format == "raw":
                n = len(signature) // 2
                signature = utils.encode_dss_signature(
                    int.from_bytes(signature[:n]), int.from_bytes(signature[n:])
                )
            public.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(public, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = padding.PKCS1v15()
            if spec.padding == "pss":
                pad = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
            public.verify(signature, data, pad, algorithm)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


# ------------------------------------------------------------ the run


@dataclass
class SoakKey:
    name: str
    type: str
    #: version -> public key (and its PEM), from key_info/public_key answers
    publics: dict[int, PublicKeyTypes] = field(default_factory=dict)
    pems: dict[int, str] = field(default_factory=dict)

    def learn(self, version: int, pem: str) -> bool:
        """Remember ``version``'s public key; False if it differs from the one known."""
        known = self.pems.get(version)
        if known is None:
            self.publics[version] = serialization.load_pem_public_key(pem.encode())
            self.pems[version] = pem
        return known is None or known == pem


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


# ------------------------------------------------------------ the report


@dataclass
class SoakReport:
    data: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.data["passed"])


def _rss_summary(samples: Sequence[Sample], warmup: float, attr: str) -> dict[str, Any] | None:
    if not samples:
        return None
    after = [s for s in samples if s.t >= warmup] or list(samples[-1:])
    values = [getattr(s, attr) for s in after]
    baseline, end = values[0], values[-1]
    return {
        "baseline_mb": round(baseline, 2),
        "baseline_at_s": round(after[0].t, 1),
        "max_mb": round(max(values), 2),
        "end_mb": round(end, 2),
        "growth_mb": round(end - baseline, 2),
    }


def _ms(values: Sequence[float], q: float) -> float | None:
    v = percentile(values, q)
    return None if v is None else round(v * 1e3, 2)


def build_report(
    soak: Soak, *, rss_bound: float, daemon: str, log_errors: list[str] | None
) -> SoakReport:
    st = soak.stats
    total = sum(st.requests.values())
    errors = sum(st.errors.values())
    ops: dict[str, dict[str, Any]] = {}
    all_lat: list[float] = []
    for op in (*WEIGHTS, "rotate"):
        lat = st.latencies.get(op, array("d"))
        all_lat.extend(lat)
        ops[op] = {
            "requests": st.requests[op],
            "errors": sum(n for k, n in st.errors.items() if k.split(":")[0] == op),
            "p50_ms": _ms(lat, 50),
            "p99_ms": _ms(lat, 99),
        }
    main_rss = _rss_summary(soak.samples, soak.warmup, "rss_mb")
    workers_rss = _rss_summary(soak.samples, soak.warmup, "workers_rss_mb")
    fds = [s.fds for s in soak.samples if s.fds is not None and s.t >= soak.warmup]
    failures: list[str] = []
    if errors:
        failures.append(f"{errors} errors")
    if st.wrong:
        failures.append(f"{st.wrong} wrong answers")
    if st.bad_signatures:
        failures.append(f"{st.bad_signatures} signatures did not verify")
    if st.held != soak.connections:
        failures.append(f"{st.held} of {soak.connections} connections held")
    if main_rss is None or workers_rss is None:
        failures.append("RSS not measured (no daemon pid)")
    else:
        for who, rss in (("daemon", main_rss), ("token workers", workers_rss)):
            if rss["growth_mb"] >= rss_bound:
                failures.append(f"{who} RSS grew {rss['growth_mb']:+.1f} MB")
    if log_errors:
        failures.append(f"the daemon logged {len(log_errors)} errors")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    data: dict[str, Any] = {
        "passed": not failures,
        "failures": failures,
        "daemon": daemon,
        "pid": soak.pid,
        "connections": soak.connections,
        "duration_s": soak.duration,
        "elapsed_s": round(soak.elapsed, 1),
        "think_s": soak.think,
        "check_every": soak.check_every,
        "rotate_every_s": soak.rotate_every,
        "ops_mix": soak.ops,
        "key_types": soak.key_types,
        "seed": soak.seed,
        "cpus": os.cpu_count(),
        "connected": st.connected,
        "held": st.held,
        "reconnects": st.reconnects,
        "requests": total,
        "throughput_per_s": round(total / soak.elapsed, 1) if soak.elapsed else 0.0,
        "p50_ms": _ms(all_lat, 50),
        "p99_ms": _ms(all_lat, 99),
        "ops": ops,
        "errors": errors,
        "error_kinds": dict(st.errors),
        "signatures": st.signatures,
        "signatures_per_s": round(st.signatures / soak.elapsed, 1) if soak.elapsed else 0.0,
        "checked": st.checked,
        "bad_signatures": st.bad_signatures,
        "verify_valid": st.verify_valid,
        "verify_invalid": st.verify_invalid,
        "wrong_answers": st.wrong,
        "rotations": st.rotations,
        "examples": st.examples,
        "keys": [{"name": k.name, "type": k.type, "versions": len(k.publics)} for k in soak.keys],
        "rss_bound_mb": rss_bound,
        "warmup_s": soak.warmup,
        "rss": main_rss,
        "workers_rss": workers_rss,
        "fds": None
        if not fds
        else {"baseline": fds[0], "max": max(fds), "end": fds[-1], "growth": fds[-1] - fds[0]},
        "samples": [
            {
                "t": round(s.t, 1),
                "rss_mb": round(s.rss_mb, 2),
                "workers_rss_mb": round(s.workers_rss_mb, 2),
                "workers": s.workers,
                "fds": s.fds,
            }
            for s in soak.samples
        ],
        "daemon_cpu_s": None if soak.daemon_cpu is None else round(soak.daemon_cpu, 1),
        "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "daemon_log_errors": log_errors,
    }
    return SoakReport(data)


def table(report: SoakReport) -> str:
    d = report.data

    def num(v: float | None, digits: int = 1) -> str:
        return "-" if v is None else f"{v:,.{digits}f}"

    lines = [
        f"signd soak: {d['connections']} connections held for {d['elapsed_s']:.0f} s, "
        f"mixed operations; {d['daemon']}",
        "",
        "| operation | requests | errors | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for op, o in d["ops"].items():
        lines.append(
            f"| {op} | {o['requests']:,} | {o['errors']} | {num(o['p50_ms'], 2)} | "
            f"{num(o['p99_ms'], 2)} |"
        )
    lines.append(
        f"| all | {d['requests']:,} ({d['throughput_per_s']:,.0f}/s) | {d['errors']} | "
        f"{num(d['p50_ms'], 2)} | {num(d['p99_ms'], 2)} |"
    )
    sampled = "every signature" if d["check_every"] == 1 else f"1 request in {d['check_every']}"
    rows = [
        (
            "connections",
            f"{d['held']} of {d['connections']} held for the whole run "
            f"({d['reconnects']} reconnects)",
        ),
        (
            "signatures checked with cryptography",
            f"{d['checked']:,} of {d['signatures']:,} ({sampled}), {d['bad_signatures']} bad; "
            f"{d['signatures_per_s']:,.0f} signatures/s",
        ),
        (
            "verify answers",
            f"{d['verify_valid']:,} valid, {d['verify_invalid']:,} deliberately invalid "
            f"(valid=false); {d['wrong_answers']} wrong answers in all",
        ),
        ("rotations", f"{d['rotations']} of key {d['keys'][-1]['name'] if d['keys'] else '-'}"),
    ]
    for label, key in (("daemon RSS", "rss"), ("token workers RSS", "workers_rss")):
        r = d[key]
        if r is None:
            rows.append((label, "not measured"))
            continue
        if key == "workers_rss" and d["samples"]:
            label = f"{label} ({d['samples'][-1]['workers']} processes)"
        elif d["pid"] is not None:
            label = f"{label} (pid {d['pid']})"
        rows.append(
            (
                label,
                f"baseline {r['baseline_mb']:.1f} MB (at {r['baseline_at_s']:.0f} s), "
                f"max {r['max_mb']:.1f}, end {r['end_mb']:.1f}, growth {r['growth_mb']:+.1f} MB "
                f"(bound {d['rss_bound_mb']:g} MB); {len(d['samples'])} samples",
            )
        )
    if d["fds"] is not None:
        f = d["fds"]
        rows.append(
            (
                "daemon open descriptors",
                f"baseline {f['baseline']:,}, max {f['max']:,}, end {f['end']:,}",
            )
        )
    rows.append(
        (
            "CPU seconds",
            f"daemon and workers {num(d['daemon_cpu_s'])}, soak client {num(d['client_cpu_s'])} "
            f"({d['cpus']} CPUs)",
        )
    )
    if d["daemon_log_errors"] is not None:
        rows.append(("daemon log", f"{len(d['daemon_log_errors'])} error lines"))
    verdict = "PASS" if d["passed"] else "FAIL: " + "; ".join(d["failures"])
    rows.append(("result", verdict))
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


# ------------------------------------------------------------ main


def _log_errors(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [
        ln for ln in text.splitlines() if '"level": "error"' in ln or '"level": "critical"' in ln
    ]


def soak(args: argparse.Namespace) -> SoakReport:
    """One run as the command line asks for it."""
    warmup = args.warmup if args.warmup is not None else 0.1 * args.duration
    sample_every = args.sample_every or max(0.5, min(5.0, args.duration / 20))
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)

    def make(socket: str, pid: int | None) -> Soak:
        return Soak(
            socket,
            connections=args.connections,
            duration=args.duration,
            think=args.think,
            check_every=args.check_every,
            rotate_every=args.rotate_every,
            ops=[op.strip() for op in args.ops.split(",") if op.strip()],
            key_types=[kt.strip() for kt in args.types.split(",") if kt.strip()],
            pid=pid,
            sample_every=sample_every,
            warmup=warmup,
            seed=seed,
        )

    if args.socket:
        s = make(args.socket, args.pid)
        trio.run(s.run)
        return build_report(
            s, rss_bound=args.rss_bound, daemon=f"daemon at {args.socket}", log_errors=None
        )
    workdir = Path(tempfile.mkdtemp(prefix="signd-soak-"))
    # The benchmark's token and daemon, but with signd's default [limits]; only
    # the per-uid connection limit is raised, since this one uid holds them all.
    bench = Bench(workdir, False, 0.0, 0.0, 1, args.workers, label="signd-soak")
    bench.config_extra = (
        '[limits]\nmax_connections_per_uid = 1024\n\n[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    try:
        _progress("making a SoftHSM token and starting signd (default [limits])")
        bench.make_token()
        bench.start_daemon()
        assert bench.daemon is not None
        s = make(bench.socket, bench.daemon.pid)
        _progress(
            f"{args.connections} connections, {args.duration:g} s, workdir {workdir} "
            f"(daemon log: {workdir / 'signd.log'})"
        )
        trio.run(s.run)
        bench.stop_daemon()
        return build_report(
            s,
            rss_bound=args.rss_bound,
            daemon=(
                "signd started on a fresh SoftHSM token with the default [limits] "
                "(max_connections_per_uid 1024)"
            ),
            log_errors=_log_errors(workdir / "signd.log"),
        )
    finally:
        bench.stop_daemon()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m signd_bench.soak",
        description="Soak test: hold many connections to signd and send mixed operations "
        "over all of them; passes (exit 0) with zero errors and flat RSS.",
    )
    p.add_argument("--connections", type=int, default=1000, help="default 1000")
    p.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    p.add_argument(
        "--socket",
        help="use the signd listening here (default: start one on a fresh SoftHSM token)",
    )
    p.add_argument("--pid", type=int, help="with --socket: the daemon whose RSS to watch")
    p.add_argument(
        "--think",
        type=float,
        default=1.0,
        help="mean pause between one connection's requests, seconds (default 1)",
    )
    p.add_argument(
        "--check-every",
        type=int,
        default=1,
        metavar="N",
        help="check the signatures of 1 request in N with cryptography (default 1: all)",
    )
    p.add_argument(
        "--rotate-every",
        type=float,
        default=15.0,
        help="seconds between rotations (default 15; 0: none)",
    )
    p.add_argument(
        "--types",
        default=",".join(KEY_TYPES),
        help="key types to sign with, besides the ec-p256 key that rotates (default %(default)s)",
    )
    p.add_argument(
        "--ops",
        default=",".join(WEIGHTS),
        help="the operations to mix (default all: %(default)s)",
    )
    p.add_argument(
        "--sample-every", type=float, help="seconds between RSS samples (default 5, less if short)"
    )
    p.add_argument(
        "--warmup", type=float, help="seconds left out of the RSS baseline (default 10%% of run)"
    )
    p.add_argument(
        "--rss-bound", type=float, default=10.0, help="allowed RSS growth, MB (default 10)"
    )
    p.add_argument("--workers", default="auto", help="token workers of the daemon it starts")
    p.add_argument("--seed", type=int, help="random seed (default: a new one, reported)")
    p.add_argument(
        "--json", metavar="FILE", help="also write the report as JSON here ('-': stdout)"
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.pid is not None and not args.socket:
        _parser().error("--pid goes with --socket (a daemon it starts is watched anyway)")
    if args.connections < 1 or args.duration <= 0:
        _parser().error("--connections and --duration must be positive")
    unknown = {op.strip() for op in args.ops.split(",")} - set(WEIGHTS) - {""}
    if unknown:
        _parser().error(f"--ops: unknown {sorted(unknown)}; choose from {','.join(WEIGHTS)}")
    unknown = {kt.strip() for kt in args.types.split(",")} - set(KEY_TYPES) - {""}
    if unknown:
        _parser().error(f"--types: unknown {sorted(unknown)}; choose from {','.join(KEY_TYPES)}")
    _raise_fd_limit()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.connections + 64:
        _progress(f"warning: the file descriptor limit ({soft}) is below --connections + 64")
    report = soak(args)
    text = table(report)
    if args.json == "-":
        print(text, file=sys.stderr)
        print(json.dumps(report.data, indent=2))
    else:
        if args.json:
            Path(args.json).write_text(json.dumps(report.data, indent=2))
        print(text)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
