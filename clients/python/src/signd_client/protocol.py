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

The messages are declared in ``messages`` (with the checking machinery in
``_codec``) and re-exported here, so ``from signd_client.protocol import X``
reaches every wire type.  ``OPS`` is the table of operations: for each, its
argument and result types and whether a client may send it again.
"""

from __future__ import annotations

import enum
import re
import struct
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from ._codec import Between, Message, message, tname
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
from .messages import (
    MAX_POSITION,
    MAX_VERSION,
    AuditHead,
    BackupArgs,
    BackupResult,
    BatchItem,
    CreateKeyArgs,
    DestroyArgs,
    Empty,
    ErrorInfo,
    Health,
    ImportKeyArgs,
    ImportParamsArgs,
    ImportParamsResult,
    Jwk,
    Jwks,
    JwksArgs,
    KeyGrant,
    KeyInfo,
    KeyList,
    KeyRefArgs,
    KeySummary,
    PublicKey,
    PublicKeyArgs,
    RestoreArgs,
    RestoreResult,
    RotateArgs,
    SignArgs,
    SignBatchArgs,
    SignBatchResult,
    SignResult,
    TokenStatus,
    UpdateKeyArgs,
    VerifyArgs,
    VerifyResult,
    VersionInfo,
    VersionNumber,
    VersionRefArgs,
    VersionSetting,
    Whoami,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HEADER",
    "IDEMPOTENCY_KEY_OPS",
    "IDEMPOTENCY_KEY_RE",
    "IDEMPOTENT_OPS",
    "IMPORT_ALGORITHM",
    "KEY_NAME_RE",
    "KEY_TYPES",
    "MAX_BATCH",
    "MAX_JWKS_KEYS",
    "MAX_POSITION",
    "MAX_REQUEST_ID",
    "MAX_RESPONSE_FRAME",
    "MAX_VERSION",
    "OPS",
    "PROTOCOL_VERSION",
    "AuditHead",
    "BackupArgs",
    "BackupResult",
    "BadRequest",
    "BatchItem",
    "Between",
    "CreateKeyArgs",
    "DestroyArgs",
    "Empty",
    "ErrorInfo",
    "FrameDecoder",
    "Health",
    "ImportKeyArgs",
    "ImportParamsArgs",
    "ImportParamsResult",
    "Jwk",
    "Jwks",
    "JwksArgs",
    "KeyGrant",
    "KeyInfo",
    "KeyList",
    "KeyRefArgs",
    "KeySummary",
    "Message",
    "OpSpec",
    "PublicKey",
    "PublicKeyArgs",
    "RestoreArgs",
    "RestoreResult",
    "Request",
    "Response",
    "Retry",
    "RotateArgs",
    "SignArgs",
    "SignBatchArgs",
    "SignBatchResult",
    "SignResult",
    "TokenStatus",
    "UpdateKeyArgs",
    "VerifyArgs",
    "VerifyResult",
    "VersionInfo",
    "VersionNumber",
    "VersionRefArgs",
    "VersionSetting",
    "Whoami",
    "check_idempotency_key",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_result",
    "message",
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
KEY_TYPES: Final = (
    "ec-p256",
    "ec-p384",
    "ed25519",
    "rsa-2048",
    "rsa-3072",
    "rsa-4096",
    "ec-secp256k1",
    "hmac-sha256",
    "hmac-sha384",
    "hmac-sha512",
)
#: How ``import_key`` material is wrapped (``import_params`` names it): an
#: AES-256 key under RSA-OAEP (SHA-1, MGF1-SHA1, no label), the material under
#: that key with AES key wrap with padding (RFC 5649).
IMPORT_ALGORITHM: Final = "rsa-oaep-sha1+aes-kwp"
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
# Operations


class Retry(enum.Enum):
    """Whether a client may send an op again after a broken connection (the
    daemon may or may not have carried it out) or a retryable answer."""

    #: always: reads, signatures, and admin ops that set absolute states
    #: (``disable``, ``enable``, ``destroy``, ``update_key``)
    SAFE = "safe"
    #: only when the request carries an ``idempotency_key``: the daemon records
    #: the key with what the request made, and answers a repeat without redoing it
    WITH_KEY = "with_key"
    #: never
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One operation of the wire: what it takes, what it answers, when it may be retried."""

    args: type[Message]
    result: type[Message]
    retry: Retry


#: op name -> its spec.  A new op is a row here, a client call, a
#: ``PROTOCOL.md`` section and golden frames; tests fail when one is missing.
OPS: Final[Mapping[str, OpSpec]] = types.MappingProxyType(
    {
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
        "backup": OpSpec(BackupArgs, BackupResult, Retry.SAFE),
        "restore": OpSpec(RestoreArgs, RestoreResult, Retry.SAFE),
        "import_params": OpSpec(ImportParamsArgs, ImportParamsResult, Retry.SAFE),
        "import_key": OpSpec(ImportKeyArgs, KeyInfo, Retry.WITH_KEY),
    }
)

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
        return BadRequest(None, MalformedFrame(f"frame body must be a map, got {tname(obj)}"))
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
            raise InvalidRequest(f"field 'op' must be a str, got {tname(op)}")
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
