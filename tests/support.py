"""Helpers shared by the daemon's tests: the one place for them.

Fixtures (tokens, daemons) are in the root ``conftest.py``; plain functions
that several test modules use live here, imported as ``from support import
...`` (pytest puts ``tests/`` on ``sys.path``).  Add new shared helpers at the
end of this file rather than copying one into a test module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from conftest import Daemon

__all__ = ["WAIT", "kill_tree", "wait_for", "wait_until"]

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
