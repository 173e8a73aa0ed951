"""Races an exec of a setuid program against the daemon's accept (used by test_identity.py).

Run as an unprivileged uid with no supplementary groups.  Each round:

1. an *attacker* process is forked, and forks a *child*; both hold the same
   (not yet connected) socket;
2. the attacker connects, so the kernel records the attacker's credentials
   (no groups) for the connection, and at once execs ``HELPER`` (a setuid-root
   copy of ``setpriv``) with ``--groups=GROUP``: the same pid now holds GROUP,
   as after ``sudo -u svc CMD``;
3. the child waits until ``/proc/<attacker>/status`` shows GROUP, then sends
   one ``sign`` on the connection it shares and reports the answer.

A daemon that took the groups from ``/proc`` after accepting signs whenever
its accept came after the exec; one that takes them from the kernel's record
of the connect never does.

Usage:
  exec_racer.py race SOCKET KEY HELPER GROUP ROUNDS   prints one JSON list of
      answers, one per round: "signed", an error name, or "lost: ..."
  exec_racer.py once SOCKET KEY                       one sign on a fresh
      connection; prints its answer
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time
from typing import NoReturn

from signd_client.protocol import FrameDecoder, SignArgs, decode_response, encode_request

PR_SET_CHILD_SUBREAPER = 36


def sign_on(sock: socket.socket, key: str) -> str:
    """One ``sign`` on a connected socket: "signed" or the error's name."""
    sock.sendall(encode_request(1, "sign", SignArgs(key=key, message=b"exec race")))
    decoder = FrameDecoder()
    while True:
        data = sock.recv(65536)
        if not data:
            return "lost: connection closed"
        decoder.receive_data(data)
        for body in decoder.frames():
            answer = decode_response(body)
            return "signed" if answer.error is None else answer.error.name


def groups_of(pid: int) -> set[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    return set()


def child(sock: socket.socket, report: int, attacker: int, key: str, group: int) -> NoReturn:
    answer = "lost: the helper never took the group"
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if group in groups_of(attacker):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.0005)
        else:
            raise TimeoutError
        sock.settimeout(30)
        answer = sign_on(sock, key)
    except BaseException as exc:  # reported to the runner
        if not isinstance(exc, TimeoutError):
            answer = f"lost: {exc!r}"
    os.write(report, answer.encode())
    os._exit(0)


def race(path: str, key: str, helper: str, group: int, rounds: int) -> list[str]:
    # Orphaned children come back to this process, which reaps them.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    answers = []
    uid, gid = os.getuid(), os.getgid()
    argv = [helper, f"--reuid={uid}", f"--regid={gid}", f"--groups={group}", "/bin/sleep", "60"]
    for _ in range(rounds):
        rd, wr = os.pipe()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        attacker = os.fork()
        if attacker == 0:
            if os.fork() == 0:
                child(sock, wr, os.getppid(), key, group)
            # The attacker: connect, then exec at once.  The socket is
            # close-on-exec: after the exec only the child holds it.
            sock.connect(path)
            os.execv(helper, argv)
        sock.close()
        os.close(wr)
        answer = os.read(rd, 4096).decode() or "lost: no report"
        os.close(rd)
        os.kill(attacker, signal.SIGKILL)
        for _ in range(2):  # the attacker and the child
            os.waitpid(-1, 0)
        answers.append(answer)
    return answers


def main(argv: list[str]) -> int:
    if argv[:1] == ["race"] and len(argv) == 6:
        path, key, helper, group, rounds = argv[1:]
        print(json.dumps(race(path, key, helper, int(group), int(rounds))))
        return 0
    if argv[:1] == ["once"] and len(argv) == 3:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(argv[1])
            print(sign_on(sock, argv[2]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
