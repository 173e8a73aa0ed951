"""signd keys as ``cryptography`` private-key objects.

``Client.private_key(name)`` (or ``load_private_key(client, name)``) returns
an object that *is* a ``cryptography`` private key, an
``ec.EllipticCurvePrivateKey``, ``ed25519.Ed25519PrivateKey`` or
``rsa.RSAPrivateKey``, whose ``sign()`` asks the daemon to sign.  So code
written for local keys works unchanged with a key that never leaves the
token::

    key = client.private_key("ca")
    cert = x509.CertificateBuilder()...public_key(key.public_key()).sign(key, hashes.SHA256())

Each object is bound to one version of the key: ``public_key()`` and
``sign()`` always use that version, so a certificate's public key always
matches its signature.  When the key is rotated, the object keeps that
version; signing with it then raises ``VersionNotUsable`` (the version is no
longer active), and ``.latest()`` gives an object for the current version.

What signd can sign with:

- EC: ``sign(data, ec.ECDSA(SHA256() | SHA384() | SHA512()))``, also with
  ``utils.Prehashed(hash)``; the signature is DER, as ``cryptography`` makes.
- RSA: ``sign(data, padding.PKCS1v15() | padding.PSS(...), hash)`` with the
  same hashes, also ``Prehashed``.  PSS as signd makes it: MGF1 with the same
  hash and a salt as long as the digest (``PSS.DIGEST_LENGTH``, or that
  number).
- Ed25519: ``sign(data)``.

Everything else raises ``UnsupportedKeyOperation``, which is both a
``signd_client.errors.LocalError`` and a ``cryptography.exceptions.
UnsupportedAlgorithm`` (what ``cryptography`` raises when a key or backend
cannot do an operation), with a message saying what is supported: other
hashes (SHA-1, SHA-3, ...), other PSS salt lengths (``MAX_LENGTH``, ``AUTO``)
or MGF hashes, deterministic ECDSA, ``NoDigestInfo``, and every operation
that would need the private half: ``private_bytes()``, ``private_bytes_raw()``,
``private_numbers()``, ``decrypt()``, ``exchange()``.  Arguments of the wrong
type raise ``TypeError``, and a ``Prehashed`` digest of the wrong length
``ValueError``, as ``cryptography`` does.

``AsyncClient.private_key(name)`` returns an ``AsyncSigndPrivateKey``: the
same binding to one version and the same attributes, but not a
``cryptography`` key (that interface is synchronous); sign through its
``client`` with ``version=key.version``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, NoReturn, TypeAlias, TypeVar

from cryptography.exceptions import UnsupportedAlgorithm as _CryptographyUnsupported
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric import padding as _padding
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils

from .errors import LocalError, ProtocolViolation, VersionNotUsable
from .protocol import PublicKey

if TYPE_CHECKING:
    from typing import Self

    from cryptography.hazmat.primitives._asymmetric import AsymmetricPadding
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
    from cryptography.utils import Buffer

    from ._async import AsyncClient
    from ._sync import Client

__all__ = [
    "AsyncSigndPrivateKey",
    "SigndEd25519PrivateKey",
    "SigndEllipticCurvePrivateKey",
    "SigndPrivateKey",
    "SigndRSAPrivateKey",
    "UnsupportedKeyOperation",
    "load_async_private_key",
    "load_private_key",
]

#: The hashes signd signs with, and their digest sizes.
SUPPORTED_HASHES: dict[str, int] = {"sha256": 32, "sha384": 48, "sha512": 64}
#: Longer EC/RSA messages are hashed here and sent as a digest (same
#: signature), so any size can be signed within the daemon's frame limit.
MESSAGE_LIMIT = 64 * 1024

_HASH_LIST = "sha256, sha384 or sha512"


class UnsupportedKeyOperation(LocalError, _CryptographyUnsupported):
    """A signd key object cannot do this: an operation that needs the private
    half (which stays on the token), or an algorithm or parameter signd does
    not sign with.  The message says what is supported.

    Also a ``cryptography.exceptions.UnsupportedAlgorithm``, so code written
    for ``cryptography`` keys catches it where it expects a key or backend
    without some feature.
    """


AnyPublicKey: TypeAlias = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
PubT = TypeVar("PubT", bound=AnyPublicKey)


def _load_public(answer: PublicKey) -> PublicKeyTypes:
    try:
        return serialization.load_pem_public_key(answer.public_key_pem.encode())
    except ValueError as exc:
        raise ProtocolViolation(
            f"signd sent a public key for {answer.name!r} version {answer.version} "
            f"that cannot be read: {exc}"
        ) from None


ClientT = TypeVar("ClientT")


class _Binding(Generic[ClientT, PubT]):
    """One version of a signd key, bound to a client: what every key class here shares."""

    def __init__(self, client: ClientT, answer: PublicKey, public: PubT, *, pinned: bool) -> None:
        self._client = client
        self._name = answer.name
        self._version = answer.version
        self._key_type = answer.type
        self._public: PubT = public
        self._pinned = pinned

    @property
    def client(self) -> ClientT:
        """The client that signs with this key."""
        return self._client

    @property
    def name(self) -> str:
        """The key's name in signd."""
        return self._name

    @property
    def version(self) -> int:
        """The one version this object signs with and whose public key it has."""
        return self._version

    @property
    def key_type(self) -> str:
        """The key's wire type, e.g. ``ec-p256``, ``ed25519``, ``rsa-2048``."""
        return self._key_type

    @property
    def pinned(self) -> bool:
        """True when the caller named the version; False when it was the
        key's current version at the time the object was made."""
        return self._pinned

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self._name!r} version {self._version} "
            f"({self._key_type}{', pinned' if self._pinned else ''})>"
        )

    def __copy__(self) -> Self:  # immutable
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Self:
        return self


class _SigndKey(_Binding["Client", PubT]):
    """What the three ``cryptography`` key classes share."""

    def latest(self) -> Self:
        """A new object of the same class for the key's current version.

        Raises: KeyNotFound; ProtocolViolation (the key changed its type).
        """
        new = load_private_key(self._client, self._name)
        if not isinstance(new, type(self)):
            raise ProtocolViolation(
                f"signd key {self._name!r} changed type from {self._key_type} to {new.key_type}"
            )
        return new

    def _unsupported(self, what: str) -> UnsupportedKeyOperation:
        return UnsupportedKeyOperation(f"signd key {self._name!r}: {what}")

    def _private_half(self, operation: str) -> NoReturn:
        raise UnsupportedKeyOperation(
            f"signd key {self._name!r} version {self._version}: {operation} is not possible: "
            "the private key stays on the token and never leaves it; signd only signs with it"
        )

    def _hash(self, algorithm: object) -> tuple[hashes.HashAlgorithm, bool]:
        """The hash of ``algorithm`` (a hash or ``Prehashed``) and whether the
        data is a digest already; refuses hashes signd does not sign with."""
        prehashed = False
        hash_alg = algorithm
        if isinstance(algorithm, asym_utils.Prehashed):
            prehashed, hash_alg = True, algorithm._algorithm
        if not isinstance(hash_alg, hashes.HashAlgorithm):
            raise TypeError(
                "algorithm must be a hashes.HashAlgorithm or utils.Prehashed, "
                f"not {type(algorithm).__name__}"
            )
        if hash_alg.name not in SUPPORTED_HASHES:
            raise self._unsupported(f"signd signs with {_HASH_LIST}, not {hash_alg.name}")
        return hash_alg, prehashed

    def _sign(
        self,
        data: Buffer,
        hash_alg: hashes.HashAlgorithm | None = None,
        *,
        prehashed: bool = False,
        padding: str | None = None,
        format: str | None = None,
    ) -> bytes:
        """One ``sign`` request for this object's version."""
        raw = bytes(data)
        message: bytes | None = raw
        digest: bytes | None = None
        if hash_alg is not None:
            if prehashed:
                if len(raw) != hash_alg.digest_size:
                    raise ValueError(
                        f"a Prehashed {hash_alg.name} digest is {hash_alg.digest_size} bytes, "
                        f"got {len(raw)}"
                    )
                message, digest = None, raw
            elif len(raw) > MESSAGE_LIMIT:
                h = hashes.Hash(hash_alg)
                h.update(raw)
                message, digest = None, h.finalize()
        try:
            result = self._client.sign(
                self._name,
                message,
                digest=digest,
                hash=None if hash_alg is None else hash_alg.name,
                padding=padding,
                format=format,
                version=self._version,
            )
        except VersionNotUsable as exc:
            raise VersionNotUsable(
                f"{exc.message} (this key object signs only with version {self._version}; "
                "call .latest() for an object of the key's current version)"
            ) from exc
        if result.version != self._version:
            raise ProtocolViolation(
                f"asked signd to sign with {self._name!r} version {self._version}, "
                f"it signed with version {result.version}"
            )
        return result.signature


class SigndEllipticCurvePrivateKey(
    _SigndKey[ec.EllipticCurvePublicKey], ec.EllipticCurvePrivateKey
):
    """An ECDSA key on the token (``ec-p256``, ``ec-p384``), bound to one version."""

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """This version's public key (a real ``cryptography`` key)."""
        return self._public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """A DER ECDSA signature over ``data`` (or a ``Prehashed`` digest) by the daemon.

        Raises: UnsupportedKeyOperation (a hash other than sha256/384/512, an
        algorithm other than ECDSA, deterministic ECDSA); VersionNotUsable
        (this version no longer signs); the client's other errors.
        """
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise self._unsupported(
                f"EC keys sign with ec.ECDSA(hash), not {type(signature_algorithm).__name__}"
            )
        if getattr(signature_algorithm, "deterministic_signing", False):
            raise self._unsupported(
                "deterministic ECDSA (RFC 6979) is not available: the token signs with "
                "a random nonce; use ec.ECDSA(hash) without deterministic_signing"
            )
        hash_alg, prehashed = self._hash(signature_algorithm.algorithm)
        return self._sign(data, hash_alg, prehashed=prehashed, format="der")

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        self._private_half("exchange() (ECDH)")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        self._private_half("private_numbers()")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        self._private_half("private_bytes()")


class SigndEd25519PrivateKey(_SigndKey[ed25519.Ed25519PublicKey], ed25519.Ed25519PrivateKey):
    """An Ed25519 key on the token, bound to one version."""

    def public_key(self) -> ed25519.Ed25519PublicKey:
        """This version's public key (a real ``cryptography`` key)."""
        return self._public

    def sign(self, data: Buffer) -> bytes:
        """A pure Ed25519 signature (RFC 8032) over ``data`` by the daemon.

        Raises: VersionNotUsable (this version no longer signs); the client's
        other errors (FrameTooLarge for a message over the frame limit).
        """
        return self._sign(data)

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        self._private_half("private_bytes()")

    def private_bytes_raw(self) -> bytes:
        self._private_half("private_bytes_raw()")


class SigndRSAPrivateKey(_SigndKey[rsa.RSAPublicKey], rsa.RSAPrivateKey):
    """An RSA key on the token (``rsa-2048``, ``rsa-3072``, ``rsa-4096``), bound to one version."""

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        """This version's public key (a real ``cryptography`` key)."""
        return self._public

    def sign(
        self,
        data: bytes,
        padding: AsymmetricPadding,
        algorithm: asym_utils.Prehashed | hashes.HashAlgorithm | asym_utils.NoDigestInfo,
    ) -> bytes:
        """An RSA signature over ``data`` (or a ``Prehashed`` digest) by the daemon.

        ``padding``: ``PKCS1v15()``, or ``PSS(mgf=MGF1(hash), salt_length=
        PSS.DIGEST_LENGTH)`` (or the digest's length as a number) with the
        same hash as ``algorithm``.

        Raises: UnsupportedKeyOperation (another padding, salt length, MGF or
        hash, ``NoDigestInfo``); VersionNotUsable (this version no longer
        signs); the client's other errors.
        """
        if isinstance(algorithm, asym_utils.NoDigestInfo):
            raise self._unsupported(
                "NoDigestInfo (raw PKCS#1 v1.5 without a DigestInfo) is not available: "
                f"sign with a hash ({_HASH_LIST}) or utils.Prehashed(hash)"
            )
        hash_alg, prehashed = self._hash(algorithm)
        if isinstance(padding, _padding.PKCS1v15):
            wire_padding = "pkcs1v15"
        elif isinstance(padding, _padding.PSS):
            self._check_pss(padding, hash_alg)
            wire_padding = "pss"
        else:
            raise self._unsupported(
                "RSA keys sign with padding.PKCS1v15() or padding.PSS(...), "
                f"not {type(padding).__name__}"
            )
        return self._sign(data, hash_alg, prehashed=prehashed, padding=wire_padding)

    def _check_pss(self, pss: _padding.PSS, hash_alg: hashes.HashAlgorithm) -> None:
        supported = (
            f"signd signs RSA-PSS with MGF1 using the signature's hash and a salt as long "
            f"as the digest: padding.PSS(mgf=padding.MGF1(hashes.{type(hash_alg).__name__}()), "
            f"salt_length=padding.PSS.DIGEST_LENGTH) (or {hash_alg.digest_size})"
        )
        mgf = pss.mgf
        if not isinstance(mgf, _padding.MGF1) or mgf._algorithm.name != hash_alg.name:
            used = mgf._algorithm.name if isinstance(mgf, _padding.MGF1) else type(mgf).__name__
            raise self._unsupported(f"{supported}; got MGF1 with {used}")
        salt = pss._salt_length
        if isinstance(salt, _padding._DigestLength):
            return
        if isinstance(salt, int) and not isinstance(salt, bool) and salt == hash_alg.digest_size:
            return
        if isinstance(salt, _padding._MaxLength):
            got = f"PSS.MAX_LENGTH ({_padding.calculate_max_pss_salt_length(self, hash_alg)} bytes)"
        elif isinstance(salt, _padding._Auto):
            got = "PSS.AUTO (only for verifying)"
        else:
            got = f"salt_length={salt!r}"
        raise self._unsupported(f"{supported}; got {got}")

    def decrypt(self, ciphertext: bytes, padding: AsymmetricPadding) -> bytes:
        self._private_half("decrypt()")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        self._private_half("private_numbers()")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        self._private_half("private_bytes()")


SigndPrivateKey: TypeAlias = (
    SigndEllipticCurvePrivateKey | SigndEd25519PrivateKey | SigndRSAPrivateKey
)


def _key_from_answer(client: Client, answer: PublicKey, *, pinned: bool) -> SigndPrivateKey:
    public = _load_public(answer)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return SigndEllipticCurvePrivateKey(client, answer, public, pinned=pinned)
    if isinstance(public, ed25519.Ed25519PublicKey):
        return SigndEd25519PrivateKey(client, answer, public, pinned=pinned)
    if isinstance(public, rsa.RSAPublicKey):
        return SigndRSAPrivateKey(client, answer, public, pinned=pinned)
    raise UnsupportedKeyOperation(
        f"signd key {answer.name!r} is of type {answer.type}, "
        "which this client has no cryptography key class for"
    )


def load_private_key(client: Client, name: str, version: int | None = None) -> SigndPrivateKey:
    """A ``cryptography`` private key for ``name``, bound to ``version`` (by
    default the key's current version at this call).  One ``public_key`` request.

    Raises: KeyNotFound, VersionNotFound, UnsupportedKeyOperation (a key type
    this client does not know); the client's other errors.
    """
    answer = client.public_key(name, version)
    return _key_from_answer(client, answer, pinned=version is not None)


class AsyncSigndPrivateKey(_Binding["AsyncClient", AnyPublicKey]):
    """A key version for ``AsyncClient``: the same binding and attributes as
    the ``cryptography`` key classes, without their synchronous ``sign()``.
    Sign with ``await key.client.sign(key.name, data, version=key.version)``.
    """

    def public_key(
        self,
    ) -> ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey:
        """This version's public key (a real ``cryptography`` key)."""
        return self._public

    async def latest(self) -> AsyncSigndPrivateKey:
        """A new object for the key's current version."""
        return await load_async_private_key(self._client, self._name)


async def load_async_private_key(
    client: AsyncClient, name: str, version: int | None = None
) -> AsyncSigndPrivateKey:
    """``load_private_key`` for ``AsyncClient``."""
    answer = await client.public_key(name, version)
    public = _load_public(answer)
    if not isinstance(
        public, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
    ):
        raise UnsupportedKeyOperation(
            f"signd key {answer.name!r} is of type {answer.type}, which this client does not know"
        )
    return AsyncSigndPrivateKey(client, answer, public, pinned=version is not None)
