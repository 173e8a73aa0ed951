"""A slow token saturated: clean deadline errors, and no pile-up.

The token is real and really slow: SoftHSM exported by ``p11-kit server``,
reached by the daemon's ``p11-kit-client.so`` through a relay in this test
that holds every chunk the server sends for ``LATENCY`` seconds.  A signature
is three PKCS#11 calls (``C_SignInit``, then ``C_Sign`` twice: python-pkcs11
asks for the length first), so it costs at least 3 x ``LATENCY``: a device
of some 25 signatures a second, like a serial HSM.
The daemon has one worker with small batches, and a short ``request_timeout``.

Several connections pipeline far more ``sign`` requests than the token can
sign within ``request_timeout``, while another connection asks ``health``.
What must hold:

* every request is answered, by a signature that verifies, or by a retryable
  ``deadline_exceeded`` or ``busy``; nothing else, and nothing hangs;
* both kinds of answer occur (the saturation was real);
* no pile-up: once the load stops, the token queue is empty, and the token
  made no more signatures than were answered, bar what a worker had in hand
  (``batch`` x ``depth``): expired requests were dropped, not signed later;
* ``health`` answered, ready, throughout;
* afterwards a request succeeds: the daemon recovered by itself.

The latencies are measured and printed (run with ``-s``), never asserted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import select
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from signd_bench._relay import SlowRelay  # the benchmark's slow link, the same one
from signd_client.errors import Busy, DeadlineExceeded, WireError
from signd_client.protocol import (
    FrameDecoder,
    SignArgs,
    SignResult,
    decode_response,
    encode_request,
)
from support import wait_until

if TYPE_CHECKING:
    from conftest import Daemon, P11KitServer

#: Added to every chunk from the p11-kit server: a signature takes >= 2x this.
LATENCY = 0.0125
REQUEST_TIMEOUT = 1.0
BATCH = 4
DEPTH = 2
# conftest's write_config puts token_extra into [token].
TOKEN = f"workers = 1\nbatch = {BATCH}\ndepth = {DEPTH}"
LIMITS = f"[limits]\nrequest_timeout = {REQUEST_TIMEOUT}\n"
CONNECTIONS = 4
#: Requests one connection keeps unanswered at most (4 x 40 = 160 in all,
#: some four seconds of this token's work against a one-second deadline).
WINDOW = 40
#: A connection sends at most one request this often (1,000/s offered in all),
#: so a daemon that refuses at once is not flooded by a busy loop.
PACE = 0.004
LOAD_SECONDS = 3.0
MIN_REQUESTS = 300
#: Longer than this without an answer to a request in flight is a hang.
HANG = 10.0
WAIT = 30.0
ECDSA_PREHASHED = ec.ECDSA(utils.Prehashed(hashes.SHA256()))


def digest(conn: int, i: int) -> bytes:
    return hashlib.sha256(f"slow {conn} {i}".encode()).digest()


@pytest.fixture
def relay(p11kit: P11KitServer, tmp_path: Path) -> Iterator[SlowRelay]:
    r = SlowRelay(p11kit.path, tmp_path / "slow.sock", LATENCY)
    yield r
    r.close()


@dataclasses.dataclass
class Answer:
    conn: int
    id: int
    latency: float
    error: WireError | None = None
    signature: bytes = b""


class Connection(threading.Thread):
    """One raw connection pipelining ``sign`` requests: at most ``WINDOW``
    unanswered and one per ``PACE``, until ``stop`` is set and at least
    ``quota`` were sent; then it reads every answer still owed."""

    def __init__(self, d: Daemon, index: int, key: str, stop: threading.Event, quota: int):
        super().__init__(name=f"load-{index}")
        self.d, self.index, self.key, self.stop, self.quota = d, index, key, stop, quota
        self.answers: list[Answer] = []
        self.sent: dict[int, float] = {}
        self.failure: str | None = None

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # reported by the test, not lost in a thread
            self.failure = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        decoder = FrameDecoder()
        n = 0
        next_send = time.monotonic()
        last_answer = time.monotonic()
        with contextlib.closing(self.d.connect_raw()) as sock:
            while True:
                now = time.monotonic()
                sending = not self.stop.is_set() or n < self.quota
                outstanding = len(self.sent)
                if not sending and outstanding == 0:
                    return
                if sending and outstanding < WINDOW and now >= next_send:
                    args = SignArgs(key=self.key, digest=digest(self.index, n), hash="sha256")
                    self.sent[n] = now
                    sock.sendall(encode_request(n, "sign", args))
                    n += 1
                    next_send = max(next_send + PACE, now)
                    continue
                if outstanding and now - last_answer > HANG:
                    self.failure = f"no answer for {HANG} s with {outstanding} requests in flight"
                    return
                wait = 0.05 if not sending or outstanding >= WINDOW else next_send - now
                if not select.select([sock], [], [], max(wait, 0.0))[0]:
                    continue
                data = sock.recv(1 << 20)
                if not data:
                    self.failure = f"signd closed the connection with {outstanding} in flight"
                    return
                last_answer = now = time.monotonic()
                decoder.receive_data(data)
                for body in decoder.frames():
                    resp = decode_response(body)
                    assert resp.id is not None, resp
                    assert resp.id in self.sent, resp
                    a = Answer(self.index, resp.id, now - self.sent.pop(resp.id), resp.error)
                    if resp.error is None:
                        assert resp.result is not None
                        a.signature = SignResult.from_wire(resp.result, strict=False).signature
                    self.answers.append(a)


@dataclasses.dataclass
class HealthCheck:
    latency: float
    ready: bool | None  # None: no answer (the error is in ``error``)
    error: str = ""


def ask_health(d: Daemon, stop: threading.Event, out: list[HealthCheck]) -> None:
    """``health`` on its own connection every 0.1 s (at least 3 times) until ``stop``."""
    with d.client(retries=0, timeout=HANG) as c:
        while not stop.is_set() or len(out) < 3:
            t = time.monotonic()
            try:
                out.append(HealthCheck(time.monotonic() - t, c.health().ready))
            except Exception as exc:
                out.append(HealthCheck(time.monotonic() - t, None, f"{type(exc).__name__}: {exc}"))
            stop.wait(0.1)


def token_made(d: Daemon) -> float:
    """Jobs the token workers have answered (signatures made, here)."""
    return d.gauge("signd_token_batch_size_sum")


def ms(values: list[float]) -> str:
    if not values:
        return "none"
    v = sorted(values)

    def at(q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))] * 1000

    return f"p50 {at(0.5):.1f} ms, p99 {at(0.99):.1f} ms, max {v[-1] * 1000:.1f} ms"


@pytest.mark.slow
def test_saturated_slow_token_gives_clean_deadlines_and_no_pile_up(
    make_daemon: Callable[..., Daemon], p11kit: P11KitServer, relay: SlowRelay, key_name: str
) -> None:
    d = make_daemon(
        LIMITS,
        start=False,
        env_extra={"P11_KIT_SERVER_ADDRESS": relay.address},
        token_extra=TOKEN,
    )
    d.token = dataclasses.replace(p11kit.token, module=p11kit.client_module)
    d.start()
    with d.client(timeout=WAIT) as c:
        c.create_key(key_name, "ec-p256")
        pem = c.public_key(key_name).public_key_pem
        c.sign(key_name, b"warm-up")
    pub = serialization.load_pem_public_key(pem.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    made_before = token_made(d)

    stop = threading.Event()
    health: list[HealthCheck] = []
    health_thread = threading.Thread(target=ask_health, args=(d, stop, health))
    conns = [
        Connection(d, i, key_name, stop, -(-MIN_REQUESTS // CONNECTIONS))
        for i in range(CONNECTIONS)
    ]
    started = time.monotonic()
    health_thread.start()
    for t in conns:
        t.start()
    stop.wait(LOAD_SECONDS)
    stop.set()
    for t in conns:
        t.join(WAIT + HANG)
    health_thread.join(WAIT)
    load_time = time.monotonic() - started
    assert not any(t.is_alive() for t in conns), "a load connection hung"
    assert not health_thread.is_alive(), "a health call hung"

    # Every request answered: a signature, or a clean retryable refusal.
    assert [t.failure for t in conns if t.failure] == []
    answers = [a for t in conns for a in t.answers]
    assert len(answers) >= MIN_REQUESTS
    ok = [a for a in answers if a.error is None]
    refused = [a for a in answers if a.error is not None]
    unexpected = [a.error for a in refused if not isinstance(a.error, DeadlineExceeded | Busy)]
    assert unexpected == [], unexpected[:5]
    assert all(a.error.retryable for a in refused if a.error is not None)
    for a in ok:
        pub.verify(a.signature, digest(a.conn, a.id), ECDSA_PREHASHED)
    # The saturation was real: the token signed, and the rest was refused.
    assert ok, "no request succeeded"
    assert refused, "no request was refused: the token was not saturated"

    # No pile-up: the queue empties, and nothing expired was signed later.
    wait_until(lambda: d.gauge("signd_token_queue_depth") == 0, "the token queue to empty")
    made = token_made(d) - made_before
    assert len(ok) <= made <= len(ok) + BATCH * DEPTH, (made, len(ok))

    # Health answered throughout, ready: the daemon was busy, not broken.
    assert [h.error for h in health if h.error] == []
    assert all(h.ready for h in health), [h.ready for h in health]

    # And it serves again by itself.
    with d.client(retries=0, timeout=HANG) as c:
        sig = c.sign(key_name, digest=digest(-1, 0), hash="sha256").signature
    pub.verify(sig, digest(-1, 0), ECDSA_PREHASHED)
    assert d.stop() == 0

    deadline = [a for a in refused if isinstance(a.error, DeadlineExceeded)]
    print(
        f"\n[slow token: {LATENCY * 1000:.1f} ms a round trip, workers 1, batch {BATCH}, "
        f"depth {DEPTH}, request_timeout {REQUEST_TIMEOUT} s]\n"
        f"  {len(answers)} requests on {CONNECTIONS} connections in {load_time:.1f} s "
        f"(at most {CONNECTIONS * WINDOW} in flight): {len(ok)} signed "
        f"({len(ok) / load_time:.0f}/s), {len(deadline)} deadline_exceeded, "
        f"{len(refused) - len(deadline)} busy; token made {made:.0f} signatures\n"
        f"  signed:  {ms([a.latency for a in ok])}\n"
        f"  refused: {ms([a.latency for a in refused])}\n"
        f"  health:  {len(health)} answered, all ready; {ms([h.latency for h in health])}"
    )
