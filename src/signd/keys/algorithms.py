"""Signature options and plans: pure logic, no token, no I/O.

``plan_sign`` turns a sign request into exactly what the token must sign
(``SignPlan``); ``finish_signature`` turns the token's raw output into what
the client asked for; ``verify`` checks a signature with ``cryptography`` on a
cached public key, with no token round trip.

The key types, hashes and schemes are ``keytypes.py``, loading and exporting
public keys ``publickeys.py``; their names are re-exported here, so
``algorithms.X`` is what the rest of signd writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from ..errors import InvalidArgument, InvalidDigest, TokenError
from ..errors import UnsupportedAlgorithm as UnsupportedAlgorithmError
from . import eth
from .keytypes import (
    CURVE_ORDERS,
    ETH_FORMAT,
    FORMATS,
    HASHES,
    KEY_TYPES,
    PADDINGS,
    SECP256K1_HASHES,
    Family,
    Hash,
    KeyType,
    PublicKey,
    Scheme,
    key_type,
)
from .publickeys import (
    HMAC_CHECK_MESSAGE,
    HMAC_CHECK_SIZE,
    hmac_check_value,
    jwk,
    load_public_key,
    public_key_pem,
)

__all__ = [
    "CURVE_ORDERS",
    "ETH_FORMAT",
    "FORMATS",
    "HASHES",
    "HMAC_CHECK_MESSAGE",
    "HMAC_CHECK_SIZE",
    "KEY_TYPES",
    "PADDINGS",
    "SECP256K1_HASHES",
    "Family",
    "Hash",
    "KeyType",
    "Options",
    "PublicKey",
    "Scheme",
    "SignInput",
    "SignPlan",
    "VerifyInput",
    "finish_signature",
    "hmac_check_value",
    "jwk",
    "key_type",
    "load_public_key",
    "options",
    "plan",
    "plan_sign",
    "public_key_pem",
    "request_options",
    "verify",
    "verify_any",
]


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
    if kt.family is Family.HMAC:
        return _hmac_options(kt, hash_name, padding, format, by_digest)
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


def _hmac_options(
    kt: KeyType, hash_name: str | None, padding: str | None, format: str | None, by_digest: bool
) -> Options:
    """An HMAC key's options: the MAC over the message with the key's own hash;
    no digest, padding or format.  Raises: InvalidArgument."""
    if by_digest:
        raise InvalidArgument(
            f"{kt.name} keys MAC the message itself: send the message, not a digest"
        )
    for field_name, value in (("padding", padding), ("format", format)):
        if value is not None:
            raise InvalidArgument(f"field '{field_name}' does not apply to HMAC keys")
    if hash_name is not None and hash_name != kt.default_hash:
        raise InvalidArgument(
            f"field 'hash' of a {kt.name} key can only be {kt.default_hash!r} (or absent)"
        )
    assert kt.default_hash is not None
    return Options(Scheme.HMAC, HASHES[kt.default_hash], kt.name, False)


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


def request_options(kt: KeyType, args: SignInput) -> Options:
    """The options of one request (exactly one of message and digest), checked
    against ``kt``.  Raises: InvalidArgument, UnsupportedAlgorithm."""
    return _options(kt, args)


def plan(
    opts: Options, message: bytes | None, digest: bytes | None, sha256: bytes | None = None
) -> SignPlan:
    """What the token signs for one item under checked ``opts`` (``sha256``:
    the SHA-256 of ``message``, if the caller has it already).

    Raises:
        InvalidDigest: ``digest`` has the wrong length for the hash.
    """
    if opts.scheme is Scheme.HMAC:  # the token MACs the message itself
        assert message is not None
        return SignPlan(opts.scheme, opts.hash, message, opts.algorithm, False)
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
        InvalidArgument, InvalidDigest, UnsupportedAlgorithm: bad options;
        UnsupportedAlgorithm for an HMAC key (no public key: the token verifies).
    """
    opts = _options(kt, args)
    if opts.scheme is Scheme.HMAC:
        raise UnsupportedAlgorithmError(f"{kt.name} keys are verified on the token")
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
