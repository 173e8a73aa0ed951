"""HMAC keys (``hmac-sha256``/``-384``/``-512``): API secrets on the token.

Three layers, as elsewhere:

* in process (``FakePool``, which MACs with Python's ``hmac``): what the
  service answers: sign, sign_batch and verify, the options refused, rotation
  with a grace window, public_key / jwks / key_info, backup and restore;
* the token (SoftHSM, a child process per step, as ``test_backup_token.py``):
  a secret of known value created with ``hmac_secret_template`` as an import
  would, whose MACs through ``TokenSession.run_jobs`` are Python's for 1,000
  random messages; its value (and a generated one's) cannot be read; a
  backup-able secret wraps and restores onto another token of the ceremony;
* the daemon (real socket, real token): create, sign, verify, rotate.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from fakes import FakePool, Harness, open_harness, principal
from signd.errors import InvalidArgument, UnsupportedAlgorithm, VersionNotUsable
from signd.keys import algorithms
from signd.protocol import (
    BackupArgs,
    CreateKeyArgs,
    DestroyArgs,
    JwksArgs,
    KeyRefArgs,
    PublicKeyArgs,
    RotateArgs,
    SignArgs,
    SignBatchArgs,
    VerifyArgs,
    VersionRefArgs,
)
from signd_client.bundle import restore_calls
from support import run_step
from test_backup_token import Ceremony, token_a, token_b  # noqa: F401 (fixtures)

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv

ROOT = principal(0, user="root")
HMAC_TYPES = ["hmac-sha256", "hmac-sha384", "hmac-sha512"]


def step(token: TokenEnv, name: str, **args: Any) -> dict[str, Any]:
    """Run this file's step ``name`` in a child process on ``token``."""
    return run_step(__file__, token, name, **args)


def _mac(secret: bytes, message: bytes, key_type: str) -> bytes:
    return hmac.new(secret, message, key_type.removeprefix("hmac-")).digest()


async def _create(h: Harness, name: str, key_type: str = "hmac-sha256", **kw: Any) -> Any:
    return await h.connect(ROOT).call("create_key", CreateKeyArgs(key=name, type=key_type, **kw))


# --- key types and options (pure) ------------------------------------------------


def test_hmac_key_types_and_their_options() -> None:
    for name in HMAC_TYPES:
        kt = algorithms.key_type(name)
        assert kt.family is algorithms.Family.HMAC
        assert kt.default_hash == name.removeprefix("hmac-")
        opts = algorithms.options(kt, None, None, None, by_digest=False)
        assert (opts.scheme, opts.algorithm) == (algorithms.Scheme.HMAC, name)
        assert algorithms.options(kt, kt.default_hash, None, None, by_digest=False) == opts
    kt = algorithms.key_type("hmac-sha256")
    plan = algorithms.plan_sign(kt, SignArgs(key="k", message=b"m"), hashlib.sha256(b"m").digest())
    assert plan.data == b"m"  # the token MACs the message, not a digest of it
    with pytest.raises(ValueError, match="no public key"):
        algorithms.load_public_key(kt, b"")


# --- in process: the service ------------------------------------------------------


@pytest.mark.parametrize("key_type", HMAC_TYPES)
async def test_sign_is_the_mac_and_verify_finds_it(autojump_clock: Any, key_type: str) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        await _create(h, "api", key_type)
        secret = h.pool.secret("api", 1)
        assert len(secret) == algorithms.key_type(key_type).bits // 8
        signed = await c.call("sign", SignArgs(key="api", message=b"GET /v1/orders"))
        assert signed.signature == _mac(secret, b"GET /v1/orders", key_type)
        assert (signed.version, signed.algorithm) == (1, key_type)
        ok = await c.call(
            "verify", VerifyArgs(key="api", message=b"GET /v1/orders", signature=signed.signature)
        )
        assert (ok.valid, ok.version, ok.algorithm) == (True, 1, key_type)
        bad = await c.call(
            "verify", VerifyArgs(key="api", message=b"GET /v1/order", signature=signed.signature)
        )
        assert not bad.valid
        short = await c.call(
            "verify",
            VerifyArgs(key="api", message=b"GET /v1/orders", signature=signed.signature[:16]),
        )
        assert not short.valid  # a truncated MAC is not the MAC
        messages = tuple(b"item %d" % i for i in range(20))
        batch = await c.call("sign_batch", SignBatchArgs(key="api", messages=messages))
        assert [r.signature for r in batch.results] == [_mac(secret, m, key_type) for m in messages]
        assert batch.algorithm == key_type


async def test_the_options_a_mac_does_not_take_are_refused(autojump_clock: Any) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        await _create(h, "api")
        digest = hashlib.sha256(b"m").digest()
        refused: list[tuple[str, Any, str]] = [
            ("sign", SignArgs(key="api", digest=digest, hash="sha256"), "not a digest"),
            ("sign", SignArgs(key="api", message=b"m", hash="sha384"), "can only be 'sha256'"),
            ("sign", SignArgs(key="api", message=b"m", format="raw"), "'format' does not apply"),
            ("sign", SignArgs(key="api", message=b"m", padding="pss"), "'padding' does not apply"),
            (
                "sign_batch",
                SignBatchArgs(key="api", digests=(digest,), hash="sha256"),
                "not a digest",
            ),
            (
                "verify",
                VerifyArgs(key="api", digest=digest, hash="sha256", signature=bytes(32)),
                "not a digest",
            ),
            (
                "verify",
                VerifyArgs(key="api", message=b"m", hash="sha512", signature=bytes(32)),
                "can only be 'sha256'",
            ),
        ]
        for op, args, why in refused:
            with pytest.raises(InvalidArgument, match=why):
                await c.call(op, args)
        # the key's own hash, named, is fine
        named = await c.call("sign", SignArgs(key="api", message=b"m", hash="sha256"))
        assert named.signature == _mac(h.pool.secret("api", 1), b"m", "hmac-sha256")


async def test_no_public_key_public_key_refused_jwks_skips_key_info_has_none(
    autojump_clock: Any,
) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        info = await _create(h, "api")
        assert [v.public_key_pem for v in info.versions] == [None]
        await c.call("create_key", CreateKeyArgs(key="jwt", type="ec-p256"))
        with pytest.raises(UnsupportedAlgorithm, match="no public key"):
            await c.call("public_key", PublicKeyArgs(key="api"))
        jwks = await c.call("jwks", JwksArgs(keys=("api", "jwt")))
        assert [k.kid for k in jwks.keys] == ["jwt:1"]
        # the record keeps each version's check value, nothing of the secret
        record = h.pool.record("api")
        secret = h.pool.secret("api", 1)
        check = hmac.new(secret, algorithms.HMAC_CHECK_MESSAGE, hashlib.sha256).digest()[:16]
        assert record.versions[0].check == check
        assert secret.hex() not in record.to_bytes().decode()


async def test_rotation_keeps_the_old_secret_valid_for_the_grace_window(
    autojump_clock: Any,
) -> None:
    """The zero-downtime pattern: after a rotation both secrets verify until
    the old one's grace ends; signing uses the new one."""
    async with open_harness() as h:
        c = h.connect(ROOT)
        await _create(h, "api", verify_grace=600.0)
        old = (await c.call("sign", SignArgs(key="api", message=b"req"))).signature
        await c.call("rotate", RotateArgs(key="api"))
        new = await c.call("sign", SignArgs(key="api", message=b"req"))
        assert new.version == 2
        assert new.signature == _mac(h.pool.secret("api", 2), b"req", "hmac-sha256")
        assert new.signature != old
        for sig, version in ((old, 1), (new.signature, 2)):
            ok = await c.call("verify", VerifyArgs(key="api", message=b"req", signature=sig))
            assert (ok.valid, ok.version) == (True, version)
        await trio.sleep(601)  # the mock clock: the grace window ends
        gone = await c.call("verify", VerifyArgs(key="api", message=b"req", signature=old))
        assert not gone.valid
        still = await c.call(
            "verify", VerifyArgs(key="api", message=b"req", signature=new.signature)
        )
        assert (still.valid, still.version) == (True, 2)


async def test_disable_destroy_and_enable_apply_to_hmac_versions(autojump_clock: Any) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        await _create(h, "api", deletion_allowed=True)
        sig = (await c.call("sign", SignArgs(key="api", message=b"m"))).signature
        await c.call("disable", VersionRefArgs(key="api", version=1))
        with pytest.raises(VersionNotUsable):
            await c.call("sign", SignArgs(key="api", message=b"m"))
        assert not (
            await c.call("verify", VerifyArgs(key="api", message=b"m", signature=sig))
        ).valid
        await c.call("enable", VersionRefArgs(key="api", version=1))
        assert (await c.call("verify", VerifyArgs(key="api", message=b"m", signature=sig))).valid
        await c.call("rotate", RotateArgs(key="api"))
        info = await c.call("destroy", DestroyArgs(key="api", version=1))
        assert [v.state for v in info.versions] == ["destroyed", "active"]
        assert not h.pool.has_private("api", 1)
        # the key still loads (a destroyed secret leaves nothing on the token)
        await h.service.load()
        assert (await c.call("key_info", KeyRefArgs(key="api"))).current_version == 2


async def test_backup_and_restore_of_an_hmac_key(autojump_clock: Any) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        await _create(h, "api", backup=True, deletion_allowed=True)
        await c.call("rotate", RotateArgs(key="api"))
        await c.call("rotate", RotateArgs(key="api"))
        await c.call("destroy", DestroyArgs(key="api", version=1))
        secrets_ = {v: h.pool.secret("api", v) for v in (2, 3)}
        made = await c.call("backup", BackupArgs(keys=("api",)))
        for secret in secrets_.values():
            assert secret not in made.bundle
        record = h.pool.record("api")
    async with open_harness(FakePool()) as h2:
        c2 = h2.connect(ROOT)
        results = [await c2.call(x.op, x.args) for x in restore_calls(made.bundle)]
        assert [(r.key, r.outcome, r.restored) for r in results] == [("api", "created", (1, 2, 3))]
        assert h2.pool.record("api").to_bytes() == record.to_bytes()
        signed = await c2.call("sign", SignArgs(key="api", message=b"m"))
        assert signed.signature == _mac(secrets_[3], b"m", "hmac-sha256")
        # and restoring it again changes nothing
        again = [await c2.call(x.op, x.args) for x in restore_calls(made.bundle)]
        assert [r.outcome for r in again] == ["unchanged"]


async def test_an_hmac_key_without_backup_is_skipped_by_a_backup(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await _create(h, "api")
        made = await h.connect(ROOT).call("backup", BackupArgs())
        assert made.skipped == ("api",)


# --- the token --------------------------------------------------------------------


@pytest.mark.parametrize("key_type", HMAC_TYPES)
def test_a_known_secret_macs_as_python_does_and_cannot_be_read(
    own_token: TokenEnv, key_type: str
) -> None:
    """A secret made on the token from a known value, as an import makes one
    (``hmac_secret_template`` and CKA_VALUE): its MAC through ``run_jobs``
    (the worker's hot path) is Python's ``hmac`` for 1,000 random messages,
    ``verify_mac`` accepts each and refuses a changed one, and CKA_VALUE
    cannot be read back (AttributeSensitive)."""
    secret = secrets.token_bytes(algorithms.key_type(key_type).bits // 8)
    count = 1000 if key_type == "hmac-sha256" else 100
    messages = [secrets.token_bytes(secrets.randbelow(200)) for _ in range(count)]
    out = step(
        own_token,
        "known_secret",
        key_type=key_type,
        secret=secret.hex(),
        messages=[m.hex() for m in messages],
    )
    assert [bytes.fromhex(m) for m in out["macs"]] == [_mac(secret, m, key_type) for m in messages]
    assert out["verified"] == [[1, key_type]] * len(messages)
    assert out["changed"] is None
    assert out["value"] == "AttributeSensitive"
    check = hmac.new(secret, algorithms.HMAC_CHECK_MESSAGE, hashlib.sha256).digest()[:16]
    assert out["check"] == check.hex()


@pytest.mark.parametrize("backup", [False, True])
def test_a_generated_secret_is_sensitive_and_signs(own_token: TokenEnv, backup: bool) -> None:
    out = step(own_token, "generated", key_type="hmac-sha256", backup=backup)
    if backup:  # own_token has no wrap key
        assert out["error"] == "InvalidArgument"
        return
    assert out["attributes"] == {
        "CLASS": "SECRET_KEY",
        "KEY_TYPE": "GENERIC_SECRET",
        "VALUE_LEN": 32,
        "TOKEN": True,
        "PRIVATE": True,
        "SIGN": True,
        "VERIFY": True,
        "ENCRYPT": False,
        "DECRYPT": False,
        "WRAP": False,
        "UNWRAP": False,
        "DERIVE": False,
        "SENSITIVE": True,
        "EXTRACTABLE": False,
        "value": "AttributeSensitive",
    }
    assert out["verified"] == [1, "hmac-sha256"]
    assert len(bytes.fromhex(out["check"])) == 16
    assert out["public_keys"] == out["check"]  # the check value stands in for an SPKI


def test_an_hmac_key_on_opencryptoki(ock_token: TokenEnv) -> None:
    """opencryptoki's soft token (3.8) lists the HMAC mechanisms too: the same
    template generates a secret there that MACs, verifies and cannot be read."""
    out = step(ock_token, "generated", key_type="hmac-sha256", backup=False, profile="generic")
    assert "error" not in out, out
    assert out["verified"] == [1, "hmac-sha256"]
    assert out["attributes"]["value"] == "AttributeSensitive"
    assert out["attributes"]["EXTRACTABLE"] is False
    assert out["public_keys"] == out["check"]


def test_a_backed_up_secret_restores_on_another_token_of_the_ceremony(
    token_a: Ceremony,  # noqa: F811
    token_b: Ceremony,  # noqa: F811
) -> None:
    made = step(token_a.token, "generate", key_type="hmac-sha256", backup=True)
    assert "error" not in made, made
    wrapped = step(token_a.token, "wrap_private", object_id=made["object_id"])["wrapped"]
    restored = step(
        token_b.token,
        "restore",
        key_type="hmac-sha256",
        object_id=made["object_id"],
        object_label="hmac-restored",
        spki=made["spki"],
        wrapped=wrapped,
    )
    assert restored == {"restored": True, "left": 1}
    message = b"the same secret on both tokens"
    mac_a = step(token_a.token, "mac_with", object_id=made["object_id"], message=message.hex())
    mac_b = step(token_b.token, "mac_with", object_id=made["object_id"], message=message.hex())
    assert mac_a == mac_b
    assert mac_b["attributes"]["SENSITIVE"] is True
    assert mac_b["attributes"]["EXTRACTABLE"] is True  # backup-able again
    assert mac_b["attributes"]["WRAP_WITH_TRUSTED"] is True
    # a blob restored against another check value is refused, and nothing is left
    other = step(
        token_b.token,
        "restore",
        key_type="hmac-sha256",
        object_id=secrets.token_bytes(16).hex(),
        object_label="hmac-refused",
        spki=bytes(16).hex(),
        wrapped=wrapped,
    )
    assert other["error"] == "InvalidArgument"
    assert "check value" in other["message"]
    assert other["left"] == 0


# --- the daemon -------------------------------------------------------------------


def test_hmac_through_the_daemon(
    make_daemon: Callable[..., Daemon], key_name: str, tmp_path: Path
) -> None:
    """Create, sign (a request's MAC), verify, rotate with overlap, and the
    refusals, through a real daemon on a real token; a replay-checked verify
    of a MAC (valid, then replayed, also after a restart); a restarted daemon
    loads the key from the token and verifies both versions."""
    from signd_client import replay

    signd = make_daemon(f'[state]\ndir = "{tmp_path / "state"}"\n')
    from signd_client.errors import InvalidArgument as ClientInvalidArgument
    from signd_client.errors import UnsupportedAlgorithm as ClientUnsupported

    with signd.client(timeout=30.0) as c:
        info = c.create_key(key_name, "hmac-sha256", verify_grace=3600.0)
        assert info.type == "hmac-sha256"
        assert info.versions[0].public_key_pem is None
        v1 = c.sign(key_name, b"POST /orders\n{}").signature
        assert len(v1) == 32
        assert c.verify(key_name, v1, b"POST /orders\n{}").version == 1
        assert not c.verify(key_name, v1, b"POST /orders\n{ }").valid
        c.rotate(key_name)
        v2 = c.sign(key_name, b"POST /orders\n{}")
        assert v2.version == 2
        assert v2.signature != v1
        assert c.verify(key_name, v1, b"POST /orders\n{}").version == 1
        assert c.verify(key_name, v2.signature, b"POST /orders\n{}").version == 2
        batch = c.sign_batch(key_name, [b"a", b"b"])
        assert [r.signature for r in batch.results] == [
            c.sign(key_name, b"a").signature,
            c.sign(key_name, b"b").signature,
        ]
        with pytest.raises(ClientInvalidArgument):
            c.sign(key_name, digest=bytes(32), hash="sha256")
        with pytest.raises(ClientUnsupported):
            c.public_key(key_name)
        assert c.jwks([key_name]).keys == ()
        ts, nonce = replay.fresh()
        mac = c.sign(key_name, replay.signed_payload(b"GET /balance", ts, nonce)).signature
        checked = c.verify(key_name, mac, b"GET /balance", timestamp=ts, nonce=nonce)
        assert (checked.status, checked.valid) == ("valid", True)
        again = c.verify(key_name, mac, b"GET /balance", timestamp=ts, nonce=nonce)
        assert (again.status, again.valid) == ("replayed", False)
        forged = c.verify(key_name, mac, b"GET /balanc3", timestamp=ts, nonce=nonce)
        assert forged.status == "invalid"
    signd.restart()
    with signd.client(timeout=30.0) as c:
        assert c.verify(key_name, v1, b"POST /orders\n{}").version == 1
        after = c.verify(key_name, mac, b"GET /balance", timestamp=ts, nonce=nonce)
        assert after.status == "replayed"


# --- the steps (a child process each) ---------------------------------------------


def _main(argv: list[str]) -> int:  # pragma: no cover (runs in the children)
    args = json.loads(sys.stdin.read())
    print(json.dumps(_STEPS[argv[0]](args)))
    return 0


_ATTRIBUTES = (
    "CLASS",
    "KEY_TYPE",
    "VALUE_LEN",
    "TOKEN",
    "PRIVATE",
    "SIGN",
    "VERIFY",
    "ENCRYPT",
    "DECRYPT",
    "WRAP",
    "UNWRAP",
    "DERIVE",
    "SENSITIVE",
    "EXTRACTABLE",
)


def _attributes(key: Any, names: tuple[str, ...] = _ATTRIBUTES) -> dict[str, Any]:
    """``key``'s attributes by name, and what reading its CKA_VALUE answers."""
    import pkcs11.exceptions as p11e
    from pkcs11 import Attribute

    out: dict[str, Any] = {}
    for name in names:
        value = key[Attribute[name]]
        out[name] = value.name if hasattr(value, "name") else value
    try:
        key[Attribute.VALUE]
        out["value"] = "READABLE"
    except p11e.PKCS11Error as exc:
        out["value"] = type(exc).__name__
    return out


def _step_known_secret(args: dict[str, Any]) -> dict[str, Any]:
    from pkcs11 import Attribute

    from signd.token.ipc import SignJob, VerifyJob
    from signd.token.session import hmac_secret_template
    from test_wrapkey import _session

    ts = _session(args)
    kt = algorithms.key_type(args["key_type"])
    oid = secrets.token_bytes(16)
    template = hmac_secret_template(kt, "hmac-known", oid, False)
    template[Attribute.VALUE] = bytes.fromhex(args["secret"])
    key = ts._session.create_object(template)
    messages = [bytes.fromhex(m) for m in args["messages"]]
    jobs = []
    for m in messages:
        plan = algorithms.plan_sign(kt, SignArgs(key="k", message=m))
        jobs.append(SignJob(oid, plan.scheme, plan.hash.name if plan.hash else None, plan.data))
    outcomes = ts.run_jobs(jobs, lambda job: None)
    assert all(ok for ok, *_ in outcomes), outcomes[:3]
    macs = [bytes(value) for _, value in outcomes]

    def verify_job(message: bytes, mac: bytes) -> VerifyJob:
        return VerifyJob(kt.name, ((1, oid),), message, None, None, None, None, mac)

    verified = [ts.verify_mac(verify_job(m, mac)) for m, mac in zip(messages, macs, strict=True)]
    changed = ts.verify_mac(verify_job(messages[0] + b"!", macs[0]))
    return {
        "macs": [m.hex() for m in macs],
        "verified": verified,
        "changed": changed,
        "value": _attributes(key, ())["value"],
        "check": ts.public_keys([oid])[oid][0].hex(),
    }


def _step_generated(args: dict[str, Any]) -> dict[str, Any]:
    from pkcs11 import Attribute, ObjectClass

    from signd.errors import SigndError
    from signd.token.ipc import VerifyJob
    from test_wrapkey import _error, _session

    ts = _session(args)
    kt = algorithms.key_type(args["key_type"])
    oid = secrets.token_bytes(16)
    try:
        check = ts.generate(kt, oid, "hmac-generated", backup=args["backup"])
    except SigndError as exc:
        return _error(exc)
    (key,) = ts._session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: oid})
    message = b"a request"
    (outcome,) = ts.run_jobs(
        [
            _sign_job(kt, oid, message),
        ],
        lambda job: None,
    )
    mac = bytes(outcome[1])
    job = VerifyJob(kt.name, ((1, oid),), message, None, None, None, None, mac)
    return {
        "attributes": _attributes(key),
        "verified": ts.verify_mac(job),
        "check": check.hex(),
        "public_keys": ts.public_keys([oid])[oid][0].hex(),
    }


def _sign_job(kt: algorithms.KeyType, oid: bytes, message: bytes) -> Any:
    from signd.token.ipc import SignJob

    plan = algorithms.plan_sign(kt, SignArgs(key="k", message=message))
    assert plan.hash is not None
    return SignJob(oid, plan.scheme, plan.hash.name, plan.data)


def _step_mac_with(args: dict[str, Any]) -> dict[str, Any]:
    """The MAC of ``message`` with secret ``object_id`` (as signd signs), and
    the secret's attributes."""
    from pkcs11 import Attribute, ObjectClass

    from test_wrapkey import _session

    ts = _session(args)
    oid = bytes.fromhex(args["object_id"])
    kt = algorithms.key_type("hmac-sha256")
    (outcome,) = ts.run_jobs([_sign_job(kt, oid, bytes.fromhex(args["message"]))], lambda j: None)
    (key,) = ts._session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: oid})
    return {
        "mac": bytes(outcome[1]).hex(),
        "attributes": _attributes(key, ("SENSITIVE", "EXTRACTABLE", "WRAP_WITH_TRUSTED")),
    }


def _step_generate(args: dict[str, Any]) -> dict[str, Any]:
    from test_wrapkey import _step_generate as generate_step

    return generate_step(args)


def _step_wrap_private(args: dict[str, Any]) -> dict[str, Any]:
    from test_backup_token import _step_wrap_private as wrap_step

    return wrap_step(args)


def _step_restore(args: dict[str, Any]) -> dict[str, Any]:
    from test_backup_token import _step_restore as restore_step

    return restore_step(args)


_STEPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "known_secret": _step_known_secret,
    "generated": _step_generated,
    "mac_with": _step_mac_with,
    "generate": _step_generate,
    "wrap_private": _step_wrap_private,
    "restore": _step_restore,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main(sys.argv[1:]))
