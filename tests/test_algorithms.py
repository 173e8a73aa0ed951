"""algorithms.py against signatures made independently by `cryptography`."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from signd.errors import InvalidArgument, InvalidDigest, UnsupportedAlgorithm
from signd.keys import algorithms
from signd.protocol import SignArgs, VerifyArgs

MSG = b"the quick brown fox"


def _pub(priv: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
    spki = priv.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return spki


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_unknown_key_type() -> None:
    with pytest.raises(UnsupportedAlgorithm, match="unknown key type"):
        algorithms.key_type("dsa-1024")


@pytest.mark.parametrize(
    ("name", "hash_name", "size"),
    [("sha256", "sha256", 32), ("sha384", "sha384", 48), ("sha512", "sha512", 64)],
)
def test_digest_length_checked(name: str, hash_name: str, size: int) -> None:
    kt = algorithms.key_type("ec-p256")
    ok = algorithms.plan_sign(kt, SignArgs(key="k", digest=b"\1" * size, hash=hash_name))
    assert ok.data == b"\1" * size
    with pytest.raises(InvalidDigest, match=f"{size} bytes, got {size - 1}"):
        algorithms.plan_sign(kt, SignArgs(key="k", digest=b"\1" * (size - 1), hash=name))


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (SignArgs(key="k"), InvalidArgument),
        (SignArgs(key="k", message=b"m", digest=b"\0" * 32, hash="sha256"), InvalidArgument),
        (SignArgs(key="k", digest=b"\0" * 32), InvalidArgument),  # digest needs hash
        (SignArgs(key="k", message=b"m", hash="md5"), UnsupportedAlgorithm),
        (SignArgs(key="k", message=b"m", padding="pss"), InvalidArgument),  # EC has no padding
        (SignArgs(key="k", message=b"m", format="pem"), InvalidArgument),
    ],
)
def test_bad_ec_options(args: SignArgs, error: type[Exception]) -> None:
    with pytest.raises(error):
        algorithms.plan_sign(algorithms.key_type("ec-p256"), args)


@pytest.mark.parametrize(
    "args",
    [
        SignArgs(key="k", digest=b"\0" * 32, hash="sha256"),
        SignArgs(key="k", message=b"m", hash="sha256"),
        SignArgs(key="k", message=b"m", format="raw"),
        SignArgs(key="k", message=b"m", padding="pss"),
    ],
)
def test_ed25519_takes_the_message_only(args: SignArgs) -> None:
    with pytest.raises(InvalidArgument):
        algorithms.plan_sign(algorithms.key_type("ed25519"), args)


def test_rsa_rejects_format_and_unknown_padding() -> None:
    kt = algorithms.key_type("rsa-2048")
    with pytest.raises(InvalidArgument, match="format"):
        algorithms.plan_sign(kt, SignArgs(key="k", message=b"m", format="raw"))
    with pytest.raises(InvalidArgument, match="padding"):
        algorithms.plan_sign(kt, SignArgs(key="k", message=b"m", padding="oaep"))


@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
def test_pkcs1_plan_is_the_digest_info(rsa_key: rsa.RSAPrivateKey, hash_name: str) -> None:
    """What the token signs for PKCS#1 v1.5 is exactly what cryptography signs."""
    h = algorithms.HASHES[hash_name]
    plan = algorithms.plan_sign(
        algorithms.key_type("rsa-2048"), SignArgs(key="k", message=MSG, hash=hash_name)
    )
    reference = rsa_key.sign(MSG, padding.PKCS1v15(), h.algorithm)
    recovered = rsa_key.public_key().recover_data_from_signature(
        reference, padding.PKCS1v15(), None
    )
    assert plan.data == recovered
    assert plan.algorithm == f"rsa-pkcs1v15-{hash_name}"


def test_message_is_hashed_with_the_key_types_default() -> None:
    p384 = algorithms.plan_sign(algorithms.key_type("ec-p384"), SignArgs(key="k", message=MSG))
    assert p384.data == hashlib.sha384(MSG).digest()
    assert p384.algorithm == "ecdsa-p384-sha384"
    pss = algorithms.plan_sign(
        algorithms.key_type("rsa-3072"), SignArgs(key="k", message=MSG, padding="pss")
    )
    assert pss.data == hashlib.sha256(MSG).digest()
    assert pss.scheme is algorithms.Scheme.RSA_PSS


def test_finish_signature_der_and_raw(p256: ec.EllipticCurvePrivateKey) -> None:
    r, s = utils.decode_dss_signature(p256.sign(MSG, ec.ECDSA(hashes.SHA256())))
    n = algorithms.CURVE_ORDERS["secp256r1"]
    low, high = min(s, n - s), max(s, n - s)  # signd answers low-S (issue 16)
    der = utils.encode_dss_signature(r, low)
    raw = r.to_bytes(32, "big") + low.to_bytes(32, "big")
    raw_high = r.to_bytes(32, "big") + high.to_bytes(32, "big")
    kt = algorithms.key_type("ec-p256")
    plan = algorithms.plan_sign(kt, SignArgs(key="k", message=MSG))
    assert algorithms.finish_signature(plan, raw) == der
    assert algorithms.finish_signature(plan, raw_high) == der
    raw_plan = algorithms.plan_sign(kt, SignArgs(key="k", message=MSG, format="raw"))
    assert algorithms.finish_signature(raw_plan, raw) == raw
    assert algorithms.finish_signature(raw_plan, raw_high) == raw


def test_verify_ecdsa(p256: ec.EllipticCurvePrivateKey) -> None:
    kt = algorithms.key_type("ec-p256")
    pub = algorithms.load_public_key(kt, _pub(p256))
    der = p256.sign(MSG, ec.ECDSA(hashes.SHA256()))
    assert algorithms.verify(kt, pub, VerifyArgs(key="k", signature=der, message=MSG))
    assert not algorithms.verify(kt, pub, VerifyArgs(key="k", signature=der, message=MSG + b"!"))
    r, s = utils.decode_dss_signature(der)
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert algorithms.verify(kt, pub, VerifyArgs(key="k", signature=raw, message=MSG, format="raw"))
    assert not algorithms.verify(
        kt, pub, VerifyArgs(key="k", signature=raw[:-1], message=MSG, format="raw")
    )
    assert not algorithms.verify(kt, pub, VerifyArgs(key="k", signature=b"junk", message=MSG))
    digest = hashlib.sha256(MSG).digest()
    assert algorithms.verify(
        kt, pub, VerifyArgs(key="k", signature=der, digest=digest, hash="sha256")
    )


def test_verify_rsa_pkcs1_and_pss(rsa_key: rsa.RSAPrivateKey) -> None:
    kt = algorithms.key_type("rsa-2048")
    pub = algorithms.load_public_key(kt, _pub(rsa_key))
    v15 = rsa_key.sign(MSG, padding.PKCS1v15(), hashes.SHA256())
    assert algorithms.verify(kt, pub, VerifyArgs(key="k", signature=v15, message=MSG))
    assert not algorithms.verify(
        kt, pub, VerifyArgs(key="k", signature=v15, message=MSG, padding="pss")
    )
    # Any salt length verifies, as PSS allows.
    pss = rsa_key.sign(
        MSG, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH), hashes.SHA256()
    )
    assert (
        algorithms.verify(kt, pub, VerifyArgs(key="k", signature=pss, message=MSG, padding="pss"))
        == "rsa-pss-sha256"
    )


def test_verify_ed25519() -> None:
    priv = ed25519.Ed25519PrivateKey.generate()
    kt = algorithms.key_type("ed25519")
    pub = algorithms.load_public_key(kt, _pub(priv))
    sig = priv.sign(MSG)
    assert algorithms.verify(kt, pub, VerifyArgs(key="k", signature=sig, message=MSG))
    assert not algorithms.verify(kt, pub, VerifyArgs(key="k", signature=sig, message=b"x"))


def test_load_public_key_checks_the_type(p256: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValueError, match="does not match"):
        algorithms.load_public_key(algorithms.key_type("ec-p384"), _pub(p256))
    with pytest.raises(ValueError, match="does not match"):
        algorithms.load_public_key(algorithms.key_type("rsa-2048"), _pub(p256))
    with pytest.raises(ValueError):  # noqa: PT011 - any ValueError from bad DER
        algorithms.load_public_key(algorithms.key_type("ec-p256"), b"not der")


def test_options_are_checked_every_time_and_kept_only_when_valid() -> None:
    """``options`` keeps what it worked out; a wrong option is refused each time."""
    kt = algorithms.key_type("rsa-2048")
    pss = algorithms.options(kt, "sha384", "pss", None, by_digest=False)
    assert (pss.scheme, pss.algorithm) == (algorithms.Scheme.RSA_PSS, "rsa-pss-sha384")
    assert algorithms.options(kt, "sha384", "pss", None, by_digest=False) is pss
    p256 = algorithms.options(algorithms.key_type("ec-p256"), None, None, None, by_digest=False)
    assert p256.algorithm == "ecdsa-p256-sha256"  # same options, another key type
    for _ in range(2):
        with pytest.raises(InvalidArgument, match="padding"):
            algorithms.options(kt, None, "oaep", None, by_digest=False)
        with pytest.raises(InvalidArgument, match="hash"):
            algorithms.options(kt, None, None, None, by_digest=True)
