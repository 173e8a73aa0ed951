"""Helpers shared by the daemon's tests: the one place for them.

Fixtures (tokens, daemons) are in the root ``conftest.py``; plain functions
that several test modules use live here, imported as ``from support import
...`` (pytest puts ``tests/`` on ``sys.path``).  Add new shared helpers at the
end of this file rather than copying one into a test module.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import pytest
    from conftest import Daemon, TokenEnv

__all__ = [
    "WAIT",
    "kill_tree",
    "once_per_run",
    "open_sockets",
    "wait_for",
    "wait_until",
    "wait_until_released",
]

T = TypeVar("T")

#: The longest a test waits for something that should happen: far beyond
#: any period or interval the tests configure, so reaching it means "never".
WAIT = 30.0
#: How often a wait looks again.
POLL = 0.02


def wait_until(probe: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """Call ``probe`` until it returns something true.

    Raises: AssertionError naming ``what`` when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(POLL)


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
    """Call ``probe`` until it returns something other than None; return that.

    Raises: AssertionError naming ``what`` when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(POLL)


def kill_tree(d: Daemon) -> None:
    """SIGKILL the daemon and its token workers at once: a crash, not a shutdown.

    Returns once the daemon process is reaped (its workers, children of the
    daemon, may still be going away)."""
    assert d.proc is not None
    for pid in [d.proc.pid, *d.token_workers()]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    d.proc.wait()


def open_sockets(d: Daemon) -> int:
    """How many sockets the daemon's main process holds open (the listener
    and its connections).

    Raises: FileNotFoundError if the process is gone.
    """
    assert d.proc is not None
    fds = f"/proc/{d.proc.pid}/fd"
    count = 0
    for fd in os.listdir(fds):
        try:
            count += os.readlink(f"{fds}/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass  # closed while we looked
    return count


def wait_until_released(d: Daemon, baseline: int, timeout: float = WAIT) -> None:
    """Wait until the daemon has let go of every connection opened after
    ``baseline`` (an ``open_sockets`` count).

    Once a closed connection is torn down on the daemon's side, whatever closing
    it did to the daemon has happened, so the checks that follow are not racing it.

    Raises: AssertionError if the daemon dies or keeps a connection ``timeout`` seconds.
    """
    assert d.proc is not None
    proc = d.proc

    def released() -> bool:
        assert proc.poll() is None, f"signd died:\n{d.logs()[-3000:]}"
        try:
            return open_sockets(d) <= baseline
        except FileNotFoundError:
            return False  # the process is exiting; poll() says so next time round

    wait_until(released, "signd to let go of the closed connections", timeout)


def once_per_run(
    tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Any]
) -> Any:
    """``make(directory)``, run once per test run even with pytest-xdist: the
    first worker to ask runs it and keeps its result (JSON) in the run's
    shared temporary directory; the others wait for it and read that.  For
    an expensive end-to-end run that several tests only look at (the
    benchmark, the soak), where a module fixture would run once per worker.

    Raises: whatever ``make`` raises (a worker that finds no result, because
    ``make`` failed in another, runs it again and fails the same way).
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's
    base = root / f"once-{name}"
    base.mkdir(exist_ok=True)
    result = base / "result.json"
    with open(base / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the producer's own subprocess time-outs bound it
        if result.exists():
            return json.loads(result.read_text())
        work = base / "work"
        if work.exists():  # a failed attempt's leftovers
            work = Path(str(work) + f"-{os.getpid()}")
        work.mkdir()
        value = make(work)
        result.write_text(json.dumps(value))
        return value


def run_step(script: str, token: TokenEnv, name: str, **args: Any) -> dict[str, Any]:
    """Run the token step ``name`` of test module ``script`` (its ``__file__``)
    in a child process on ``token``: JSON arguments on stdin, a JSON answer on
    stdout.  A child of its own, because a PKCS#11 module is loaded once per
    process and a token's state must be seen as a new process sees it."""
    args.update(module=token.module, label=token.label, pin=str(token.pin_file))
    out = subprocess.run(
        [sys.executable, script, name],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        env=token.env(),
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, f"step {name} failed:\n{out.stderr}"
    result: dict[str, Any] = json.loads(out.stdout)
    return result
