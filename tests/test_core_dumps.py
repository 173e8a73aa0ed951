"""The PIN never reaches a core dump: the daemon and every token worker run with
``RLIMIT_CORE`` 0 and are not dumpable (``PR_SET_DUMPABLE`` 0).

What the kernel shows, and so what this proves:

* ``/proc/<pid>/limits`` says ``Max core file size 0 0``: no core file is
  written, whatever the process dies of.  The daemon is started with the core
  limit raised to unlimited, so the 0 is signd's own doing.
* The files of a dumpable process's ``/proc/<pid>`` belong to its effective
  uid and gid; those of a process that is not dumpable belong to root:root
  (and no other process of its uid may read its memory or ptrace it).  So the
  daemon runs here as root with the group ``nogroup`` (through ``setpriv``):
  its ``/proc/<pid>/status`` shows gid 0 only if it made itself undumpable.
  (Root, so that the test needs no interpreter or checkout another uid can
  reach.)

No process is crashed here: where a core would go depends on the machine's
``core_pattern``, and what matters is that the kernel will not write one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Daemon

NOGROUP = 65534
SETPRIV = shutil.which("setpriv")
PRLIMIT = shutil.which("prlimit")

pytestmark = pytest.mark.skipif(
    SETPRIV is None or PRLIMIT is None or os.geteuid() != 0,
    reason="needs root, setpriv and prlimit (util-linux)",
)


def core_limit(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return line.split()[4:6]
    raise AssertionError(f"no core limit in /proc/{pid}/limits")


def effective_gid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Gid:"):
            return int(line.split()[2])
    raise AssertionError(f"no Gid in /proc/{pid}/status")


def test_daemon_and_workers_cannot_dump_core(make_daemon: Callable[..., Daemon]) -> None:
    assert PRLIMIT is not None
    assert SETPRIV is not None
    d = make_daemon(start=False)
    d.start(
        argv=[
            *(PRLIMIT, "--core=unlimited:unlimited", "--"),
            *(SETPRIV, f"--regid={NOGROUP}", "--clear-groups", "--"),
            *d.command(),
        ]
    )
    assert d.proc is not None
    workers = d.token_workers()
    assert len(workers) >= 2, workers  # the signing workers and the writer
    for pid in [d.proc.pid, *workers]:
        assert effective_gid(pid) == NOGROUP, pid  # the setpriv took
        assert core_limit(pid) == ["0", "0"], pid
        # Not dumpable: its /proc entry belongs to root:root, not to its gid.
        assert os.stat(f"/proc/{pid}/status").st_gid == 0, pid
    assert "core dumps not fully disabled" not in d.logs()


def test_a_root_daemon_has_no_core_limit_either(signd: Daemon) -> None:
    assert signd.proc is not None
    workers = signd.token_workers()
    assert workers
    for pid in [signd.proc.pid, *workers]:
        assert core_limit(pid) == ["0", "0"], pid
