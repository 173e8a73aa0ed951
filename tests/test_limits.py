"""Every [limits] setting, hit on a real daemon: what the client sees, and the metric.

Each limit that stops something answers with a clear error or closes the
connection, and counts one in ``signd_limit_hits_total{limit=...}``:

=====================  ===========================================  ===============
limit                  what the client sees                         counted
=====================  ===========================================  ===============
``max_connections``    one ``busy`` frame (id nil), then EOF        per refusal
``max_inflight``       nothing: reading pauses, all is answered     per pause
``max_output_buffer``  nothing: reading pauses, all is answered     per pause
``max_frame``          ``frame_too_large`` (id nil), then EOF       per frame
``request_timeout``    ``deadline_exceeded`` (a batch: per item)    per request
``token_queue``        ``busy``                                     per request
``idle_timeout``       EOF on a connection with nothing in flight   per close
=====================  ===========================================  ===============

And the client library survives the idle close: a pooled connection the
daemon closed is replaced before use, and a request that crosses the close is
sent again even when it is not idempotent, because the daemon provably never
read it.  Nothing here asserts on time: waits are for events (an EOF, an
answer, a counter), each bounded.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import select
import signal
import socket
import struct
import termios
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from prometheus_client.parser import text_string_to_metric_families

from signd_client import AsyncClient, Client
from signd_client import _async as async_client
from signd_client import _sync as sync_client
from signd_client._common import Unsent
from signd_client.errors import (
    Busy,
    ConnectionFailed,
    DeadlineExceeded,
    ErrorCode,
    FrameTooLarge,
    SigndError,
)
from signd_client.protocol import (
    HEADER,
    Empty,
    FrameDecoder,
    PublicKeyArgs,
    Response,
    SignArgs,
    SignResult,
    decode_response,
    encode_request,
)
from support import kill_tree, wait_for, wait_until

if TYPE_CHECKING:
    from conftest import Daemon

WAIT = 30.0  # any one wait; a broken daemon fails instead of hanging
MiB = 1 << 20
#: ids from here encode in the same number of bytes, so equal requests have equal frames
FIRST_ID = 1 << 16
LIMITS = (
    "max_connections",
    "max_connections_per_uid",
    "max_buffered_bytes",
    "max_buffered_bytes_per_uid",
    "max_inflight",
    "max_frame",
    "idle_timeout",
    "request_timeout",
    "max_output_buffer",
    "token_queue",
)
PREHASHED = ec.ECDSA(utils.Prehashed(hashes.SHA256()))


# ---------------------------------------------------------------- helpers


def limit_hits(d: Daemon) -> dict[str, float]:
    """``signd_limit_hits_total`` by limit, scraped from the daemon's /metrics."""
    with urllib.request.urlopen(d.metrics_url(), timeout=10) as r:  # loopback
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "signd_limit_hits_total":
                out[s.labels["limit"]] = s.value
    assert set(out) == set(LIMITS), out
    return out


def only_hit(d: Daemon, limit: str) -> float:
    """The count of ``limit``, after checking no other limit moved."""
    hits = limit_hits(d)
    others = {k: v for k, v in hits.items() if k != limit and v}
    assert others == {}, f"other limits counted too: {others}"
    return hits[limit]


def wait_for_hits(d: Daemon, limit: str, at_least: float = 1) -> float:
    def counted() -> float | None:
        n = limit_hits(d)[limit]
        return n if n >= at_least else None

    try:
        return wait_for(counted, f"{limit} to be counted {at_least} times", WAIT)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{d.logs()[-3000:]}") from None


def digest(i: int) -> bytes:
    return hashlib.sha256(b"limits %d" % i).digest()


def sign_frame(key: str, i: int) -> bytes:
    return encode_request(i, "sign", SignArgs(key=key, digest=digest(i), hash="sha256"))


def make_key(d: Daemon, name: str) -> ec.EllipticCurvePublicKey:
    with d.client() as c:
        c.create_key(name, "ec-p256")
        pem = c.public_key(name).public_key_pem
    pub = serialization.load_pem_public_key(pem.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    return pub


@contextmanager
def raw(d: Daemon) -> Iterator[socket.socket]:
    s = d.connect_raw()
    try:
        yield s
    finally:
        s.close()


def round_trip(sock: socket.socket, frame: bytes) -> Response:
    sock.sendall(frame)
    decoder = FrameDecoder()
    while True:
        data = sock.recv(MiB)  # connect_raw's socket times out: no endless wait
        assert data, "signd closed the connection without an answer"
        decoder.receive_data(data)
        bodies = list(decoder.frames())
        if bodies:
            assert len(bodies) == 1, bodies
            return decode_response(bodies[0])


def health(sock: socket.socket, rid: int = 1) -> None:
    resp = round_trip(sock, encode_request(rid, "health", Empty()))
    assert resp.error is None, resp.error


def read_to_eof(sock: socket.socket) -> list[Response]:
    """Every frame until the daemon closes; fails if it does not within ``WAIT``."""
    sock.settimeout(WAIT)
    decoder = FrameDecoder()
    out = []
    while data := sock.recv(MiB):
        decoder.receive_data(data)
        out += [decode_response(b) for b in decoder.frames()]
    assert decoder.buffered == 0, "the connection ended in the middle of a frame"
    return out


def pending(sock: socket.socket) -> bool:
    """True if something (bytes, an EOF) waits to be read, without waiting."""
    return bool(select.select([sock], [], [], 0)[0])


def exchange(sock: socket.socket, out: bytes, count: int) -> dict[int, Response]:
    """Send ``out`` and read at once (the daemon's limits are low) until
    ``count`` answers have come; they are returned by id."""
    sock.setblocking(False)
    decoder = FrameDecoder()
    answers: dict[int, Response] = {}
    deadline = time.monotonic() + WAIT
    while out or len(answers) < count:
        assert time.monotonic() < deadline, f"{len(answers)} of {count} answers came"
        readable, writable, _ = select.select([sock], [sock] if out else [], [], 1.0)
        if readable:
            data = sock.recv(MiB)
            assert data, "signd closed the connection"
            decoder.receive_data(data)
            for body in decoder.frames():
                resp = decode_response(body)
                assert resp.id is not None, resp
                assert resp.id not in answers, f"request {resp.id} answered twice"
                answers[resp.id] = resp
        if writable:
            out = out[sock.send(out[:65536]) :]
    return answers


def send_until_stuck(sock: socket.socket, out: bytes) -> int:
    """Send ``out`` without reading until it is all sent or the socket stays
    unwritable for a second (the daemon stopped reading); the bytes sent."""
    sock.setblocking(False)
    sent = 0
    stuck_since: float | None = None
    while sent < len(out):
        try:
            n = sock.send(out[sent : sent + 65536])
        except BlockingIOError:
            n = 0
        if n:
            sent += n
            stuck_since = None
            continue
        now = time.monotonic()
        if stuck_since is None:
            stuck_since = now
        elif now - stuck_since >= 1.0:
            break
        select.select([], [sock], [], 0.1)
    return sent


# ---------------------------------------------------------------- each limit


def test_max_connections(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("[limits]\nmax_connections = 2\n")
    assert only_hit(d, "max_connections") == 0
    with raw(d) as a, raw(d) as b:
        health(a)
        health(b)  # both served: the slots are taken
        with raw(d) as third:
            answers = read_to_eof(third)
        assert len(answers) == 1, answers
        assert answers[0].id is None
        assert isinstance(answers[0].error, Busy)
        assert answers[0].error.code == ErrorCode.BUSY
        health(a)  # the first two are still served
    assert only_hit(d, "max_connections") == 1
    assert d.stop() == 0


def test_max_inflight(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    d = make_daemon("[limits]\nmax_inflight_per_connection = 4\n")
    pub = make_key(d, key_name)
    ids = range(FIRST_ID, FIRST_ID + 2000)
    with raw(d) as s:
        # One read brings hundreds of these: far past 4 in flight, so reading pauses.
        answers = exchange(s, b"".join(sign_frame(key_name, i) for i in ids), len(ids))
    assert sorted(answers) == list(ids), "not every request answered once"
    for i in ids:
        assert answers[i].error is None, answers[i].error
    for i in ids[::200]:
        result = answers[i].result
        assert result is not None
        pub.verify(SignResult.from_wire(result, strict=False).signature, digest(i), PREHASHED)
    assert only_hit(d, "max_inflight") >= 1
    assert d.stop() == 0


def test_max_output_buffer(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    d = make_daemon("[limits]\nmax_output_buffer = 65536\n")
    make_key(d, key_name)
    n = 20000  # ~5 MB of answers: past the kernel's socket buffers and the 64 KiB
    frames = [encode_request(i, "public_key", PublicKeyArgs(key=key_name)) for i in range(n)]
    out = b"".join(frames)
    with raw(d) as s:
        sent = send_until_stuck(s, out)  # never reading
        assert sent < len(out), "the daemon kept reading from a client that never reads"
        assert wait_for_hits(d, "max_output_buffer") >= 1
        answers = exchange(s, out[sent:], n)  # reading again: everything is answered
    assert sorted(answers) == list(range(n))
    assert all(a.error is None for a in answers.values())
    assert only_hit(d, "max_output_buffer") >= 1
    assert d.stop() == 0


def test_max_frame(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("[limits]\nmax_frame = 1024\n")
    with raw(d) as s:
        health(s)
        s.sendall(HEADER.pack(1025) + b"\x80" * 1025)
        answers = read_to_eof(s)
    assert len(answers) == 1, answers
    assert answers[0].id is None
    assert isinstance(answers[0].error, FrameTooLarge)
    assert answers[0].error.code == ErrorCode.FRAME_TOO_LARGE
    assert only_hit(d, "max_frame") == 1
    assert d.stop() == 0


def test_request_timeout(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    # 10,000 signatures cannot all leave the token queue within 10 ms.
    d = make_daemon("[limits]\nrequest_timeout = 0.01\n")
    pub = make_key(d, key_name)
    digests = [digest(i) for i in range(10000)]
    with d.client(retries=0) as c:
        res = c.sign_batch(key_name, digests=digests, hash="sha256")
    late = 0
    for i, item in enumerate(res.results):
        if item.error is not None:
            assert (item.error.code, item.error.name) == (505, "deadline_exceeded"), item.error
            late += 1
        else:
            assert item.signature is not None
            if i % 100 == 0:
                pub.verify(item.signature, digests[i], PREHASHED)
    assert late > 0, "no item waited past 10 ms"
    assert only_hit(d, "request_timeout") == 1  # one request, however many items
    assert d.stop() == 0


def test_request_timeout_of_a_sign(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    """Single signs behind a long queue: those queued past the deadline get
    ``deadline_exceeded``; once the token's speed is measured, those the queue
    ahead could not finish in time are refused at once with ``busy``.  Each
    such answer counts once."""
    d = make_daemon("[limits]\nrequest_timeout = 0.01\n")
    make_key(d, key_name)
    ids = range(FIRST_ID, FIRST_ID + 3000)
    with raw(d) as s:
        answers = exchange(s, b"".join(sign_frame(key_name, i) for i in ids), len(ids))
    late = [a for a in answers.values() if a.error is not None]
    assert late, "no sign waited past 10 ms"
    for a in late:
        assert isinstance(a.error, DeadlineExceeded | Busy), a.error
        assert a.error.retryable
    hits = limit_hits(d)
    assert hits["request_timeout"] + hits["token_queue"] == len(late)
    assert hits["request_timeout"] == sum(isinstance(a.error, DeadlineExceeded) for a in late)
    assert d.stop() == 0


def test_token_queue(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    d = make_daemon("[limits]\ntoken_queue = 64\n")
    make_key(d, key_name)
    ids = range(FIRST_ID, FIRST_ID + 2000)
    with raw(d) as s:
        answers = exchange(s, b"".join(sign_frame(key_name, i) for i in ids), len(ids))
    busy = [a for a in answers.values() if a.error is not None]
    assert busy, "2,000 signatures fit a token queue of 64"
    for a in busy:
        assert isinstance(a.error, Busy), a.error
    hits = limit_hits(d)
    assert hits["token_queue"] == len(busy)
    assert d.stop() == 0


# ---------------------------------------------------------------- idle_timeout


def test_idle_connection_is_closed(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon('[limits]\nidle_timeout = 0.3\n\n[log]\nlevel = "debug"\n')
    with raw(d) as used, raw(d) as silent:
        health(used)
        assert read_to_eof(used) == []  # closed, with no frame
        assert read_to_eof(silent) == []  # one that never sent a byte too
    assert only_hit(d, "idle_timeout") == 2
    closes = d.log_records("idle connection closed")
    assert len(closes) == 2, closes
    assert all(r["level"] == "debug" and isinstance(r["pid"], int) for r in closes), closes
    # Served as usual afterwards.
    with d.client(retries=0) as c:
        assert c.health().ready
    assert d.stop() == 0


def test_sighup_changes_idle_timeout_of_open_connections(
    make_daemon: Callable[..., Daemon],
) -> None:
    d = make_daemon("[limits]\nidle_timeout = 3600\n")
    with raw(d) as s:
        health(s)
        assert not pending(s)
        d.reload("[limits]\nidle_timeout = 0.2\n")
        assert read_to_eof(s) == []  # the connection opened before the reload
    assert only_hit(d, "idle_timeout") == 1
    # And 0 turns it off again (nothing to wait for here: the setting is read back).
    d.reload("[limits]\nidle_timeout = 0\n")
    with raw(d) as s:
        health(s)
    assert d.stop() == 0


def test_idle_timeout_is_checked(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("[limits]\nidle_timeout = -1\n", start=False)
    out = d.check_config()
    assert out.returncode == 2, out.stderr
    assert "limits.idle_timeout: must be between 0 and 86400, got -1.0" in out.stderr


# ---------------------------------------------------------------- the client library


def wait_idle_closed(d: Daemon, count: int) -> None:
    wait_for_hits(d, "idle_timeout", count)


def versions(d: Daemon, key: str) -> list[int]:
    with d.client(retries=0) as c:
        return [v.version for v in c.key_info(key).versions]


IDLE = "[limits]\nidle_timeout = 0.2\n"


@pytest.fixture
def failed(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """What the clients' connections raised, request by request (a spy: the
    requests still go to the real daemon).  Threads that were already running
    in this process (one another test left behind) are not this test's clients."""
    seen: list[BaseException] = []
    foreign = {t.ident for t in threading.enumerate()} - {threading.get_ident()}
    sync_request = sync_client._Connection.request
    async_request = async_client._AsyncConnection.request

    def spy(self: sync_client._Connection, call: Any, deadline: float) -> Response:
        try:
            return sync_request(self, call, deadline)
        except BaseException as exc:
            if threading.get_ident() not in foreign:
                seen.append(exc)
            raise

    async def async_spy(
        self: async_client._AsyncConnection, call: Any, deadline: float
    ) -> Response:
        try:
            return await async_request(self, call, deadline)
        except BaseException as exc:
            if threading.get_ident() not in foreign:
                seen.append(exc)
            raise

    monkeypatch.setattr(sync_client._Connection, "request", spy)
    monkeypatch.setattr(async_client._AsyncConnection, "request", async_spy)
    return seen


def no_check_before_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The race, made certain: without its check before reuse, the client
    meets the daemon's close mid-request, as it would if the close came just
    after the check."""
    for stream in (sync_client._Connection, async_client._TrioStream, async_client._AsyncioStream):
        monkeypatch.setattr(stream, "alive", lambda self: True)


def test_client_reconnects_after_an_idle_close(
    make_daemon: Callable[..., Daemon], key_name: str, failed: list[BaseException]
) -> None:
    d = make_daemon(IDLE)
    with Client(d.socket, retries=0, pool_size=1) as c:
        c.create_key(key_name, "ec-p256")
        wait_idle_closed(d, 1)  # the pooled connection is gone
        assert c.rotate(key_name).versions[-1].version == 2
        wait_idle_closed(d, 2)
        c.create_key(key_name + "-2", "ec-p256")
    assert failed == []  # the closed connection was never used: replaced before
    assert versions(d, key_name) == [1, 2]  # rotated exactly once
    assert versions(d, key_name + "-2") == [1]
    assert d.stop() == 0


def test_client_resends_a_request_that_crossed_the_idle_close(
    make_daemon: Callable[..., Daemon],
    key_name: str,
    failed: list[BaseException],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pooled connection looked open, the daemon closed it as the request
    went out.  The daemon never read it, and the client knows (EPIPE, or
    ECONNRESET before any answer): it sends it again, once, even with
    retries=0 and for a call that is not idempotent."""
    d = make_daemon(IDLE)
    no_check_before_reuse(monkeypatch)
    with Client(d.socket, retries=0, pool_size=1) as c:
        c.create_key(key_name, "ec-p256")
        wait_idle_closed(d, 1)
        assert c.rotate(key_name).versions[-1].version == 2
        wait_idle_closed(d, 2)
        c.create_key(key_name + "-2", "ec-p256")
    assert [type(e) for e in failed] == [Unsent, Unsent]
    assert versions(d, key_name) == [1, 2]
    assert versions(d, key_name + "-2") == [1]
    assert d.stop() == 0


@pytest.mark.parametrize("race", [False, True], ids=["checked", "race"])
async def test_async_client_on_trio_survives_the_idle_close(
    make_daemon: Callable[..., Daemon],
    key_name: str,
    failed: list[BaseException],
    monkeypatch: pytest.MonkeyPatch,
    race: bool,
) -> None:
    d = make_daemon(IDLE)
    if race:
        no_check_before_reuse(monkeypatch)
    async with AsyncClient(d.socket, retries=0, pool_size=1) as c:
        await c.create_key(key_name, "ec-p256")
        await trio.to_thread.run_sync(wait_idle_closed, d, 1)
        assert (await c.rotate(key_name)).versions[-1].version == 2
    assert [type(e) for e in failed] == ([Unsent] if race else [])
    assert versions(d, key_name) == [1, 2]
    assert d.stop() == 0


@pytest.mark.parametrize("race", [False, True], ids=["checked", "race"])
def test_async_client_on_asyncio_survives_the_idle_close(
    make_daemon: Callable[..., Daemon],
    key_name: str,
    failed: list[BaseException],
    monkeypatch: pytest.MonkeyPatch,
    race: bool,
) -> None:
    d = make_daemon(IDLE)
    if race:
        no_check_before_reuse(monkeypatch)

    async def main() -> None:
        async with AsyncClient(d.socket, retries=0, pool_size=1) as c:
            await c.create_key(key_name, "ec-p256")
            await asyncio.to_thread(wait_idle_closed, d, 1)
            assert (await c.rotate(key_name)).versions[-1].version == 2

    asyncio.run(main())
    assert [type(e) for e in failed] == ([Unsent] if race else [])
    assert versions(d, key_name) == [1, 2]
    assert d.stop() == 0


def test_the_kernel_tells_an_unread_request_from_a_read_one() -> None:
    """What ``Unsent`` rests on: a Unix stream socket closed with bytes unread
    resets its peer; closed after reading them, it ends the stream."""
    for read_first in (False, True):
        client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with client, server:
            client.sendall(b"a request")
            if read_first:
                assert server.recv(100) == b"a request"
            server.close()
            if read_first:
                assert client.recv(100) == b""  # may have been carried out
            else:
                with pytest.raises(ConnectionResetError):  # was not
                    client.recv(100)


def unread_bytes(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that its peer has not read yet (SIOCOUTQ)."""
    out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    return int(struct.unpack("i", out)[0])


def test_client_knows_a_request_the_daemon_never_read(
    make_daemon: Callable[..., Daemon], key_name: str, failed: list[BaseException]
) -> None:
    """The daemon goes away with the request unread in its socket (stopped,
    then killed, as in the instant of an idle close): the client sees a
    reset, not an end of stream, so it knows the rotate was not carried out
    (``Unsent``) and sends it again, on a new connection (here to no daemon)."""
    d = make_daemon()
    assert d.proc is not None
    outcome: list[BaseException] = []
    with Client(d.socket, retries=0, pool_size=1) as c:
        c.create_key(key_name, "ec-p256")
        (pooled,) = c._idle
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:

            def rotate() -> None:
                try:
                    c.rotate(key_name)
                except SigndError as exc:
                    outcome.append(exc)

            t = threading.Thread(target=rotate)
            t.start()
            # The request waits in the daemon's socket.
            wait_until(lambda: unread_bytes(pooled.sock) > 0, "the request to be sent", WAIT)
        finally:
            kill_tree(d)
        t.join(WAIT)
        assert not t.is_alive()
    # The resend found no daemon: refused, or (made while the dying daemon's
    # listening socket was still open) reset unread in its backlog.
    assert len(outcome) == 1
    assert isinstance(outcome[0], ConnectionFailed)
    assert failed
    assert all(type(e) is Unsent for e in failed), failed
    d.start()
    assert versions(d, key_name) == [1]  # never rotated
    assert d.stop() == 0
