"""Bring your own key (issue 16): ``import_params``, ``import_key`` and
``signctl import``, on real SoftHSM tokens through a real daemon, and the
token layer (``TokenSession.import_public``/``import_keypair``) on a token
of its own.

Every bad input is refused with a clear error, and the token's objects are
listed before and after (in a child process, as a new process sees the
token): nothing is left behind.  As in ``test_backup_token.py``, the token
steps run in child processes: this file run as a script (``python
test_import.py STEP``, JSON in on stdin and out on stdout).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from signd_client import Client
from signd_client.errors import (
    InvalidArgument,
    KeyExists,
    PermissionDenied,
    UnsupportedAlgorithm,
)
from signd_client.importing import WrappedMaterial, read_material, wrap_for_import
from signd_client.protocol import IMPORT_ALGORITHM
from support import run_step
from test_wrapkey import create

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv

IMPORT_LABEL = "signd-import"  # token/importing.py's IMPORT_KEY_LABEL
#: keys with this prefix: uid 0 may create and read them, not import
NO_IMPORT = "noimp-"


def step(token: TokenEnv, name: str, **args: Any) -> dict[str, Any]:
    """Run this file's step ``name`` in a child process on ``token``."""
    return run_step(__file__, token, name, **args)


def flip(blob: bytes, at: int | None = None) -> bytes:
    """``blob`` with one bit of one byte (its middle byte by default) flipped."""
    out = bytearray(blob)
    out[len(out) // 2 if at is None else at] ^= 0x01
    return bytes(out)


def spki(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def imp(
    new_softhsm_token: Callable[[str], TokenEnv], module_daemon: Callable[..., Daemon]
) -> Daemon:
    """A daemon on a token of its own, with a wrap key (for backup-able
    imports) and rules: uid 0 may do everything to every ``imp-`` key, and
    only create and read the ``noimp-`` keys."""
    token = new_softhsm_token("signd-imp")
    create(token, 2, 2)
    access = (
        "[access]\ntrust_root = false\n\n"
        '[[access.rules]]\nkeys = ["imp-*"]\noperations = ["*"]\nuids = [0]\n\n'
        f'[[access.rules]]\nkeys = ["{NO_IMPORT}*"]\noperations = ["create", "read"]\n'
        "uids = [0]\n"
    )
    return module_daemon(token, access)


@pytest.fixture
def name() -> str:
    return f"imp-{uuid.uuid4().hex[:10]}"


def objects(d: Daemon) -> list[list[str]]:
    """Every object on the daemon's token: class, label, id."""
    found: list[list[str]] = step(d.token, "objects")["objects"]
    return found


def verify_ecdsa(pem_or_key: Any, sig: bytes, msg: bytes, h: hashes.HashAlgorithm) -> None:
    pub = pem_or_key
    if isinstance(pem_or_key, str):
        pub = serialization.load_pem_public_key(pem_or_key.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, msg, ec.ECDSA(h))


# --- the import key -------------------------------------------------------------


def test_import_params_answers_the_tokens_rsa_3072_import_key(imp: Daemon, name: str) -> None:
    with imp.client(timeout=60.0) as c:
        first = c.import_params(name)
        again = c.import_params(name + "-other")
    assert first == again
    assert first.algorithm == IMPORT_ALGORITHM == "rsa-oaep-sha1+aes-kwp"
    assert first.import_key_id == hashlib.sha256(first.public_key).hexdigest()
    key = serialization.load_der_public_key(first.public_key)
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 3072
    found = step(imp.token, "import_key_attributes")
    assert found == {
        "private": [
            {
                "UNWRAP": True,
                "DECRYPT": False,
                "SIGN": False,
                "SENSITIVE": True,
                "EXTRACTABLE": False,
                "PRIVATE": True,
                "TOKEN": True,
                "value": "AttributeSensitive",
            }
        ],
        "public": [first.public_key.hex()],
    }


# --- keys imported, signatures verified -----------------------------------------


def test_a_pem_p256_key_imported_with_signctl_signs(imp: Daemon, name: str, tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # "EC PRIVATE KEY"
        serialization.NoEncryption(),
    )
    (tmp_path / "key.pem").write_bytes(pem)
    with imp.client() as c:
        params = c.import_params(name)
    out = imp.signctl(
        "import",
        name,
        "--type",
        "ec-p256",
        "--in",
        str(tmp_path / "key.pem"),
        "--expect-import-key",
        params.import_key_id,
    )
    assert out.returncode == 0, out.stderr
    assert f"as {name} version 1" in out.stdout.decode()
    with imp.client() as c:
        info = c.key_info(name)
        msg = b"signed by an imported key"
        sig = c.sign(name, msg).signature
    assert serialization.load_pem_public_key(info.versions[0].public_key_pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == spki(private)
    verify_ecdsa(private.public_key(), sig, msg, hashes.SHA256())
    # a stdin import, and an import key that is not the expected one: nothing sent
    wrong = imp.signctl(
        "import",
        name + "x",
        "--type",
        "ec-p256",
        "--in",
        "-",
        "--expect-import-key",
        "00" * 32,
        input=pem,
    )
    assert wrong.returncode == 2
    assert b"nothing was sent" in wrong.stderr


def test_an_ethereum_private_key_imported_as_secp256k1(
    imp: Daemon, name: str, tmp_path: Path
) -> None:
    """A hex Ethereum private key (0x...) through signctl: key_info's address is
    eth-account's for it, and an eth-format signature recovers to it."""
    from eth_account import Account
    from eth_keys import keys as eth_keys

    account = Account.create()
    hexkey = "0x" + bytes(account.key).hex()
    (tmp_path / "eth.key").write_text(hexkey + "\n")
    out = imp.signctl("import", name, "--type", "ec-secp256k1", "--in", str(tmp_path / "eth.key"))
    assert out.returncode == 0, out.stderr
    with imp.client() as c:
        info = c.key_info(name)
        assert info.type == "ec-secp256k1"
        assert info.versions[0].eth_address == Account.from_key(hexkey).address
        assert info.versions[0].eth_address == account.address
        signable = hashlib.sha256(b"any 32 bytes").digest()
        sig = c.sign(name, digest=signable, hash="sha256", format="eth").signature
    assert len(sig) == 65
    recovered = eth_keys.Signature(sig).recover_public_key_from_msg_hash(signable)
    assert recovered.to_checksum_address() == account.address


def test_an_hmac_secret_imported_macs_as_pythons_hmac_and_cannot_be_read(
    imp: Daemon, name: str, tmp_path: Path
) -> None:
    """An exchange's API secret through signctl (the file's bytes as they
    are): 1,000 random messages give exactly Python's HMAC-SHA256 with it;
    verify accepts them; the token answers AttributeSensitive for CKA_VALUE."""
    secret = secrets.token_bytes(32)
    (tmp_path / "api.secret").write_bytes(secret)
    out = imp.signctl("import", name, "--type", "hmac-sha256", "--in", str(tmp_path / "api.secret"))
    assert out.returncode == 0, out.stderr
    messages = [secrets.token_bytes(secrets.randbelow(200)) for _ in range(1000)]
    with imp.client(timeout=60.0) as c:
        batch = c.sign_batch(name, messages)
        assert [item.signature for item in batch.results] == [
            hmac.new(secret, m, hashlib.sha256).digest() for m in messages
        ]
        mac = hmac.new(secret, b"webhook body", hashlib.sha256).digest()
        assert c.verify(name, mac, b"webhook body").valid
        assert not c.verify(name, flip(mac), b"webhook body").valid
        # a public key sent with a secret: refused, nothing made
        wrapped = wrap_for_import(c.import_params(name), secrets.token_bytes(32))
        bogus = WrappedMaterial(
            wrapped.import_key_id, wrapped.wrapped_key, wrapped.wrapped_material, b"\x30\x00"
        )
        before = objects(imp)
        with pytest.raises(InvalidArgument, match="secret has no public key"):
            c.import_key(name + "-2", "hmac-sha256", bogus)
        assert objects(imp) == before
    found = step(imp.token, "secret_attributes", label_prefix=name)["keys"]
    assert found == [
        {
            "SIGN": True,
            "VERIFY": True,
            "ENCRYPT": False,
            "DECRYPT": False,
            "SENSITIVE": True,
            "EXTRACTABLE": False,
            "value": "AttributeSensitive",
        }
    ]


@pytest.mark.parametrize(
    ("key_type", "make", "h"),
    [
        ("ec-p384", lambda: ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()),
        ("rsa-2048", lambda: rsa.generate_private_key(65537, 2048), hashes.SHA256()),
    ],
)
def test_pkcs8_keys_imported_through_the_client_sign(
    imp: Daemon, name: str, key_type: str, make: Callable[[], Any], h: hashes.HashAlgorithm
) -> None:
    private = make()
    der = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    material = read_material(key_type, der)
    msg = b"message for " + key_type.encode()
    with imp.client(timeout=60.0) as c:
        wrapped = wrap_for_import(c.import_params(name), material)
        info = c.import_key(name, key_type, wrapped)
        assert info.created_version == 1
        assert info.type == key_type
        sig = c.sign(name, msg).signature
        if key_type.startswith("rsa"):
            pss = c.sign(name, msg, padding="pss").signature
    if key_type.startswith("rsa"):
        private.public_key().verify(sig, msg, padding.PKCS1v15(), h)
        private.public_key().verify(
            pss, msg, padding.PSS(padding.MGF1(h), padding.PSS.DIGEST_LENGTH), h
        )
    else:
        verify_ecdsa(private.public_key(), sig, msg, h)


def test_a_key_imported_as_a_new_version(imp: Daemon, name: str, tmp_path: Path) -> None:
    """Version 1 generated, version 2 imported (a rotation to it), version 3
    generated again by rotate: each signs with its own key."""
    with imp.client() as c:
        c.create_key(name, "ec-p256", verify_grace=3600)
    private = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "v2.pem").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    args = ("import", name, "--type", "ec-p256", "--in", str(tmp_path / "v2.pem"))
    out = imp.signctl("--json", *args, "--new-version")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["created_version"] == 2
    with imp.client() as c:
        sig = c.sign(name, b"v2").signature
        assert c.verify(name, sig, b"v2").version == 2
        assert c.rotate(name).current_version == 3
    verify_ecdsa(private.public_key(), sig, b"v2", hashes.SHA256())
    # a new version takes its key's settings; and is of its key's type
    refused = imp.signctl(*args, "--new-version", "--verify-grace", "60")
    assert refused.returncode == 2
    assert b"takes the key's settings" in refused.stderr
    with imp.client() as c:
        other = ec.generate_private_key(ec.SECP384R1())
        wrapped = wrap_for_import(c.import_params(name), other)
        before = objects(imp)
        with pytest.raises(InvalidArgument, match="is ec-p256, not ec-p384"):
            c.import_key(name, "ec-p384", wrapped, new_version=True)
    assert objects(imp) == before


def test_a_backup_able_import_is_in_a_backup(imp: Daemon, name: str) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    with imp.client() as c:
        info = c.import_key(
            name, "ec-p256", wrap_for_import(c.import_params(name), private), backup=True
        )
        assert info.backup is True
        result = c.backup([name])
        assert result.keys == (name,)
        assert result.versions == 1
        sig = c.sign(name, b"m").signature
    verify_ecdsa(private.public_key(), sig, b"m", hashes.SHA256())
    attrs = step(imp.token, "private_attributes", label_prefix=name)["keys"]
    assert attrs == [
        {
            "SENSITIVE": True,
            "EXTRACTABLE": True,
            "WRAP_WITH_TRUSTED": True,
            "value": "AttributeSensitive",
        }
    ]


def test_an_imported_private_key_is_sensitive_and_never_extractable(imp: Daemon, name: str) -> None:
    with imp.client() as c:
        c.import_key(
            name,
            "ec-p256",
            wrap_for_import(c.import_params(name), ec.generate_private_key(ec.SECP256R1())),
        )
    attrs = step(imp.token, "private_attributes", label_prefix=name)["keys"]
    assert attrs == [
        {
            "SENSITIVE": True,
            "EXTRACTABLE": False,
            "WRAP_WITH_TRUSTED": False,
            "value": "AttributeSensitive",
        }
    ]


# --- idempotency -----------------------------------------------------------------


def test_an_import_repeated_under_its_idempotency_key_is_answered_again(
    imp: Daemon, name: str
) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    with imp.client() as c:
        wrapped = wrap_for_import(c.import_params(name), private)
        first = c.import_key(name, "ec-p256", wrapped, idempotency_key="imp-once")
        before = objects(imp)
        again = c.import_key(name, "ec-p256", wrapped, idempotency_key="imp-once")
        assert again.created_version == first.created_version == 1
        assert len(again.versions) == 1
        assert objects(imp) == before
        # the same idempotency key with other material: a reuse, refused
        other = wrap_for_import(c.import_params(name), ec.generate_private_key(ec.SECP256R1()))
        with pytest.raises(InvalidArgument, match="used with different parameters"):
            c.import_key(name, "ec-p256", other, idempotency_key="imp-once")
        # without it, the name is taken
        with pytest.raises(KeyExists):
            c.import_key(name, "ec-p256", wrapped)
        # a new version, repeated
        v2 = c.import_key(name, "ec-p256", other, new_version=True, idempotency_key="imp-v2")
        v2_again = c.import_key(name, "ec-p256", other, new_version=True, idempotency_key="imp-v2")
        assert v2.created_version == v2_again.created_version == 2
        assert v2_again.current_version == 2


# --- bad input: a clear error, nothing left on the token -------------------------


def _refused(
    imp: Daemon,
    c: Client,
    name: str,
    key_type: str,
    wrapped: WrappedMaterial,
    error: type[Exception],
    match: str,
) -> None:
    before = objects(imp)
    with pytest.raises(error, match=match):
        c.import_key(name, key_type, wrapped)
    assert objects(imp) == before
    with pytest.raises(Exception, match="no key named"):
        c.key_info(name)


def test_bad_input_is_refused_and_leaves_nothing(imp: Daemon, name: str) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    rsa_key = rsa.generate_private_key(65537, 2048)
    with imp.client(timeout=60.0) as c:
        params = c.import_params(name)
        good = wrap_for_import(params, p256)

        def replace(**kw: Any) -> WrappedMaterial:
            return WrappedMaterial(
                **{
                    "import_key_id": good.import_key_id,
                    "wrapped_key": good.wrapped_key,
                    "wrapped_material": good.wrapped_material,
                    "public_key": good.public_key,
                    **kw,
                }
            )

        # unknown type; a type that cannot be imported
        _refused(imp, c, name, "dsa-1024", good, UnsupportedAlgorithm, "unknown key type")
        _refused(imp, c, name, "ed25519", good, UnsupportedAlgorithm, "cannot be imported")
        # a P-384 key declared as P-256: its public key is refused...
        _refused(
            imp,
            c,
            name,
            "ec-p256",
            wrap_for_import(params, p384),
            InvalidArgument,
            "not a ec-p256 SubjectPublicKeyInfo",
        )
        # ...and so is its material under a P-256 public key (a lying client)
        lying = wrap_for_import(params, p384)
        _refused(
            imp,
            c,
            name,
            "ec-p256",
            replace(wrapped_material=lying.wrapped_material, wrapped_key=lying.wrapped_key),
            InvalidArgument,
            "another curve, not a ec-p256",
        )
        # an RSA key declared as EC
        as_rsa = wrap_for_import(params, rsa_key)
        _refused(
            imp,
            c,
            name,
            "ec-p256",
            replace(wrapped_key=as_rsa.wrapped_key, wrapped_material=as_rsa.wrapped_material),
            InvalidArgument,
            "not a ec-p256 private key",
        )
        # a key that does not match the public key sent with it
        other = wrap_for_import(params, ec.generate_private_key(ec.SECP256R1()))
        _refused(
            imp,
            c,
            name,
            "ec-p256",
            replace(public_key=other.public_key),
            InvalidArgument,
            "does not match its public key",
        )
        # a flipped byte in either layer
        _refused(
            imp,
            c,
            name,
            "ec-p256",
            replace(wrapped_key=flip(good.wrapped_key)),
            InvalidArgument,
            "wrapped_key does not decrypt under the import key",
        )
        for at in (0, None, -1):
            _refused(
                imp,
                c,
                name,
                "ec-p256",
                replace(wrapped_material=flip(good.wrapped_material, at)),
                InvalidArgument,
                "wrapped_material does not unwrap",
            )
        # garbage, properly wrapped: not a key at all
        transport = b"\x11" * 32
        pub = serialization.load_der_public_key(params.public_key)
        assert isinstance(pub, rsa.RSAPublicKey)
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
        garbage = replace(
            wrapped_key=pub.encrypt(transport, oaep),
            wrapped_material=keywrap.aes_key_wrap_with_padding(transport, b"not a key" * 7),
        )
        _refused(imp, c, name, "ec-p256", garbage, InvalidArgument, "not a ec-p256 private key")
        # another import key's id; no public key for an EC key
        _refused(
            imp,
            c,
            name,
            "ec-p256",
            replace(import_key_id="ab" * 32),
            InvalidArgument,
            "has no import key",
        )
        _refused(imp, c, name, "ec-p256", replace(public_key=None), InvalidArgument, "public_key")
        # and after all of that, the good one is imported
        assert c.import_key(name, "ec-p256", good).created_version == 1


def test_signctl_refuses_a_public_key_before_sending(
    imp: Daemon, name: str, tmp_path: Path
) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    for fmt, enc, fname in (
        (serialization.PublicFormat.SubjectPublicKeyInfo, serialization.Encoding.PEM, "pub.pem"),
        (serialization.PublicFormat.SubjectPublicKeyInfo, serialization.Encoding.DER, "pub.der"),
    ):
        (tmp_path / fname).write_bytes(private.public_key().public_bytes(enc, fmt))
        out = imp.signctl("import", name, "--type", "ec-p256", "--in", str(tmp_path / fname))
        assert out.returncode == 2
        err = out.stderr.decode()
        assert "holds a public key" in err
        assert "nothing was sent" in err
    # and a key of another type than declared, found before sending too
    (tmp_path / "p384.pem").write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    out = imp.signctl("import", name, "--type", "ec-p256", "--in", str(tmp_path / "p384.pem"))
    assert out.returncode == 2
    assert b"secp384r1, not a ec-p256 key" in out.stderr
    with imp.client() as c, pytest.raises(Exception, match="no key named"):
        c.key_info(name)


def test_read_material_takes_an_ethereum_key_as_hex_or_bytes() -> None:
    secret = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
    for data in (secret, secret.hex().encode(), b"0x" + secret.hex().encode() + b"\n"):
        key = read_material("ec-secp256k1", data)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.private_numbers().private_value == int.from_bytes(secret, "big")
    with pytest.raises(InvalidArgument, match="holds no private key"):
        read_material("ec-p256", secret)
    with pytest.raises(InvalidArgument, match="cannot be imported"):
        read_material("ed25519", secret)
    assert read_material("hmac-sha256", b"api secret") == b"api secret"


# --- access ---------------------------------------------------------------------


def test_import_needs_the_import_verb(imp: Daemon) -> None:
    """uid 0 may create the noimp- keys but not import them (nor ask for the
    import key for them); its import grant on imp-* keys does not reach them."""
    key = f"{NO_IMPORT}{uuid.uuid4().hex[:8]}"
    with imp.client() as c:
        with pytest.raises(PermissionDenied, match=f"may not import key {key!r}"):
            c.import_params(key)
        wrapped = wrap_for_import(c.import_params("imp-x"), ec.generate_private_key(ec.SECP256R1()))
        before = objects(imp)
        with pytest.raises(PermissionDenied, match=f"may not import key {key!r}"):
            c.import_key(key, "ec-p256", wrapped)
        assert objects(imp) == before
        assert c.create_key(key, "ec-p256").current_version == 1
        with pytest.raises(PermissionDenied, match="may not import"):
            c.import_key(key, "ec-p256", wrapped, new_version=True)


# --- the token layer, on a token of its own -------------------------------------


def test_token_import_keypair_leaves_nothing_on_a_failure(
    new_softhsm_token: Callable[[str], TokenEnv],
) -> None:
    token = new_softhsm_token("signd-imp-tok")
    params = step(token, "import_public")
    assert params == step(token, "import_public")  # made once
    private = ec.generate_private_key(ec.SECP256R1())
    pub_der = serialization.load_der_public_key(bytes.fromhex(params["spki"]))
    assert isinstance(pub_der, rsa.RSAPublicKey)
    from signd_client.protocol import ImportParamsResult

    wrapped = wrap_for_import(
        ImportParamsResult(
            algorithm=IMPORT_ALGORITHM,
            import_key_id=params["id"],
            public_key=bytes.fromhex(params["spki"]),
        ),
        private,
    )
    args = {
        "key_type": "ec-p256",
        "key_id": wrapped.import_key_id,
        "wrapped_key": wrapped.wrapped_key.hex(),
        "wrapped_material": wrapped.wrapped_material.hex(),
        "spki": (wrapped.public_key or b"").hex(),
    }
    before = step(token, "objects")
    bad = step(
        token,
        "import_keypair",
        **{**args, "wrapped_material": flip(wrapped.wrapped_material).hex()},
    )
    assert bad["error"] == "InvalidArgument"
    assert bad["left"] == 0
    assert step(token, "objects") == before
    ok = step(token, "import_keypair", **args)
    assert ok["spki"] == args["spki"]
    assert ok["private"] == {
        "SIGN": True,
        "DECRYPT": False,
        "UNWRAP": False,
        "SENSITIVE": True,
        "EXTRACTABLE": False,
        "LOCAL": False,
        "value": "AttributeSensitive",
    }
    sig = bytes.fromhex(ok["signature"])
    verify_ecdsa(private.public_key(), sig, b"token-level probe", hashes.SHA256())


# --- the steps (run in child processes) ------------------------------------------


def _step_objects(args: dict[str, Any]) -> dict[str, Any]:
    """Every object on the token, as (class, label, id), sorted."""
    from pkcs11 import Attribute

    from test_wrapkey import _raw

    session = _raw(args)
    out = []
    for obj in session.get_objects():
        try:
            oid = bytes(obj[Attribute.ID]).hex()
        except Exception:  # data objects have no CKA_ID
            oid = ""
        out.append([str(obj[Attribute.CLASS].name), str(obj[Attribute.LABEL]), oid])
    return {"objects": sorted(out)}


def _bool_attrs(obj: Any, names: list[str]) -> dict[str, Any]:
    from pkcs11 import Attribute

    return {n: bool(obj[Attribute[n]]) for n in names}


def _step_import_key_attributes(args: dict[str, Any]) -> dict[str, Any]:
    from pkcs11 import Attribute, ObjectClass

    from signd.token.session import _spki
    from test_wrapkey import _raw, _value_read

    session = _raw(args)
    names = ["UNWRAP", "DECRYPT", "SIGN", "SENSITIVE", "EXTRACTABLE", "PRIVATE", "TOKEN"]
    privs = [
        {**_bool_attrs(k, names), "value": _value_read(k, Attribute.PRIVATE_EXPONENT)}
        for k in session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: IMPORT_LABEL}
        )
    ]
    pubs = [
        _spki(k).hex()
        for k in session.get_objects(
            {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: IMPORT_LABEL}
        )
    ]
    return {"private": privs, "public": pubs}


def _step_private_attributes(args: dict[str, Any]) -> dict[str, Any]:
    """The private keys whose label starts with ``label_prefix``."""
    from pkcs11 import Attribute, ObjectClass

    from test_wrapkey import _raw, _value_read

    session = _raw(args)
    out = []
    for k in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
        if str(k[Attribute.LABEL]).startswith(args["label_prefix"]):
            attrs = _bool_attrs(k, ["SENSITIVE", "EXTRACTABLE", "WRAP_WITH_TRUSTED"])
            out.append({**attrs, "value": _value_read(k, Attribute.VALUE)})
    return {"keys": out}


def _step_secret_attributes(args: dict[str, Any]) -> dict[str, Any]:
    """The secret keys whose label starts with ``label_prefix``, and what reading
    CKA_VALUE of each gives (python-pkcs11 directly, not signd)."""
    from pkcs11 import Attribute, ObjectClass

    from test_wrapkey import _raw, _value_read

    session = _raw(args)
    names = ["SIGN", "VERIFY", "ENCRYPT", "DECRYPT", "SENSITIVE", "EXTRACTABLE"]
    out = []
    for k in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
        if str(k[Attribute.LABEL]).startswith(args["label_prefix"]):
            out.append({**_bool_attrs(k, names), "value": _value_read(k, Attribute.VALUE)})
    return {"keys": out}


def _step_import_public(args: dict[str, Any]) -> dict[str, Any]:
    from test_wrapkey import _session

    spki_der, key_id = _session(args).import_public()
    return {"spki": spki_der.hex(), "id": key_id}


def _step_import_keypair(args: dict[str, Any]) -> dict[str, Any]:
    """``import_keypair``; then the private key's attributes and a signature."""
    import secrets

    from pkcs11 import Attribute, Mechanism

    from signd.errors import SigndError
    from signd.keys.algorithms import key_type
    from test_wrapkey import _error, _objects_with_id, _session, _value_read

    ts = _session(args)
    oid = secrets.token_bytes(16)
    try:
        got = ts.import_keypair(
            key_type(args["key_type"]),
            oid,
            "import-test",
            args["key_id"],
            bytes.fromhex(args["wrapped_key"]),
            bytes.fromhex(args["wrapped_material"]),
            bytes.fromhex(args["spki"]),
            False,
        )
    except SigndError as exc:
        return {**_error(exc), "left": _objects_with_id(args, oid)}
    priv = ts._find_private(oid)
    names = ["SIGN", "DECRYPT", "UNWRAP", "SENSITIVE", "EXTRACTABLE", "LOCAL"]
    attrs = {**_bool_attrs(priv, names), "value": _value_read(priv, Attribute.VALUE)}
    digest = hashlib.sha256(b"token-level probe").digest()
    raw = bytes(priv.sign(digest, mechanism=Mechanism.ECDSA))
    from pkcs11.util.ec import encode_ecdsa_signature

    return {"spki": got.hex(), "private": attrs, "signature": encode_ecdsa_signature(raw).hex()}


_STEPS = {
    "objects": _step_objects,
    "import_key_attributes": _step_import_key_attributes,
    "private_attributes": _step_private_attributes,
    "secret_attributes": _step_secret_attributes,
    "import_public": _step_import_public,
    "import_keypair": _step_import_keypair,
}


def _main(argv: list[str]) -> int:  # pragma: no cover (runs in the children)
    args = json.loads(sys.stdin.read())
    print(json.dumps(_STEPS[argv[0]](args)))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
