"""Throughput across tokens (issue 15): one key served from 1, 2, 4 slow tokens.

Each token count N is set up once, on its own: N SoftHSM tokens in one state
directory with one wrap key (``signd wrap-key create`` on the first,
``import`` of its shares on the others) and one backup-able ec-p256 key on
each; one ``p11-kit server`` exporting the N tokens, the slow relay of
``tests/test_slow_token.py`` in front of it
(:class:`~signd_bench._relay.SlowRelay`: every chunk from the server held
``latency`` seconds), and a daemon with N ``[[token]]`` tables on
``p11-kit-client.so``, reaching them all through the relay (one
``P11_KIT_SERVER_ADDRESS``).  Each token has ``workers = 1``, a device that
runs one command at a time (the yubihsm profile's ``max_workers`` is 1 for
this reason), and the yubihsm profile's ``batch``.  The key is signed over
``CONNECTIONS_PER_TOKEN`` x N pipelining connections, enough to keep every
token's worker busy; the counts are measured in turns, in slices.

A signature through the relay is three PKCS#11 calls, each a round trip:
``C_SignInit``, and python-pkcs11's two ``C_Sign`` (the first asks the
length); so one token signs at most ``1 / (3 x latency)`` a second (26.7 at
12.5 ms).  Each row's ratio is against the 1-token row of the same run; the
goal is 0.9 x N.  A worker answers a whole batch at once, so a token's
count in a slice moves in steps of ``BATCH`` (at 12.5 ms and 5 s in 3
slices, one step is 9 % of it), and as every slice starts the same way the
steps do not average out over the slices.  The note therefore also gives
the rate by Little's law, requests in flight over their mean latency, which
batches do not quantize, and the ratio by it.  The note says where the
time went too: the chunks each relay connection carried to the token (one
connection per worker process, in the order they connected: each token's
signing worker, then its writer), and the CPU seconds of p11-kit with
SoftHSM, of the relay (this process) and of the whole machine over the
measured interval.

One cost weighs on one token more than on several: every ``[keys]
sync_interval`` (5 s) the daemon re-reads the key records on the *primary*
token's signing worker, about a dozen round trips (some 150 ms at 12.5 ms),
which a lone token takes from signing while in a set the other tokens sign
on; so N tokens can measure a little above N x one.

The key is made by a daemon straight on SoftHSM, stopped before the measured
one starts: p11-kit's RPC carries only the mechanisms on its allow-list, and
``CKM_AES_KEY_WRAP_PAD`` (the wrap key's) is not on it (p11-kit 0.24.1 answers
``MechanismInvalid``), so a daemon on ``p11-kit-client.so`` can neither make
a backup-able key nor unwrap one onto another token.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from signd_client import Client, Health

from ._measure import Row, process_tree, usage_of
from ._peer_support import _kill_leftovers, _stop, _wait_listening, _without
from ._relay import SlowRelay
from .bench import DIGEST, Bench, _find_softhsm_init, _progress, _Run
from .p11kit import p11kit_available, p11kit_client_module

__all__ = [
    "BATCH",
    "CONNECTIONS_PER_TOKEN",
    "DEFAULT_COUNTS",
    "DEFAULT_LATENCY",
    "WINDOW",
    "row_name",
    "run_token_rows",
    "unavailable",
]

#: Token counts measured by default.
DEFAULT_COUNTS: Final = (1, 2, 4)
#: Seconds the relay holds each chunk (``tests/test_slow_token.py``'s LATENCY).
DEFAULT_LATENCY: Final = 0.0125
#: Each token's ``[token] batch`` (the yubihsm profile's: a slow device).
BATCH: Final = 4
#: Client connections per token, each keeping ``WINDOW`` signatures in flight:
#: 16 waiting per token, twice what its worker holds (``batch`` x ``depth`` 2).
CONNECTIONS_PER_TOKEN: Final = 8
WINDOW: Final = 2
KEY: Final = "bench-slow-tokens"
#: The ratio to the 1-token row the issue asks of N tokens: GOAL x N.
GOAL: Final = 0.9
_TIMEOUT: Final = 120.0


def row_name(n: int, latency: float) -> str:
    """The row of ``n`` tokens: ``signd, 2 slow tokens (12.5 ms relay, 1 worker each)``."""
    return f"signd, {_tokens(n)} ({latency * 1000:g} ms relay, 1 worker each)"


def unavailable() -> str | None:
    """None if the rows can run here, else why not (p11-kit is missing)."""
    return p11kit_available()


def run_token_rows(
    b: Bench,
    counts: Sequence[int],
    latency: float,
    stage: Callable[[str], None] = _progress,
) -> list[Row]:
    """One row per token count in ``counts`` (ascending), with its ratio to
    the 1-token row when that was measured.  Every count is set up first
    (its own tokens, wrap key, key, p11-kit server, relay and daemon), then
    the counts are measured in turns, ``slices`` times each (1 with
    ``--quick``, else 3) for a share of the run's seconds: a machine whose
    load changes meanwhile weighs on all of them alike."""
    ordered = sorted(set(counts))
    slices = 1 if b.quick else 3
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        setups = []
        for n in ordered:
            stage(f"ec-p256: {_tokens(n)} behind a {latency * 1000:g} ms relay: set-up")
            setups.append(stack.enter_context(_slow_tokens(b, n, latency)))
        if not setups:
            return rows
        stage(f"ec-p256: {', '.join(map(str, ordered))} slow tokens, measured in turns")
        runs: list[list[_Run]] = [[] for _ in setups]
        for _ in range(slices):
            for i, setup in enumerate(setups):
                runs[i].append(_measure(b, setup, latency, b.seconds / slices))
    cores = os.cpu_count() or 1
    one: tuple[Row, float] | None = None
    for setup, mine in zip(setups, runs, strict=True):
        n = setup.n
        row = b.row(row_name(n, latency), "ec-p256", mine, _note(setup, mine, cores, slices))
        # Little's law: the rate from the requests always in flight and their
        # mean latency, which whole batches answered at once do not quantize.
        in_flight = CONNECTIONS_PER_TOKEN * n * WINDOW
        little = in_flight / statistics.fmean(row.latencies) if row.latencies else 0.0
        row.note += f"; {in_flight} in flight / mean latency = {little:.1f}/s"
        if n == 1:
            one = (row, little)
        if one is not None and one[0].rate:
            row.ratio = row.rate / one[0].rate
            if n > 1 and one[1]:
                row.note += (
                    f"; {row.ratio:.2f}x the 1-token row (goal >= {GOAL * n:.1f}x), "
                    f"{little / one[1]:.2f}x by in flight / mean latency"
                )
        rows.append(b.report(row))
    return rows


def _tokens(n: int) -> str:
    return "1 slow token" if n == 1 else f"{n} slow tokens"


@dataclass
class _Setup:
    """One token count's daemon, p11-kit server and relay, running."""

    n: int
    daemon: subprocess.Popen[bytes]
    server: subprocess.Popen[bytes]
    relay: SlowRelay


def _measure(b: Bench, setup: _Setup, latency: float, seconds: float) -> _Run:
    """One slice of ``setup``'s row: ``seconds`` measured."""
    job = {
        **b.sign_job(KEY, "ec-p256"),
        "mode": "pipeline",
        "window": WINDOW,
        "socket": b.sockets[setup.daemon.pid],
    }

    def probe() -> dict[str, float]:
        me = resource.getrusage(resource.RUSAGE_SELF)  # the relays' threads, mostly
        busy, total = _machine_jiffies()
        out = {
            "p11kit": usage_of(process_tree(setup.server.pid)).cpu,
            "relay": me.ru_utime + me.ru_stime,
            "busy": busy,
            "total": total,
        }
        for i, chunks in enumerate(setup.relay.calls_snapshot()):
            out[f"chunks{i}"] = float(chunks)
        return out

    conns = CONNECTIONS_PER_TOKEN * setup.n
    name = row_name(setup.n, latency)
    return b.measure(name, job, 1, conns, setup.daemon, probe, seconds)


def _note(setup: _Setup, runs: list[_Run], cores: int, slices: int) -> str:
    """What the row ran with, and where the time went (summed over its slices)."""

    def total(key: str) -> float:
        return sum(r.probed.get(key, 0.0) for r in runs)

    chunks = [int(total(f"chunks{i}")) for i in range(len(setup.relay.calls))]
    busy = total("busy") / total("total") if total("total") else 0.0
    n = setup.n
    return (
        f"{n} x [[token]] workers = 1, batch {BATCH}; {CONNECTIONS_PER_TOKEN * n} connections "
        f"x window {WINDOW}; {slices} slice{'s' if slices > 1 else ''} in turns; "
        f"chunks to the token per relay connection {chunks}; "
        f"CPU s: p11-kit + SoftHSM {total('p11kit'):.2f}, relay {total('relay'):.2f}, "
        f"machine busy {busy:.0%} of {cores} cores"
    )


def _machine_jiffies() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # guest time is counted in user already
    return total - idle, total


@contextlib.contextmanager
def _slow_tokens(b: Bench, n: int, latency: float) -> Iterator[_Setup]:
    """``n`` tokens of their own with one wrap key and the key on each, a
    p11-kit server exporting them, the relay in front of it and a daemon
    serving them through it; yields once the daemon signed with the key,
    and takes everything down afterwards."""
    client_module = p11kit_client_module()
    exe = shutil.which("p11-kit")
    if client_module is None or exe is None:
        raise SystemExit(f"signd-bench: {unavailable()}")
    started = time.monotonic()
    state = b.workdir / f"slow-tokens-{n}"
    labels = [f"bench-slow-{n}-{i}" for i in range(n)]
    conf = _init_tokens(state, labels)
    _share_wrap_key(state, conf, b.module, labels)
    _make_key(b, state, conf, labels)
    with contextlib.ExitStack() as stack:
        sock = state / "p11-kit.sock"
        log = state / "p11-kit.log"
        with open(log, "wb") as logf:
            server = subprocess.Popen(
                [
                    *(exe, "server", "--foreground", "--name", str(sock)),
                    *("--provider", b.module),
                    *(f"pkcs11:token={urllib.parse.quote(label, safe='')}" for label in labels),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=logf,
                env={**_without(os.environ, ("P11_KIT_SERVER_",)), "SOFTHSM2_CONF": str(conf)},
                start_new_session=True,
            )
        stack.callback(_stop_server, server)
        _wait_listening(server, str(sock), "p11-kit server", log)
        # Fast while the daemon starts (its logins, mechanism lists and
        # catch-up are not what is measured), slow from its first signature.
        relay = SlowRelay(sock, state / "slow.sock", 0.0)
        stack.callback(relay.close)

        daemon = b.launch_daemon(
            f"signd-{n}-slow-tokens",
            _tables(client_module, state, labels),
            env={"P11_KIT_SERVER_ADDRESS": relay.address},
            ready=_all_serving,
        )
        stack.callback(b.stop_daemon, daemon)
        with Client(b.sockets[daemon.pid], timeout=_TIMEOUT) as c:
            c.sign(KEY, digest=DIGEST, hash="sha256")  # the key is there
        relay.latency = latency
        _progress(
            f"  {_tokens(n)}: tokens, wrap key, key, p11-kit server, relay and daemon "
            f"in {time.monotonic() - started:.1f} s"
        )
        yield _Setup(n, daemon, server, relay)


def _tables(module: str, state: Path, labels: Sequence[str]) -> str:
    """One ``[[token]]`` table per label: one worker, batch ``BATCH``."""
    return "".join(
        f'[[token]]\nmodule = "{module}"\nlabel = "{label}"\n'
        f'pin_file = "{state / "user.pin"}"\nworkers = 1\nbatch = {BATCH}\n\n'
        for label in labels
    )


def _all_serving(h: Health) -> bool:
    """Ready, and every token of a set serving (caught up)."""
    return h.ready and all(t.state == "serving" for t in h.tokens or ())


def _make_key(b: Bench, state: Path, conf: Path, labels: Sequence[str]) -> None:
    """The backup-able key, made on every token by a daemon straight on
    SoftHSM (not through p11-kit: see the module's docstring), then stopped."""
    daemon = b.launch_daemon(
        f"signd-{len(labels)}-slow-tokens-direct",
        _tables(b.module, state, labels),
        env={"SOFTHSM2_CONF": str(conf)},
        ready=_all_serving,
    )
    try:
        with Client(b.sockets[daemon.pid], timeout=_TIMEOUT) as c:
            c.create_key(KEY, "ec-p256", backup=True)
            deadline = time.monotonic() + _TIMEOUT
            while not _all_serving(c.health()):  # unwrapped onto every token
                if time.monotonic() > deadline:
                    raise SystemExit(f"signd-bench: not all of {len(labels)} tokens serve")
                time.sleep(0.05)
    finally:
        b.stop_daemon(daemon)


def _init_tokens(state: Path, labels: Sequence[str]) -> Path:
    """``softhsm-init.sh`` once per label in ``state``; the SOFTHSM2_CONF path."""
    conf = ""
    for label in labels:
        out = subprocess.run(
            ["bash", _find_softhsm_init(), "--state-dir", str(state), "--label", label, "--quiet"],
            capture_output=True,
            text=True,
            check=False,
            timeout=_TIMEOUT,
        )
        if out.returncode != 0:
            raise SystemExit(f"signd-bench: softhsm-init.sh failed: {out.stderr.strip()}")
        conf = out.stdout.strip().split("=", 1)[1]
    return Path(conf)


def _share_wrap_key(state: Path, conf: Path, module: str, labels: Sequence[str]) -> None:
    """A 2-of-2 wrap-key ceremony on the first token and its shares imported
    on the others (straight on SoftHSM, before p11-kit exports them).  The
    shares pass through pipes only, and are dropped here."""
    env = {**_without(os.environ, ("P11_KIT_SERVER_",)), "SOFTHSM2_CONF": str(conf)}

    def wrap_key(i: int, *args: str, stdin: str = "") -> str:
        cfg = state / f"wrap-key-{i}.toml"
        cfg.write_text(
            f'[token]\nmodule = "{module}"\nlabel = "{labels[i]}"\n'
            f'pin_file = "{state / "user.pin"}"\n'
        )
        out = subprocess.run(
            [
                *(sys.executable, "-m", "signd", "wrap-key", *args, "--config", str(cfg)),
                *("--so-pin-file", str(state / "so.pin")),
            ],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=_TIMEOUT,
        )
        if out.returncode != 0:
            raise SystemExit(f"signd-bench: signd wrap-key {args[0]} failed: {out.stderr.strip()}")
        return out.stdout

    shares = wrap_key(0, "create", "--shares", "2", "--threshold", "2").splitlines()[:-1]
    for i in range(1, len(labels)):
        wrap_key(i, "import", stdin="\n".join(shares) + "\n")
    del shares


def _stop_server(server: subprocess.Popen[bytes]) -> None:
    """Stop the p11-kit server and any ``p11-kit-remote`` it forked (by pid)."""
    pids = process_tree(server.pid)
    _stop(server)
    _kill_leftovers([p for p in pids if p != server.pid], "p11-kit")
