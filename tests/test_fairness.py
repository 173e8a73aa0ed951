"""Fairness: a connection that floods the token cannot starve another one.

The daemon runs one token worker, so every signature goes through one queue.
While that worker is paused (SIGSTOP), a flooding connection pipelines
thousands of ``sign`` requests and the daemon reads and queues all of them;
then a victim connection sends its request, and the worker resumes.  The
queue's state is then known exactly, whatever the machine's load: the flood
first, the victim last.  The token pool serves connections round-robin
(``quantum`` entries each per batch, ``depth`` batches per worker), so the
victim's request rides in one of the next few batches and is answered while
most of the flood still waits.  A FIFO queue would answer the whole flood first.

Nothing here looks at a clock.  The test reads every connection as its
answers come; the moment the victim's answer arrives, it counts the flood's
answers received.  That count can only overstate how much of the flood went
first (answers keep arriving while the test looks), by much less than the gap
between round-robin (a few hundred) and FIFO (all of it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import select
import signal
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from signd_client.protocol import (
    FrameDecoder,
    Response,
    SignArgs,
    SignResult,
    decode_response,
    encode_request,
)
from support import wait_until

if TYPE_CHECKING:
    from conftest import Daemon  # the root conftest.py

ECDSA_PREHASHED = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
# conftest's write_config appends this right after its own [token] table, so a
# first line without a header belongs to [token] (TOML forbids a second [token]).
CONFIG = "workers = 1\n\n[limits]\nmax_inflight_per_connection = 4096\n"
WAIT = 60.0  # generous limit on any one wait, so a broken daemon fails instead of hanging


def digest(tag: str, i: int) -> bytes:
    return hashlib.sha256(f"{tag} {i}".encode()).digest()


def sign_frames(key: str, tag: str, ids: range) -> bytes:
    return b"".join(
        encode_request(i, "sign", SignArgs(key=key, digest=digest(tag, i), hash="sha256"))
        for i in ids
    )


@contextlib.contextmanager
def token_paused(daemon: Daemon) -> Iterator[None]:
    """The daemon's one token worker is stopped (SIGSTOP) inside the block."""
    workers = daemon.token_workers("sign")
    assert len(workers) == 1, f"expected one token worker, found {workers}"
    os.kill(workers[0], signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(workers[0], signal.SIGCONT)


def unread_by_peer(sock: socket.socket) -> int:
    """Bytes this socket sent that the daemon has not read yet (SIOCOUTQ)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


def wait_until_read(daemon: Daemon, conns: list[Conn]) -> None:
    """Wait until the daemon has read everything sent on ``conns``.

    The daemon dispatches what one read delivered before it reads again, so
    once every byte is read, every request in them is queued for the token.
    """
    proc = daemon.proc
    assert proc is not None

    def read() -> bool:
        assert proc.poll() is None, f"signd died:\n{daemon.logs()[-3000:]}"
        return not any(unread_by_peer(c.sock) for c in conns)

    wait_until(read, "signd to read every request sent", WAIT)


class Conn:
    """A raw connection and every answer it has received, by request id."""

    def __init__(self, daemon: Daemon, name: str) -> None:
        self.name = name
        self.sock = daemon.connect_raw()
        self.decoder = FrameDecoder()
        self.answers: dict[int, Response] = {}
        self.sent = 0

    def send(self, data: bytes, count: int) -> None:
        self.sock.sendall(data)
        self.sent += count

    @property
    def outstanding(self) -> int:
        return self.sent - len(self.answers)

    def take(self, data: bytes) -> None:
        assert data, f"{self.name}: signd closed the connection"
        self.decoder.receive_data(data)
        for body in self.decoder.frames():
            resp = decode_response(body)
            assert resp.id is not None, f"{self.name}: answer without an id: {resp}"
            assert resp.id not in self.answers, f"{self.name}: request {resp.id} answered twice"
            self.answers[resp.id] = resp

    def drain(self) -> int:
        """Read every answer already here, without blocking; how many there are now."""
        while select.select([self.sock], [], [], 0)[0]:
            self.take(self.sock.recv(1 << 20))
        return len(self.answers)

    def close(self) -> None:
        self.sock.close()


def read_until(conns: list[Conn], done: Callable[[], bool]) -> None:
    """Read every connection as its answers come, until ``done()``; then drain them all.

    Reading all of them all the time matters: answers a connection has not
    read pile up in the kernel and then in the daemon, where they cannot be
    counted.  So the counts taken afterwards include every answer the daemon
    had sent by then, plus at most what arrived while the test looked.
    """
    deadline = time.monotonic() + WAIT
    socks = {c.sock: c for c in conns}
    while not done():
        left = deadline - time.monotonic()
        readable, _, _ = select.select(list(socks), [], [], max(left, 0))
        assert readable, f"answers stopped coming; still waiting after {WAIT} s"
        for sock in readable:
            socks[sock].take(sock.recv(1 << 20))
    for c in conns:
        c.drain()


def read_all(conns: list[Conn]) -> None:
    read_until(conns, lambda: all(c.outstanding == 0 for c in conns))


def check_signatures(
    conn: Conn, pub: ec.EllipticCurvePublicKey, tag: str, ids: range, every: int = 1
) -> None:
    """Each of ``ids`` answered exactly once with a signature; verify every ``every``-th."""
    assert sorted(conn.answers) == list(ids), f"{conn.name}: answers do not match the requests"
    for i in ids:
        resp = conn.answers[i]
        assert resp.error is None, f"{conn.name}: request {i} failed: {resp.error!r}"
        assert resp.result is not None
        if i % every == 0:
            sig = SignResult.from_wire(resp.result, strict=False).signature
            pub.verify(sig, digest(tag, i), ECDSA_PREHASHED)  # raises InvalidSignature


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon(CONFIG)


@pytest.fixture
def key(daemon: Daemon, key_name: str) -> tuple[str, Any]:
    with daemon.client() as c:
        c.create_key(key_name, "ec-p256")
        pem = c.public_key(key_name).public_key_pem
        c.sign(key_name, digest=digest("warm-up", 0), hash="sha256")
    return key_name, serialization.load_pem_public_key(pem.encode())


def test_one_request_is_not_stuck_behind_a_flood(daemon: Daemon, key: tuple[str, Any]) -> None:
    name, pub = key
    flood_ids = range(3000)
    a = Conn(daemon, "flooder")
    b = Conn(daemon, "victim")
    try:
        with token_paused(daemon):
            a.send(sign_frames(name, "flood", flood_ids), len(flood_ids))
            wait_until_read(daemon, [a])  # all of the flood is queued
            b.send(sign_frames(name, "victim", range(1)), 1)
            wait_until_read(daemon, [b])  # and the victim's request after it
            assert a.drain() == 0, "answers came while the token was stopped"

        read_until([a, b], lambda: b.outstanding == 0)
        flood_first = len(a.answers)  # at most what the daemon sent before b's answer
        # Round-robin: b's request rides in one of the next few batches (a few
        # hundred signatures); FIFO would answer all 3,000 of the flood first.
        assert flood_first < 1500, (
            f"{flood_first} of {len(flood_ids)} flood answers came before the one other request"
        )

        read_all([a, b])
        check_signatures(b, pub, "victim", range(1))
        check_signatures(a, pub, "flood", flood_ids)
        assert a.drain() == len(flood_ids), "more answers than requests"
    finally:
        a.close()
        b.close()
    with daemon.client() as c:
        assert c.health().ready


def test_four_flooders_do_not_stall_a_sequential_client(
    daemon: Daemon, key: tuple[str, Any]
) -> None:
    name, pub = key
    per_flooder = 4000
    flood_ids = range(per_flooder)
    flooders = [Conn(daemon, f"flooder {n}") for n in range(4)]
    victim = Conn(daemon, "victim")
    everyone = [victim, *flooders]
    total = per_flooder * len(flooders)

    def flood_answered() -> int:
        return sum(len(f.answers) for f in flooders)

    try:
        with token_paused(daemon):
            for n, f in enumerate(flooders):
                f.send(sign_frames(name, f"flood {n}", flood_ids), per_flooder)
            wait_until_read(daemon, flooders)  # all 16,000 are queued

        for i in range(20):
            before = flood_answered()
            victim.send(sign_frames(name, "victim", range(i, i + 1)), 1)
            read_until(everyone, lambda: victim.outstanding == 0)
            after = flood_answered()  # at most what the daemon sent before the victim's answer
            # Each sequential sign waits for a few batches, not for the flood.
            assert after - before < 2000, (
                f"victim sign {i}: {after - before} flood answers came first"
            )
            assert total - after > total // 4, (
                f"victim sign {i} was answered only when {after} of {total} "
                "flood signatures were done"
            )

        read_all(everyone)
        check_signatures(victim, pub, "victim", range(20))
        for n, f in enumerate(flooders):
            check_signatures(f, pub, f"flood {n}", flood_ids, every=7)
    finally:
        for c in everyone:
            c.close()
    with daemon.client() as c:
        assert c.health().ready
