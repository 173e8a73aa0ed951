"""Key records: what the token stores as a key's metadata.  Pure logic, no I/O.

A key is a name, a key type, its settings and a list of versions.  Each
version is one keypair on the token, found by its PKCS#11 ``CKA_ID``.  The
record below is what the token stores as the key's metadata (see
``token.py``); the token is the single source of truth, and ``Keystore`` is
only this process's cache of it, with each version's public key loaded for
verification.

**Version states.**  The record stores what an operator decided about a
version: ``enabled``, ``disabled`` (reversible) or ``destroyed`` (its private
key deleted, its public key kept).  What an enabled version may do follows
from the key's settings and the clock, so it is computed, never stored, and
no timer has to fire for a version to retire:

* ``active``: signs.  The newest version always, when enabled; older ones too
  when ``min_sign_version`` is set and they are at or above it (a request then
  names them; the newest is the default).
* ``verify-only``: verifies.  An older version, until ``verify_grace`` after
  the rotation that superseded it (no limit when ``verify_grace`` is 0).
* ``retired``: neither; below ``min_verify_version``, or its grace is over.
* ``disabled``: neither, until enabled again.
* ``destroyed``: neither, ever.  The public key stays for audit.

**Retention.**  A key holds at most ``max_versions`` versions that are not
destroyed (its own setting, or the daemon's default).  When the key allows
deletion, its ``retired`` versions are *pruned*: destroyed by the daemon, the
record first (see ``KeyRecord.prunable``).  A rotation that would go over the
cap with nothing to prune is refused.  So the versions a verification tries,
and the private keys on the token, stay bounded however often a key rotates.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from ..errors import DeletionNotAllowed, InvalidArgument, VersionNotFound, VersionNotUsable
from . import algorithms
from .algorithms import KeyType

__all__ = [
    "ACTIVE",
    "DEFAULT_MAX_VERSIONS",
    "DESTROYED",
    "DISABLED",
    "ENABLED",
    "INTERNAL_RECORD_PREFIX",
    "KEY_NAME",
    "MAX_VERSIONS_LIMIT",
    "RETIRED",
    "VERIFY_ONLY",
    "KeyRecord",
    "KeySettings",
    "VersionRecord",
    "check_key_name",
    "request_digest",
]

ENABLED: Final = "enabled"
DISABLED: Final = "disabled"
DESTROYED: Final = "destroyed"
STORED_STATES: Final = (ENABLED, DISABLED, DESTROYED)
#: Stored by signd before version states were computed; both mean "enabled".
_LEGACY_ENABLED: Final = ("active", "verify-only")

# What a version may do now (see the module docstring).
ACTIVE: Final = "active"
VERIFY_ONLY: Final = "verify-only"
RETIRED: Final = "retired"
METADATA_FORMAT: Final = 1
#: Token data objects of the daemon's own (the audit chain head) are named so:
#: not a valid key name, so no key record can take one.
INTERNAL_RECORD_PREFIX: Final = "signd:"
#: Defaults of ``[keys] default_max_versions`` and ``max_versions_limit``.
DEFAULT_MAX_VERSIONS: Final = 100
MAX_VERSIONS_LIMIT: Final = 1000


#: A key name (the wire's ``KEY_NAME_RE`` is the same rule, for clients).
KEY_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_key_name(name: str) -> str:
    """Raises: InvalidArgument unless ``name`` is a valid key name."""
    if not KEY_NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid key name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -, starting alphanumeric"
        )
    return name


@dataclass(frozen=True, slots=True)
class VersionRecord:
    version: int
    created: float
    state: str  # ENABLED, DISABLED or DESTROYED
    object_id: bytes
    #: the ``idempotency_key`` of the create_key or rotate that made this
    #: version, if it had one: kept as long as the version, so a repeat of that
    #: request (to this process or another, before or after a restart) is
    #: answered instead of done again
    idempotency_key: str | None = None
    #: ``request_digest`` of that request, to tell a repeat from a reuse of
    #: the key for something else
    request: str | None = None
    #: an HMAC key's version: its secret's check value
    #: (``algorithms.hmac_check_value``), which identifies the secret as an
    #: SPKI does a keypair, so a secret on the token (or restored) is checked
    check: bytes | None = None

    def made_by(self, idempotency_key: str, request: str) -> bool:
        """Whether this version was made by a request with ``idempotency_key``.

        Raises: InvalidArgument if it was, by a request other than ``request``.
        """
        if self.idempotency_key != idempotency_key:
            return False
        if self.request is not None and self.request != request:
            raise InvalidArgument(
                f"idempotency key {idempotency_key!r} was used with different parameters "
                f"(it made version {self.version} by another request); use a new key for a "
                "new request"
            )
        return True


def request_digest(op: str, **params: Any) -> str:
    """What an idempotent request asked, in short: ``op`` and its parameters
    (JSON values) other than the key name and the idempotency key."""
    doc = json.dumps({"op": op, **params}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class KeySettings:
    """A key's lifecycle settings; 0 means "off" / "no limit" for each number."""

    #: seconds between automatic rotations
    auto_rotate_period: float = 0.0
    #: seconds an older version keeps verifying after it is superseded
    verify_grace: float = 0.0
    #: versions below this may not sign; at or above it they may, when named
    min_sign_version: int = 0
    #: versions below this neither sign nor verify
    min_verify_version: int = 0
    #: whether ``destroy`` may delete private keys (and the daemon may prune
    #: retired versions)
    deletion_allowed: bool = False
    #: most versions not destroyed; 0: the daemon's ``[keys] default_max_versions``
    max_versions: int = 0
    #: every version's private key is made exportable wrapped under the token's
    #: trusted wrap key (and under nothing else); fixed when the key is created
    backup: bool = False
    #: every signature names a position above the highest signed so far (the
    #: mark, kept in the daemon's state directory); fixed when the key is created
    watermark: bool = False

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "auto_rotate_period": self.auto_rotate_period,
            "verify_grace": self.verify_grace,
            "min_sign_version": self.min_sign_version,
            "min_verify_version": self.min_verify_version,
            "deletion_allowed": self.deletion_allowed,
        }
        # Only when set: a record (and a create_key's request digest) without
        # it is byte for byte what signd wrote before retention existed.
        if self.max_versions:
            doc["max_versions"] = self.max_versions
        if self.backup:  # likewise: records of keys without backup are unchanged
            doc["backup"] = True
        if self.watermark:  # likewise
            doc["watermark"] = True
        return doc

    def version_cap(self, default: int, limit: int) -> int:
        """The most versions not destroyed this key may hold on this daemon:
        its own ``max_versions`` or ``default``, never above ``limit`` (a key
        set up by a daemon with a higher limit is held to this one's)."""
        return min(self.max_versions or default, limit)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> KeySettings:
        """Raises: ValueError, KeyError, TypeError on a malformed document."""
        s = cls(
            auto_rotate_period=float(doc.get("auto_rotate_period", 0.0)),
            verify_grace=float(doc.get("verify_grace", 0.0)),
            min_sign_version=int(doc.get("min_sign_version", 0)),
            min_verify_version=int(doc.get("min_verify_version", 0)),
            deletion_allowed=bool(doc.get("deletion_allowed", False)),
            max_versions=int(doc.get("max_versions", 0)),
            backup=doc.get("backup", False) is True,
            watermark=doc.get("watermark", False) is True,
        )
        if not (
            0 <= s.auto_rotate_period <= MAX_DURATION
            and 0 <= s.verify_grace <= MAX_DURATION
            and min(s.min_sign_version, s.min_verify_version, s.max_versions) >= 0
        ):
            raise ValueError("a setting is out of range")
        return s

    def check(
        self, latest: int, min_rotate_period: float, max_versions_limit: int = MAX_VERSIONS_LIMIT
    ) -> KeySettings:
        """Raises: InvalidArgument naming the first setting that cannot be applied.

        ``max_versions_limit``: the daemon's ``[keys] max_versions_limit``.
        """
        p = self.auto_rotate_period
        # (Written so that NaN, for which every comparison is false, fails too.)
        if not (p == 0 or min_rotate_period <= p <= MAX_DURATION):
            raise InvalidArgument(
                f"auto_rotate_period must be 0 (off) or {min_rotate_period:g} (the daemon's "
                f"[keys] min_rotate_period) to {MAX_DURATION:g} seconds"
            )
        if not 0 <= self.verify_grace <= MAX_DURATION:
            raise InvalidArgument(f"verify_grace must be 0 (no limit) to {MAX_DURATION:g} seconds")
        if not 0 <= self.min_verify_version <= latest:
            raise InvalidArgument(
                f"min_verify_version must be 0 to {latest}, the newest version; got "
                f"{self.min_verify_version}"
            )
        if self.min_sign_version != 0 and not (
            max(1, self.min_verify_version) <= self.min_sign_version <= latest
        ):
            raise InvalidArgument(
                f"min_sign_version must be 0 or from min_verify_version "
                f"({self.min_verify_version}) to the newest version ({latest}); got "
                f"{self.min_sign_version}"
            )
        if not 0 <= self.max_versions <= max_versions_limit:
            raise InvalidArgument(
                f"max_versions must be 0 (the daemon's default) or 1 to {max_versions_limit} "
                f"(the daemon's [keys] max_versions_limit); got {self.max_versions}"
            )
        return self


#: Longest period or grace a key may have: 100 years.
MAX_DURATION: Final = 100 * 365.25 * 86400


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key's metadata as stored on the token."""

    name: str
    type: str
    created: float
    versions: tuple[VersionRecord, ...]
    revision: int = 1
    settings: KeySettings = KeySettings()

    @property
    def latest(self) -> VersionRecord:
        return max(self.versions, key=lambda v: v.version)

    @property
    def destroyed(self) -> bool:
        """Every version destroyed: the key is gone but for its public keys."""
        return all(v.state == DESTROYED for v in self.versions)

    @property
    def next_version(self) -> int:
        return self.latest.version + 1

    @classmethod
    def new(
        cls,
        name: str,
        kt: KeyType,
        created: float,
        object_id: bytes,
        settings: KeySettings = KeySettings(),
        idempotency: tuple[str, str] | None = None,
        check: bytes | None = None,
    ) -> KeyRecord:
        """``idempotency``: (idempotency key, request digest) of the create_key.
        ``check``: an HMAC secret's check value."""
        ik, req = idempotency if idempotency is not None else (None, None)
        v1 = VersionRecord(1, created, ENABLED, object_id, ik, req, check)
        return cls(name, kt.name, created, (v1,), 1, settings)

    def rotated(
        self,
        created: float,
        object_id: bytes,
        idempotency: tuple[str, str] | None = None,
        prune: Iterable[int] = (),
        check: bytes | None = None,
    ) -> KeyRecord:
        """The record after a rotation: a new newest version, enabled.

        ``idempotency``: (idempotency key, request digest) of the rotate.
        ``prune``: versions destroyed in the same change (see ``prunable``).
        ``check``: an HMAC secret's check value.
        """
        ik, req = idempotency if idempotency is not None else (None, None)
        new = VersionRecord(self.next_version, created, ENABLED, object_id, ik, req, check)
        gone = set(prune)
        kept = tuple(replace(v, state=DESTROYED) if v.version in gone else v for v in self.versions)
        return replace(self, versions=(*kept, new), revision=self.revision + 1)

    @property
    def live(self) -> int:
        """How many versions are not destroyed (what ``max_versions`` caps)."""
        return sum(1 for v in self.versions if v.state != DESTROYED)

    def prunable(self, now: float) -> list[int]:
        """The versions the daemon destroys by itself at ``now``: every enabled
        version that is ``retired`` (below ``min_verify_version``, or past its
        ``verify_grace``), when the key allows deletion.  Never a disabled one
        (an operator's decision, reversible), never the newest."""
        if not self.settings.deletion_allowed:
            return []
        states, _ = self.states(now)
        return sorted(n for n, state in states.items() if state == RETIRED)

    def room_for_one_more(self, now: float, cap: int) -> list[int]:
        """Check that a rotation fits under ``cap`` versions not destroyed.

        Returns the versions to prune with it (every prunable one, or none
        when there is room anyway).

        Raises: DeletionNotAllowed if the key is full and nothing may be pruned.
        """
        if self.live < cap:
            return []
        prune = self.prunable(now)
        if self.live - len(prune) < cap:
            return prune
        if self.settings.deletion_allowed:
            why = "no older version is retired yet: wait until one is, destroy one"
        else:
            why = (
                "the key does not allow deletion: set deletion_allowed (its retired "
                "versions are then pruned)"
            )
        raise DeletionNotAllowed(
            f"key {self.name!r} holds {self.live} versions that are not destroyed, its "
            f"max_versions is {cap}, and none can be pruned, as {why} or raise "
            "max_versions; nothing was rotated"
        )

    def made_by(self, idempotency_key: str, request: str) -> VersionRecord | None:
        """The version a request with ``idempotency_key`` made, if any.

        Raises: InvalidArgument if the key made a version by another request.
        """
        for v in self.versions:
            if v.made_by(idempotency_key, request):
                return v
        return None

    def with_state(self, versions: Iterable[int], state: str) -> KeyRecord:
        """The record with ``versions`` set to ``state``.

        Raises: VersionNotFound; VersionNotUsable for a destroyed version
            (destroying it again is allowed: nothing changes).
        """
        wanted = set(versions)
        known = {v.version for v in self.versions}
        missing = sorted(wanted - known)
        if missing:
            raise VersionNotFound(f"key {self.name!r} has no version {missing[0]}")
        out = []
        for v in self.versions:
            if v.version in wanted and v.state != state:
                if v.state == DESTROYED:
                    raise VersionNotUsable(
                        f"key {self.name!r} version {v.version} is destroyed; it cannot be {state}"
                    )
                v = replace(v, state=state)
            out.append(v)
        return replace(self, versions=tuple(out), revision=self.revision + 1)

    def with_settings(self, settings: KeySettings) -> KeyRecord:
        return replace(self, settings=settings, revision=self.revision + 1)

    def grace_ends(self) -> dict[int, float]:
        """When each version stops verifying under ``verify_grace`` (grace > 0):
        that long after the first newer version was made.  One pass, newest
        first, so a key with thousands of versions costs no more than a sort."""
        grace = self.settings.verify_grace
        out: dict[int, float] = {}
        since = math.inf  # creation of the earliest version newer than this one
        for v in sorted(self.versions, key=lambda v: -v.version):
            out[v.version] = (since if since != math.inf else v.created) + grace
            since = min(since, v.created)
        return out

    def states(self, now: float) -> tuple[dict[int, str], float]:
        """Every version's state at ``now``, and when the next one changes by itself."""
        st = self.settings
        latest = self.latest.version
        out: dict[int, str] = {}
        changes = math.inf
        ends_at = self.grace_ends() if st.verify_grace > 0 else {}
        for v in self.versions:
            if v.state != ENABLED:
                out[v.version] = v.state
            elif v.version < st.min_verify_version:
                out[v.version] = RETIRED
            elif v.version == latest or 0 < st.min_sign_version <= v.version:
                out[v.version] = ACTIVE
            elif st.verify_grace > 0:
                ends = ends_at[v.version]
                if now < ends:
                    out[v.version] = VERIFY_ONLY
                    changes = min(changes, ends)
                else:
                    out[v.version] = RETIRED
            else:
                out[v.version] = VERIFY_ONLY
        return out, changes

    def next_rotation(self, floor: float = 0.0) -> float | None:
        """When auto-rotation is next due, or None when it is off.

        ``floor``: the shortest period this daemon rotates at (its
        ``min_rotate_period``), whatever another daemon allowed to be set.
        """
        period = self.settings.auto_rotate_period
        if period <= 0 or self.destroyed:
            return None
        return self.latest.created + max(period, floor)

    def to_bytes(self) -> bytes:
        doc = {
            "format": METADATA_FORMAT,
            "name": self.name,
            "type": self.type,
            "created": self.created,
            "settings": self.settings.to_json(),
            "versions": [_version_json(v) for v in self.versions],
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
                    int(v["version"]),
                    float(v["created"]),
                    ENABLED if v["state"] in _LEGACY_ENABLED else str(v["state"]),
                    bytes.fromhex(v["id"]),
                    _optional_str(v, "idempotency_key"),
                    _optional_str(v, "request"),
                    bytes.fromhex(_optional_str(v, "check") or "") or None,
                )
                for v in doc["versions"]
            )
            settings = KeySettings.from_json(doc.get("settings") or {})
            record = cls(
                name, str(doc["type"]), float(doc["created"]), versions, revision, settings
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"unreadable metadata for key {name!r}: {exc}") from None
        if record.type not in algorithms.KEY_TYPES:
            raise ValueError(f"key {name!r} has unknown type {record.type!r}")
        if not versions or any(v.state not in STORED_STATES for v in versions):
            raise ValueError(f"key {name!r} has no versions or an unknown state")
        if len({v.version for v in versions}) != len(versions):
            raise ValueError(f"key {name!r} lists a version twice")
        return record


def _version_json(v: VersionRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "version": v.version,
        "created": v.created,
        "state": v.state,
        "id": v.object_id.hex(),
    }
    # Only when set: a record without them is byte for byte what signd wrote
    # before idempotency keys, and older daemons read it (ignoring the fields).
    if v.idempotency_key is not None:
        out["idempotency_key"] = v.idempotency_key
    if v.request is not None:
        out["request"] = v.request
    if v.check is not None:  # HMAC keys only
        out["check"] = v.check.hex()
    return out


def _optional_str(doc: Mapping[str, Any], name: str) -> str | None:
    """Raises: TypeError if present but not a string."""
    value = doc.get(name)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{name} is not a string")
