"""Shamir shares of the wrap key's secret: split it for the ceremony, combine it back.

The wrap-key ceremony makes a fresh random 32-byte secret, puts it on the token
as the AES-256 wrap key and prints it as ``count`` shares of which any
``threshold`` give it back; given that many shares, the same command puts the
same wrap key on another token.  This module only turns the secret into share
lines and back, and into the values made from it (``check_value``, and
``backup_mac_key``: the token's backup MAC key): it touches no token, writes
nothing to disk and logs nothing.

The arithmetic is pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir``
(GF(2^128), the AES-GCM polynomial, share indexes 1..n).  It shares 16-byte
secrets, so the 32-byte secret is shared as two 16-byte halves, each with its
own random polynomial, at the same indexes; a share carries both halves.

Share line format (one line, ASCII, safe to read aloud or copy by hand)::

    signd-share-v1-SET-M-INDEX-P1-P2-P3-P4-P5-P6-P7-P8-CHECK

* ``SET``: the first 8 hex digits of ``check_value(secret)``: shares of two
  ceremonies never mix, and the combined secret is checked against it;
* ``M``: the threshold, decimal; ``INDEX``: this share's index, 1..count;
* ``P1``..``P8``: the 32-byte share payload (first half's share, then the
  second half's) as 64 lower-case hex digits in groups of 8;
* ``CHECK``: the first 8 hex digits of SHA-256 of everything before
  ``-CHECK``, so a mistyped or corrupted line is named as such before any
  combining.

``combine`` ignores white space and letter case in a line.  It refuses, with a
``ShareError`` naming the input line (1-based) where it can, and never returns a
wrong secret: a malformed or corrupted line; lines of different sets or
thresholds; one index given twice; fewer than ``M`` distinct shares; shares
that do not combine to a secret matching ``SET`` (a line that passed its
checksum but is wrong, or one from another split of the same secret).  Every
line given is used: the first ``M`` distinct shares give the secret, which must
match ``SET``; each further share, put in place of the ``M``-th, must give the
same secret, else it is named as the one that does not combine.

``SET`` holds 32 bits of the check value, so a wrong share that passed its
checksum goes unnoticed by ``combine`` with probability 2**-32; a caller that
has the full 16-digit check value (printed by the ceremony, stored with the
token's wrap key) compares it too.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from Crypto.Protocol.SecretSharing import Shamir

from signd.errors import InternalError, InvalidArgument

__all__ = [
    "MAX_SHARES",
    "SECRET_SIZE",
    "ShareError",
    "backup_mac_key",
    "check_value",
    "combine",
    "split",
]

#: The wrap key's secret: an AES-256 key.
SECRET_SIZE: Final = 32
#: At most this many shares in one split.
MAX_SHARES: Final = 16
_HALF: Final = 16
_PREFIX: Final = "signd-share-v1"
_CHECK_VALUE_LABEL: Final = b"signd wrap key check value"
_BACKUP_MAC_KEY_LABEL: Final = b"signd backup mac key"
_LINE: Final = re.compile(
    r"signd-share-v1-(?P<set>[0-9a-f]{8})-(?P<m>[0-9]{1,2})-(?P<index>[0-9]{1,2})"
    r"-(?P<payload>(?:[0-9a-f]{8}-){7}[0-9a-f]{8})-(?P<check>[0-9a-f]{8})"
)
_FORMAT: Final = "signd-share-v1-SET-M-INDEX-<8 groups of 8 hex digits>-CHECK"


class ShareError(InvalidArgument):
    """A share line or a set of share lines that does not give the secret back."""


def check_value(secret: bytes) -> str:
    """The wrap key's check value: 16 hex digits that name the secret without revealing it.

    HMAC-SHA256 keyed with the secret over a fixed label, cut to 64 bits.

    Raises:
        ShareError: ``secret`` is not 32 bytes.
    """
    _check_secret(secret)
    return hmac.new(bytes(secret), _CHECK_VALUE_LABEL, hashlib.sha256).hexdigest()[:16]


def backup_mac_key(secret: bytes) -> bytes:
    """The value of the token's backup MAC key (an HMAC-SHA256 key), made from the
    wrap key's secret: so every token given the same shares holds the same MAC key,
    and a backup made on one is checked on another.

    HMAC-SHA256 keyed with the secret over a label of its own (not the check
    value's): the check value, which is printed, says nothing of this key.

    Raises:
        ShareError: ``secret`` is not 32 bytes.
    """
    _check_secret(secret)
    return hmac.new(bytes(secret), _BACKUP_MAC_KEY_LABEL, hashlib.sha256).digest()


def split(secret: bytes, threshold: int, count: int) -> list[str]:
    """Share ``secret`` as ``count`` lines of which any ``threshold`` give it back.

    Before returning, the lines are combined again (every one of them is used),
    so a line printed at the ceremony is known to work.

    Raises:
        ShareError: ``secret`` is not 32 bytes, or not 2 <= threshold <= count <= 16.
        InternalError: the lines made do not combine to the secret (a bug).
    """
    _check_secret(secret)
    for name, value in (("threshold", threshold), ("count", count)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ShareError(f"{name} must be an integer, not {type(value).__name__}")
    if not 2 <= count <= MAX_SHARES:
        raise ShareError(f"count must be between 2 and {MAX_SHARES}, got {count}")
    if not 2 <= threshold <= count:
        raise ShareError(f"threshold must be between 2 and count ({count}), got {threshold}")
    secret = bytes(secret)
    set_id = check_value(secret)[:8]
    first = Shamir.split(threshold, count, secret[:_HALF], ssss=False)
    second = Shamir.split(threshold, count, secret[_HALF:], ssss=False)
    lines: list[str] = []
    for (index, low), (index2, high) in zip(first, second, strict=True):
        if index != index2:  # the library numbers shares 1..n
            raise InternalError("the two halves' shares have different indexes")
        lines.append(_format(set_id, threshold, index, low + high))
    try:
        again = combine(lines)
    except ShareError as exc:  # a bug, not a refusal
        raise InternalError(f"the shares just made do not combine: {exc.message}") from None
    if not hmac.compare_digest(again, secret):  # a bug
        raise InternalError("the shares just made do not combine to the secret")
    return lines


def combine(shares: Sequence[str]) -> bytes:
    """The secret that ``shares`` (share lines) give back; see the module docstring.

    Raises:
        ShareError: a line is malformed or corrupted, the lines are of different
            sets or thresholds, a share is given twice, fewer than the threshold
            are given, or they do not combine to the set's secret.
    """
    if isinstance(shares, str | bytes):
        raise ShareError("give a list of share lines, not one string")
    if not shares:
        raise ShareError("no shares given")
    parsed = [_parse(position, line) for position, line in enumerate(shares, 1)]
    first = parsed[0]
    by_index: dict[int, _Share] = {}
    for share in parsed:
        if share.set_id != first.set_id:
            raise ShareError(
                f"line {share.position} is a share of set {share.set_id}, line "
                f"{first.position} of set {first.set_id}: shares of different "
                "ceremonies do not mix"
            )
        if share.threshold != first.threshold:
            raise ShareError(
                f"line {share.position} says {share.threshold} shares are needed, line "
                f"{first.position} says {first.threshold}: they are not of one split"
            )
        seen = by_index.get(share.index)
        if seen is not None:
            if hmac.compare_digest(seen.payload, share.payload):
                raise ShareError(
                    f"share {share.index} given twice (lines {seen.position} and {share.position})"
                )
            raise ShareError(
                f"lines {seen.position} and {share.position} are both share "
                f"{share.index} but differ: at least one of them is wrong"
            )
        by_index[share.index] = share
    needed = first.threshold
    if len(parsed) < needed:
        raise ShareError(
            f"{needed} shares are needed, {len(parsed)} given: "
            f"{needed - len(parsed)} more of set {first.set_id}"
        )
    base = parsed[:needed]
    secret = _interpolate(base)
    if not hmac.compare_digest(check_value(secret)[:8], first.set_id):
        raise ShareError(
            f"the shares do not combine to the secret of set {first.set_id}: at least "
            "one of them is wrong (forged, or from another split of the same key)"
        )
    for extra in parsed[needed:]:
        if not hmac.compare_digest(_interpolate([*base[:-1], extra]), secret):
            raise ShareError(
                f"line {extra.position} (share {extra.index}) does not combine with "
                f"lines {', '.join(str(s.position) for s in base)}: it is wrong"
            )
    return secret


@dataclass(frozen=True, slots=True)
class _Share:
    """One parsed share line; its payload is left out of the repr."""

    position: int
    set_id: str
    threshold: int
    index: int
    payload: bytes = field(repr=False)


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes | bytearray):
        raise ShareError(f"the secret must be bytes, not {type(secret).__name__}")
    if len(secret) != SECRET_SIZE:
        raise ShareError(f"the secret must be {SECRET_SIZE} bytes, got {len(secret)}")


def _checksum(body: str) -> str:
    return hashlib.sha256(body.encode("ascii")).hexdigest()[:8]


def _format(set_id: str, threshold: int, index: int, payload: bytes) -> str:
    hex_payload = payload.hex()
    groups = "-".join(hex_payload[i : i + 8] for i in range(0, len(hex_payload), 8))
    body = f"{_PREFIX}-{set_id}-{threshold}-{index}-{groups}"
    return f"{body}-{_checksum(body)}"


def _parse(position: int, line: object) -> _Share:
    if not isinstance(line, str):
        raise ShareError(f"line {position} is not a string but {type(line).__name__}")
    text = "".join(line.split()).lower()
    if not text.startswith(_PREFIX + "-"):
        if text.startswith("signd-share-"):
            raise ShareError(
                f"line {position} is a share of another format version; this signd reads {_PREFIX}"
            )
        raise ShareError(f"line {position} is not a signd share line ({_FORMAT})")
    match = _LINE.fullmatch(text)
    if match is None:
        raise ShareError(f"line {position} is malformed: a share line is {_FORMAT}")
    body = text[: match.start("check") - 1]
    if not hmac.compare_digest(_checksum(body), match["check"]):
        raise ShareError(f"line {position} is mistyped or corrupted: its checksum does not match")
    threshold_text, index_text = match["m"], match["index"]
    threshold, index = int(threshold_text), int(index_text)
    if str(threshold) != threshold_text or str(index) != index_text:
        raise ShareError(f"line {position} is malformed: M and INDEX have no leading zeros")
    if not 2 <= threshold <= MAX_SHARES:
        raise ShareError(
            f"line {position} is malformed: its threshold {threshold} is not 2..{MAX_SHARES}"
        )
    if not 1 <= index <= MAX_SHARES:
        raise ShareError(f"line {position} is malformed: its index {index} is not 1..{MAX_SHARES}")
    payload = bytes.fromhex(match["payload"].replace("-", ""))
    return _Share(position, match["set"], threshold, index, payload)


def _interpolate(shares: Sequence[_Share]) -> bytes:
    """The secret at x=0 of the polynomials through exactly ``len(shares)`` shares."""
    low = Shamir.combine([(s.index, s.payload[:_HALF]) for s in shares], ssss=False)
    high = Shamir.combine([(s.index, s.payload[_HALF:]) for s in shares], ssss=False)
    return low + high
