"""The ssh-agent protocol (draft-ietf-sshm-ssh-agent), sans-IO: bytes in, bytes out.

A message is a uint32 length, then that many bytes: a type byte and its
contents.  ``MessageDecoder`` is fed bytes and hands back whole messages; a
declared length over ``MAX_MESSAGE`` (OpenSSH's AGENT_MAX_LEN, 256 KiB) or of
zero is an ``AgentWireError``, after which the stream cannot be trusted and the
connection is closed.  The decoder never holds more than one message and the
bytes of one ``feed``.

``parse`` turns a message into what the front end answers: a sign request,
an extension, the identities request, or ``Other`` (every other type, whose
contents are not looked at: an ADD_IDENTITY's private key is not parsed).
The ``encode_*`` functions make the answers, and ``ssh_public_blob`` /
``ssh_signature`` the SSH encodings of keys and signatures (RFC 4253, 5656,
8332, 8709).  Nothing here touches a socket or trio.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ..errors import InvalidArgument

__all__ = [
    "ADD_IDENTITY",
    "EXTENSION",
    "EXTENSION_FAILURE",
    "EXTENSION_RESPONSE",
    "FAILURE",
    "IDENTITIES_ANSWER",
    "LOCK",
    "MAX_MESSAGE",
    "REMOVE_ALL_IDENTITIES",
    "REMOVE_IDENTITY",
    "REQUEST_IDENTITIES",
    "RSA_SHA2_256",
    "RSA_SHA2_512",
    "SIGN_REQUEST",
    "SIGN_RESPONSE",
    "SUCCESS",
    "UNLOCK",
    "AgentWireError",
    "Extension",
    "Identity",
    "MessageDecoder",
    "Other",
    "RequestIdentities",
    "SessionBind",
    "SignRequest",
    "encode_extension_failure",
    "encode_failure",
    "encode_identities",
    "encode_query_response",
    "encode_sign_response",
    "encode_success",
    "message_name",
    "mpint",
    "parse",
    "parse_session_bind",
    "ssh_public_blob",
    "ssh_signature",
    "string",
]

#: OpenSSH's AGENT_MAX_LEN: no agent message is longer.
MAX_MESSAGE: Final = 256 * 1024
_LEN: Final = struct.Struct(">I")

# Message numbers (draft-ietf-sshm-ssh-agent, section "Message numbers").
FAILURE: Final = 5
SUCCESS: Final = 6
REQUEST_IDENTITIES: Final = 11
IDENTITIES_ANSWER: Final = 12
SIGN_REQUEST: Final = 13
SIGN_RESPONSE: Final = 14
ADD_IDENTITY: Final = 17
REMOVE_IDENTITY: Final = 18
REMOVE_ALL_IDENTITIES: Final = 19
ADD_SMARTCARD_KEY: Final = 20
REMOVE_SMARTCARD_KEY: Final = 21
LOCK: Final = 22
UNLOCK: Final = 23
ADD_ID_CONSTRAINED: Final = 25
ADD_SMARTCARD_KEY_CONSTRAINED: Final = 26
EXTENSION: Final = 27
EXTENSION_FAILURE: Final = 28
EXTENSION_RESPONSE: Final = 29

#: SIGN_REQUEST flags for an ssh-rsa key: which hash (RFC 8332).
RSA_SHA2_256: Final = 2
RSA_SHA2_512: Final = 4

#: Names of the client messages, for metrics and audit records (bounded).
_NAMES: Final = {
    REQUEST_IDENTITIES: "request_identities",
    SIGN_REQUEST: "sign_request",
    ADD_IDENTITY: "add_identity",
    REMOVE_IDENTITY: "remove_identity",
    REMOVE_ALL_IDENTITIES: "remove_all_identities",
    ADD_SMARTCARD_KEY: "add_smartcard_key",
    REMOVE_SMARTCARD_KEY: "remove_smartcard_key",
    LOCK: "lock",
    UNLOCK: "unlock",
    ADD_ID_CONSTRAINED: "add_id_constrained",
    ADD_SMARTCARD_KEY_CONSTRAINED: "add_smartcard_key_constrained",
    EXTENSION: "extension",
}


def message_name(kind: int) -> str:
    """A client message type's name; ``other`` for any number not defined."""
    return _NAMES.get(kind, "other")


class AgentWireError(Exception):
    """The bytes are not the agent protocol; the connection must be closed."""


# --------------------------------------------------------------------------
# Framing


class MessageDecoder:
    """Incremental decoder: ``feed`` bytes, then take whole messages from ``messages``.

    What it holds is bounded: one partial message (at most ``MAX_MESSAGE`` and
    its length) plus whatever the last ``feed`` brought.
    """

    __slots__ = ("_buf", "max_message")

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self.max_message = max_message

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    def messages(self) -> Iterator[bytes]:
        """Every whole message buffered, in order (type byte first).

        Raises: AgentWireError (a length of zero or over the limit); the
        messages before it were handed out already.
        """
        buf = self._buf
        while len(buf) >= _LEN.size:
            (length,) = _LEN.unpack_from(buf)
            if length == 0 or length > self.max_message:
                raise AgentWireError(
                    f"agent message of {length} bytes (1 to {self.max_message} allowed)"
                )
            end = _LEN.size + length
            if len(buf) < end:
                return
            body = bytes(buf[_LEN.size : end])
            del buf[:end]
            yield body


def _framed(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


# --------------------------------------------------------------------------
# Wire types (RFC 4251)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise AgentWireError("truncated agent message")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def uint32(self) -> int:
        value: int = _LEN.unpack(self.take(4))[0]
        return value

    def string(self) -> bytes:
        return self.take(self.uint32())

    def boolean(self) -> bool:
        return self.take(1) != b"\0"

    def end(self) -> None:
        if self.pos != len(self.data):
            raise AgentWireError(f"{len(self.data) - self.pos} bytes after the agent message")


def string(b: bytes) -> bytes:
    """An SSH ``string``: uint32 length, then the bytes."""
    return _LEN.pack(len(b)) + b


def mpint(n: int) -> bytes:
    """An SSH ``mpint`` of a non-negative integer: big-endian, shortest, with a
    leading zero byte when the top bit would be set; zero is empty."""
    if n < 0:
        raise ValueError("mpint: only non-negative integers here")
    if n == 0:
        return string(b"")
    raw = n.to_bytes((n.bit_length() + 8) // 8, "big")  # room for a sign bit
    return string(raw)


# --------------------------------------------------------------------------
# Client messages


@dataclass(frozen=True, slots=True)
class RequestIdentities:
    pass


@dataclass(frozen=True, slots=True)
class SignRequest:
    key_blob: bytes
    data: bytes
    flags: int


@dataclass(frozen=True, slots=True)
class Extension:
    #: the extension's name, as sent (bytes: it need not be UTF-8)
    name: bytes
    contents: bytes


@dataclass(frozen=True, slots=True)
class Other:
    """Any other message (add, remove, lock...): answered FAILURE, never parsed."""

    kind: int


Message = RequestIdentities | SignRequest | Extension | Other


def parse(body: bytes) -> Message:
    """One message (as ``MessageDecoder`` gives it) as what it asks.

    Raises: AgentWireError (a request identities, sign or extension message
    that is truncated or has bytes left over).
    """
    kind = body[0]
    r = _Reader(body, 1)
    if kind == REQUEST_IDENTITIES:
        r.end()
        return RequestIdentities()
    if kind == SIGN_REQUEST:
        blob = r.string()
        data = r.string()
        flags = r.uint32()
        r.end()
        return SignRequest(blob, data, flags)
    if kind == EXTENSION:
        name = r.string()
        return Extension(name, body[r.pos :])
    return Other(kind)


@dataclass(frozen=True, slots=True)
class SessionBind:
    """``session-bind@openssh.com``: the ssh session this connection serves."""

    host_key: bytes
    session_id: bytes
    signature: bytes
    forwarding: bool


def parse_session_bind(contents: bytes) -> SessionBind:
    """Raises: AgentWireError (the contents are not a session-bind)."""
    r = _Reader(contents)
    bound = SessionBind(r.string(), r.string(), r.string(), r.boolean())
    r.end()
    return bound


# --------------------------------------------------------------------------
# Agent answers


def encode_failure() -> bytes:
    return _framed(bytes([FAILURE]))


def encode_success() -> bytes:
    return _framed(bytes([SUCCESS]))


def encode_extension_failure() -> bytes:
    return _framed(bytes([EXTENSION_FAILURE]))


@dataclass(frozen=True, slots=True)
class Identity:
    blob: bytes
    comment: str


def encode_identities(identities: Sequence[Identity]) -> bytes:
    parts = [bytes([IDENTITIES_ANSWER]), _LEN.pack(len(identities))]
    for ident in identities:
        parts.append(string(ident.blob))
        parts.append(string(ident.comment.encode()))
    return _framed(b"".join(parts))


def encode_sign_response(signature: bytes) -> bytes:
    """``signature``: an SSH signature blob (``ssh_signature``)."""
    return _framed(bytes([SIGN_RESPONSE]) + string(signature))


def encode_query_response(names: Sequence[str]) -> bytes:
    """The answer to the ``query`` extension: the names of those supported."""
    body = bytes([EXTENSION_RESPONSE]) + string(b"query")
    body += b"".join(string(n.encode()) for n in names)
    return _framed(body)


# --------------------------------------------------------------------------
# SSH keys and signatures

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

_CURVES: Final = {"secp256r1": "nistp256", "secp384r1": "nistp384"}


def ssh_public_blob(key: object) -> bytes | None:
    """The SSH public key blob of ``key`` (a ``cryptography`` public key):
    ecdsa-sha2-nistp256/384, ssh-ed25519 or ssh-rsa; None for a key SSH has
    no form of here (secp256k1, any other curve or type)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = _CURVES.get(key.curve.name)
        if curve is None:
            return None
        point = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return string(f"ecdsa-sha2-{curve}".encode()) + string(curve.encode()) + string(point)
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return string(b"ssh-ed25519") + string(raw)
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return string(b"ssh-rsa") + mpint(numbers.e) + mpint(numbers.n)
    return None


def ssh_signature(algorithm: str, signature: bytes) -> bytes:
    """An SSH signature blob: ``algorithm`` (``ecdsa-sha2-nistp256``,
    ``ecdsa-sha2-nistp384``, ``ssh-ed25519``, ``rsa-sha2-256``, ``rsa-sha2-512``)
    and the signature the token made (ECDSA: raw ``r || s``; Ed25519: 64
    bytes; RSA: PKCS#1 v1.5, the modulus' length).

    Raises: InvalidArgument (an algorithm not listed, or a signature of the
    wrong shape for it).
    """
    if algorithm.startswith("ecdsa-sha2-"):
        if not signature or len(signature) % 2:
            raise InvalidArgument(f"{algorithm}: a raw ECDSA signature is r || s")
        half = len(signature) // 2
        r = int.from_bytes(signature[:half], "big")
        s = int.from_bytes(signature[half:], "big")
        inner = mpint(r) + mpint(s)
    elif algorithm == "ssh-ed25519":
        if len(signature) != 64:
            raise InvalidArgument(f"an Ed25519 signature is 64 bytes, got {len(signature)}")
        inner = signature
    elif algorithm in ("rsa-sha2-256", "rsa-sha2-512"):
        if not signature:
            raise InvalidArgument(f"{algorithm}: empty signature")
        inner = signature
    else:
        raise InvalidArgument(f"no SSH signature encoding for {algorithm!r}")
    return string(algorithm.encode()) + string(inner)
