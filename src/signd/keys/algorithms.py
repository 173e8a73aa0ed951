"""Key types, hashes and signature schemes: pure logic, no token, no I/O.

``plan_sign`` turns a sign request into exactly what the token must sign
(``SignPlan``); ``finish_signature`` turns the token's raw output into what
the client asked for; ``verify`` checks a signature with ``cryptography`` on a
cached public key, with no token round trip.
"""

from __future__ import annotations

import base64
import enum
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol, cast

from Crypto.Hash import keccak
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from ..errors import InvalidArgument, InvalidDigest, TokenError
from ..errors import UnsupportedAlgorithm as UnsupportedAlgorithmError
from . import eth

__all__ = [
    "HASHES",
    "Family",
    "KEY_TYPES",
    "KeyType",
    "SECP256K1_HASHES",
    "Options",
    "PublicKey",
    "Scheme",
    "SignPlan",
    "finish_signature",
    "jwk",
    "key_type",
    "load_public_key",
    "options",
    "plan",
    "plan_sign",
    "public_key_pem",
    "verify",
    "verify_any",
]

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


class SignInput(Protocol):
    """What a request to sign asks of the algorithms: exactly one of
    ``message`` and ``digest``, and the options (None: the key type's default).
    The service hands its request arguments as they are."""

    @property
    def message(self) -> bytes | None: ...
    @property
    def digest(self) -> bytes | None: ...
    @property
    def hash(self) -> str | None: ...
    @property
    def padding(self) -> str | None: ...
    @property
    def format(self) -> str | None: ...


class VerifyInput(SignInput, Protocol):
    """A request to verify: a ``SignInput`` and the signature."""

    @property
    def signature(self) -> bytes: ...


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


class Scheme(enum.Enum):
    """What the token is asked to do; ``token.py`` maps each to a mechanism."""

    ECDSA = "ecdsa"  # input: the digest; output: raw r || s
    EDDSA = "eddsa"  # input: the message (pure Ed25519)
    RSA_PKCS1 = "rsa-pkcs1v15"  # input: DigestInfo || digest
    RSA_PSS = "rsa-pss"  # input: the digest; MGF1 with the same hash, salt = digest size

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


@dataclass(frozen=True, slots=True)
class SignPlan:
    scheme: Scheme
    hash: Hash | None
    data: bytes  # exactly what C_Sign receives
    algorithm: str  # the signature algorithm's name on the wire
    raw: bool  # ECDSA only: answer r || s instead of DER
    order: int = 0  # ECDSA only: the curve's order n, for low-S
    eth: bool = False  # ECDSA on secp256k1 only: answer r || s || v


@dataclass(frozen=True, slots=True)
class Options:
    """A request's signature options, checked against the key type."""

    scheme: Scheme
    hash: Hash | None  # None for Ed25519 (it signs the message)
    algorithm: str
    raw: bool  # ECDSA only: r || s instead of DER
    order: int = 0  # ECDSA only: the curve's order n, for low-S
    eth: bool = False  # ECDSA on secp256k1 only: r || s || v


#: ``options``' answers by their arguments: a few dozen at most, since only
#: valid options are kept (and checking them again costs microseconds per request).
_OPTIONS: Final[dict[tuple[str, str | None, str | None, str | None, bool], Options]] = {}


def options(
    kt: KeyType,
    hash_name: str | None,
    padding: str | None,
    format: str | None,
    *,
    by_digest: bool,
) -> Options:
    """Check the options shared by every signature of a request.

    Raises:
        InvalidArgument, UnsupportedAlgorithm.
    """
    key = (kt.name, hash_name, padding, format, by_digest)
    found = _OPTIONS.get(key)
    if found is None:
        found = _OPTIONS[key] = _options_of(kt, hash_name, padding, format, by_digest)
    return found


def _options_of(
    kt: KeyType, hash_name: str | None, padding: str | None, format: str | None, by_digest: bool
) -> Options:
    """``options``, worked out.  Raises: InvalidArgument, UnsupportedAlgorithm."""
    if kt.family is Family.ED25519:
        if by_digest:
            raise InvalidArgument(
                "ed25519 signs the message itself: send the message, not a digest"
            )
        for field_name, value in (("hash", hash_name), ("padding", padding), ("format", format)):
            if value is not None:
                raise InvalidArgument(f"field '{field_name}' does not apply to ed25519 keys")
        return Options(Scheme.EDDSA, None, "ed25519", False)
    if by_digest and hash_name is None:
        raise InvalidArgument("field 'hash' is required with a digest")
    name = kt.default_hash if hash_name is None else hash_name
    assert name is not None
    h = HASHES.get(name)
    if h is None:
        raise UnsupportedAlgorithmError(f"unknown hash {name!r}; supported: {', '.join(HASHES)}")
    if kt.curve == "secp256k1":
        return _secp256k1_options(kt, h, padding, format)
    if h.name not in _SHA2:
        raise UnsupportedAlgorithmError(f"hash {h.name!r} applies to ec-secp256k1 keys only")
    if kt.family is Family.EC:
        if padding is not None:
            raise InvalidArgument("field 'padding' applies to RSA keys only")
        fmt = "der" if format is None else format
        if fmt not in FORMATS:
            raise InvalidArgument(f"field 'format' must be one of {', '.join(FORMATS)}")
        assert kt.curve is not None
        order = CURVE_ORDERS[kt.curve]
        return Options(Scheme.ECDSA, h, f"ecdsa-p{kt.bits}-{h.name}", fmt == "raw", order)
    if format is not None:
        raise InvalidArgument("field 'format' applies to ECDSA keys only")
    pad = "pkcs1v15" if padding is None else padding
    if pad not in PADDINGS:
        raise InvalidArgument(f"field 'padding' must be one of {', '.join(PADDINGS)}")
    scheme = Scheme.RSA_PSS if pad == "pss" else Scheme.RSA_PKCS1
    return Options(scheme, h, f"rsa-{pad}-{h.name}", False)


_SHA2: Final = frozenset(("sha256", "sha384", "sha512"))


def _secp256k1_options(kt: KeyType, h: Hash, padding: str | None, format: str | None) -> Options:
    """``_options_of`` for ``ec-secp256k1``.  Raises: InvalidArgument, UnsupportedAlgorithm."""
    if h.name not in SECP256K1_HASHES:
        raise UnsupportedAlgorithmError(
            f"{kt.name} keys sign with {' or '.join(SECP256K1_HASHES)}, not {h.name!r}"
        )
    if padding is not None:
        raise InvalidArgument("field 'padding' applies to RSA keys only")
    fmt = "der" if format is None else format
    if fmt not in (*FORMATS, ETH_FORMAT):
        raise InvalidArgument(f"field 'format' must be one of {', '.join(FORMATS)}, {ETH_FORMAT}")
    order = CURVE_ORDERS["secp256k1"]
    algorithm = f"ecdsa-secp256k1-{h.name}"
    return Options(Scheme.ECDSA, h, algorithm, fmt == "raw", order, fmt == ETH_FORMAT)


def _digest(
    opts: Options, message: bytes | None, digest: bytes | None, sha256: bytes | None = None
) -> bytes | None:
    """The digest to sign or verify (None for Ed25519); ``sha256``, the SHA-256
    of ``message`` if the caller has it already, is taken for a SHA-256
    algorithm instead of hashing the message again.  Raises: InvalidDigest."""
    h = opts.hash
    if h is None:
        return None
    if digest is not None:
        if len(digest) != h.size:
            raise InvalidDigest(f"a {h.name} digest is {h.size} bytes, got {len(digest)}")
        return digest
    if sha256 is not None and h.name == "sha256":
        return sha256
    assert message is not None
    return h.new(message).digest()


def _options(kt: KeyType, args: SignInput) -> Options:
    """Raises: InvalidArgument, UnsupportedAlgorithm."""
    if (args.message is None) == (args.digest is None):
        raise InvalidArgument("exactly one of 'message' and 'digest' is required")
    return options(kt, args.hash, args.padding, args.format, by_digest=args.digest is not None)


def plan(
    opts: Options, message: bytes | None, digest: bytes | None, sha256: bytes | None = None
) -> SignPlan:
    """What the token signs for one item under checked ``opts`` (``sha256``:
    the SHA-256 of ``message``, if the caller has it already).

    Raises:
        InvalidDigest: ``digest`` has the wrong length for the hash.
    """
    d = _digest(opts, message, digest, sha256)
    if opts.scheme is Scheme.EDDSA:
        assert message is not None
        data = message
    elif opts.scheme is Scheme.RSA_PKCS1:
        assert opts.hash is not None
        assert d is not None
        data = opts.hash.digest_info + d
    else:
        assert d is not None
        data = d
    return SignPlan(opts.scheme, opts.hash, data, opts.algorithm, opts.raw, opts.order, opts.eth)


def plan_sign(kt: KeyType, args: SignInput, sha256: bytes | None = None) -> SignPlan:
    """Check a sign request against the key type and say what the token signs.

    ``sha256`` is the SHA-256 of ``args.message`` if the caller has it already
    (the audit record's): a SHA-256 algorithm signs it as it is.

    Raises:
        InvalidArgument, InvalidDigest, UnsupportedAlgorithm.
    """
    return plan(_options(kt, args), args.message, args.digest, sha256)


def finish_signature(plan: SignPlan, raw: bytes, public_key: PublicKey | None = None) -> bytes:
    """Encode the token's output as the client asked (ECDSA: DER unless raw
    or eth), every ECDSA signature low-S: ``s > n/2`` becomes ``n - s``.

    ``public_key`` is the signing version's: format ``eth`` needs it to work
    out the recovery id.

    Raises:
        TokenError: format ``eth``, and the signature does not recover to
            ``public_key`` (the token signed with another key).
    """
    if plan.scheme is not Scheme.ECDSA:
        return raw
    half = len(raw) // 2
    s = int.from_bytes(raw[half:], "big")
    n = plan.order
    low = s <= n >> 1 or not n
    if not low:
        s = n - s
    if plan.eth:
        return _eth_signature(plan, int.from_bytes(raw[:half], "big"), s, public_key)
    if plan.raw:
        return raw if low else raw[:half] + s.to_bytes(half, "big")
    return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), s)


def _eth_signature(plan: SignPlan, r: int, s: int, public_key: PublicKey | None) -> bytes:
    """``r || s || v`` for a low-S ``(r, s)``.  Raises: TokenError."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise TokenError("format 'eth' needs the signing version's secp256k1 public key")
    try:
        v = eth.recovery_id(r, s, plan.data, eth.uncompressed_point(public_key))
    except ValueError:
        raise TokenError(
            "the token's signature does not recover to the version's public key"
        ) from None
    return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes((v,))


def verify(kt: KeyType, public_key: PublicKey, args: VerifyInput) -> str | None:
    """Check ``args.signature``; return the algorithm name if valid, else None.

    Raises:
        InvalidArgument, InvalidDigest, UnsupportedAlgorithm: bad options.
    """
    found = verify_any(kt, ((0, public_key),), args)
    return found[1] if found is not None else None


def verify_any(
    kt: KeyType,
    candidates: Iterable[tuple[int, PublicKey]],
    args: VerifyInput,
    sha256: bytes | None = None,
) -> tuple[int, str] | None:
    """The first ``(version, public key)`` of ``candidates`` that
    ``args.signature`` is valid for, as ``(version, algorithm)``; None if none.

    The options are checked and the message hashed once, however many
    candidates there are; not at all for a SHA-256 algorithm given ``sha256``
    (as for ``plan_sign``).

    Raises:
        InvalidArgument, InvalidDigest, UnsupportedAlgorithm: bad options.
    """
    opts = _options(kt, args)
    digest = _digest(opts, args.message, args.digest, sha256)
    sig = args.signature
    if opts.eth:
        assert digest is not None
        return _verify_eth(opts, digest, sig, candidates)
    if opts.raw and opts.scheme is Scheme.ECDSA:
        size = kt.coordinate_size
        if len(sig) != 2 * size:
            return None
        try:
            sig = utils.encode_dss_signature(
                int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
            )
        except ValueError:
            return None
    for version, public_key in candidates:
        if _valid(opts, digest, sig, public_key, args.message):
            return version, opts.algorithm
    return None


def _verify_eth(
    opts: Options, digest: bytes, sig: bytes, candidates: Iterable[tuple[int, PublicKey]]
) -> tuple[int, str] | None:
    """``verify_any`` for format ``eth``: the key ``sig`` recovers (one
    recovery, however many candidates), compared with each candidate's."""
    point = eth.recover(sig, digest)
    if point is None:
        return None
    for version, public_key in candidates:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if eth.uncompressed_point(public_key) == point:
                return version, opts.algorithm
    return None


def _valid(
    opts: Options, digest: bytes | None, sig: bytes, public_key: PublicKey, message: bytes | None
) -> bool:
    try:
        if opts.scheme is Scheme.EDDSA:
            assert isinstance(public_key, ed25519.Ed25519PublicKey)
            assert message is not None
            public_key.verify(sig, message)
            return True
        assert opts.hash is not None
        assert digest is not None
        prehashed = utils.Prehashed(opts.hash.algorithm)
        if opts.scheme is Scheme.ECDSA:
            assert isinstance(public_key, ec.EllipticCurvePublicKey)
            public_key.verify(sig, digest, ec.ECDSA(prehashed))
            return True
        assert isinstance(public_key, rsa.RSAPublicKey)
        pad: padding.AsymmetricPadding
        if opts.scheme is Scheme.RSA_PSS:
            pad = padding.PSS(mgf=padding.MGF1(opts.hash.algorithm), salt_length=padding.PSS.AUTO)
        else:
            pad = padding.PKCS1v15()
        public_key.verify(sig, digest, pad, prehashed)
        return True
    except (InvalidSignature, ValueError):
        return False


def load_public_key(kt: KeyType, spki_der: bytes) -> PublicKey:
    """Load a SubjectPublicKeyInfo and check it matches the key type.

    Raises:
        ValueError: the bytes are not a public key of that type.
    """
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
