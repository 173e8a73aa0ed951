"""``signd wrap-key`` and backup-able keypairs (issue 15), on real SoftHSM tokens.

A process sees one SoftHSM configuration (``SOFTHSM2_CONF`` is read when the
module loads) and logs in once, so every step on a token runs in a child
process with that token's environment: the ``signd wrap-key`` command itself,
or this file run as a script (``python test_wrapkey.py STEP``, JSON in on
stdin and out on stdout).  Between tokens only wrapped (encrypted) keys
travel; no private key's value is read in clear anywhere.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from signd.errors import InvalidArgument, KeyNotFound, UnsupportedAlgorithm
from support import run_step

if TYPE_CHECKING:
    from conftest import Daemon, OckTokenEnv, TokenEnv  # the root conftest.py

ROOT = Path(__file__).resolve().parent.parent
SOFTHSM_INIT = ROOT / "softhsm-init.sh"
WRAP_LABEL = "signd-wrap"  # wrapping.WRAP_KEY_LABEL (imported by the steps, not here)


# --- tokens, configs and commands (the test process) ---------------------------


def config_for(token: TokenEnv) -> Path:
    path = token.state_dir / "signd.toml"
    path.write_text(
        f'[token]\nmodule = "{token.module}"\nlabel = "{token.label}"\n'
        f'pin_file = "{token.pin_file}"\n'
    )
    return path


def wrap_key_cmd(
    token: TokenEnv, *args: str, so_pin_file: Path | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """``signd wrap-key ARGS --config ... --so-pin-file ...`` on ``token``."""
    argv = [
        "wrap-key",
        *args,
        "--config",
        str(config_for(token)),
        "--so-pin-file",
        str(so_pin_file or token.state_dir / "so.pin"),
    ]
    cmd = [sys.executable, "-m", "signd"]
    return subprocess.run(
        [*cmd, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=token.env(),
        timeout=120,
        check=False,
    )


def create(token: TokenEnv, shares: int = 5, threshold: int = 3) -> tuple[list[str], str]:
    """A wrap-key ceremony on ``token``: (the shares, the check value)."""
    out = wrap_key_cmd(token, "create", "--shares", str(shares), "--threshold", str(threshold))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == shares + 1, out.stdout
    assert lines[-1].startswith("check value: ")
    return lines[:-1], lines[-1].removeprefix("check value: ")


def step(token: TokenEnv, name: str, **args: Any) -> dict[str, Any]:
    """Run this file's step ``name`` in a child process on ``token``."""
    return run_step(__file__, token, name, **args)


def corrupt(share: str) -> str:
    """``share`` with one hex digit in its middle changed."""
    chars = list(share)
    i = len(chars) // 2
    while chars[i] not in "0123456789abcdef":
        i += 1
    chars[i] = "0" if chars[i] != "0" else "1"
    return "".join(chars)


@pytest.fixture(scope="module")
def backup_token(new_softhsm_token: Callable[[str], TokenEnv]) -> TokenEnv:
    """A token of this module's own with a wrap key (a 2-of-2 ceremony)."""
    token = new_softhsm_token("signd-wrap-a")
    create(token, 2, 2)
    return token


# --- the daemon: create_key with backup --------------------------------------


def test_the_daemon_makes_backup_keys_through_its_socket(
    backup_token: TokenEnv, make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    """create_key ``backup``: answered in key_info, kept by rotation, made
    extractable only under the wrap key; a type the token cannot wrap is
    refused and leaves no key behind."""
    d = make_daemon(token=backup_token)
    with d.client() as c:
        info = c.create_key(key_name, "ec-p256", backup=True)
        assert info.backup is True
        assert c.rotate(key_name).backup is True
        assert c.create_key(key_name + "-plain", "ec-p256").backup is None
        with pytest.raises(UnsupportedAlgorithm, match="cannot back up ed25519"):
            c.create_key(key_name + "-ed", "ed25519", backup=True)
        with pytest.raises(KeyNotFound):
            c.key_info(key_name + "-ed")
    assert d.stop() == 0
    # On the token: both versions' private keys wrap under the trusted key,
    # the plain key's does not.
    ids = step(backup_token, "wrappable_by_label", prefix=key_name + "/")
    assert ids == {"wrapped": [f"{key_name}/v1", f"{key_name}/v2"], "refused": []}
    plain = step(backup_token, "wrappable_by_label", prefix=key_name + "-plain/")
    assert plain == {"wrapped": [], "refused": [f"{key_name}-plain/v1"]}


def test_the_daemon_refuses_backup_without_a_wrap_key(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, key_name: str
) -> None:
    d = make_daemon(token=own_token)
    with d.client() as c:
        with pytest.raises(InvalidArgument, match="wrap key"):
            c.create_key(key_name, "ec-p256", backup=True)
        with pytest.raises(KeyNotFound):
            c.key_info(key_name)


# --- the ceremony, and a key backed up on one token and restored on another ----


def test_a_key_backed_up_on_one_token_signs_on_another(
    own_token: TokenEnv, new_softhsm_token: Callable[[str], TokenEnv]
) -> None:
    token_b = new_softhsm_token("signd-wrap-b")
    shares, check = create(own_token, shares=5, threshold=3)
    assert len(set(shares)) == 5
    assert step(own_token, "has_wrap_key") == {"present": True}
    assert step(token_b, "has_wrap_key") == {"present": False}

    imported = wrap_key_cmd(token_b, "import", stdin="\n".join(shares[1:5:2] + shares[:1]) + "\n")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout == f"check value: {check}\n"
    assert step(token_b, "has_wrap_key") == {"present": True}

    made = step(own_token, "generate", key_type="ec-p256", backup=True)
    assert "error" not in made, made
    attrs = step(own_token, "attributes", object_id=made["object_id"])
    assert attrs == {
        "SENSITIVE": True,
        "EXTRACTABLE": True,
        "WRAP_WITH_TRUSTED": True,
        "NEVER_EXTRACTABLE": False,
        "SIGN": True,
        "value": "AttributeSensitive",
    }
    wrapped = step(own_token, "wrap", object_id=made["object_id"], wrap_with="trusted")
    assert "wrapped" in wrapped, wrapped

    message = f"restored {uuid.uuid4()}".encode()
    signed = step(token_b, "unwrap_sign", wrapped=wrapped["wrapped"], message=message.hex())
    assert signed["value"] == "AttributeSensitive"  # restored, and still unreadable
    public = serialization.load_der_public_key(bytes.fromhex(made["spki"]))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(bytes.fromhex(signed["signature"]), message, ec.ECDSA(hashes.SHA256()))


def test_the_wrap_key_is_trusted_wrap_only_and_cannot_be_changed(backup_token: TokenEnv) -> None:
    found = step(backup_token, "wrap_key_attributes")
    assert found["attributes"] == {
        "TRUSTED": True,
        "WRAP": True,
        "UNWRAP": True,
        "ENCRYPT": False,
        "DECRYPT": False,
        "SIGN": False,
        "VERIFY": False,
        "DERIVE": False,
        "SENSITIVE": True,
        "EXTRACTABLE": False,
        "PRIVATE": False,  # the SO cannot create private objects (next test)
        "MODIFIABLE": False,
        "COPYABLE": False,
        "VALUE_LEN": 32,
    }
    assert found["value"] == "AttributeSensitive"
    # A user who could make it a decryption key could decrypt any backup.
    assert found["set_decrypt"] != "ok"
    assert found["copy_with_decrypt"] != "ok"


def test_the_so_cannot_create_a_private_object(backup_token: TokenEnv) -> None:
    """Why the wrap key is a public object (measured: SoftHSM's C_CreateObject
    in an SO session answers CKR_USER_NOT_LOGGED_IN for CKA_PRIVATE true)."""
    assert step(backup_token, "so_private_object") == {"error": "UserNotLoggedIn"}


# --- the wrap key's unwrap template ---------------------------------------------

#: What each unwrap of a backup (``_step_unwrap_attempts``) is refused with, or
#: what its caller could do with the key: with signd's unwrap template, nothing.
REFUSED = {
    "readable, no login": "TemplateInconsistent",
    "sensitive but public, no login": "TemplateInconsistent",
    "readable private, no login": "UserNotLoggedIn",  # CKA_PRIVATE alone needs a login
    "readable": "TemplateInconsistent",
    "not wrap-with-trusted": "TemplateInconsistent",
    "as a readable secret key": "TemplateInconsistent",
}


def test_the_wrap_key_keeps_its_unwrap_template(backup_token: TokenEnv) -> None:
    """Read back with C_GetAttributeValue (python-pkcs11 cannot read an array attribute)."""
    assert step(backup_token, "unwrap_template") == {
        "template": {"SENSITIVE": "01", "WRAP_WITH_TRUSTED": "01", "PRIVATE": "01"}
    }


def test_a_backup_unwraps_into_nothing_readable_or_usable_without_login(
    backup_token: TokenEnv,
) -> None:
    """Whoever holds a backup and reaches the token: every unwrap that would
    give a readable, re-wrappable or public key is refused, logged in or not,
    and leaves no object."""
    made = step(backup_token, "generate", key_type="ec-p256", backup=True)
    assert "error" not in made, made
    wrapped = step(backup_token, "wrap", object_id=made["object_id"], wrap_with="trusted")
    tried = step(backup_token, "unwrap_attempts", wrapped=wrapped["wrapped"], spki=made["spki"])
    assert tried == {"outcomes": REFUSED, "left": 0}


def test_without_the_template_a_backup_is_an_open_book(
    new_softhsm_token: Callable[[str], TokenEnv],
) -> None:
    """What the template is for (measured on SoftHSM 2.6.1): a wrap key made
    as signd made it before (trusted, no CKA_UNWRAP_TEMPLATE) unwraps a backup
    into a key anyone reads, even without a login; into one a user wraps again
    under an AES key whose value they know; and into a public key a session
    with no login signs with."""
    token = new_softhsm_token("signd-wrap-old")
    assert step(token, "old_wrap_key") == {"made": True}
    assert step(token, "unwrap_template") == {"template": {}}
    made = step(token, "generate", key_type="ec-p256", backup=True)
    assert "error" not in made, made
    wrapped = step(token, "wrap", object_id=made["object_id"], wrap_with="trusted")
    tried = step(token, "unwrap_attempts", wrapped=wrapped["wrapped"], spki=made["spki"])
    assert tried == {
        "outcomes": {
            "readable, no login": "readable",
            "sensitive but public, no login": "signs",
            "readable private, no login": "UserNotLoggedIn",
            "readable": "readable",
            "not wrap-with-trusted": "re-wrapped and read",
            "as a readable secret key": "readable",
        },
        "left": 5,
    }


@pytest.mark.parametrize("kt", ["ec-p256", "ec-p384", "rsa-2048"])
def test_a_backup_restored_as_signd_would_signs_and_can_be_backed_up_again(
    backup_token: TokenEnv, kt: str
) -> None:
    """The unwrap the template allows: private, sensitive, wrap-with-trusted
    (and extractable, sign only), stated in the unwrap's template."""
    made = step(backup_token, "generate", key_type=kt, backup=True)
    assert "error" not in made, made
    wrapped = step(backup_token, "wrap", object_id=made["object_id"], wrap_with="trusted")
    message = f"restored {uuid.uuid4()}".encode()
    signed = step(
        backup_token, "unwrap_sign", wrapped=wrapped["wrapped"], message=message.hex(), key_type=kt
    )
    assert signed["value"] == "AttributeSensitive"
    assert signed["wrapped_again"] is True
    public = serialization.load_der_public_key(bytes.fromhex(made["spki"]))
    signature = bytes.fromhex(signed["signature"])
    if isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))


# --- what can and cannot be wrapped --------------------------------------------


@pytest.mark.parametrize("kt", ["ec-p256", "ec-p384", "rsa-2048"])
def test_backup_keys_of_these_types_are_made_and_wrapped(backup_token: TokenEnv, kt: str) -> None:
    made = step(backup_token, "generate", key_type=kt, backup=True)
    assert "error" not in made, made
    assert step(backup_token, "probe", object_id=made["object_id"]) == {"ok": True}
    wrapped = step(backup_token, "wrap", object_id=made["object_id"], wrap_with="trusted")
    assert "wrapped" in wrapped, wrapped


def test_softhsm_cannot_back_up_ed25519_keys(backup_token: TokenEnv) -> None:
    """SoftHSM 2.6.1's C_WrapKey has no Edwards keys (CKR_KEY_NOT_WRAPPABLE):
    ``generate(backup=True)`` asks it, refuses, and leaves no keypair behind."""
    made = step(backup_token, "generate", key_type="ed25519", backup=True)
    assert made["error"] == "UnsupportedAlgorithm"
    assert made["message"] == "this token cannot back up ed25519 keys: KeyNotWrappable"
    assert made["left"] == 0


def test_probe_wrappable_refuses_an_extractable_ed25519_key(backup_token: TokenEnv) -> None:
    probed = step(backup_token, "probe_raw_ed25519")
    assert probed["error"] == "UnsupportedAlgorithm"
    assert probed["message"].endswith(": KeyNotWrappable")


def test_a_key_made_without_backup_cannot_be_wrapped(backup_token: TokenEnv) -> None:
    made = step(backup_token, "generate", key_type="ec-p256", backup=False)
    assert "error" not in made, made
    attrs = step(backup_token, "attributes", object_id=made["object_id"])
    assert attrs["EXTRACTABLE"] is False
    assert attrs["NEVER_EXTRACTABLE"] is True
    assert attrs["WRAP_WITH_TRUSTED"] is False
    # SoftHSM checks CKA_EXTRACTABLE first: CKR_KEY_UNEXTRACTABLE.
    wrapped = step(backup_token, "wrap", object_id=made["object_id"], wrap_with="trusted")
    assert wrapped == {"error": "KeyUnextractable"}
    probed = step(backup_token, "probe", object_id=made["object_id"])
    assert probed["error"] == "UnsupportedAlgorithm"
    assert probed["message"].endswith(": KeyUnextractable")


def test_an_untrusted_aes_key_cannot_wrap_a_backup_key(backup_token: TokenEnv) -> None:
    made = step(backup_token, "generate", key_type="ec-p256", backup=True)
    assert "error" not in made, made
    wrapped = step(backup_token, "wrap", object_id=made["object_id"], wrap_with="untrusted")
    assert wrapped == {"error": "KeyNotWrappable"}


def test_backup_needs_a_wrap_key(own_token: TokenEnv) -> None:
    made = step(own_token, "generate", key_type="ec-p256", backup=True)
    assert made["error"] == "InvalidArgument"
    assert made["message"] == (
        "backup needs a wrap key on the token: run 'signd wrap-key create' (or import) first"
    )
    assert made["left"] == 0


# --- refusals of the command ---------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_an_so_pin_file_others_can_read_is_refused(own_token: TokenEnv, mode: int) -> None:
    pin = own_token.state_dir / "so-open.pin"
    pin.write_bytes((own_token.state_dir / "so.pin").read_bytes())
    pin.chmod(mode)
    out = wrap_key_cmd(own_token, "create", "--shares", "3", "--threshold", "2", so_pin_file=pin)
    assert out.returncode == 2, out.stderr
    assert f"(mode {mode:04o}); run: chmod 600" in out.stderr
    assert out.stdout == ""
    assert step(own_token, "has_wrap_key") == {"present": False}


def test_a_wrong_so_pin_is_a_token_failure(own_token: TokenEnv) -> None:
    pin = own_token.state_dir / "so-wrong.pin"
    pin.write_text("wrong-so-pin\n")
    pin.chmod(0o600)
    out = wrap_key_cmd(own_token, "create", "--shares", "3", "--threshold", "2", so_pin_file=pin)
    assert out.returncode == 1, out.stderr
    assert "wrong SO PIN" in out.stderr
    assert out.stdout == ""


def test_a_second_create_is_refused(backup_token: TokenEnv) -> None:
    out = wrap_key_cmd(backup_token, "create", "--shares", "3", "--threshold", "2")
    assert out.returncode == 2, out.stderr
    assert "has a key labelled 'signd-wrap' already" in out.stderr
    assert out.stdout == ""  # no shares of a key that was not made


def test_bad_numbers_create_nothing(own_token: TokenEnv) -> None:
    out = wrap_key_cmd(own_token, "create", "--shares", "2", "--threshold", "3")
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    assert step(own_token, "has_wrap_key") == {"present": False}


def test_bad_shares_are_refused_and_create_nothing(
    own_token: TokenEnv, new_softhsm_token: Callable[[str], TokenEnv]
) -> None:
    shares, _ = create(own_token, shares=5, threshold=3)
    token_b = new_softhsm_token("signd-wrap-c")
    for given in (
        shares[:2],  # too few
        [shares[0], corrupt(shares[1]), shares[2]],  # a corrupted line
        [],  # none at all
    ):
        out = wrap_key_cmd(token_b, "import", stdin="\n".join(given) + "\n")
        assert out.returncode == 2, (given, out.stderr)
        assert out.stderr.startswith("signd wrap-key: "), out.stderr
        assert out.stdout == ""
        assert step(token_b, "has_wrap_key") == {"present": False}


# --- opencryptoki's soft token (3.8.1, Debian 12) --------------------------------


def test_opencryptoki_cannot_hold_a_wrap_key(ock_token: OckTokenEnv) -> None:
    """Its secret keys have no CKA_TRUSTED (its private keys no
    CKA_WRAP_WITH_TRUSTED, nothing CKA_COPYABLE) and it has no AES key wrap:
    it wraps an extractable RSA key with CKM_AES_CBC_PAD under any AES key.
    So it cannot hold signd's wrap key, and ``wrap-key create`` says so."""
    out = wrap_key_cmd(ock_token, "create", "--shares", "3", "--threshold", "2")
    assert out.returncode == 1, out.stderr
    assert "the token refused the wrap key" in out.stderr
    assert out.stdout == ""
    assert step(ock_token, "ock_facts", profile="generic") == {
        "trusted": "TemplateInconsistent",
        "wrap_with_trusted": "AttributeTypeInvalid",
        "AES_KEY_WRAP_PAD": "MechanismInvalid",
        "AES_KEY_WRAP": "MechanismInvalid",
        "AES_CBC_PAD": "ok",
        "has_wrap_key": False,
        "backup": "InvalidArgument",
    }


# --- the steps (a child process each) ------------------------------------------


def _main(argv: list[str]) -> int:  # pragma: no cover (runs in the children)
    args = json.loads(sys.stdin.read())
    print(json.dumps(_STEPS[argv[0]](args)))
    return 0


def _session(args: dict[str, Any]) -> Any:
    """A ``TokenSession`` logged in to the token the step is for."""
    from signd.token.profiles import PROFILES
    from signd.token.session import TokenSession

    ts = TokenSession()
    pin = Path(args["pin"]).read_text().rstrip("\n")
    ts.open(args["module"], args["label"], pin, PROFILES[args.get("profile", "softhsm")])
    return ts


def _raw(args: dict[str, Any], login: bool = True) -> Any:
    """A python-pkcs11 session on the step's token: logged in, or (when this
    process is logged in already: the login is per process) without a PIN."""
    import pkcs11

    token = pkcs11.lib(args["module"]).get_token(token_label=args["label"])
    if not login:
        return token.open(rw=True)
    return token.open(rw=True, user_pin=Path(args["pin"]).read_text().rstrip("\n"))


def _error(exc: Any) -> dict[str, Any]:
    return {"error": type(exc).__name__, "message": exc.message}


def _objects_with_id(args: dict[str, Any], object_id: bytes) -> int:
    from pkcs11 import Attribute

    return len(list(_raw(args, login=False).get_objects({Attribute.ID: object_id})))


def _step_generate(args: dict[str, Any]) -> dict[str, Any]:
    from signd.errors import SigndError
    from signd.keys.algorithms import key_type

    ts = _session(args)
    oid = secrets.token_bytes(16)
    try:
        spki = ts.generate(key_type(args["key_type"]), oid, "wrapkey-test", backup=args["backup"])
    except SigndError as exc:
        return {**_error(exc), "left": _objects_with_id(args, oid)}
    return {"object_id": oid.hex(), "spki": spki.hex()}


def _step_probe(args: dict[str, Any]) -> dict[str, Any]:
    from signd.errors import SigndError

    ts = _session(args)
    try:
        ts.probe_wrappable(bytes.fromhex(args["object_id"]))
    except SigndError as exc:
        return _error(exc)
    return {"ok": True}


def _step_has_wrap_key(args: dict[str, Any]) -> dict[str, Any]:
    return {"present": _session(args).wrap_key_check()}


def _private_key(session: Any, object_id: str) -> Any:
    from pkcs11 import Attribute, ObjectClass

    (key,) = session.get_objects(
        {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: bytes.fromhex(object_id)}
    )
    return key


def _wrap_key(session: Any) -> Any:
    from pkcs11 import Attribute, ObjectClass

    (key,) = session.get_objects(
        {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: WRAP_LABEL}
    )
    return key


def _value_read(key: Any, attribute: Any) -> str:
    """What reading a secret attribute gives: the error's name, never the value."""
    import pkcs11.exceptions as p11e

    try:
        key[attribute]
    except p11e.PKCS11Error as exc:
        return type(exc).__name__
    return "readable"


def _step_wrappable_by_label(args: dict[str, Any]) -> dict[str, Any]:
    """Wrap each private key labelled ``prefix...`` under the wrap key: which could be."""
    import pkcs11
    from pkcs11 import Attribute, Mechanism, ObjectClass

    session = _raw(args)
    wrap = _wrap_key(session)
    wrapped, refused = [], []
    for key in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
        label = key[Attribute.LABEL]
        if not label.startswith(args["prefix"]):
            continue
        try:
            wrap.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
            wrapped.append(label)
        except pkcs11.exceptions.PKCS11Error:
            refused.append(label)
    return {"wrapped": sorted(wrapped), "refused": sorted(refused)}


def _step_attributes(args: dict[str, Any]) -> dict[str, Any]:
    from pkcs11 import Attribute, KeyType

    key = _private_key(_raw(args), args["object_id"])
    names = ["SENSITIVE", "EXTRACTABLE", "WRAP_WITH_TRUSTED", "NEVER_EXTRACTABLE", "SIGN"]
    out: dict[str, Any] = {n: bool(key[Attribute[n]]) for n in names}
    secret = Attribute.PRIVATE_EXPONENT if key.key_type == KeyType.RSA else Attribute.VALUE
    out["value"] = _value_read(key, secret)
    return out


def _step_wrap(args: dict[str, Any]) -> dict[str, Any]:
    import pkcs11.exceptions as p11e
    from pkcs11 import Attribute, KeyType, Mechanism

    session = _raw(args)
    key = _private_key(session, args["object_id"])
    if args["wrap_with"] == "trusted":
        wrap_key = _wrap_key(session)
    else:
        wrap_key = session.generate_key(
            KeyType.AES,
            256,
            label="untrusted",
            template={Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.TOKEN: False},
        )
        assert not wrap_key[Attribute.TRUSTED]
    try:
        wrapped = wrap_key.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    except p11e.PKCS11Error as exc:
        return {"error": type(exc).__name__}
    return {"wrapped": wrapped.hex()}


def _step_unwrap_sign(args: dict[str, Any]) -> dict[str, Any]:
    """Restore a backup as signd would (private, sensitive, extractable,
    wrap-with-trusted, sign only), sign ``message`` (SHA-256), and wrap it again."""
    from pkcs11 import DEFAULT, Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11.util.ec import encode_ecdsa_signature

    session = _raw(args)
    rsa_key = args.get("key_type", "ec-p256").startswith("rsa")
    wrap_key = _wrap_key(session)
    key = wrap_key.unwrap_key(
        ObjectClass.PRIVATE_KEY,
        KeyType.RSA if rsa_key else KeyType.EC,
        bytes.fromhex(args["wrapped"]),
        id=secrets.token_bytes(16),
        label="restored",
        mechanism=Mechanism.AES_KEY_WRAP_PAD,
        store=True,
        template={
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: True,
            Attribute.WRAP_WITH_TRUSTED: True,
            Attribute.SIGN: True,
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
            # SoftHSM refuses these on a private key (FIELD-NOTES)
            Attribute.ENCRYPT: DEFAULT,
            Attribute.VERIFY: DEFAULT,
            Attribute.WRAP: DEFAULT,
        },
    )
    message = bytes.fromhex(args["message"])
    if rsa_key:
        signature = key.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS)
        secret = Attribute.PRIVATE_EXPONENT
    else:
        raw = key.sign(hashlib.sha256(message).digest(), mechanism=Mechanism.ECDSA)
        signature = encode_ecdsa_signature(raw)
        secret = Attribute.VALUE
    wrap_key.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    return {
        "signature": signature.hex(),
        "value": _value_read(key, secret),
        "wrapped_again": True,
    }


def _step_unwrap_template(args: dict[str, Any]) -> dict[str, Any]:
    """The wrap key's CKA_UNWRAP_TEMPLATE: attribute name -> value (hex)."""
    from pkcs11 import Attribute

    from signd.token.arrays import read_array_attribute

    key = _wrap_key(_raw(args, login=False))
    read = read_array_attribute(args["module"], key, Attribute.UNWRAP_TEMPLATE)
    return {"template": {Attribute(t).name: v.hex() for t, v in read.items()}}


def _step_old_wrap_key(args: dict[str, Any]) -> dict[str, Any]:
    """A wrap key as signd made it before the unwrap template, by the SO."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    token = pkcs11.lib(args["module"]).get_token(token_label=args["label"])
    so_pin = (Path(args["pin"]).parent / "so.pin").read_text().rstrip("\n")
    with token.open(rw=True, so_pin=so_pin) as session:
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.LABEL: WRAP_LABEL,
                Attribute.ID: secrets.token_bytes(16),
                Attribute.VALUE: secrets.token_bytes(32),
                Attribute.TRUSTED: True,
                Attribute.WRAP: True,
                Attribute.UNWRAP: True,
                Attribute.ENCRYPT: False,
                Attribute.DECRYPT: False,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.MODIFIABLE: False,
                Attribute.COPYABLE: False,
            }
        )
    return {"made": True}


#: The unwraps of a backup ``_step_unwrap_attempts`` tries: name -> (logged
#: in, unwrapped as a secret key, template).  Each asks for an extractable
#: token object (SoftHSM: a value is readable only if extractable, and
#: extractable is false unless asked for).
_ATTEMPTS: dict[str, tuple[bool, bool, dict[str, bool]]] = {
    "readable, no login": (False, False, {"PRIVATE": False, "SENSITIVE": False}),
    "sensitive but public, no login": (
        False,
        False,
        {"PRIVATE": False, "SENSITIVE": True, "WRAP_WITH_TRUSTED": True},
    ),
    "readable private, no login": (False, False, {"PRIVATE": True, "SENSITIVE": False}),
    "readable": (True, False, {"SENSITIVE": False, "WRAP_WITH_TRUSTED": True}),
    "not wrap-with-trusted": (True, False, {"SENSITIVE": True, "WRAP_WITH_TRUSTED": False}),
    "as a readable secret key": (True, True, {"SENSITIVE": False, "WRAP_WITH_TRUSTED": True}),
}


def _step_unwrap_attempts(args: dict[str, Any]) -> dict[str, Any]:
    """Unwrap the backup ``wrapped`` (an EC key whose SPKI is ``spki``) as
    each of ``_ATTEMPTS``, first without a login, then logged in; each
    outcome is the token's refusal, or the worst the caller can do with the
    key: read it, wrap it under a key of their own and read it, or sign.
    ``left``: how many of the attempts left an object on the token."""
    import pkcs11.exceptions as p11e
    from asn1crypto import keys as asn1_keys  # type: ignore[import-untyped]  # python-pkcs11 needs it
    from cryptography.hazmat.primitives import keywrap
    from pkcs11 import DEFAULT, Attribute, KeyType, Mechanism, ObjectClass

    wrapped, spki = bytes.fromhex(args["wrapped"]), bytes.fromhex(args["spki"])
    own_value = secrets.token_bytes(32)  # an AES key the caller knows
    no_login = _raw(args, login=False)  # before this process logs in
    own = no_login.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.TOKEN: False,
            Attribute.PRIVATE: False,
            Attribute.VALUE: own_value,
            Attribute.WRAP: True,
        }
    )

    def worst(key: Any) -> str:
        if _value_read(key, Attribute.VALUE) == "readable":
            return "readable"
        try:
            again = own.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        except p11e.PKCS11Error:
            pass
        else:
            # PKCS#8 with the curve's explicit parameters, which cryptography refuses
            der = keywrap.aes_key_unwrap_with_padding(own_value, again)
            info = asn1_keys.PrivateKeyInfo.load(der)
            scalar = info["private_key"].parsed["private_key"].native
            private = ec.derive_private_key(scalar, ec.SECP256R1())
            public = private.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return "re-wrapped and read" if public == spki else "re-wrapped"
        try:
            key.sign(bytes(32), mechanism=Mechanism.ECDSA)
        except p11e.PKCS11Error as exc:
            return f"unusable ({type(exc).__name__})"
        return "signs"

    outcomes, ids = {}, []
    session = no_login
    for name, (login, as_secret, attrs) in _ATTEMPTS.items():
        if login and session is no_login:
            session = _raw(args)
        template: dict[Any, Any] = {Attribute[a]: v for a, v in attrs.items()}
        template[Attribute.EXTRACTABLE] = True
        if not as_secret:  # SoftHSM refuses these on a private key (FIELD-NOTES)
            template.update({a: DEFAULT for a in (Attribute.ENCRYPT, Attribute.VERIFY)})
            template[Attribute.WRAP] = DEFAULT
        ids.append(secrets.token_bytes(16))
        wrap_key = _wrap_key(session)
        try:
            key = wrap_key.unwrap_key(
                ObjectClass.SECRET_KEY if as_secret else ObjectClass.PRIVATE_KEY,
                KeyType.GENERIC_SECRET if as_secret else KeyType.EC,
                wrapped,
                id=ids[-1],
                label="attempt",
                mechanism=Mechanism.AES_KEY_WRAP_PAD,
                store=True,
                template=template,
            )
        except p11e.PKCS11Error as exc:
            outcomes[name] = type(exc).__name__
            continue
        outcomes[name] = worst(key)
    left = sum(1 for oid in ids for _ in session.get_objects({Attribute.ID: oid}))
    return {"outcomes": outcomes, "left": left}


def _step_wrap_key_attributes(args: dict[str, Any]) -> dict[str, Any]:
    import pkcs11.exceptions as p11e
    from pkcs11 import Attribute

    session = _raw(args)
    key = _wrap_key(session)
    names = [
        "TRUSTED", "WRAP", "UNWRAP", "ENCRYPT", "DECRYPT", "SIGN", "VERIFY", "DERIVE",
        "SENSITIVE", "EXTRACTABLE", "PRIVATE", "MODIFIABLE", "COPYABLE",
    ]  # fmt: skip
    attributes: dict[str, Any] = {n: bool(key[Attribute[n]]) for n in names}
    attributes["VALUE_LEN"] = key[Attribute.VALUE_LEN]
    out: dict[str, Any] = {"attributes": attributes, "value": _value_read(key, Attribute.VALUE)}
    try:
        key[Attribute.DECRYPT] = True
        out["set_decrypt"] = "ok"
    except p11e.PKCS11Error as exc:
        out["set_decrypt"] = str(exc) or type(exc).__name__
    try:
        key.copy({Attribute.DECRYPT: True, Attribute.TOKEN: False})
        out["copy_with_decrypt"] = "ok"
    except p11e.PKCS11Error as exc:
        out["copy_with_decrypt"] = str(exc) or type(exc).__name__
    return out


def _step_so_private_object(args: dict[str, Any]) -> dict[str, Any]:
    import pkcs11
    import pkcs11.exceptions as p11e
    from pkcs11 import Attribute, KeyType, ObjectClass

    token = pkcs11.lib(args["module"]).get_token(token_label=args["label"])
    so_pin = (Path(args["pin"]).parent / "so.pin").read_text().rstrip("\n")
    with token.open(rw=True, so_pin=so_pin) as session:
        try:
            obj = session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.TOKEN: False,
                    Attribute.PRIVATE: True,
                    Attribute.VALUE: secrets.token_bytes(32),
                }
            )
        except p11e.PKCS11Error as exc:
            return {"error": type(exc).__name__}
        obj.destroy()
        return {"error": None}


def _step_probe_raw_ed25519(args: dict[str, Any]) -> dict[str, Any]:
    """An extractable, wrap-with-trusted Ed25519 key made here (``generate``
    would not keep one), then ``probe_wrappable`` on it."""
    from pkcs11 import Attribute, KeyType, Mechanism

    from signd.errors import SigndError
    from signd.token.profiles import ED25519_STRING

    ts = _session(args)
    session = _raw(args, login=False)
    oid = secrets.token_bytes(16)
    params = session.create_domain_parameters(
        KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: ED25519_STRING}, local=True
    )
    params.generate_keypair(
        mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
        store=True,
        id=oid,
        private_template={
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: True,
            Attribute.WRAP_WITH_TRUSTED: True,
        },
    )
    try:
        ts.probe_wrappable(oid)
    except SigndError as exc:
        return _error(exc)
    return {"ok": True}


def _step_ock_facts(args: dict[str, Any]) -> dict[str, Any]:
    import pkcs11.exceptions as p11e
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    from signd.errors import SigndError
    from signd.keys.algorithms import key_type

    def answer(call: Any) -> str:
        try:
            call()
        except (p11e.PKCS11Error, SigndError) as exc:
            return type(exc).__name__
        return "ok"

    ts = _session(args)
    session = _raw(args, login=False)
    aes = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.TOKEN: False,
        Attribute.VALUE: secrets.token_bytes(32),
        Attribute.WRAP: True,
    }
    out = {"trusted": answer(lambda: session.create_object({**aes, Attribute.TRUSTED: True}))}
    extractable = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True}
    out["wrap_with_trusted"] = answer(
        lambda: session.generate_keypair(
            KeyType.RSA,
            2048,
            private_template={**extractable, Attribute.WRAP_WITH_TRUSTED: True},
        )
    )
    wrap_key = session.create_object(aes)
    _, key = session.generate_keypair(KeyType.RSA, 2048, private_template=extractable)
    for mech, param in [
        (Mechanism.AES_KEY_WRAP_PAD, None),
        (Mechanism.AES_KEY_WRAP, None),
        (Mechanism.AES_CBC_PAD, bytes(16)),
    ]:
        out[mech.name] = answer(
            lambda m=mech, p=param: wrap_key.wrap_key(key, mechanism=m, mechanism_param=p)
        )
    out["has_wrap_key"] = ts.wrap_key_check()
    oid = secrets.token_bytes(16)
    out["backup"] = answer(lambda: ts.generate(key_type("rsa-2048"), oid, "ock", backup=True))
    return out


_STEPS = {
    "generate": _step_generate,
    "probe": _step_probe,
    "has_wrap_key": _step_has_wrap_key,
    "attributes": _step_attributes,
    "wrap": _step_wrap,
    "unwrap_sign": _step_unwrap_sign,
    "unwrap_template": _step_unwrap_template,
    "old_wrap_key": _step_old_wrap_key,
    "unwrap_attempts": _step_unwrap_attempts,
    "wrap_key_attributes": _step_wrap_key_attributes,
    "so_private_object": _step_so_private_object,
    "probe_raw_ed25519": _step_probe_raw_ed25519,
    "ock_facts": _step_ock_facts,
    "wrappable_by_label": _step_wrappable_by_label,
}


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
