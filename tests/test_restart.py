"""Restarting a socket-activated signd under load fails no retryable request.

systemd keeps a socket unit's listening socket open while the service
restarts: connections made in between wait in its backlog, and the next
process accepts them.  Here ``systemd-socket-activate`` creates the socket and
hands it (fd 3) to ``tests/socket_holder.py``, which plays systemd's part: it
keeps the socket, starts ``signd serve`` as its child with the socket and
``LISTEN_PID`` naming the child, and on ``restart`` sends SIGTERM, waits for
the exit and starts the next process.

The clients are the library's ``Client`` (threads) and ``AsyncClient`` (trio
tasks), with their default retry budget: idempotent calls (sign, sign_batch,
verify, reads) are retried on a new connection when the old one breaks.
Every call must return a result, every signature must verify with
``cryptography``, every stopped process must have drained and exited 0.

Also here: a SIGHUP while signd starts must not end it (it is a reload).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from signd_client import AsyncClient, Client

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv  # the root conftest.py

HOLDER = Path(__file__).resolve().parent / "socket_holder.py"
RESTARTS = 3
SYNC_CLIENTS = 2
THREADS_PER_CLIENT = 3
TRIO_TASKS = 4
#: Calls every worker (thread or task) has answered by each process before it
#: is restarted.
CALLS_PER_PROCESS = 15
#: The client library's defaults: a call that meets a restart is retried on a
#: new connection, which waits in the socket's backlog for the next process.
TIMEOUT = 30.0
RETRIES = 3


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: run the README's test command (Debian package systemd)"
        )
    return path


def log_records(path: Path) -> list[dict[str, Any]]:
    """signd's JSON log lines (systemd-socket-activate's own lines are not JSON)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


@dataclass
class Activated:
    """``systemd-socket-activate -l SOCKET socket_holder.py signd serve ...``."""

    daemon: Daemon
    proc: subprocess.Popen[str]
    reports: queue.Queue[str] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        self.reader = threading.Thread(
            target=self._read_reports, name="holder-reports", daemon=True
        )
        self.reader.start()

    def _read_reports(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.reports.put(line.strip())

    def report(self, what: str, timeout: float = 60.0) -> list[str]:
        """The holder's next report, which must be ``what`` (e.g. started)."""
        try:
            line = self.reports.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"socket_holder reported nothing in {timeout}s:\n{self.logs()}")
        words = line.split()
        assert words, f"an empty report, expected {what}:\n{self.logs()}"
        assert words[0] == what, f"{line!r}, expected {what}:\n{self.logs()}"
        return words[1:]

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def started(self) -> int:
        return int(self.report("started")[0])

    def wait_ready(self, pid: int, timeout: float = 60.0) -> None:
        """Until the signd process ``pid`` logs "ready"."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(
                r.get("msg") == "ready" and r.get("pid") == pid
                for r in log_records(self.daemon.log_path)
            ):
                return
            assert self.proc.poll() is None, f"the holder exited:\n{self.logs()}"
            time.sleep(0.02)
        pytest.fail(f"signd {pid} did not become ready in {timeout}s:\n{self.logs()}")

    def restart(self) -> tuple[int, int]:
        """SIGTERM the running signd, wait for it, start the next: (exit code, new pid)."""
        self.command("restart")
        _, code = self.report("exited")
        return int(code), self.started()

    def stop(self) -> int:
        """Stop signd and the holder; signd's exit code."""
        self.command("stop")
        _, code = self.report("exited")
        assert self.proc.wait(30) == 0, self.logs()
        return int(code)

    def logs(self) -> str:
        return self.daemon.logs()


@pytest.fixture
def activated(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv
) -> Iterator[Callable[[], Activated]]:
    """Start signd the way a socket unit does; the first connection starts it.
    On a token of its own: every restart reads only this test's keys."""
    activate = tool("systemd-socket-activate")
    made: list[Activated] = []

    def start() -> Activated:
        d = make_daemon(start=False, token=own_token)
        d.write_config()
        argv = [
            *(activate, "-l", d.socket, "-E", "SOFTHSM2_CONF"),
            *(sys.executable, str(HOLDER), *d.command()),
        ]
        with open(d.log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=d.env(),
                cwd=d.workdir,
                text=True,
            )
        a = Activated(d, proc)
        made.append(a)
        deadline = time.monotonic() + 20
        while not os.path.exists(d.socket):
            assert proc.poll() is None, d.logs()
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.01)
        return a

    yield start
    for a in made:
        if a.proc.poll() is None:
            a.proc.terminate()  # the holder stops signd first
            try:
                a.proc.wait(30)
            except subprocess.TimeoutExpired:
                a.proc.kill()
                a.proc.wait()
        a.reader.join(10)
        for pipe in (a.proc.stdin, a.proc.stdout):
            if pipe is not None:
                pipe.close()


@dataclass
class Keys:
    ec_name: str
    ec_public: ec.EllipticCurvePublicKey
    ed_name: str
    ed_public: ed25519.Ed25519PublicKey


def create_keys(socket_path: str, prefix: str) -> Keys:
    with Client(socket_path, timeout=60) as c:
        ec_info = c.create_key(f"{prefix}-ec", "ec-p256")
        ed_info = c.create_key(f"{prefix}-ed", "ed25519")
    ec_public = serialization.load_pem_public_key(ec_info.versions[0].public_key_pem.encode())
    ed_public = serialization.load_pem_public_key(ed_info.versions[0].public_key_pem.encode())
    assert isinstance(ec_public, ec.EllipticCurvePublicKey)
    assert isinstance(ed_public, ed25519.Ed25519PublicKey)
    return Keys(ec_info.name, ec_public, ed_info.name, ed_public)


#: One step of an operation: a client method's name and its arguments.
Step = tuple[str, tuple[Any, ...], dict[str, Any]]
#: An operation: yields its calls, is sent each result, checks them.
Op = Callable[[int], Generator[Step, Any, None]]


def operations(keys: Keys, worker: int, uptimes: list[float]) -> list[tuple[str, Op]]:
    """The mixed idempotent load; every signature is verified with ``cryptography``."""
    k = keys

    def msg(i: int) -> bytes:
        return f"restart load {worker} {i} {uuid.uuid4()}".encode()

    def sign_ec(i: int) -> Generator[Step, Any, None]:
        m = msg(i)
        res = yield ("sign", (k.ec_name, m), {})
        k.ec_public.verify(res.signature, m, ec.ECDSA(hashes.SHA256()))

    def sign_ed(i: int) -> Generator[Step, Any, None]:
        m = msg(i)
        res = yield ("sign", (k.ed_name, m), {})
        k.ed_public.verify(res.signature, m)

    def sign_batch(i: int) -> Generator[Step, Any, None]:
        ms = [msg(i) + bytes([j]) for j in range(4)]
        res = yield ("sign_batch", (k.ec_name, ms), {})
        assert len(res.results) == len(ms)
        for m, item in zip(ms, res.results, strict=True):
            assert item.error is None, item
            assert item.signature is not None, item
            k.ec_public.verify(item.signature, m, ec.ECDSA(hashes.SHA256()))

    def verify(i: int) -> Generator[Step, Any, None]:
        m = msg(i)
        sig = (yield ("sign", (k.ed_name, m), {})).signature
        k.ed_public.verify(sig, m)
        assert (yield ("verify", (k.ed_name, sig, m), {})).valid
        assert not (yield ("verify", (k.ed_name, sig, m + b"!"), {})).valid

    def key_info(i: int) -> Generator[Step, Any, None]:
        info = yield ("key_info", (k.ec_name,), {})
        assert info.name == k.ec_name
        assert info.versions[0].public_key_pem

    def public_key(i: int) -> Generator[Step, Any, None]:
        pem = (yield ("public_key", (k.ed_name,), {})).public_key_pem
        got = serialization.load_pem_public_key(pem.encode())
        assert isinstance(got, ed25519.Ed25519PublicKey)
        assert got.public_bytes_raw() == k.ed_public.public_bytes_raw()

    def health(i: int) -> Generator[Step, Any, None]:
        h = yield ("health", (), {})
        assert h.ready, h
        uptimes.append(time.time() - h.uptime)  # when the answering process started

    return [
        ("sign_ec", sign_ec),
        ("health", health),
        ("sign_ed", sign_ed),
        ("sign_batch", sign_batch),
        ("verify", verify),
        ("key_info", key_info),
        ("public_key", public_key),
    ]


class Load:
    """Clients calling idempotent operations until told to stop.

    ``SYNC_CLIENTS`` blocking ``Client``s, each shared by ``THREADS_PER_CLIENT``
    threads, and one ``AsyncClient`` shared by ``TRIO_TASKS`` trio tasks (in a
    thread of their own).  Each uses the library's default retry budget.  A
    call that raises is a failure.  Each worker's health answers are kept, as
    the start time of the process that answered (now minus ``uptime``).
    """

    def __init__(self, socket_path: str, keys: Keys) -> None:
        self.socket_path = socket_path
        self.keys = keys
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.workers = SYNC_CLIENTS * THREADS_PER_CLIENT + TRIO_TASKS
        self.calls = [0] * self.workers
        self.by_op: dict[str, int] = {}
        self.failures: list[str] = []
        self.uptimes: list[list[float]] = [[] for _ in range(self.workers)]
        self.sync_clients = [client(socket_path) for _ in range(SYNC_CLIENTS)]
        self.threads = [
            threading.Thread(
                target=self._run_sync,
                args=(self.sync_clients[n // THREADS_PER_CLIENT], n),
                name=f"load-{n}",
            )
            for n in range(SYNC_CLIENTS * THREADS_PER_CLIENT)
        ]
        self.threads.append(threading.Thread(target=trio.run, args=(self._run_trio,)))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(60)
        for c in self.sync_clients:
            c.close()
        assert not any(t.is_alive() for t in self.threads), "a client thread hung"

    def wait_calls(self, n: int, timeout: float = 60.0) -> None:
        """Until every worker has made ``n`` more calls, each answered."""
        with self.lock:
            targets = [c + n for c in self.calls]
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                assert not self.failures, "\n".join(self.failures)
                if all(c >= t for c, t in zip(self.calls, targets, strict=True)):
                    return
            assert time.monotonic() < deadline, f"the load stalled: {self.calls} < {targets}"
            time.sleep(0.01)

    def _done(self, worker: int, name: str, exc: BaseException | None) -> None:
        with self.lock:
            if exc is not None:
                self.failures.append(f"worker {worker} {name}: {exc!r}")
                return
            self.calls[worker] += 1
            self.by_op[name] = self.by_op.get(name, 0) + 1

    def _run_sync(self, client: Client, worker: int) -> None:
        ops = operations(self.keys, worker, self.uptimes[worker])
        i = worker
        while not self.stopping.is_set():
            name, op = ops[i % len(ops)]
            i += 1
            try:
                steps = op(i)
                step = next(steps)
                while True:
                    method, args, kwargs = step
                    step = steps.send(getattr(client, method)(*args, **kwargs))
            except StopIteration:
                self._done(worker, name, None)
            except Exception as exc:
                self._done(worker, name, exc)
                return

    async def _run_trio(self) -> None:
        first = SYNC_CLIENTS * THREADS_PER_CLIENT
        async with (
            AsyncClient(self.socket_path, timeout=TIMEOUT, retries=RETRIES) as client,
            trio.open_nursery() as nursery,
        ):
            for worker in range(first, first + TRIO_TASKS):
                nursery.start_soon(self._run_task, client, worker)

    async def _run_task(self, client: AsyncClient, worker: int) -> None:
        ops = operations(self.keys, worker, self.uptimes[worker])
        i = worker
        while not self.stopping.is_set():
            name, op = ops[i % len(ops)]
            i += 1
            try:
                steps = op(i)
                step = next(steps)
                while True:
                    method, args, kwargs = step
                    step = steps.send(await getattr(client, method)(*args, **kwargs))
            except StopIteration:
                self._done(worker, name, None)
            except Exception as exc:
                self._done(worker, name, exc)
                return


def client(socket_path: str) -> Client:
    return Client(socket_path, timeout=TIMEOUT, retries=RETRIES)


def processes_seen(started: list[list[float]]) -> int:
    """How many processes answered health calls: distinct start times.

    Each answer gives its process's start time to within the call's latency;
    processes here start seconds apart, so answers within 0.5 s are one process.
    """
    times = sorted(t for worker in started for t in worker)
    return sum(1 for a, b in itertools.pairwise(times) if b - a > 0.5) + (1 if times else 0)


@pytest.mark.slow
def test_restart_under_load_fails_no_request(
    activated: Callable[[], Activated], key_name: str
) -> None:
    a = activated()
    keys = create_keys(a.daemon.socket, key_name)  # this first connection starts signd
    pids = [a.started()]
    a.wait_ready(pids[0])
    with Load(a.daemon.socket, keys) as load:
        load.wait_calls(CALLS_PER_PROCESS)
        for _ in range(RESTARTS):
            code, pid = a.restart()
            assert code == 0, f"signd {pids[-1]} did not drain and exit 0:\n{a.logs()}"
            pids.append(pid)
            a.wait_ready(pid)
            # Answered after "ready", before the next restart: by this process.
            load.wait_calls(CALLS_PER_PROCESS)
    assert not load.failures, "\n".join(load.failures)
    assert a.stop() == 0, a.logs()

    assert len(set(pids)) == RESTARTS + 1
    assert set(load.by_op) == {name for name, _ in operations(keys, 0, [])}
    # Each process answered: the health answers show every restart.
    assert processes_seen(load.uptimes) == RESTARTS + 1, sorted(t for w in load.uptimes for t in w)
    records = log_records(a.daemon.log_path)
    ready = [r["pid"] for r in records if r.get("msg") == "ready"]
    assert ready == pids, ready
    assert all(r["socket"] == "systemd socket" for r in records if r.get("msg") == "ready")
    assert len([r for r in records if r.get("msg") == "stopped"]) == RESTARTS + 1
    assert not [r for r in records if r.get("msg") == "drain timed out"], a.logs()


#: Pooled connections each client holds when the daemon restarts: more than
#: its retry budget, so a call that tried them one after another would fail.
POOL = 8


def test_pooled_connections_do_not_use_up_the_retries(
    activated: Callable[[], Activated], key_name: str
) -> None:
    """After a restart every idle pooled connection is closed by the old process.

    The client must not take them for live ones and spend its retries on
    them, one after another: every call after the restart succeeds, on new
    connections the next process accepts.
    """
    a = activated()
    keys = create_keys(a.daemon.socket, key_name)
    a.wait_ready(a.started())

    def check(client_sig: bytes, message: bytes) -> None:
        keys.ec_public.verify(client_sig, message, ec.ECDSA(hashes.SHA256()))

    async def main() -> None:
        sock = a.daemon.socket
        async with AsyncClient(sock, timeout=TIMEOUT, retries=RETRIES, pool_size=POOL) as ac:
            with Client(sock, timeout=TIMEOUT, retries=RETRIES, pool_size=POOL) as c:
                # Fill both pools: calls at the same time each take a connection.
                async with trio.open_nursery() as nursery:
                    for _ in range(POOL):
                        nursery.start_soon(ac.health)
                barrier = threading.Barrier(POOL)
                many = [b"fill %d" % n for n in range(200)]

                def slow_call() -> None:
                    barrier.wait()
                    c.sign_batch(keys.ec_name, many)

                threads = [threading.Thread(target=slow_call) for _ in range(POOL)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)

                code, pid = a.restart()
                assert code == 0, a.logs()
                a.wait_ready(pid)
                for n in range(3):
                    m = b"sync after restart %d" % n
                    check(c.sign(keys.ec_name, m).signature, m)
                    m = b"async after restart %d" % n
                    check((await ac.sign(keys.ec_name, m)).signature, m)

    trio.run(main)
    assert a.stop() == 0, a.logs()


# --------------------------------------------------------------------------
# SIGHUP while starting


def handles_sighup(pid: int) -> bool:
    """True once process ``pid`` catches SIGHUP (its default action ends a process)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    raise AssertionError(f"/proc/{pid}/status has no SigCgt")


def test_sighup_during_startup_does_not_kill_signd(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    """A reload asked for while signd starts (systemd's ExecReload, logrotate)
    is noted and applied once signd runs, instead of ending the process.

    SIGHUPs are sent from the moment the process catches the signal (it is
    still loading its config and then opening the token) until it is ready.
    """
    d = make_daemon(start=False)
    d.start(wait=False)
    assert d.proc is not None
    pid = d.proc.pid
    deadline = time.monotonic() + 30
    while not handles_sighup(pid):
        assert d.proc.poll() is None, d.logs()
        assert time.monotonic() < deadline, "signd never caught SIGHUP"
        time.sleep(0.001)
    sent = 0
    while b'"msg": "ready"' not in d.log_path.read_bytes():
        assert d.proc.poll() is None, f"signd died of SIGHUP {sent}:\n{d.logs()}"
        assert time.monotonic() < deadline, f"signd did not become ready:\n{d.logs()}"
        d.proc.send_signal(signal.SIGHUP)
        sent += 1
        time.sleep(0.005)
    assert sent > 0
    d.wait_ready()
    # Done by the reload handler as it takes over, which may be just after "ready".
    while "SIGHUP came during startup: reloading the config now" not in d.logs():
        assert d.proc.poll() is None, d.logs()
        assert time.monotonic() < deadline, f"no reload after {sent} SIGHUPs:\n{d.logs()}"
        time.sleep(0.01)
    key = d.new_ec_key(key_name)
    d.check_signs(key)
    # Running: SIGHUP is a reload, as always.
    reloads = d.logs().count('"msg": "config reloaded"')
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while d.logs().count('"msg": "config reloaded"') == reloads:
        assert time.monotonic() < deadline, d.logs()
        time.sleep(0.01)
    d.check_signs(key)
    assert d.stop() == 0, d.logs()
