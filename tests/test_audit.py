"""The audit log: one hash-chained record per request, checked by `signctl audit verify`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from signd_client import Client
from signd_client.errors import SigndError

if TYPE_CHECKING:
    from conftest import Daemon

SIGNCTL = str(Path(sys.executable).parent / "signctl")


def audit_files(d: Daemon) -> list[Path]:
    return sorted((d.workdir / "audit").glob("audit-*.jsonl"))


def records(d: Daemon) -> list[dict[str, object]]:
    return [json.loads(ln) for f in audit_files(d) for ln in f.read_text().splitlines() if ln]


def verify(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SIGNCTL, "audit", "verify", *map(str, files)], capture_output=True, text=True, check=False
    )


def test_one_record_per_request_and_no_signed_data(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon('[audit]\ndir = "audit"\n')
    secret = b"confidential payload " + key_name.encode()
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        sig = c.sign(key_name, secret)
        assert c.verify(key_name, sig.signature, secret).valid
        assert not c.verify(key_name, sig.signature, secret + b"!").valid
        with pytest.raises(SigndError):
            c.sign(key_name + "-none", secret)
    assert d.stop() == 0
    recs = records(d)
    assert [r["op"] for r in recs] == ["create_key", "sign", "verify", "verify", "sign"]
    create, sign, ok, bad, missing = recs
    assert (create["result"], create["version"]) == ("ok", 1)
    assert sign["data_sha256"] == hashlib.sha256(secret).hexdigest()
    assert (sign["key"], sign["version"], sign["result"], sign["code"]) == (key_name, 1, "ok", 0)
    assert (ok["valid"], bad["valid"]) == (True, False)
    assert (missing["result"], missing["code"]) == ("key_not_found", 300)
    for r in recs:
        assert r["uid"] == 0
        assert r["pid"] > 0
        assert isinstance(r["latency_ms"], float)
        assert str(r["exe"]).startswith("/")
    text = "".join(f.read_text() for f in audit_files(d))
    assert secret.decode() not in text
    assert sig.signature.hex() not in text
    assert d.token.pin not in text
    out = verify(*audit_files(d))
    assert out.returncode == 0, out.stdout
    assert "5 records, chain intact" in out.stdout


def test_denied_requests_are_audited(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    d = make_daemon('[audit]\ndir = "audit"\n\n[access]\ntrust_root = false\n')
    with d.client() as c, pytest.raises(SigndError, match="permission_denied"):
        c.create_key(key_name, "ec-p256")
    assert d.stop() == 0
    (rec,) = records(d)
    assert (rec["op"], rec["key"], rec["result"], rec["code"]) == (
        "create_key",
        key_name,
        "permission_denied",
        400,
    )


@pytest.fixture
def log_of_20(make_daemon: Callable[..., Daemon], key_name: str, tmp_path: Path) -> list[Path]:
    d = make_daemon('[audit]\ndir = "audit"\nmax_bytes = 4096\n')
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        for i in range(19):
            c.sign(key_name, b"%d" % i)
    assert d.stop() == 0
    files = audit_files(d)
    assert len(files) > 1, "4 KiB files: the log must have rotated"
    copies = []
    for f in files:
        shutil.copy(f, tmp_path / f.name)
        copies.append(tmp_path / f.name)
    assert verify(*copies).returncode == 0
    return copies


def _lines(files: list[Path]) -> list[tuple[Path, list[str]]]:
    return [(f, f.read_text().splitlines(keepends=True)) for f in files]


def test_edited_record_is_detected(log_of_20: list[Path]) -> None:
    f, lines = _lines(log_of_20)[0]
    rec = json.loads(lines[2])
    rec["result"] = "key_not_found"
    lines[2] = json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n"
    f.write_text("".join(lines))
    out = verify(*log_of_20)
    assert out.returncode == 1
    assert "altered" in out.stdout


def test_deleted_record_is_detected(log_of_20: list[Path]) -> None:
    f, lines = _lines(log_of_20)[0]
    del lines[3]
    f.write_text("".join(lines))
    out = verify(*log_of_20)
    assert out.returncode == 1
    assert "jumps" in out.stdout


def test_reordered_records_are_detected(log_of_20: list[Path]) -> None:
    f, lines = _lines(log_of_20)[0]
    lines[1], lines[2] = lines[2], lines[1]
    f.write_text("".join(lines))
    out = verify(*log_of_20)
    assert out.returncode == 1
    assert "chain broken" in out.stdout or "jumps" in out.stdout


def test_inserted_record_is_detected(log_of_20: list[Path]) -> None:
    f, lines = _lines(log_of_20)[0]
    lines.insert(2, lines[1])  # a replayed copy of a real record
    f.write_text("".join(lines))
    assert verify(*log_of_20).returncode == 1


def test_missing_file_in_the_middle_is_detected(log_of_20: list[Path]) -> None:
    if len(log_of_20) < 3:
        pytest.skip("the log rotated into only two files")
    assert verify(log_of_20[0], *log_of_20[2:]).returncode == 1


def test_chain_continues_across_restarts(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    d = make_daemon('[audit]\ndir = "audit"\n')
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
    d.restart()
    with d.client() as c:
        c.sign(key_name, b"after restart")
    assert d.stop() == 0
    recs = records(d)
    assert [r["seq"] for r in recs] == [1, 2]
    assert recs[1]["prev"] == recs[0]["hash"]
    assert verify(*audit_files(d)).returncode == 0


def test_kill_9_loses_no_record_of_an_answered_signature(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    """Strict mode: an answer is sent only after its record is durable."""
    d = make_daemon('[audit]\ndir = "audit"\nmode = "strict"\n')
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
    received: list[bytes] = []
    stop = threading.Event()

    def load(n: int) -> None:
        with Client(d.socket, retries=0, timeout=10) as c:
            i = 0
            while not stop.is_set():
                msg = b"%d-%d" % (n, i)
                try:
                    c.sign(key_name, msg)
                except SigndError:
                    return  # the daemon is gone
                received.append(msg)
                i += 1

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    while len(received) < 400:
        threading.Event().wait(0.01)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    stop.set()
    for t in threads:
        t.join(30)
    audited = {r.get("data_sha256") for r in records(d) if r.get("result") == "ok"}
    missing = [m for m in received if hashlib.sha256(m).hexdigest() not in audited]
    assert not missing, f"{len(missing)} of {len(received)} answered signatures have no record"
    # The daemon starts again on the same log, cutting any torn tail, and the chain holds.
    d.start()
    with d.client() as c:
        c.sign(key_name, b"after the kill")
    assert d.stop() == 0
    assert verify(*audit_files(d)).returncode == 0


def test_a_client_whose_path_is_not_utf8_is_audited(
    make_daemon: Callable[..., Daemon], key_name: str, tmp_path: Path
) -> None:
    """The kernel names a client's executable in bytes; the record must still be written."""
    d = make_daemon('[audit]\ndir = "audit"\n')
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
    odd_dir = os.fsencode(tmp_path) + b"/bin-\xff"
    os.mkdir(odd_dir)
    exe = odd_dir + b"/python"
    shutil.copy2(os.path.realpath(sys.executable), exe)
    code = (
        "import sys; from signd_client import Client\n"
        "with Client(sys.argv[1], timeout=20, retries=0) as c: c.sign(sys.argv[2], b'odd')\n"
    )
    env = {**d.token.env(), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run(
        [exe, "-c", code, d.socket, key_name], env=env, capture_output=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert d.stop() == 0
    rec = records(d)[-1]
    assert (rec["op"], rec["result"]) == ("sign", "ok")
    assert rec["exe"] == os.fsdecode(exe).encode("utf-8", "surrogateescape").decode(
        "utf-8", "backslashreplace"
    )
    assert verify(*audit_files(d)).returncode == 0
