"""Audit records: what the event loop notes per request, and how the writer
thread encodes it as the canonical JSON line ``signd_client.audit`` verifies.

A record is written exactly as ``signd_client.audit.canonical`` would write
it (sorted keys, compact, ensure_ascii=False), or its hash would not verify.
``json.dumps`` costs several microseconds per record (it builds an encoder per
call, sorts, and formats through generic code); the record's shape is fixed,
so ``seal_entry`` fills a template in sorted key order, and ``_json`` encodes
each value the way ``json.dumps`` does.  The tests check the result against
``canonical`` byte for byte.

Records never hold signed data or PINs: only the SHA-256 of what was signed.
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring
from typing import Any, Protocol

import msgpack

from signd_client.audit import line_of

from ..access.policy import Principal
from ..protocol import HEADER, Message, Request
from .facts import Outcome

__all__ = [
    "Entry",
    "Notes",
    "Recipient",
    "Who",
    "data_digest",
    "notes_of",
    "seal_entry",
    "seal_request",
    "who_fields",
]


class Recipient(Protocol):
    """Who gets an answer once its record is written (a connection)."""

    def audited(self, request_id: int | None, frame: bytes, ok: bool) -> None:
        """``frame``'s record is written (durably, in strict mode) if ``ok``;
        if not, the answer must be withheld.  Runs in trio."""


#: A connection's principal as canonical JSON values, (exe, gid, pid, uid, user):
#: the same on every record of the connection, so encoded once (``who_fields``).
Who = tuple[str, str, str, str, str]
#: What a request's record needs from the request, noted when it is read
#: (``notes_of``): (op, key, SHA-256 of its data (raw, see ``data_digest``),
#: items, version, time.perf_counter_ns()).
Notes = tuple[str, str | None, bytes | None, int | None, int | None, int]
#: What the loop queues per answer: (who, the request's notes or None when the
#: answer is to no known request, perf_counter_ns of the answer, the answer's
#: frame, its outcome (None: read it from the frame, for callers that do not
#: pass one yet), whom to hand the frame back to or None (relaxed mode), the
#: request id).
Entry = tuple[Who, Notes | None, int, bytes, Outcome | None, Recipient | None, int | None]


def data_digest(args: Message) -> tuple[bytes | None, int | None]:
    """SHA-256 of what a request asks to sign or verify, and its item count.

    One ``message`` (or ``digest``): its SHA-256, which for a SHA-256
    algorithm is the very digest that is signed, so the signing path may use
    it instead of hashing the message again.  A batch: the SHA-256 of its
    items' SHA-256 digests, one after the other."""
    for single in ("message", "digest"):
        value = getattr(args, single, None)
        if value is not None:
            return hashlib.sha256(value).digest(), None
    for many in ("messages", "digests"):
        values = getattr(args, many, None)
        if values is not None:
            h = hashlib.sha256()
            for v in values:
                h.update(hashlib.sha256(v).digest())
            return h.digest(), len(values)
    return None, None


def notes_of(request: Request, now: int) -> Notes:
    """What ``request``'s record needs from it; ``now`` is ``time.perf_counter_ns()``
    when it was read.  Plain values only, so that the request itself can go."""
    args = request.args
    digest, items = data_digest(args)
    # A request naming a key version (disable, enable, destroy...) is recorded
    # with that version; others with the version their answer names.
    version = getattr(args, "version", None)
    return (request.op, getattr(args, "key", None), digest, items, version, now)


def _json(value: object) -> str:
    """``value`` as canonical JSON, exactly as ``json.dumps`` in ``canonical`` writes it."""
    if type(value) is str:
        # The very function json.dumps(ensure_ascii=False) uses for strings.
        return encode_basestring(value)
    if type(value) is int:  # not bool, an int subclass; json.dumps uses int.__repr__
        return int.__repr__(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    # Anything else (a float, a container): rare, and json.dumps is the reference.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _utf8(text: str | None) -> str | None:
    """``text`` as valid Unicode.  A path or user name the kernel gives in bytes that
    are not UTF-8 decodes to lone surrogates (``surrogateescape``), which cannot be
    written as UTF-8; such bytes are written as ``\\xNN`` instead."""
    if text is None:
        return None
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that surrogateescape did not make
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def who_fields(who: Principal) -> Who:
    """The principal's part of a record, encoded once per connection."""
    return (
        _json(_utf8(who.exe)),
        _json(who.gid),
        _json(who.pid),
        _json(who.uid),
        _json(_utf8(who.user)),
    )


def _result_fields(outcome: Outcome) -> tuple[str, str, int | None, str]:
    """(result, code, the version the answer names, the ``valid`` member) as JSON."""
    error = outcome.error
    if error is not None:
        return _json(error.name), int.__repr__(int(error.code)), None, ""
    valid = outcome.valid
    return '"ok"', "0", outcome.version, "" if valid is None else f',"valid":{_json(valid)}'


def _frame_fields(frame: bytes) -> tuple[str, str, Any, str]:
    """``_result_fields`` of an answer that came without its outcome, read from
    its frame (compatibility: goes once every caller passes an ``Outcome``).

    Raises:
        Exception: the frame cannot be decoded.
    """
    answer = msgpack.unpackb(frame[HEADER.size :])
    error = answer.get("error")
    if error is not None:
        return _json(error.get("name")), _json(error.get("code")), None, ""
    value = answer.get("result") or {}
    # A create or rotate names the version it made (a replay of one by its
    # idempotency key too, whatever was rotated since).
    version = value.get("version", value.get("created_version", value.get("current_version")))
    valid = f',"valid":{_json(value["valid"])}' if "valid" in value else ""
    return '"ok"', "0", version, valid


def seal_entry(
    entry: Entry, seq: int, prev: str, clock_offset: int, request: int | None = None
) -> tuple[bytes, str]:
    """The record of one answer, chained after ``prev``: (its line with newline, its hash).

    ``clock_offset`` is ``time.time_ns() - time.perf_counter_ns()``, read by
    the writer once per batch, so that the loop reads one clock per request.
    With ``request`` (the seq of the request's own record, written earlier)
    it is an outcome record: ``"phase":"outcome"`` and ``"request"`` added.

    Raises:
        Exception: the record cannot be encoded; the caller withholds that answer.
    """
    (exe, gid, pid, uid, user), notes, ended, frame, outcome, _, _ = entry
    if notes is not None:
        op_, key_, digest, items, version, started = notes
        op, key = _json(op_), _json(key_)
        data = "" if digest is None else f'"data_sha256":"{digest.hex()}",'
        counted = "" if items is None else f'"items":{_json(items)},'
        # µs resolution for both, written by float.__repr__ as json.dumps does.
        latency = f'"latency_ms":{float.__repr__((ended - started) // 1000 / 1e3)},'
    else:  # an answer to no known request: when it was answered, nothing else
        op = key = "null"
        data = counted = latency = ""
        version = None
        started = ended
    ts = float.__repr__((started + clock_offset) // 1000 / 1e6)

    if outcome is not None:
        result, code, named, valid = _result_fields(outcome)
    else:
        result, code, named, valid = _frame_fields(frame)
    if version is None:
        version = named
    versioned = "" if version is None else f',"version":{_json(version)}'
    phase = asked = ""
    if request is not None:
        phase, asked = '"phase":"outcome",', f'"request":{int.__repr__(request)},'

    # Every member in sorted key order; the optional ones carry their own comma.
    body = (
        f'{{"code":{code},{data}"exe":{exe},"gid":{gid},{counted}"key":{key},{latency}'
        f'"op":{op},{phase}"pid":{pid},"prev":"{prev}",{asked}"result":{result},"seq":{seq},'
        f'"ts":{ts},"uid":{uid},"user":{user}{valid}{versioned}}}'
    )
    return line_of(body.encode())


def seal_request(
    who: Who, notes: Notes, seq: int, prev: str, clock_offset: int
) -> tuple[bytes, str]:
    """The record of a request whose answer is not ready yet, chained after
    ``prev``: who asked for what, ``"phase":"request"``, no result.  Its
    outcome follows in a later record naming this one's seq in ``request``.
    (``clock_offset`` as for ``seal_entry``.)
    """
    exe, gid, pid, uid, user = who
    op, key, digest, items, version, started = notes
    data = "" if digest is None else f'"data_sha256":"{digest.hex()}",'
    counted = "" if items is None else f'"items":{_json(items)},'
    versioned = "" if version is None else f',"version":{_json(version)}'
    ts = float.__repr__((started + clock_offset) // 1000 / 1e6)
    body = (
        f'{{{data}"exe":{exe},"gid":{gid},{counted}"key":{_json(key)},"op":{_json(op)},'
        f'"phase":"request","pid":{pid},"prev":"{prev}","seq":{seq},"ts":{ts},'
        f'"uid":{uid},"user":{user}{versioned}}}'
    )
    return line_of(body.encode())
