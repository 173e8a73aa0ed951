"""A hostile local client, for the flood tests (test_floods.py), run as another uid.

Usage: python flooder.py SOCKET MODE COUNT [ARG]

Modes:

* ``health COUNT N``: keep COUNT connections, each sending N ``health``
  requests and never reading an answer;
* ``partial COUNT BYTES``: keep COUNT connections, each holding a frame
  announced as BYTES long with all but its last byte sent;
* ``connections COUNT``: open COUNT connections and hold them;
* ``unknown COUNT PREFIX``: pipeline COUNT ``sign`` requests for random key
  names starting with PREFIX on one connection, and read every answer.

A connection the daemon closes is opened again at once, so the flood goes
on until stdin is closed.  Writes ``flooding`` on stdout once every
connection has been opened and has sent all it could; at the end, one JSON
line: connections opened, closed by the daemon, and (``unknown``) the
answers by error name.  Needs msgpack, nothing of signd.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import select
import socket
import struct
import sys
from typing import Any

import msgpack


def frame(rid: int, op: str, args: dict[str, Any]) -> bytes:
    body = msgpack.packb({"v": 1, "id": rid, "op": op, "args": args}, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def stdin_closed() -> bool:
    if select.select([sys.stdin], [], [], 0)[0]:
        return not os.read(sys.stdin.fileno(), 4096)
    return False


class Slot:
    def __init__(self, path: str, payload: bytes) -> None:
        self.path = path
        self.payload = payload
        self.sock: socket.socket | None = None
        self.left = b""

    def open(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            return False
        s.setblocking(False)
        self.sock, self.left = s, self.payload
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def push(self) -> bool:
        """Send what is left; False if the daemon closed the connection."""
        assert self.sock is not None
        while self.left:
            try:
                n = self.sock.send(self.left[:65536])
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    return False
                raise
            self.left = self.left[n:]
        return True


def keep(path: str, count: int, payload: bytes) -> dict[str, int]:
    """COUNT connections sending ``payload`` and never reading, until stdin closes."""
    slots = [Slot(path, payload) for _ in range(count)]
    opened = closed = 0
    announced = False
    poller = select.poll()
    while not stdin_closed():
        for slot in slots:
            if slot.sock is None:
                if slot.open():
                    opened += 1
                    assert slot.sock is not None
                    poller.register(slot.sock, select.POLLOUT)
        for fd, ev in poller.poll(50):
            slot = next(s for s in slots if s.sock is not None and s.sock.fileno() == fd)
            assert slot.sock is not None
            if ev & (select.POLLHUP | select.POLLERR) or not slot.push():
                poller.unregister(fd)
                slot.close()
                closed += 1
            elif not slot.left:
                poller.modify(fd, 0)  # all sent: only a hang-up is of interest now
        if not announced and all(s.sock is not None for s in slots):
            announced = True
            print("flooding", flush=True)
    return {"opened": opened, "closed": closed}


def hold(path: str, count: int) -> dict[str, int]:
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        socks.append(s)
    print("flooding", flush=True)
    while not stdin_closed():
        select.select([sys.stdin], [], [], 1.0)
    return {"opened": len(socks), "closed": 0}


def unknown(path: str, count: int, prefix: str) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    digest = bytes(32)
    out = b"".join(
        frame(
            i,
            "sign",
            {"key": f"{prefix}{secrets.token_hex(6)}", "digest": digest, "hash": "sha256"},
        )
        for i in range(count)
    )
    s.sendall(out)
    print("flooding", flush=True)
    errors: dict[str, int] = {}
    buf = b""
    got = 0
    while got < count:
        data = s.recv(1 << 20)
        if not data:
            break
        buf += data
        while len(buf) >= 4:
            (n,) = struct.unpack(">I", buf[:4])
            if len(buf) < 4 + n:
                break
            resp = msgpack.unpackb(buf[4 : 4 + n], raw=False)
            buf = buf[4 + n :]
            got += 1
            name = resp["error"]["name"] if "error" in resp else "ok"
            errors[name] = errors.get(name, 0) + 1
    while not stdin_closed():
        select.select([sys.stdin], [], [], 1.0)
    return {"opened": 1, "closed": 0, "answers": errors}


def main() -> None:
    path, mode, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "health":
        n = int(sys.argv[4])
        result: dict[str, Any] = keep(
            path, count, b"".join(frame(i, "health", {}) for i in range(n))
        )
    elif mode == "partial":
        size = int(sys.argv[4])
        result = keep(path, count, struct.pack(">I", size) + b"\xc0" * (size - 1))
    elif mode == "connections":
        result = hold(path, count)
    elif mode == "unknown":
        result = unknown(path, count, sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
