"""Ethereum helpers for ``ec-secp256k1`` keys: pure logic, no token, no I/O.

Keccak-256 (the original Keccak padding Ethereum uses, not SHA3-256), the
address of a public key with its EIP-55 checksum, and the recovery id ``v``
of an ``r || s || v`` signature.  The recovery is libsecp256k1's (through
``coincurve``): signd works ``v`` out by recovering the public key from
``r || s || 0`` and comparing it with the version's own, so what it returns
is checked, not only computed.
"""

from __future__ import annotations

from typing import Final

from coincurve import PublicKey as _Secp256k1Point
from Crypto.Hash import keccak
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "ETH_SIGNATURE_SIZE",
    "SECP256K1_ORDER",
    "address",
    "checksum_address",
    "keccak256",
    "recover",
    "recovery_id",
    "uncompressed_point",
]

#: The order n of secp256k1's base point (SEC 2, section 2.4.1).
SECP256K1_ORDER: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HALF: Final = SECP256K1_ORDER >> 1
#: ``r(32) || s(32) || v(1)``
ETH_SIGNATURE_SIZE: Final = 65


def keccak256(data: bytes) -> bytes:
    """Keccak-256 of ``data``, as Ethereum computes it."""
    return keccak.new(data=data, digest_bits=256).digest()


def uncompressed_point(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The key's point as SEC 1 uncompressed bytes: ``04 || x(32) || y(32)``."""
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def checksum_address(raw: bytes) -> str:
    """A 20-byte address as ``0x`` and 40 hex digits with the EIP-55 checksum:
    a letter is upper case where the same nibble of the Keccak-256 of the
    lower-case hex is 8 or more."""
    if len(raw) != 20:
        raise ValueError(f"an Ethereum address is 20 bytes, got {len(raw)}")
    low = raw.hex()
    mask = keccak256(low.encode("ascii")).hex()
    return "0x" + "".join(
        c.upper() if c.isalpha() and int(m, 16) >= 8 else c
        for c, m in zip(low, mask[:40], strict=True)
    )


def address(public_key: ec.EllipticCurvePublicKey) -> str:
    """The Ethereum address of a secp256k1 public key, EIP-55 checksummed: the
    last 20 bytes of the Keccak-256 of the point's ``x || y``."""
    return checksum_address(keccak256(uncompressed_point(public_key)[1:])[-20:])


def recovery_id(r: int, s: int, digest: bytes, point: bytes) -> int:
    """The ``v`` (0 or 1) with which ``(r, s)`` over the 32-byte ``digest``
    recovers ``point`` (uncompressed), i.e. the parity of R's y.

    Raises:
        ValueError: neither does (the signature is not this key's).
    """
    rs = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    for v in (0, 1):
        if _recovered(rs + bytes((v,)), digest) == point:
            return v
    raise ValueError("the signature does not recover to the key's public key")


def recover(signature: bytes, digest: bytes) -> bytes | None:
    """The uncompressed public key that a 65-byte ``r || s || v`` signature over
    the 32-byte ``digest`` recovers, or None if it recovers none.

    Permissive, as verification is: ``v`` may be 0, 1, 27 or 28, and a
    high ``s`` is taken as its low twin (with ``v`` flipped, the same point).
    """
    if len(signature) != ETH_SIGNATURE_SIZE or len(digest) != 32:
        return None
    v = signature[64]
    if v in (27, 28):
        v -= 27
    if v not in (0, 1):
        return None
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    if not (0 < r < SECP256K1_ORDER and 0 < s < SECP256K1_ORDER):
        return None
    if s > _HALF:
        s, v = SECP256K1_ORDER - s, v ^ 1
    return _recovered(signature[:32] + s.to_bytes(32, "big") + bytes((v,)), digest)


def _recovered(signature: bytes, digest: bytes) -> bytes | None:
    """libsecp256k1's recovery, or None where it finds no point."""
    try:
        point = _Secp256k1Point.from_signature_and_message(signature, digest, hasher=None)
    except Exception:  # coincurve raises ValueError or its own errors; all mean "no key"
        return None
    return point.format(compressed=False)
