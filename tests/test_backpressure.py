"""Backpressure: under overload a client is slowed down or told ``busy``; memory stays bounded.

* A client that pipelines requests and never reads its answers is stopped by
  flow control: the daemon stops reading from it once its answers back up
  (``max_output_buffer``) or too many of its requests are in flight
  (``max_inflight_per_connection``), so the socket refuses more bytes and the
  daemon's memory does not grow.  Others are served meanwhile, and nothing the
  client sent is lost: once it reads again, every request is answered.
* When the token queue is full (``token_queue``), a request is answered
  ``busy`` (503, retryable) at once, never queued without bound.
* Past ``max_connections``, a new connection gets one ``busy`` frame and is closed.

Everything runs against a real daemon on a real SoftHSM token; signatures are
checked with ``cryptography``.  Nothing here asserts on time: "the daemon has
stopped reading" is detected as the socket staying unwritable for a while, and
the assertions are on bytes, answers and memory.
"""

from __future__ import annotations

import hashlib
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from signd_client import Client
from signd_client.errors import Busy, ErrorCode
from signd_client.protocol import (
    Empty,
    FrameDecoder,
    Response,
    SignArgs,
    SignResult,
    decode_response,
    encode_request,
)
from support import open_sockets, wait_until, wait_until_released

if TYPE_CHECKING:
    from conftest import Daemon  # the root conftest.py

ECDSA_PREHASHED = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
WAIT = 60.0  # generous limit on any one wait, so a broken daemon fails instead of hanging
MiB = 1 << 20
#: Request ids from here to 2**32 - 1 encode in the same number of bytes, so
#: every sign frame below has the same length.
FIRST_ID = 1 << 16
FLOW_CONTROLLED = "[limits]\nmax_inflight_per_connection = 64\nmax_output_buffer = 65536\n"


def digest(i: int) -> bytes:
    return hashlib.sha256(f"request {i}".encode()).digest()


def sign_frame(key: str, i: int) -> bytes:
    return encode_request(i, "sign", SignArgs(key=key, digest=digest(i), hash="sha256"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


class Answers:
    """The answers read from one raw connection, by request id."""

    def __init__(self, sock: socket.socket, name: str = "connection") -> None:
        self.sock = sock
        self.name = name
        self.decoder = FrameDecoder()
        self.by_id: dict[int, Response] = {}
        self.eof = False

    def take(self, data: bytes) -> None:
        if not data:
            self.eof = True
            return
        self.decoder.receive_data(data)
        for body in self.decoder.frames():
            resp = decode_response(body)
            assert resp.id is not None, f"{self.name}: answer without an id: {resp}"
            assert resp.id not in self.by_id, f"{self.name}: request {resp.id} answered twice"
            self.by_id[resp.id] = resp


def read_all(answers: list[Answers], expected: Callable[[Answers], int]) -> None:
    """Read every connection until each has ``expected(it)`` answers."""
    deadline = time.monotonic() + WAIT
    socks = {a.sock: a for a in answers}
    while any(len(a.by_id) < expected(a) for a in answers):
        left = deadline - time.monotonic()
        readable, _, _ = select.select(list(socks), [], [], max(left, 0))
        assert readable, "answers stopped coming"
        for sock in readable:
            a = socks[sock]
            a.take(sock.recv(MiB))
            assert not a.eof, f"{a.name}: signd closed the connection"


def check_signature(pub: Any, resp: Response, i: int) -> None:
    assert resp.error is None, f"request {i} failed: {resp.error!r}"
    assert resp.result is not None
    pub.verify(
        SignResult.from_wire(resp.result, strict=False).signature, digest(i), ECDSA_PREHASHED
    )


def make_key(daemon: Daemon, name: str) -> Any:
    with daemon.client() as c:
        c.create_key(name, "ec-p256")
        return serialization.load_pem_public_key(c.public_key(name).public_key_pem.encode())


def warm_up(daemon: Daemon, key: str, pub: Any, n: int = 3000) -> None:
    """Pipeline ``n`` signatures and read them all, so the daemon's steady-state
    allocations are made before its memory is measured."""
    s = daemon.connect_raw()
    try:
        ids = range(FIRST_ID, FIRST_ID + n)
        out = b"".join(sign_frame(key, i) for i in ids)
        a = Answers(s, "warm-up")
        deadline = time.monotonic() + WAIT
        while out or len(a.by_id) < n:  # write and read at once: the daemon's limits are low
            assert time.monotonic() < deadline, "answers stopped coming"
            readable, writable, _ = select.select([s], [s] if out else [], [], 1.0)
            if readable:
                a.take(s.recv(MiB))
                assert not a.eof, "signd closed the connection"
            if writable:
                out = out[s.send(out[:65536]) :]
        for i in ids[::100]:
            check_signature(pub, a.by_id[i], i)
    finally:
        s.close()


def flood_until_stuck(sock: socket.socket, key: str, cap: int) -> tuple[int, int]:
    """Send sign requests on non-blocking ``sock`` until the daemon stops reading.

    "Stopped" means the socket stayed unwritable for a second on end.  Stops
    anyway after ``cap`` bytes.  Returns (bytes sent, requests sent completely).
    """
    frame_len = len(sign_frame(key, FIRST_ID))
    sent = 0
    next_id = FIRST_ID
    pending = b""
    stuck_since: float | None = None
    while sent < cap:
        if not pending:
            pending = b"".join(sign_frame(key, i) for i in range(next_id, next_id + 256))
            next_id += 256
        try:
            n = sock.send(pending)
        except BlockingIOError:
            n = 0
        if n:
            sent += n
            pending = pending[n:]
            stuck_since = None
            continue
        now = time.monotonic()
        if stuck_since is None:
            stuck_since = now
        elif now - stuck_since >= 1.0:
            break
        select.select([], [sock], [], 0.1)
    assert len(sign_frame(key, next_id)) == frame_len, "frames are not all the same length"
    return sent, sent // frame_len


@pytest.fixture
def flow_daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon(FLOW_CONTROLLED)


def test_client_that_never_reads_cannot_grow_the_daemon(flow_daemon: Daemon, key_name: str) -> None:
    daemon = flow_daemon
    assert daemon.proc is not None
    baseline = open_sockets(daemon)  # the listener and the token workers'
    pub = make_key(daemon, key_name)
    warm_up(daemon, key_name, pub)
    wait_until_released(daemon, baseline)
    rss_before = rss_kib(daemon.proc.pid)

    a = daemon.connect_raw()
    a.setblocking(False)
    try:
        sent, _ = flood_until_stuck(a, key_name, cap=64 * MiB)
        # Kernel socket buffers both ways, plus the daemon's limits: well under a
        # few MiB.  A daemon that kept reading would have taken all 64 MiB.
        assert sent < 8 * MiB, f"the daemon read {sent} bytes from a client that never reads"

        grown = (rss_kib(daemon.proc.pid) - rss_before) / 1024
        assert grown < 30, f"signd's RSS grew by {grown:.1f} MB for one non-reading client"

        # Another client is served while the first is stuck.
        with Client(daemon.socket, retries=0) as c:
            for i in range(20):
                sig = c.sign(key_name, digest=digest(i), hash="sha256").signature
                pub.verify(sig, digest(i), ECDSA_PREHASHED)
    finally:
        a.close()  # with requests in flight and answers unsent
    wait_until_released(daemon, baseline)
    assert daemon.proc.poll() is None, "signd died"
    with Client(daemon.socket, retries=0) as c:
        assert c.health().ready
        sig = c.sign(key_name, digest=digest(-1), hash="sha256").signature
        pub.verify(sig, digest(-1), ECDSA_PREHASHED)
    grown = (rss_kib(daemon.proc.pid) - rss_before) / 1024
    assert grown < 30, f"signd's RSS grew by {grown:.1f} MB and stayed so"


def test_flow_controlled_client_loses_nothing(flow_daemon: Daemon, key_name: str) -> None:
    """Once the stuck client reads again, every request it sent is answered once."""
    daemon = flow_daemon
    pub = make_key(daemon, key_name)
    a = daemon.connect_raw()
    a.setblocking(False)
    try:
        sent, complete = flood_until_stuck(a, key_name, cap=64 * MiB)
        assert sent < 8 * MiB, f"the daemon read {sent} bytes from a client that never reads"
        # Finish the frame that was cut off, so every request sent is whole.
        frame_len = len(sign_frame(key_name, FIRST_ID))
        cut = sent % frame_len
        tail = sign_frame(key_name, FIRST_ID + complete)[cut:] if cut else b""
        requests = complete + (1 if cut else 0)
        answers = Answers(a, "stuck client")
        deadline = time.monotonic() + WAIT
        while tail or len(answers.by_id) < requests:
            assert time.monotonic() < deadline, "answers stopped coming"
            readable, writable, _ = select.select([a], [a] if tail else [], [], 1.0)
            if readable:
                answers.take(a.recv(MiB))
                assert not answers.eof, "signd closed the connection"
            if writable:
                tail = tail[a.send(tail) :]
    finally:
        a.close()
    ids = range(FIRST_ID, FIRST_ID + requests)
    assert sorted(answers.by_id) == list(ids)
    for i in ids:
        resp = answers.by_id[i]
        if i % 50 == 0 or i == ids[-1]:
            check_signature(pub, resp, i)
        else:
            assert resp.error is None, f"request {i} failed: {resp.error!r}"


def test_full_token_queue_answers_busy(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    daemon = make_daemon("[limits]\ntoken_queue = 64\n")
    assert daemon.proc is not None
    pub = make_key(daemon, key_name)
    per_conn = 2000
    ids = range(FIRST_ID, FIRST_ID + per_conn)
    flood = b"".join(sign_frame(key_name, i) for i in ids)
    socks = [daemon.connect_raw() for _ in range(4)]
    try:
        for s in socks:
            s.sendall(flood)  # one write each; the daemon buffers the answers
        answers = [Answers(s, f"connection {n}") for n, s in enumerate(socks)]
        read_all(answers, lambda _: per_conn)
    finally:
        for s in socks:
            s.close()

    signed = busy = 0
    for a in answers:
        assert sorted(a.by_id) == list(ids), f"{a.name}: not every request answered once"
        for i in ids:
            resp = a.by_id[i]
            if resp.error is None:
                check_signature(pub, resp, i)
                signed += 1
            else:
                assert isinstance(resp.error, Busy), f"{a.name}: request {i}: {resp.error!r}"
                assert resp.error.code == ErrorCode.BUSY == 503
                assert resp.error.retryable
                busy += 1
    assert busy > 0, "8,000 signatures fit a token queue of 64 without a single busy"
    assert signed > 0, "nothing was signed"

    # The queue is empty again: a batch of exactly token_queue fits, so nothing leaked.
    assert daemon.proc.poll() is None, "signd died"
    with Client(daemon.socket, retries=0) as c:
        assert c.health().ready
        digests = [digest(i) for i in range(64)]
        res = c.sign_batch(key_name, digests=digests, hash="sha256")
        for d, item in zip(digests, res.results, strict=True):
            assert item.error is None, item.error
            assert item.signature is not None
            pub.verify(item.signature, d, ECDSA_PREHASHED)


def health_frame(rid: int) -> bytes:
    return encode_request(rid, "health", Empty())


def read_to_eof(sock: socket.socket) -> list[Response]:
    answers = []
    decoder = FrameDecoder()
    while data := sock.recv(MiB):
        decoder.receive_data(data)
        answers += [decode_response(body) for body in decoder.frames()]
    assert decoder.buffered == 0, "the connection ended in the middle of a frame"
    return answers


def round_trip(sock: socket.socket, frame: bytes) -> Response:
    """Send one request; its answer (or the refusal of the connection)."""
    sock.sendall(frame)
    decoder = FrameDecoder()
    while True:
        data = sock.recv(MiB)  # connect_raw's socket times out: no endless wait
        assert data, "signd closed the connection without an answer"
        decoder.receive_data(data)
        bodies = list(decoder.frames())
        if bodies:
            assert len(bodies) == 1, f"{len(bodies)} answers to one request"
            return decode_response(bodies[0])


@pytest.fixture
def four_connections(make_daemon: Callable[..., Daemon]) -> Iterator[tuple[Daemon, list[Any]]]:
    daemon = make_daemon("[limits]\nmax_connections = 4\n")
    socks: list[socket.socket] = []
    yield daemon, socks
    for s in socks:
        s.close()


def test_connection_past_max_connections_gets_busy(
    four_connections: tuple[Daemon, list[socket.socket]], key_name: str
) -> None:
    daemon, socks = four_connections
    assert daemon.proc is not None
    baseline = open_sockets(daemon)  # the listener and the token workers'
    # The key is made before the four are open: a Client is a connection too.
    pub = make_key(daemon, key_name)
    wait_until_released(daemon, baseline)

    for n in range(4):
        s = daemon.connect_raw()
        socks.append(s)
        resp = round_trip(s, health_frame(n))  # answered: the daemon is serving it
        assert resp.error is None, resp.error

    fifth = daemon.connect_raw()
    try:
        answers = read_to_eof(fifth)  # one error frame, then the daemon closes
    finally:
        fifth.close()
    assert len(answers) == 1, answers
    (refusal,) = answers
    assert refusal.id is None
    assert isinstance(refusal.error, Busy), refusal
    assert refusal.error.code == ErrorCode.BUSY == 503

    # The first four are still served.
    for n, s in enumerate(socks):
        resp = round_trip(s, sign_frame(key_name, FIRST_ID + n))
        check_signature(pub, resp, FIRST_ID + n)

    # Once one of them leaves, a new connection is served again.
    socks.pop().close()

    def served() -> bool:
        s = daemon.connect_raw()
        resp = round_trip(s, health_frame(99))
        if resp.error is None:
            socks.append(s)
            return True
        s.close()  # the daemon has not seen the close yet: refused again
        assert isinstance(resp.error, Busy), resp.error
        return False

    wait_until(served, "a freed connection slot to be reused", WAIT)
    assert daemon.proc.poll() is None, "signd died"
