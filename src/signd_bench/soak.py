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
import random
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import trio

from .bench import Bench, _raise_fd_limit
from .soak_load import (
    Soak,
)
from .soak_report import (
    SoakReport,
    build_report,
    table,
)
from .soak_specs import (
    KEY_TYPES,
    WEIGHTS,
    _progress,
)

__all__ = ["SoakReport", "main", "soak"]

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
        # keypairs only: the soak checks signatures with the public keys
        default=",".join(t for t in KEY_TYPES if not t.startswith("hmac-")),
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
