"""The objects signd leaves on the token, read directly with python-pkcs11.

Keys are made through the daemon; this test process then logs in to the same
SoftHSM token on its own (one login per process, so one module-scoped
session) and checks that every private key is sensitive, never extractable,
sign-only, and that its value cannot be read.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.exceptions import AttributeSensitive, UserAlreadyLoggedIn

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv  # the root conftest.py

#: What every private key signd generates must say about itself.
PRIVATE_KEY_ATTRIBUTES = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.ALWAYS_SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.NEVER_EXTRACTABLE: True,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}

#: Attributes holding the secret itself, per PKCS#11 key type.
SECRET_ATTRIBUTES = {
    KeyType.EC: [Attribute.VALUE],
    KeyType.EC_EDWARDS: [Attribute.VALUE],
    KeyType.RSA: [
        Attribute.PRIVATE_EXPONENT,
        Attribute.PRIME_1,
        Attribute.PRIME_2,
        Attribute.EXPONENT_1,
        Attribute.EXPONENT_2,
        Attribute.COEFFICIENT,
    ],
}

PKCS11_KEY_TYPE = {
    "ec-p256": KeyType.EC,
    "ec-p384": KeyType.EC,
    "ed25519": KeyType.EC_EDWARDS,
    "rsa-2048": KeyType.RSA,
}


@pytest.fixture(scope="module")
def session(token_env: TokenEnv) -> Iterator[Any]:
    """This process's one logged-in session to the token (read only)."""
    lib = pkcs11.lib(token_env.module)
    token = lib.get_token(token_label=token_env.label)
    try:
        s = token.open(user_pin=token_env.pin)
        owns_login = True
    except UserAlreadyLoggedIn:
        # Another test module of this process is logged in; the login is per
        # process, so a session without a PIN already sees private objects.
        s = token.open()
        owns_login = False
    yield s
    if owns_login:
        s.close()


@dataclass(frozen=True)
class Made:
    name: str
    type: str
    versions: dict[int, str]  # version -> public key PEM, as the daemon reports it


@pytest.fixture(scope="module")
def made(signd: Daemon) -> dict[str, Made]:
    """One key per family through the daemon; the ec-p256 one rotated to v2."""
    out: dict[str, Made] = {}
    with signd.client() as c:
        for kt in PKCS11_KEY_TYPE:
            name = f"tok-{kt}-{uuid.uuid4().hex[:8]}"
            info = c.create_key(name, kt)
            if kt == "ec-p256":
                info = c.rotate(name)
            out[kt] = Made(name, kt, {v.version: v.public_key_pem for v in info.versions})
    assert list(out["ec-p256"].versions) == [1, 2]
    return out


CASES = [(kt, 1) for kt in PKCS11_KEY_TYPE] + [("ec-p256", 2)]
IDS = [f"{kt}-v{v}" for kt, v in CASES]


def only(objects: Any) -> Any:
    found = list(objects)
    assert len(found) == 1, f"expected exactly one object, found {len(found)}"
    return found[0]


def private_key(session: Any, label: str) -> Any:
    return only(
        session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label})
    )


@pytest.mark.parametrize(("kt", "version"), CASES, ids=IDS)
def test_private_key_is_sensitive_and_sign_only(
    session: Any, made: dict[str, Made], kt: str, version: int
) -> None:
    key = private_key(session, f"{made[kt].name}/v{version}")
    assert key[Attribute.KEY_TYPE] == PKCS11_KEY_TYPE[kt]
    actual = {attr: key[attr] for attr in PRIVATE_KEY_ATTRIBUTES}
    assert actual == PRIVATE_KEY_ATTRIBUTES


@pytest.mark.parametrize(("kt", "version"), CASES, ids=IDS)
def test_private_key_value_cannot_be_read(
    session: Any, made: dict[str, Made], kt: str, version: int
) -> None:
    key = private_key(session, f"{made[kt].name}/v{version}")
    secrets = SECRET_ATTRIBUTES[PKCS11_KEY_TYPE[kt]]
    for attr in secrets:
        with pytest.raises(AttributeSensitive):
            key[attr]
    # The non-secret attributes of the same object are readable: the failure above
    # is the token guarding the value, not a broken handle.
    assert key[Attribute.LABEL] == f"{made[kt].name}/v{version}"


def _token_public_key(obj: Any) -> Any:
    """The public key object's key, rebuilt from its raw PKCS#11 attributes."""
    kt = obj[Attribute.KEY_TYPE]
    if kt == KeyType.RSA:
        n = int.from_bytes(obj[Attribute.MODULUS], "big")
        e = int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    point = bytes(obj[Attribute.EC_POINT])
    assert point[0] == 0x04  # a DER OCTET STRING around the point
    length = point[1]
    assert length < 0x80  # short form: at most 97 bytes (P-384)
    raw = point[2 : 2 + length]
    assert len(raw) == length
    if kt == KeyType.EC_EDWARDS:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    curve = ec.SECP256R1() if len(raw) == 65 else ec.SECP384R1()
    return ec.EllipticCurvePublicKey.from_encoded_point(curve, raw)


@pytest.mark.parametrize(("kt", "version"), CASES, ids=IDS)
def test_public_key_on_token_matches_the_daemons(
    session: Any, made: dict[str, Made], kt: str, version: int
) -> None:
    label = f"{made[kt].name}/v{version}"
    private = private_key(session, label)
    public = only(
        session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label})
    )
    assert public[Attribute.ID] == private[Attribute.ID]  # one keypair
    assert public[Attribute.TOKEN] is True
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    on_token = _token_public_key(public).public_bytes(serialization.Encoding.PEM, spki)
    assert on_token.decode() == made[kt].versions[version]


def test_rotation_kept_both_keypairs(session: Any, made: dict[str, Made]) -> None:
    name = made["ec-p256"].name
    ids = {private_key(session, f"{name}/v{v}")[Attribute.ID] for v in (1, 2)}
    assert len(ids) == 2
    assert not list(
        session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: f"{name}/v3"}
        )
    )


@pytest.mark.parametrize("kt", list(PKCS11_KEY_TYPE))
def test_metadata_data_object(session: Any, made: dict[str, Made], kt: str) -> None:
    m = made[kt]
    obj = only(
        session.get_objects(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.APPLICATION: "signd",
                Attribute.LABEL: m.name,
            }
        )
    )
    assert obj[Attribute.TOKEN] is True
    assert obj[Attribute.PRIVATE] is True  # not visible without logging in
    value = bytes(obj[Attribute.VALUE])
    assert m.name.encode() in value
    assert kt.encode() in value
    # It records every version's keypair, by the keypair's CKA_ID.
    for v in m.versions:
        object_id = bytes(private_key(session, f"{m.name}/v{v}")[Attribute.ID])
        assert object_id.hex().encode() in value


def test_no_private_key_without_metadata(session: Any, made: dict[str, Made]) -> None:
    """Every signd keypair made here is labelled NAME/vN and NAME has a data object."""
    names = {m.name for m in made.values()}
    labels = [
        obj[Attribute.LABEL]
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
        if obj[Attribute.LABEL].split("/v")[0] in names
    ]
    assert sorted(labels) == sorted(f"{m.name}/v{v}" for m in made.values() for v in m.versions)
    data_labels = {
        obj[Attribute.LABEL]
        for obj in session.get_objects(
            {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: "signd"}
        )
    }
    assert names <= data_labels


def test_one_search_for_many_ids_finds_what_a_search_an_id_finds(
    session: Any, made: dict[str, Made]
) -> None:
    """A start looks up every key's pair with one search per class (not two an
    id, which grows with keys squared on SoftHSM); both ways find the same."""
    from signd.token.session import BULK_LOOKUP, _by_id, _find

    ids = [
        bytes(k[Attribute.ID])
        for k in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
    ]
    ids += [b"\x00no such id"]
    assert len(ids) > BULK_LOOKUP
    for cls in (ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY):
        bulk = _by_id(session, cls, ids)
        each = {oid: _find(session, cls, oid) for oid in ids}
        assert {oid: sorted(o[Attribute.LABEL] for o in objs) for oid, objs in bulk.items()} == {
            oid: sorted(o[Attribute.LABEL] for o in objs) for oid, objs in each.items() if objs
        }
    assert b"\x00no such id" not in _by_id(session, ObjectClass.PUBLIC_KEY, ids)
