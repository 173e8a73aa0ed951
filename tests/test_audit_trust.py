"""The audit log against someone who can write its files: checkpoints signed on
the token, the chain head kept there, and the directory itself (issue 13,
findings 5, 8 and 12)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from signd_client.audit import AUDIT_KEY, GENESIS, canonical
from signd_client.errors import SigndError
from test_audit import audit_files, save_audit_key, stop, verify

if TYPE_CHECKING:
    from conftest import Daemon

#: Small numbers, so a short test has several files and checkpoints.
SMALL = '[audit]\ndir = "audit"\nmax_bytes = 4096\ncheckpoint_every = 5\n'


def _wait_exit(d: Daemon, timeout: float = 60.0) -> int:
    assert d.proc is not None
    try:
        return d.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        d.proc.wait()
        pytest.fail(f"signd did not exit:\n{d.logs()}")


@pytest.fixture
def logged(
    make_daemon: Callable[..., Daemon], key_name: str, tmp_path: Path
) -> tuple[Daemon, list[Path]]:
    """A stopped daemon whose log has several files and checkpoints; copies of them."""
    d = make_daemon(SMALL)
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        for i in range(24):
            c.sign(key_name, b"%d" % i)
    stop(d)
    files = audit_files(d)
    assert len(files) >= 3, "4 KiB files: the log must have rotated"
    copies = []
    for f in files:
        shutil.copy(f, tmp_path / f.name)
        copies.append(tmp_path / f.name)
    out = verify(*copies)
    assert out.returncode == 0, out.stdout + out.stderr
    return d, copies


def _recs(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_bytes().split(b"\n") if x]


def _write(path: Path, recs: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(_line(r) for r in recs))


def _line(rec: dict[str, Any]) -> bytes:
    return (
        json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    )


def _rehash(
    files: list[Path], edit: Callable[[int, dict[str, Any]], dict[str, Any] | None]
) -> None:
    """Rewrite every file with ``edit`` applied, and chain and hash them again
    the way the daemon does: what someone without the token can do."""
    seq, prev = 0, GENESIS
    n = 0
    for f in files:
        out = []
        for rec in _recs(f):
            n += 1
            new = edit(n, rec)
            if new is None:
                continue
            seq += 1
            new.update(seq=seq, prev=prev)
            new.pop("hash", None)
            new["hash"] = prev = hashlib.sha256(canonical(new)).hexdigest()
            out.append(new)
        _write(f, out)


def test_a_rewritten_and_rehashed_chain_is_detected(logged: tuple[Daemon, list[Path]]) -> None:
    _, files = logged

    def edit(n: int, rec: dict[str, Any]) -> dict[str, Any]:
        if rec.get("op") == "sign" and n == 5:
            rec["uid"] = 4242  # someone else did it
        return rec

    _rehash(files, edit)
    out = verify(*files)
    assert out.returncode == 1, out.stdout
    assert "records were rewritten" in out.stdout


def test_a_rehashed_chain_without_checkpoints_is_detected(
    logged: tuple[Daemon, list[Path]],
) -> None:
    _, files = logged
    _rehash(files, lambda n, rec: None if rec.get("kind") == "checkpoint" else rec)
    out = verify(*files)
    assert out.returncode == 1, out.stdout
    assert "no verified checkpoint" in out.stdout


def test_a_forged_checkpoint_is_detected(logged: tuple[Daemon, list[Path]]) -> None:
    _, files = logged

    def edit(n: int, rec: dict[str, Any]) -> dict[str, Any]:
        if rec.get("kind") == "checkpoint" and rec["reason"] == "shutdown":
            rec["sig"] = base64.b64encode(b"\x30\x06\x02\x01\x01\x02\x01\x01").decode()
        return rec

    _rehash(files, edit)
    out = verify(*files)
    assert out.returncode == 1, out.stdout
    assert "forged or altered checkpoint" in out.stdout


def test_the_oldest_file_missing_is_detected(logged: tuple[Daemon, list[Path]]) -> None:
    _, files = logged
    out = verify(*files[1:])
    assert out.returncode == 1, out.stdout
    assert "does not start at record 1" in out.stdout
    # Archived on purpose: the operator says where the archived files ended.
    last = _recs(files[0])[-1]
    out = verify(*files[1:], extra=("--after", f"{last['seq']}:{last['hash']}"))
    assert out.returncode == 0, out.stdout


def test_the_first_records_cut_are_detected(logged: tuple[Daemon, list[Path]]) -> None:
    _, files = logged
    lines = files[0].read_bytes().splitlines(keepends=True)
    files[0].write_bytes(b"".join(lines[3:]))
    out = verify(*files)
    assert out.returncode == 1, out.stdout
    assert "does not start at record 1" in out.stdout


def test_the_end_cut_off_is_detected_with_the_daemons_head(
    logged: tuple[Daemon, list[Path]],
) -> None:
    d, files = logged
    d.start()  # on the intact log: its head now covers all of it
    try:
        newest = files[-1].read_bytes().splitlines(keepends=True)
        files[-1].write_bytes(b"".join(newest[:-2]))
        out = verify(*files, extra=("--socket", d.socket))
        assert out.returncode == 1, out.stdout
        assert "records were removed from the end" in out.stdout
        out = verify(*files[:-1], extra=("--socket", d.socket))  # the newest file dropped
        assert out.returncode == 1, out.stdout
        assert "records were removed from the end" in out.stdout
        # The intact files reach the head.
        out = verify(*audit_files(d), extra=("--socket", d.socket))
        assert out.returncode == 0, out.stdout
        assert "chain head" in out.stdout
    finally:
        stop(d)


def test_middle_edits_still_detected(logged: tuple[Daemon, list[Path]]) -> None:
    _, files = logged
    recs = _recs(files[1])
    edited = [dict(r) for r in recs]
    edited[1]["result"] = "key_not_found"  # edited
    _write(files[1], edited)
    assert verify(*files).returncode == 1
    _write(files[1], [recs[0], recs[2], recs[1], *recs[3:]])  # reordered
    assert verify(*files).returncode == 1
    _write(files[1], [recs[0], *recs[2:]])  # deleted
    assert verify(*files).returncode == 1
    _write(files[1], [recs[0], recs[1], recs[1], *recs[2:]])  # inserted
    assert verify(*files).returncode == 1


@pytest.mark.parametrize(
    "bad",
    [
        b'{"seq": 3, "x": "\xff"}\n',
        b'{"seq": 3, "x": "a\x00b"}\n',
        b"[" * 100_000 + b"\n",
        b"[1, 2, 3]\n",
        b"x" * (2 << 20) + b"\n",
        b"\xef\xbb\xbf{}\n",
    ],
    ids=["0xff", "nul", "deep", "array", "huge", "bom"],
)
def test_bytes_that_are_no_record_give_exit_2_naming_file_and_line(
    logged: tuple[Daemon, list[Path]], bad: bytes
) -> None:
    _, files = logged
    lines = files[0].read_bytes().splitlines(keepends=True)
    files[0].write_bytes(b"".join([*lines[:2], bad, *lines[2:]]))
    out = verify(*files)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert f"{files[0]}:3: " in out.stdout


def test_record_fields_are_printed_escaped(logged: tuple[Daemon, list[Path]]) -> None:
    _, files = logged
    lines = files[0].read_bytes().splitlines(keepends=True)
    evil = {"seq": "\x1b]0;pwned\x07\x1b[2J", "prev": GENESIS, "hash": GENESIS}
    files[0].write_bytes(b"".join([*lines[:2], _line(evil), *lines[2:]]))
    odd = files[0].with_name("audit-\x1b[31m.jsonl")
    files[0].rename(odd)
    out = verify(odd, *files[1:])
    assert out.returncode != 0
    assert "\x1b" not in out.stdout
    assert "\x07" not in out.stdout
    assert "\\x1b[31m" in out.stdout


def test_a_restart_on_a_trimmed_log_is_noticed(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon(SMALL)
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        for i in range(8):
            c.sign(key_name, b"%d" % i)
    stop(d)
    # Cut the log before the record the last checkpoint covers (the token's head).
    files = audit_files(d)
    head = [r for f in files for r in _recs(f) if r.get("kind") == "checkpoint"][-1]["head_seq"]
    for f in files:
        _write(f, [r for r in _recs(f) if r["seq"] < head])
    d.start(wait=False)
    assert _wait_exit(d) == 1  # on_mismatch = "refuse" by default
    assert "DOES NOT MATCH THE CHAIN HEAD" in d.logs()
    d.extra_config = SMALL + 'on_mismatch = "continue"\n'
    d.start()
    try:
        assert d.gauge("signd_audit_chain_ok") == 0
        assert d.gauge("signd_audit_chain_mismatches_total") == 1
    finally:
        stop(d)
    out = verify(*audit_files(d))
    assert out.returncode == 1
    assert "did not match the chain head" in out.stdout
    # The new segment is the token's head now: the next start is clean.
    d.start()
    try:
        assert d.gauge("signd_audit_chain_ok") == 1
    finally:
        stop(d)


def test_a_symlink_in_the_audit_dir_is_refused_and_its_target_untouched(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    victim = tmp_path / "precious"
    victim.write_bytes(b"not an audit record, and no newline at the end")
    d = make_daemon(SMALL, start=False)
    audit = d.workdir / "audit"
    audit.mkdir(mode=0o750)
    (audit / "audit-000001.jsonl").symlink_to(victim)
    d.start(wait=False)
    assert _wait_exit(d) == 1
    assert "is a symlink" in d.logs()
    assert victim.read_bytes() == b"not an audit record, and no newline at the end"


def test_a_group_writable_audit_dir_is_refused(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(SMALL, start=False)
    audit = d.workdir / "audit"
    audit.mkdir()
    os.chmod(audit, 0o770)
    d.start(wait=False)
    assert _wait_exit(d) == 1
    assert "writable by its group" in d.logs()
    os.chmod(audit, 0o750)
    d.start()
    stop(d)


def test_no_client_may_sign_with_or_change_the_audit_key(
    make_daemon: Callable[..., Daemon],
) -> None:
    d = make_daemon(SMALL)
    try:
        with d.client() as c:  # root, trusted by default: every grant
            pem = c.public_key(AUDIT_KEY).public_key_pem
            assert "BEGIN PUBLIC KEY" in pem
            for call in (
                lambda: c.sign(AUDIT_KEY, b"checkpoint"),
                lambda: c.sign_batch(AUDIT_KEY, messages=[b"checkpoint"]),
                lambda: c.rotate(AUDIT_KEY),
                lambda: c.update_key(AUDIT_KEY, deletion_allowed=True),
                lambda: c.disable(AUDIT_KEY, 1),
                lambda: c.destroy(AUDIT_KEY, version=1),
            ):
                with pytest.raises(SigndError, match="permission_denied"):
                    call()
            assert c.health().audit is not None
    finally:
        stop(d)
    save_audit_key(d)


def test_checkpoints_come_by_time_too(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    d = make_daemon(
        '[audit]\ndir = "audit"\ncheckpoint_every = 100000\ncheckpoint_interval = 0.2\n'
    )
    try:
        with d.client() as c:
            c.create_key(key_name, "ec-p256")
        deadline = time.monotonic() + 20
        # Until an interval checkpoint covers every record before it (in strict
        # mode an outcome record may come after the checkpoint asked for, and
        # the next interval covers it).
        while time.monotonic() < deadline:
            last = [json.loads(x) for x in audit_files(d)[-1].read_bytes().split(b"\n") if x][-1]
            if last.get("reason") == "interval" and last["head_seq"] == last["seq"] - 1:
                break
            time.sleep(0.05)
        assert last.get("reason") == "interval", last
        assert last["head_seq"] == last["seq"] - 1, last
    finally:
        stop(d)
