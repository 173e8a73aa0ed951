"""Keep the PIN out of core dumps and away from same-uid debuggers.

``no_core_dumps`` sets ``RLIMIT_CORE`` to 0 (soft and hard: no core file on
a crash, a ``kill -ABRT`` or the watchdog's SIGABRT) and clears the process's
dumpable flag (``PR_SET_DUMPABLE`` 0: no core either, even through a
``core_pattern`` pipe, and another process of the same uid can no longer
ptrace it or read its memory and environment under ``/proc``).  The flag is
reset by every ``execve``, so the daemon calls this first thing and so does
every token worker it execs.
"""

from __future__ import annotations

import ctypes
import os
import resource
from typing import Final

__all__ = ["no_core_dumps"]

PR_SET_DUMPABLE: Final = 4


def no_core_dumps() -> list[str]:
    """Forbid core dumps of this process; returns what could not be done
    (for the caller to log once logging is set up), an empty list if all was."""
    problems = []
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        # A system call filter may refuse it; systemd's LimitCORE=0 has set it then.
        if resource.getrlimit(resource.RLIMIT_CORE) != (0, 0):
            problems.append(f"RLIMIT_CORE not set to 0: {exc}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        problems.append(f"PR_SET_DUMPABLE not cleared: {os.strerror(ctypes.get_errno())}")
    return problems
