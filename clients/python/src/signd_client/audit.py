"""The audit log's format and its verification: one place for both.

The daemon writes JSON Lines, one record per request.  Each record carries
``seq`` (1, 2, ... across files), ``prev`` (the previous record's hash; 64
zeros for the first) and ``hash``: the SHA-256 of the record's canonical JSON
(sorted keys, no spaces) without ``hash``.  So an edited record no longer
matches its hash, and a deleted, inserted or reordered one breaks the chain
of ``seq`` and ``prev``.  ``verify_files`` checks files in order, across
rotation: a file continues the chain of the one before it.

The chain alone has no secret: whoever can write the files can rewrite them
and hash them again.  So the daemon also writes *checkpoints*: records of kind
``checkpoint`` that attest the chain head (``head_seq``, ``head_hash``, the
``file`` that record is in) with a signature made on the token by the
reserved key ``signd.audit`` (``AUDIT_KEY``), over ``checkpoint_message``: a
fixed prefix and the canonical JSON of ``SIGNED_FIELDS``.  A rewritten chain no
longer matches the heads its checkpoints attest, and a forged checkpoint does
not verify; what comes after the last checkpoint is not covered by any
signature, and ``ChainState.unprotected`` says how much that is.  The daemon
keeps its newest head on the token too, and hands it out in ``health``
(``audit``): with it, ``verify_files`` (``head``) also tells a log whose end
was cut off.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

from ._audit_records import (
    AUDIT_KEY,
    CHAIN_MISMATCH,
    CHECKPOINT,
    CHECKPOINT_DOMAIN,
    GENESIS,
    MAX_LINE,
    SIGNED_FIELDS,
    AuditKeys,
    Head,
    canonical,
    checkpoint_message,
    is_hash,
    line_of,
    printable,
    seal,
)

__all__ = [
    "AUDIT_KEY",
    "CHAIN_MISMATCH",
    "CHECKPOINT",
    "CHECKPOINT_DOMAIN",
    "GENESIS",
    "MAX_LINE",
    "SIGNED_FIELDS",
    "AuditKeys",
    "ChainState",
    "Head",
    "Problem",
    "canonical",
    "checkpoint_message",
    "line_of",
    "printable",
    "seal",
    "verify_files",
]

#: Hashes of this many recent records are kept to check the heads that later
#: checkpoints attest (the daemon gives up on a checkpoint long before that).
RECENT: Final = 1 << 20


def _show(value: object) -> str:
    """A record's value in a message: as JSON, cut short."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    message: str
    #: the file cannot be read as an audit log at all (not UTF-8, not JSON,
    #: a line too long...): signctl exits 2
    fatal: bool = False

    def __str__(self) -> str:
        return printable(f"{self.file}:{self.line}: {self.message}")


@dataclass
class ChainState:
    seq: int = 0
    hash: str = GENESIS
    records: int = 0
    problems: list[Problem] = field(default_factory=list)
    #: the first record's seq (0: none)
    first_seq: int = 0
    #: checkpoints whose signature verified
    checkpoints: int = 0
    #: checkpoints not checked (no public key given)
    unchecked: int = 0
    #: the newest record a verified checkpoint covers (0: none)
    covered: int = 0
    #: records after ``covered`` that no signature covers
    unprotected: int = 0
    #: the daemon's head was given, and the files reach it
    head_reached: bool = False


class _Fatal(Exception):
    pass


def _lines(f: BinaryIO) -> Iterable[tuple[int, bytes | None, str | None]]:
    """(line number, line without its newline or None, why it is unreadable)."""
    n = 0
    while True:
        raw = f.readline(MAX_LINE + 1)
        if not raw:
            return
        n += 1
        if len(raw) > MAX_LINE:
            while raw and not raw.endswith(b"\n"):  # skip the rest of it
                raw = f.readline(MAX_LINE)
            yield n, None, f"a line longer than {MAX_LINE} bytes: not an audit record"
            continue
        if not raw.endswith(b"\n"):
            yield n, None, "the last line is incomplete (a write cut short, or a cut file)"
            return
        yield n, raw[:-1], None


def _parse(raw: bytes) -> dict[str, Any]:
    """One line as an audit record.

    Raises:
        _Fatal: it is not one, with why.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Fatal(
            f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}): "
            "not an audit record"
        ) from None
    if "\x00" in text:
        raise _Fatal("a NUL byte: not an audit record")
    try:
        rec = json.loads(text)
    except RecursionError:
        raise _Fatal("JSON nested too deeply: not an audit record") from None
    except ValueError as exc:
        raise _Fatal(f"not JSON ({exc}): not an audit record") from None
    if not isinstance(rec, dict):
        raise _Fatal(f"JSON {type(rec).__name__}, not an object: not an audit record")
    seq, prev, digest = rec.get("seq"), rec.get("prev"), rec.get("hash")
    if type(seq) is not int or seq < 1 or not is_hash(prev) or not is_hash(digest):
        raise _Fatal("no valid seq, prev and hash: not an audit record")
    return rec


def verify_files(
    paths: Iterable[str],
    *,
    keys: AuditKeys | None = None,
    after: Head | None = None,
    head: Head | None = None,
) -> ChainState:
    """Check the chain through ``paths``, in order; every problem is listed.

    The chain must start at record 1, unless ``after`` says where the files
    that came before (archived) ended: then the first record must follow it.
    With ``keys``, every checkpoint's signature is checked, and the heads they
    attest must be the records found; a log with no verified checkpoint is a
    problem.  With ``head`` (the daemon's chain head), the files must reach it.
    Never raises on what the files contain.
    """
    state = ChainState()
    files: list[str] = []
    #: seq -> (hash, index in ``files``) of recent records
    recent: dict[int, tuple[str, int]] = {}
    checkpoint_seqs: list[int] = []
    for path in paths:
        files.append(path)
        try:
            f = open(path, "rb")
        except OSError as exc:
            state.problems.append(Problem(path, 0, f"cannot read: {exc.strerror}", fatal=True))
            continue
        with f:
            try:
                for n, raw, unreadable in _lines(f):
                    if unreadable is not None or raw is None:
                        fatal = not unreadable or "incomplete" not in unreadable
                        state.problems.append(Problem(path, n, str(unreadable), fatal=fatal))
                        continue
                    if not raw.strip():
                        continue
                    try:
                        rec = _parse(raw)
                    except _Fatal as exc:
                        state.problems.append(Problem(path, n, str(exc), fatal=True))
                        continue
                    _check(rec, path, n, files, state, recent, keys, after)
                    if (
                        rec.get("kind") == CHECKPOINT
                        and state.checkpoints
                        and (not checkpoint_seqs or checkpoint_seqs[-1] != rec["seq"])
                    ):
                        checkpoint_seqs.append(rec["seq"])
                    if len(recent) > RECENT:
                        del recent[next(iter(recent))]
            except OSError as exc:
                state.problems.append(Problem(path, 0, f"cannot read: {exc.strerror}", fatal=True))
    last = files[-1] if files else "-"
    if keys and state.records and state.checkpoints == 0:
        state.problems.append(
            Problem(
                last,
                0,
                f"no verified checkpoint in {state.records} records: nothing in these files "
                "is covered by a signature (rewritten, or cut before the first checkpoint)",
            )
        )
    after_cover = sum(1 for c in checkpoint_seqs if c > state.covered)
    state.unprotected = max(0, state.seq - max(state.covered, state.first_seq - 1) - after_cover)
    if state.checkpoints == 0:
        state.unprotected = state.records
    if head is not None:
        _check_head(head, state, recent, last)
    return state


def _check(
    rec: dict[str, Any],
    path: str,
    n: int,
    files: list[str],
    state: ChainState,
    recent: dict[int, tuple[str, int]],
    keys: AuditKeys | None,
    after: Head | None,
) -> None:
    seq: int = rec["seq"]
    prev: str = rec["prev"]
    digest: str = rec["hash"]
    problems = state.problems
    state.records += 1
    try:
        altered = hashlib.sha256(canonical(rec)).hexdigest() != digest
    except (UnicodeEncodeError, ValueError):  # a lone surrogate: no record of the daemon's
        altered = True
    if altered:
        problems.append(Problem(path, n, f"record {seq} was altered (hash mismatch)"))
    if state.records == 1:
        state.first_seq = seq
        start = after if after is not None else Head(0, GENESIS)
        if seq != start.seq + 1 or prev != start.hash:
            if after is None:
                problems.append(
                    Problem(
                        path,
                        n,
                        f"the log does not start at record 1 but at record {seq}: the oldest "
                        "file or the first records are missing (if older files were archived, "
                        "give --after SEQ:HASH, the last record they hold)",
                    )
                    if seq != 1
                    else Problem(path, n, "record 1 does not start the chain")
                )
            else:
                problems.append(
                    Problem(
                        path,
                        n,
                        f"the first record ({seq}) does not follow record {after.seq} with hash "
                        f"{after.hash[:16]}... (--after): records missing or replaced",
                    )
                )
    else:
        if seq != state.seq + 1:
            problems.append(
                Problem(
                    path,
                    n,
                    f"sequence jumps from {state.seq} to {seq} "
                    "(records deleted, inserted or reordered)",
                )
            )
        if prev != state.hash:
            problems.append(
                Problem(path, n, f"record {seq} does not follow record {state.seq} (chain broken)")
            )
    state.seq, state.hash = seq, digest
    recent[seq] = (digest, len(files) - 1)
    kind = rec.get("kind")
    if kind == CHECKPOINT:
        _check_checkpoint(rec, path, n, files, state, recent, keys, after)
    elif kind == CHAIN_MISMATCH:
        problems.append(
            Problem(
                path,
                n,
                f"record {seq}: the daemon started on a log that did not match the chain head "
                f"kept on the token ({_show(rec.get('detail'))}); what came before was removed "
                "or rewritten",
            )
        )


def _check_checkpoint(
    rec: dict[str, Any],
    path: str,
    n: int,
    files: list[str],
    state: ChainState,
    recent: dict[int, tuple[str, int]],
    keys: AuditKeys | None,
    after: Head | None,
) -> None:
    seq: int = rec["seq"]
    problems = state.problems
    head_seq, head_hash, file = rec.get("head_seq"), rec.get("head_hash"), rec.get("file")
    try:
        message = checkpoint_message(rec)
        sig = base64.b64decode(rec["sig"], validate=True)
        if type(head_seq) is not int or not is_hash(head_hash) or type(file) is not str:
            raise ValueError("bad head")
    except (KeyError, TypeError, ValueError, binascii.Error):
        problems.append(Problem(path, n, f"record {seq}: a malformed checkpoint"))
        return
    if not keys:
        state.unchecked += 1
        return
    if not keys.verify(rec.get("version"), sig, message):
        problems.append(
            Problem(
                path,
                n,
                f"record {seq}: the checkpoint's signature does not verify with the audit key "
                f"(version {_show(rec.get('version'))}): a forged or altered checkpoint",
            )
        )
        return
    if not 0 <= head_seq < seq:
        problems.append(Problem(path, n, f"record {seq}: a checkpoint of a later record"))
        return
    state.checkpoints += 1
    state.covered = max(state.covered, head_seq)
    found = recent.get(head_seq)
    expected: str
    if head_seq == 0:
        expected = GENESIS
    elif found is not None:
        expected = found[0]
    elif after is not None and head_seq == after.seq:
        expected = after.hash
    else:
        return  # in files not given (archived), or too long ago to check
    if head_hash != expected:
        problems.append(
            Problem(
                path,
                n,
                f"record {seq}: the checkpoint signs record {head_seq} with hash "
                f"{str(head_hash)[:16]}..., but that record's hash is {expected[:16]}...: "
                "records were rewritten",
            )
        )
    elif found is not None and head_seq != 0:
        # The checkpoint names the file its head is in: a file renamed or
        # swapped for another with the same records shows here.
        name = os.path.basename(files[found[1]])
        if name != file:
            problems.append(
                Problem(
                    path,
                    n,
                    f"record {seq}: the checkpoint says record {head_seq} is in {_show(file)}, "
                    f"but it is in {_show(name)}",
                )
            )


def _check_head(
    head: Head, state: ChainState, recent: dict[int, tuple[str, int]], last: str
) -> None:
    """The files against the daemon's chain head (its newest checkpoint)."""
    if head.seq > state.seq:
        state.problems.append(
            Problem(
                last,
                0,
                f"these files end at record {state.seq}, but the daemon's newest checkpoint "
                f"covers record {head.seq}: records were removed from the end (the last "
                "records, or the newest file)",
            )
        )
        return
    found = recent.get(head.seq)
    if found is not None:
        if found[0] != head.hash:
            state.problems.append(
                Problem(
                    last,
                    0,
                    f"record {head.seq} is not the one the daemon's newest checkpoint covers "
                    "(its hash differs): records were rewritten",
                )
            )
            return
        state.head_reached = True
