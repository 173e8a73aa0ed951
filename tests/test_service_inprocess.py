"""The service's operations, in process: ``Service.handle`` on a token in memory.

Every operation goes through ``Service.handle`` with a principal built here
and a reply callback that decodes the frame; signatures are checked with
``cryptography`` on the public key the service hands out.  The real token
and daemon are tested in test_daemon.py and test_sign_batch.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from fakes import FAKE_INFO, FakePool, open_harness, principal
from signd.audit.log import AUDIT_KEY
from signd.config import ConfigError, load_config
from signd.errors import (
    Busy,
    Conflict,
    DeletionNotAllowed,
    InvalidArgument,
    InvalidDigest,
    KeyExists,
    KeyNotFound,
    PermissionDenied,
    TokenError,
    TokenUnavailable,
    UnsupportedAlgorithm,
    VersionNotUsable,
)
from signd.protocol import (
    CreateKeyArgs,
    DestroyArgs,
    Empty,
    JwksArgs,
    KeyInfo,
    KeyList,
    KeyRefArgs,
    PublicKeyArgs,
    RotateArgs,
    SignArgs,
    SignBatchArgs,
    UpdateKeyArgs,
    VerifyArgs,
    VersionRefArgs,
)

ROOT = principal(0, user="root")
MESSAGE = b"signed in process"


def load_pem(pem: str) -> Any:
    return serialization.load_pem_public_key(pem.encode())


def check(pub: Any, signature: bytes, message: bytes, *, pss: bool = False) -> None:
    """An independent verification (``cryptography`` only).  Raises: InvalidSignature."""
    if isinstance(pub, ed25519.Ed25519PublicKey):
        pub.verify(signature, message)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        h = hashes.SHA256() if pub.curve.key_size == 256 else hashes.SHA384()
        pub.verify(signature, message, ec.ECDSA(h))
    else:
        assert isinstance(pub, rsa.RSAPublicKey)
        pad: padding.AsymmetricPadding = (
            padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
            if pss
            else padding.PKCS1v15()
        )
        pub.verify(signature, message, pad, hashes.SHA256())


@pytest.mark.parametrize("kt", ["ec-p256", "ec-p384", "ed25519", "rsa-2048"])
async def test_create_sign_and_verify_each_key_type(autojump_clock: Any, kt: str) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        info = await c.call("create_key", CreateKeyArgs(key="k", type=kt))
        assert isinstance(info, KeyInfo)
        assert (info.name, info.type, info.current_version, info.created_version) == ("k", kt, 1, 1)
        pub = load_pem((await c.call("public_key", PublicKeyArgs(key="k"))).public_key_pem)
        signed = await c.call("sign", SignArgs(key="k", message=MESSAGE))
        assert (signed.key, signed.version) == ("k", 1)
        check(pub, signed.signature, MESSAGE)
        with pytest.raises(InvalidSignature):
            check(pub, signed.signature, MESSAGE + b"!")
        ok = await c.call(
            "verify", VerifyArgs(key="k", signature=signed.signature, message=MESSAGE)
        )
        assert (ok.valid, ok.version, ok.algorithm) == (True, 1, signed.algorithm)
        bad = await c.call("verify", VerifyArgs(key="k", signature=signed.signature, message=b"x"))
        assert bad.valid is False


async def test_digest_raw_format_and_pss(autojump_clock: Any) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="ec", type="ec-p256"))
        await c.call("create_key", CreateKeyArgs(key="rsa", type="rsa-2048"))
        ec_pub = load_pem((await c.call("public_key", PublicKeyArgs(key="ec"))).public_key_pem)
        digest = hashlib.sha256(MESSAGE).digest()
        raw = await c.call("sign", SignArgs(key="ec", digest=digest, hash="sha256", format="raw"))
        assert len(raw.signature) == 64
        r, s = int.from_bytes(raw.signature[:32], "big"), int.from_bytes(raw.signature[32:], "big")
        check(ec_pub, utils.encode_dss_signature(r, s), MESSAGE)
        rsa_pub = load_pem((await c.call("public_key", PublicKeyArgs(key="rsa"))).public_key_pem)
        pss = await c.call("sign", SignArgs(key="rsa", message=MESSAGE, padding="pss"))
        assert pss.algorithm == "rsa-pss-sha256"
        check(rsa_pub, pss.signature, MESSAGE, pss=True)
        with pytest.raises(InvalidDigest):
            await c.call("sign", SignArgs(key="ec", digest=b"short", hash="sha256"))
        with pytest.raises(InvalidArgument, match="padding"):
            await c.call("sign", SignArgs(key="ec", message=MESSAGE, padding="pss"))


async def test_sign_batch_answers_every_item_in_order(autojump_clock: Any) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="b", type="ec-p256"))
        pub = load_pem((await c.call("public_key", PublicKeyArgs(key="b"))).public_key_pem)
        messages = [b"m%d" % i for i in range(20)]
        out = await c.call("sign_batch", SignBatchArgs(key="b", messages=tuple(messages)))
        assert (out.key, out.version, len(out.results)) == ("b", 1, 20)
        for m, item in zip(messages, out.results, strict=True):
            check(pub, item.signature, m)
        # A wrong digest fails alone; the others are signed.
        good = hashlib.sha256(b"good").digest()
        mixed = await c.call(
            "sign_batch", SignBatchArgs(key="b", digests=(good, b"bad"), hash="sha256")
        )
        assert mixed.results[0].signature is not None
        assert mixed.results[1].error is not None
        assert mixed.results[1].error.name == "invalid_digest"


async def test_verify_under_load_goes_to_the_workers(autojump_clock: Any) -> None:
    """Two verifications in one read are not answered inline but by the pool."""
    async with open_harness() as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="v", type="ed25519"))
        sig = (await c.call("sign", SignArgs(key="v", message=MESSAGE))).signature
        before = h.pool.jobs_done
        good, bad = c.send(
            [
                ("verify", VerifyArgs(key="v", signature=sig, message=MESSAGE)),
                ("verify", VerifyArgs(key="v", signature=sig, message=b"other")),
            ]
        )
        assert (await c.replies.answer(good, "verify")).valid is True
        assert (await c.replies.answer(bad, "verify")).valid is False
        assert h.pool.jobs_done == before + 2


async def test_reads_list_info_jwks_and_health(autojump_clock: Any) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        for name in ("b-key", "a-key"):
            await c.call("create_key", CreateKeyArgs(key=name, type="ec-p256"))
        listed = await c.call("list_keys", Empty())
        assert isinstance(listed, KeyList)
        assert [k.name for k in listed.keys] == ["a-key", "b-key"]
        info = await c.call("key_info", KeyRefArgs(key="a-key"))
        assert [v.state for v in info.versions] == ["active"]
        jwks = await c.call("jwks", JwksArgs(keys=("a-key", "b-key", "a-key")))
        assert [k.kid for k in jwks.keys] == ["a-key:1", "b-key:1"]
        health = await c.call("health", Empty())
        assert (health.status, health.ready, health.keys) == ("ok", True, 2)
        assert health.token.model == "FakePool"
        with pytest.raises(KeyNotFound):
            await c.call("key_info", KeyRefArgs(key="nope"))
        with pytest.raises(KeyExists):
            await c.call("create_key", CreateKeyArgs(key="a-key", type="ec-p256"))


async def test_rotate_update_disable_enable_destroy(autojump_clock: Any) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="r", type="ec-p256"))
        v1_pub = load_pem((await c.call("public_key", PublicKeyArgs(key="r"))).public_key_pem)
        old = (await c.call("sign", SignArgs(key="r", message=MESSAGE))).signature
        rotated = await c.call("rotate", RotateArgs(key="r"))
        assert (rotated.current_version, rotated.created_version) == (2, 2)
        assert [v.state for v in rotated.versions] == ["verify-only", "active"]
        new = await c.call("sign", SignArgs(key="r", message=MESSAGE))
        assert new.version == 2
        with pytest.raises(InvalidSignature):
            check(v1_pub, new.signature, MESSAGE)
        # The old version still verifies, and says so.
        found = await c.call("verify", VerifyArgs(key="r", signature=old, message=MESSAGE))
        assert (found.valid, found.version) == (True, 1)
        assert h.pool.record("r").revision == 2  # the record on the token moved

        updated = await c.call("update_key", UpdateKeyArgs(key="r", verify_grace=60.0))
        assert updated.verify_grace == 60.0
        assert h.pool.record("r").settings.verify_grace == 60.0

        disabled = await c.call("disable", VersionRefArgs(key="r", version=2))
        assert [v.state for v in disabled.versions][1] == "disabled"
        with pytest.raises(VersionNotUsable):  # at once, on the very next request
            await c.call("sign", SignArgs(key="r", message=MESSAGE))
        await c.call("enable", VersionRefArgs(key="r", version=2))
        assert (await c.call("sign", SignArgs(key="r", message=MESSAGE))).version == 2

        with pytest.raises(DeletionNotAllowed):
            await c.call("destroy", DestroyArgs(key="r", version=1))
        await c.call("update_key", UpdateKeyArgs(key="r", deletion_allowed=True))
        with pytest.raises(InvalidArgument, match="exactly one"):
            await c.call("destroy", DestroyArgs(key="r"))
        gone = await c.call("destroy", DestroyArgs(key="r", version=1))
        assert [v.state for v in gone.versions] == ["destroyed", "active"]
        assert not h.pool.has_private("r", 1)
        assert h.pool.has_private("r", 2)
        with pytest.raises(VersionNotUsable):
            await c.call("sign", SignArgs(key="r", message=MESSAGE, version=1))


async def test_a_key_type_the_token_cannot_make_is_refused_before_any_keypair(
    autojump_clock: Any,
) -> None:
    pool = FakePool()
    pool.info = dataclasses.replace(
        FAKE_INFO, key_types={**FAKE_INFO.key_types, "ed25519": "no EdDSA"}
    )
    async with open_harness(pool) as h:
        c = h.connect(ROOT)
        with pytest.raises(UnsupportedAlgorithm, match="cannot make ed25519 keys: no EdDSA"):
            await c.call("create_key", CreateKeyArgs(key="e", type="ed25519"))
        assert pool.count("generate") == 0
        assert "ed25519" not in (await c.call("health", Empty())).token.key_types


async def test_idempotency_keys_answer_a_repeat_without_doing_it_again(autojump_clock: Any) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        create = CreateKeyArgs(key="i", type="ec-p256", idempotency_key="create-1")
        assert (await c.call("create_key", create)).created_version == 1
        assert (await c.call("create_key", create)).created_version == 1  # answered again
        with pytest.raises(KeyExists):  # without the key: a second create
            await c.call("create_key", CreateKeyArgs(key="i", type="ec-p256"))
        rotate = RotateArgs(key="i", idempotency_key="rotate-1")
        assert (await c.call("rotate", rotate)).created_version == 2
        again = await c.call("rotate", rotate)
        assert (again.created_version, again.current_version) == (2, 2)
        assert h.pool.count("generate") == 2
        with pytest.raises(InvalidArgument, match="different parameters"):
            await c.call(
                "create_key", CreateKeyArgs(key="i", type="ed25519", idempotency_key="create-1")
            )
        assert h.service.metrics.rotations == {("i", "manual"): 1}


async def test_min_sign_and_min_verify_version(autojump_clock: Any) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="m", type="ed25519"))
        v1 = (await c.call("sign", SignArgs(key="m", message=MESSAGE))).signature
        await c.call("rotate", RotateArgs(key="m"))
        with pytest.raises(VersionNotUsable, match="min_sign_version is 0"):
            await c.call("sign", SignArgs(key="m", message=MESSAGE, version=1))
        await c.call("update_key", UpdateKeyArgs(key="m", min_sign_version=1))
        named = await c.call("sign", SignArgs(key="m", message=MESSAGE, version=1))
        assert named.version == 1
        assert (await c.call("sign", SignArgs(key="m", message=MESSAGE))).version == 2
        await c.call("update_key", UpdateKeyArgs(key="m", min_sign_version=2, min_verify_version=2))
        verify = VerifyArgs(key="m", signature=v1, message=MESSAGE)
        assert (await c.call("verify", verify)).valid is False
        with pytest.raises(VersionNotUsable, match="below min_verify_version 2"):
            await c.call("verify", dataclasses.replace(verify, version=1))
        with pytest.raises(InvalidArgument, match="min_verify_version must be 0 to 2"):
            await c.call("update_key", UpdateKeyArgs(key="m", min_verify_version=3))


async def test_the_audit_key_is_read_only_even_for_root(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await h.service.ensure_audit_key()
        c = h.connect(ROOT)
        assert (await c.call("key_info", KeyRefArgs(key=AUDIT_KEY))).name == AUDIT_KEY
        for op, args in [
            ("sign", SignArgs(key=AUDIT_KEY, message=b"x")),
            ("rotate", RotateArgs(key=AUDIT_KEY)),
            ("disable", VersionRefArgs(key=AUDIT_KEY, version=1)),
        ]:
            with pytest.raises(PermissionDenied, match="reserved"):
                await c.call(op, args)
        # The daemon itself signs with it, through the token queue.
        signature = await h.service.sign_audit(1, b"checkpoint")
        pub = load_pem((await c.call("public_key", PublicKeyArgs(key=AUDIT_KEY))).public_key_pem)
        check(pub, signature, b"checkpoint")


async def test_a_lost_token_answers_token_unavailable(autojump_clock: Any) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="t", type="ec-p256"))
        h.pool.lose()
        with pytest.raises(TokenUnavailable):
            await c.call("sign", SignArgs(key="t", message=MESSAGE))
        with pytest.raises(TokenUnavailable):
            await c.call("rotate", RotateArgs(key="t"))
        health = await c.call("health", Empty())
        assert (health.ready, health.status) == (False, "unavailable")
        h.pool.restore()
        assert (await c.call("sign", SignArgs(key="t", message=MESSAGE))).version == 1


async def test_a_full_token_queue_answers_busy_for_the_whole_request(autojump_clock: Any) -> None:
    pool = FakePool(latency=1.0, queue_limit=3)
    async with open_harness(pool) as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="q", type="ec-p256"))
        first = c.send([("sign", SignArgs(key="q", message=b"%d" % i)) for i in range(2)])
        batch = SignBatchArgs(key="q", messages=(b"a", b"b"))
        (over,) = c.send([("sign_batch", batch)])
        with pytest.raises(Busy):
            await c.replies.answer(over, "sign_batch")
        for rid in first:
            assert (await c.replies.answer(rid, "sign")).version == 1
        assert pool.jobs_done == 2  # nothing of the refused batch reached the token
        with pytest.raises(InvalidArgument, match="token queue"):
            await c.call("sign_batch", SignBatchArgs(key="q", messages=(b"1", b"2", b"3", b"4")))


async def test_the_fake_pool_keeps_the_pools_contract(autojump_clock: Any) -> None:
    """What these tests count on: compare-and-swap records, and ``drop``
    answering only what a connection still has queued."""
    pool = FakePool(latency=5.0)
    record = pool.add_key("k")
    with pytest.raises(Conflict, match="revision 1"):
        await pool.write_metadata("k", 1, record.to_bytes())
    async with open_harness(pool) as h:
        held, closed = h.connect(ROOT), h.connect(ROOT)
        (kept,) = held.send([("sign", SignArgs(key="k", message=b"held"))])
        await trio.sleep(1.0)  # the worker holds it now
        (gone,) = closed.send([("sign", SignArgs(key="k", message=b"queued"))])
        assert pool.drop(closed, TokenUnavailable("connection closed")) == 1
        with pytest.raises(TokenUnavailable, match="connection closed"):
            await closed.replies.answer(gone, "sign")
        assert (await held.replies.answer(kept, "sign")).version == 1
        assert pool.jobs_done == 1


async def test_a_record_another_daemon_took_back_is_read_again(autojump_clock: Any) -> None:
    """Two daemons rotated at the same moment and both took their records back;
    SoftHSM showed this process the loser's record (naming a keypair already
    deleted) before its removal.  update_key reads again and succeeds."""
    async with open_harness() as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="r", type="ec-p256"))
        settled = h.pool.records["r"]
        h.pool.write_record(h.pool.record("r").rotated(0.0, b"deleted-by-the-loser"))

        async def take_back() -> None:
            await trio.sleep(0.02)
            h.pool.records["r"] = settled

        h.nursery.start_soon(take_back)
        updated = await c.call("update_key", UpdateKeyArgs(key="r", verify_grace=60.0))
        assert updated.verify_grace == 60.0
        assert [v.version for v in updated.versions] == [1]
        assert h.pool.record("r").settings.verify_grace == 60.0


async def test_a_record_naming_a_deleted_keypair_is_a_token_error(autojump_clock: Any) -> None:
    """A keypair deleted from outside signd: the admin operation answers
    token_error naming the version (not internal_error), writes nothing, and
    other keys are unaffected."""
    async with open_harness() as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="r", type="ec-p256"))
        await c.call("create_key", CreateKeyArgs(key="other", type="ec-p256"))
        h.pool.write_record(h.pool.record("r").rotated(0.0, b"deleted-outside"))
        before = h.pool.records["r"]
        with pytest.raises(TokenError, match=r"version 2.*missing on the token"):
            await c.call("update_key", UpdateKeyArgs(key="r", verify_grace=60.0))
        with pytest.raises(TokenError, match="version 2"):
            await c.call("rotate", RotateArgs(key="r"))
        assert h.pool.records["r"] == before
        assert (await c.call("sign", SignArgs(key="other", message=MESSAGE))).version == 1


async def test_a_backup_key_is_made_exportable_under_the_wrap_key_version_after_version(
    autojump_clock: Any,
) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        made = await c.call("create_key", CreateKeyArgs(key="b", type="ec-p256", backup=True))
        assert made.backup is True
        rotated = await c.call("rotate", RotateArgs(key="b"))
        assert rotated.backup is True
        record = h.pool.record("b")
        assert record.settings.backup
        assert {v.object_id for v in record.versions} <= h.pool.backup_ids
        # update_key has no say in it
        updated = await c.call("update_key", UpdateKeyArgs(key="b", verify_grace=5.0))
        assert updated.backup is True
        # a key made without it: nothing exportable, and its record is as before backups
        plain = await c.call("create_key", CreateKeyArgs(key="p", type="ec-p256"))
        assert plain.backup is None
        assert not ({v.object_id for v in h.pool.record("p").versions} & h.pool.backup_ids)
        assert b"backup" not in h.pool.records["p"][1]


async def test_backup_is_refused_without_a_wrap_key_or_for_a_type_the_token_cannot_wrap(
    autojump_clock: Any,
) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        with pytest.raises(UnsupportedAlgorithm, match="cannot back up ed25519"):
            await c.call("create_key", CreateKeyArgs(key="e", type="ed25519", backup=True))
        h.pool.wrap_key = False
        with pytest.raises(InvalidArgument, match="wrap key"):
            await c.call("create_key", CreateKeyArgs(key="n", type="ec-p256", backup=True))
        assert "e" not in h.pool.records
        assert "n" not in h.pool.records
        # without backup the same token makes both
        await c.call("create_key", CreateKeyArgs(key="e", type="ed25519"))


async def test_the_daemons_backup_default_applies_unless_the_request_says(
    autojump_clock: Any,
) -> None:
    async with open_harness(default_backup=True) as h:
        c = h.connect(ROOT)
        assert (await c.call("create_key", CreateKeyArgs(key="d", type="ec-p256"))).backup
        off = await c.call("create_key", CreateKeyArgs(key="o", type="ec-p256", backup=False))
        assert off.backup is None


@pytest.mark.parametrize(("line", "expected"), [("", False), ("backup = true", True)])
def test_the_backup_default_comes_from_the_keys_table(
    tmp_path: Path, line: str, expected: bool
) -> None:
    (tmp_path / "pin").write_text("1234\n")
    (tmp_path / "pin").chmod(0o600)
    path = tmp_path / "signd.toml"
    path.write_text(
        f'[token]\nmodule = "/x.so"\nlabel = "t"\npin_file = "{tmp_path}/pin"\n[keys]\n{line}\n'
    )
    assert load_config(str(path)).keys.backup is expected
    path.write_text(path.read_text().replace("= true", '= "yes"'))
    if line:
        with pytest.raises(ConfigError, match=r"keys\.backup"):
            load_config(str(path))
