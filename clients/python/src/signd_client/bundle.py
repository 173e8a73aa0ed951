"""Backup bundles: the file ``signctl backup`` writes and ``signctl restore``
reads, as far as a client splits it (``BACKUP.md`` has the format).

A bundle is ``MAGIC`` then one msgpack map::

    {"header": bin, "header_mac": bin, "entries": [[bin, bin], ...]}

``header`` is a msgpack map (``Header``); ``entries`` pairs each key's entry
(a msgpack map the daemon reads: ``signd.keys.bundle``) with its MAC.  The
MACs are HMAC-SHA256 made *on a token* with the backup MAC key, which the
wrap key ceremony derives from the wrap key's secret::

    header_mac = HMAC(b"signd-backup-header\\0" || header)
    entry mac  = HMAC(b"signd-backup-entry\\0" || SHA-256(header) || entry)

so an entry is bound to its bundle, and restoring one key (one request)
carries the header and that entry only.  A client cannot check the MACs
(only a token holding the wrap key's secret can); it checks the shape, and
``restore`` sends every entry once with ``check`` before writing any.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from ._calls import Call, restore
from .errors import InvalidArgument
from .protocol import RestoreResult

__all__ = [
    "FORMAT",
    "MAGIC",
    "MAC_BYTES",
    "MAX_BUNDLE_BYTES",
    "MECHANISM",
    "Bundle",
    "BundleError",
    "Header",
    "decode_bundle",
    "decode_header",
    "encode_bundle",
    "entry_mac_input",
    "entry_name",
    "header_mac_input",
    "pack",
    "restore_calls",
    "unpack",
    "field",
]

#: The file's first bytes: a name and the format's version.
MAGIC: Final = b"signd-backup\x00\x01\n\x00"
FORMAT: Final = 1
MAC_BYTES: Final = 32
#: A bundle file is read up to this size (a response frame's limit).
MAX_BUNDLE_BYTES: Final = (64 << 20) - (64 << 10)
#: The mechanism every private key in a bundle is wrapped with.
MECHANISM: Final = "CKM_AES_KEY_WRAP_PAD"
#: Most keys one bundle may hold.
MAX_ENTRIES: Final = 100_000
_HEADER_LABEL: Final = b"signd-backup-header\x00"
_ENTRY_LABEL: Final = b"signd-backup-entry\x00"


class BundleError(InvalidArgument):
    """A bundle, header or entry that is not well formed (damaged or not a bundle)."""


@dataclass(frozen=True, slots=True)
class Header:
    #: when the bundle was made (Unix seconds)
    created: float
    #: the wrap key's check value (``signd wrap-key`` prints it)
    wrap_key: str
    #: how many entries follow
    keys: int
    #: the token that made it: label, manufacturer, model, serial
    source: tuple[str, str, str, str]

    def encode(self) -> bytes:
        return pack(
            {
                "format": FORMAT,
                "created": self.created,
                "wrap_key": self.wrap_key,
                "mechanism": MECHANISM,
                "keys": self.keys,
                "source": list(self.source),
            }
        )


@dataclass(frozen=True, slots=True)
class Bundle:
    """A bundle as read from a file: its parts still as bytes, with their MACs."""

    header: bytes
    header_mac: bytes
    #: (entry, its MAC), in the file's order
    entries: tuple[tuple[bytes, bytes], ...]


def header_mac_input(header: bytes) -> bytes:
    """What the header's MAC covers."""
    return _HEADER_LABEL + header


def entry_mac_input(header: bytes, entry: bytes) -> bytes:
    """What an entry's MAC covers: the entry, bound to its bundle's header."""
    return _ENTRY_LABEL + hashlib.sha256(header).digest() + entry


def encode_bundle(
    header: bytes, header_mac: bytes, entries: Sequence[tuple[bytes, bytes]]
) -> bytes:
    return MAGIC + pack({"header": header, "header_mac": header_mac, "entries": list(entries)})


def decode_bundle(data: bytes) -> Bundle:
    """Split a bundle file into its parts, checking its shape (not its MACs).

    Raises: BundleError (not a bundle, truncated, or damaged so its shape broke).
    """
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"a bundle is at most {MAX_BUNDLE_BYTES} bytes, this is {len(data)}")
    if not data.startswith(MAGIC):
        raise BundleError("not a signd backup bundle (it does not start with the bundle's magic)")
    doc = unpack(data[len(MAGIC) :], "the bundle")
    header = field(doc, "header", bytes, "the bundle")
    header_mac = _mac(field(doc, "header_mac", bytes, "the bundle"), "the header")
    raw = field(doc, "entries", list, "the bundle")
    if len(raw) > MAX_ENTRIES:
        raise BundleError(f"a bundle holds at most {MAX_ENTRIES} keys")
    entries = []
    for i, pair in enumerate(raw):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], bytes)):
            raise BundleError(f"entry {i} is not [entry, mac]")
        entries.append((pair[0], _mac(pair[1], f"entry {i}")))
    count = decode_header(header).keys
    if count != len(entries):
        raise BundleError(
            f"the header says {count} keys, the bundle holds {len(entries)}: it is truncated "
            "or was changed"
        )
    return Bundle(header, header_mac, tuple(entries))


def decode_header(data: bytes) -> Header:
    """Raises: BundleError."""
    doc = unpack(data, "the header")
    fmt = field(doc, "format", int, "the header")
    if fmt != FORMAT:
        raise BundleError(f"bundle format {fmt} is not one this signd reads ({FORMAT})")
    mechanism = field(doc, "mechanism", str, "the header")
    if mechanism != MECHANISM:
        raise BundleError(f"keys wrapped with {mechanism!r}: this signd unwraps {MECHANISM} only")
    source = field(doc, "source", list, "the header")
    if len(source) != 4 or not all(isinstance(s, str) for s in source):
        raise BundleError("the header's source is not four strings")
    keys = field(doc, "keys", int, "the header")
    if not 0 <= keys <= MAX_ENTRIES:
        raise BundleError(f"the header's key count {keys} is out of range")
    created = field(doc, "created", float, "the header")
    wrap_key = field(doc, "wrap_key", str, "the header")
    return Header(created, wrap_key, keys, (source[0], source[1], source[2], source[3]))


def restore_calls(data: bytes, *, check: bool = False) -> list[Call[RestoreResult]]:
    """The ``restore`` requests for a bundle file, one a key, in its order.

    Send them all with ``check`` first, then without: a bundle changed
    anywhere is refused by the token before any key is written.

    Raises: BundleError (not a bundle, truncated, or damaged in its shape).
    """
    bundle = decode_bundle(data)
    return [
        restore(entry_name(entry), bundle.header, bundle.header_mac, entry, mac, check=check)
        for entry, mac in bundle.entries
    ]


def entry_name(entry: bytes) -> str:
    """The key an entry is for (the daemon reads the rest).  Raises: BundleError."""
    name: str = field(unpack(entry, "an entry"), "name", str, "an entry")
    return name


def pack(doc: Mapping[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(doc, use_bin_type=True)
    return packed


def unpack(data: bytes, what: str) -> Mapping[str, Any]:
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BundleError(f"{what} is not valid msgpack (truncated or damaged): {exc}") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{what} is not a map")
    return doc


def field(doc: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    value = doc.get(name)
    if kind is float and type(value) is int:
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleError(f"{what} has no {kind.__name__} field {name!r}")
    return value


def _mac(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != MAC_BYTES:
        raise BundleError(f"the MAC of {what} is not {MAC_BYTES} bytes")
    return value
