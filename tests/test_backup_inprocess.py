"""backup and restore, in process: the service on fake tokens (FakePool).

Two FakePools made with the same wrap secret are two tokens from one
ceremony; the fake wraps real private keys (RFC 5649) and MACs with the
secret, so a bundle from another secret, or changed in any byte, fails as it
does on a token.  The real token's side is in ``test_backup_token.py`` and
the whole daemon's in ``test_backup_drill.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fakes import Conn, FakePool, Harness, open_harness, policy_from_config, principal
from signd.errors import Conflict, InvalidArgument, KeyExists, KeyNotFound, PermissionDenied
from signd.protocol import (
    BackupArgs,
    BackupResult,
    CreateKeyArgs,
    DestroyArgs,
    KeyRefArgs,
    RestoreArgs,
    RestoreResult,
    RotateArgs,
    SignArgs,
    UpdateKeyArgs,
    VersionRefArgs,
)
from signd_client.bundle import BundleError, decode_bundle, encode_bundle, restore_calls

ROOT = principal(0, user="root")


async def _keys(h: Harness) -> None:
    """p256 at v3 (v1 disabled), p384 at v1 with settings, and a plain key."""
    c = h.connect(ROOT)
    await c.call(
        "create_key",
        CreateKeyArgs(key="pay", type="ec-p256", backup=True, verify_grace=600.0),
    )
    await c.call("rotate", RotateArgs(key="pay"))
    await c.call("rotate", RotateArgs(key="pay"))
    await c.call("disable", VersionRefArgs(key="pay", version=1))
    await c.call(
        "create_key",
        CreateKeyArgs(key="jwt", type="ec-p384", backup=True, deletion_allowed=True),
    )
    await c.call("create_key", CreateKeyArgs(key="plain", type="ec-p256"))


async def _restore(h: Harness, data: bytes, *, check: bool = False) -> list[RestoreResult]:
    c = h.connect(ROOT)
    return [await c.call(call.op, call.args) for call in restore_calls(data, check=check)]


async def _send(c: Conn, calls: list[Any]) -> None:
    for call in calls:
        await c.call(call.op, call.args)


async def _bundle(h: Harness, keys: tuple[str, ...] | None = None) -> BackupResult:
    result: BackupResult = await h.connect(ROOT).call("backup", BackupArgs(keys=keys))
    return result


async def test_a_bundle_restores_every_version_state_and_setting_on_another_token(
    autojump_clock: Any,
) -> None:
    async with open_harness() as h:
        await _keys(h)
        made = await _bundle(h)
        assert made.keys == ("jwt", "pay")
        assert made.skipped == ("plain",)
        assert made.versions == 4
        source = {n: h.pool.record(n) for n in ("pay", "jwt")}
        keys = {n: (await h.connect(ROOT).call("key_info", KeyRefArgs(key=n))) for n in source}
        private = h.pool.private_key("pay", 3)
        # no private key in clear anywhere in the file
        for name, record in source.items():
            for v in record.versions:
                key = h.pool.private_key(name, v.version)
                assert isinstance(key, ec.EllipticCurvePrivateKey)
                size = (key.curve.key_size + 7) // 8
                assert key.private_numbers().private_value.to_bytes(size, "big") not in made.bundle
    async with open_harness(FakePool()) as h2:
        results = await _restore(h2, made.bundle)
        assert [(r.key, r.outcome, r.restored, r.present) for r in results] == [
            ("jwt", "created", (1,), ()),
            ("pay", "created", (1, 2, 3), ()),
        ]
        c = h2.connect(ROOT)
        for name, record in source.items():
            restored = h2.pool.record(name)
            assert restored.to_bytes() == record.to_bytes()  # states, settings, times, ids
            info = await c.call("key_info", KeyRefArgs(key=name))
            assert info == keys[name]
        assert "plain" not in h2.pool.records
        # the private keys are the same keys: a signature on the new token
        # verifies with the old token's public key
        signed = await c.call("sign", SignArgs(key="pay", message=b"m"))
        assert signed.version == 3
        public = private.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signed.signature, b"m", ec.ECDSA(hashes.SHA256()))
        # and stay backup-able there
        again = await _bundle(h2)
        assert again.keys == ("jwt", "pay")


async def test_restore_twice_changes_nothing_the_second_time(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await _keys(h)
        bundle = (await _bundle(h)).bundle
    async with open_harness(FakePool()) as h2:
        await _restore(h2, bundle)
        records, pairs = dict(h2.pool.records), set(h2.pool.pairs)
        writes = h2.pool.count("write_metadata")
        second = await _restore(h2, bundle)
        assert {r.outcome for r in second} == {"unchanged"}
        assert all(r.restored == () for r in second)
        assert [r.present for r in second] == [(1,), (1, 2, 3)]
        assert h2.pool.records == records
        assert set(h2.pool.pairs) == pairs
        assert h2.pool.count("write_metadata") == writes
        assert h2.pool.count("restore_keypair") == 4


async def test_restore_never_replaces_a_newer_version_and_brings_an_older_token_forward(
    autojump_clock: Any,
) -> None:
    async with open_harness() as h:
        await _keys(h)
        old = (await _bundle(h, ("pay",))).bundle
        await h.connect(ROOT).call("rotate", RotateArgs(key="pay"))
        new = (await _bundle(h, ("pay",))).bundle
        newest = h.pool.record("pay")
    # a token that has the newer key: the older bundle leaves it alone
    async with open_harness(FakePool()) as h2:
        await _restore(h2, new)
        before = h2.pool.records["pay"]
        (result,) = await _restore(h2, old)
        assert (result.outcome, result.restored, result.present) == ("unchanged", (), (1, 2, 3))
        assert h2.pool.records["pay"] == before
    # a token restored from the older bundle: the newer one adds v4
    async with open_harness(FakePool()) as h3:
        await _restore(h3, old)
        (result,) = await _restore(h3, new)
        assert (result.outcome, result.restored, result.present) == ("updated", (4,), (1, 2, 3))
        record = h3.pool.record("pay")
        assert record.revision == 2
        assert record.versions == newest.versions
        sign = await h3.connect(ROOT).call("sign", SignArgs(key="pay", message=b"m"))
        assert sign.version == 4


async def test_a_token_holding_another_key_of_that_name_is_refused(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await _keys(h)
        bundle = (await _bundle(h, ("jwt",))).bundle
    async with open_harness(FakePool()) as h2:
        c = h2.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="jwt", type="ec-p384", backup=True))
        before = dict(h2.pool.records), set(h2.pool.pairs)
        with pytest.raises(KeyExists, match="another key named 'jwt'"):
            await _restore(h2, bundle)
        assert (dict(h2.pool.records), set(h2.pool.pairs)) == before


async def test_check_says_what_would_be_done_and_writes_nothing(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await _keys(h)
        bundle = (await _bundle(h)).bundle
    async with open_harness(FakePool()) as h2:
        results = await _restore(h2, bundle, check=True)
        assert [(r.key, r.outcome, r.restored) for r in results] == [
            ("jwt", "created", (1,)),
            ("pay", "created", (1, 2, 3)),
        ]
        assert h2.pool.records == {}
        assert h2.pool.pairs == {}


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


async def test_a_changed_bundle_is_refused_with_nothing_written(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await _keys(h)
        bundle = (await _bundle(h)).bundle
    parts = decode_bundle(bundle)
    entry, mac = parts.entries[1]
    # one flipped bit inside each part, the file's shape intact
    changed = [
        encode_bundle(_flip(parts.header, len(parts.header) - 20), parts.header_mac, parts.entries),
        encode_bundle(parts.header, _flip(parts.header_mac, 3), parts.entries),
        encode_bundle(
            parts.header, parts.header_mac, [parts.entries[0], (_flip(entry, len(entry) - 9), mac)]
        ),
        encode_bundle(parts.header, parts.header_mac, [parts.entries[0], (entry, _flip(mac, 0))]),
    ]
    async with open_harness(FakePool()) as h2:
        for data in changed:
            try:
                calls = restore_calls(data, check=True)
            except BundleError:
                continue  # the flip broke the shape: refused before any request
            c = h2.connect(ROOT)
            with pytest.raises(InvalidArgument, match=r"changed or damaged|not valid|no valid"):
                await _send(c, calls)
        assert h2.pool.records == {}
        assert h2.pool.pairs == {}
        assert h2.pool.count("restore_keypair") == 0
        # every bit of the file: either its shape breaks, or the token refuses it
        refused = 0
        for at in range(len(bundle) - 1, len(bundle) - 400, -7):
            try:
                calls = restore_calls(_flip(bundle, at), check=True)
            except BundleError:
                refused += 1
                continue
            with pytest.raises(InvalidArgument):
                await _send(c, calls)
        assert h2.pool.records == {}
        assert h2.pool.pairs == {}


async def test_a_truncated_bundle_and_one_with_an_entry_missing_are_refused(
    autojump_clock: Any,
) -> None:
    async with open_harness() as h:
        await _keys(h)
        bundle = (await _bundle(h)).bundle
    for cut in (len(bundle) - 1, len(bundle) // 2, 10):
        with pytest.raises(BundleError):
            restore_calls(bundle[:cut])
    parts = decode_bundle(bundle)
    with pytest.raises(BundleError, match="header says 2 keys, the bundle holds 1"):
        restore_calls(encode_bundle(parts.header, parts.header_mac, parts.entries[:1]))
    with pytest.raises(BundleError, match="not a signd backup bundle"):
        restore_calls(b"PK\x03\x04" + bundle)
    # an entry sent under another key's name
    async with open_harness(FakePool()) as h2:
        (entry, mac) = parts.entries[0]
        args = RestoreArgs(
            key="pay", header=parts.header, header_mac=parts.header_mac, entry=entry, entry_mac=mac
        )
        with pytest.raises(InvalidArgument, match="entry is for key 'jwt', not 'pay'"):
            await h2.connect(ROOT).call("restore", args)
        assert h2.pool.records == {}


async def test_the_wrong_wrap_key_is_named_and_nothing_is_written(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await _keys(h)
        bundle = (await _bundle(h)).bundle
        ours = await h.pool.wrap_check_value()
    async with open_harness(FakePool(wrap_secret=b"\x07" * 32)) as h2:
        theirs = await h2.pool.wrap_check_value()
        with pytest.raises(
            InvalidArgument, match=f"made under wrap key {ours}.*holds wrap key {theirs}"
        ):
            await _restore(h2, bundle)
        assert h2.pool.records == {}
        assert h2.pool.pairs == {}
    async with open_harness(FakePool(wrap_secret=None)) as h3:
        with pytest.raises(InvalidArgument, match="no trusted wrap key"):
            await _restore(h3, bundle)
        assert h3.pool.records == {}


async def test_a_write_that_loses_a_race_leaves_no_keypair(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await _keys(h)
        bundle = (await _bundle(h, ("pay",))).bundle
    async with open_harness(FakePool()) as h2:
        h2.pool.fail_next["write_metadata"] = Conflict("another process wrote 'pay'")
        with pytest.raises(Conflict):
            await _restore(h2, bundle)
        assert h2.pool.records == {}
        assert h2.pool.pairs == {}
        (result,) = await _restore(h2, bundle)  # a retry does it
        assert result.outcome == "created"


async def test_an_object_id_taken_on_the_new_token_gets_another(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await _keys(h)
        bundle = (await _bundle(h, ("jwt",))).bundle
        taken = h.pool.record("jwt").versions[0].object_id
    pool = FakePool()
    async with open_harness(pool) as h2:
        await pool.generate("ec-p256", taken, "something/else")
        (result,) = await _restore(h2, bundle)
        assert result.outcome == "created"
        moved = h2.pool.record("jwt").versions[0].object_id
        assert moved != taken
        assert pool.pairs[moved].label == "jwt/v1"
        await h2.connect(ROOT).call("sign", SignArgs(key="jwt", message=b"m"))


async def test_destroyed_versions_come_back_as_public_keys_only(autojump_clock: Any) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        await c.call(
            "create_key",
            CreateKeyArgs(key="d", type="ec-p256", backup=True, deletion_allowed=True),
        )
        await c.call("rotate", RotateArgs(key="d"))
        await c.call("destroy", DestroyArgs(key="d", version=1))
        bundle = (await _bundle(h)).bundle
    async with open_harness(FakePool()) as h2:
        await _restore(h2, bundle)
        assert not h2.pool.has_private("d", 1)
        assert h2.pool.has_private("d", 2)
        info = await h2.connect(ROOT).call("key_info", KeyRefArgs(key="d"))
        assert [v.state for v in info.versions] == ["destroyed", "active"]


async def test_backup_needs_admin_on_every_key_and_names_what_it_cannot_back_up(
    autojump_clock: Any, tmp_path: Path
) -> None:
    policy = policy_from_config(
        tmp_path,
        '[[access.rules]]\nkeys = ["pay"]\noperations = ["admin", "create", "rotate"]\n'
        "uids = [1500]\n",
    )
    async with open_harness(policy=policy) as h:
        await _keys(h)
        ops = h.connect(principal(1500))
        with pytest.raises(PermissionDenied, match="may not admin key 'jwt'"):
            await ops.call("backup", BackupArgs())
        assert h.pool.count("wrap_private") == 0
        mine = await ops.call("backup", BackupArgs(keys=("pay",)))
        assert mine.keys == ("pay",)
        parts = decode_bundle(mine.bundle)
        (entry, mac) = parts.entries[0]
        other = RestoreArgs(
            key="jwt", header=parts.header, header_mac=parts.header_mac, entry=entry, entry_mac=mac
        )
        with pytest.raises(PermissionDenied, match="may not admin key 'jwt'"):
            await ops.call("restore", other)
        c = h.connect(ROOT)
        with pytest.raises(InvalidArgument, match="'plain' is not backup-able"):
            await c.call("backup", BackupArgs(keys=("plain",)))
        with pytest.raises(KeyNotFound):
            await c.call("backup", BackupArgs(keys=("nope",)))
        h.pool.wrap_key = False
        with pytest.raises(InvalidArgument, match="wrap key"):
            await c.call("backup", BackupArgs())


async def test_a_restored_key_keeps_its_settings_and_can_change_them(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await _keys(h)
        bundle = (await _bundle(h, ("jwt",))).bundle
    async with open_harness(FakePool()) as h2:
        await _restore(h2, bundle)
        c = h2.connect(ROOT)
        info = await c.call("update_key", UpdateKeyArgs(key="jwt", verify_grace=30.0))
        assert info.deletion_allowed is True
        assert info.verify_grace == 30.0
        assert info.backup is True
        rotated = await c.call("rotate", RotateArgs(key="jwt"))
        assert rotated.current_version == 2
