"""When the audit log asks for checkpoints: every ``checkpoint_every`` records,
and every ``checkpoint_interval`` seconds when records were written.

In-process: a real ``AuditLog`` (its writer thread, its files) and a real
``Checkpointer``, with a fake audit key and a fake token store, on trio's
``MockClock`` moved by hand (``clock.jump``): the interval is trio's time, so
no test waits for it.  What a checkpoint proves against an attacker is
checked on a real daemon in test_audit_trust.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from signd.audit.checkpoint import Checkpointer, TokenHead
from signd.audit.facts import Outcome
from signd.audit.log import AuditLog, record_own_action
from signd_client.audit import CHECKPOINT_DOMAIN


class Signer:
    """The audit key: signs anything, and keeps what it was asked to sign."""

    def __init__(self) -> None:
        self.signed: list[dict[str, Any]] = []

    def audit_key_version(self) -> int:
        return 1

    async def sign_audit(self, version: int, message: bytes) -> bytes:
        assert message.startswith(CHECKPOINT_DOMAIN)
        self.signed.append(json.loads(message[len(CHECKPOINT_DOMAIN) :]))
        return b"signature"

    @property
    def reasons(self) -> list[str]:
        return [s["reason"] for s in self.signed]


@dataclass(frozen=True)
class Blob:
    name: str
    revision: int
    value: bytes


class Store:
    """Token data objects, in memory."""

    def __init__(self) -> None:
        self.blobs: dict[str, Blob] = {}

    async def load_metadata(self, name: str | None = None) -> list[Blob]:
        return [b for n, b in self.blobs.items() if name in (None, n)]

    async def write_metadata(self, name: str, revision: int, value: bytes) -> None:
        self.blobs[name] = Blob(name, revision, value)


@dataclass
class Logged:
    audit: AuditLog
    checkpoints: Checkpointer
    signer: Signer
    store: Store

    async def write(self, count: int = 1) -> None:
        """``count`` records, one after the other, each durable before the next."""
        for _ in range(count):
            assert await record_own_action(self.audit, "sign", "k", Outcome(version=1))

    async def settle(self) -> None:
        """Everything queued so far has been through the writer, every
        checkpoint it asked for meanwhile has been signed, and its record
        written.  A barrier (twice: once for the asks, once for the records
        they bring) is a record of its own, which counts for no checkpoint."""
        for _ in range(2):
            await trio.testing.wait_all_tasks_blocked()
            done = trio.Event()
            self.audit.append({"kind": BARRIER}, done)
            await done.wait()
        await trio.testing.wait_all_tasks_blocked()

    def records(self) -> list[dict[str, Any]]:
        lines = (self.audit.directory / "audit-000001.jsonl").read_bytes().split(b"\n")
        return [json.loads(line) for line in lines if line]

    def checkpoint_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("kind") == "checkpoint"]


#: What ``Logged.settle`` writes.
BARRIER = "test-barrier"


@pytest.fixture
async def logged(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Logged]:
    every, interval = request.param
    audit = AuditLog(str(tmp_path / "audit"), checkpoint_every=every, checkpoint_interval=interval)
    await audit.open()
    signer, store = Signer(), Store()
    head = TokenHead(store, "signd:audit-head:test")
    checkpoints = Checkpointer(audit, signer, head, token="test/1")
    try:
        async with trio.open_nursery() as nursery:
            await checkpoints.start(nursery)
            yield Logged(audit, checkpoints, signer, store)
            nursery.cancel_scope.cancel()
    finally:
        await audit.aclose()


@pytest.mark.parametrize("logged", [(3, 1e6)], indirect=True)
async def test_a_checkpoint_every_so_many_records(logged: Logged) -> None:
    assert logged.signer.reasons == ["start"]
    await logged.write(2)
    await logged.settle()
    assert logged.signer.reasons == ["start"], "asked before checkpoint_every records"
    await logged.write(1)
    await logged.settle()
    assert logged.signer.reasons == ["start", "count"]
    await logged.write(6)
    await logged.settle()
    assert logged.signer.reasons == ["start", "count", "count", "count"]
    # Each covers the chain right after its third record since the one before.
    written = [r["seq"] for r in logged.records() if "kind" not in r]
    for n, signed in enumerate(logged.signer.signed[1:], 1):
        assert [s for s in written if s <= signed["head_seq"]] == written[: 3 * n]
        assert signed["head_seq"] == written[3 * n - 1]
    assert [r["head_seq"] for r in logged.checkpoint_records()] == [
        s["head_seq"] for s in logged.signer.signed
    ]
    # The token holds the newest head.
    stored = json.loads(logged.store.blobs["signd:audit-head:test"].value)
    assert stored["seq"] == logged.signer.signed[-1]["head_seq"]


@pytest.mark.parametrize("logged", [(1000, 60.0)], indirect=True)
async def test_a_checkpoint_when_the_interval_passed_and_records_were_written(
    logged: Logged, mock_clock: trio.testing.MockClock
) -> None:
    assert logged.signer.reasons == ["start"]
    mock_clock.jump(600)
    await logged.settle()
    assert logged.signer.reasons == ["start"], "a checkpoint with no record since the last"

    await logged.write()
    await logged.settle()
    assert logged.signer.reasons == ["start"], "the interval since the last ask had not passed"
    mock_clock.jump(61)
    await logged.settle()
    assert logged.signer.reasons == ["start", "interval"]
    asked_at = trio.current_time()

    # The interval is looked at every quarter of it (15 s), from when the
    # last look found one due: the next checkpoint comes 60 to 75 s after
    # this one, here at the look 74 s after it.
    await logged.write(2)
    mock_clock.jump(59)
    await logged.settle()
    mock_clock.jump(14)
    await logged.settle()
    assert logged.signer.reasons == ["start", "interval"], "asked before the interval passed"
    mock_clock.jump(1)
    await logged.settle()
    assert logged.signer.reasons == ["start", "interval", "interval"]
    assert trio.current_time() - asked_at == 74
    assert [r["reason"] for r in logged.checkpoint_records()] == logged.signer.reasons


@pytest.mark.parametrize("logged", [(2, 60.0)], indirect=True)
async def test_the_interval_counts_from_the_newest_checkpoint_whatever_its_reason(
    logged: Logged,
) -> None:
    """The interval is read on trio's side: a reading that predates a checkpoint
    the writer asked for meanwhile (here: by count) asks for nothing."""
    await logged.write(2)
    await logged.write(1)
    await logged.settle()
    assert logged.signer.reasons == ["start", "count"]
    logged.audit.checkpoint_due(1)  # the interval since ask 1 (start), read too late
    await logged.settle()
    assert logged.signer.reasons == ["start", "count"]
    logged.audit.checkpoint_due(2)  # since the count checkpoint: due, a record is waiting
    await logged.settle()
    assert logged.signer.reasons == ["start", "count", "interval"]
