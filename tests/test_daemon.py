"""End-to-end: signd on the real SoftHSM token, checked by independent verifiers.

Signatures made through ``signctl`` are verified with the ``openssl`` CLI, and
those made through the Python ``Client`` with ``cryptography``; nothing here
uses signd's own verification code except the tests of the ``verify``
operation itself.
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from signd_client import Client
from signd_client.errors import VersionNotFound

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv  # the root conftest.py

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


@dataclass(frozen=True)
class Spec:
    """What an independent verifier needs to know about a key type."""

    name: str
    family: str  # "ec", "ed25519" or "rsa"
    size: int  # curve bits or RSA modulus bits
    default_hash: str | None = None

    @property
    def coordinate_size(self) -> int:
        return (self.size + 7) // 8


SPECS = {
    s.name: s
    for s in (
        Spec("ec-p256", "ec", 256, "sha256"),
        Spec("ec-p384", "ec", 384, "sha384"),
        Spec("ed25519", "ed25519", 255),
        Spec("rsa-2048", "rsa", 2048, "sha256"),
        Spec("rsa-3072", "rsa", 3072, "sha256"),
        Spec("rsa-4096", "rsa", 4096, "sha256"),
    )
}
ALL = list(SPECS)
EC = [t for t in ALL if SPECS[t].family == "ec"]
RSA = [t for t in ALL if SPECS[t].family == "rsa"]
HASHED = EC + RSA  # every type that signs a digest (all but Ed25519)
CURVES = {256: ec.SECP256R1, 384: ec.SECP384R1}

MESSAGE = b"the quick brown fox jumps over the lazy dog\n" * 3


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def load_pem(pem: str) -> PublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey)
    return key


def check_key_matches_type(key: PublicKey, spec: Spec) -> None:
    if spec.family == "ec":
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert isinstance(key.curve, CURVES[spec.size])
    elif spec.family == "ed25519":
        assert isinstance(key, ed25519.Ed25519PublicKey)
    else:
        assert isinstance(key, rsa.RSAPublicKey)
        assert key.key_size == spec.size


def crypto_verify(
    key: PublicKey,
    signature: bytes,
    data: bytes,
    *,
    hash_name: str | None = None,
    pad: str = "pkcs1v15",
    prehashed: bool = False,
) -> None:
    """Verify with ``cryptography`` alone; raises InvalidSignature if it does not hold.

    ``data`` is the message, or the digest when ``prehashed``.  RSA-PSS is checked
    with an explicit salt length equal to the digest length (not AUTO).
    """
    if isinstance(key, ed25519.Ed25519PublicKey):
        assert hash_name is None
        assert not prehashed
        key.verify(signature, data)
        return
    assert hash_name is not None
    h = HASHES[hash_name]
    alg: hashes.HashAlgorithm | utils.Prehashed = utils.Prehashed(h) if prehashed else h
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, data, ec.ECDSA(alg))
        return
    scheme: padding.AsymmetricPadding
    if pad == "pss":
        scheme = padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
    else:
        scheme = padding.PKCS1v15()
    key.verify(signature, data, scheme, alg)


def raw_to_der(raw: bytes, coordinate_size: int) -> bytes:
    assert len(raw) == 2 * coordinate_size
    r = int.from_bytes(raw[:coordinate_size], "big")
    s = int.from_bytes(raw[coordinate_size:], "big")
    return utils.encode_dss_signature(r, s)


def corrupt(sig: bytes) -> bytes:
    """The same signature with one bit flipped in the middle."""
    i = len(sig) // 2
    return sig[:i] + bytes([sig[i] ^ 0x01]) + sig[i + 1 :]


# --------------------------------------------------------------------------
# Fixtures


@dataclass(frozen=True)
class Key:
    name: str
    spec: Spec
    public_key: PublicKey


@pytest.fixture(scope="module")
def client(signd: Daemon) -> Iterator[Client]:
    with signd.client() as c:
        yield c
    assert signd.token.pin not in signd.logs(), "the PIN appears in the daemon's log"


@pytest.fixture(scope="module")
def keys(client: Client) -> dict[str, Key]:
    """One key of every type, made once: RSA-4096 generation is slow on SoftHSM."""
    out: dict[str, Key] = {}
    for kt, spec in SPECS.items():
        name = _unique(f"all-{kt}")
        info = client.create_key(name, kt)
        assert info.name == name
        assert info.type == kt
        assert info.current_version == 1
        assert [(v.version, v.state) for v in info.versions] == [(1, "active")]
        key = load_pem(info.versions[0].public_key_pem)
        check_key_matches_type(key, spec)
        out[kt] = Key(name, spec, key)
    return out


# --------------------------------------------------------------------------
# signctl + openssl


def openssl_verify(spec: Spec, pem: Path, sig: Path, msg: Path) -> subprocess.CompletedProcess[str]:
    if spec.family == "ed25519":
        cmd = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pem), "-rawin"]
        cmd += ["-in", str(msg), "-sigfile", str(sig)]
    else:
        cmd = ["openssl", "dgst", "-sha256", "-verify", str(pem), "-signature", str(sig), str(msg)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def signctl_ok(daemon: Daemon, *args: str) -> str:
    out = daemon.signctl(*args)
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out.stdout.decode()


@pytest.mark.parametrize("kt", ["ec-p256", "ed25519", "rsa-2048"])
def test_signctl_signature_verifies_with_openssl(
    signd: Daemon, key_name: str, tmp_path: Path, kt: str
) -> None:
    spec = SPECS[kt]
    signctl_ok(signd, "create", key_name, "--type", kt)
    msg = tmp_path / "msg.bin"
    msg.write_bytes(MESSAGE)
    sig = tmp_path / "msg.sig"
    out = signd.signctl("sign", key_name, "--in", str(msg), "--out", str(sig))
    assert out.returncode == 0, out.stderr
    assert f"{key_name} version 1".encode() in out.stderr
    assert sig.stat().st_size > 0
    pem = tmp_path / "pub.pem"
    pem.write_text(signctl_ok(signd, "pubkey", key_name))
    check_key_matches_type(load_pem(pem.read_text()), spec)

    good = openssl_verify(spec, pem, sig, msg)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "Verified OK" in good.stdout or "Signature Verified Successfully" in good.stdout

    # The check can fail: one changed byte of the message and openssl refuses.
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(MESSAGE[:-2] + b"?\n")
    bad = openssl_verify(spec, pem, sig, tampered)
    assert bad.returncode != 0, bad.stdout
    assert "Verified OK" not in bad.stdout
    assert "Signature Verified Successfully" not in bad.stdout


# --------------------------------------------------------------------------
# Python client, every key type, checked with cryptography

ALGORITHM = {
    "ec-p256": "ecdsa-p256-sha256",
    "ec-p384": "ecdsa-p384-sha384",
    "ed25519": "ed25519",
    "rsa-2048": "rsa-pkcs1v15-sha256",
    "rsa-3072": "rsa-pkcs1v15-sha256",
    "rsa-4096": "rsa-pkcs1v15-sha256",
}


@pytest.mark.parametrize("kt", ALL)
def test_public_key_matches_type(client: Client, keys: dict[str, Key], kt: str) -> None:
    k = keys[kt]
    pk = client.public_key(k.name)
    assert (pk.name, pk.version, pk.type) == (k.name, 1, kt)
    check_key_matches_type(load_pem(pk.public_key_pem), k.spec)
    assert client.public_key(k.name, 1).public_key_pem == pk.public_key_pem


@pytest.mark.parametrize("kt", ALL)
def test_sign_message_default_hash(client: Client, keys: dict[str, Key], kt: str) -> None:
    k = keys[kt]
    res = client.sign(k.name, MESSAGE)
    assert (res.key, res.version, res.algorithm) == (k.name, 1, ALGORITHM[kt])
    crypto_verify(k.public_key, res.signature, MESSAGE, hash_name=k.spec.default_hash)
    with pytest.raises(InvalidSignature):
        crypto_verify(k.public_key, res.signature, MESSAGE + b"!", hash_name=k.spec.default_hash)


@pytest.mark.parametrize("kt", RSA)
def test_rsa_pss_salt_is_digest_length(client: Client, keys: dict[str, Key], kt: str) -> None:
    k = keys[kt]
    res = client.sign(k.name, MESSAGE, padding="pss")
    assert res.algorithm == "rsa-pss-sha256"
    crypto_verify(k.public_key, res.signature, MESSAGE, hash_name="sha256", pad="pss")
    # PSS is randomised: two signatures of one message differ, and both verify.
    again = client.sign(k.name, MESSAGE, padding="pss").signature
    assert again != res.signature
    crypto_verify(k.public_key, again, MESSAGE, hash_name="sha256", pad="pss")
    with pytest.raises(InvalidSignature):
        crypto_verify(k.public_key, res.signature, MESSAGE, hash_name="sha256")  # not PKCS#1 v1.5


@pytest.mark.parametrize("kt", HASHED)
def test_sign_precomputed_digest(client: Client, keys: dict[str, Key], kt: str) -> None:
    k = keys[kt]
    hash_name = k.spec.default_hash
    assert hash_name is not None
    digest = hashlib.new(hash_name, MESSAGE).digest()
    res = client.sign(k.name, digest=digest, hash=hash_name)
    assert res.algorithm == ALGORITHM[kt]
    crypto_verify(k.public_key, res.signature, digest, hash_name=hash_name, prehashed=True)
    # The same signature is over the message: the daemon did not hash the digest again.
    crypto_verify(k.public_key, res.signature, MESSAGE, hash_name=hash_name)
    if k.spec.family == "rsa":
        pss = client.sign(k.name, digest=digest, hash=hash_name, padding="pss")
        assert pss.algorithm == f"rsa-pss-{hash_name}"
        crypto_verify(k.public_key, pss.signature, MESSAGE, hash_name=hash_name, pad="pss")


@pytest.mark.parametrize("kt", EC)
def test_ecdsa_raw_format(client: Client, keys: dict[str, Key], kt: str) -> None:
    k = keys[kt]
    size = k.spec.coordinate_size
    assert size == {"ec-p256": 32, "ec-p384": 48}[kt]
    res = client.sign(k.name, MESSAGE, format="raw")
    assert len(res.signature) == 2 * size  # fixed width: 64 for P-256, 96 for P-384
    crypto_verify(
        k.public_key, raw_to_der(res.signature, size), MESSAGE, hash_name=k.spec.default_hash
    )
    hash_name = k.spec.default_hash
    assert hash_name is not None
    digest = hashlib.new(hash_name, MESSAGE).digest()
    res = client.sign(k.name, digest=digest, hash=hash_name, format="raw")
    assert len(res.signature) == 2 * size
    crypto_verify(k.public_key, raw_to_der(res.signature, size), MESSAGE, hash_name=hash_name)
    # Plain DER (the default) is what cryptography and openssl take as is.
    der = client.sign(k.name, MESSAGE, format="der").signature
    r, s = utils.decode_dss_signature(der)
    assert r > 0
    assert s > 0
    crypto_verify(k.public_key, der, MESSAGE, hash_name=hash_name)


@pytest.mark.parametrize("pad", ["pkcs1v15", "pss"])
@pytest.mark.parametrize("hash_name", ["sha384", "sha512"])
@pytest.mark.parametrize("kt", RSA)
def test_rsa_other_hashes(
    client: Client, keys: dict[str, Key], kt: str, hash_name: str, pad: str
) -> None:
    k = keys[kt]
    res = client.sign(k.name, MESSAGE, hash=hash_name, padding=pad)
    assert res.algorithm == f"rsa-{pad}-{hash_name}"
    crypto_verify(k.public_key, res.signature, MESSAGE, hash_name=hash_name, pad=pad)
    digest = hashlib.new(hash_name, MESSAGE).digest()
    res = client.sign(k.name, digest=digest, hash=hash_name, padding=pad)
    crypto_verify(k.public_key, res.signature, digest, hash_name=hash_name, pad=pad, prehashed=True)


@pytest.mark.parametrize("kt", EC)
def test_ecdsa_non_default_hash(client: Client, keys: dict[str, Key], kt: str) -> None:
    k = keys[kt]
    res = client.sign(k.name, MESSAGE, hash="sha512")
    assert res.algorithm == f"ecdsa-p{k.spec.size}-sha512"
    crypto_verify(k.public_key, res.signature, MESSAGE, hash_name="sha512")


# --------------------------------------------------------------------------
# verify, in the daemon


@pytest.mark.parametrize("kt", ALL)
def test_verify_in_daemon(client: Client, keys: dict[str, Key], kt: str) -> None:
    k = keys[kt]
    sig = client.sign(k.name, MESSAGE).signature

    ok = client.verify(k.name, sig, MESSAGE)
    assert (ok.valid, ok.key, ok.version, ok.algorithm) == (True, k.name, 1, ALGORITHM[kt])
    assert client.verify(k.name, sig, MESSAGE, version=1).valid

    # Negative answers are answers, not errors.
    bad = client.verify(k.name, corrupt(sig), MESSAGE)
    assert (bad.valid, bad.key, bad.version) == (False, k.name, None)
    assert not client.verify(k.name, sig[:-1], MESSAGE).valid
    assert not client.verify(k.name, sig, MESSAGE + b"x").valid
    assert not client.verify(k.name, b"", MESSAGE).valid
    with pytest.raises(VersionNotFound):
        client.verify(k.name, sig, MESSAGE, version=2)

    if k.spec.family != "ed25519":
        h = k.spec.default_hash
        assert h is not None
        digest = hashlib.new(h, MESSAGE).digest()
        assert client.verify(k.name, sig, digest=digest, hash=h).valid
        wrong = hashlib.new(h, MESSAGE + b"x").digest()
        assert not client.verify(k.name, sig, digest=wrong, hash=h).valid


def test_verify_options_in_daemon(client: Client, keys: dict[str, Key]) -> None:
    r = keys["rsa-2048"]
    pss = client.sign(r.name, MESSAGE, padding="pss").signature
    assert client.verify(r.name, pss, MESSAGE, padding="pss").valid
    assert not client.verify(r.name, pss, MESSAGE).valid  # checked as PKCS#1 v1.5
    sha512 = client.sign(r.name, MESSAGE, hash="sha512").signature
    assert client.verify(r.name, sha512, MESSAGE, hash="sha512").valid
    assert not client.verify(r.name, sha512, MESSAGE).valid  # checked with SHA-256

    e = keys["ec-p384"]
    raw = client.sign(e.name, MESSAGE, format="raw").signature
    assert client.verify(e.name, raw, MESSAGE, format="raw").valid
    assert not client.verify(e.name, corrupt(raw), MESSAGE, format="raw").valid
    assert not client.verify(e.name, raw[:-1], MESSAGE, format="raw").valid

    # A signature by another key of the same type is not valid for this one.
    other = keys["ec-p256"]
    foreign = client.sign(other.name, MESSAGE).signature
    assert client.verify(other.name, foreign, MESSAGE).valid
    assert not client.verify(e.name, foreign, MESSAGE).valid


# --------------------------------------------------------------------------
# rotation


def test_rotation_keeps_old_versions_verifying(
    signd: Daemon, client: Client, key_name: str, tmp_path: Path
) -> None:
    spec = SPECS["ec-p256"]
    client.create_key(key_name, "ec-p256")
    msg = tmp_path / "msg.bin"
    msg.write_bytes(MESSAGE)
    sig1 = tmp_path / "v1.sig"
    s1 = client.sign(key_name, MESSAGE)
    assert s1.version == 1
    sig1.write_bytes(s1.signature)
    pem1_before = signctl_ok(signd, "pubkey", key_name)

    info = client.rotate(key_name)
    assert info.current_version == 2
    assert [(v.version, v.state) for v in info.versions] == [(1, "verify-only"), (2, "active")]
    assert info.created_version == 2
    assert client.key_info(key_name) == replace(info, created_version=None)

    # v1's public key is unchanged and differs from v2's.
    pem1 = tmp_path / "v1.pem"
    pem1.write_text(signctl_ok(signd, "pubkey", key_name, "--version", "1"))
    pem2 = tmp_path / "v2.pem"
    pem2.write_text(signctl_ok(signd, "pubkey", key_name))
    assert pem1.read_text() == pem1_before
    assert pem1.read_text() != pem2.read_text()
    assert client.public_key(key_name, 1).public_key_pem == pem1.read_text()
    assert client.public_key(key_name, 2).public_key_pem == pem2.read_text()
    assert client.public_key(key_name).version == 2
    assert [v.public_key_pem for v in info.versions] == [pem1.read_text(), pem2.read_text()]

    # The old signature still verifies, reported as version 1 ...
    v = client.verify(key_name, s1.signature, MESSAGE)
    assert (v.valid, v.version) == (True, 1)
    assert client.verify(key_name, s1.signature, MESSAGE, version=1).valid
    assert not client.verify(key_name, s1.signature, MESSAGE, version=2).valid
    # ... and openssl agrees, with v1's PEM only.
    assert openssl_verify(spec, pem1, sig1, msg).returncode == 0
    assert openssl_verify(spec, pem2, sig1, msg).returncode != 0

    # New signatures carry version 2 and are made by v2's key.
    s2 = client.sign(key_name, MESSAGE)
    assert s2.version == 2
    sig2 = tmp_path / "v2.sig"
    sig2.write_bytes(s2.signature)
    assert openssl_verify(spec, pem2, sig2, msg).returncode == 0
    assert openssl_verify(spec, pem1, sig2, msg).returncode != 0
    v = client.verify(key_name, s2.signature, MESSAGE)
    assert (v.valid, v.version) == (True, 2)
    assert not client.verify(key_name, s2.signature, MESSAGE, version=1).valid
    out = signd.signctl("sign", key_name, "--in", str(msg), "--out", str(tmp_path / "c.sig"))
    assert out.returncode == 0, out.stderr
    assert b"version 2" in out.stderr, out.stderr

    # A second rotation: v1 and v2 both keep verifying, v3 signs.
    info = client.rotate(key_name)
    assert [(v.version, v.state) for v in info.versions] == [
        (1, "verify-only"),
        (2, "verify-only"),
        (3, "active"),
    ]
    assert client.verify(key_name, s1.signature, MESSAGE).version == 1
    assert client.verify(key_name, s2.signature, MESSAGE).version == 2
    s3 = client.sign(key_name, MESSAGE)
    assert s3.version == 3
    crypto_verify(
        load_pem(client.public_key(key_name, 3).public_key_pem),
        s3.signature,
        MESSAGE,
        hash_name="sha256",
    )
    assert len({v.public_key_pem for v in info.versions}) == 3


# --------------------------------------------------------------------------
# restart and a second process


def test_keys_survive_restart_and_are_shared_with_a_second_process(
    make_daemon: Callable[..., Daemon], token_env: TokenEnv
) -> None:
    d = make_daemon()
    kinds = ["ec-p256", "ec-p384", "ed25519", "rsa-2048"]
    names = {kt: _unique(f"persist-{kt}") for kt in kinds}
    signatures: list[tuple[str, str, bytes, int]] = []  # (type, name, signature, version)
    with d.client() as c:
        for kt, name in names.items():
            c.create_key(name, kt)
            signatures.append((kt, name, c.sign(name, MESSAGE).signature, 1))
        rotated = names["ec-p256"]
        c.rotate(rotated)
        signatures.append(("ec-p256", rotated, c.sign(rotated, MESSAGE).signature, 2))
        before = {name: c.key_info(name) for name in names.values()}
    assert before[rotated].current_version == 2

    d.restart()
    with d.client() as c:
        listed = {k.name: k for k in c.list_keys().keys}
        for name, info in before.items():
            assert c.key_info(name) == info  # same versions, states, times, public keys
            assert listed[name].current_version == info.current_version
            assert listed[name].type == info.type
        for kt, name, sig, version in signatures:
            v = c.verify(name, sig, MESSAGE)
            assert (v.valid, v.version) == (True, version), (kt, name)
            pem = c.public_key(name, version).public_key_pem
            crypto_verify(load_pem(pem), sig, MESSAGE, hash_name=SPECS[kt].default_hash)
        # Signing still works after the restart, with the current version.
        assert c.sign(rotated, MESSAGE).version == 2
        all_after_restart = c.list_keys()

    # A second process on the same token sees exactly the same keys.
    d2 = make_daemon()
    with d2.client() as c2, d.client() as c:
        for name, info in before.items():
            assert c2.key_info(name) == info
        assert c2.list_keys() == all_after_restart
        for kt, name in names.items():
            res = c2.sign(name, MESSAGE)
            assert res.version == before[name].current_version
            assert c.verify(name, res.signature, MESSAGE).version == res.version
            pem = before[name].versions[-1].public_key_pem
            crypto_verify(load_pem(pem), res.signature, MESSAGE, hash_name=SPECS[kt].default_hash)
    assert token_env.pin not in d.logs() + d2.logs()


# --------------------------------------------------------------------------
# list_keys and health


def test_list_keys_includes_created_keys(client: Client, keys: dict[str, Key]) -> None:
    listed = {k.name: k for k in client.list_keys().keys}
    for kt, k in keys.items():
        assert k.name in listed
        assert listed[k.name].type == kt
        assert listed[k.name].current_version == 1
    names = [k.name for k in client.list_keys().keys]
    assert names == sorted(names)


def test_health_is_ready_and_names_the_token(
    client: Client, token_env: TokenEnv, keys: dict[str, Key]
) -> None:
    h = client.health()
    assert h.status == "ok"
    assert h.live
    assert h.ready
    assert h.protocol_version == 1
    assert h.keys >= len(keys)
    assert h.token is not None
    assert h.token.label == token_env.label
    assert h.token.logged_in
    assert h.token.manufacturer
    assert h.token.model
    assert h.token.serial
    assert h.detail is None
