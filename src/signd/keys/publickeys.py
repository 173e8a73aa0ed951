"""Public keys: loading a SubjectPublicKeyInfo for a key type, PEM and JWK
exports, and an HMAC key's check value (which stands in for a public key).
Pure logic, no token, no I/O."""

from __future__ import annotations

import base64
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .keytypes import Family, KeyType, PublicKey

__all__ = [
    "HMAC_CHECK_MESSAGE",
    "HMAC_CHECK_SIZE",
    "hmac_check_value",
    "jwk",
    "load_public_key",
    "public_key_pem",
]

#: What an HMAC key's check value is the MAC of (see ``hmac_check_value``).
HMAC_CHECK_MESSAGE: Final = b"signd HMAC key check value"
#: Bytes of that MAC kept: a truncated MAC is never a valid one, so the check
#: value (in records and backups) cannot stand in for a MAC of the message.
HMAC_CHECK_SIZE: Final = 16


def hmac_check_value(mac_of_check_message: bytes) -> bytes:
    """An HMAC key's check value from its MAC of ``HMAC_CHECK_MESSAGE``: what
    identifies the secret (as an SPKI identifies a keypair) without revealing it."""
    return bytes(mac_of_check_message[:HMAC_CHECK_SIZE])


def load_public_key(kt: KeyType, spki_der: bytes) -> PublicKey:
    """Load a SubjectPublicKeyInfo and check it matches the key type.

    Raises:
        ValueError: the bytes are not a public key of that type (and an HMAC
        key has none).
    """
    if kt.family is Family.HMAC:
        raise ValueError(f"{kt.name} keys have no public key")
    try:
        key = serialization.load_der_public_key(spki_der)
    except UnsupportedAlgorithm as exc:
        raise ValueError(str(exc)) from None
    ok = (
        (
            kt.family is Family.EC
            and isinstance(key, ec.EllipticCurvePublicKey)
            and key.curve.name == kt.curve
        )
        or (kt.family is Family.ED25519 and isinstance(key, ed25519.Ed25519PublicKey))
        or (
            kt.family is Family.RSA
            and isinstance(key, rsa.RSAPublicKey)
            and key.key_size == kt.bits
        )
    )
    if not ok:
        raise ValueError(f"public key does not match key type {kt.name}")
    assert isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey)
    return key


def public_key_pem(key: PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


#: JOSE names (RFC 7518 section 3.1, 6.2.1.1; RFC 8037) by key type; RSA has no
#: single ``alg``, since one RSA key signs both RS256 and PS256.
_JOSE: Final[dict[str, tuple[str | None, str | None]]] = {
    "ec-p256": ("ES256", "P-256"),
    "ec-p384": ("ES384", "P-384"),
    "ed25519": ("EdDSA", "Ed25519"),
    "ec-secp256k1": ("ES256K", "secp256k1"),  # RFC 8812 section 3.2
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_uint(n: int, size: int | None = None) -> str:
    """RFC 7518 Base64urlUInt: big-endian, minimal length unless ``size`` is given."""
    return _b64url(n.to_bytes(size if size is not None else max(1, (n.bit_length() + 7) // 8)))


def jwk(kt: KeyType, key: PublicKey, kid: str) -> dict[str, str]:
    """``key`` as a JSON Web Key for signature verification: its members."""
    alg, crv = _JOSE.get(kt.name, (None, None))
    out = {"kid": kid, "use": "sig"}
    if isinstance(key, ec.EllipticCurvePublicKey):
        nums = key.public_numbers()
        size = kt.coordinate_size  # RFC 7518 6.2.1.2: x and y are full length
        x, y = _b64url_uint(nums.x, size), _b64url_uint(nums.y, size)
        out.update(kty="EC", x=x, y=y)
    elif isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        out.update(kty="OKP", x=_b64url(raw))
    else:
        rsa_nums = key.public_numbers()
        return {**out, "kty": "RSA", "n": _b64url_uint(rsa_nums.n), "e": _b64url_uint(rsa_nums.e)}
    if alg is not None:
        out["alg"] = alg
    if crv is not None:
        out["crv"] = crv
    return out
