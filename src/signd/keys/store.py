"""Keys as this process serves them: each record with its versions' public
keys loaded, their states kept current by the clock, in ``Keystore`` (only
this process's cache of the token, the single source of truth).  Pure logic,
no token, no I/O.  The records themselves are in ``keys.records``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import KeyNotFound, VersionNotFound, VersionNotUsable
from . import algorithms
from .algorithms import KeyType, PublicKey
from .records import (
    ACTIVE,
    DESTROYED,
    RETIRED,
    VERIFY_ONLY,
    KeyRecord,
    KeySettings,
    VersionRecord,
)

__all__ = ["Keystore", "LoadedKey", "LoadedVersion", "load_key", "new_object_id", "object_label"]


def new_object_id() -> bytes:
    """A fresh random CKA_ID for a keypair."""
    return secrets.token_bytes(8)


def object_label(name: str, version: int) -> str:
    """CKA_LABEL of a version's keypair: readable in ``pkcs11-tool -O``."""
    return f"{name}/v{version}"


@dataclass(slots=True)
class LoadedVersion:
    record: VersionRecord
    #: None for an HMAC key (a secret on the token, no public key)
    public_key: PublicKey | None
    public_key_pem: str | None
    #: SPKI DER (an HMAC key: its secret's check value)
    spki: bytes
    #: what it may do now; kept current by ``LoadedKey.at``
    state: str = ACTIVE


@dataclass(slots=True)
class LoadedKey:
    """A key as this process serves it: its record plus loaded public keys.

    The states of its versions depend on the clock; ``at(now)`` brings them up
    to date, and costs one comparison until a grace window actually ends.
    """

    record: KeyRecord
    kt: KeyType
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    #: the most versions not destroyed it may hold here (``KeySettings.version_cap``);
    #: 0: not known (shown as absent)
    version_cap: int = 0
    #: the version a sign request without ``version`` uses, if it may sign
    signer: LoadedVersion | None = field(init=False, default=None)
    #: versions that may verify, newest first
    verifiers: list[LoadedVersion] = field(init=False, default_factory=list)
    _valid_until: float = field(init=False, default=-math.inf)

    def at(self, now: float) -> LoadedKey:
        if now >= self._valid_until:
            states, self._valid_until = self.record.states(now)
            for number, v in self.versions.items():
                v.state = states[number]
            newest = self.versions[self.record.latest.version]
            self.signer = newest if newest.state == ACTIVE else None
            self.verifiers = sorted(
                (v for v in self.versions.values() if v.state in (ACTIVE, VERIFY_ONLY)),
                key=lambda v: -v.record.version,
            )
        return self

    def version(self, number: int) -> LoadedVersion:
        """Raises: VersionNotFound."""
        v = self.versions.get(number)
        if v is None:
            raise VersionNotFound(f"key {self.record.name!r} has no version {number}")
        return v

    def signing(self, number: int | None) -> LoadedVersion:
        """The version a sign request gets (call ``at`` first).

        Raises: VersionNotFound, VersionNotUsable.
        """
        if number is None:
            if self.signer is not None:
                return self.signer
            latest = self.versions[self.record.latest.version]
            remedy = (
                "rotate the key" if latest.state == DESTROYED else "enable it or rotate the key"
            )
            raise VersionNotUsable(
                f"key {self.record.name!r} cannot sign: its newest version "
                f"{latest.record.version} is {latest.state}; {remedy}"
            )
        v = self.version(number)
        if v.state != ACTIVE:
            raise VersionNotUsable(
                f"key {self.record.name!r} version {number} may not sign: it is {v.state}"
                + _why(self.record.settings, v)
            )
        return v

    def verifying(self, number: int | None) -> list[LoadedVersion]:
        """Versions to try for a verification, newest first (call ``at`` first).

        Raises: VersionNotFound, VersionNotUsable (a named version that may not verify).
        """
        if number is None:
            return self.verifiers
        v = self.version(number)
        if v.state not in (ACTIVE, VERIFY_ONLY):
            raise VersionNotUsable(
                f"key {self.record.name!r} version {number} may not verify: it is {v.state}"
                + _why(self.record.settings, v)
            )
        return [v]

    def verify_until(self) -> dict[int, float]:
        """When each verify-only version retires (its grace ends), by number."""
        st = self.record.settings
        ends_at = self.record.grace_ends() if st.verify_grace > 0 else {}
        return {
            n: t
            for n, t in ends_at.items()
            if (v := self.versions.get(n)) is not None and v.state == VERIFY_ONLY
        }


def _why(settings: KeySettings, v: LoadedVersion) -> str:
    if v.state == RETIRED:
        if v.record.version < settings.min_verify_version:
            return f" (below min_verify_version {settings.min_verify_version})"
        return f" (its verify_grace of {settings.verify_grace:g} s is over)"
    if v.state == VERIFY_ONLY:
        if settings.min_sign_version:
            return f" (below min_sign_version {settings.min_sign_version})"
        return " (only the newest version signs while min_sign_version is 0)"
    return ""


def load_key(
    record: KeyRecord, public_keys: Mapping[bytes, bytes], now: float, version_cap: int = 0
) -> LoadedKey:
    """Combine a record with the SPKI DER of its versions, by object id.

    ``version_cap``: the key's ``max_versions`` on this daemon, for ``info``.

    Raises:
        ValueError: a version's public key is missing or does not match its type.
    """
    kt = algorithms.key_type(record.type)
    if kt.family is algorithms.Family.HMAC:
        return _load_secret_key(record, kt, public_keys, now, version_cap)
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
    return LoadedKey(record, kt, versions, version_cap).at(now)


def _load_secret_key(
    record: KeyRecord,
    kt: KeyType,
    check_values: Mapping[bytes, bytes],
    now: float,
    version_cap: int,
) -> LoadedKey:
    """``load_key`` for an HMAC key: ``check_values`` are the check values of
    the secrets on the token; every version not destroyed must have its
    secret there, with the check value its record has (if it has one).

    Raises: ValueError (a secret missing or not the one recorded).
    """
    versions: dict[int, LoadedVersion] = {}
    for v in record.versions:
        check = check_values.get(v.object_id)
        if check is None and v.state != DESTROYED:
            raise ValueError(
                f"key {record.name!r} version {v.version}: secret {v.object_id.hex()} "
                "is missing on the token"
            )
        if check is not None and v.check is not None and check != v.check:
            raise ValueError(
                f"key {record.name!r} version {v.version}: the secret {v.object_id.hex()} "
                "on the token is not the one its record names (another check value)"
            )
        value = v.check if v.check is not None else (check or b"")
        versions[v.version] = LoadedVersion(v, None, None, value)
    return LoadedKey(record, kt, versions, version_cap).at(now)


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

    def get_or_none(self, name: str) -> LoadedKey | None:
        return self._keys.get(name)

    def put(self, key: LoadedKey) -> None:
        """Cache ``key``, unless a newer revision of it is cached already.

        Records only move forward; a read that started before a change here
        finished (the periodic sync, a look-up) must not bring back the old one.
        """
        cached = self._keys.get(key.record.name)
        if cached is None or cached.record.revision <= key.record.revision:
            self._keys[key.record.name] = key

    def forget(self, name: str) -> None:
        self._keys.pop(name, None)

    def all(self) -> Iterable[LoadedKey]:
        return (self._keys[n] for n in sorted(self._keys))
