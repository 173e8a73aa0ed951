"""The audit log's record format, shared by the daemon that writes it and
``audit.verify_files`` that checks it: the hash chain (``canonical``,
``line_of``, ``seal``), checkpoints (``checkpoint_message``, ``AuditKeys``) and
chain heads (``Head``).  ``signd_client.audit`` re-exports all of it."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

__all__ = [
    "AUDIT_KEY",
    "CHAIN_MISMATCH",
    "CHECKPOINT",
    "CHECKPOINT_DOMAIN",
    "GENESIS",
    "MAX_LINE",
    "SIGNED_FIELDS",
    "AuditKeys",
    "Head",
    "canonical",
    "checkpoint_message",
    "is_hash",
    "line_of",
    "printable",
    "seal",
]

GENESIS: Final = "0" * 64
#: The reserved name of the key on the token that signs checkpoints: the
#: daemon creates it; no client may sign with it or change it.
AUDIT_KEY: Final = "signd.audit"
#: ``kind`` of a checkpoint record, and of the record a daemon writes when it
#: starts on a log that does not match the chain head kept on the token.
CHECKPOINT: Final = "checkpoint"
CHAIN_MISMATCH: Final = "chain_mismatch"
#: What a checkpoint signature covers starts with this: the bytes can never be
#: mistaken for anything else the key might sign.
CHECKPOINT_DOMAIN: Final = b"signd audit checkpoint v1\n"
#: The members of a checkpoint record its signature covers (``sig`` and the
#: chain's own ``seq``, ``prev``, ``hash`` are not).
SIGNED_FIELDS: Final = (
    "chain",
    "file",
    "head_hash",
    "head_seq",
    "key",
    "reason",
    "token",
    "ts",
    "version",
)
#: A line longer than this is not a record (the daemon's are well under 4 KiB).
MAX_LINE: Final = 1 << 20
#: Hashes of this many recent records are kept to check the heads that later


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


def checkpoint_message(record: Mapping[str, Any]) -> bytes:
    """The bytes a checkpoint's signature covers: ``CHECKPOINT_DOMAIN`` and the
    canonical JSON of its ``SIGNED_FIELDS``.

    Raises:
        KeyError: a signed field is missing.
    """
    body = {k: record[k] for k in SIGNED_FIELDS}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return CHECKPOINT_DOMAIN + text.encode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control, format (bidi), private-use,
    unassigned and separator characters, and lone surrogates, as ``\\x..``,
    ``\\u....`` escapes; a backslash doubled, so an escape cannot be faked."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == " " or unicodedata.category(ch) not in _UNPRINTABLE:
            out.append(ch)
        else:
            n = ord(ch)
            if n < 0x100:
                out.append(f"\\x{n:02x}")
            elif n < 0x10000:
                out.append(f"\\u{n:04x}")
            else:
                out.append(f"\\U{n:08x}")
    return "".join(out)


_UNPRINTABLE: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})


class AuditKeys:
    """The public keys checkpoint signatures are checked with: by version of
    the audit key (from the daemon), or for any version (from a file)."""

    def __init__(
        self,
        by_version: Mapping[int, PublicKeyTypes] | None = None,
        any_version: Sequence[PublicKeyTypes] = (),
    ) -> None:
        self.by_version = dict(by_version or {})
        self.any_version = list(any_version)

    @classmethod
    def from_pem(cls, data: bytes) -> AuditKeys:
        """Every public key in a PEM file.

        Raises:
            ValueError: no public key in ``data``.
        """
        keys = []
        marker = b"-----BEGIN PUBLIC KEY-----"
        for part in data.split(marker)[1:]:
            keys.append(serialization.load_pem_public_key(marker + part))
        if not keys:
            raise ValueError("no PEM public key (-----BEGIN PUBLIC KEY-----) found")
        return cls(any_version=keys)

    def __bool__(self) -> bool:
        return bool(self.by_version or self.any_version)

    def verify(self, version: object, signature: bytes, message: bytes) -> bool:
        """Whether one of the keys for ``version`` made ``signature`` over ``message``."""
        candidates = list(self.any_version)
        if type(version) is int and version in self.by_version:
            candidates.insert(0, self.by_version[version])
        return any(_verifies(k, signature, message) for k in candidates)


def _verifies(key: PublicKeyTypes, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class Head:
    """A point of the chain: record ``seq``, whose hash is ``hash``."""

    seq: int
    hash: str

    @classmethod
    def parse(cls, text: str) -> Head:
        """``SEQ:HASH``.

        Raises:
            ValueError: not that.
        """
        seq, _, digest = text.partition(":")
        if not seq.isdigit() or not is_hash(digest):
            raise ValueError(f"expected SEQ:HASH (a record number and 64 hex digits), got {text!r}")
        return cls(int(seq), digest)

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"


def is_hash(value: object) -> bool:
    return type(value) is str and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
