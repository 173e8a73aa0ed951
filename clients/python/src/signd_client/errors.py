"""signd's one exception tree.

Every error that travels on the wire has a fixed numeric code (``ErrorCode``)
and a stable snake_case name.  Codes are never reused or renumbered; new ones
are only appended.  ``PROTOCOL.md`` documents each of them.

The daemon raises these classes and the clients re-raise them from the codes
they receive, so a caller catches the same class whether the error was found
locally or by the daemon.  Errors that never travel on the wire (connection
failures, client-side time-outs, a daemon that breaks the protocol) derive
from ``LocalError`` and have no code.
"""

from __future__ import annotations

import enum
from typing import ClassVar

__all__ = [
    "Busy",
    "Conflict",
    "ConnectionFailed",
    "DeadlineExceeded",
    "DeletionNotAllowed",
    "ErrorCode",
    "FrameTooLarge",
    "InternalError",
    "InvalidArgument",
    "InvalidDigest",
    "InvalidRequest",
    "KeyExists",
    "KeyNotFound",
    "LocalError",
    "MalformedFrame",
    "PermissionDenied",
    "PositionUsed",
    "ProtocolViolation",
    "RateLimited",
    "RequestTimeout",
    "ShuttingDown",
    "SigndError",
    "TokenError",
    "TokenUnavailable",
    "UnknownOperation",
    "UnsupportedAlgorithm",
    "UnsupportedVersion",
    "VersionNotFound",
    "VersionNotUsable",
    "WireError",
    "error_from_wire",
]


class ErrorCode(enum.IntEnum):
    """Stable wire error codes.  Grouped by hundreds; never renumbered."""

    # 1xx: the frame or envelope could not be understood.
    MALFORMED_FRAME = 100
    FRAME_TOO_LARGE = 101
    UNSUPPORTED_VERSION = 102
    UNKNOWN_OPERATION = 103
    INVALID_REQUEST = 104
    # 2xx: the request was understood but its arguments are wrong.
    INVALID_ARGUMENT = 200
    INVALID_DIGEST = 201
    UNSUPPORTED_ALGORITHM = 202
    # 3xx: keys.
    KEY_NOT_FOUND = 300
    VERSION_NOT_FOUND = 301
    KEY_EXISTS = 302
    VERSION_NOT_USABLE = 303
    DELETION_NOT_ALLOWED = 304
    CONFLICT = 305
    POSITION_USED = 306
    # 4xx: the peer may not do this.
    PERMISSION_DENIED = 400
    RATE_LIMITED = 401
    # 5xx: the daemon or the token could not do it.
    INTERNAL_ERROR = 500
    TOKEN_UNAVAILABLE = 501
    TOKEN_ERROR = 502
    BUSY = 503
    SHUTTING_DOWN = 504
    DEADLINE_EXCEEDED = 505


class SigndError(Exception):
    """Base of every error signd or its clients raise."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LocalError(SigndError):
    """An error found on this side of the socket; it has no wire code."""


class ConnectionFailed(LocalError):
    """The daemon's socket could not be reached, or the connection broke."""


class RequestTimeout(LocalError):
    """No answer arrived within the client's time-out."""


class ProtocolViolation(LocalError):
    """The peer sent something the protocol does not allow."""


class WireError(SigndError):
    """An error with a stable code that travels on the wire."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR
    #: True when the same request may succeed if sent again later.
    retryable: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.code.name.lower()

    def __str__(self) -> str:
        return f"{self.name} (error {int(self.code)}): {self.message}"

    def to_wire(self) -> dict[str, object]:
        return {"code": int(self.code), "name": self.name, "message": self.message}


class MalformedFrame(WireError):
    """The frame's body is not a msgpack map."""

    code = ErrorCode.MALFORMED_FRAME


class FrameTooLarge(WireError):
    """The frame's declared length exceeds the limit; the connection closes."""

    code = ErrorCode.FRAME_TOO_LARGE


class UnsupportedVersion(WireError):
    """The message's protocol version ``v`` is not one this peer speaks."""

    code = ErrorCode.UNSUPPORTED_VERSION


class UnknownOperation(WireError):
    """The request names an ``op`` the daemon does not have."""

    code = ErrorCode.UNKNOWN_OPERATION


class InvalidRequest(WireError):
    """The envelope's ``id`` or ``op`` is missing or mistyped, or it has unknown fields."""

    code = ErrorCode.INVALID_REQUEST


class InvalidArgument(WireError):
    """``args`` is not a map, or an argument is missing, unknown, mistyped or invalid."""

    code = ErrorCode.INVALID_ARGUMENT


class InvalidDigest(WireError):
    """The digest's length does not match the named hash algorithm."""

    code = ErrorCode.INVALID_DIGEST


class UnsupportedAlgorithm(WireError):
    """The key type or hash algorithm is not one signd or the token supports."""

    code = ErrorCode.UNSUPPORTED_ALGORITHM


class KeyNotFound(WireError):
    """No key of that name exists on the token."""

    code = ErrorCode.KEY_NOT_FOUND


class VersionNotFound(WireError):
    """The key exists but has no such version."""

    code = ErrorCode.VERSION_NOT_FOUND


class KeyExists(WireError):
    """``create_key`` named a key that already exists."""

    code = ErrorCode.KEY_EXISTS


class VersionNotUsable(WireError):
    """The version exists, but its state forbids this: disabled, destroyed,
    retired, or (for signing) not active."""

    code = ErrorCode.VERSION_NOT_USABLE


class DeletionNotAllowed(WireError):
    """``destroy`` on a key whose ``deletion_allowed`` setting is off."""

    code = ErrorCode.DELETION_NOT_ALLOWED


class Conflict(WireError):
    """Another process sharing the token changed the key at the same moment;
    this request changed nothing.  Read the key again and decide whether to retry."""

    code = ErrorCode.CONFLICT
    retryable = True


class PositionUsed(WireError):
    """``sign`` on a watermarked key named a position at or below the highest
    one signd has signed for it (the message names that mark).  Never retried:
    the position may have been signed already; take the next one."""

    code = ErrorCode.POSITION_USED


class PermissionDenied(WireError):
    """The connection's peer (by SO_PEERCRED) may not do this operation on this key."""

    code = ErrorCode.PERMISSION_DENIED


class RateLimited(WireError):
    """Over a rate limit (per peer or per key); retry after ``retry_after`` seconds."""

    code = ErrorCode.RATE_LIMITED
    retryable = True

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def to_wire(self) -> dict[str, object]:
        out = super().to_wire()
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out


class InternalError(WireError):
    """A bug in signd.  Details are in the daemon's log, not on the wire."""

    code = ErrorCode.INTERNAL_ERROR


class TokenUnavailable(WireError):
    """The token cannot be reached right now; retry later."""

    code = ErrorCode.TOKEN_UNAVAILABLE
    retryable = True


class TokenError(WireError):
    """The token refused or failed the operation."""

    code = ErrorCode.TOKEN_ERROR


class Busy(WireError):
    """The daemon's queues are full; retry after a short back-off."""

    code = ErrorCode.BUSY
    retryable = True


class ShuttingDown(WireError):
    """The daemon is stopping and takes no new work; retry on a new connection."""

    code = ErrorCode.SHUTTING_DOWN
    retryable = True


class DeadlineExceeded(WireError):
    """The request was not finished within the daemon's per-request deadline."""

    code = ErrorCode.DEADLINE_EXCEEDED
    retryable = True


_BY_CODE: dict[int, type[WireError]] = {
    cls.code: cls
    for cls in (
        MalformedFrame,
        FrameTooLarge,
        UnsupportedVersion,
        UnknownOperation,
        InvalidRequest,
        InvalidArgument,
        InvalidDigest,
        UnsupportedAlgorithm,
        KeyNotFound,
        VersionNotFound,
        KeyExists,
        VersionNotUsable,
        DeletionNotAllowed,
        Conflict,
        PositionUsed,
        PermissionDenied,
        RateLimited,
        InternalError,
        TokenUnavailable,
        TokenError,
        Busy,
        ShuttingDown,
        DeadlineExceeded,
    )
}
assert set(_BY_CODE) == set(ErrorCode), "every ErrorCode needs a class"


class UnknownWireError(WireError):
    """A code this client does not know (a newer daemon); kept, not dropped."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(message)
        self.raw_code = code
        self.raw_name = name

    @property
    def name(self) -> str:
        return self.raw_name

    def __str__(self) -> str:
        return f"{self.raw_name} (error {self.raw_code}): {self.message}"


def error_from_wire(
    code: int, name: str, message: str, retry_after: float | None = None
) -> WireError:
    """Turn a wire error ``{code, name, message[, retry_after]}`` into its exception."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return UnknownWireError(code, name, message)
    if cls is RateLimited:
        return RateLimited(message, retry_after)
    return cls(message)
