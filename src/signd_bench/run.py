"""``signd-bench``: signd against the token itself and against its peers, in one run.

Everything runs on this machine, on one SoftHSM token made for the run, with
the same key type and digest size per row.  Each row reports signatures (or
verifications) per second, client-seen p50/p99 latency, the server side's CPU
seconds and peak RSS, and the ratio to the in-process baseline of its key type
measured in the same run.  ``--quick`` runs every row briefly, for CI; it
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from signd.config_parse import MAX_TOKENS
from signd.keys.store import object_label
from signd_client import Client

from . import tokens
from ._measure import Row
from .bench import (
    BASELINE_SCHEME,
    DIGEST,
    MESSAGE,
    Bench,
    _progress,
    _raise_fd_limit,
    _softhsm_module,
)

__all__ = ["main"]


def _fmt(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:,.0f}{unit}"


def table(rows: list[Row]) -> str:
    head = (
        "| row | key | ops/s | p50 µs | p99 µs | server CPU s | peak RSS MB | ratio | note |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        p50, p99 = r.p(50), r.p(99)
        lines.append(
            f"| {r.name} | {r.key_type} | {_fmt(r.rate) if r.operations else '-'} | "
            f"{_fmt(p50 * 1e6 if p50 else None)} | {_fmt(p99 * 1e6 if p99 else None)} | "
            f"{'-' if r.server_cpu is None else f'{r.server_cpu:.2f}'} | "
            f"{'-' if r.server_peak_rss_mb is None else f'{r.server_peak_rss_mb:.1f}'} | "
            f"{'-' if r.ratio is None else f'{r.ratio:.2f}x'} | {r.note} |"
        )
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[tuple[str, str, str]]:
    """The issue's targets as (target, measured, verdict); reported, never asserted."""

    def find(pred: Callable[[Row], bool]) -> Row | None:
        return next((r for r in rows if pred(r)), None)

    out: list[tuple[str, str, str]] = []

    def check(label: str, measured: float | None, goal: float, higher: bool, unit: str) -> None:
        if measured is None:
            out.append((label, "not measured", "-"))
            return
        ok = measured >= goal if higher else measured <= goal
        out.append((label, f"{measured:.2f}{unit}", "met" if ok else "MISSED"))

    def named(key_type: str, prefix: str) -> Row | None:
        return find(lambda r: r.key_type == key_type and r.name.startswith(prefix))

    def ratio(a: Row | None, b: Row | None) -> float | None:
        return a.rate / b.rate if a is not None and b is not None and b.rate else None

    def us(r: Row | None, q: float, scale: float) -> float | None:
        v = r.p(q) if r is not None else None
        return v * scale if v is not None else None

    s64 = named("ec-p256", "signd, 64 conn")
    p4 = find(lambda r: r.name.startswith("p11-kit server, 4"))
    p1 = find(lambda r: r.name.startswith("p11-kit server, 1"))
    sync = named("ec-p256", "signd, 1 synchronous connection (Client)")
    batch = named("ec-p256", "signd, sign_batch")
    check("signd 64 connections vs baseline (>= 1.0x)", s64.ratio if s64 else None, 1.0, True, "x")
    check("signd 64 connections vs p11-kit 4 processes (>= 1.2x)", ratio(s64, p4), 1.2, True, "x")
    check(
        "1 synchronous connection vs p11-kit 1 process (>= 1.0x)", ratio(sync, p1), 1.0, True, "x"
    )
    check("1 synchronous connection p50 (<= 250 µs)", us(sync, 50, 1e6), 250, False, " µs")
    check("p99 at 64 connections (<= 20 ms)", us(s64, 99, 1e3), 20, False, " ms")
    check(
        "sign_batch of 1,000 vs baseline (>= 0.95x)",
        batch.ratio if batch else None,
        0.95,
        True,
        "x",
    )
    for kt in ("ed25519", "rsa-2048", "ec-secp256k1"):
        r = named(kt, "signd, 64 conn")
        check(
            f"{kt} 64 connections vs its baseline (>= 0.9x)", r.ratio if r else None, 0.9, True, "x"
        )
    mac_batch = named("hmac-sha256", "signd, sign_batch")
    check(
        "hmac-sha256 sign_batch of 1,000 vs its baseline (>= 0.9x)",
        mac_batch.ratio if mac_batch else None,
        0.9,
        True,
        "x",
    )
    for kt in ("ec-p256", "ed25519", "rsa-2048"):
        check(
            f"{kt} verify vs sign at 64 connections (>= 2x)",
            ratio(named(kt, "signd verify"), named(kt, "signd, 64 conn")),
            2.0,
            True,
            "x",
        )
    check(
        "strict audit on vs off at 64 connections (>= 0.8x)",
        ratio(
            named("ec-p256", "signd, 64 connections, strict audit"),
            named("ec-p256", "signd, 64 connections, no audit"),
        ),
        0.8,
        True,
        "x",
    )
    check(
        "strict audit on vs off, 1 synchronous connection (>= 0.7x)",
        ratio(
            named("ec-p256", "signd, 1 synchronous connection, strict audit"),
            named("ec-p256", "signd, 1 synchronous connection, no audit"),
        ),
        0.7,
        True,
        "x",
    )
    mem = find(lambda r: r.name.startswith("daemon RSS with"))
    check(
        "daemon RSS, 1,000 open connections (<= 100 MB)",
        mem.server_peak_rss_mb if mem else None,
        100,
        False,
        " MB",
    )
    grow = find(lambda r: r.name.startswith("RSS growth"))
    if grow:
        delta = float(grow.note.split("(")[1].split(" MB")[0])
        check(f"RSS growth over {grow.operations:,} signatures (< 10 MB)", delta, 10, False, " MB")
    for n in (2, 4):
        slow = next((r for r in rows if r.name.startswith(f"signd, {n} slow tokens")), None)
        goal = tokens.GOAL * n
        check(
            f"{n} slow tokens vs 1 slow token (>= {goal:.1f}x)",
            slow.ratio if slow else None,
            goal,
            True,
            "x",
        )
    return out


# -------------------------------------------------------------------- main


def run(
    b: Bench,
    types: list[str],
    peers: bool,
    token_counts: list[int],
    latency: float,
    tokens_only: bool = False,
) -> None:
    if "ec-p256" not in types:
        token_counts = []
    elif token_counts and (why := tokens.unavailable()) is not None:
        _progress(f"slow-token rows skipped: {why}")
        token_counts = []
    extra = ("ec-secp256k1" in types) + ("hmac-sha256" in types)
    steps = 0 if tokens_only else len(types) * 4 + 7 + extra
    steps += len(set(token_counts)) + 1 if token_counts else 0
    step = 0

    def stage(what: str) -> None:
        nonlocal step
        step += 1
        _progress(f"[{step}/{steps}] {what}")

    if not tokens_only:
        _single_token(b, types, peers, stage)
    if token_counts:
        b.module = b.module or _softhsm_module()
        tokens.run_token_rows(b, token_counts, latency, stage)


def _single_token(b: Bench, types: list[str], peers: bool, stage: Callable[[str], None]) -> None:
    """Every row on the run's one token and daemon."""
    b.make_token()
    b.start_daemon()
    try:
        keys: dict[str, str] = {}
        with Client(b.socket, timeout=120) as c:
            for kt in types:
                keys[kt] = f"bench-{kt}"
                c.create_key(keys[kt], kt)

        for kt in types:
            key = keys[kt]
            stage(f"{kt}: baseline")
            b.baseline(kt, key)
            stage(f"{kt}: 1 synchronous connection")
            b.drive(
                "signd, 1 synchronous connection (Client)",
                kt,
                {**b.sign_job(key, kt), "mode": "client"},
                1,
                1,
            )
            stage(f"{kt}: 64 connections")
            b.drive(
                "signd, 64 connections",
                kt,
                {**b.sign_job(key, kt), "mode": "pipeline"},
                2,
                64,
                note=f"window {b.window}, 2 client processes",
            )
            stage(f"{kt}: verify, 64 connections")
            b.drive(
                "signd verify, 64 connections",
                kt,
                {**b.verify_job(key, kt), "mode": "pipeline"},
                2,
                64,
                note=f"window {b.window}, 2 client processes; ratio vs sign baseline",
            )
        if "ec-secp256k1" in types:
            # format eth works the recovery id out in the daemon, per signature
            stage("ec-secp256k1: 64 connections, format eth")
            b.drive(
                "signd, 64 connections, format eth",
                "ec-secp256k1",
                {
                    **b.sign_job(keys["ec-secp256k1"], "ec-secp256k1"),
                    "format": "eth",
                    "mode": "pipeline",
                },
                2,
                64,
                note=f"window {b.window}, 2 client processes; r||s||v, v recovered",
            )
        if "hmac-sha256" in types:
            # A MAC costs the token ~20 µs, less than the daemon's own work per
            # request: requests in batches are what reach the token's rate.
            stage("hmac-sha256: sign_batch of 1,000 messages")
            b.drive(
                "signd, sign_batch of 1,000 messages",
                "hmac-sha256",
                {
                    "op": "sign_batch",
                    "key": keys["hmac-sha256"],
                    "data": MESSAGE.hex(),
                    "batch": 1000,
                    "mode": "pipeline",
                    "window": 2,
                },
                1,
                2,
                note="2 connections, 2 batches in flight each",
            )
        if "ec-p256" in types:
            key = keys["ec-p256"]
            for n, procs in ((16, 2), (256, 4)):  # 64 ran above, per key type
                stage(f"ec-p256: {n} connections")
                b.drive(
                    f"signd, {n} connections",
                    "ec-p256",
                    {**b.sign_job(key, "ec-p256"), "mode": "pipeline"},
                    procs,
                    n,
                    note=f"window {b.window}",
                )
            stage("ec-p256: sign_batch of 1,000")
            b.drive(
                "signd, sign_batch of 1,000 digests",
                "ec-p256",
                {
                    "op": "sign_batch",
                    "key": key,
                    "data": DIGEST.hex(),
                    "hash": "sha256",
                    "batch": 1000,
                    "mode": "pipeline",
                    "window": 2,
                },
                1,
                2,
                note="2 connections, 2 batches in flight each",
            )
            stage("peers")
            if peers:
                _peer_rows(b, key)
            stage("memory")
            b.memory_rows(key)
            # The strict audit log against none, on two daemons side by side
            # measured in turns.  A lone synchronous client pays the log's
            # latency in full; 64 connections share its group commits.
            stage("audit: strict audit log on and off, in turns")
            audited = b.start_daemon(audit=True, name="signd-audit")
            try:
                sync = {**b.sign_job(key, "ec-p256"), "mode": "client"}
                pipe = {**b.sign_job(key, "ec-p256"), "mode": "pipeline"}
                assert b.daemon is not None
                none_1, strict_1, none_64, strict_64 = b.drive_in_turns(
                    [
                        ("signd, 1 synchronous connection, no audit log", sync, 1, 1, b.daemon),
                        ("signd, 1 synchronous connection, strict audit log", sync, 1, 1, audited),
                        ("signd, 64 connections, no audit log", pipe, 2, 64, b.daemon),
                        ("signd, 64 connections, strict audit log", pipe, 2, 64, audited),
                    ],
                    slices=1 if b.quick else 3,
                )
                b.fsync_row(b.workdir / "audit" / "fsync-probe")
            finally:
                b.stop_daemon(audited)
            for strict, none in ((strict_1, none_1), (strict_64, none_64)):
                if none.rate:
                    strict.note = (
                        f"{strict.rate / none.rate:.2f}x of the row above (measured in turns)"
                    )
    finally:
        b.stop_daemon()


def _peer_rows(b: Bench, key: str) -> None:
    try:
        from . import peers
    except ImportError as exc:  # pragma: no cover - peers module missing
        _progress(f"  peers skipped: {exc}")
        return
    reason = peers.p11kit_available()
    if reason is None:
        for n in (1, 4):
            try:
                row = peers.measure_p11kit_server(
                    module=b.module,
                    token_label=b.label,
                    pin=b.pin,
                    key_label=object_label(key, 1),
                    processes=n,
                    seconds=b.seconds,
                    softhsm_conf=b.conf,
                )
                b.add(row, "ec-p256")
            except peers.PeerUnavailable as exc:
                _progress(f"  p11-kit server, {n} processes: {exc}")
    else:
        _progress(f"  p11-kit server skipped: {reason}")
    reason = peers.ssh_agent_available()
    if reason is None:
        try:
            b.add(peers.measure_ssh_agent(seconds=b.seconds), "ec-p256")
        except peers.PeerUnavailable as exc:
            _progress(f"  ssh-agent: {exc}")
    else:
        _progress(f"  ssh-agent skipped: {reason}")
    # signd's own agent socket, in the same run (the main daemon exposes ``key``)
    if b.daemon is not None:
        try:
            row = peers.measure_signd_agent(b.agent_socket, b.daemon.pid, key, seconds=b.seconds)
            b.add(row, "ec-p256")
        except peers.PeerUnavailable as exc:
            _progress(f"  signd ssh-agent front end: {exc}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="signd-bench",
        description="Benchmark signd against in-process python-pkcs11 and its peers "
        "(p11-kit server, ssh-agent), on a SoftHSM token made for the run.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="every row briefly (seconds in all), for CI; asserts nothing",
    )
    p.add_argument("--seconds", type=float, help="measured seconds per row (default 5)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds per row (default 1)")
    p.add_argument(
        "--window",
        type=int,
        default=3,
        help="requests in flight per pipelining connection (default 3)",
    )
    p.add_argument("--workers", default="auto", help='signd token workers (default "auto")')
    p.add_argument(
        "--types",
        default="ec-p256,ed25519,rsa-2048,hmac-sha256",
        help="key types (default %(default)s; ec-secp256k1 too)",
    )
    p.add_argument("--no-peers", action="store_true", help="skip p11-kit and ssh-agent")
    p.add_argument(
        "--tokens",
        default=",".join(map(str, tokens.DEFAULT_COUNTS)),
        metavar="N,N,...",
        help="token counts of the slow-token rows (default 1,2,4; 'none' skips them)",
    )
    p.add_argument(
        "--latency-ms",
        type=float,
        default=tokens.DEFAULT_LATENCY * 1000,
        help="what the slow-token relay adds to every chunk from the token, in ms "
        f"(default {tokens.DEFAULT_LATENCY * 1000:g})",
    )
    p.add_argument(
        "--tokens-only",
        action="store_true",
        help="run the slow-token rows only",
    )
    p.add_argument(
        "--json",
        default="bench-results.json",
        metavar="FILE",
        help="write the results here (default bench-results.json)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _raise_fd_limit()
    seconds = args.seconds or (0.3 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (0.1 if args.quick else 1.0)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    bad = [t for t in types if t not in BASELINE_SCHEME]
    if bad:
        print(
            f"signd-bench: unsupported --types {bad}; use {list(BASELINE_SCHEME)}", file=sys.stderr
        )
        return 2
    try:
        counts = [] if args.tokens == "none" else [int(n) for n in args.tokens.split(",") if n]
    except ValueError:
        counts = [0]
    if any(not 1 <= n <= MAX_TOKENS for n in counts) or args.latency_ms < 0:
        print(
            f"signd-bench: --tokens takes counts 1 to {MAX_TOKENS} (e.g. 1,2,4) or none, "
            "--latency-ms a number >= 0",
            file=sys.stderr,
        )
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="signd-bench-"))
    b = Bench(workdir, args.quick, seconds, warmup, args.window, args.workers)
    started = time.time()
    try:
        run(b, types, not args.no_peers, counts, args.latency_ms / 1000, args.tokens_only)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    checks = targets(b.rows)
    report = {
        "started": started,
        "quick": args.quick,
        "seconds_per_row": seconds,
        "window": args.window,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "token_counts": counts,
        "relay_latency_ms": args.latency_ms,
        "rows": [r.to_json() for r in b.rows],
        "targets": [{"target": t, "measured": m, "verdict": v} for t, m, v in checks],
    }
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(table(b.rows))
    print()
    print("| target | measured | verdict |\n|---|---|---|")
    for t, m, v in checks:
        print(f"| {t} | {m} | {v} |")
    print(f"\nresults written to {args.json}", file=sys.stderr)
    return 0
