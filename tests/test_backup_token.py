"""The token side of backup and restore (issue 15), on real SoftHSM tokens.

The ceremony's three objects (wrap key, backup MAC key, check value), the
backup MAC, wrapping a private key on one token and restoring the keypair on
another (``TokenSession.wrap_private``, ``backup_mac``, ``restore_keypair``).

As in ``test_wrapkey.py`` (whose helpers this file uses), every step on a
token runs in a child process with that token's environment: this file run
as a script (``python test_backup_token.py STEP``, JSON in on stdin and out
on stdout).  The tests know the wrap key's secret (they combine the shares the
ceremony printed) only to check what the token computes with it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from signd.shares import ShareError, backup_mac_key, check_value, combine
from support import run_step
from test_wrapkey import create, wrap_key_cmd

if TYPE_CHECKING:
    from conftest import TokenEnv  # the root conftest.py

# The labels (wrapping.py's; the steps import them, the tests state them).
WRAP_LABEL = "signd-wrap"
MAC_LABEL = "signd-backup-mac"
CHECK_LABEL = "signd-wrap-check"
LABELS = (WRAP_LABEL, MAC_LABEL, CHECK_LABEL)
BACKUP_TYPES = ["ec-p256", "ec-p384", "rsa-2048", "ec-secp256k1"]


def step(token: TokenEnv, name: str, **args: Any) -> dict[str, Any]:
    """Run this file's step ``name`` in a child process on ``token``."""
    return run_step(__file__, token, name, **args)


def flip(blob_hex: str, bit: int = 0) -> str:
    """``blob_hex`` with one bit of its middle byte flipped."""
    blob = bytearray(bytes.fromhex(blob_hex))
    blob[len(blob) // 2] ^= 1 << bit
    return blob.hex()


@dataclass(frozen=True)
class Ceremony:
    """A token, the shares its wrap key was made from, their secret and its check value."""

    token: TokenEnv
    shares: list[str]
    secret: bytes
    check: str


@pytest.fixture(scope="module")
def token_a(new_softhsm_token: Callable[[str], TokenEnv]) -> Ceremony:
    """A token with a wrap key made by ``signd wrap-key create`` (2 of 3)."""
    token = new_softhsm_token("signd-bt-a")
    shares, check = create(token, 3, 2)
    return Ceremony(token, shares, combine(shares), check)


@pytest.fixture(scope="module")
def token_b(token_a: Ceremony, new_softhsm_token: Callable[[str], TokenEnv]) -> Ceremony:
    """A token given token A's wrap key by ``signd wrap-key import``."""
    token = new_softhsm_token("signd-bt-b")
    out = wrap_key_cmd(token, "import", stdin="\n".join(token_a.shares[1:]) + "\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"check value: {token_a.check}\n"
    return Ceremony(token, token_a.shares, token_a.secret, token_a.check)


@pytest.fixture(scope="module")
def token_c(new_softhsm_token: Callable[[str], TokenEnv]) -> Ceremony:
    """A token whose wrap key is made from another secret."""
    token = new_softhsm_token("signd-bt-c")
    shares, check = create(token, 2, 2)
    return Ceremony(token, shares, combine(shares), check)


# --- shares.backup_mac_key ----------------------------------------------------


def test_backup_mac_key_known_answer() -> None:
    secret = bytes(range(32))
    # HMAC-SHA256(secret, b"signd backup mac key"), worked out once with Python's hmac
    expected = "e0bf5ed7dc41861af3e8f9c2e12fd51755f07e78f4f7c253e81e28a1bec07a69"
    assert backup_mac_key(secret).hex() == expected
    # not the check value's HMAC (whose first 16 hex digits are printed)
    assert not backup_mac_key(secret).hex().startswith(check_value(secret))
    assert backup_mac_key(bytes(32)) != backup_mac_key(secret)


def test_backup_mac_key_refuses_a_short_secret() -> None:
    with pytest.raises(ShareError, match="must be 32 bytes, got 16"):
        backup_mac_key(bytes(16))


# --- the ceremony ----------------------------------------------------------------


def test_the_ceremony_makes_all_three_objects(token_a: Ceremony) -> None:
    found = step(token_a.token, "objects")
    wrap, mac, check = (found[label] for label in LABELS)
    assert len(wrap) == 1
    assert wrap[0]["TRUSTED"] is True
    assert mac == [
        {
            "CLASS": "SECRET_KEY",
            "KEY_TYPE": "GENERIC_SECRET",
            "VALUE_LEN": 32,
            "TOKEN": True,
            "PRIVATE": False,  # the SO cannot make private objects
            "SIGN": True,
            "VERIFY": True,
            "ENCRYPT": False,
            "DECRYPT": False,
            "WRAP": False,
            "UNWRAP": False,
            "DERIVE": False,
            "SENSITIVE": True,
            "EXTRACTABLE": False,
            "MODIFIABLE": False,
            "COPYABLE": False,
            "TRUSTED": False,
            "value": "AttributeSensitive",
            "id": mac[0]["id"],
        }
    ]
    assert mac[0]["id"] != wrap[0]["id"]
    assert check == [
        {
            "CLASS": "DATA",
            "TOKEN": True,
            "PRIVATE": False,
            "MODIFIABLE": False,
            "value": check_value(token_a.secret),
        }
    ]
    assert token_a.check == check_value(token_a.secret)
    assert step(token_a.token, "check_value") == {"check_value": token_a.check}


def test_a_token_without_a_ceremony_has_no_check_value_nor_mac(own_token: TokenEnv) -> None:
    assert step(own_token, "check_value") == {"check_value": None}
    assert step(own_token, "mac", data="00") == {
        "error": "InvalidArgument",
        "message": "the token has no backup MAC key (labelled 'signd-backup-mac'): run "
        "'signd wrap-key create' (or import) first; a wrap key made before backups had "
        "MACs is deleted (as the SO) and imported again from its shares",
    }
    assert step(own_token, "verify_mac", data="00", mac="00" * 32)["error"] == "InvalidArgument"


@pytest.mark.parametrize("planted", [MAC_LABEL, CHECK_LABEL])
def test_an_object_of_the_ceremony_there_already_makes_create_refuse(
    own_token: TokenEnv, planted: str
) -> None:
    """Refused before anything is made: no object of the ceremony is added."""
    assert step(own_token, "plant", planted=planted) == {"planted": True}
    before = step(own_token, "labels")
    made = step(own_token, "so_create", secret=secrets.token_bytes(32).hex())
    assert made["error"] == "InvalidArgument"
    assert made["message"].startswith(f"the token has an object labelled {planted!r} already")
    assert step(own_token, "labels") == before == {label: int(label == planted) for label in LABELS}


def test_a_wrap_key_there_already_makes_create_refuse(token_a: Ceremony) -> None:
    before = step(token_a.token, "labels")
    made = step(token_a.token, "so_create", secret=secrets.token_bytes(32).hex())
    assert made["error"] == "InvalidArgument"
    assert "has a key labelled 'signd-wrap' already" in made["message"]
    assert step(token_a.token, "labels") == before == dict.fromkeys(LABELS, 1)


@pytest.mark.parametrize("fail_at", LABELS)
def test_a_failure_part_way_leaves_nothing(own_token: TokenEnv, fail_at: str) -> None:
    """The token is made to fail creating the object labelled ``fail_at`` (a
    DeviceMemory error injected in python-pkcs11's ``create_object``: SoftHSM
    gives no natural way to fail the second or third object only); what was
    made before is deleted, and a ceremony then succeeds on the same token."""
    secret = secrets.token_bytes(32)
    made = step(own_token, "so_create", secret=secret.hex(), fail_at=fail_at)
    assert made == {"error": "DeviceMemory", "message": ""}
    assert step(own_token, "labels") == dict.fromkeys(LABELS, 0)
    assert step(own_token, "so_create", secret=secret.hex()) == {"made": True}
    assert step(own_token, "labels") == dict.fromkeys(LABELS, 1)
    assert step(own_token, "check_value") == {"check_value": check_value(secret)}


# --- the backup MAC ---------------------------------------------------------------


def test_tokens_of_one_secret_agree_on_the_backup_mac(
    token_a: Ceremony, token_b: Ceremony, token_c: Ceremony
) -> None:
    data = f"a backup bundle {uuid.uuid4()}".encode()
    mac_a = step(token_a.token, "mac", data=data.hex())["mac"]
    assert mac_a == hmac.new(backup_mac_key(token_a.secret), data, hashlib.sha256).hexdigest()
    assert step(token_b.token, "mac", data=data.hex()) == {"mac": mac_a}

    def verify_on(c: Ceremony, mac: str, signed: bytes = data) -> Any:
        return step(c.token, "verify_mac", data=signed.hex(), mac=mac)["valid"]

    assert verify_on(token_b, mac_a) is True
    assert verify_on(token_a, mac_a) is True
    assert verify_on(token_b, flip(mac_a)) is False
    assert verify_on(token_b, mac_a, data + b"!") is False
    assert verify_on(token_b, mac_a[:-2]) is False  # SignatureLenRange
    assert verify_on(token_c, mac_a) is False  # another secret


def test_the_mac_key_is_usable_without_a_login(token_a: Ceremony) -> None:
    """A fact of SoftHSM 2.6.1 (measured): the MAC key is a public object
    (the SO cannot make private ones), so a session with no PIN computes
    backup MACs with it."""
    data = b"forged?"
    assert step(token_a.token, "mac_without_login", data=data.hex()) == {
        "mac": hmac.new(backup_mac_key(token_a.secret), data, hashlib.sha256).hexdigest()
    }


def test_two_mac_keys_or_check_values_are_refused(own_token: TokenEnv) -> None:
    secret = secrets.token_bytes(32)
    assert step(own_token, "so_create", secret=secret.hex()) == {"made": True}
    assert "mac" in step(own_token, "mac", data="00")
    assert step(own_token, "plant", planted=MAC_LABEL) == {"planted": True}
    assert step(own_token, "mac", data="00") == {
        "error": "InvalidArgument",
        "message": "the token has 2 keys labelled 'signd-backup-mac', not one: "
        "which is the backup MAC key is unknown",
    }
    assert step(own_token, "plant", planted=CHECK_LABEL) == {"planted": True}
    assert step(own_token, "check_value")["error"] == "TokenError"


# --- wrap on one token, restore on another ------------------------------------------


def generate(c: Ceremony, kt: str, backup: bool = True) -> dict[str, Any]:
    made = step(c.token, "generate", key_type=kt, backup=backup)
    assert "error" not in made, made
    return made


def wrap(c: Ceremony, object_id: str) -> str:
    wrapped = step(c.token, "wrap_private", object_id=object_id)
    assert "wrapped" in wrapped, wrapped
    blob: str = wrapped["wrapped"]
    return blob


def verify_signature(spki_hex: str, signature: bytes, message: bytes) -> None:
    """Raises cryptography's InvalidSignature unless ``signature`` (signd's
    default scheme for the key type) is good."""
    public = serialization.load_der_public_key(bytes.fromhex(spki_hex))
    if isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(public, ec.EllipticCurvePublicKey):
        algorithm = hashes.SHA384() if public.curve.key_size == 384 else hashes.SHA256()
        public.verify(signature, message, ec.ECDSA(algorithm))
    else:
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signature, message)


@pytest.mark.parametrize("kt", BACKUP_TYPES)
def test_a_key_wrapped_on_one_token_is_restored_on_another(
    token_a: Ceremony, token_b: Ceremony, kt: str
) -> None:
    made = generate(token_a, kt)
    blob = wrap(token_a, made["object_id"])
    label = f"restored/{kt}"
    restored = step(
        token_b.token,
        "restore",
        key_type=kt,
        object_id=made["object_id"],
        object_label=label,
        spki=made["spki"],
        wrapped=blob,
    )
    assert restored == {"restored": True, "left": 2}
    message = f"signed after restore {uuid.uuid4()}".encode()
    found = step(token_b.token, "inspect", object_id=made["object_id"], message=message.hex())
    assert found["public_keys"] == [[made["spki"], True]]
    assert found["private"] == {
        "LABEL": label,
        "PRIVATE": True,
        "SENSITIVE": True,
        "EXTRACTABLE": True,
        "WRAP_WITH_TRUSTED": True,
        "SIGN": True,
        "SIGN_RECOVER": False,
        "DECRYPT": False,
        "UNWRAP": False,
        "DERIVE": False,
        "value": "AttributeSensitive",
    }
    assert found["public_label"] == label
    verify_signature(made["spki"], bytes.fromhex(found["signature"]), message)
    # it stays backup-able: B wraps it again, and A's twin restores it back
    again = found["wrapped_again"]
    assert isinstance(again, str)
    assert len(again) == len(blob)


def test_a_version_without_its_private_key_is_restored_as_a_public_key(
    token_a: Ceremony, token_b: Ceremony
) -> None:
    made = generate(token_a, "ec-p256")
    restored = step(
        token_b.token,
        "restore",
        key_type="ec-p256",
        object_id=made["object_id"],
        object_label="public only",
        spki=made["spki"],
        wrapped=None,
    )
    assert restored == {"restored": True, "left": 1}
    found = step(token_b.token, "inspect", object_id=made["object_id"])
    assert found["public_keys"] == [[made["spki"], False]]
    assert found["private"] is None


def test_an_ed25519_public_key_is_restored(own_token: TokenEnv) -> None:
    """No wrap key is needed for a public key alone."""
    spki = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    oid = secrets.token_bytes(8).hex()
    restored = step(
        own_token,
        "restore",
        key_type="ed25519",
        object_id=oid,
        object_label="ed",
        spki=spki.hex(),
        wrapped=None,
    )
    assert restored == {"restored": True, "left": 1}
    assert step(own_token, "inspect", object_id=oid)["public_keys"] == [[spki.hex(), False]]


def test_a_key_made_without_backup_is_not_wrapped(token_a: Ceremony) -> None:
    made = generate(token_a, "ec-p256", backup=False)
    wrapped = step(token_a.token, "wrap_private", object_id=made["object_id"])
    assert wrapped == {
        "error": "UnsupportedAlgorithm",
        "message": f"the token cannot wrap the private key {made['object_id']}: KeyUnextractable",
    }


def test_wrap_private_needs_a_wrap_key_and_the_key(token_a: Ceremony, own_token: TokenEnv) -> None:
    missing = secrets.token_bytes(8).hex()
    assert step(token_a.token, "wrap_private", object_id=missing) == {
        "error": "TokenError",
        "message": f"expected one private key with id {missing}, found 0",
    }
    made = step(own_token, "generate", key_type="ec-p256", backup=False)
    wrapped = step(own_token, "wrap_private", object_id=made["object_id"])
    assert wrapped == {
        "error": "InvalidArgument",
        "message": "the token has no trusted wrap key labelled 'signd-wrap': "
        "run 'signd wrap-key create' (or import) first",
    }


NOT_UNWRAPPED = "the wrapped key does not unwrap under this token's wrap key"


def test_restore_refuses_blobs_that_are_not_the_key_and_leaves_nothing(
    token_a: Ceremony, token_b: Ceremony, token_c: Ceremony
) -> None:
    made = generate(token_a, "ec-p256")
    blob = wrap(token_a, made["object_id"])
    other = generate(token_a, "ec-p256")
    other_blob = wrap(token_a, other["object_id"])
    foreign = generate(token_c, "ec-p256")
    foreign_blob = wrap(token_c, foreign["object_id"])

    def restore(wrapped: str, spki: str = made["spki"], kt: str = "ec-p256") -> dict[str, Any]:
        return step(
            token_b.token,
            "restore",
            key_type=kt,
            object_id=secrets.token_bytes(8).hex(),
            object_label="refused",
            spki=spki,
            wrapped=wrapped,
        )

    for damaged in (flip(blob), flip(blob, 7), blob[:-16], foreign_blob):
        assert restore(damaged) == {
            "error": "InvalidArgument",
            "message": f"{NOT_UNWRAPPED} (damaged, or wrapped under another): GeneralError",
            "left": 0,
        }
    assert restore(blob[:16]) == {
        "error": "InvalidArgument",
        "message": f"{NOT_UNWRAPPED} (damaged, or wrapped under another): WrappedKeyLenRange",
        "left": 0,
    }
    assert restore(other_blob) == {
        "error": "InvalidArgument",
        "message": "the unwrapped private key does not match its public key",
        "left": 0,
    }
    # a P-384 key's blob under a P-256 public key: unwraps, signs, does not verify
    p384 = generate(token_a, "ec-p384")
    assert restore(wrap(token_a, p384["object_id"]))["message"] == (
        "the unwrapped private key does not match its public key"
    )
    # an RSA key's blob as an EC key: the token will not unwrap it
    rsa_key = generate(token_a, "rsa-2048")
    refused = restore(wrap(token_a, rsa_key["object_id"]))
    assert refused["error"] == "UnsupportedAlgorithm"
    assert refused["message"].startswith("the token will not unwrap the blob as a ec-p256")
    assert refused["left"] == 0
    # a public key of another type than the one named
    assert restore(blob, spki=rsa_key["spki"]) == {
        "error": "InvalidArgument",
        "message": "the public key is not a ec-p256 SubjectPublicKeyInfo: "
        "public key does not match key type ec-p256",
        "left": 0,
    }


def test_softhsm_will_not_restore_an_ed25519_private_key(token_b: Ceremony) -> None:
    """An Ed25519 key wrapped (here, by the test, with the wrap key's secret)
    as a token would wrap it: SoftHSM 2.6.1 answers FunctionFailed."""
    private = ed25519.Ed25519PrivateKey.generate()
    pkcs8 = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    blob = keywrap.aes_key_wrap_with_padding(token_b.secret, pkcs8)
    refused = step(
        token_b.token,
        "restore",
        key_type="ed25519",
        object_id=secrets.token_bytes(8).hex(),
        object_label="ed",
        spki=spki.hex(),
        wrapped=blob.hex(),
    )
    assert refused == {
        "error": "UnsupportedAlgorithm",
        "message": "the token will not unwrap the blob as a ed25519 private key "
        "(FunctionFailed): it cannot restore ed25519 keys, or the blob holds another "
        "type of key",
        "left": 0,
    }


def test_an_ec_key_wrapped_elsewhere_restores(token_b: Ceremony) -> None:
    """The blob is RFC 5649 over PKCS#8: one made by cryptography with the
    wrap key's secret restores too (what the Ed25519 test relies on)."""
    private = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    restored = step(
        token_b.token,
        "restore",
        key_type="ec-p256",
        object_id=secrets.token_bytes(8).hex(),
        object_label="from elsewhere",
        spki=spki.hex(),
        wrapped=keywrap.aes_key_wrap_with_padding(token_b.secret, pkcs8).hex(),
    )
    assert restored == {"restored": True, "left": 2}


def test_restore_refuses_an_id_that_is_taken(token_a: Ceremony, token_b: Ceremony) -> None:
    made = generate(token_a, "ec-p256")
    blob = wrap(token_a, made["object_id"])
    taken = generate(token_b, "ec-p256")
    refused = step(
        token_b.token,
        "restore",
        key_type="ec-p256",
        object_id=taken["object_id"],
        object_label="refused",
        spki=made["spki"],
        wrapped=blob,
    )
    assert refused == {
        "error": "Conflict",
        "message": f"object id {taken['object_id']} is taken",
        "left": 2,  # the keypair that has it, untouched
    }
    found = step(token_b.token, "inspect", object_id=taken["object_id"])
    assert found["public_keys"] == [[taken["spki"], True]]


def test_restore_needs_a_wrap_key(token_a: Ceremony, own_token: TokenEnv) -> None:
    made = generate(token_a, "ec-p256")
    refused = step(
        own_token,
        "restore",
        key_type="ec-p256",
        object_id=made["object_id"],
        object_label="refused",
        spki=made["spki"],
        wrapped=wrap(token_a, made["object_id"]),
    )
    assert refused == {
        "error": "InvalidArgument",
        "message": "the token has no trusted wrap key labelled 'signd-wrap': "
        "run 'signd wrap-key create' (or import) first",
        "left": 0,
    }


# --- the steps (a child process each) ------------------------------------------


def _main(argv: list[str]) -> int:  # pragma: no cover (runs in the children)
    args = json.loads(sys.stdin.read())
    print(json.dumps(_STEPS[argv[0]](args)))
    return 0


def _step_objects(args: dict[str, Any]) -> dict[str, Any]:
    """The ceremony's objects by label, each with its attributes."""
    from pkcs11 import Attribute, ObjectClass

    from test_wrapkey import _raw, _value_read

    session = _raw(args)
    out: dict[str, Any] = {}
    key_attrs = [
        "TOKEN", "PRIVATE", "SIGN", "VERIFY", "ENCRYPT", "DECRYPT", "WRAP", "UNWRAP",
        "DERIVE", "SENSITIVE", "EXTRACTABLE", "MODIFIABLE", "COPYABLE", "TRUSTED",
    ]  # fmt: skip
    for label in LABELS:
        found = []
        for obj in session.get_objects({Attribute.LABEL: label}):
            cls = obj[Attribute.CLASS]
            if cls == ObjectClass.DATA:
                found.append(
                    {
                        "CLASS": "DATA",
                        **{n: bool(obj[Attribute[n]]) for n in ("TOKEN", "PRIVATE", "MODIFIABLE")},
                        "value": bytes(obj[Attribute.VALUE]).decode("ascii"),
                    }
                )
                continue
            found.append(
                {
                    "CLASS": ObjectClass(cls).name,
                    "KEY_TYPE": obj[Attribute.KEY_TYPE].name,
                    "VALUE_LEN": obj[Attribute.VALUE_LEN],
                    **{n: bool(obj[Attribute[n]]) for n in key_attrs},
                    "value": _value_read(obj, Attribute.VALUE),
                    "id": bytes(obj[Attribute.ID]).hex(),
                }
            )
        out[label] = found
    return out


def _step_labels(args: dict[str, Any]) -> dict[str, Any]:
    """How many objects have each of the ceremony's labels (all classes)."""
    from pkcs11 import Attribute

    from test_wrapkey import _raw

    session = _raw(args)
    return {label: len(list(session.get_objects({Attribute.LABEL: label}))) for label in LABELS}


def _step_check_value(args: dict[str, Any]) -> dict[str, Any]:
    from signd.errors import SigndError
    from test_wrapkey import _error, _session

    try:
        return {"check_value": _session(args).wrap_check_value()}
    except SigndError as exc:
        return _error(exc)


class _FailingSession:
    """A python-pkcs11 session whose ``create_object`` fails (DeviceMemory)
    for a template labelled ``fail_at``: a token failing part-way."""

    def __init__(self, real: Any, fail_at: str) -> None:
        self._real = real
        self._fail_at = fail_at

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def create_object(self, attrs: dict[Any, Any]) -> Any:
        import pkcs11.exceptions as p11e
        from pkcs11 import Attribute

        if attrs.get(Attribute.LABEL) == self._fail_at:
            raise p11e.DeviceMemory()
        return self._real.create_object(attrs)


def _step_so_create(args: dict[str, Any]) -> dict[str, Any]:
    """``create_wrap_key`` in the SO's session, from the secret given."""
    from signd.errors import SigndError
    from signd.token.profiles import PROFILES
    from signd.token.session import TokenSession
    from test_wrapkey import _error

    ts = TokenSession()
    so_pin = (Path(args["pin"]).parent / "so.pin").read_text().rstrip("\n")
    ts.open_so(args["module"], args["label"], so_pin, PROFILES["softhsm"])
    if args.get("fail_at"):
        ts._session = _FailingSession(ts._session, args["fail_at"])
    try:
        ts.create_wrap_key(
            bytes.fromhex(args["secret"]), secrets.token_bytes(8), secrets.token_bytes(8)
        )
    except SigndError as exc:
        return _error(exc)
    except Exception as exc:  # the token's own error, mapped by the caller
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"made": True}


def _step_plant(args: dict[str, Any]) -> dict[str, Any]:
    """A public object labelled as one of the ceremony's, made by the user."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    from test_wrapkey import _raw

    session = _raw(args)
    if args["planted"] == CHECK_LABEL:
        template = {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.VALUE: b"0000000000000000",
        }
    else:
        template = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.VALUE: secrets.token_bytes(32),
            Attribute.SIGN: True,
            Attribute.VERIFY: True,
        }
    session.create_object(
        {
            **template,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.LABEL: args["planted"],
        }
    )
    return {"planted": True}


def _step_mac(args: dict[str, Any]) -> dict[str, Any]:
    from signd.errors import SigndError
    from test_wrapkey import _error, _session

    try:
        return {"mac": _session(args).backup_mac(bytes.fromhex(args["data"])).hex()}
    except SigndError as exc:
        return _error(exc)


def _step_verify_mac(args: dict[str, Any]) -> dict[str, Any]:
    from signd.errors import SigndError
    from test_wrapkey import _error, _session

    ts = _session(args)
    try:
        valid = ts.verify_backup_mac(bytes.fromhex(args["data"]), bytes.fromhex(args["mac"]))
    except SigndError as exc:
        return _error(exc)
    return {"valid": valid}


def _step_mac_without_login(args: dict[str, Any]) -> dict[str, Any]:
    from pkcs11 import Attribute, Mechanism, ObjectClass

    from test_wrapkey import _raw

    session = _raw(args, login=False)
    (key,) = session.get_objects(
        {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: MAC_LABEL}
    )
    mac = key.sign(bytes.fromhex(args["data"]), mechanism=Mechanism.SHA256_HMAC)
    return {"mac": bytes(mac).hex()}


def _step_generate(args: dict[str, Any]) -> dict[str, Any]:
    from test_wrapkey import _step_generate as generate_step

    return generate_step(args)


def _step_wrap_private(args: dict[str, Any]) -> dict[str, Any]:
    from signd.errors import SigndError
    from test_wrapkey import _error, _session

    try:
        blob = _session(args).wrap_private(bytes.fromhex(args["object_id"]))
    except SigndError as exc:
        return _error(exc)
    return {"wrapped": blob.hex()}


def _step_restore(args: dict[str, Any]) -> dict[str, Any]:
    """``restore_keypair``; ``left``: the objects with that id afterwards."""
    from signd.errors import SigndError
    from signd.keys.algorithms import key_type
    from test_wrapkey import _error, _objects_with_id, _session

    ts = _session(args)
    oid = bytes.fromhex(args["object_id"])
    wrapped = args["wrapped"]
    try:
        ts.restore_keypair(
            key_type(args["key_type"]),
            oid,
            args["object_label"],
            bytes.fromhex(args["spki"]),
            None if wrapped is None else bytes.fromhex(wrapped),
        )
    except SigndError as exc:
        return {**_error(exc), "left": _objects_with_id(args, oid)}
    return {"restored": True, "left": _objects_with_id(args, oid)}


def _step_inspect(args: dict[str, Any]) -> dict[str, Any]:
    """``public_keys`` of the id; the private key's attributes; with
    ``message``, its signature made as signd signs (``run_jobs``, the key
    type's default scheme), and the key wrapped again."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    from signd.keys import algorithms
    from signd.token.calls import SignJob
    from test_wrapkey import _raw, _value_read

    ts = _session_of(args)
    oid = bytes.fromhex(args["object_id"])
    found = ts.public_keys([oid])
    out: dict[str, Any] = {"public_keys": [[spki.hex(), has] for spki, has in found.values()]}
    session = _raw(args, login=False)
    (pub,) = session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: oid})
    out["public_label"] = pub[Attribute.LABEL]
    privs = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: oid}))
    if not privs:
        out["private"] = None
        return out
    (priv,) = privs
    names = [
        "PRIVATE", "SENSITIVE", "EXTRACTABLE", "WRAP_WITH_TRUSTED", "SIGN", "SIGN_RECOVER",
        "DECRYPT", "UNWRAP", "DERIVE",
    ]  # fmt: skip
    out["private"] = {
        "LABEL": priv[Attribute.LABEL],
        **{n: bool(priv[Attribute[n]]) for n in names},
        "value": _value_read(
            priv,
            Attribute.PRIVATE_EXPONENT if priv.key_type == KeyType.RSA else Attribute.VALUE,
        ),
    }
    if "message" in args:
        spki = next(iter(found.values()))[0]
        kt = _key_type_of(spki)
        opts = algorithms.options(kt, None, None, None, by_digest=False)
        plan = algorithms.plan(opts, bytes.fromhex(args["message"]), None)
        hash_name = plan.hash.name if plan.hash is not None else None
        ((ok, raw),) = ts.run_jobs([SignJob(oid, plan.scheme, hash_name, plan.data)], verify=None)
        assert ok, raw
        out["signature"] = algorithms.finish_signature(plan, raw).hex()
        out["wrapped_again"] = ts.wrap_private(oid).hex()
    return out


def _session_of(args: dict[str, Any]) -> Any:
    from test_wrapkey import _session

    return _session(args)


def _key_type_of(spki: bytes) -> Any:
    """signd's key type of a public key."""
    from signd.keys.algorithms import KEY_TYPES, load_public_key

    for kt in KEY_TYPES.values():
        try:
            load_public_key(kt, spki)
        except ValueError:
            continue
        return kt
    raise AssertionError("no key type fits")


_STEPS = {
    "objects": _step_objects,
    "labels": _step_labels,
    "check_value": _step_check_value,
    "so_create": _step_so_create,
    "plant": _step_plant,
    "mac": _step_mac,
    "verify_mac": _step_verify_mac,
    "mac_without_login": _step_mac_without_login,
    "generate": _step_generate,
    "wrap_private": _step_wrap_private,
    "restore": _step_restore,
    "inspect": _step_inspect,
}


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
