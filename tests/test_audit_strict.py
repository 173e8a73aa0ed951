"""Strict audit mode: the record of who asked is durable before the answer leaves.

A request's record is queued when the request is read and made durable while
the token works; the answer waits for that record (and for the token), never
for its outcome record, which follows.  Checked on a real daemon (a request
held by a stopped token worker; ``kill -9`` under a pipelining client of
another uid) and, for the writer's hand-offs and failures, on an ``AuditLog``
in-process whose file can be held or made to fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
import trio
import trio.testing

from signd.access.policy import Principal
from signd.audit.facts import Outcome
from signd.audit.log import OVERLAP_INFLIGHT, AuditLog, who_fields
from signd.protocol import HEADER, SignArgs, encode_request
from signd_client.protocol import FrameDecoder, decode_response
from test_audit import answers, audit_files, records, stop, verify

if TYPE_CHECKING:
    from conftest import Daemon


# A client that pipelines signatures as another uid: it drops to NOBODY itself
# (its imports done as root, which can read them), so the daemon sees that uid
# from the kernel.  It keeps WINDOW requests in flight, signing "kill-9 <id>",
# and prints "<id> <result>" for every answer it receives, as it receives it.
PIPELINING_CLIENT = r"""
import os, socket, sys
from signd_client.protocol import FrameDecoder, SignArgs, decode_response, encode_request
path, key, gid, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.setgroups([gid])
os.setgid(65534)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
print(os.getpid(), flush=True)
sent = 0
def ask(n):
    global sent
    s.sendall(b"".join(
        encode_request(i, "sign", SignArgs(key, b"kill-9 %d" % i)) for i in range(sent, sent + n)
    ))
    sent += n
ask(window)
decoder = FrameDecoder()
while True:
    try:
        data = s.recv(65536)
    except ConnectionResetError:
        break
    if not data:
        break
    decoder.receive_data(data)
    got = [decode_response(body) for body in decoder.frames()]
    sys.stdout.write("".join(
        f"{r.id} {'ok' if r.error is None else r.error.name}\n" for r in got
    ))
    sys.stdout.flush()
    try:
        ask(len(got))
    except OSError:
        break
"""
NOBODY = 65534
CLIENT_GID = 4242


def test_kill_9_leaves_a_request_record_for_every_answered_signature(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    """Strict mode: an answer is sent only once the record of its request (who
    asked, for what) is durable; the outcome may follow later.  A ``kill -9``
    in the middle of a pipelining client's run leaves a request record, naming
    the client's uid and pid, for every signature the client received."""
    workdir = Path(tempfile.mkdtemp(prefix="signd-audit-", dir="/tmp"))
    workdir.chmod(0o711)  # so that NOBODY reaches the socket
    try:
        d = make_daemon(
            '[audit]\ndir = "audit"\nmode = "strict"\n\n[[access.rules]]\n'
            f'keys = ["{key_name}"]\noperations = ["sign"]\ngroups = ["{CLIENT_GID}"]\n',
            workdir=workdir,
            server_extra=f"socket_group = {CLIENT_GID}\n",
        )
        with d.client() as c:
            c.create_key(key_name, "ec-p256")
        for _ in range(2):  # two kills, each at some point of a busy run
            _kill_9_mid_run(d, key_name)
            d.start()  # on the same log: a torn tail is cut, the chain goes on
        with d.client() as c:
            c.sign(key_name, b"after the kills")
        stop(d)  # saves the audit key for verify, whichever tests ran before
        out = verify(*audit_files(d))
        assert out.returncode == 0, out.stdout
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_9_mid_run(d: Daemon, key_name: str) -> None:
    client = subprocess.Popen(
        [sys.executable, "-c", PIPELINING_CLIENT, d.socket, key_name, str(CLIENT_GID), "32"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    try:
        pid = int(client.stdout.readline())
        answered: list[int] = []
        for line in client.stdout:
            rid, result = line.split()
            assert result == "ok", line
            answered.append(int(rid))
            if len(answered) >= 300:
                break
        assert d.proc is not None
        d.proc.kill()
        d.proc.wait()
        # What the client had received by then, printed after the kill.
        rest, _ = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    answered += [int(line.split()[0]) for line in rest.splitlines() if line.endswith(" ok")]
    assert len(answered) >= 300, "the client stopped before the kill"

    asked: dict[object, dict[str, object]] = {}
    for f in audit_files(d):
        for ln in f.read_bytes().split(b"\n"):
            try:
                rec = json.loads(ln)
            except ValueError:
                continue  # a tail torn by the kill (or the empty end)
            if rec.get("phase") != "outcome":  # a request record, or a combined one
                asked[rec.get("data_sha256")] = rec
    missing = []
    for rid in answered:
        rec = asked.get(hashlib.sha256(b"kill-9 %d" % rid).hexdigest())
        if rec is None:
            missing.append(rid)
            continue
        assert (rec["op"], rec["key"], rec["uid"], rec["gid"], rec["pid"]) == (
            "sign",
            key_name,
            NOBODY,
            NOBODY,
            pid,
        ), rec
    assert not missing, (
        f"{len(missing)} of {len(answered)} answered signatures have no record of "
        f"their request: ids {missing[:20]}"
    )


def test_a_request_is_recorded_while_the_token_works(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    """Strict mode: the record of who asked is made durable while the token
    signs, not after: with the token worker stopped, the request's record is
    in the log before its answer exists; the answer, once the worker goes on,
    is followed by an outcome record naming that request."""
    d = make_daemon('[audit]\ndir = "audit"\n', token_extra="workers = 1\nstall_timeout = 60\n")
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
    (worker,) = d.token_workers("sign")
    digest = hashlib.sha256(b"held").hexdigest()

    def request_record() -> dict[str, Any] | None:
        for rec in records(d):
            if rec.get("data_sha256") == digest:
                return rec
        return None

    with d.connect_raw() as s:
        os.kill(worker, signal.SIGSTOP)
        try:
            s.sendall(encode_request(1, "sign", SignArgs(key_name, b"held")))
            deadline = time.monotonic() + 30
            while (asked := request_record()) is None:
                assert time.monotonic() < deadline, "no record of the request while it is signed"
                time.sleep(0.01)
            # The token has not signed yet: nothing has been answered.
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
            s.setblocking(True)
        finally:
            os.kill(worker, signal.SIGCONT)
        decoder = FrameDecoder()
        while not (frames := list(decoder.frames())):
            chunk = s.recv(65536)
            assert chunk, "the daemon closed the connection"
            decoder.receive_data(chunk)
        (answer,) = frames
        assert decode_response(answer).error is None
    stop(d)  # saves the audit key for verify, whichever tests ran before
    assert (asked["phase"], asked["op"], asked["key"]) == ("request", "sign", key_name)
    assert (asked["uid"], asked["pid"]) == (os.getuid(), os.getpid())
    assert "result" not in asked
    (outcome,) = [r for r in answers(d) if r.get("data_sha256") == digest]
    assert (outcome["phase"], outcome["request"]) == ("outcome", asked["seq"])
    assert (outcome["result"], outcome["code"], outcome["version"]) == ("ok", 0, 1)
    assert outcome["ts"] == asked["ts"]
    assert verify(*audit_files(d)).returncode == 0


# ---------------------------------------------------------------- in-process


class _File:
    """The writer's file, which a test can hold (writes wait until ``open`` is
    set) or break (the next ``fail`` writes fail, as on a full disk)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.open = threading.Event()
        self.open.set()
        self.fail = 0
        self.waiting = threading.Event()

    def write(self, data: bytes) -> int:
        if not self.open.is_set():
            self.waiting.set()
            self.open.wait(30)
        if self.fail > 0:
            self.fail -= 1
            raise OSError(28, "No space left on device")
        return int(self.inner.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _Recipient:
    def __init__(self) -> None:
        self.got: list[tuple[int | None, bool]] = []

    def audited(self, request_id: int | None, frame: bytes, ok: bool) -> None:
        self.got.append((request_id, ok))


WHO = who_fields(Principal(1000, 1000, 4242, "alice", frozenset(), frozenset(), "/usr/bin/app"))


def _answer(request_id: int) -> bytes:
    body = msgpack.packb({"v": 1, "id": request_id, "result": {"signature": b"s", "version": 3}})
    return HEADER.pack(len(body)) + body


def _notes(data: bytes) -> tuple[str, str, bytes, None, None, int]:
    return ("sign", "app", hashlib.sha256(data).digest(), None, None, time.perf_counter_ns())


#: What the service tells the log of each answer ``_answer`` makes.
SIGNED = Outcome(version=3)


async def _until(condition: Callable[[], object]) -> None:
    with trio.fail_after(20):
        while not condition():
            await trio.sleep(0.001)


def _read(directory: Path) -> list[dict[str, Any]]:
    return [
        json.loads(ln)
        for f in sorted(directory.glob("audit-*.jsonl"))
        for ln in f.read_bytes().split(b"\n")
        if ln
    ]


async def _opened(tmp_path: Path) -> tuple[AuditLog, _File]:
    log = AuditLog(str(tmp_path / "audit"))
    await log.open()
    file = _File(log._writer._file)
    log._writer._file = file
    return log, file


async def test_the_answer_waits_for_the_request_record_not_the_outcome(tmp_path: Path) -> None:
    log, file = await _opened(tmp_path)
    me = _Recipient()
    file.open.clear()  # the writer will wait in its write
    pending = log.asked(WHO, _notes(b"one"), me, 1)
    await _until(file.waiting.is_set)
    assert pending.seq == 1, "the writer took the request before its answer: a request record"
    log.answered(pending, _answer(1))  # no outcome: read from the frame (compatibility)
    # Whatever trio would do with it is done; the writer is held in its write.
    await trio.testing.wait_all_tasks_blocked()
    assert me.got == [], "an answer was released before its request's record was durable"
    file.open.set()
    await _until(lambda: me.got)
    assert me.got == [(1, True)]
    await _until(lambda: len(_read(tmp_path / "audit")) == 2)
    asked, outcome = _read(tmp_path / "audit")
    assert (asked["phase"], asked["uid"], asked["pid"], asked["user"]) == (
        "request",
        1000,
        4242,
        "alice",
    )
    assert "result" not in asked
    assert (outcome["phase"], outcome["request"], outcome["result"]) == ("outcome", 1, "ok")
    assert outcome["version"] == 3

    # An answer that comes after the request record is durable goes at once.
    later = log.asked(WHO, _notes(b"two"), me, 2)
    await _until(lambda: later.durable)
    log.answered(later, _answer(2), SIGNED)
    assert me.got[-1] == (2, True)
    await log.aclose()
    phases = [r.get("phase") for r in _read(tmp_path / "audit")]
    assert phases == ["request", "outcome", "request", "outcome"]


async def test_an_answer_ready_first_gets_one_record(tmp_path: Path) -> None:
    log, file = await _opened(tmp_path)
    me = _Recipient()
    # The writer is busy with an earlier record while this one is answered.
    file.open.clear()
    log.record(WHO, None, _answer(0), SIGNED, me, 0)
    await _until(file.waiting.is_set)
    pending = log.asked(WHO, _notes(b"quick"), me, 1)
    log.answered(pending, _answer(1), SIGNED)
    file.open.set()
    await _until(lambda: len(me.got) == 2)
    await log.aclose()
    assert me.got == [(0, True), (1, True)]
    recs = _read(tmp_path / "audit")
    assert [("phase" in r, r["result"]) for r in recs] == [(False, "ok"), (False, "ok")]
    assert pending.seq == 0


async def test_no_request_record_no_answer(tmp_path: Path) -> None:
    """The request's record cannot be written: the answer is tried once more as
    one combined record, and withheld if that fails too."""
    log, file = await _opened(tmp_path)
    me = _Recipient()
    file.fail = 2
    lost = log.asked(WHO, _notes(b"lost"), me, 1)
    await _until(lambda: lost.durable is False)
    log.answered(lost, _answer(1), SIGNED)
    await _until(lambda: me.got)
    assert me.got == [(1, False)], "an answer went out without a record of its request"

    # The request record fails while its answer waits; the retry is written.
    file.open.clear()
    file.waiting.clear()
    file.fail = 1
    retried = log.asked(WHO, _notes(b"retried"), me, 2)
    await _until(file.waiting.is_set)
    log.answered(retried, _answer(2), SIGNED)
    file.open.set()
    await _until(lambda: len(me.got) == 2)
    assert me.got[-1] == (2, True)
    await log.aclose()
    (rec,) = [
        r for r in _read(tmp_path / "audit") if r.get("data_sha256") == _notes(b"retried")[2].hex()
    ]
    assert ("phase" not in rec, rec["result"]) == (True, "ok")


async def test_under_load_one_combined_record_and_the_answer_still_waits(
    tmp_path: Path,
) -> None:
    """Past OVERLAP_INFLIGHT requests in flight a request is not queued when
    read: its answer brings one combined record, and is released only once
    that record is durable."""
    log, file = await _opened(tmp_path)
    me = _Recipient()
    early = [log.asked(WHO, _notes(b"%d" % i), me, i) for i in range(OVERLAP_INFLIGHT)]
    late = log.asked(WHO, _notes(b"late"), me, 99)
    assert late.deferred
    assert not any(p.deferred for p in early)
    await _until(lambda: all(p.durable for p in early))  # their request records
    file.open.clear()  # hold the writer: the combined record is not written yet
    file.waiting.clear()
    log.answered(late, _answer(99), SIGNED)
    await _until(file.waiting.is_set)
    assert me.got == [], "an answer was released before the record of its request"
    file.open.set()
    await _until(lambda: me.got == [(99, True)])
    for i, p in enumerate(early):
        log.answered(p, _answer(i), SIGNED)
    await _until(lambda: len(me.got) == OVERLAP_INFLIGHT + 1)
    after = log.asked(WHO, _notes(b"after"), me, 100)
    assert not after.deferred, "with nothing in flight the overlap comes back"
    log.answered(after, _answer(100), SIGNED)
    await _until(lambda: len(me.got) == OVERLAP_INFLIGHT + 2)
    await log.aclose()
    recs = _read(tmp_path / "audit")
    (combined,) = [r for r in recs if r.get("data_sha256") == _notes(b"late")[2].hex()]
    assert "phase" not in combined
    assert (combined["result"], combined["uid"], combined["pid"]) == ("ok", 1000, 4242)
