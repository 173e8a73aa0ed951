"""Conformance: the same checks against two independent PKCS#11 implementations.

Each token gets a real daemon: SoftHSM 2 (the session's token) and
opencryptoki's software token (``opencryptoki-init.sh``, served by
``pkcsslotd``; it needs root).  For every key type the token can make, a key
is created, signs (message and digest, each padding or format) with every
signature checked by ``cryptography`` and by the ``openssl`` CLI, signs in a
batch, verifies, rotates, is disabled, enabled and partly destroyed, and
survives a restart of the daemon.  A type the token cannot make (health's
``token.key_types``, read from its mechanisms) is skipped with the daemon's
reason; that the daemon refuses it cleanly is shown on opencryptoki, whose
soft token (3.8) makes RSA keys only.

RSA keys are slow to make, so each token makes one key per type for the whole
module (plus one rotation).

Backups (issue 15) need a trusted AES wrap key; opencryptoki's soft token
cannot hold one (no ``CKA_TRUSTED`` on secret keys, no AES key wrap), and the
tests below show that ``signd wrap-key create`` and ``create_key`` with
``backup`` refuse cleanly there, leaving nothing behind.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, utils
from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding

from signd_client import Client
from signd_client.errors import (
    DeletionNotAllowed,
    ErrorCode,
    InvalidArgument,
    KeyNotFound,
    UnsupportedAlgorithm,
    VersionNotUsable,
)
from signd_client.protocol import Jwk, TokenStatus

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv

TOKENS = ("softhsm", "opencryptoki")
KEY_TYPES = ("ec-p256", "ec-p384", "ed25519", "rsa-2048", "rsa-3072", "rsa-4096", "ec-secp256k1")
#: what each token's health must say it makes (read from its mechanisms)
EXPECTED_TYPES = {
    "softhsm": KEY_TYPES,  # SoftHSM 2.6
    "opencryptoki": ("rsa-2048", "rsa-3072", "rsa-4096"),  # the soft token of 3.8: no EC
}
EXPECTED_PROFILE = {"softhsm": "softhsm", "opencryptoki": "generic"}

each_token = pytest.mark.parametrize("token", TOKENS)
each_type = pytest.mark.parametrize("kt", KEY_TYPES)

HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}
DEFAULT_HASH = {"ec-p384": "sha384"}  # every other type hashes with SHA-256 (ed25519: none)

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

#: curve orders (SEC 2), for the low-S check
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
P384_ORDER = int(
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
    16,
)
K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def family(kt: str) -> str:
    return kt.split("-")[0]


class Opts(TypedDict, total=False):
    """Signature options of a request."""

    padding: str
    format: str


def variants(kt: str) -> list[Opts]:
    """The signature options of a key type: every padding or format."""
    if kt == "ec-secp256k1":
        return [Opts(format="der"), Opts(format="raw"), Opts(format="eth")]
    if family(kt) == "ec":
        return [Opts(format="der"), Opts(format="raw")]
    if family(kt) == "rsa":
        return [Opts(padding="pkcs1v15"), Opts(padding="pss")]
    return [Opts()]


# --------------------------------------------------------------------------
# independent verifiers


def load_public(pem: str) -> PublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey)
    return key


def check_type(kt: str, key: PublicKey) -> None:
    """The public key is of the type the daemon says."""
    if kt == "ed25519":
        assert isinstance(key, ed25519.Ed25519PublicKey)
    elif family(kt) == "ec":
        assert isinstance(key, ec.EllipticCurvePublicKey)
        curves = {"ec-p256": "secp256r1", "ec-p384": "secp384r1", "ec-secp256k1": "secp256k1"}
        assert key.curve.name == curves[kt]
    else:
        assert isinstance(key, rsa.RSAPublicKey)
        assert key.key_size == int(kt.split("-")[1])


def check_signature(
    kt: str,
    pem: str,
    sig: bytes,
    *,
    message: bytes | None = None,
    digest: bytes | None = None,
    hash: str | None = None,
    padding: str | None = None,
    format: str | None = None,
) -> None:
    """Verify with ``cryptography``.  Raises InvalidSignature."""
    key = load_public(pem)
    if isinstance(key, ed25519.Ed25519PublicKey):
        assert message is not None
        key.verify(sig, message)
        return
    h = HASHES[hash or DEFAULT_HASH.get(kt, "sha256")]
    algo: hashes.HashAlgorithm | utils.Prehashed = h
    if digest is None:
        assert message is not None
        data = message
    else:
        data, algo = digest, utils.Prehashed(h)
    if isinstance(key, ec.EllipticCurvePublicKey):
        if format in ("raw", "eth"):  # eth: r || s || v, v checked by test_secp256k1
            size = (key.curve.key_size + 7) // 8
            assert len(sig) == 2 * size + (format == "eth"), len(sig)
            r, s = int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size : 2 * size], "big")
            sig = utils.encode_dss_signature(r, s)
        # every ECDSA signature signd returns is low-S
        order = {"secp256r1": P256_ORDER, "secp384r1": P384_ORDER, "secp256k1": K1_ORDER}
        assert utils.decode_dss_signature(sig)[1] <= order[key.curve.name] // 2
        key.verify(sig, data, ec.ECDSA(algo))
        return
    pad: rsa_padding.AsymmetricPadding = rsa_padding.PKCS1v15()
    if padding == "pss":  # signd's PSS: MGF1 with the same hash, salt = digest size
        pad = rsa_padding.PSS(mgf=rsa_padding.MGF1(h), salt_length=h.digest_size)
    key.verify(sig, data, pad, algo)


def openssl_verify(
    tmp_path: Path, kt: str, pem: str, sig: bytes, message: bytes, padding: str | None = None
) -> None:
    """Verify a signature over ``message`` with the ``openssl`` CLI (DER ECDSA,
    RSA PKCS#1 v1.5 and PSS, Ed25519)."""
    files = {"pub.pem": pem.encode(), "sig.bin": sig, "msg.bin": message}
    for fname, data in files.items():
        (tmp_path / fname).write_bytes(data)
    pub, sigf, msg = (str(tmp_path / f) for f in files)
    if kt == "ed25519":
        cmd = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", pub, "-rawin"]
        cmd += ["-in", msg, "-sigfile", sigf]
    else:
        cmd = ["openssl", "dgst", f"-{DEFAULT_HASH.get(kt, 'sha256')}", "-verify", pub]
        if padding == "pss":
            cmd += ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"]
        cmd += ["-signature", sigf, msg]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, (cmd, out.stdout, out.stderr)
    assert "Verified Successfully" in out.stdout or "Verified OK" in out.stdout, out.stdout


def check_jwk(kt: str, jwk: Jwk, key: PublicKey) -> None:
    """A JWK carries exactly ``key``'s material."""

    def b64(n: int, size: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()

    assert jwk.use == "sig"
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert (jwk.kty, jwk.crv, jwk.alg) == ("OKP", "Ed25519", "EdDSA")
        assert jwk.x == b64(int.from_bytes(raw, "big"), 32)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        size = (key.curve.key_size + 7) // 8
        nums = key.public_numbers()
        crv, alg = {
            "ec-p256": ("P-256", "ES256"),
            "ec-p384": ("P-384", "ES384"),
            "ec-secp256k1": ("secp256k1", "ES256K"),
        }[kt]
        assert (jwk.kty, jwk.crv, jwk.alg) == ("EC", crv, alg)
        assert (jwk.x, jwk.y) == (b64(nums.x, size), b64(nums.y, size))
    else:
        rnums = key.public_numbers()
        assert jwk.kty == "RSA"
        assert jwk.n == b64(rnums.n, (rnums.n.bit_length() + 7) // 8)
        assert jwk.e == b64(rnums.e, (rnums.e.bit_length() + 7) // 8)


# --------------------------------------------------------------------------
# one daemon per token, one key per type


@dataclass
class Target:
    """A running daemon on one token, and the keys this module made on it."""

    token: str
    daemon: Daemon
    status: TokenStatus
    keys: dict[str, str] = field(default_factory=dict)  # key type -> key name
    refusals: dict[str, str] = field(default_factory=dict)  # key type -> why not

    def client(self) -> Client:
        return self.daemon.client(timeout=120.0)  # RSA-4096 keygen takes its time

    def can_make(self, kt: str) -> bool:
        assert self.status.key_types is not None
        return kt in self.status.key_types

    def refusal(self, kt: str) -> str:
        """The daemon's own reason for not making ``kt`` keys."""
        if kt not in self.refusals:
            with self.client() as c, pytest.raises(UnsupportedAlgorithm) as info:
                c.create_key(f"conf-refused-{uuid.uuid4().hex[:8]}", kt)
            self.refusals[kt] = info.value.message
        return self.refusals[kt]

    def key(self, kt: str) -> str:
        """This token's ``kt`` key, made on first use; skips a type the token
        cannot make, with the reason."""
        if not self.can_make(kt):
            pytest.skip(f"{self.token} cannot make {kt}: {self.refusal(kt)}")
        if kt not in self.keys:
            name = f"conf-{kt}-{uuid.uuid4().hex[:8]}"
            with self.client() as c:
                info = c.create_key(name, kt)
            assert (info.name, info.type, info.current_version) == (name, kt, 1)
            self.keys[kt] = name
        return self.keys[kt]


@pytest.fixture(scope="module")
def targets(module_daemon: Callable[..., Daemon]) -> Iterator[dict[str, Target]]:
    made: dict[str, Target] = {}
    yield made
    for t in made.values():
        assert t.daemon.stop() == 0, t.daemon.logs()


@pytest.fixture
def target(
    request: pytest.FixtureRequest,
    token: str,
    targets: dict[str, Target],
    module_daemon: Callable[..., Daemon],
) -> Target:
    """The daemon on ``token`` (started once per module)."""
    if token not in targets:
        env: TokenEnv = request.getfixturevalue(
            {"softhsm": "token_env", "opencryptoki": "ock_token"}[token]
        )
        d = module_daemon(env)
        with d.client(timeout=60.0) as c:
            status = c.health().token
        assert status is not None
        targets[token] = Target(token, d, status)
    return targets[token]


@pytest.fixture
def key(target: Target, kt: str) -> str:
    """The module's ``kt`` key on ``target`` (skipped if the token cannot make it)."""
    return target.key(kt)


def msg() -> bytes:
    return f"conformance {uuid.uuid4()}".encode()


# --------------------------------------------------------------------------
# capabilities


@each_token
def test_health_lists_the_tokens_capabilities(target: Target) -> None:
    status = target.status
    assert status.logged_in
    assert status.profile == EXPECTED_PROFILE[target.token]
    assert status.key_types == EXPECTED_TYPES[target.token]
    assert status.mechanisms, "no mechanisms read from the token"
    assert list(status.mechanisms) == sorted(set(status.mechanisms))
    assert all(m.startswith("CKM_") for m in status.mechanisms)
    assert {"CKM_RSA_PKCS", "CKM_RSA_PKCS_KEY_PAIR_GEN"} <= set(status.mechanisms)


@pytest.mark.parametrize("token", ["opencryptoki"])
def test_a_type_the_token_lacks_is_unsupported_algorithm(target: Target) -> None:
    """opencryptoki's soft token has no EC mechanisms: create_key of an EC or
    Ed25519 key is refused with unsupported_algorithm, naming what is missing
    and what it can make, and leaves nothing behind."""
    status = target.status
    assert status.profile == "generic"
    assert status.key_types == ("rsa-2048", "rsa-3072", "rsa-4096")
    assert status.mechanisms is not None
    with target.client() as c:
        for kt in ("ec-p256", "ec-p384", "ed25519", "ec-secp256k1"):
            name = f"conf-lacks-{kt}-{uuid.uuid4().hex[:8]}"
            with pytest.raises(UnsupportedAlgorithm) as info:
                c.create_key(name, kt)
            assert info.value.code == ErrorCode.UNSUPPORTED_ALGORITHM
            assert int(info.value.code) == 202
            text = info.value.message
            assert f"cannot make {kt} keys" in text, text
            missing = re.findall(r"CKM_\w+", text)
            assert missing, f"no mechanism named: {text}"
            assert not set(missing) & set(status.mechanisms), text
            assert text.endswith("it can make: rsa-2048, rsa-3072, rsa-4096"), text
            with pytest.raises(KeyNotFound):
                c.key_info(name)  # nothing was made
            assert name not in {k.name for k in c.list_keys().keys}
        # and the daemon is fine
        rsa_key = target.key("rsa-2048")
        m = msg()
        sig = c.sign(rsa_key, m)
        check_signature(
            "rsa-2048", c.public_key(rsa_key, sig.version).public_key_pem, sig.signature, message=m
        )


# --------------------------------------------------------------------------
# per key type


@each_type
@each_token
def test_key_info_public_key_and_jwks_agree(target: Target, kt: str, key: str) -> None:
    with target.client() as c:
        info = c.key_info(key)
        assert (info.name, info.type) == (key, kt)
        assert info.current_version == info.versions[-1].version
        assert key in {k.name for k in c.list_keys().keys}
        current = c.public_key(key)
        assert (current.name, current.type, current.version) == (key, kt, info.current_version)
        jwks = {j.kid: j for j in c.jwks([key]).keys}
        for v in info.versions:
            pk = c.public_key(key, v.version)
            assert (pk.version, pk.type, pk.public_key_pem) == (v.version, kt, v.public_key_pem)
            public = load_public(v.public_key_pem)
            check_type(kt, public)
            if v.state in ("active", "verify-only"):
                check_jwk(kt, jwks.pop(f"{key}:{v.version}"), public)
        assert not jwks, f"JWKs of no verifying version: {sorted(jwks)}"
    assert current.public_key_pem == info.versions[-1].public_key_pem


@each_type
@each_token
def test_sign_message_and_digest(target: Target, kt: str, key: str, tmp_path: Path) -> None:
    """Every padding or format, by message and by digest; checked by
    cryptography and (messages, DER) by openssl."""
    with target.client() as c:
        for opts in variants(kt):
            m = msg()
            res = c.sign(key, m, **opts)
            assert res.key == key
            pem = c.public_key(key, res.version).public_key_pem
            check_signature(kt, pem, res.signature, message=m, **opts)
            if opts.get("format") not in ("raw", "eth"):
                openssl_verify(tmp_path, kt, pem, res.signature, m, opts.get("padding"))
            if kt == "ed25519":
                continue  # pure Ed25519 signs the message itself
            hash_name = "sha384" if family(kt) == "rsa" else DEFAULT_HASH.get(kt, "sha256")
            digest = hashlib.new(hash_name, m).digest()
            res = c.sign(key, digest=digest, hash=hash_name, **opts)
            check_signature(kt, pem, res.signature, digest=digest, hash=hash_name, **opts)


@each_type
@each_token
def test_sign_batch(target: Target, kt: str, key: str) -> None:
    opts = variants(kt)[-1]  # pss, raw
    messages = [msg() for _ in range(3)]
    with target.client() as c:
        batch = c.sign_batch(key, messages, **opts)
        assert batch.key == key
        assert len(batch.results) == len(messages)
        pem = c.public_key(key, batch.version).public_key_pem
        for m, item in zip(messages, batch.results, strict=True):
            assert item.error is None, item
            assert item.signature is not None
            check_signature(kt, pem, item.signature, message=m, **opts)
        if kt == "ed25519":
            return
        hash_name = DEFAULT_HASH.get(kt, "sha256")
        digests = [hashlib.new(hash_name, m).digest() for m in messages]
        batch = c.sign_batch(key, digests=digests, hash=hash_name, **opts)
        for d, item in zip(digests, batch.results, strict=True):
            assert item.signature is not None, item
            check_signature(kt, pem, item.signature, digest=d, hash=hash_name, **opts)


@each_type
@each_token
def test_verify_valid_and_tampered(target: Target, kt: str, key: str) -> None:
    with target.client() as c:
        for opts in variants(kt):
            m = msg()
            sig = c.sign(key, m, **opts)
            ok = c.verify(key, sig.signature, m, **opts)
            assert (ok.valid, ok.key, ok.version, ok.algorithm) == (
                True,
                key,
                sig.version,
                sig.algorithm,
            )
            assert not c.verify(key, sig.signature, m + b"!", **opts).valid
            bad = bytearray(sig.signature)
            bad[len(bad) // 2] ^= 0x01
            assert not c.verify(key, bytes(bad), m, **opts).valid
            if kt != "ed25519":
                hash_name = DEFAULT_HASH.get(kt, "sha256")
                digest = hashlib.new(hash_name, m).digest()
                assert c.verify(key, sig.signature, digest=digest, hash=hash_name, **opts).valid
        if family(kt) == "rsa":  # a PSS signature is no PKCS#1 v1.5 one
            m = msg()
            pss = c.sign(key, m, padding="pss").signature
            assert not c.verify(key, pss, m, padding="pkcs1v15").valid


@each_type
@each_token
def test_rotate_disable_enable_destroy(target: Target, kt: str, key: str) -> None:
    """Rotation keeps the old version verifying; disable and enable toggle it;
    destroying it (once deletion is allowed) keeps its public key only."""
    with target.client() as c:
        before = c.key_info(key)
        old = before.current_version
        m_old = msg()
        sig_old = c.sign(key, m_old)
        assert sig_old.version == old

        info = c.rotate(key)
        new = old + 1
        assert (info.current_version, info.created_version) == (new, new)
        states = {v.version: v.state for v in info.versions}
        assert (states[old], states[new]) == ("verify-only", "active")
        old_pem = info.versions[-2].public_key_pem
        new_pem = info.versions[-1].public_key_pem
        assert old_pem == before.versions[-1].public_key_pem != new_pem
        check_type(kt, load_public(new_pem))

        # the old signature still verifies, by the daemon and independently
        assert c.verify(key, sig_old.signature, m_old).version == old
        check_signature(kt, old_pem, sig_old.signature, message=m_old)
        # the new version signs
        m_new = msg()
        sig_new = c.sign(key, m_new)
        assert sig_new.version == new
        check_signature(kt, new_pem, sig_new.signature, message=m_new)

        info = c.disable(key, old)
        assert {v.version: v.state for v in info.versions}[old] == "disabled"
        assert not c.verify(key, sig_old.signature, m_old).valid
        with pytest.raises(VersionNotUsable):
            c.verify(key, sig_old.signature, m_old, version=old)
        with pytest.raises(VersionNotUsable):
            c.sign(key, msg(), version=old)
        assert c.verify(key, sig_new.signature, m_new).valid

        info = c.enable(key, old)
        assert {v.version: v.state for v in info.versions}[old] == "verify-only"
        assert c.verify(key, sig_old.signature, m_old).version == old

        with pytest.raises(DeletionNotAllowed):
            c.destroy(key, old)
        assert c.update_key(key, deletion_allowed=True).deletion_allowed is True
        info = c.destroy(key, old)
        gone = {v.version: v for v in info.versions}[old]
        assert gone.state == "destroyed"
        assert gone.public_key_pem == old_pem  # the public key is kept
        assert not c.verify(key, sig_old.signature, m_old).valid
        with pytest.raises(VersionNotUsable):
            c.sign(key, msg(), version=old)
        assert c.sign(key, m_new).version == new
        assert [j.kid for j in c.jwks([key]).keys] == [f"{key}:{new}"]


@each_token
def test_restart_keeps_every_key_and_version(target: Target) -> None:
    """The records live on the token: a new daemon process finds every key,
    version, state and setting, and the keys still sign."""
    assert target.status.key_types is not None
    names = {kt: target.key(kt) for kt in target.status.key_types}
    with target.client() as c:
        before = {name: c.key_info(name) for name in names.values()}
        signed: dict[str, tuple[bytes, Any]] = {}
        for name in names.values():
            m = msg()
            signed[name] = (m, c.sign(name, m))
    target.daemon.restart()
    with target.client() as c:
        assert c.health().token == target.status
        listed = {k.name for k in c.list_keys().keys}
        for kt, name in names.items():
            assert name in listed
            assert c.key_info(name) == before[name]
            m, sig = signed[name]
            assert c.verify(name, sig.signature, m).version == sig.version
            m = msg()
            res = c.sign(name, m)
            assert res.version == before[name].current_version
            check_signature(kt, c.public_key(name).public_key_pem, res.signature, message=m)


# --------------------------------------------------------------------------
# backups (issue 15): a token that cannot hold the trusted wrap key

#: the wrap key's label (token/wrapping.py WRAP_KEY_LABEL; not imported: the
#: test process loads no PKCS#11 module)
WRAP_LABEL = "signd-wrap"

#: Counts the objects of class argv[3] labelled argv[4] that a session without
#: a login sees: public objects only, as signd's wrap key (the SO cannot make
#: private objects) and its public keys are.
_COUNT_OBJECTS = """
import sys
import pkcs11
from pkcs11 import Attribute, ObjectClass
module, token_label, cls, label = sys.argv[1:5]
token = pkcs11.lib(module).get_token(token_label=token_label)
with token.open() as session:
    found = session.get_objects({Attribute.CLASS: ObjectClass[cls], Attribute.LABEL: label})
    print(len(list(found)))
"""


def public_objects(target: Target, cls: str, label: str) -> int:
    """How many public objects of class ``cls`` (``SECRET_KEY``, ``PUBLIC_KEY``)
    labelled ``label`` the token holds; searched in a child process, without
    a login (the test process loads no PKCS#11 module)."""
    env = target.daemon.token
    out = subprocess.run(
        [sys.executable, "-c", _COUNT_OBJECTS, env.module, env.label, cls, label],
        capture_output=True,
        text=True,
        env=env.env(),
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.parametrize("token", ["opencryptoki"])
def test_wrap_key_create_fails_cleanly_without_trusted_keys(target: Target) -> None:
    """opencryptoki's soft token (3.8.1) refuses a secret key with CKA_TRUSTED
    (TemplateInconsistent) or CKA_COPYABLE (AttributeTypeInvalid; the wrap
    key's whole template gets this answer), measured in an SO session.  So
    ``signd wrap-key create`` (as the SO, the daemon serving meanwhile) exits
    1 naming the token's refusal, prints no share and no check value, and
    leaves no key labelled ``signd-wrap``."""
    env = target.daemon.token
    so_pin = env.state_dir / "so.pin"
    assert so_pin.is_file(), f"opencryptoki-init.sh wrote no SO PIN file in {env.state_dir}"
    assert public_objects(target, "SECRET_KEY", WRAP_LABEL) == 0
    out = subprocess.run(
        [
            *(sys.executable, "-m", "signd", "wrap-key", "create"),
            *("--config", str(target.daemon.config), "--so-pin-file", str(so_pin)),
            *("--shares", "3", "--threshold", "2"),
        ],
        capture_output=True,
        text=True,
        env=env.env(),
        timeout=120,
        check=False,
    )
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert out.stdout == ""  # no share, no check value
    assert out.stderr.startswith("signd wrap-key: the token refused the wrap key"), out.stderr
    assert re.search(r": (AttributeTypeInvalid|TemplateInconsistent)\n\Z", out.stderr), out.stderr
    assert "PIN" not in out.stderr, out.stderr  # the SO login itself worked
    assert public_objects(target, "SECRET_KEY", WRAP_LABEL) == 0
    with target.client() as c:  # the daemon goes on serving
        assert c.health().token == target.status


@pytest.mark.parametrize("token", ["opencryptoki"])
def test_create_key_with_backup_needs_a_wrap_key(target: Target) -> None:
    """Without a wrap key ``create_key`` with ``backup`` is invalid_argument
    (200) naming the missing wrap key and the command that makes one,
    before a key pair is generated (no public key labelled ``NAME/v1`` on the
    token); the name stays free, and a key without backup is made under it."""
    name = f"conf-backup-{uuid.uuid4().hex[:8]}"
    with target.client() as c:
        with pytest.raises(InvalidArgument) as info:
            c.create_key(name, "rsa-2048", backup=True)
        assert info.value.code == ErrorCode.INVALID_ARGUMENT
        assert int(info.value.code) == 200
        text = info.value.message
        assert "backup needs a wrap key on the token" in text, text
        assert "signd wrap-key create" in text, text
        with pytest.raises(KeyNotFound):
            c.key_info(name)
        assert name not in {k.name for k in c.list_keys().keys}
        assert public_objects(target, "PUBLIC_KEY", f"{name}/v1") == 0  # none made
        made = c.create_key(name, "rsa-2048")
        assert (made.name, made.current_version, made.backup) == (name, 1, None)
        assert public_objects(target, "PUBLIC_KEY", f"{name}/v1") == 1  # the search sees them
        m = msg()
        sig = c.sign(name, m)
        check_signature(
            "rsa-2048", c.public_key(name, sig.version).public_key_pem, sig.signature, message=m
        )
