"""The benchmark's machinery: a SoftHSM token and a daemon made for the run, the
in-process baseline and the load drivers, each measured into a :class:`Row`
(see :mod:`signd_bench.run` for the rows and the report)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signd.config import find_softhsm_module
from signd.keys.store import object_label
from signd_client import Client, Health

from ._measure import Row, process_tree, reset_peak_rss, usage_of

__all__ = ["Bench"]

DIGEST = hashlib.sha256(b"signd benchmark").digest()
MESSAGE = b"signd benchmark message " * 4
BASELINE_SCHEME = {
    "ec-p256": "ecdsa",
    "ed25519": "eddsa",
    "rsa-2048": "rsa-pkcs1v15",
    "ec-secp256k1": "ecdsa",
}
BASELINE_SCHEME["hmac-sha256"] = "hmac"  # the MAC of the message (CKM_SHA256_HMAC)
#: key types whose requests carry the message (no digest): the token signs or MACs it
_BY_MESSAGE = ("ed25519", "hmac-sha256")
DIGEST_INFO_SHA256 = bytes.fromhex("3031300d060960864801650304020105000420")


def _progress(msg: str) -> None:
    print(f"signd-bench: {msg}", file=sys.stderr, flush=True)


def _find_softhsm_init() -> str:
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "softhsm-init.sh"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("softhsm-init.sh")
    if found:
        return found
    raise SystemExit("signd-bench: softhsm-init.sh not found; run from a signd checkout")


def _softhsm_module() -> str:
    module = find_softhsm_module()
    if module is None:
        raise SystemExit("signd-bench: SoftHSM is not installed (apt-get install softhsm2)")
    return module


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class _Run:
    """What one run of drivers counted, and what the daemon spent meanwhile."""

    count: int
    seconds: float
    latencies: list[float]
    errors: int
    error_names: dict[str, int]
    cpu: float
    peak_rss_mb: float
    #: how much each of the caller's ``probe`` figures grew over the same interval
    probed: dict[str, float] = field(default_factory=dict)


@dataclass
class Bench:
    workdir: Path
    quick: bool
    seconds: float
    warmup: float
    window: int
    workers: str
    conf: str = ""
    label: str = "signd-bench"
    module: str = ""
    pin: str = ""
    daemon: subprocess.Popen[bytes] | None = None
    rows: list[Row] = field(default_factory=list)
    #: TOML appended to the daemon's config (the soak test keeps the default limits)
    config_extra: str = (
        "[limits]\nmax_connections = 2048\nmax_connections_per_uid = 2048\nmax_frame = 4194304\n"
    )
    baselines: dict[str, float] = field(default_factory=dict)
    #: the socket of each daemon started, by its pid
    sockets: dict[int, str] = field(default_factory=dict)

    @property
    def socket(self) -> str:
        return str(self.workdir / "signd.sock")

    @property
    def agent_socket(self) -> str:
        """The main daemon's ssh-agent socket (``[agent]``)."""
        return str(self.workdir / "agent.sock")

    # ---------------------------------------------------------------- set-up

    def make_token(self) -> None:
        state = self.workdir / "token"
        out = subprocess.run(
            [
                "bash",
                _find_softhsm_init(),
                "--state-dir",
                str(state),
                "--label",
                self.label,
                "--quiet",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise SystemExit(f"signd-bench: softhsm-init.sh failed: {out.stderr.strip()}")
        self.conf = out.stdout.strip().split("=", 1)[1]
        os.environ["SOFTHSM2_CONF"] = self.conf
        self.module = _softhsm_module()
        self.pin = (state / "user.pin").read_text().rstrip("\n")

    def start_daemon(self, audit: bool = False, name: str = "signd") -> subprocess.Popen[bytes]:
        """Start a daemon on the run's token: ``name`` "signd" is the main one
        (``self.socket``, ``self.daemon``); another name starts one beside it,
        on ``NAME.sock``, for rows measured against the main one in turns."""
        workers = self.workers if self.workers == "auto" else int(self.workers)
        audit_table = f'\n[audit]\ndir = "{self.workdir / "audit" / name}"\nmode = "strict"\n'
        tokens = (
            f'[token]\nmodule = "{self.module}"\nlabel = "{self.label}"\n'
            f'pin_file = "{self.workdir / "token" / "user.pin"}"\n'
            f"workers = {json.dumps(workers)}\n"
        )
        # The main daemon serves its ec-p256 key on an agent socket too (a peer row).
        agent_table = (
            f'\n[agent]\nsocket = "{self.agent_socket}"\nkeys = ["bench-ec-p256"]\n'
            if name == "signd"
            else ""
        )
        proc = self.launch_daemon(name, tokens, (audit_table if audit else "") + agent_table)
        if name == "signd":
            self.daemon = proc
        return proc

    def launch_daemon(
        self,
        name: str,
        tokens: str,
        extra: str = "",
        env: dict[str, str] | None = None,
        ready: Callable[[Health], bool] = lambda h: h.ready,
    ) -> subprocess.Popen[bytes]:
        """Start a daemon on ``NAME.sock`` whose config has the TOML ``tokens``
        (its ``[token]`` or ``[[token]]`` tables), the run's limits and
        ``extra``, with ``env`` added to this process's environment; return
        once its ``health`` answers ``ready`` (by default: ``health.ready``)."""
        cfg = self.workdir / f"{name}.toml"
        sock = self.workdir / f"{name}.sock"
        cfg.write_text(
            f'[server]\nsocket = "{sock}"\n\n{tokens}\n{self.config_extra}'
            f'\n[log]\nlevel = "warning"\n{extra}'
        )
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "signd", "serve", "--config", str(cfg)],
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
        )
        log.close()
        self.sockets[proc.pid] = str(sock)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"signd-bench: signd exited; see {self.workdir}/{name}.log")
            with contextlib.suppress(Exception), Client(str(sock), timeout=2) as c:
                if ready(c.health()):
                    return proc
            time.sleep(0.05)
        self.stop_daemon(proc)
        raise SystemExit(f"signd-bench: signd did not become ready; see {self.workdir}/{name}.log")

    def stop_daemon(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        """Stop ``proc``, by default the main daemon."""
        proc = proc or self.daemon
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def daemon_pids(self, proc: subprocess.Popen[bytes] | None = None) -> list[int]:
        proc = proc or self.daemon
        assert proc is not None
        return process_tree(proc.pid)

    # ---------------------------------------------------------------- rows

    def add(self, row: Row, baseline_of: str | None = None) -> Row:
        base = self.baselines.get(baseline_of or row.key_type)
        if base:
            row.ratio = row.rate / base
        return self.report(row)

    def report(self, row: Row) -> Row:
        """Add ``row`` as it is (its ratio set by the caller, or none) and show it."""
        self.rows.append(row)
        p50, p99 = row.p(50), row.p(99)
        lat = f"p50 {p50 * 1e6:.0f} µs, p99 {p99 * 1e6:.0f} µs" if p50 and p99 else ""
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        _progress(f"  {row.name} [{row.key_type}]: {row.rate:,.0f}/s {ratio} {lat} {row.note}")
        return row

    def baseline(self, key_type: str, key: str) -> Row:
        scheme = BASELINE_SCHEME[key_type]
        data = MESSAGE if scheme in ("eddsa", "hmac") else DIGEST
        if scheme == "rsa-pkcs1v15":
            data = DIGEST_INFO_SHA256 + DIGEST
        job = {
            "module": self.module,
            "label": self.label,
            "key_label": object_label(key, 1),
            "scheme": scheme,
            "hash": "sha256",
            "data": data.hex(),
            "warmup": self.warmup,
            "seconds": self.seconds,
        }
        out = subprocess.run(
            [sys.executable, "-m", "signd_bench.baseline"],
            input=json.dumps(job) + "\n" + self.pin + "\n",
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        res = json.loads(out.stdout)
        row = Row(
            "python-pkcs11 in-process, 1 session (baseline)",
            key_type,
            res["count"],
            res["seconds"],
            res["latencies"],
        )
        self.baselines[key_type] = row.rate
        return self.add(row)

    def drive(
        self,
        name: str,
        key_type: str,
        job: dict[str, Any],
        processes: int,
        connections: int,
        baseline_of: str | None = None,
        note: str = "",
    ) -> Row:
        """Run ``processes`` driver processes sharing ``connections``; one row."""
        run = self._run_drivers(name, job, processes, connections, self.seconds)
        return self.add(self._row(name, key_type, [run], note), baseline_of)

    def measure(
        self,
        name: str,
        job: dict[str, Any],
        processes: int,
        connections: int,
        daemon: subprocess.Popen[bytes],
        probe: Callable[[], dict[str, float]] | None = None,
        seconds: float | None = None,
    ) -> _Run:
        """One run of drivers against ``daemon`` (``job`` names its socket) for
        ``seconds`` (default: the run's), for a row of the caller's making
        (:meth:`row`, :meth:`report`).  ``probe`` is read when the measured
        interval starts and when it ends; the run keeps how much each of its
        figures grew (``_Run.probed``)."""
        return self._run_drivers(
            name, job, processes, connections, seconds or self.seconds, daemon, probe
        )

    def row(self, name: str, key_type: str, runs: list[_Run], note: str) -> Row:
        """The row of ``runs`` (not added)."""
        return self._row(name, key_type, runs, note)

    def drive_in_turns(
        self,
        rows: list[tuple[str, dict[str, Any], int, int, subprocess.Popen[bytes]]],
        slices: int,
        note: str = "",
    ) -> list[Row]:
        """Rows (name, job, processes, connections, daemon) measured in turns:
        each runs ``slices`` times for its share of ``seconds``, one after the
        other, so that a machine whose load changes meanwhile weighs on all of
        them alike and their ratios hold.  ec-p256 rows."""
        share = self.seconds / slices
        runs: list[list[_Run]] = [[] for _ in rows]
        for _ in range(slices):
            for i, (name, job, processes, connections, daemon) in enumerate(rows):
                job = {**job, "socket": self.sockets[daemon.pid]}
                runs[i].append(self._run_drivers(name, job, processes, connections, share, daemon))
        return [
            self.add(self._row(name, "ec-p256", run, note))
            for (name, *_), run in zip(rows, runs, strict=True)
        ]

    def _run_drivers(
        self,
        name: str,
        job: dict[str, Any],
        processes: int,
        connections: int,
        seconds: float,
        daemon: subprocess.Popen[bytes] | None = None,
        probe: Callable[[], dict[str, float]] | None = None,
    ) -> _Run:
        job = {
            "socket": self.socket,
            "warmup": self.warmup,
            "seconds": seconds,
            "window": self.window,
            **job,
        }
        procs = []
        per = [
            connections // processes + (1 if i < connections % processes else 0)
            for i in range(processes)
        ]
        for n in per:
            p = subprocess.Popen(
                [sys.executable, "-m", "signd_bench.driver"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert p.stdin is not None
            assert p.stdout is not None
            p.stdin.write(json.dumps({**job, "connections": n}) + "\n")
            p.stdin.flush()
            procs.append(p)
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise SystemExit(f"signd-bench: a driver failed to start for {name}")
        pids = self.daemon_pids(daemon)
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        time.sleep(self.warmup)
        reset_peak_rss(pids)
        before = usage_of(pids)
        probed_before = probe() if probe is not None else {}
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=self.warmup + seconds + 120)
            if p.returncode != 0:
                raise SystemExit(f"signd-bench: a driver failed in {name}")
            results.append(json.loads(out))
        after = usage_of(pids)
        probed_after = probe() if probe is not None else {}
        names: dict[str, int] = {}
        for r in results:
            for k, v in r.get("error_names", {}).items():
                names[k] = names.get(k, 0) + v
        return _Run(
            count=sum(r["count"] for r in results),
            # a driver whose window saw no answer measured until its first one
            seconds=max([seconds, *(float(r["seconds"]) for r in results)]),
            latencies=[x for r in results for x in r["latencies"]],
            errors=sum(r["errors"] for r in results),
            error_names=names,
            cpu=after.cpu - before.cpu,
            peak_rss_mb=after.peak_rss_mb,
            probed={k: v - probed_before.get(k, 0.0) for k, v in probed_after.items()},
        )

    def fsync_row(self, directory: Path) -> Row:
        """How long an ``fsync`` of one appended line takes in ``directory``:
        the least a lone client waits per request with the strict audit log."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "fsync-probe"
        line = b"x" * 300 + b"\n"
        lat: list[float] = []
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            end = time.perf_counter() + min(self.seconds, 2.0)
            while (now := time.perf_counter()) < end:
                os.write(fd, line)
                os.fsync(fd)
                lat.append(time.perf_counter() - now)
        finally:
            os.close(fd)
            path.unlink()
        row = Row(
            "fsync of an appended line, on the audit log's disk",
            "-",
            len(lat),
            sum(lat),
            lat,
            note="a lone client with the strict audit log waits at least this per request",
        )
        self.rows.append(row)
        _progress(f"  {row.name}: p50 {(row.p(50) or 0) * 1e6:.0f} µs")
        return row

    @staticmethod
    def _row(name: str, key_type: str, runs: list[_Run], note: str) -> Row:
        errors = sum(r.errors for r in runs)
        if errors:
            names: dict[str, int] = {}
            for r in runs:
                for k, v in r.error_names.items():
                    names[k] = names.get(k, 0) + v
            note = f"{note} {errors} errors {names}".strip()
        return Row(
            name,
            key_type,
            sum(r.count for r in runs),
            sum(r.seconds for r in runs),
            [x for r in runs for x in r.latencies],
            server_cpu=sum(r.cpu for r in runs),
            server_peak_rss_mb=max(r.peak_rss_mb for r in runs),
            note=note,
        )

    def sign_job(self, key: str, key_type: str) -> dict[str, Any]:
        if key_type in _BY_MESSAGE:
            return {"op": "sign", "key": key, "data": MESSAGE.hex()}
        return {"op": "sign", "key": key, "data": DIGEST.hex(), "digest": True, "hash": "sha256"}

    def verify_job(self, key: str, key_type: str) -> dict[str, Any]:
        job = self.sign_job(key, key_type)
        with Client(self.socket) as c:
            if key_type in _BY_MESSAGE:
                sig = c.sign(key, MESSAGE).signature
            else:
                sig = c.sign(key, digest=DIGEST, hash="sha256").signature
        return {**job, "op": "verify", "signature": sig.hex()}

    def memory_rows(self, key: str) -> None:
        """RSS with 1,000 open connections, and RSS growth over many signatures."""
        assert self.daemon is not None
        main_pid = self.daemon.pid
        conns = 1000
        p = subprocess.Popen(
            [sys.executable, "-c", _IDLE_CONNECTIONS, self.socket, str(conns)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None
        assert p.stdin is not None
        line = p.stdout.readline().strip()
        rss_main = _rss_mb(main_pid)
        rss_all = sum(_rss_mb(pid) for pid in self.daemon_pids())
        p.stdin.write("done\n")
        p.stdin.flush()
        p.wait(30)
        self.rows.append(
            Row(
                f"daemon RSS with {conns} open connections",
                "-",
                0,
                1.0,
                server_peak_rss_mb=rss_main,
                note=f"{line}; main process {rss_main:.1f} MB, with token workers {rss_all:.1f} MB",
            )
        )
        _progress(f"  {conns} open connections: main {rss_main:.1f} MB, total {rss_all:.1f} MB")

        total = 20_000 if self.quick else 1_000_000
        before_main = _rss_mb(main_pid)
        before_all = sum(_rss_mb(pid) for pid in self.daemon_pids())
        t0 = time.perf_counter()
        done = 0
        budget = max(30.0, 3 * total / 15000)  # seconds: a loaded machine ends it early
        while done < total and time.perf_counter() - t0 < budget:
            n = min(total - done, 200_000)
            # One long pipelined run; its rate does not matter here.
            rate_job = {
                **self.sign_job(key, "ec-p256"),
                "socket": self.socket,
                "warmup": 0,
                "window": self.window,
            }
            secs = n / 15000
            res = _run_driver_for_count(rate_job, 64, secs)
            done += res
            if res == 0:
                break
        after_main = _rss_mb(main_pid)
        after_all = sum(_rss_mb(pid) for pid in self.daemon_pids())
        elapsed = time.perf_counter() - t0
        self.rows.append(
            Row(
                f"RSS growth over {done:,} signatures",
                "ec-p256",
                done,
                elapsed,
                server_peak_rss_mb=after_main,
                note=(
                    f"main process {before_main:.1f} -> {after_main:.1f} MB "
                    f"({after_main - before_main:+.1f} MB); with workers {before_all:.1f} -> "
                    f"{after_all:.1f} MB ({after_all - before_all:+.1f} MB)"
                ),
            )
        )
        _progress(f"  RSS over {done:,} signatures: main {after_main - before_main:+.1f} MB")


_IDLE_CONNECTIONS = r"""
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
from signd_client.protocol import Empty, FrameDecoder, decode_response, encode_request
path, n = sys.argv[1], int(sys.argv[2])
socks, ok = [], 0
for i in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(encode_request(i, "health", Empty()))
    socks.append(s)
for s in socks:
    d = FrameDecoder()
    while True:
        d.receive_data(s.recv(65536))
        frames = list(d.frames())
        if frames:
            ok += decode_response(frames[0]).error is None
            break
print(f"{ok} of {n} connections open and answered", flush=True)
sys.stdin.readline()
"""


def _run_driver_for_count(job: dict[str, Any], connections: int, seconds: float) -> int:
    p = subprocess.Popen(
        [sys.executable, "-m", "signd_bench.driver"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = p.communicate(
        json.dumps({**job, "mode": "pipeline", "connections": connections, "seconds": seconds})
        + "\ngo\n",
        timeout=seconds + 120,
    )
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return int(json.loads(lines[-1])["count"])


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# -------------------------------------------------------------------- report
