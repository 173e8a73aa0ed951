"""The soak test's short version: ``python -m signd_bench.soak`` end to end.

The full run (README, "Soak test") holds 1,000 connections for 10 minutes
and bounds the daemon's RSS growth.  Here the same code holds 1,000
connections for 10 s on a daemon it starts with the default ``[limits]``:
every request must succeed, every answer be right and every signature verify
with ``cryptography``.  RSS is sampled (every 0.5 s) and reported, but 10 s is
too short a run to judge its growth, so the bound is not asserted here.

A second run points the soak at a daemon started with a soft descriptor
limit of 256 (``--socket``/``--pid``): the daemon raises its own limit, so it
holds more connections than that.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from support import once_per_run

if TYPE_CHECKING:
    from conftest import Daemon

pytestmark = pytest.mark.slow

OPS = ("sign", "sign_batch", "verify", "public_key", "key_info", "list_keys", "health", "rotate")


def run_soak(tmp: Path, *args: str, timeout: float = 240) -> tuple[dict[str, Any], str, int]:
    """Run the soak; (its JSON report, its stdout, its exit code)."""
    report = tmp / "soak.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "SIGND_"))}
    # Its own session, so a time-out stops the daemon it started too.
    proc = subprocess.Popen(
        [sys.executable, "-m", "signd_bench.soak", *args, "--json", str(report)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert report.exists(), f"no report (exit {proc.returncode}):\n{stderr[-4000:]}"
    return json.loads(report.read_text()), stdout, proc.returncode


def assert_clean(report: dict[str, Any], connections: int) -> None:
    """Zero errors, every answer right, every signature checked and valid."""
    assert report["errors"] == 0, (report["error_kinds"], report["examples"])
    assert report["wrong_answers"] == 0, report["examples"]
    assert report["bad_signatures"] == 0, report["examples"]
    assert report["connected"] == connections
    assert report["held"] == connections
    assert report["reconnects"] == 0
    assert report["check_every"] == 1
    assert report["signatures"] > 0
    assert report["checked"] == report["signatures"], "a signature went unchecked"
    assert report["verify_valid"] > 0
    assert report["verify_invalid"] > 0, "no deliberately wrong signature was verified"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, int]:
    """The 1,000-connection run, once per test run (shared by pytest-xdist's workers)."""
    report, stdout, code = once_per_run(
        tmp_path_factory,
        "soak-short",
        lambda tmp: run_soak(
            tmp, "--connections", "1000", "--duration", "10", "--rotate-every", "2"
        ),
    )
    return report, stdout, code


def test_short_soak_holds_1000_connections_without_errors(
    short_run: tuple[dict[str, Any], str, int],
) -> None:
    report, _, _ = short_run
    assert report["connections"] == 1000
    assert report["daemon"].endswith("with the default [limits] (max_connections_per_uid 1024)")
    assert_clean(report, 1000)
    assert report["daemon_log_errors"] == []
    for op in OPS:
        assert report["ops"][op]["requests"] > 0, f"no {op} was sent"
        assert report["ops"][op]["errors"] == 0, report["ops"][op]
    assert report["rotations"] == report["ops"]["rotate"]["requests"]
    (rot,) = [k for k in report["keys"] if k["name"].endswith("-rot")]
    assert rot["versions"] == report["rotations"] + 1
    assert {k["type"] for k in report["keys"]} == {"ec-p256", "ed25519", "rsa-2048"}


def test_short_soak_samples_rss_and_descriptors(
    short_run: tuple[dict[str, Any], str, int],
) -> None:
    """RSS is measured and reported (10 s is too short to judge its growth)."""
    report, _, code = short_run
    samples = report["samples"]
    assert len(samples) >= 10, samples
    assert all(s["rss_mb"] > 0 and s["workers_rss_mb"] > 0 for s in samples), samples
    assert all(s["workers"] >= 1 for s in samples), samples
    for key in ("rss", "workers_rss"):
        rss = report[key]
        assert rss["baseline_mb"] > 0
        assert rss["max_mb"] >= rss["end_mb"]
        assert rss["growth_mb"] == pytest.approx(rss["end_mb"] - rss["baseline_mb"], abs=0.02)
    # The daemon held a descriptor per connection, to the end.
    assert report["fds"]["end"] >= 1000, report["fds"]
    # The verdict follows the report: only an RSS bound may fail a clean run.
    assert all("RSS" in f for f in report["failures"]), report["failures"]
    assert code == (0 if report["passed"] else 1)


def test_short_soak_prints_its_table(short_run: tuple[dict[str, Any], str, int]) -> None:
    report, stdout, _ = short_run
    lines = stdout.splitlines()
    assert "| operation | requests | errors | p50 ms | p99 ms |" in lines, stdout
    assert "| check | result |" in lines, stdout
    for op in OPS:
        assert any(ln.startswith(f"| {op} | ") for ln in lines), op
    result = next(ln for ln in lines if ln.startswith("| result | "))
    assert ("PASS" in result) == report["passed"], result
    assert any("1000 of 1000 held" in ln for ln in lines), stdout


def _nofile(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


def test_soak_against_a_running_daemon_with_a_low_descriptor_limit(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """signd raises RLIMIT_NOFILE's soft limit itself: started with 256, it holds 400."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard descriptor limit ({hard}) is too low to show the raise")
    # One uid holds every connection here: its own limit must allow them all.
    d = make_daemon("[limits]\nmax_connections_per_uid = 1024\n", start=False)
    wrapper = (
        "import os, resource, sys\n"
        "n = resource.RLIMIT_NOFILE\n"
        "resource.setrlimit(n, (256, resource.getrlimit(n)[1]))\n"
        "os.execv(sys.executable, sys.argv[1:])\n"
    )
    d.start(argv=[sys.executable, "-c", wrapper, *d.command()])
    assert d.proc is not None
    soft, hard = _nofile(d.proc.pid)
    assert soft == hard, (soft, hard)
    report, _, code = run_soak(
        tmp_path,
        *("--socket", d.socket, "--pid", str(d.proc.pid)),
        *("--connections", "400", "--duration", "3", "--rotate-every", "1"),
    )
    assert report["pid"] == d.proc.pid
    assert_clean(report, 400)
    assert report["samples"], "no RSS samples of the daemon named by --pid"
    assert report["fds"]["max"] >= 400, report["fds"]
    assert report["daemon_log_errors"] is None  # not its daemon: it cannot read the log
    assert all("RSS" in f for f in report["failures"]), report["failures"]
    assert code == (0 if report["passed"] else 1)
    assert '"level": "error"' not in d.logs()
