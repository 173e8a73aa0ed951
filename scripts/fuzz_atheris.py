#!/usr/bin/env python3
"""Long-run fuzzing of a running signd's full request path, with atheris.

atheris is required, and deliberately not a dependency of signd (only long
runs need it)::

    .venv/bin/pip install atheris

The harness starts nothing itself: it connects to a running daemon (say
``scripts/dev.sh serve`` in another shell)::

    .venv/bin/python scripts/fuzz_atheris.py --socket state/signd.sock \\
        -atheris_runs=1000000

Socket: ``--socket``, else ``$SIGND_SOCKET``.  It creates two ec-p256 keys
there (or reuses those named by ``--good-key`` / ``--victim-key``): a *victim*
that fuzz inputs may name, and a *good* key they never name.

* A background thread keeps one well-behaved connection signing with the
  good key without pause, and verifies every signature with cryptography.
* Each fuzz input goes to the daemon on a separate fuzz connection: mostly as
  a framed body (4-byte length + the bytes), sometimes as a request envelope
  built from the input (every op, arguments of the right and wrong types,
  naming the victim key), sometimes as raw unframed bytes.  The answer is read
  with a short time-out; when the daemon closes the connection (allowed after
  a fatal frame) the harness reconnects.  Each body is also run through the
  local ``decode_request``, whose coverage guides atheris.
* A *hang* is a good signature taking over 5 s, or the socket refusing
  connections while the daemon's process (``--pid``, when given) still runs;
  a *crash* is the daemon gone.  Either stops the run with an exception, so
  atheris saves the input.  So does a wrong or unverifiable good signature.

At the end (``-atheris_runs=N``) it prints the counts: inputs, fuzz
connections reopened, good signatures made, errors, hangs, crashes.
Arguments it does not know are passed on to atheris / libFuzzer.
"""

from __future__ import annotations

import argparse
import atexit
import os
import socket
import struct
import sys
import threading
import time
import uuid
from typing import Any

import atheris

with atheris.instrument_imports():
    import msgpack

    from signd_client.errors import FrameTooLarge
    from signd_client.protocol import (
        OPS,
        BadRequest,
        FrameDecoder,
        Request,
        decode_request,
        decode_response,
    )

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signd_client import Client
from signd_client.errors import KeyNotFound

HEADER = struct.Struct(">I")
HANG_AFTER = 5.0  # seconds a good signature may take
READ_TIMEOUT = 2.0  # for one answer on the fuzz connection
MAX_ROTATIONS = 10  # real rotations of the victim key, so the token does not fill up
OP_NAMES = sorted(OPS)
WORDS = ["sha256", "sha384", "sha512", "pss", "pkcs1v15", "der", "raw", "ieee-p1363", ""]


class Failure(Exception):
    """The daemon hung or crashed, or a good signature was wrong."""


class Stats:
    def __init__(self) -> None:
        self.inputs = 0
        self.framed = 0
        self.structured = 0
        self.unframed = 0
        self.answers = 0
        self.reopened = 0
        self.read_timeouts = 0
        self.good_signatures = 0
        self.good_max_latency = 0.0
        self.errors = 0
        self.hangs = 0
        self.crashes = 0
        self.rotations = 0
        self.started = time.monotonic()
        self.printed = False

    def report(self) -> None:
        if self.printed:
            return
        self.printed = True
        elapsed = time.monotonic() - self.started
        print(
            "\nfuzz_atheris: "
            f"inputs={self.inputs} (framed={self.framed} structured={self.structured} "
            f"unframed={self.unframed}) answers={self.answers} "
            f"fuzz_connections_reopened={self.reopened} read_timeouts={self.read_timeouts} "
            f"good_signatures={self.good_signatures} "
            f"good_max_latency={self.good_max_latency:.3f}s "
            f"errors={self.errors} hangs={self.hangs} crashes={self.crashes} "
            f"elapsed={elapsed:.1f}s rate={self.inputs / max(elapsed, 1e-9):.0f}/s",
            flush=True,
        )


class Harness:
    def __init__(self, path: str, pid: int | None, good: str, victim: str) -> None:
        self.path = path
        self.pid = pid
        self.victim = victim
        self.stats = Stats()
        self.failure: str | None = None
        self.stop = threading.Event()
        self.sock: socket.socket | None = None
        self.runs: int | None = None
        with Client(path, timeout=30.0, retries=0) as c:
            for name in (good, victim):
                try:
                    c.key_info(name)
                except KeyNotFound:
                    c.create_key(name, "ec-p256")
            pem = c.public_key(good).public_key_pem
        public = serialization.load_pem_public_key(pem.encode())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        self.good = good
        self.public = public
        self.good_started = 0.0  # monotonic start of the signature in progress, or 0
        self.thread = threading.Thread(target=self.sign_forever, name="good", daemon=True)
        self.thread.start()

    # ---- the well-behaved connection

    def sign_forever(self) -> None:
        with Client(self.path, timeout=30.0, retries=0, pool_size=1) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                msg = f"good {n} {uuid.uuid4()}".encode()
                self.good_started = start = time.monotonic()
                try:
                    sig = client.sign(self.good, msg).signature
                    self.public.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
                except Exception as exc:
                    self.stats.errors += 1
                    self.fail(f"good signature failed: {exc!r}")
                    return
                finally:
                    self.good_started = 0.0
                took = time.monotonic() - start
                self.stats.good_max_latency = max(self.stats.good_max_latency, took)
                if took > HANG_AFTER:
                    self.stats.hangs += 1
                    self.fail(f"hang: a good signature took {took:.1f}s")
                    return
                self.stats.good_signatures += 1

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why

    def check(self) -> None:
        started = self.good_started
        if started and time.monotonic() - started > HANG_AFTER:
            self.stats.hangs += 1
            self.fail(f"hang: a good signature has been waiting over {HANG_AFTER}s")
        if self.pid is not None and not os.path.exists(f"/proc/{self.pid}"):
            self.stats.crashes += 1
            self.fail(f"crash: the daemon (pid {self.pid}) is gone")
        if self.failure is not None:
            self.stats.report()
            raise Failure(self.failure)

    # ---- the fuzz connection

    def connect(self) -> socket.socket:
        if self.sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(READ_TIMEOUT)
            try:
                s.connect(self.path)
            except OSError as exc:
                s.close()
                if self.pid is None or not os.path.exists(f"/proc/{self.pid}"):
                    self.stats.crashes += 1
                    self.fail(f"crash: the daemon refuses connections: {exc!r}")
                else:
                    self.stats.hangs += 1
                    self.fail(f"hang: the running daemon refuses connections: {exc!r}")
                self.check()
                raise
            self.sock = s
        return self.sock

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.stats.reopened += 1

    def recv_exact(self, n: int) -> bytes | None:
        assert self.sock is not None
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def read_answer(self) -> bool:
        """One answer frame; False when the connection is closed or silent."""
        try:
            head = self.recv_exact(4)
            if head is None:
                return False
            (length,) = HEADER.unpack(head)
            body = self.recv_exact(length)
        except (TimeoutError, OSError):
            self.stats.read_timeouts += 1
            return False
        if body is None:
            return False
        decode_response(body)  # a ProtocolViolation here is a finding
        self.stats.answers += 1
        return True

    def send_framed(self, body: bytes) -> None:
        event = decode_request(body)
        if not isinstance(event, Request | BadRequest):
            raise Failure(f"decode_request returned {event!r}")
        if isinstance(event, Request) and event.op == "rotate":
            self.stats.rotations += 1
        sock = self.connect()
        try:
            sock.sendall(HEADER.pack(len(body)) + body)
        except OSError:
            self.drop()
            return
        if not self.read_answer():
            self.drop()

    def send_unframed(self, data: bytes) -> None:
        decoder = FrameDecoder()
        decoder.receive_data(data)
        try:
            for body in decoder.frames():
                decode_request(body)
        except FrameTooLarge:
            pass
        sock = self.connect()
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.drop()
            return
        while self.read_answer():
            pass
        self.drop()

    # ---- inputs

    def structured(self, fdp: atheris.FuzzedDataProvider) -> bytes:
        """A request envelope built from the input: mostly well-formed, some not."""
        op = OP_NAMES[fdp.ConsumeIntInRange(0, len(OP_NAMES) - 1)]
        if op == "rotate" and self.stats.rotations >= MAX_ROTATIONS:
            op = "key_info"
        args: dict[str, Any] = {}
        for name, tp in OPS[op].args.__annotations__.items():
            roll = fdp.ConsumeIntInRange(0, 9)
            if roll == 0 and "None" in str(tp):
                continue  # an optional field left out
            if name == "key":
                if op == "create_key" or roll < 8:
                    args[name] = self.victim
                else:
                    args[name] = fdp.ConsumeUnicodeNoSurrogates(70)
            elif roll == 9:
                args[name] = self.anything(fdp, 3)
            elif name in ("hash", "padding", "format", "type"):
                pick = fdp.ConsumeIntInRange(0, len(WORDS))
                args[name] = (
                    fdp.ConsumeUnicodeNoSurrogates(12) if pick == len(WORDS) else WORDS[pick]
                )
                if name == "type" and pick % 2:
                    args[name] = "ec-p256"
            else:
                args[name] = self.typed(fdp, str(tp))
        envelope: dict[Any, Any] = {"v": 1, "id": fdp.ConsumeIntInRange(0, (1 << 64) - 1)}
        envelope["op"] = op
        envelope["args"] = args
        twist = fdp.ConsumeIntInRange(0, 15)
        if twist == 1:
            envelope["v"] = self.anything(fdp, 2)
        elif twist == 2:
            envelope["id"] = self.anything(fdp, 2)
        elif twist == 3:
            envelope["op"] = self.anything(fdp, 2)
        elif twist == 4:
            envelope["args"] = self.anything(fdp, 3)
        elif twist == 5:
            envelope[fdp.ConsumeUnicodeNoSurrogates(8)] = self.anything(fdp, 2)
        elif twist == 6:
            del envelope[["v", "id", "op", "args"][fdp.ConsumeIntInRange(0, 3)]]
        return msgpack.packb(envelope, use_bin_type=True)

    def typed(self, fdp: atheris.FuzzedDataProvider, tp: str) -> Any:
        if "tuple" in tp:
            return [
                fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
                for _ in range(fdp.ConsumeIntInRange(0, 4))
            ]
        if "bytes" in tp:
            return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 100))
        if "bool" in tp:
            return fdp.ConsumeBool()
        if "float" in tp:
            return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat()
        if "int" in tp:
            return fdp.ConsumeIntInRange(-(1 << 63), (1 << 64) - 1)
        return fdp.ConsumeUnicodeNoSurrogates(30)

    def anything(self, fdp: atheris.FuzzedDataProvider, depth: int) -> Any:
        kind = fdp.ConsumeIntInRange(0, 8 if depth > 0 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return fdp.ConsumeBool()
        if kind == 2:
            return fdp.ConsumeIntInRange(-(1 << 63), (1 << 64) - 1)
        if kind == 3:
            return fdp.ConsumeFloat()
        if kind == 4:
            return fdp.ConsumeUnicodeNoSurrogates(20)
        if kind in (5, 6):
            return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
        if kind == 7:
            return [self.anything(fdp, depth - 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
        return {
            fdp.ConsumeUnicodeNoSurrogates(8): self.anything(fdp, depth - 1)
            for _ in range(fdp.ConsumeIntInRange(0, 4))
        }

    def one_input(self, data: bytes) -> None:
        self.check()
        self.stats.inputs += 1
        if data:
            mode = data[0] % 8
            rest = data[1:]
            if mode < 4:
                self.stats.framed += 1
                self.send_framed(rest)
            elif mode < 7:
                self.stats.structured += 1
                self.send_framed(self.structured(atheris.FuzzedDataProvider(rest)))
            else:
                self.stats.unframed += 1
                self.send_unframed(rest)
        else:
            self.stats.framed += 1
            self.send_framed(b"")
        if self.runs is not None and self.stats.inputs >= self.runs:
            self.finish()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=HANG_AFTER * 2)
        self.check()
        self.stats.report()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--socket", default=os.environ.get("SIGND_SOCKET"))
    parser.add_argument("--pid", type=int, help="the daemon's pid, to tell a crash from a hang")
    parser.add_argument("--good-key", default=f"fuzz-good-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--victim-key", default=f"fuzz-victim-{uuid.uuid4().hex[:8]}")
    ours, rest = parser.parse_known_args()
    if not ours.socket:
        parser.error("no socket: give --socket or set SIGND_SOCKET")
    harness = Harness(ours.socket, ours.pid, ours.good_key, ours.victim_key)
    for arg in rest:
        if arg.startswith("-atheris_runs="):
            harness.runs = int(arg.split("=", 1)[1])
    print(
        f"fuzz_atheris: socket={ours.socket} good_key={ours.good_key} victim_key={ours.victim_key}",
        flush=True,
    )
    atexit.register(harness.stats.report)
    atheris.Setup([sys.argv[0], *rest], harness.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
