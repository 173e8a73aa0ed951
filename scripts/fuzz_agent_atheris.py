#!/usr/bin/env python3
"""Long-run fuzzing of signd's ssh-agent decoder, and of a running agent socket, with atheris.

atheris is required, and deliberately not a dependency of signd::

    .venv/bin/pip install atheris

Without ``--socket`` it fuzzes the sans-IO codec alone (``signd.agent.wire``):
each input is fed to a ``MessageDecoder`` in pieces (the cuts come from the
input), every message is parsed, and only ``AgentWireError`` may come out;
the decoder must never hold more than one message and one piece.

With ``--socket`` (a daemon's ``[agent] socket``, say ``scripts/dev.sh serve``
with an ``[agent]`` section) each input also goes to the daemon on a fuzz
connection of its own, as framed messages, and the answers are read until the
daemon closes it.  Meanwhile a thread signs without pause on a well-behaved
connection, with the first Ed25519 or P-256 key the socket lists, and checks
every signature with ``cryptography``.  A good signature taking over 5 s is a
*hang*, a socket that refuses connections a *crash*; either stops the run
with an exception, so atheris saves the input::

    .venv/bin/python scripts/fuzz_agent_atheris.py --socket state/agent.sock \\
        -atheris_runs=1000000

Arguments it does not know are passed on to atheris / libFuzzer.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import socket
import struct
import sys
import threading
import time

import atheris

with atheris.instrument_imports():
    from signd.agent import wire

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

MAX = 4096  # a small decoder limit, so the fuzzer reaches it
HANG_AFTER = 5.0
LEN = struct.Struct(">I")


class Failure(Exception):
    """The daemon hung or crashed, or a good signature was wrong."""


def check_codec(data: bytes) -> list[bytes]:
    """Feed ``data`` in pieces; returns the messages taken from it."""
    fdp = atheris.FuzzedDataProvider(data)
    cuts = sorted(fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 4), 0, 1 << 16))
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    decoder = wire.MessageDecoder(MAX)
    seen: list[bytes] = []
    pos = 0
    for cut in [*cuts, len(stream)]:
        piece = stream[pos:cut]
        pos = max(pos, cut)
        decoder.feed(piece)
        try:
            for body in decoder.messages():
                seen.append(body)
                msg = wire.parse(body)
                if isinstance(msg, wire.Extension):
                    with contextlib.suppress(wire.AgentWireError):
                        wire.parse_session_bind(msg.contents)
        except wire.AgentWireError:
            return seen
        if decoder.buffered > 4 + MAX + len(piece):
            raise AssertionError(f"the decoder holds {decoder.buffered} bytes")
    return seen


def call(sock: socket.socket, body: bytes) -> bytes:
    sock.sendall(LEN.pack(len(body)) + body)
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + LEN.unpack(buf[:4])[0]:
        chunk = sock.recv(65536)
        if not chunk:
            raise Failure("the agent closed a good connection")
        buf += chunk
    return buf[4:]


def _strings(data: bytes, count: int) -> list[bytes]:
    out, pos = [], 0
    for _ in range(count):
        (n,) = LEN.unpack(data[pos : pos + 4])
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


class Daemon:
    """A running agent socket, and a thread that keeps signing on it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.failure: str | None = None
        self.good = 0
        self.inputs = 0
        self.started_at = 0.0
        self.stop = threading.Event()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            answer = call(s, bytes([wire.REQUEST_IDENTITIES]))
        (count,) = LEN.unpack(answer[1:5])
        items = _strings(answer[5:], 2 * count)
        blobs = [items[i] for i in range(0, len(items), 2)]
        usable = [b for b in blobs if _strings(b, 1)[0] in (b"ssh-ed25519", b"ecdsa-sha2-nistp256")]
        if not usable:
            raise SystemExit("the agent socket lists no Ed25519 or P-256 key for this uid")
        self.blob = usable[0]
        threading.Thread(target=self.sign_forever, daemon=True).start()

    def verify(self, data: bytes, answer: bytes) -> None:
        if answer[:1] != bytes([wire.SIGN_RESPONSE]):
            raise Failure(f"good signature refused: {answer[:1].hex()}")
        _, inner = _strings(_strings(answer[1:], 1)[0], 2)
        kind = _strings(self.blob, 1)[0]
        if kind == b"ssh-ed25519":
            key = ed25519.Ed25519PublicKey.from_public_bytes(_strings(self.blob, 2)[1])
            key.verify(inner, data)
        else:
            point = _strings(self.blob, 3)[2]
            pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
            r, s = (int.from_bytes(x, "big") for x in _strings(inner, 2))
            pub.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))

    def sign_forever(self) -> None:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(self.path)
                while not self.stop.is_set():
                    data = os.urandom(32)
                    self.started_at = time.monotonic()
                    body = bytes([wire.SIGN_REQUEST]) + wire.string(self.blob) + wire.string(data)
                    self.verify(data, call(s, body + b"\0\0\0\0"))
                    self.started_at = 0.0
                    self.good += 1
        except Exception as exc:
            self.failure = f"good connection: {exc!r}"

    def send(self, data: bytes) -> None:
        self.inputs += 1
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2.0)
        try:
            s.connect(self.path)
        except OSError as exc:
            s.close()
            raise Failure(f"crash: the agent socket refuses connections: {exc!r}") from exc
        with s, contextlib.suppress(OSError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        self.check()

    def check(self) -> None:
        started = self.started_at
        if started and time.monotonic() - started > HANG_AFTER:
            self.failure = f"hang: a good signature has waited over {HANG_AFTER}s"
        if self.failure is not None:
            raise Failure(self.failure)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--socket", help="a running daemon's [agent] socket")
    args, rest = parser.parse_known_args(argv[1:])
    daemon = Daemon(args.socket) if args.socket else None

    def one(data: bytes) -> None:
        messages = check_codec(data)
        if daemon is not None:
            daemon.send(b"".join(LEN.pack(len(m)) + m for m in messages) or data)

    def report() -> None:
        if daemon is not None:
            daemon.stop.set()
            print(f"\nfuzz_agent_atheris: inputs={daemon.inputs} good={daemon.good}", flush=True)

    atexit.register(report)
    atheris.Setup([argv[0], *rest], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
