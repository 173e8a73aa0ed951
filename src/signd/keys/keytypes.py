"""Key types, hashes, families and signature schemes: the table every other
part of signd names keys by.  Pure data, no token, no I/O (``algorithms``
works out what to sign with them, ``publickeys`` loads and exports keys)."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

from Crypto.Hash import keccak
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ..errors import UnsupportedAlgorithm as UnsupportedAlgorithmError
from . import eth

__all__ = [
    "CURVE_ORDERS",
    "ETH_FORMAT",
    "FORMATS",
    "HASHES",
    "KEY_TYPES",
    "PADDINGS",
    "SECP256K1_HASHES",
    "Family",
    "Hash",
    "KeyType",
    "PublicKey",
    "Scheme",
    "key_type",
]

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


@dataclass(frozen=True, slots=True)
class Hash:
    name: str
    size: int
    new: Callable[[bytes], hashlib._Hash]
    algorithm: hashes.HashAlgorithm
    #: DER DigestInfo prefix for PKCS#1 v1.5 (RFC 8017, section 9.2, note 1).
    digest_info: bytes


HASHES: Final[dict[str, Hash]] = {
    "sha256": Hash(
        "sha256",
        32,
        hashlib.sha256,
        hashes.SHA256(),
        bytes.fromhex("3031300d060960864801650304020105000420"),
    ),
    "sha384": Hash(
        "sha384",
        48,
        hashlib.sha384,
        hashes.SHA384(),
        bytes.fromhex("3041300d060960864801650304020205000430"),
    ),
    "sha512": Hash(
        "sha512",
        64,
        hashlib.sha512,
        hashes.SHA512(),
        bytes.fromhex("3051300d060960864801650304020305000440"),
    ),
}


class _Keccak256(hashes.HashAlgorithm):
    """Keccak-256 for ``cryptography``'s ``Prehashed``, which only checks the
    digest's size: ``cryptography`` itself cannot compute it."""

    name = "keccak256"
    digest_size = 32
    block_size = 136


def _keccak256(data: bytes) -> hashlib._Hash:
    """Keccak-256 of ``data`` as a hash object (pycryptodome's: it has ``digest``)."""
    return cast("hashlib._Hash", keccak.new(data=data, digest_bits=256))


#: Keccak-256 as Ethereum uses it (no DigestInfo: it never signs with RSA).
HASHES["keccak256"] = Hash("keccak256", 32, _keccak256, _Keccak256(), b"")
#: What ``ec-secp256k1`` keys hash with; ``keccak256`` is for them alone.
SECP256K1_HASHES: Final = ("sha256", "keccak256")
#: The order n of each curve's base point (SEC 2): an ECDSA signature signd
#: returns has ``s <= n // 2`` (low-S).
CURVE_ORDERS: Final[dict[str, int]] = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
    "secp256k1": eth.SECP256K1_ORDER,
}


class Family(enum.Enum):
    EC = "ec"
    ED25519 = "ed25519"
    RSA = "rsa"
    HMAC = "hmac"  # a secret on the token: no public key


class Scheme(enum.Enum):
    """What the token is asked to do; ``token/mechanisms.py`` maps each to a mechanism."""

    ECDSA = "ecdsa"  # input: the digest; output: raw r || s
    EDDSA = "eddsa"  # input: the message (pure Ed25519)
    RSA_PKCS1 = "rsa-pkcs1v15"  # input: DigestInfo || digest
    RSA_PSS = "rsa-pss"  # input: the digest; MGF1 with the same hash, salt = digest size
    HMAC = "hmac"  # input: the message; output: the MAC (CKM_SHA*_HMAC by the plan's hash)

    # Enum's own ``__hash__`` is a Python function (the hash of the name), and
    # a worker looks a mechanism up by scheme per signature.  Members are
    # singletons that compare by identity, so the identity hash is as good,
    # and a dict look-up then calls no Python code (about 4x faster).
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class KeyType:
    name: str
    family: Family
    bits: int
    default_hash: str | None
    curve: str | None = None  # SEC curve name for EC keys

    @property
    def coordinate_size(self) -> int:
        return (self.bits + 7) // 8


KEY_TYPES: Final[dict[str, KeyType]] = {
    kt.name: kt
    for kt in (
        KeyType("ec-p256", Family.EC, 256, "sha256", "secp256r1"),
        KeyType("ec-p384", Family.EC, 384, "sha384", "secp384r1"),
        KeyType("ed25519", Family.ED25519, 256, None),
        KeyType("rsa-2048", Family.RSA, 2048, "sha256"),
        KeyType("rsa-3072", Family.RSA, 3072, "sha256"),
        KeyType("rsa-4096", Family.RSA, 4096, "sha256"),
        KeyType("ec-secp256k1", Family.EC, 256, "sha256", "secp256k1"),
        # HMAC secrets: ``bits`` is the secret's size (the hash's output size).
        KeyType("hmac-sha256", Family.HMAC, 256, "sha256"),
        KeyType("hmac-sha384", Family.HMAC, 384, "sha384"),
        KeyType("hmac-sha512", Family.HMAC, 512, "sha512"),
    )
}

PADDINGS: Final = ("pkcs1v15", "pss")
FORMATS: Final = ("der", "raw")
#: ``r || s || v`` (v the recovery id, 0 or 1): ``ec-secp256k1`` keys only.
ETH_FORMAT: Final = "eth"


def key_type(name: str) -> KeyType:
    """Raises: UnsupportedAlgorithm for an unknown key type name."""
    kt = KEY_TYPES.get(name)
    if kt is None:
        raise UnsupportedAlgorithmError(
            f"unknown key type {name!r}; supported: {', '.join(KEY_TYPES)}"
        )
    return kt
