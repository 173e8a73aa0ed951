"""Named keys and their versions: pure logic, no token, no I/O.

A key is a name, a key type and a list of versions.  Each version is one
keypair on the token, found by its PKCS#11 ``CKA_ID``.  The record below is
what the token stores as the key's metadata (see ``token.py``); the token is
the single source of truth, and ``Keystore`` is only this process's cache of
it, with each version's public key loaded for verification.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from . import algorithms
from .algorithms import KeyType, PublicKey
from .errors import InvalidArgument, KeyNotFound, VersionNotFound
from .protocol import KEY_NAME_RE, KeyInfo, KeySummary, VersionInfo

__all__ = ["ACTIVE", "VERIFY_ONLY", "KeyRecord", "Keystore", "LoadedKey", "VersionRecord"]

ACTIVE: Final = "active"
VERIFY_ONLY: Final = "verify-only"
STATES: Final = (ACTIVE, VERIFY_ONLY)
METADATA_FORMAT: Final = 1


def check_key_name(name: str) -> str:
    """Raises: InvalidArgument unless ``name`` is a valid key name."""
    if not KEY_NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid key name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -, starting alphanumeric"
        )
    return name


def new_object_id() -> bytes:
    """A fresh random CKA_ID for a keypair."""
    return secrets.token_bytes(8)


def object_label(name: str, version: int) -> str:
    """CKA_LABEL of a version's keypair: readable in ``pkcs11-tool -O``."""
    return f"{name}/v{version}"


@dataclass(frozen=True, slots=True)
class VersionRecord:
    version: int
    created: float
    state: str
    object_id: bytes


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key's metadata as stored on the token."""

    name: str
    type: str
    created: float
    versions: tuple[VersionRecord, ...]
    revision: int = 1

    @property
    def current(self) -> VersionRecord:
        return max((v for v in self.versions if v.state == ACTIVE), key=lambda v: v.version)

    @property
    def next_version(self) -> int:
        return max(v.version for v in self.versions) + 1

    @classmethod
    def new(cls, name: str, kt: KeyType, created: float, object_id: bytes) -> KeyRecord:
        return cls(name, kt.name, created, (VersionRecord(1, created, ACTIVE, object_id),))

    def rotated(self, created: float, object_id: bytes) -> KeyRecord:
        """The record after a rotation: a new active version, the rest verify-only."""
        older = tuple(
            replace(v, state=VERIFY_ONLY) if v.state == ACTIVE else v for v in self.versions
        )
        new = VersionRecord(self.next_version, created, ACTIVE, object_id)
        return replace(self, versions=(*older, new), revision=self.revision + 1)

    def to_bytes(self) -> bytes:
        doc = {
            "format": METADATA_FORMAT,
            "name": self.name,
            "type": self.type,
            "created": self.created,
            "versions": [
                {
                    "version": v.version,
                    "created": v.created,
                    "state": v.state,
                    "id": v.object_id.hex(),
                }
                for v in self.versions
            ],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, name: str, revision: int, data: bytes) -> KeyRecord:
        """Raises: ValueError if the stored metadata is not a valid record."""
        try:
            doc: Any = json.loads(data)
            if doc.get("format") != METADATA_FORMAT or doc.get("name") != name:
                raise ValueError("format or name mismatch")
            versions = tuple(
                VersionRecord(
                    int(v["version"]), float(v["created"]), str(v["state"]), bytes.fromhex(v["id"])
                )
                for v in doc["versions"]
            )
            record = cls(name, str(doc["type"]), float(doc["created"]), versions, revision)
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"unreadable metadata for key {name!r}: {exc}") from None
        if record.type not in algorithms.KEY_TYPES:
            raise ValueError(f"key {name!r} has unknown type {record.type!r}")
        if not versions or any(v.state not in STATES for v in versions):
            raise ValueError(f"key {name!r} has no versions or an unknown state")
        return record


@dataclass(slots=True)
class LoadedVersion:
    record: VersionRecord
    public_key: PublicKey
    public_key_pem: str
    spki: bytes


@dataclass(slots=True)
class LoadedKey:
    """A key as this process serves it: its record plus loaded public keys."""

    record: KeyRecord
    kt: KeyType
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    current: LoadedVersion = field(init=False)

    def __post_init__(self) -> None:
        self.current = self.versions[self.record.current.version]

    def version(self, number: int) -> LoadedVersion:
        """Raises: VersionNotFound."""
        v = self.versions.get(number)
        if v is None:
            raise VersionNotFound(f"key {self.record.name!r} has no version {number}")
        return v

    def verifying(self) -> list[LoadedVersion]:
        """Versions allowed to verify, newest first."""
        return sorted(self.versions.values(), key=lambda v: -v.record.version)

    def info(self) -> KeyInfo:
        r = self.record
        return KeyInfo(
            name=r.name,
            type=r.type,
            created=r.created,
            current_version=self.current.record.version,
            versions=tuple(
                VersionInfo(
                    version=v.record.version,
                    state=v.record.state,
                    created=v.record.created,
                    public_key_pem=v.public_key_pem,
                )
                for v in sorted(self.versions.values(), key=lambda v: v.record.version)
            ),
        )

    def summary(self) -> KeySummary:
        r = self.record
        return KeySummary(
            name=r.name, type=r.type, created=r.created, current_version=self.current.record.version
        )


def load_key(record: KeyRecord, public_keys: Mapping[bytes, bytes]) -> LoadedKey:
    """Combine a record with the SPKI DER of its versions, by object id.

    Raises:
        ValueError: a version's keypair is missing or does not match its type.
    """
    kt = algorithms.key_type(record.type)
    versions: dict[int, LoadedVersion] = {}
    for v in record.versions:
        spki = public_keys.get(v.object_id)
        if spki is None:
            raise ValueError(
                f"key {record.name!r} version {v.version}: keypair {v.object_id.hex()} "
                "is missing on the token"
            )
        pub = algorithms.load_public_key(kt, spki)
        versions[v.version] = LoadedVersion(v, pub, algorithms.public_key_pem(pub), spki)
    return LoadedKey(record, kt, versions)


class Keystore:
    """This process's cache of the keys on the token."""

    def __init__(self) -> None:
        self._keys: dict[str, LoadedKey] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, name: str) -> LoadedKey:
        """Raises: KeyNotFound."""
        key = self._keys.get(name)
        if key is None:
            raise KeyNotFound(f"no key named {name!r}")
        return key

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def put(self, key: LoadedKey) -> None:
        self._keys[key.record.name] = key

    def all(self) -> Iterable[LoadedKey]:
        return (self._keys[n] for n in sorted(self._keys))
