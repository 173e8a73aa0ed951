"""signd's wire format, sans-IO.  The one place in Python that defines it.

A connection carries *frames* both ways: a 4-byte big-endian unsigned length,
then that many bytes of msgpack.  Every frame body is a map:

* request:  ``{"v": 1, "id": <uint>, "op": <str>, "args": <map>}``
* response: ``{"v": 1, "id": <uint|nil>, "result": <map>}`` or
  ``{"v": 1, "id": <uint|nil>, "error": {"code", "name", "message"}}``

Nothing here touches a socket (compare h11): ``FrameDecoder`` is fed bytes and
hands back events; ``encode_*`` turn messages into bytes.  The daemon and
every Python client use this module, and ``PROTOCOL.md`` plus the golden
frames in ``tests/vectors/`` pin it down for other languages.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import struct
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, TypeVar, Union

import msgpack

from .errors import (
    FrameTooLarge,
    InvalidArgument,
    InvalidRequest,
    MalformedFrame,
    ProtocolViolation,
    UnknownOperation,
    UnsupportedVersion,
    WireError,
    error_from_wire,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "MAX_RESPONSE_FRAME",
    "MAX_BATCH",
    "MAX_JWKS_KEYS",
    "AuditHead",
    "MAX_VERSION",
    "BatchItem",
    "ErrorInfo",
    "SignBatchArgs",
    "SignBatchResult",
    "HEADER",
    "IDEMPOTENCY_KEY_OPS",
    "IDEMPOTENCY_KEY_RE",
    "IDEMPOTENT_OPS",
    "KEY_NAME_RE",
    "KEY_TYPES",
    "MAX_REQUEST_ID",
    "OPS",
    "PROTOCOL_VERSION",
    "BadRequest",
    "CreateKeyArgs",
    "DestroyArgs",
    "Empty",
    "FrameDecoder",
    "Health",
    "KeyGrant",
    "KeyInfo",
    "KeyList",
    "KeyRefArgs",
    "KeySummary",
    "Message",
    "OpSpec",
    "Retry",
    "Jwk",
    "Jwks",
    "JwksArgs",
    "PublicKey",
    "PublicKeyArgs",
    "Request",
    "Response",
    "RotateArgs",
    "SignArgs",
    "SignResult",
    "TokenStatus",
    "UpdateKeyArgs",
    "VerifyArgs",
    "VerifyResult",
    "VersionInfo",
    "VersionRefArgs",
    "Whoami",
    "check_idempotency_key",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_result",
]

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_FRAME: Final = 1 << 20
#: Largest answer a client accepts: a full ``sign_batch`` of RSA-4096 is ~5.3 MB.
MAX_RESPONSE_FRAME: Final = 64 << 20
HEADER: Final = struct.Struct(">I")
MAX_REQUEST_ID: Final = (1 << 64) - 1
KEY_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Most items one ``sign_batch`` may carry.
MAX_BATCH: Final = 10000
#: Most key names one ``jwks`` request may name (repeats count).
MAX_JWKS_KEYS: Final = 100
#: Highest key version a request may name: versions count from 1 by one per
#: rotation, and stay within a signed 32-bit integer.
MAX_VERSION: Final = (1 << 31) - 1


@dataclass(frozen=True, slots=True)
class Between:
    """An int field's bounds, checked when a message is decoded (``from_wire``)."""

    lo: int
    hi: int


#: A version a request names: 1 to ``MAX_VERSION``.
VersionNumber = Annotated[int, Between(1, MAX_VERSION)]
#: A version setting (``min_sign_version``...): 0 (off) to ``MAX_VERSION``.
VersionSetting = Annotated[int, Between(0, MAX_VERSION)]
KEY_TYPES: Final = ("ec-p256", "ec-p384", "ed25519", "rsa-2048", "rsa-3072", "rsa-4096")
#: An ``idempotency_key``: 1 to 128 printable ASCII characters, space excluded.
IDEMPOTENCY_KEY_RE: Final = re.compile(r"[\x21-\x7e]{1,128}")


def check_idempotency_key(value: str) -> str:
    """Raises: InvalidArgument (naming the field) unless ``value`` is a valid idempotency key."""
    if not IDEMPOTENCY_KEY_RE.fullmatch(value):
        raise InvalidArgument(
            "field 'idempotency_key': use 1 to 128 printable ASCII characters (0x21-0x7e, "
            f"no spaces), got {value[:40]!r}{'...' if len(value) > 40 else ''}"
        )
    return value


# --------------------------------------------------------------------------
# Framing


class FrameDecoder:
    """Splits a byte stream into frame bodies.

    Feed bytes with ``receive_data``; take complete bodies with ``frames``.
    A frame longer than ``max_frame`` raises ``FrameTooLarge``: the stream
    cannot be resynchronised after that, so the caller must close it.
    """

    __slots__ = ("_buf", "_pos", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    def frames(self) -> Iterator[bytes]:
        """Yield every complete frame body now buffered."""
        buf = self._buf
        try:
            while len(buf) - self._pos >= 4:
                (length,) = HEADER.unpack_from(buf, self._pos)
                if length > self.max_frame:
                    raise FrameTooLarge(
                        f"frame of {length} bytes exceeds the limit of {self.max_frame} bytes"
                    )
                end = self._pos + 4 + length
                if len(buf) < end:
                    break
                body = bytes(buf[self._pos + 4 : end])
                self._pos = end
                yield body
        finally:
            if self._pos:
                del buf[: self._pos]
                self._pos = 0


def _frame(obj: Mapping[str, Any]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def _unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedFrame(f"frame body is not valid msgpack: {exc}") from None


# --------------------------------------------------------------------------
# Typed messages


class Message:
    """Base of the wire messages: frozen dataclasses checked field by field.

    ``from_wire`` checks each field's type against the annotation and names
    the field in the error.  Requests are strict (an unknown field is an
    error, so a client never has an option silently ignored); responses are
    lenient (a newer daemon may add fields).
    """

    _fields: ClassVar[tuple[tuple[str, Callable[[Any, str, bool], Any], bool], ...]]

    #: (name, nested) per field; nested fields hold messages or arrays of them
    _wire_names: ClassVar[tuple[tuple[str, bool], ...]]

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, nested in self._wire_names:
            value = getattr(self, name)
            if value is not None:
                out[name] = _to_wire(value) if nested else value
        return out

    @classmethod
    def from_wire(cls, data: Any, *, strict: bool = True, path: str = "") -> typing.Self:
        if not isinstance(data, dict):
            raise InvalidArgument(f"{path or 'args'}: expected a map, got {_tname(data)}")
        fields = cls.__dict__.get("_fields")
        if fields is None:
            fields = _compile(cls)
        values: dict[str, Any] = {}
        for name, check, required in fields:
            where = f"{path}.{name}" if path else name
            if name in data and data[name] is not None:
                values[name] = check(data[name], where, strict)
            elif required:
                raise InvalidArgument(f"field '{where}' is required")
        if strict and len(values) < len(data):
            known = {name for name, _, _ in fields}
            for name in data:
                if name not in known:
                    raise InvalidArgument(f"unknown field '{path + '.' if path else ''}{name}'")
        return cls(**values)


def _to_wire(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_wire()
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    return value


def _tname(value: Any) -> str:
    return {
        bytes: "bin",
        str: "str",
        bool: "bool",
        int: "int",
        float: "float",
        dict: "map",
        list: "array",
        type(None): "nil",
    }.get(type(value), type(value).__name__)


_SCALARS: dict[type, str] = {str: "str", bytes: "bin", bool: "bool", int: "int", float: "float"}


def _scalar_checker(tp: type) -> Callable[[Any, str, bool], Any]:
    wire = _SCALARS[tp]

    def check(value: Any, where: str, strict: bool) -> Any:
        if tp is float and type(value) is int:
            return float(value)
        if type(value) is not tp:
            raise InvalidArgument(f"field '{where}': expected {wire}, got {_tname(value)}")
        return value

    return check


def _checker(tp: Any) -> Callable[[Any, str, bool], Any]:
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        inner = _checker(base)
        (bounds,) = [e for e in extras if isinstance(e, Between)]

        def check_range(value: Any, where: str, strict: bool) -> Any:
            value = inner(value, where, strict)
            if not bounds.lo <= value <= bounds.hi:
                raise InvalidArgument(
                    f"field '{where}': must be {bounds.lo} to {bounds.hi}, got {value}"
                )
            return value

        return check_range
    if tp in _SCALARS:
        return _scalar_checker(tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        item = _checker(item_tp)

        def check_seq(value: Any, where: str, strict: bool) -> Any:
            if not isinstance(value, list):
                raise InvalidArgument(f"field '{where}': expected array, got {_tname(value)}")
            return tuple(item(v, f"{where}[{i}]", strict) for i, v in enumerate(value))

        return check_seq
    if isinstance(tp, type) and issubclass(tp, Message):
        msg_cls = tp

        def check_msg(value: Any, where: str, strict: bool) -> Any:
            return msg_cls.from_wire(value, strict=strict, path=where)

        return check_msg
    raise TypeError(f"unsupported wire field type {tp!r}")


def _compile(cls: type[Message]) -> tuple[tuple[str, Callable[[Any, str, bool], Any], bool], ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    compiled = []
    names: list[tuple[str, bool]] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        required = True
        if typing.get_origin(tp) in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            (tp,) = args
            required = False
        compiled.append((f.name, _checker(tp), required))
        nested = typing.get_origin(tp) is tuple or (
            isinstance(tp, type) and issubclass(tp, Message)
        )
        names.append((f.name, nested))
    result = tuple(compiled)
    cls._fields = result
    cls._wire_names = tuple(names)
    return result


M = TypeVar("M", bound=Message)


@typing.dataclass_transform(frozen_default=True)
def message(cls: type[M]) -> type[M]:
    """Make ``cls`` a frozen wire dataclass and compile its field checks."""
    dc = dataclass(frozen=True, slots=True)(cls)
    _compile(dc)
    return dc


# ---- arguments ----


@message
class Empty(Message):
    """No arguments, or no result fields."""


@message
class CreateKeyArgs(Message):
    """A new key; the settings are those of ``UpdateKeyArgs`` (off when absent).

    ``idempotency_key``: sent again with the same key, the request answers as
    the first one did instead of failing with ``key_exists``.
    """

    key: str
    type: str
    auto_rotate_period: float | None = None
    verify_grace: float | None = None
    deletion_allowed: bool | None = None
    idempotency_key: str | None = None
    max_versions: int | None = None


@message
class UpdateKeyArgs(Message):
    """Change a key's lifecycle settings; an absent field keeps its value.

    Durations are seconds, and 0 turns the setting off (no automatic rotation;
    no grace limit).  Versions: 0 means no minimum.  ``max_versions``: the
    most versions not destroyed the key may hold; 0 means the daemon's default.
    """

    key: str
    auto_rotate_period: float | None = None
    verify_grace: float | None = None
    min_sign_version: VersionSetting | None = None
    min_verify_version: VersionSetting | None = None
    deletion_allowed: bool | None = None
    max_versions: int | None = None


@message
class VersionRefArgs(Message):
    """Arguments of ``disable`` and ``enable``: one version of a key."""

    key: str
    version: VersionNumber


@message
class DestroyArgs(Message):
    """Arguments of ``destroy``: exactly one of ``version`` and ``all=true``.

    "Every version" is never the default: a client that leaves out a field it
    did not set cannot destroy a whole key by mistake.
    """

    key: str
    version: VersionNumber | None = None
    all: bool | None = None


@message
class KeyRefArgs(Message):
    """Arguments of ``key_info``: a key name."""

    key: str


@message
class RotateArgs(Message):
    """Arguments of ``rotate``.

    ``idempotency_key``: a rotation of this key made with the same key already
    is answered again, not repeated (see ``IDEMPOTENCY_KEY_OPS``).
    """

    key: str
    idempotency_key: str | None = None


@message
class PublicKeyArgs(Message):
    key: str
    version: VersionNumber | None = None


@message
class JwksArgs(Message):
    """Names of keys whose verifying versions go into one JWK Set (1 to ``MAX_JWKS_KEYS``)."""

    keys: tuple[str, ...]


@message
class SignArgs(Message):
    key: str
    message: bytes | None = None
    digest: bytes | None = None
    hash: str | None = None
    padding: str | None = None
    format: str | None = None
    version: VersionNumber | None = None


@message
class VerifyArgs(Message):
    key: str
    signature: bytes
    message: bytes | None = None
    digest: bytes | None = None
    hash: str | None = None
    padding: str | None = None
    format: str | None = None
    version: VersionNumber | None = None


@message
class SignBatchArgs(Message):
    """Many signatures with one key and one set of options (``MAX_BATCH`` at most)."""

    key: str
    messages: tuple[bytes, ...] | None = None
    digests: tuple[bytes, ...] | None = None
    hash: str | None = None
    padding: str | None = None
    format: str | None = None
    version: VersionNumber | None = None


# ---- results ----


@message
class VersionInfo(Message):
    version: int
    #: active, verify-only, retired, disabled or destroyed
    state: str
    created: float
    public_key_pem: str
    #: when a verify-only version retires (its grace ends); absent: no limit
    verify_until: float | None = None


@message
class KeyInfo(Message):
    name: str
    type: str
    created: float
    #: the newest version: what ``sign`` uses unless the request names one
    current_version: int
    versions: tuple[VersionInfo, ...]
    auto_rotate_period: float | None = None
    verify_grace: float | None = None
    min_sign_version: int | None = None
    min_verify_version: int | None = None
    deletion_allowed: bool | None = None
    #: when the next automatic rotation is due; absent when it is off
    next_rotation: float | None = None
    #: answers to ``create_key`` and ``rotate``: the version the request made
    #: (for a replay under an ``idempotency_key``, the one the first request made)
    created_version: int | None = None
    #: the most versions not destroyed the key may hold: its own setting or
    #: the daemon's default (absent from daemons before retention)
    max_versions: int | None = None


@message
class KeySummary(Message):
    name: str
    type: str
    created: float
    current_version: int


@message
class KeyList(Message):
    keys: tuple[KeySummary, ...]


@message
class PublicKey(Message):
    name: str
    version: int
    type: str
    public_key_pem: str


@message
class Jwk(Message):
    """One version's public key as a JSON Web Key (RFC 7517, 7518, 8037).

    Binary members (``x``, ``y``, ``n``, ``e``) are base64url strings without
    padding, as in JSON, so a result serialised to JSON is a valid JWK.
    ``kid`` is ``NAME:VERSION``; ``alg`` is absent for RSA keys, which sign
    both RS256 and PS256.
    """

    kty: str
    kid: str
    use: str
    alg: str | None = None
    crv: str | None = None
    x: str | None = None
    y: str | None = None
    n: str | None = None
    e: str | None = None


@message
class Jwks(Message):
    """A JWK Set: every version of the named keys that may still verify."""

    keys: tuple[Jwk, ...]


@message
class SignResult(Message):
    signature: bytes
    key: str
    version: int
    algorithm: str


@message
class ErrorInfo(Message):
    """An error inside a result (``sign_batch`` items), shaped like a wire error."""

    code: int
    name: str
    message: str


@message
class BatchItem(Message):
    """One ``sign_batch`` item: its signature, or its error."""

    signature: bytes | None = None
    error: ErrorInfo | None = None


@message
class SignBatchResult(Message):
    key: str
    version: int
    algorithm: str
    results: tuple[BatchItem, ...]


@message
class VerifyResult(Message):
    valid: bool
    key: str
    version: int | None = None
    algorithm: str | None = None


@message
class TokenStatus(Message):
    label: str
    manufacturer: str
    model: str
    serial: str
    logged_in: bool
    #: the token profile signd drives it with: softhsm, yubihsm or generic
    profile: str | None = None
    #: the key types the token can make and sign with (read from its mechanisms)
    key_types: tuple[str, ...] | None = None
    #: the token's mechanisms, as CKM_ names
    mechanisms: tuple[str, ...] | None = None


@message
class AuditHead(Message):
    """The audit log's chain head, as the newest checkpoint signed it (and as
    the daemon keeps it on the token): record ``seq`` has hash ``hash`` and is
    in ``file``; signed at ``time``."""

    chain: str
    seq: int
    hash: str
    file: str
    time: float


@message
class Health(Message):
    status: str
    live: bool
    ready: bool
    daemon_version: str
    protocol_version: int
    uptime: float
    keys: int
    token: TokenStatus | None = None
    detail: str | None = None
    #: only to a peer that may read the audit key, and only with an audit log
    audit: AuditHead | None = None


@message
class KeyGrant(Message):
    """A key and the verbs the rules grant the caller on it (sorted)."""

    name: str
    verbs: tuple[str, ...]


@message
class Whoami(Message):
    """The caller as the daemon sees it (the kernel's record of the
    connection) and the keys on which the rules grant it anything."""

    uid: int
    gid: int
    #: the primary and supplementary groups, sorted
    groups: tuple[int, ...]
    user: str | None
    #: by name; only keys with at least one verb granted
    keys: tuple[KeyGrant, ...]


class Retry(enum.Enum):
    """When a client may send a request again after a broken connection."""

    #: always: the operation reads, or sets an absolute state
    SAFE = "safe"
    #: only when it carries an ``idempotency_key``
    WITH_KEY = "with_key"
    #: never
    NEVER = "never"


@dataclass(frozen=True)
class OpSpec:
    """One operation of the wire: its argument and result types, and when
    it may be sent again."""

    args: type[Message]
    result: type[Message]
    retry: Retry

    # Transitional: code that still unpacks ``OPS[op]`` as (args, result).
    def __iter__(self) -> Iterator[type[Message]]:
        return iter((self.args, self.result))

    def __getitem__(self, index: int) -> type[Message]:
        return (self.args, self.result)[index]


#: op name -> its spec.  (``disable``, ``enable``, ``destroy`` and
#: ``update_key`` set absolute states, so they are safe to send again.)
OPS: Final[Mapping[str, OpSpec]] = {
    "create_key": OpSpec(CreateKeyArgs, KeyInfo, Retry.WITH_KEY),
    "list_keys": OpSpec(Empty, KeyList, Retry.SAFE),
    "key_info": OpSpec(KeyRefArgs, KeyInfo, Retry.SAFE),
    "public_key": OpSpec(PublicKeyArgs, PublicKey, Retry.SAFE),
    "jwks": OpSpec(JwksArgs, Jwks, Retry.SAFE),
    "sign": OpSpec(SignArgs, SignResult, Retry.SAFE),
    "sign_batch": OpSpec(SignBatchArgs, SignBatchResult, Retry.SAFE),
    "verify": OpSpec(VerifyArgs, VerifyResult, Retry.SAFE),
    "rotate": OpSpec(RotateArgs, KeyInfo, Retry.WITH_KEY),
    "update_key": OpSpec(UpdateKeyArgs, KeyInfo, Retry.SAFE),
    "disable": OpSpec(VersionRefArgs, KeyInfo, Retry.SAFE),
    "enable": OpSpec(VersionRefArgs, KeyInfo, Retry.SAFE),
    "destroy": OpSpec(DestroyArgs, KeyInfo, Retry.SAFE),
    "health": OpSpec(Empty, Health, Retry.SAFE),
    "whoami": OpSpec(Empty, Whoami, Retry.SAFE),
}

#: Operations a client may safely send again after a broken connection.
IDEMPOTENT_OPS: Final = frozenset(op for op, spec in OPS.items() if spec.retry is Retry.SAFE)

#: Operations that take an ``idempotency_key``.  With one they are idempotent
#: too: the daemon records the key with the version the request makes (on the
#: token, in the same write), and answers a repeat without making another.
IDEMPOTENCY_KEY_OPS: Final = frozenset(
    op for op, spec in OPS.items() if spec.retry is Retry.WITH_KEY
)


# --------------------------------------------------------------------------
# Envelopes


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed request; ``args`` is already checked against its op."""

    id: int
    op: str
    args: Message


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A frame that could not become a ``Request``; answer ``error`` to ``id``."""

    id: int | None
    error: WireError


@dataclass(frozen=True, slots=True)
class Response:
    id: int | None
    result: dict[str, Any] | None
    error: WireError | None


def encode_request(request_id: int, op: str, args: Message) -> bytes:
    return _frame({"v": PROTOCOL_VERSION, "id": request_id, "op": op, "args": args.to_wire()})


def encode_result(request_id: int | None, result: Message) -> bytes:
    return _frame({"v": PROTOCOL_VERSION, "id": request_id, "result": result.to_wire()})


def encode_error(request_id: int | None, error: WireError) -> bytes:
    return _frame({"v": PROTOCOL_VERSION, "id": request_id, "error": error.to_wire()})


def _request_id(obj: Mapping[Any, Any]) -> int | None:
    rid = obj.get("id")
    if type(rid) is int and 0 <= rid <= MAX_REQUEST_ID:
        return rid
    return None


def decode_request(body: bytes) -> Request | BadRequest:
    """Turn one frame body into a ``Request``, or a ``BadRequest`` to answer."""
    try:
        obj = _unpack(body)
    except MalformedFrame as exc:
        return BadRequest(None, exc)
    if not isinstance(obj, dict):
        return BadRequest(None, MalformedFrame(f"frame body must be a map, got {_tname(obj)}"))
    rid = _request_id(obj)
    try:
        if rid is None:
            raise InvalidRequest("field 'id' must be an unsigned integer below 2**64")
        version = obj.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"protocol version {version!r} is not supported; this daemon speaks "
                f"{PROTOCOL_VERSION}"
            )
        op = obj.get("op")
        if type(op) is not str:
            raise InvalidRequest(f"field 'op' must be a str, got {_tname(op)}")
        spec = OPS.get(op)
        if spec is None:
            raise UnknownOperation(f"unknown operation {op!r}")
        unknown = set(obj) - {"v", "id", "op", "args"}
        if unknown:
            raise InvalidRequest(f"unknown envelope field {sorted(map(str, unknown))[0]!r}")
        args = obj.get("args")
        return Request(rid, op, spec.args.from_wire({} if args is None else args))
    except WireError as exc:
        return BadRequest(rid, exc)


def decode_response(body: bytes) -> Response:
    """Client side: turn one frame body into a ``Response``.

    Raises:
        ProtocolViolation: the daemon sent something that is not a response.
    """
    try:
        obj = _unpack(body)
    except MalformedFrame as exc:
        raise ProtocolViolation(exc.message) from None
    if not isinstance(obj, dict) or type(obj.get("v")) is not int or obj["v"] != PROTOCOL_VERSION:
        raise ProtocolViolation("response is not a version-1 map")
    rid = obj.get("id")
    if rid is not None and type(rid) is not int:
        raise ProtocolViolation("response id is not an integer")
    err = obj.get("error")
    if err is not None:
        if not (
            isinstance(err, dict)
            and type(err.get("code")) is int
            and isinstance(err.get("name"), str)
            and isinstance(err.get("message"), str)
        ):
            raise ProtocolViolation("response error is not {code, name, message}")
        retry = err.get("retry_after")
        retry_after = float(retry) if isinstance(retry, int | float) else None
        return Response(
            rid, None, error_from_wire(err["code"], err["name"], err["message"], retry_after)
        )
    result = obj.get("result")
    if not isinstance(result, dict):
        raise ProtocolViolation("response has neither result nor error")
    return Response(rid, result, None)
