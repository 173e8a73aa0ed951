"""The soak test's requests and their checks: the operation mix, the signature
requests it sends and how every answer is verified (see :mod:`signd_bench.soak`)."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from typing import TypedDict

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from signd_client.errors import ConnectionFailed, ProtocolViolation, RequestTimeout

#: Relative weights of the operations each connection picks from.
WEIGHTS: dict[str, int] = {
    "sign": 36,
    "sign_batch": 8,
    "verify": 22,
    "public_key": 8,
    "key_info": 8,
    "list_keys": 6,
    "health": 12,
}
#: A drop of an answer's transport: the connection is gone and a new one is made.
TRANSPORT_ERRORS = (ConnectionFailed, RequestTimeout, ProtocolViolation)
MB = 1024 * 1024
#: The key types signed with (the key that rotates is one more ec-p256 key).
KEY_TYPES = ("ec-p256", "ed25519", "rsa-2048")


def _progress(msg: str) -> None:
    print(f"signd-soak: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------ signatures


class _Options(TypedDict):
    digest: bytes | None
    hash: str | None
    padding: str | None
    format: str | None


@dataclass(frozen=True, slots=True)
class SignSpec:
    """One signature request's input and options (what ``cryptography`` needs too)."""

    message: bytes | None = None
    digest: bytes | None = None
    hash: str | None = None
    padding: str | None = None
    format: str | None = None

    def tampered(self) -> SignSpec:
        """The same request for other data: a signature of this one must not verify."""
        if self.digest is not None:
            return self.like(digest=bytes([self.digest[0] ^ 1]) + self.digest[1:])
        assert self.message is not None
        return self.like(message=self.message + b"!")

    def options(self) -> _Options:
        """The keyword arguments of ``sign`` and ``verify`` after the message."""
        return {
            "digest": self.digest,
            "hash": self.hash,
            "padding": self.padding,
            "format": self.format,
        }

    def like(self, *, message: bytes | None = None, digest: bytes | None = None) -> SignSpec:
        """Other data with the same options."""
        return SignSpec(message, digest, self.hash, self.padding, self.format)


def _random_spec(key_type: str, rng: random.Random) -> SignSpec:
    data = rng.randbytes(rng.randint(1, 96))
    if key_type == "ed25519":
        return SignSpec(message=data)
    by_digest = rng.random() < 0.5
    message, digest = (None, _sha256(data)) if by_digest else (data, None)
    hash_name = "sha256" if by_digest else None
    if key_type.startswith("rsa"):
        return SignSpec(message, digest, hash_name, padding=rng.choice(("pkcs1v15", "pss")))
    return SignSpec(message, digest, hash_name, format=rng.choice(("der", "raw")))


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def signature_ok(public: PublicKeyTypes, signature: bytes, spec: SignSpec) -> bool:
    """Whether ``signature`` is one of ``spec``'s data under ``public``, by ``cryptography``
    alone (signd's keys here hash with SHA-256; PSS salts are the digest's length)."""
    algorithm: hashes.HashAlgorithm | utils.Prehashed = hashes.SHA256()
    data = spec.message
    if spec.digest is not None:
        algorithm, data = utils.Prehashed(hashes.SHA256()), spec.digest
    assert data is not None
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, data)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            if spec.format == "raw":
                n = len(signature) // 2
                signature = utils.encode_dss_signature(
                    int.from_bytes(signature[:n]), int.from_bytes(signature[n:])
                )
            public.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(public, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = padding.PKCS1v15()
            if spec.padding == "pss":
                pad = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
            public.verify(signature, data, pad, algorithm)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


# ------------------------------------------------------------ the run


@dataclass
class SoakKey:
    name: str
    type: str
    #: version -> public key (and its PEM), from key_info/public_key answers
    publics: dict[int, PublicKeyTypes] = field(default_factory=dict)
    pems: dict[int, str] = field(default_factory=dict)

    def learn(self, version: int, pem: str | None) -> bool:
        """Remember ``version``'s public key; False if it differs from the one
        known, or there is none (an HMAC key's: the soak signs with keypairs)."""
        if pem is None:
            return False
        known = self.pems.get(version)
        if known is None:
            self.publics[version] = serialization.load_pem_public_key(pem.encode())
            self.pems[version] = pem
        return known is None or known == pem
