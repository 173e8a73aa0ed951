"""The worker protocol: what the daemon and a token worker say to each other.

Sans-IO, in the manner of h11: bytes in, typed messages out, and back; no
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

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final, Generic, NamedTuple, TypeVar

import msgpack

from ..errors import ErrorCode, InternalError, WireError, error_from_wire
from ..keys.algorithms import Scheme
from ..protocol import HEADER, FrameDecoder

__all__ = [
    "CALLS",
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
    "decode_request",
    "encode_answer",
    "encode_failure",
    "encode_jobs",
    "encode_lost",
    "encode_request",
    "error_from_ipc",
    "error_to_ipc",
    "failed",
    "frame",
]

#: The worker channel is trusted; a key listing of many RSA keys is large.
IPC_MAX_FRAME: Final = 256 << 20
#: The tag of the message a worker sends when it found the token gone.
LOST_TAG: Final = 0
#: The tag of the first call, ``Open`` (the daemon's other tags count up from 1).
OPEN_TAG: Final = -1

_SIGN: Final = "s"
_VERIFY: Final = "v"
_SCHEMES: Final[Mapping[str, Scheme]] = {s.value: s for s in Scheme}

#: One job's outcome: ``[True, value]`` or ``[False, code, message]``.
Outcome = list[Any]


class IpcError(InternalError):
    """A message that breaks the worker protocol (a bug, or a stray process:
    the channel is trusted, so there is no other cause).  ``tag`` is the
    request's, when it could be read (so that it can be answered)."""

    def __init__(self, message: str, tag: int | None = None) -> None:
        super().__init__(message)
        self.tag = tag


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


# ---------------------------------------------------------------- jobs


# Jobs are NamedTuples, not dataclasses: a worker builds one per signature,
# and a tuple is built several times faster (see ``_job``).


class SignJob(NamedTuple):
    """One signature for a worker: which key, how, and over what."""

    object_id: bytes
    scheme: Scheme
    hash: str | None
    data: bytes

    def to_ipc(self) -> list[Any]:
        return [_SIGN, self.object_id, self.scheme.value, self.hash, self.data]


class VerifyJob(NamedTuple):
    """One verification for a worker: no token, only ``cryptography``.

    Workers take verifications too so that a busy daemon verifies on every
    core, not only on its own.  ``candidates`` are (version, SPKI DER),
    newest first; the outcome is ``[version, algorithm]`` or None (invalid).
    """

    key_type: str
    candidates: tuple[tuple[int, bytes], ...]
    args: dict[str, Any]  # the request's VerifyArgs, as on the wire

    def to_ipc(self) -> list[Any]:
        return [_VERIFY, self.key_type, [list(c) for c in self.candidates], self.args]


_new = tuple.__new__


def _jobs(rows: list[Any]) -> list[SignJob | VerifyJob]:
    """Jobs from their rows: the worker's hot path, one loop, no call per job.

    Raises: IpcError (a row that is not a job).
    """
    jobs: list[SignJob | VerifyJob] = []
    append = jobs.append
    schemes = _SCHEMES
    try:
        for row in rows:
            if row[0] == _SIGN:
                _, object_id, scheme, hash_name, data = row
                append(_new(SignJob, (object_id, schemes[scheme], hash_name, data)))
            elif row[0] == _VERIFY:
                _, key_type, candidates, args = row
                append(VerifyJob(key_type, tuple((v, spki) for v, spki in candidates), args))
            else:
                raise IpcError(f"not a job: {row!r:.80}")
    except (ValueError, KeyError, TypeError, IndexError):
        raise IpcError(f"not a list of jobs: {rows!r:.80}") from None
    return jobs


@dataclass(frozen=True, slots=True)
class Batch:
    """What a worker answers to ``RunJobs``: the token's seconds for the
    batch, and an outcome row per job, in order."""

    seconds: float
    outcomes: list[Outcome]


# ---------------------------------------------------------------- answers of the rare calls


@dataclass(frozen=True, slots=True)
class TokenInfo:
    label: str
    manufacturer: str
    model: str
    serial: str
    #: mechanism names (``CKM_ECDSA``; ``0x8000001f`` for one PKCS#11 does not name)
    mechanisms: list[str]
    #: key type -> None if the token can make and sign with it, else why not
    key_types: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class MetadataBlob:
    name: str
    revision: int
    value: bytes


# ---------------------------------------------------------------- calls

R = TypeVar("R")


class Call(Generic[R]):
    """A request to a worker whose answer is an ``R``.

    Subclasses are frozen dataclasses: their fields, in order, are the
    request's ``args``; ``encode_result`` (worker) and ``decode_result``
    (daemon) carry the answer.
    """

    __slots__ = ()
    OP: ClassVar[str]

    def to_args(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(self)]  # type: ignore[arg-type]

    @classmethod
    def from_args(cls, args: list[Any]) -> Call[R]:
        """Raises: IpcError (wrong arguments)."""
        try:
            return cls(*args)
        except TypeError:
            raise IpcError(f"wrong arguments for {cls.OP}: {args!r:.80}") from None

    @staticmethod
    def encode_result(result: Any) -> Any:
        return result

    @staticmethod
    def decode_result(value: Any) -> Any:
        return value


@dataclass(frozen=True, slots=True)
class Open(Call[TokenInfo]):
    """The first call: load the module, find the token, log in."""

    OP: ClassVar[str] = "open"
    module: str
    token_label: str
    pin: str = field(repr=False)
    log_level: str
    #: seconds the worker polls for the next batch before it sleeps
    spin: float
    #: the token profile's name (see ``profiles.py``)
    profile: str

    @staticmethod
    def encode_result(result: TokenInfo) -> Any:
        return [
            result.label,
            result.manufacturer,
            result.model,
            result.serial,
            result.mechanisms,
            result.key_types,
        ]

    @staticmethod
    def decode_result(value: Any) -> TokenInfo:
        return TokenInfo(*value)


@dataclass(frozen=True, slots=True)
class RunJobs(Call[Batch]):
    """Sign and verify: the hot path (see ``encode_jobs``)."""

    OP: ClassVar[str] = "jobs"
    jobs: Sequence[SignJob | VerifyJob]

    def to_args(self) -> list[Any]:
        return [[job.to_ipc() for job in self.jobs]]

    @classmethod
    def from_args(cls, args: list[Any]) -> RunJobs:
        """Raises: IpcError (not a list of jobs)."""
        try:
            (rows,) = args
        except (ValueError, TypeError):
            raise IpcError(f"wrong arguments for jobs: {args!r:.80}") from None
        return cls(_jobs(rows))

    @staticmethod
    def encode_result(result: Batch) -> Any:
        return [result.seconds, result.outcomes]

    @staticmethod
    def decode_result(value: Any) -> Batch:
        seconds, outcomes = value
        return Batch(seconds, outcomes)


@dataclass(frozen=True, slots=True)
class PublicKeys(Call[dict[bytes, tuple[bytes, bool]]]):
    """(SPKI DER, whether its private key exists) by object id, for each id
    with exactly one public key."""

    OP: ClassVar[str] = "public_keys"
    object_ids: list[bytes]

    @staticmethod
    def encode_result(result: dict[bytes, tuple[bytes, bool]]) -> Any:
        return [[oid, spki, has_private] for oid, (spki, has_private) in result.items()]

    @staticmethod
    def decode_result(value: Any) -> dict[bytes, tuple[bytes, bool]]:
        return {oid: (spki, has_private) for oid, spki, has_private in value}


@dataclass(frozen=True, slots=True)
class LoadMetadata(Call[list[MetadataBlob]]):
    """The newest record of one key (``name``), or of every key (None)."""

    OP: ClassVar[str] = "load_metadata"
    name: str | None

    @staticmethod
    def encode_result(result: list[MetadataBlob]) -> Any:
        return [[b.name, b.revision, b.value] for b in result]

    @staticmethod
    def decode_result(value: Any) -> list[MetadataBlob]:
        return [MetadataBlob(n, r, v) for n, r, v in value]


@dataclass(frozen=True, slots=True)
class Revisions(Call[list[int]]):
    """The revisions of a key's record on the token (normally one)."""

    OP: ClassVar[str] = "revisions"
    name: str


@dataclass(frozen=True, slots=True)
class CreateMetadata(Call[None]):
    """Store a revision of a key's record (the writer only)."""

    OP: ClassVar[str] = "create_metadata"
    name: str
    revision: int
    value: bytes


@dataclass(frozen=True, slots=True)
class DropCreated(Call[None]):
    """Take back the record ``CreateMetadata`` stored last (the writer only)."""

    OP: ClassVar[str] = "drop_created"


@dataclass(frozen=True, slots=True)
class DropOlder(Call[None]):
    """Delete the revisions of a key's record older than ``revision``."""

    OP: ClassVar[str] = "drop_older"
    name: str
    revision: int


@dataclass(frozen=True, slots=True)
class Generate(Call[bytes]):
    """Generate a keypair; the answer is its SPKI DER."""

    OP: ClassVar[str] = "generate"
    key_type: str
    object_id: bytes
    label: str


@dataclass(frozen=True, slots=True)
class DestroyKeys(Call[int]):
    """Delete a private key (and its public key if ``public``); the answer
    is how many objects went."""

    OP: ClassVar[str] = "destroy_keys"
    object_id: bytes
    public: bool


@dataclass(frozen=True, slots=True)
class Probe(Call[None]):
    """Is the token still there?  (An error answer, then ``Lost``, if not.)"""

    OP: ClassVar[str] = "probe"


#: Every call by its op name.
CALLS: Final[Mapping[str, type[Call[Any]]]] = {
    c.OP: c
    for c in (
        Open,
        RunJobs,
        PublicKeys,
        LoadMetadata,
        Revisions,
        CreateMetadata,
        DropCreated,
        DropOlder,
        Generate,
        DestroyKeys,
        Probe,
    )
}


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded request: its tag and its call."""

    tag: int
    call: Call[Any]


@dataclass(frozen=True, slots=True)
class Answer:
    """A decoded answer: the (still encoded) result, or the error."""

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
            return Answer(tag, value)
        tag, _, code, message = msg
    except ValueError:
        raise IpcError(f"not an answer: {msg!r:.80}") from None
    if tag == LOST_TAG:
        return Lost(message)
    return Answer(tag, error=error_from_ipc(code, message))
