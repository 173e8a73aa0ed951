"""The audit log's format and its verification: one place for both.

The daemon writes JSON Lines, one record per request.  Each record carries
``seq`` (1, 2, ... across files), ``prev`` (the previous record's hash; 64
zeros for the first) and ``hash``: the SHA-256 of the record's canonical JSON
(sorted keys, no spaces) without ``hash``.  So an edited record no longer
matches its hash, and a deleted, inserted or reordered one breaks the chain
of ``seq`` and ``prev``.  ``verify_files`` checks files in order, across
rotation: a file continues the chain of the one before it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["GENESIS", "ChainState", "Problem", "canonical", "line_of", "seal", "verify_files"]

GENESIS: Final = "0" * 64


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: its JSON without ``hash``, sorted, compact."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def line_of(body: bytes) -> tuple[bytes, str]:
    """The log line (ending in a newline) of the record whose ``canonical`` bytes,
    ``seq`` and ``prev`` included, are ``body``; and the record's hash.

    The line is ``body`` with ``hash`` appended as the last member: encoded
    once, and still what ``canonical`` gives back once ``hash`` is dropped.
    """
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}\n', digest


def seal(record: dict[str, Any], seq: int, prev: str) -> tuple[str, str]:
    """Chain ``record`` after ``prev``; return (its JSON line, its hash)."""
    record["seq"] = seq
    record["prev"] = prev
    line, digest = line_of(canonical(record))
    record["hash"] = digest
    return line[:-1].decode(), digest


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass
class ChainState:
    seq: int = 0
    hash: str = GENESIS
    records: int = 0
    problems: list[Problem] = field(default_factory=list)


def verify_files(paths: Iterable[str]) -> ChainState:
    """Check the chain through ``paths``, in order; every problem is listed.

    The first record may continue an older, absent file (its ``prev`` is then
    taken as given); after that every link must hold.
    """
    state = ChainState()
    first = True
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except OSError as exc:
            state.problems.append(Problem(path, 0, f"cannot read: {exc.strerror}"))
            continue
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
                seq, prev, digest = rec["seq"], rec["prev"], rec["hash"]
            except (ValueError, KeyError) as exc:
                state.problems.append(Problem(path, n, f"not an audit record ({exc})"))
                continue
            state.records += 1
            if hashlib.sha256(canonical(rec)).hexdigest() != digest:
                state.problems.append(Problem(path, n, f"record {seq} was altered (hash mismatch)"))
            if first:
                first = False
                if seq == 1 and prev != GENESIS:
                    state.problems.append(Problem(path, n, "record 1 does not start the chain"))
            else:
                if seq != state.seq + 1:
                    state.problems.append(
                        Problem(
                            path,
                            n,
                            f"sequence jumps from {state.seq} to {seq} "
                            "(records deleted, inserted or reordered)",
                        )
                    )
                if prev != state.hash:
                    state.problems.append(
                        Problem(
                            path,
                            n,
                            f"record {seq} does not follow record {state.seq} (chain broken)",
                        )
                    )
            state.seq, state.hash = seq, digest
    return state
