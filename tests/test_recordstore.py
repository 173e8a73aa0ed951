"""Key records' compare-and-swap (``signd.keys.recordstore``) in-process: a fake
token whose readers may lag its writer, and trio's MockClock."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from signd import errors
from signd.keys.recordstore import (
    SAME_WRITE_RECHECK,
    SEEN_WRITE_BACKOFF,
    RecordStore,
    Superseded,
)


@dataclass
class FakeToken:
    """Records as (revision, writer) pairs; a write is seen by the readers
    only ``lag`` seconds after it was made."""

    records: list[tuple[int, str, float]] = field(default_factory=list)
    lag: float = 0.0
    #: called before each read: another process at work
    meanwhile: list[Any] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)

    def seen(self) -> list[int]:
        now = trio.current_time()
        return [rev for rev, _, at in self.records if at + self.lag <= now]

    async def load_metadata(self, name: str | None = None) -> list[Any]:
        return []

    async def revisions(self, name: str) -> list[int]:
        self.calls.append("revisions")
        for act in self.meanwhile:
            act(self)
        return self.seen()

    async def create_metadata(self, name: str, revision: int, value: bytes) -> None:
        self.calls.append("create")
        self.records.append((revision, "us", trio.current_time()))

    async def drop_created(self) -> None:
        self.calls.append("drop_created")
        self.records = [r for r in self.records if r[1] != "us"]

    async def drop_older(self, name: str, revision: int) -> None:
        self.calls.append("drop_older")
        self.records = [r for r in self.records if r[0] >= revision]


def at(token: FakeToken, *revisions: int) -> FakeToken:
    token.records = [(rev, "them", -1e9) for rev in revisions]
    return token


async def test_an_unopposed_write_replaces_the_old_revision(
    autojump_clock: trio.testing.MockClock,
) -> None:
    token = at(FakeToken(), 1)
    start = trio.current_time()
    await RecordStore(token).write_metadata("k", 2, b"v")
    assert [r[0] for r in token.records] == [2]
    assert token.calls == ["revisions", "create", "revisions", "revisions", "drop_older"]
    assert trio.current_time() - start == pytest.approx(SAME_WRITE_RECHECK)


async def test_a_newer_revision_is_a_conflict_and_nothing_is_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    token = at(FakeToken(), 3)
    with pytest.raises(errors.Conflict, match="record is at revision 3"):
        await RecordStore(token).write_metadata("k", 3, b"v")
    assert "create" not in token.calls
    assert [r[0] for r in token.records] == [3]


async def test_a_lagging_reader_is_asked_again_not_taken_for_a_conflict(
    autojump_clock: trio.testing.MockClock,
) -> None:
    token = at(FakeToken(lag=0.03), 1)
    await RecordStore(token).write_metadata("k", 2, b"v")
    assert [r[0] for r in token.records] == [2]
    assert token.calls.count("revisions") > 3  # it waited for its own write


async def test_a_write_never_seen_is_taken_back(autojump_clock: trio.testing.MockClock) -> None:
    token = at(FakeToken(lag=10 * sum(SEEN_WRITE_BACKOFF)), 1)
    with pytest.raises(errors.Conflict, match="at the same moment"):
        await RecordStore(token).write_metadata("k", 2, b"v")
    assert token.calls[-1] == "drop_created"
    assert [r[0] for r in token.records] == [1]


async def test_the_same_revision_written_elsewhere_meanwhile_is_a_conflict(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Another process stores revision 2 too; its record becomes visible only
    at the second look, which is what that look is for."""
    token = at(FakeToken(), 1)

    def rival(t: FakeToken) -> None:
        if t.calls.count("revisions") == 3 and not any(r[1] == "rival" for r in t.records):
            t.records.append((2, "rival", -1e9))

    token.meanwhile.append(rival)
    with pytest.raises(errors.Conflict, match="at the same moment"):
        await RecordStore(token).write_metadata("k", 2, b"v")
    assert token.calls[-1] == "drop_created"
    assert sorted(r[1] for r in token.records) == ["rival", "them"]


async def test_a_revision_built_on_this_write_is_not_taken_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Another process read this write's revision 2 and wrote revision 3 on it
    (dropping the older ones) before this process looked again.  Taking back
    revision 2 here, and deleting the keypair it names, would leave revision 3
    naming a keypair that is gone (seen in CI: two daemons, one rotating, the
    other changing the key's settings)."""
    token = at(FakeToken(), 1)

    def builds_on_ours(t: FakeToken) -> None:
        if t.calls.count("revisions") == 3 and not any(r[1] == "next" for r in t.records):
            t.records = [(3, "next", -1e9)]

    token.meanwhile.append(builds_on_ours)
    with pytest.raises(Superseded, match="may be part of it") as caught:
        await RecordStore(token).write_metadata("k", 2, b"v")
    assert isinstance(caught.value, errors.Conflict)  # on the wire: conflict
    assert "drop_created" not in token.calls
    assert [r[1] for r in token.records] == ["next"]


async def test_a_revision_two_processes_are_taking_back_is_not_built_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two records of revision 2 (two processes wrote it at once; both take
    theirs back): a third must not make revision 3 from either."""
    token = at(FakeToken(), 1, 2, 2)
    with pytest.raises(errors.Conflict, match="two other processes at once"):
        await RecordStore(token).write_metadata("k", 3, b"v")
    assert "create" not in token.calls
