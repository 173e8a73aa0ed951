"""The worker protocol: what the daemon and a token worker say to each other.

The calls, jobs and answers themselves are in ``calls.py`` (and re-exported
here).  Sans-IO, in the manner of h11: bytes in, typed messages out, and back; no
socket, no process and no PKCS#11 here (this module must never import
``pkcs11``: the daemon process imports it, and never loads python-pkcs11).

Every message is one frame (the wire's 4-byte length prefix and a msgpack
body) on a socketpair the daemon trusts:

* a request ``[tag, op, args]``: ``op`` names a ``Call`` class, ``args`` are
  its fields in order (``Call.to_args`` / ``Call.from_args``);
* an answer ``[tag, True, result]`` or ``[tag, False, code, message]``: the
  result as the call's ``encode_result`` made it, or a signd error by its
  wire code (``error_to_ipc`` / ``error_from_ipc``);
* an answer with tag ``LOST_TAG`` (0) is not an answer: the worker found the
  token gone, and exits (``Lost``).

The hot path is ``RunJobs``: a batch of ``SignJob`` / ``VerifyJob`` rows,
answered by ``Batch`` (the token's seconds and one outcome row per job,
``[True, value]`` or ``[False, code, message]``).  Jobs travel as short
positional lists, as cheap to pack as anything msgpack knows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, TypeVar

import msgpack

from ..errors import ErrorCode, WireError, error_from_wire
from ..protocol import HEADER, FrameDecoder
from .calls import (
    CALLS,
    BackupMac,
    Batch,
    Call,
    CreateMetadata,
    DestroyKeys,
    DropCreated,
    DropOlder,
    Generate,
    ImportKeypair,
    ImportPublic,
    IpcError,
    LoadMetadata,
    MetadataBlob,
    Open,
    Outcome,
    Probe,
    PublicKeys,
    RestoreKeypair,
    Revisions,
    RunJobs,
    SignJob,
    TokenInfo,
    VerifyBackupMac,
    VerifyJob,
    WrapCheckValue,
    WrapPrivate,
    jobs_from_rows,
)

__all__ = [
    "CALLS",
    "BackupMac",
    "RestoreKeypair",
    "VerifyBackupMac",
    "WrapCheckValue",
    "WrapPrivate",
    "ImportKeypair",
    "ImportPublic",
    "IPC_MAX_FRAME",
    "LOST_TAG",
    "OPEN_TAG",
    "Answer",
    "Batch",
    "Call",
    "CreateMetadata",
    "DestroyKeys",
    "DropCreated",
    "DropOlder",
    "Generate",
    "IpcDecoder",
    "IpcError",
    "LoadMetadata",
    "Lost",
    "MetadataBlob",
    "Open",
    "Outcome",
    "Probe",
    "PublicKeys",
    "Request",
    "Revisions",
    "RunJobs",
    "SignJob",
    "TokenInfo",
    "VerifyJob",
    "decode_answer",
    "decode_jobs",
    "decode_request",
    "encode_answer",
    "encode_batch",
    "encode_failure",
    "encode_jobs",
    "encode_lost",
    "encode_request",
    "error_from_ipc",
    "error_to_ipc",
    "failed",
    "frame",
]

_new = tuple.__new__

#: The worker channel is trusted; a key listing of many RSA keys is large.
IPC_MAX_FRAME: Final = 256 << 20
#: The tag of the message a worker sends when it found the token gone.
LOST_TAG: Final = 0
#: The tag of the first call, ``Open`` (the daemon's other tags count up from 1).
OPEN_TAG: Final = -1

# ---------------------------------------------------------------- framing


def frame(obj: Any) -> bytes:
    """One message as a frame: the length prefix, then its msgpack body."""
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


class IpcDecoder:
    """Splits the bytes from the other side into message bodies' contents.

    ``receive_data`` takes bytes as they come (any cut); ``messages`` yields
    every complete message, decoded.

    Raises (from ``messages``): FrameTooLarge (a frame over ``IPC_MAX_FRAME``:
    the stream cannot be read any further), IpcError (a body that is not msgpack).
    """

    __slots__ = ("_frames",)

    def __init__(self, max_frame: int = IPC_MAX_FRAME) -> None:
        self._frames = FrameDecoder(max_frame)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._frames.receive_data(data)

    @property
    def buffered(self) -> int:
        return self._frames.buffered

    def messages(self) -> Iterator[list[Any]]:
        for body in self._frames.frames():
            try:
                msg = msgpack.unpackb(body, raw=False)
            except Exception as exc:  # msgpack raises several unrelated types
                raise IpcError(f"a worker message is not msgpack: {exc}") from None
            if type(msg) is not list or len(msg) < 2:
                raise IpcError(f"a worker message is not a list of two or more: {msg!r:.80}")
            yield msg


# ---------------------------------------------------------------- errors


def error_to_ipc(err: WireError) -> tuple[int, str]:
    """The (code, message) a signd error travels as."""
    return int(err.code), err.message


def error_from_ipc(code: int, message: str) -> WireError:
    """The signd error of a wire code (``UnknownWireError`` for a code this
    version does not know; no exception is raised)."""
    try:
        name = ErrorCode(code).name.lower()
    except ValueError:
        name = "unknown"
    return error_from_wire(code, name, message)


def failed(err: WireError) -> Outcome:
    """A job's outcome row for ``err``."""
    return [False, int(err.code), err.message]


# ---------------------------------------------------------------- messages

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded request: its tag and its call."""

    tag: int
    call: Call[Any]


class Answer(NamedTuple):
    """A decoded answer: the (still encoded) result, or the error.  A
    NamedTuple: the daemon decodes one per batch a worker answers (per
    signature, for a lone client), and ``_new`` builds it without a call
    into Python."""

    tag: int
    value: Any = None
    error: WireError | None = None


@dataclass(frozen=True, slots=True)
class Lost:
    """The worker found the token gone (it exits after saying so)."""

    reason: str  # "token lost: " and what the worker saw


def encode_request(tag: int, call: Call[Any]) -> bytes:
    return frame([tag, call.OP, call.to_args()])


def encode_jobs(tag: int, jobs: Sequence[SignJob | VerifyJob]) -> bytes:
    """``RunJobs(jobs)``'s frame, without building the call (the hot path)."""
    return frame([tag, "jobs", [[job.to_ipc() for job in jobs]]])


def decode_jobs(msg: list[Any]) -> tuple[int, list[SignJob | VerifyJob]] | None:
    """The tag and jobs of a ``RunJobs`` request, or None for any other
    message (``decode_request`` then): the worker's hot path, without a
    ``Request`` or a call object.

    Raises: IpcError (rows that are not jobs; ``.tag`` says which request).
    """
    if len(msg) != 3 or msg[1] != RunJobs.OP or type(msg[2]) is not list or len(msg[2]) != 1:
        return None
    tag = msg[0]
    try:
        return tag, jobs_from_rows(msg[2][0])
    except IpcError as exc:
        exc.tag = tag
        raise


def encode_batch(tag: int, batch: Batch) -> bytes:
    """``encode_answer`` of a ``RunJobs``, the worker's hot path."""
    return frame([tag, True, RunJobs.encode_result(batch)])


def decode_request(msg: list[Any]) -> Request:
    """A request from a message ``IpcDecoder.messages`` yielded.

    Raises: IpcError (an unknown op, or wrong arguments; ``.tag`` says which
    request, so that it can be answered).
    """
    try:
        tag, op, args = msg
    except ValueError:
        raise IpcError(f"not a request: {msg!r:.80}") from None
    cls = CALLS.get(op)
    if cls is None:
        raise IpcError(f"unknown worker operation {op!r}", tag)
    try:
        return Request(tag, cls.from_args(args))
    except IpcError as exc:
        exc.tag = tag
        raise


def encode_answer(tag: int, call: Call[R], result: R) -> bytes:
    return frame([tag, True, call.encode_result(result)])


def encode_failure(tag: int, err: WireError) -> bytes:
    return frame([tag, False, int(err.code), err.message])


def encode_lost(reason: str) -> bytes:
    return frame([LOST_TAG, False, int(ErrorCode.TOKEN_UNAVAILABLE), f"token lost: {reason}"])


def decode_answer(msg: list[Any]) -> Answer | Lost:
    """An answer (or the token's loss) from a message ``IpcDecoder.messages`` yielded.

    Raises: IpcError (not an answer).
    """
    try:
        if msg[1] is True:
            tag, _, value = msg
            return _new(Answer, (tag, value, None))
        tag, _, code, message = msg
    except ValueError:
        raise IpcError(f"not an answer: {msg!r:.80}") from None
    if tag == LOST_TAG:
        return Lost(message)
    return Answer(tag, error=error_from_ipc(code, message))
