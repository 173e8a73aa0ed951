"""ec-secp256k1 keys, Keccak-256, low-S ECDSA and Ethereum signatures (issue 16).

The pure logic (hashes, addresses, low-S, the recovery id, the options) is
tested in-process, with software keys standing in for the token.  A few
tests go through the session's daemon on a real SoftHSM token: every
signature there is checked by independent verifiers, ``cryptography`` and
``coincurve`` (libsecp256k1, whose verify refuses a high S), and Ethereum
addresses and recoveries by ``eth-account``/``eth-keys`` where installed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import coincurve
import pytest
from Crypto.Hash import keccak
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from signd.errors import InvalidArgument, InvalidDigest, TokenError, UnsupportedAlgorithm
from signd.keys import algorithms, eth
from signd_client import errors as client_errors
from signd_client.protocol import SignArgs, VerifyArgs

if TYPE_CHECKING:
    from conftest import Daemon

K1 = algorithms.key_type("ec-secp256k1")
P256 = algorithms.key_type("ec-p256")
CURVES: dict[str, ec.EllipticCurve] = {
    "ec-p256": ec.SECP256R1(),
    "ec-p384": ec.SECP384R1(),
    "ec-secp256k1": ec.SECP256K1(),
}
#: curve orders as SEC 2 gives them, written out here independently
ORDERS = {
    "ec-p256": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "ec-p384": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AEC"
        "EC196ACCC52973",
        16,
    ),
    "ec-secp256k1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
}
MESSAGE = b"hello, world\n"


def eip191_digest(message: bytes) -> bytes:
    """What ``personal_sign`` signs: Keccak-256 of the EIP-191 prefix and message."""
    prefixed = b"\x19Ethereum Signed Message:\n%d" % len(message) + message
    return keccak.new(data=prefixed, digest_bits=256).digest()


def point(pem_or_key: str | ec.EllipticCurvePublicKey) -> bytes:
    key = pem_or_key
    if isinstance(key, str):
        loaded = serialization.load_pem_public_key(key.encode())
        assert isinstance(loaded, ec.EllipticCurvePublicKey)
        key = loaded
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def token_raw(private: ec.EllipticCurvePrivateKey, digest: bytes, size: int, high: bool) -> bytes:
    """What a token's CKM_ECDSA gives: ``r || s``, here with S high or low as asked."""
    der = private.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    r, s = utils.decode_dss_signature(der)
    n = ORDERS[next(k for k, c in CURVES.items() if c.name == private.curve.name)]
    if (s > n // 2) != high:
        s = n - s
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


# -------------------------------------------------------------------- hashes and addresses


def test_keccak256_is_ethereums_not_sha3() -> None:
    empty = "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert eth.keccak256(b"").hex() == empty
    assert algorithms.HASHES["keccak256"].new(b"").digest().hex() == empty
    assert hashlib.sha3_256(b"").hexdigest() != empty
    # Ethereum's ERC-20 Transfer event topic: keccak256("Transfer(address,address,uint256)")
    assert eth.keccak256(b"Transfer(address,address,uint256)").hex() == (
        "ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
    )


@pytest.mark.parametrize(
    "expected",
    [  # the test vectors of EIP-55 itself
        "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
        "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
        "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
        "0x52908400098527886E0F7030069857D2E4169EE7",
        "0xde709f2102306220921060314715629080e2fb77",
    ],
)
def test_eip55_checksum(expected: str) -> None:
    assert eth.checksum_address(bytes.fromhex(expected[2:])) == expected


def test_address_of_private_key_one() -> None:
    """The address of private key 1 (the generator point) is well known."""
    key = ec.derive_private_key(1, ec.SECP256K1()).public_key()
    assert eth.address(key) == "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"


def test_address_agrees_with_eth_keys() -> None:
    eth_keys = pytest.importorskip("eth_keys")
    for seed in range(2, 12):
        key = ec.derive_private_key(seed * 0x1234567, ec.SECP256K1()).public_key()
        theirs = eth_keys.keys.PublicKey(point(key)[1:]).to_checksum_address()
        assert eth.address(key) == theirs


# -------------------------------------------------------------------- low-S, in-process


@pytest.mark.parametrize("kt", list(CURVES))
def test_the_curve_orders_are_right(kt: str) -> None:
    """(r, n - s) verifies exactly when n is the curve's order: so signd's
    table and this file's agree with the curve itself."""
    assert algorithms.CURVE_ORDERS[CURVES[kt].name] == ORDERS[kt]
    private = ec.derive_private_key(7, CURVES[kt])
    digest = hashlib.sha256(b"order").digest()
    r, s = utils.decode_dss_signature(
        private.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    )
    twin = utils.encode_dss_signature(r, ORDERS[kt] - s)
    private.public_key().verify(twin, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


@pytest.mark.parametrize("kt", list(CURVES))
@pytest.mark.parametrize("fmt", ["der", "raw"])
def test_finish_signature_makes_s_low(kt: str, fmt: str) -> None:
    key_type = algorithms.key_type(kt)
    private = ec.derive_private_key(11, CURVES[kt])
    args = SignArgs(key="k", digest=hashlib.sha256(b"x").digest(), hash="sha256", format=fmt)
    plan = algorithms.plan_sign(key_type, args)
    size = key_type.coordinate_size
    n = ORDERS[kt]
    for high in (True, False):
        raw = token_raw(private, plan.data, size, high)
        sig = algorithms.finish_signature(plan, raw)
        if fmt == "raw":
            assert len(sig) == 2 * size
            r, s = int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
        else:
            r, s = utils.decode_dss_signature(sig)
        assert s <= n // 2
        assert r == int.from_bytes(raw[:size], "big")
        verify = VerifyArgs(key="k", signature=sig, digest=args.digest, hash="sha256", format=fmt)
        assert algorithms.verify(key_type, private.public_key(), verify) is not None
        # verify stays permissive: the high-S twin of a valid signature is valid too
        twin = utils.encode_dss_signature(r, n - s)
        der = VerifyArgs(key="k", signature=twin, digest=args.digest, hash="sha256")
        assert algorithms.verify(key_type, private.public_key(), der) is not None


def test_rsa_and_ed25519_signatures_are_left_alone() -> None:
    for name in ("rsa-2048", "ed25519"):
        kt = algorithms.key_type(name)
        plan = algorithms.plan_sign(kt, SignArgs(key="k", message=b"m"))
        raw = bytes(range(256))[: 64 if name == "ed25519" else 256]
        assert algorithms.finish_signature(plan, raw) == raw


# -------------------------------------------------------------------- format eth, in-process


def test_eth_signature_recovers_the_key() -> None:
    private = ec.derive_private_key(0xC0FFEE, ec.SECP256K1())
    public = private.public_key()
    digest = eip191_digest(MESSAGE)
    args = SignArgs(key="k", digest=digest, hash="keccak256", format="eth")
    plan = algorithms.plan_sign(K1, args)
    assert plan.algorithm == "ecdsa-secp256k1-keccak256"
    seen_v = set()
    for high in (True, False, True, False):
        sig = algorithms.finish_signature(plan, token_raw(private, digest, 32, high), public)
        assert len(sig) == 65
        v = sig[64]
        seen_v.add(v)
        assert v in (0, 1)
        assert int.from_bytes(sig[32:64], "big") <= ORDERS["ec-secp256k1"] // 2
        recovered = coincurve.PublicKey.from_signature_and_message(sig, digest, hasher=None)
        assert recovered.format(compressed=False) == point(public)
        ok = VerifyArgs(key="k", signature=sig, digest=digest, hash="keccak256", format="eth")
        assert algorithms.verify(K1, public, ok) == "ecdsa-secp256k1-keccak256"
        # v + 27, as Ethereum writes it, is accepted; the other v is not this key
        for other_v, valid in ((v + 27, True), (v ^ 1, False), (2, False), (v + 29, False)):
            variant = VerifyArgs(
                key="k",
                signature=sig[:64] + bytes((other_v,)),
                digest=digest,
                hash="keccak256",
                format="eth",
            )
            assert (algorithms.verify(K1, public, variant) is not None) is valid, other_v
        # the high-S twin, with v flipped, recovers the same key: valid (permissive)
        s_high = ORDERS["ec-secp256k1"] - int.from_bytes(sig[32:64], "big")
        twin = sig[:32] + s_high.to_bytes(32, "big") + bytes((v ^ 1,))
        twin_args = VerifyArgs(
            key="k", signature=twin, digest=digest, hash="keccak256", format="eth"
        )
        assert algorithms.verify(K1, public, twin_args) is not None
    other = ec.derive_private_key(0xBEEF, ec.SECP256K1()).public_key()
    assert algorithms.verify(K1, other, ok) is None
    assert algorithms.verify_any(K1, [(1, other), (2, public)], ok) == (
        2,
        "ecdsa-secp256k1-keccak256",
    )
    for bad in (sig[:64], sig + b"\x00", b"", bytes(65)):
        bad_args = VerifyArgs(key="k", signature=bad, digest=digest, hash="keccak256", format="eth")
        assert algorithms.verify(K1, public, bad_args) is None


def test_eth_signature_of_another_key_is_a_token_error() -> None:
    """A token that signed with a key not the version's: no v recovers it."""
    signer = ec.derive_private_key(5, ec.SECP256K1())
    version_key = ec.derive_private_key(6, ec.SECP256K1()).public_key()
    digest = hashlib.sha256(b"m").digest()
    plan = algorithms.plan_sign(K1, SignArgs(key="k", digest=digest, hash="sha256", format="eth"))
    with pytest.raises(TokenError, match="does not recover"):
        algorithms.finish_signature(plan, token_raw(signer, digest, 32, False), version_key)


def test_options_of_secp256k1() -> None:
    def opts(kt: algorithms.KeyType, **kw: Any) -> algorithms.SignPlan:
        return algorithms.plan_sign(kt, SignArgs(key="k", message=b"m", **kw))

    assert opts(K1).algorithm == "ecdsa-secp256k1-sha256"
    assert opts(K1).data == hashlib.sha256(b"m").digest()
    assert opts(K1, hash="keccak256").data == eth.keccak256(b"m")
    assert opts(K1, hash="keccak256", format="raw").algorithm == "ecdsa-secp256k1-keccak256"
    assert opts(P256).algorithm == "ecdsa-p256-sha256"  # unchanged
    with pytest.raises(UnsupportedAlgorithm, match="ec-secp256k1 keys only"):
        opts(P256, hash="keccak256")
    with pytest.raises(UnsupportedAlgorithm, match="ec-secp256k1 keys only"):
        opts(algorithms.key_type("rsa-2048"), hash="keccak256")
    with pytest.raises(UnsupportedAlgorithm, match="sha256 or keccak256"):
        opts(K1, hash="sha384")
    with pytest.raises(InvalidArgument, match="format"):
        opts(P256, format="eth")
    with pytest.raises(InvalidArgument, match="format"):
        opts(algorithms.key_type("ed25519"), format="eth")
    with pytest.raises(InvalidArgument, match="padding"):
        opts(K1, padding="pss")
    with pytest.raises(InvalidDigest, match="32 bytes, got 31"):
        algorithms.plan_sign(
            K1, SignArgs(key="k", digest=bytes(31), hash="keccak256", format="eth")
        )


def test_jwk_of_secp256k1_is_rfc8812() -> None:
    public = ec.derive_private_key(9, ec.SECP256K1()).public_key()
    jwk = algorithms.jwk(K1, public, "k:1")
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("EC", "secp256k1", "ES256K")
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert algorithms.load_public_key(K1, spki) == public
    with pytest.raises(ValueError, match="does not match"):
        algorithms.load_public_key(P256, spki)


# -------------------------------------------------------------------- through the daemon


def check_k1(pem: str, sig: bytes, digest: bytes) -> None:
    """A DER secp256k1 signature over ``digest``, checked by cryptography and by
    libsecp256k1 (which refuses a high S)."""
    key = serialization.load_pem_public_key(pem.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256k1"
    key.verify(sig, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    assert coincurve.PublicKey(point(key)).verify(sig, digest, hasher=None)


def test_secp256k1_key_signs_and_shows_its_address(signd: Daemon, key_name: str) -> None:
    """Create, sign (SHA-256 and Keccak-256, message and digest, DER and eth),
    verify; the address in key_info is the key's, recovers from format eth
    signatures, and changes with a rotation."""
    eth_account = pytest.importorskip("eth_account")
    from eth_account.messages import encode_defunct

    with signd.client() as c:
        info = c.create_key(key_name, "ec-secp256k1")
        assert info.type == "ec-secp256k1"
        pem = info.versions[0].public_key_pem
        address = info.versions[0].eth_address
        public = serialization.load_pem_public_key(pem.encode())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert address == eth.address(public)
        res = c.sign(key_name, MESSAGE)
        assert res.algorithm == "ecdsa-secp256k1-sha256"
        check_k1(pem, res.signature, hashlib.sha256(MESSAGE).digest())
        res = c.sign(key_name, MESSAGE, hash="keccak256")
        assert res.algorithm == "ecdsa-secp256k1-keccak256"
        check_k1(pem, res.signature, eth.keccak256(MESSAGE))
        assert c.verify(key_name, res.signature, MESSAGE, hash="keccak256").valid

        addresses = []
        for rotation in range(2):
            digest = eip191_digest(MESSAGE)
            res = c.sign(key_name, digest=digest, hash="keccak256", format="eth")
            current = c.key_info(key_name)
            version = {v.version: v for v in current.versions}[res.version]
            assert version.eth_address is not None
            recovered = coincurve.PublicKey.from_signature_and_message(
                res.signature, digest, hasher=None
            )
            assert recovered.format(compressed=False) == point(version.public_key_pem)
            ethereum_sig = res.signature[:64] + bytes((res.signature[64] + 27,))
            theirs = eth_account.Account.recover_message(
                encode_defunct(MESSAGE), signature=ethereum_sig
            )
            assert theirs == version.eth_address
            ok = c.verify(key_name, res.signature, digest=digest, hash="keccak256", format="eth")
            assert (ok.valid, ok.version) == (True, res.version)
            addresses.append(version.eth_address)
            if rotation == 0:
                c.rotate(key_name)
        assert addresses[0] != addresses[1]
        assert addresses[0] == address
        # key_info shows both versions, each with its own address
        shown = [v.eth_address for v in c.key_info(key_name).versions]
        assert shown == addresses


def test_ecdsa_signatures_from_signd_are_low_s(signd: Daemon, key_name: str) -> None:
    """10,000 ECDSA signatures across P-256, P-384 and secp256k1 (DER, raw and
    eth), signed in batches: every one is low-S and verifies."""
    plan = {  # key type -> {format: count}
        "ec-p256": {"der": 1667, "raw": 1667},
        "ec-p384": {"der": 1667, "raw": 1666},
        "ec-secp256k1": {"der": 1111, "raw": 1111, "eth": 1111},
    }
    assert sum(sum(f.values()) for f in plan.values()) == 10_000
    checked = 0
    with signd.client(timeout=120.0) as c:
        for kt, formats in plan.items():
            name = f"{key_name[:40]}-{kt}"
            pem = c.create_key(name, kt).versions[0].public_key_pem
            key = serialization.load_pem_public_key(pem.encode())
            assert isinstance(key, ec.EllipticCurvePublicKey)
            size = algorithms.key_type(kt).coordinate_size
            n = ORDERS[kt]
            for fmt, count in formats.items():
                digests = [
                    hashlib.sha256(b"%s %s %d" % (kt.encode(), fmt.encode(), i)).digest()
                    for i in range(count)
                ]
                batch = c.sign_batch(name, digests=digests, hash="sha256", format=fmt)
                for d, item in zip(digests, batch.results, strict=True):
                    assert item.signature is not None, item
                    sig = item.signature
                    if fmt == "der":
                        r, s = utils.decode_dss_signature(sig)
                    else:
                        assert len(sig) == 2 * size + (fmt == "eth")
                        r = int.from_bytes(sig[:size], "big")
                        s = int.from_bytes(sig[size : 2 * size], "big")
                    assert s <= n // 2, (kt, fmt)
                    key.verify(
                        utils.encode_dss_signature(r, s),
                        d,
                        ec.ECDSA(utils.Prehashed(hashes.SHA256())),
                    )
                    if fmt == "eth":
                        recovered = coincurve.PublicKey.from_signature_and_message(
                            sig, d, hasher=None
                        )
                        assert recovered.format(compressed=False) == point(key)
                    checked += 1
    assert checked == 10_000


def test_bad_secp256k1_requests_get_clear_errors(signd: Daemon, key_name: str) -> None:
    with signd.client() as c:
        c.create_key(f"{key_name}-p256", "ec-p256")
        c.create_key(f"{key_name}-k1", "ec-secp256k1")
        p256, k1 = f"{key_name}-p256", f"{key_name}-k1"
        with pytest.raises(client_errors.UnsupportedAlgorithm, match="ec-secp256k1 keys only"):
            c.sign(p256, MESSAGE, hash="keccak256")
        with pytest.raises(client_errors.UnsupportedAlgorithm, match="ec-secp256k1 keys only"):
            c.sign(p256, digest=bytes(32), hash="keccak256")
        with pytest.raises(client_errors.InvalidArgument, match="format"):
            c.sign(p256, MESSAGE, format="eth")
        with pytest.raises(client_errors.InvalidArgument, match="format"):
            c.verify(p256, bytes(65), MESSAGE, format="eth")
        with pytest.raises(client_errors.InvalidDigest, match="got 31"):
            c.sign(k1, digest=bytes(31), hash="keccak256", format="eth")
        with pytest.raises(client_errors.UnsupportedAlgorithm, match="sha256 or keccak256"):
            c.sign(k1, MESSAGE, hash="sha512")
        # key_info shows no address for other key types
        assert all(v.eth_address is None for v in c.key_info(p256).versions)
        # and the daemon goes on serving
        assert c.sign(k1, MESSAGE).version == 1


def test_golden_eth_frames_recover_with_eth_account() -> None:
    """The golden frames agree with eth-account: sign.result.eth, a personal
    message signature, recovers key_info.result.secp256k1's version 2 address."""
    eth_account = pytest.importorskip("eth_account")
    from eth_account.messages import encode_defunct

    doc = json.loads((Path(__file__).parent / "vectors" / "frames.json").read_text())
    frames = {v["name"]: v["message"] for v in doc["vectors"]}
    sig = bytes.fromhex(frames["sign.result.eth"]["result"]["signature"]["$bin"])
    versions = frames["key_info.result.secp256k1"]["result"]["versions"]
    assert len(sig) == 65
    assert sig[64] in (0, 1)
    assert int.from_bytes(sig[32:64], "big") <= ORDERS["ec-secp256k1"] // 2
    signer = eth_account.Account.recover_message(
        encode_defunct(MESSAGE), signature=sig[:64] + bytes((sig[64] + 27,))
    )
    assert signer == versions[1]["eth_address"]
    assert signer != versions[0]["eth_address"]
    for v in versions:
        assert v["eth_address"] == eth.address(load_pem(v["public_key_pem"]))


def load_pem(pem: str) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key
