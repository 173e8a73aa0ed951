"""Wrapping key material for ``import_key`` (bring your own key), in this process.

The daemon's ``import_params`` answers its token's import key, an RSA-3072
public key.  ``wrap_for_import`` wraps material under it in two layers, as
Vault Transit's BYOK and AWS KMS's ``RSA_AES_KEY_WRAP_SHA_1`` do:

* a fresh AES-256 key K, encrypted with RSA-OAEP (SHA-1, MGF1-SHA1, no
  label) under the import key: ``wrapped_key``.  SHA-1 because SoftHSM's
  RSA-OAEP unwrap takes nothing else; OAEP with SHA-1 is still sound for
  encryption (AWS KMS offers ``RSAES_OAEP_SHA_1`` too);
* the material under K with AES key wrap with padding (RFC 5649):
  ``wrapped_material``.  RSA-OAEP alone could not carry an RSA private key.

The material is a private key's PKCS#8 DER (a ``cryptography`` private key
object is encoded here), or an HMAC secret's raw bytes.  Neither K nor the
material leaves this process in clear; only the token can unwrap them.
``read_material`` turns a file's bytes into material for a key type, as
``signctl import`` reads them.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from .errors import InvalidArgument
from .protocol import IMPORT_ALGORITHM, ImportParamsResult

__all__ = [
    "ImportMaterial",
    "PrivateKey",
    "WrappedMaterial",
    "read_material",
    "wrap_for_import",
]

#: The private keys that can be imported.
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
#: What ``wrap_for_import`` wraps: a private key, or an HMAC secret's bytes.
ImportMaterial = PrivateKey | bytes

_AES_KEY_BYTES: Final = 32
#: The curve of each EC key type.
_CURVES: Final = {"ec-p256": "secp256r1", "ec-p384": "secp384r1", "ec-secp256k1": "secp256k1"}
_RSA_BITS: Final = {"rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}
#: An Ethereum private key written as hex: 64 digits, optionally 0x first.
_ETH_HEX: Final = re.compile(rb"\s*(?:0x)?([0-9a-fA-F]{64})\s*")


@dataclass(frozen=True, slots=True)
class WrappedMaterial:
    """Key material wrapped for one import key: the fields of ``import_key``."""

    import_key_id: str
    wrapped_key: bytes = field(repr=False)
    wrapped_material: bytes = field(repr=False)
    #: the private key's SubjectPublicKeyInfo DER; None for an HMAC secret
    public_key: bytes | None


def wrap_for_import(params: ImportParamsResult, material: ImportMaterial) -> WrappedMaterial:
    """Wrap ``material`` under the import key ``params`` describes.

    ``material``: an EC or RSA private key (``cryptography``), whose PKCS#8
    DER is wrapped and whose public key goes along; or bytes, an HMAC secret.

    Raises: InvalidArgument (an algorithm this client does not know, an
    import key that is not RSA or whose id does not match it, material of
    another kind).
    """
    if params.algorithm != IMPORT_ALGORITHM:
        raise InvalidArgument(
            f"the daemon wraps imports with {params.algorithm!r}; this client knows "
            f"{IMPORT_ALGORITHM!r} only"
        )
    if hashlib.sha256(params.public_key).hexdigest() != params.import_key_id:
        raise InvalidArgument("the import key does not match its id (import_key_id)")
    import_key = serialization.load_der_public_key(params.public_key)
    if not isinstance(import_key, rsa.RSAPublicKey):
        raise InvalidArgument("the import key is not an RSA key")
    if isinstance(material, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        plain = material.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public: bytes | None = material.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif isinstance(material, bytes):
        if not material:
            raise InvalidArgument("the secret is empty")
        plain, public = material, None
    else:
        raise InvalidArgument(
            f"import material is an EC or RSA private key, or bytes; not {type(material).__name__}"
        )
    transport = os.urandom(_AES_KEY_BYTES)
    wrapped_key = import_key.encrypt(
        transport,
        padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),  # noqa: S303
    )
    wrapped_material = keywrap.aes_key_wrap_with_padding(transport, plain)
    return WrappedMaterial(params.import_key_id, wrapped_key, wrapped_material, public)


def read_material(key_type: str, data: bytes) -> ImportMaterial:
    """The material in ``data`` (a file's bytes) for a key of ``key_type``.

    EC and RSA types: a PEM private key (PKCS#8 or traditional), or PKCS#8
    DER; ``ec-secp256k1`` also takes an Ethereum private key, 32 raw bytes or
    64 hex digits (``0x`` optional).  HMAC types: the secret, as it is.  The
    key must be of ``key_type`` (its curve, its size).

    Raises: InvalidArgument (a public key, a key of another type, a file that
    holds no key, an encrypted PEM, an unknown type), naming no bytes of it.
    """
    if key_type.startswith("hmac-"):
        if not data:
            raise InvalidArgument("the secret file is empty")
        return data
    if key_type not in _CURVES and key_type not in _RSA_BITS:
        raise InvalidArgument(
            f"{key_type!r} keys cannot be imported; importable: "
            + ", ".join([*_CURVES, *_RSA_BITS, "hmac-sha256", "hmac-sha384", "hmac-sha512"])
        )
    key = _private_key(key_type, data)
    if key_type in _CURVES:
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidArgument(f"the file holds {_kind(key)}, not a {key_type} private key")
        if key.curve.name != _CURVES[key_type]:
            raise InvalidArgument(
                f"the file holds an EC key on {key.curve.name}, not a {key_type} key "
                f"({_CURVES[key_type]})"
            )
    else:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise InvalidArgument(f"the file holds {_kind(key)}, not a {key_type} private key")
        if key.key_size != _RSA_BITS[key_type]:
            raise InvalidArgument(f"the file holds an RSA-{key.key_size} key, not a {key_type} key")
    return key


def _private_key(key_type: str, data: bytes) -> object:
    """The private key in ``data``.  Raises: InvalidArgument."""
    if key_type == "ec-secp256k1":
        raw = None
        match = _ETH_HEX.fullmatch(data)
        if match is not None:
            raw = bytes.fromhex(match.group(1).decode("ascii"))
        elif len(data) == 32:
            raw = data
        if raw is not None:
            try:
                return ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256K1())
            except ValueError:
                raise InvalidArgument("the 32 bytes are not a secp256k1 private key") from None
    if b"-----BEGIN" in data:
        if b"PUBLIC KEY-----" in data or b"CERTIFICATE-----" in data:
            raise InvalidArgument(
                "the file holds a public key (or a certificate): import needs the private key"
            )
        try:
            return serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise InvalidArgument(
                "the PEM private key is encrypted: decrypt it first "
                "(openssl pkcs8 -in FILE -nocrypt ...) into a file only you can read"
            ) from None
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise InvalidArgument(
                f"the PEM file holds no private key signd can read: {exc}"
            ) from None
    try:
        return serialization.load_der_private_key(data, password=None)
    except (TypeError, ValueError):
        pass
    try:
        serialization.load_der_public_key(data)
    except (TypeError, ValueError):
        pass
    else:
        raise InvalidArgument("the file holds a public key: import needs the private key")
    raise InvalidArgument(
        "the file holds no private key: give a PEM private key (PKCS#8 or traditional) "
        "or PKCS#8 DER"
        + (
            ", or an Ethereum private key (32 bytes, or 64 hex digits)"
            if key_type == "ec-secp256k1"
            else ""
        )
    )


def _kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC key ({key.curve.name})"
    if isinstance(key, rsa.RSAPrivateKey):
        return f"an RSA-{key.key_size} key"
    return f"a {type(key).__name__.removeprefix('_')}"
