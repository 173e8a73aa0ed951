"""Backup bundle entries, as the daemon makes and reads them: one key's
record and its versions' keys.  Pure logic, no token, no I/O; the file around
them is ``signd_client.bundle`` (the one place of the format; ``BACKUP.md``).

An entry is a msgpack map::

    {"name": str, "record": bin, "versions": [[int, bin, bin | nil], ...], "mark"?: int}

``record`` is the key's record as the token stores it (``KeyRecord.to_bytes``);
each version is its number, its public key (SubjectPublicKeyInfo DER) and its
private key wrapped under the wrap key (``CKM_AES_KEY_WRAP_PAD``), nil for a
destroyed version.  ``mark``: a watermarked key's mark when the bundle was
made (absent: none); a restore raises the daemon's own to it, never lowers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from signd_client.bundle import (
    MAX_BUNDLE_BYTES,
    BundleError,
    Header,
    decode_header,
    encode_bundle,
    entry_mac_input,
    field,
    header_mac_input,
    pack,
    unpack,
)

from .records import DESTROYED, KeyRecord

__all__ = [
    "MAX_BUNDLE_BYTES",
    "BundleError",
    "Entry",
    "Header",
    "VersionBlob",
    "decode_entry",
    "decode_header",
    "encode_bundle",
    "entry_mac_input",
    "header_mac_input",
]

#: Most versions one entry may hold.
MAX_VERSIONS: Final = 10_000


@dataclass(frozen=True, slots=True)
class VersionBlob:
    version: int
    #: SubjectPublicKeyInfo DER (an HMAC key: its secret's check value)
    public_key: bytes
    #: the private key wrapped under the wrap key; None for a destroyed version
    wrapped: bytes | None


@dataclass(frozen=True, slots=True)
class Entry:
    """One key: its record (as the token stores it) and its versions' keys."""

    record: KeyRecord
    versions: tuple[VersionBlob, ...]
    #: a watermarked key's mark (``signd.keys.replay``); None: none
    mark: int | None = None

    @property
    def name(self) -> str:
        return self.record.name

    def encode(self) -> bytes:
        doc: dict[str, object] = {
            "name": self.record.name,
            "record": self.record.to_bytes(),
            "versions": [[v.version, v.public_key, v.wrapped] for v in self.versions],
        }
        if self.mark is not None:  # only then: entries of other keys are as before
            doc["mark"] = self.mark
        return pack(doc)


def decode_entry(data: bytes) -> Entry:
    """One key's entry, checked: a valid record whose versions are the entry's,
    each live version with a wrapped private key.

    Raises: BundleError.
    """
    doc = unpack(data, "the entry")
    name = field(doc, "name", str, "the entry")
    try:
        record = KeyRecord.from_bytes(name, 1, field(doc, "record", bytes, "the entry"))
    except ValueError as exc:
        raise BundleError(f"the entry for {name!r} holds no valid key record: {exc}") from None
    raw = field(doc, "versions", list, "the entry")
    if len(raw) > MAX_VERSIONS:
        raise BundleError(f"the entry for {name!r} holds more than {MAX_VERSIONS} versions")
    versions = []
    for item in raw:
        ok = (
            isinstance(item, list)
            and len(item) == 3
            and type(item[0]) is int
            and isinstance(item[1], bytes)
            and (item[2] is None or isinstance(item[2], bytes))
        )
        if not ok:
            raise BundleError(f"the entry for {name!r} has a malformed version")
        versions.append(VersionBlob(item[0], item[1], item[2]))
    states = {v.version: v.state for v in record.versions}
    if [v.version for v in versions] != list(states):
        raise BundleError(f"the entry for {name!r} does not hold exactly its record's versions")
    for v in versions:
        if (v.wrapped is None) != (states[v.version] == DESTROYED):
            raise BundleError(
                f"the entry for {name!r}: version {v.version} is {states[v.version]} "
                f"but its private key is {'absent' if v.wrapped is None else 'present'}"
            )
    mark = doc.get("mark")
    if mark is not None and not (type(mark) is int and 0 <= mark < 1 << 64):
        raise BundleError(f"the entry for {name!r} has a malformed mark")
    return Entry(record, tuple(versions), mark)
