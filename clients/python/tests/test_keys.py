"""signd keys as ``cryptography`` private-key objects, against a real daemon.

Certificates and CSRs made through the key objects are checked by
``openssl verify`` / ``openssl req -verify``; signatures by ``cryptography``'s
own public keys.  Nothing here uses signd's code to check signd's output.
"""

from __future__ import annotations

import copy
import datetime
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm as CryptographyUnsupported
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo, Prehashed
from cryptography.x509.oid import NameOID

from signd_client import (
    AsyncClient,
    AsyncSigndPrivateKey,
    Client,
    SigndEd25519PrivateKey,
    SigndEllipticCurvePrivateKey,
    SigndError,
    SigndPrivateKey,
    SigndRSAPrivateKey,
    UnsupportedKeyOperation,
    load_private_key,
)
from signd_client.errors import KeyNotFound, VersionNotUsable
from signd_client.keys import MESSAGE_LIMIT

if TYPE_CHECKING:
    from conftest import Daemon  # the root conftest.py

TYPES = ["ec-p256", "ec-p384", "ed25519", "rsa-2048"]
CLASSES: dict[str, type[SigndPrivateKey]] = {
    "ec-p256": SigndEllipticCurvePrivateKey,
    "ec-p384": SigndEllipticCurvePrivateKey,
    "ed25519": SigndEd25519PrivateKey,
    "rsa-2048": SigndRSAPrivateKey,
}
HASHES: list[hashes.HashAlgorithm] = [hashes.SHA256(), hashes.SHA384(), hashes.SHA512()]
NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def client(signd: Daemon) -> Iterator[Client]:
    with signd.client() as c:
        yield c


@pytest.fixture(scope="module")
def key_names(client: Client) -> dict[str, str]:
    """One key per type, shared by the module (RSA keys are slow to make)."""
    run = uuid.uuid4().hex[:8]
    names = {t: f"keys-{t}-{run}" for t in TYPES}
    for t, name in names.items():
        client.create_key(name, t)
    return names


def cert_hash(key: SigndPrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    return hashes.SHA384() if key.key_type == "ec-p384" else hashes.SHA256()


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def self_signed_ca(
    key: SigndPrivateKey, rsa_padding: padding.PSS | None = None
) -> x509.Certificate:
    subject = name(f"signd test CA {key.name}")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, cert_hash(key), rsa_padding=rsa_padding)
    )


def leaf(
    ca: SigndPrivateKey, ca_cert: x509.Certificate, subject_key: SigndPrivateKey
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(name(f"leaf {subject_key.name}"))
        .issuer_name(ca_cert.subject)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(hours=12))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False
        )
        .sign(ca, cert_hash(ca))
    )


def csr(
    key: SigndPrivateKey, rsa_padding: padding.PSS | None = None
) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name(f"csr {key.name}"))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("signd.test")]), critical=False)
        .sign(key, cert_hash(key), rsa_padding=rsa_padding)
    )


def pem(path: Path, obj: x509.Certificate | x509.CertificateSigningRequest) -> str:
    path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    return str(path)


def openssl(*args: str) -> tuple[int, str]:
    out = subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=30, check=False
    )
    return out.returncode, out.stdout + out.stderr


def assert_openssl_accepts(
    tmp_path: Path,
    ca: x509.Certificate,
    request: x509.CertificateSigningRequest,
    issued: x509.Certificate | None = None,
) -> None:
    ca_pem = pem(tmp_path / "ca.pem", ca)
    rc, out = openssl("verify", "-CAfile", ca_pem, ca_pem)
    assert (rc, f"{ca_pem}: OK" in out) == (0, True), out
    rc, out = openssl("req", "-verify", "-noout", "-in", pem(tmp_path / "csr.pem", request))
    assert (rc, "verify OK" in out) == (0, True), out
    if issued is not None:
        leaf_pem = pem(tmp_path / "leaf.pem", issued)
        rc, out = openssl("verify", "-CAfile", ca_pem, leaf_pem)
        assert (rc, f"{leaf_pem}: OK" in out) == (0, True), out


@pytest.mark.parametrize("key_type", TYPES)
def test_certificate_csr_and_leaf_accepted_by_openssl(
    client: Client, key_names: dict[str, str], key_type: str, tmp_path: Path
) -> None:
    key = client.private_key(key_names[key_type])
    other = client.private_key(key_names[TYPES[(TYPES.index(key_type) + 1) % len(TYPES)]])
    ca = self_signed_ca(key)
    request = csr(key)
    issued = leaf(key, ca, other)
    # The certificates carry the key version's public key, and verify with it.
    assert ca.public_key() == key.public_key()
    assert request.public_key() == key.public_key()
    assert issued.public_key() == other.public_key()
    assert request.is_signature_valid
    ca.verify_directly_issued_by(ca)
    issued.verify_directly_issued_by(ca)
    assert_openssl_accepts(tmp_path, ca, request, issued)


def test_rsa_pss_certificate_and_csr(
    client: Client, key_names: dict[str, str], tmp_path: Path
) -> None:
    key = client.private_key(key_names["rsa-2048"])
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    ca = self_signed_ca(key, rsa_padding=pss)
    request = csr(key, rsa_padding=pss)
    assert ca.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.RSASSA_PSS
    assert request.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.RSASSA_PSS
    assert_openssl_accepts(tmp_path, ca, request)


def digest(h: hashes.HashAlgorithm, data: bytes) -> bytes:
    ctx = hashes.Hash(h)
    ctx.update(data)
    return ctx.finalize()


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384"])
def test_ec_sign_every_hash(client: Client, key_names: dict[str, str], key_type: str) -> None:
    key = client.private_key(key_names[key_type])
    assert isinstance(key, SigndEllipticCurvePrivateKey)
    public = key.public_key()
    data = b"ecdsa through signd"
    for h in HASHES:
        public.verify(key.sign(data, ec.ECDSA(h)), data, ec.ECDSA(h))
        sig = key.sign(digest(h, data), ec.ECDSA(Prehashed(h)))
        public.verify(sig, data, ec.ECDSA(h))
    with pytest.raises(InvalidSignature):
        public.verify(
            key.sign(data, ec.ECDSA(hashes.SHA256())), b"other", ec.ECDSA(hashes.SHA256())
        )
    big = bytes(MESSAGE_LIMIT + 1)  # hashed by the client, sent as a digest
    public.verify(key.sign(big, ec.ECDSA(hashes.SHA384())), big, ec.ECDSA(hashes.SHA384()))


def test_rsa_sign_every_padding_and_hash(client: Client, key_names: dict[str, str]) -> None:
    key = client.private_key(key_names["rsa-2048"])
    assert isinstance(key, SigndRSAPrivateKey)
    public = key.public_key()
    data = b"rsa through signd"
    for h in HASHES:
        # Checked with the exact salt length: signd's PSS salt is the digest's length.
        check = padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
        for pad, verify_pad in [
            (padding.PKCS1v15(), padding.PKCS1v15()),
            (padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.DIGEST_LENGTH), check),
            (padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), check),
        ]:
            public.verify(key.sign(data, pad, h), data, verify_pad, h)
            public.verify(key.sign(digest(h, data), pad, Prehashed(h)), data, verify_pad, h)
    big = bytes(MESSAGE_LIMIT + 1)
    public.verify(
        key.sign(big, padding.PKCS1v15(), hashes.SHA512()), big, padding.PKCS1v15(), hashes.SHA512()
    )


def test_ed25519_sign(client: Client, key_names: dict[str, str]) -> None:
    key = client.private_key(key_names["ed25519"])
    assert isinstance(key, SigndEd25519PrivateKey)
    datas: list[bytes | bytearray | memoryview] = [
        b"",
        b"signd",
        bytearray(b"ba"),
        memoryview(b"mv"),
    ]
    for data in datas:
        key.public_key().verify(key.sign(data), bytes(data))


def refused(call: object, *args: object, says: str) -> None:
    """``call(*args)`` raises the documented error, naming what is supported."""
    assert callable(call)
    with pytest.raises(UnsupportedKeyOperation) as info:
        call(*args)
    assert isinstance(info.value, CryptographyUnsupported)
    assert isinstance(info.value, SigndError)
    assert says in str(info.value), str(info.value)


ON_TOKEN = "the private key stays on the token"
NO_ENCRYPTION = (
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption(),
)


def test_ec_refuses_what_signd_cannot_do(client: Client, key_names: dict[str, str]) -> None:
    key = client.private_key(key_names["ec-p256"])
    assert isinstance(key, SigndEllipticCurvePrivateKey)
    data = b"x"
    refused(key.sign, data, ec.ECDSA(hashes.SHA1()), says="sha256, sha384 or sha512, not sha1")
    refused(key.sign, data, ec.ECDSA(hashes.SHA3_256()), says="not sha3-256")
    refused(key.sign, bytes(28), ec.ECDSA(Prehashed(hashes.SHA224())), says="not sha224")
    refused(
        key.sign, data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True), says="random nonce"
    )
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    refused(key.exchange, ec.ECDH(), peer, says=ON_TOKEN)
    refused(key.private_numbers, says=ON_TOKEN)
    refused(key.private_bytes, *NO_ENCRYPTION, says=ON_TOKEN)
    with pytest.raises(ValueError, match="digest is 32 bytes, got 31"):
        key.sign(bytes(31), ec.ECDSA(Prehashed(hashes.SHA256())))


def test_rsa_refuses_what_signd_cannot_do(client: Client, key_names: dict[str, str]) -> None:
    key = client.private_key(key_names["rsa-2048"])
    assert isinstance(key, SigndRSAPrivateKey)
    data, sha256 = b"x", hashes.SHA256()
    mgf = padding.MGF1(sha256)
    refused(key.sign, data, padding.PKCS1v15(), hashes.SHA1(), says="not sha1")
    pss_only = "salt as long as the digest"
    refused(
        key.sign,
        *(data, padding.PSS(mgf=mgf, salt_length=padding.PSS.MAX_LENGTH), sha256),
        says=f"{pss_only}: padding.PSS(mgf=padding.MGF1(hashes.SHA256()), "
        "salt_length=padding.PSS.DIGEST_LENGTH) (or 32); got PSS.MAX_LENGTH (222 bytes)",
    )
    refused(key.sign, data, padding.PSS(mgf=mgf, salt_length=padding.PSS.AUTO), sha256, says="AUTO")
    refused(key.sign, data, padding.PSS(mgf=mgf, salt_length=20), sha256, says="salt_length=20")
    refused(
        key.sign,
        *(data, padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=32), sha256),
        says="got MGF1 with sha512",
    )
    oaep = padding.OAEP(mgf=mgf, algorithm=sha256, label=None)
    refused(key.sign, data, oaep, sha256, says="PKCS1v15() or padding.PSS(...), not OAEP")
    refused(key.sign, data, padding.PKCS1v15(), NoDigestInfo(), says="NoDigestInfo")
    refused(key.decrypt, b"ciphertext", oaep, says=ON_TOKEN)
    refused(key.private_numbers, says=ON_TOKEN)
    refused(key.private_bytes, *NO_ENCRYPTION, says=ON_TOKEN)


def test_ed25519_refuses_private_bytes(client: Client, key_names: dict[str, str]) -> None:
    key = client.private_key(key_names["ed25519"])
    assert isinstance(key, SigndEd25519PrivateKey)
    refused(key.private_bytes, *NO_ENCRYPTION, says=ON_TOKEN)
    refused(key.private_bytes_raw, says=ON_TOKEN)


@pytest.mark.parametrize("key_type", TYPES)
def test_key_object_interface(client: Client, key_names: dict[str, str], key_type: str) -> None:
    name = key_names[key_type]
    key = client.private_key(name)
    assert type(key) is CLASSES[key_type]
    assert isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    )
    assert (key.client, key.name, key.version, key.key_type, key.pinned) == (
        client,
        name,
        1,
        key_type,
        False,
    )
    assert copy.copy(key) is key
    assert copy.deepcopy(key) is key
    assert key.public_key() is key.public_key()  # loaded once
    answer = client.public_key(name, 1)
    assert key.public_key() == serialization.load_pem_public_key(answer.public_key_pem.encode())
    if isinstance(key, SigndEllipticCurvePrivateKey):
        curve = ec.SECP384R1 if key_type == "ec-p384" else ec.SECP256R1
        assert isinstance(key.curve, curve)
        assert key.key_size == key.curve.key_size
    elif isinstance(key, SigndRSAPrivateKey):
        assert key.key_size == 2048
    pinned = load_private_key(client, name, 1)
    assert (pinned.version, pinned.pinned) == (1, True)
    assert f"{name!r} version 1 ({key_type}, pinned)" in repr(pinned)


def test_unknown_key(client: Client) -> None:
    with pytest.raises(KeyNotFound):
        client.private_key(f"no-such-key-{uuid.uuid4().hex[:8]}")


def test_rotation_keeps_the_bound_version(client: Client, key_name: str, tmp_path: Path) -> None:
    client.create_key(key_name, "ec-p256")
    key = client.private_key(key_name)
    pinned = client.private_key(key_name, 1)
    assert isinstance(key, SigndEllipticCurvePrivateKey)
    assert isinstance(pinned, SigndEllipticCurvePrivateKey)
    old_public = key.public_key()
    data, ecdsa = b"before and after", ec.ECDSA(hashes.SHA256())
    old_public.verify(key.sign(data, ecdsa), data, ecdsa)

    client.rotate(key_name)
    for obj in (key, pinned):
        assert obj.version == 1
        assert obj.public_key() == old_public
        with pytest.raises(VersionNotUsable, match=r"signs only with version 1; call \.latest\(\)"):
            obj.sign(data, ecdsa)

    new = key.latest()
    assert isinstance(new, SigndEllipticCurvePrivateKey)
    assert (new.version, new.pinned, new.name) == (2, False, key_name)
    assert new.public_key() != old_public
    sig = new.sign(data, ecdsa)
    new.public_key().verify(sig, data, ecdsa)
    with pytest.raises(InvalidSignature):
        old_public.verify(sig, data, ecdsa)
    # A certificate made through the new object carries the new public key.
    ca = self_signed_ca(new)
    assert ca.public_key() == new.public_key()
    ca_pem = pem(tmp_path / "ca.pem", ca)
    rc, out = openssl("verify", "-CAfile", ca_pem, ca_pem)
    assert rc == 0, out


async def test_async_private_key(signd: Daemon, key_names: dict[str, str]) -> None:
    name = key_names["ed25519"]
    async with AsyncClient(signd.socket) as c:
        key = await c.private_key(name)
        assert isinstance(key, AsyncSigndPrivateKey)
        assert (key.client, key.name, key.version, key.key_type, key.pinned) == (
            c,
            name,
            1,
            "ed25519",
            False,
        )
        public = key.public_key()
        assert isinstance(public, ed25519.Ed25519PublicKey)
        result = await c.sign(key.name, b"async", version=key.version)
        public.verify(result.signature, b"async")
        pinned = await c.private_key(name, 1)
        assert pinned.pinned
        latest = await pinned.latest()
        assert (latest.version, latest.pinned) == (1, False)
        assert copy.copy(key) is key
