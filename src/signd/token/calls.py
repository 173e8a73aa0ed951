"""The worker protocol's vocabulary: the jobs, the calls and their answers.

``ipc.py`` encodes them (and re-exports them: the daemon imports both from
there).  No PKCS#11 here either.  A ``Call`` is a frozen dataclass whose
fields, in order, are the request's ``args``; its ``encode_result`` (in the
worker) and ``decode_result`` (in the daemon) carry its answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final, Generic, NamedTuple, TypeVar

from ..errors import InternalError
from ..keys.algorithms import Scheme

__all__ = [
    "jobs_from_rows",
    "CALLS",
    "Batch",
    "Call",
    "CreateMetadata",
    "DestroyKeys",
    "DropCreated",
    "DropOlder",
    "Generate",
    "IpcError",
    "LoadMetadata",
    "MetadataBlob",
    "Open",
    "Outcome",
    "Probe",
    "PublicKeys",
    "Revisions",
    "RunJobs",
    "SignJob",
    "TokenInfo",
    "VerifyJob",
    "BackupMac",
    "RestoreKeypair",
    "VerifyBackupMac",
    "WrapCheckValue",
    "WrapPrivate",
    "ImportPublic",
    "ImportKeypair",
]

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
    core, not only on its own.  ``candidates`` are (version, SPKI DER, as the
    daemon holds them), newest first.  The rest is the request's own values
    (a job is an ``algorithms.VerifyInput``; the worker checks the options,
    which costs the daemon's loop nothing) and ``sha256``: the SHA-256 of
    ``message`` if the daemon had it (its audit record's), which a SHA-256
    algorithm verifies instead of hashing again.  The outcome is
    ``[version, algorithm]`` or None (invalid).

    An HMAC key has no public key: its candidates are (version, object id)
    and the worker has the token compute the MAC (``TokenSession.verify_mac``).
    """

    key_type: str
    candidates: tuple[tuple[int, bytes], ...]
    message: bytes | None
    digest: bytes | None
    hash: str | None
    padding: str | None
    format: str | None
    signature: bytes
    sha256: bytes | None = None

    def to_ipc(self) -> list[Any]:
        return [_VERIFY, *self]


_new = tuple.__new__


def jobs_from_rows(rows: list[Any]) -> list[SignJob | VerifyJob]:
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
                _, key_type, candidates, msg, digest, h, pad, fmt, sig, sha256 = row
                pairs = tuple((v, spki) for v, spki in candidates)
                append(_new(VerifyJob, (key_type, pairs, msg, digest, h, pad, fmt, sig, sha256)))
            else:
                raise IpcError(f"not a job: {row!r:.80}")
    except (ValueError, KeyError, TypeError, IndexError):
        raise IpcError(f"not a list of jobs: {rows!r:.80}") from None
    return jobs


class Batch(NamedTuple):
    """What a worker answers to ``RunJobs``: the token's seconds for the
    batch, and an outcome row per job, in order.  A NamedTuple, as the jobs
    are: one is built on each side per batch (per signature, for a lone
    client), and ``_new`` builds it without a call into Python."""

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
        return cls(jobs_from_rows(rows))

    @staticmethod
    def encode_result(result: Batch) -> Any:
        return [result.seconds, result.outcomes]

    @staticmethod
    def decode_result(value: Any) -> Batch:
        seconds, outcomes = value
        return _new(Batch, (seconds, outcomes))


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
    """Generate a keypair; the answer is its SPKI DER.  ``backup``: its private
    key is exportable wrapped under the token's wrap key (the worker checks
    that the token can wrap it, and refuses otherwise)."""

    OP: ClassVar[str] = "generate"
    key_type: str
    object_id: bytes
    label: str
    backup: bool = False


@dataclass(frozen=True, slots=True)
class DestroyKeys(Call[int]):
    """Delete a private key (and its public key if ``public``); the answer
    is how many objects went."""

    OP: ClassVar[str] = "destroy_keys"
    object_id: bytes
    public: bool


@dataclass(frozen=True, slots=True)
class WrapPrivate(Call[bytes]):
    """A backup-able private key wrapped under the token's wrap key."""

    OP: ClassVar[str] = "wrap_private"
    object_id: bytes


@dataclass(frozen=True, slots=True)
class WrapCheckValue(Call["str | None"]):
    """The check value of the token's wrap key (None: the token has none recorded)."""

    OP: ClassVar[str] = "wrap_check_value"


@dataclass(frozen=True, slots=True)
class BackupMac(Call[bytes]):
    """HMAC-SHA256 over ``data`` with the token's backup MAC key."""

    OP: ClassVar[str] = "backup_mac"
    data: bytes


@dataclass(frozen=True, slots=True)
class VerifyBackupMac(Call[bool]):
    """Whether ``mac`` is the backup MAC key's HMAC-SHA256 over ``data``."""

    OP: ClassVar[str] = "verify_backup_mac"
    data: bytes
    mac: bytes


@dataclass(frozen=True, slots=True)
class RestoreKeypair(Call[None]):
    """Put a keypair from a backup on the token: its public key from ``spki``
    and, unless None, its private key unwrapped from ``wrapped`` (checked
    against the public key); nothing is left on a failure."""

    OP: ClassVar[str] = "restore_keypair"
    key_type: str
    object_id: bytes
    label: str
    spki: bytes
    wrapped: bytes | None


@dataclass(frozen=True, slots=True)
class ImportPublic(Call[tuple[bytes, str]]):
    """The token's import key (made if it has none): its SPKI DER and id."""

    OP: ClassVar[str] = "import_public"

    @staticmethod
    def encode_result(result: tuple[bytes, str]) -> Any:
        return list(result)

    @staticmethod
    def decode_result(value: Any) -> tuple[bytes, str]:
        spki, key_id = value
        return bytes(spki), str(key_id)


@dataclass(frozen=True, slots=True)
class ImportKeypair(Call[bytes]):
    """Put an imported keypair on the token: its public key from ``spki``, its
    private key unwrapped from a client's two layers under the import key
    ``import_key_id``; the answer is its SPKI DER.  Nothing is left on a failure."""

    OP: ClassVar[str] = "import_keypair"
    key_type: str
    object_id: bytes
    label: str
    import_key_id: str
    wrapped_key: bytes = field(repr=False)
    wrapped_material: bytes = field(repr=False)
    spki: bytes
    backup: bool


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
        WrapPrivate,
        WrapCheckValue,
        BackupMac,
        VerifyBackupMac,
        RestoreKeypair,
        Probe,
        ImportPublic,
        ImportKeypair,
    )
}
