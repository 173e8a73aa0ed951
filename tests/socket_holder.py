"""Plays systemd's part in a restart of a socket-activated service (used by test_restart.py).

Run as the command of ``systemd-socket-activate``, which execs it with the
listening socket as fd 3 (``LISTEN_FDS=1``).  This program keeps that fd open
for its whole life, as systemd keeps a ``.socket`` unit's socket, and runs the
service given on its command line as a child, the way systemd starts one:
fd 3 inherited, ``LISTEN_FDS=1`` and ``LISTEN_PID`` set to the child's own pid.

Commands, one a line on stdin:

* ``restart``: SIGTERM the running child, wait for it to exit, start a new one
  (``systemctl restart``).
* ``stop``, or the end of stdin, or SIGTERM to this program: SIGTERM the child,
  wait, and exit.

Reports, one a line on stdout: ``started PID`` and ``exited PID CODE`` (CODE
as ``subprocess`` reports it: negative for a signal).  The child's stdout and
stderr are this program's stderr; its stdin is /dev/null.

Usage: systemd-socket-activate -l PATH python socket_holder.py COMMAND...
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from typing import Final, NoReturn

LISTEN_FD: Final = 3
PR_SET_PDEATHSIG: Final = 1


def _exec_child(argv: list[str], env: dict[str, str]) -> NoReturn:
    """In the forked child: become the service.  Never returns."""
    try:
        # If the holder dies, the service is told to stop (and does not
        # outlive a test that was killed).
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(2, 1)
        os.set_inheritable(LISTEN_FD, True)
        os.closerange(LISTEN_FD + 1, os.sysconf("SC_OPEN_MAX"))
        # As systemd does: the variables name this very process.
        env = dict(env, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
        os.execvpe(argv[0], argv, env)
    except BaseException as exc:  # nothing may return into the parent's code
        os.write(2, f"socket_holder: cannot start {argv[0]}: {exc}\n".encode())
    os._exit(127)


class Holder:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        # The service's environment: ours, without the variables meant for us.
        self.env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_PID")}
        self.pid: int | None = None

    def report(self, line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def start(self) -> None:
        assert self.pid is None
        pid = os.fork()
        if pid == 0:
            _exec_child(self.argv, self.env)
        self.pid = pid
        self.report(f"started {pid}")

    def stop(self) -> None:
        """SIGTERM the service and wait for it, as ``systemctl stop`` does."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        self.report(f"exited {pid} {code}")


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: socket_holder.py COMMAND...", file=sys.stderr)
        return 2
    if os.environ.get("LISTEN_FDS") != "1" or os.environ.get("LISTEN_PID") != str(os.getpid()):
        print("socket_holder: expected one socket as fd 3 (LISTEN_FDS=1)", file=sys.stderr)
        return 2
    os.fstat(LISTEN_FD)  # it is there, and stays open here until the end
    holder = Holder(argv)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    try:
        holder.start()
        for line in sys.stdin:
            command = line.strip()
            if command == "restart":
                holder.stop()
                holder.start()
            elif command == "stop":
                break
            elif command:
                print(f"socket_holder: unknown command {command!r}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        holder.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
