"""PKCS#11 objects as the rest of signd sees them: a public key object's
SubjectPublicKeyInfo.  Worker side (it reads python-pkcs11 objects); a module
of its own so that ``session.py`` and ``importing.py`` share it without
importing each other."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from pkcs11 import Attribute, KeyType
from pkcs11.util.ec import encode_ec_public_key

from ..errors import TokenError

__all__ = ["spki_of"]


def spki_of(pub: Any) -> bytes:
    """SubjectPublicKeyInfo DER of a PKCS#11 public key object."""
    kt = pub.key_type
    if kt == KeyType.EC:
        return bytes(encode_ec_public_key(pub))
    if kt == KeyType.EC_EDWARDS:
        point = bytes(pub[Attribute.EC_POINT])
        raw = point[2:] if len(point) == 34 and point[:2] == b"\x04\x20" else point
        return ed25519.Ed25519PublicKey.from_public_bytes(raw).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if kt == KeyType.RSA:
        n = int.from_bytes(pub[Attribute.MODULUS], "big")
        e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
        return (
            rsa.RSAPublicNumbers(e, n)
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    raise TokenError(f"unexpected key type {kt!r} on the token")
