"""The daemon's op table (``signd.ops``) agrees with the wire's one place
(``signd_client.protocol.OPS``), the golden frames and PROTOCOL.md.

Adding an operation takes a row, its handler, the client's spec and call,
a PROTOCOL.md section and golden frames; these tests name what is missing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from fakes import Harness, open_harness, principal
from signd.access.policy import OPERATIONS
from signd.audit.facts import Outcome
from signd.errors import VersionNotFound
from signd.ops import TABLE, Kind
from signd.protocol import (
    OPS,
    CreateKeyArgs,
    Empty,
    KeyRefArgs,
    Message,
    Request,
    Retry,
    RotateArgs,
    SignArgs,
    VerifyArgs,
)

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "PROTOCOL.md").read_text()
VECTORS = json.loads((ROOT / "tests" / "vectors" / "frames.json").read_text())["vectors"]


def _section(title: str) -> str:
    """The text of PROTOCOL.md's ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", DOC, re.MULTILINE | re.DOTALL)
    assert match is not None, f"PROTOCOL.md has no section '## {title}'"
    return match.group(1)


def _table(title: str) -> dict[str, str]:
    """The first table of section ``title``: each op named (in backticks) in
    a row's first cell -> that row's second cell."""
    rows: dict[str, str] = {}
    for line in _section(title).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2:
            continue
        for op in re.findall(r"`([a-z_]+)`", cells[0]):
            rows[op] = cells[1]
    return rows


def test_the_table_has_a_row_for_every_wire_op_and_no_other() -> None:
    assert set(TABLE) == set(OPS)
    for name, row in TABLE.items():
        assert row.name == name
        assert row.spec is OPS[name]


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_has_golden_frames(name: str) -> None:
    mine = [v for v in VECTORS if v["op"] == name]
    assert any(v["direction"] == "request" for v in mine), f"no request vector for {name}"
    assert any(v["direction"] == "response" and "result" in v["message"] for v in mine), (
        f"no result vector for {name}"
    )


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_has_a_protocol_section(name: str) -> None:
    assert re.search(rf"^### `{name}`$", DOC, re.MULTILINE), f"PROTOCOL.md: no ### `{name}`"


def test_retry_classes_match_protocol_md() -> None:
    documented = _table("Retries and idempotency")
    expected = {
        name: Retry.SAFE if text == "yes" else Retry.WITH_KEY if "idempotency_key" in text else None
        for name, text in documented.items()
    }
    assert expected == {name: spec.retry for name, spec in OPS.items()}


def test_verbs_match_protocol_md_and_the_policy() -> None:
    documented = _table("Access policy operations")
    verbs = {
        name: None if text.startswith("none") else re.findall(r"`([a-z]+)`", text)[0]
        for name, text in documented.items()
    }
    assert verbs == {name: row.verb for name, row in TABLE.items()}
    assert {row.verb for row in TABLE.values()} - {None} == set(OPERATIONS)


def test_kinds() -> None:
    """A key change is an admin op (a task under the admin lock); the token
    work is signing and verifying; the rest reads."""
    for row in TABLE.values():
        if row.verb in ("create", "rotate", "admin", "import"):
            assert row.kind is Kind.ADMIN, row.name
        elif row.verb in ("sign", "verify"):
            assert row.kind is Kind.TOKEN, row.name
        else:
            assert row.kind is Kind.READ, row.name


# --------------------------------------------------------------------------
# every answer carries its facts (for the audit log)


async def _outcome(h: Harness, op: str, args: Message) -> Outcome:
    """The outcome the service hands the transport with its answer to one request."""
    outcomes: list[Outcome] = []
    answered = trio.Event()

    def reply(_rid: int, _frame: bytes, outcome: Outcome) -> None:
        outcomes.append(outcome)
        answered.set()

    root = principal(0, user="root")
    for work in h.service.handle([Request(1, op, args)], reply, object(), root):
        await work()
    h.service.token.pump()
    await answered.wait()
    assert len(outcomes) == 1
    return outcomes[0]


async def test_answers_carry_their_outcome(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await h.connect(principal(0)).call("create_key", CreateKeyArgs(key="k", type="ec-p256"))
        signed = await _outcome(h, "sign", SignArgs(key="k", message=b"m"))
        assert signed == Outcome(version=1)
        bad = await _outcome(h, "verify", VerifyArgs(key="k", signature=b"x", message=b"m"))
        assert bad == Outcome(valid=False)
        assert await _outcome(h, "key_info", KeyRefArgs(key="k")) == Outcome(version=1)
        rotated = await _outcome(h, "rotate", RotateArgs(key="k"))
        assert rotated == Outcome(version=2)
        missing = await _outcome(h, "sign", SignArgs(key="k", message=b"m", version=9))
        assert isinstance(missing.error, VersionNotFound)
        assert (missing.version, missing.valid) == (None, None)
        assert await _outcome(h, "health", Empty()) == Outcome()
