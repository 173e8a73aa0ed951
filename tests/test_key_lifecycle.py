"""The key lifecycle against a real daemon and a real SoftHSM token.

Version states (active, verify-only, retired, disabled, destroyed), the
per-key settings that drive them (verify_grace, min_verify_version,
min_sign_version, deletion_allowed, auto_rotate_period) and the admin
operations (update_key, disable, enable, destroy).  Every signature is also
checked by ``cryptography`` against the public key the daemon reports, and
what ``destroy`` does to the token is checked with python-pkcs11 directly.

Time: grace windows and automatic rotations wait for the real clock, by
polling with a bounded time-out; nothing asserts how long anything took.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pkcs11
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Attribute, ObjectClass
from pkcs11.exceptions import UserAlreadyLoggedIn

from signd_client import Client
from signd_client._calls import Call
from signd_client.audit import verify_files
from signd_client.errors import (
    DeletionNotAllowed,
    ErrorCode,
    InvalidArgument,
    VersionNotUsable,
)
from signd_client.protocol import DestroyArgs, KeyInfo, VersionInfo
from support import wait_for

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv  # the root conftest.py


#: Short periods for the daemons that rotate on their own.
FAST_KEYS = "[keys]\nmin_rotate_period = 1\nsync_interval = 0.5\n"
SYNC_INTERVAL = 0.5
#: The longest any poll here waits: far beyond every period and interval used.
POLL_TIMEOUT = 20.0

# --------------------------------------------------------------------------
# helpers


def is_valid(pem: str, signature: bytes, message: bytes) -> bool:
    """An independent check: ``cryptography`` with the PEM the daemon reported."""
    public = serialization.load_pem_public_key(pem.encode())
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            assert isinstance(public, ec.EllipticCurvePublicKey)
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def version(info: KeyInfo, number: int) -> VersionInfo:
    found = [v for v in info.versions if v.version == number]
    assert len(found) == 1, (number, info.versions)
    return found[0]


def states(info: KeyInfo) -> dict[int, str]:
    return {v.version: v.state for v in info.versions}


def signed(c: Client, name: str, ver: int | None = None) -> tuple[int, bytes, bytes]:
    """One signature through the daemon: (version, message, signature)."""
    msg = f"{name} {uuid.uuid4()}".encode()
    res = c.sign(name, msg, version=ver)
    if ver is not None:
        assert res.version == ver
    return res.version, msg, res.signature


def check_signed(info: KeyInfo, sig: tuple[int, bytes, bytes]) -> None:
    """``sig`` verifies independently with its version's public key, and only with it."""
    ver, msg, signature = sig
    assert is_valid(version(info, ver).public_key_pem, signature, msg), f"v{ver}"
    others = [v.version for v in info.versions if v.version != ver]
    assert not [o for o in others if is_valid(version(info, o).public_key_pem, signature, msg)]


def verifies_as(c: Client, name: str, sig: tuple[int, bytes, bytes]) -> int | None:
    """The version the daemon says made ``sig``; None when it says invalid."""
    _, msg, signature = sig
    res = c.verify(name, signature, msg)
    if not res.valid:
        assert res.version is None
        return None
    return res.version


# --------------------------------------------------------------------------
# the token, seen from this process (python-pkcs11)


@pytest.fixture(scope="module")
def p11(token_env: TokenEnv) -> Iterator[Any]:
    """This process's one logged-in, read-write session to the shared token."""
    lib = pkcs11.lib(token_env.module)
    token = lib.get_token(token_label=token_env.label)
    try:
        s = token.open(rw=True, user_pin=token_env.pin)
        owns_login = True
    except UserAlreadyLoggedIn:  # another module of this process is logged in
        s = token.open(rw=True)
        owns_login = False
    yield s
    if owns_login:
        s.close()


def object_id(p11: Any, name: str, ver: int) -> bytes:
    """CKA_ID of a version's keypair, from its public key object (it outlives destroy)."""
    found = list(
        p11.get_objects(
            {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: f"{name}/v{ver}"}
        )
    )
    assert len(found) == 1, f"{name}/v{ver}: {len(found)} public key objects"
    return bytes(found[0][Attribute.ID])


def count(p11: Any, cls: ObjectClass, oid: bytes) -> int:
    return len(list(p11.get_objects({Attribute.CLASS: cls, Attribute.ID: oid})))


# --------------------------------------------------------------------------
# verify_grace


def test_grace_expiry_retires_the_old_version(signd: Daemon, key_name: str) -> None:
    grace = 2.5
    with signd.client() as c:
        info = c.create_key(key_name, "ec-p256", verify_grace=grace)
        assert info.verify_grace == grace
        old = signed(c, key_name)
        assert old[0] == 1
        info = c.rotate(key_name)
        new = signed(c, key_name)
        assert new[0] == 2
        check_signed(info, old)
        check_signed(info, new)

        v1 = version(info, 1)
        assert v1.state == "verify-only"
        assert v1.verify_until == pytest.approx(version(info, 2).created + grace)
        assert version(info, 2).verify_until is None  # the newest has no limit
        until = v1.verify_until
        assert until is not None

        # Within the grace, v1's signature verifies, as v1; then, without anyone
        # acting, it stops.  Each answer must be consistent with the clock
        # around it (same machine, same clock as the daemon's).
        def retired() -> bool | None:
            before = time.time()
            got = verifies_as(c, key_name, old)
            after = time.time()
            if got is not None:
                assert got == 1
                assert before < until, "v1 still verified after its grace ended"
                return None
            assert after >= until, "v1 stopped verifying before its grace ended"
            return True

        assert verifies_as(c, key_name, old) == 1
        wait_for(retired, "v1's grace to end", grace + POLL_TIMEOUT)

        with pytest.raises(VersionNotUsable, match="verify_grace"):
            c.verify(key_name, old[2], old[1], version=1)
        info = c.key_info(key_name)
        assert states(info) == {1: "retired", 2: "active"}
        assert version(info, 1).verify_until is None
        assert version(info, 1).public_key_pem == v1.public_key_pem
        # The newest is not touched by the grace.
        assert verifies_as(c, key_name, new) == 2
        check_signed(info, new)


# --------------------------------------------------------------------------
# min_verify_version


def test_min_verify_version_retires_older_versions_reversibly(signd: Daemon, key_name: str) -> None:
    with signd.client() as c:
        c.create_key(key_name, "ec-p256")
        sigs = [signed(c, key_name)]
        for _ in range(2):
            c.rotate(key_name)
            sigs.append(signed(c, key_name))
        assert [s[0] for s in sigs] == [1, 2, 3]
        info = c.key_info(key_name)
        for s in sigs:
            check_signed(info, s)
        assert [verifies_as(c, key_name, s) for s in sigs] == [1, 2, 3]

        info = c.update_key(key_name, min_verify_version=3)
        assert info.min_verify_version == 3
        assert states(info) == {1: "retired", 2: "retired", 3: "active"}
        assert [verifies_as(c, key_name, s) for s in sigs] == [None, None, 3]
        with pytest.raises(VersionNotUsable, match="min_verify_version"):
            c.verify(key_name, sigs[0][2], sigs[0][1], version=1)
        assert signed(c, key_name)[0] == 3

        info = c.update_key(key_name, min_verify_version=0)
        assert info.min_verify_version == 0
        assert states(info) == {1: "verify-only", 2: "verify-only", 3: "active"}
        assert [verifies_as(c, key_name, s) for s in sigs] == [1, 2, 3]


@pytest.mark.parametrize("value", [-1, 4, 1000])
def test_min_verify_version_out_of_range_is_refused(
    signd: Daemon, key_name: str, value: int
) -> None:
    with signd.client() as c:
        c.create_key(key_name, "ec-p256")
        c.rotate(key_name)
        c.rotate(key_name)
        with pytest.raises(InvalidArgument, match="min_verify_version") as exc:
            c.update_key(key_name, min_verify_version=value)
        assert exc.value.code == ErrorCode.INVALID_ARGUMENT
        info = c.key_info(key_name)
        assert info.min_verify_version == 0  # nothing changed
        assert states(info) == {1: "verify-only", 2: "verify-only", 3: "active"}


# --------------------------------------------------------------------------
# min_sign_version


def test_min_sign_version_lets_named_older_versions_sign(signd: Daemon, key_name: str) -> None:
    with signd.client() as c:
        c.create_key(key_name, "ec-p256")
        c.rotate(key_name)
        c.rotate(key_name)
        info = c.update_key(key_name, min_verify_version=2, min_sign_version=2)
        assert (info.min_verify_version, info.min_sign_version) == (2, 2)
        assert states(info) == {1: "retired", 2: "active", 3: "active"}

        v2 = signed(c, key_name, 2)
        check_signed(info, v2)
        assert verifies_as(c, key_name, v2) == 2
        # Without a version the newest signs.
        default = signed(c, key_name)
        assert default[0] == 3
        check_signed(info, default)
        # A batch can name the version too.
        msgs = [b"batch one", b"batch two"]
        batch = c.sign_batch(key_name, msgs, version=2)
        assert batch.version == 2
        for m, item in zip(msgs, batch.results, strict=True):
            assert item.signature is not None
            check_signed(info, (2, m, item.signature))
        # Below min_sign_version (and min_verify_version): no.
        with pytest.raises(VersionNotUsable, match="version 1 may not sign"):
            c.sign(key_name, b"x", version=1)
        with pytest.raises(VersionNotUsable):
            c.sign_batch(key_name, [b"x"], version=1)

        # Back to the default: only the newest signs; v2 verifies only.
        info = c.update_key(key_name, min_sign_version=0)
        assert states(info) == {1: "retired", 2: "verify-only", 3: "active"}
        with pytest.raises(VersionNotUsable, match="only the newest version signs"):
            c.sign(key_name, b"x", version=2)
        check_signed(info, signed(c, key_name, 3))
        assert verifies_as(c, key_name, v2) == 2  # its old signatures still verify


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"min_sign_version": 1, "min_verify_version": 2}, "min_sign_version"),
        ({"min_sign_version": 4}, "min_sign_version"),
        ({"min_sign_version": -1}, "min_sign_version"),
        ({"auto_rotate_period": 1.5}, "auto_rotate_period"),  # the daemon's default: 3600
        ({"verify_grace": -1.0}, "verify_grace"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(
    signd: Daemon, key_name: str, settings: dict[str, Any], field: str
) -> None:
    with signd.client() as c:
        c.create_key(key_name, "ec-p256")
        c.rotate(key_name)
        c.rotate(key_name)
        before = c.key_info(key_name)
        with pytest.raises(InvalidArgument, match=field):
            c.update_key(key_name, **settings)
        assert c.key_info(key_name) == before


# --------------------------------------------------------------------------
# disable / enable


def test_disable_and_enable_take_effect_at_once_and_survive_restart(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, key_name: str
) -> None:
    d = make_daemon(token=own_token)  # restarted: it reads only this test's keys
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        s1 = signed(c, key_name)
        c.rotate(key_name)
        s2 = signed(c, key_name)
        assert (s1[0], s2[0]) == (1, 2)

        # Disable the current version: the very next request is refused.
        info = c.disable(key_name, 2)
        assert states(info) == {1: "verify-only", 2: "disabled"}
        with pytest.raises(VersionNotUsable, match="version 2 is disabled"):
            c.sign(key_name, b"right after disable")
        with pytest.raises(VersionNotUsable):
            c.sign(key_name, b"x", version=2)
        assert verifies_as(c, key_name, s2) is None
        with pytest.raises(VersionNotUsable, match="disabled"):
            c.verify(key_name, s2[2], s2[1], version=2)
        # The older version is not promoted: it still only verifies.
        assert verifies_as(c, key_name, s1) == 1
        with pytest.raises(VersionNotUsable):
            c.sign(key_name, b"x", version=1)
        assert c.disable(key_name, 2) == info  # idempotent

        # Enable: signing works again, with v2.
        info = c.enable(key_name, 2)
        assert states(info) == {1: "verify-only", 2: "active"}
        again = signed(c, key_name)
        assert again[0] == 2
        check_signed(info, again)
        assert verifies_as(c, key_name, s2) == 2

        # Disable an old version: its signatures stop verifying.
        info = c.disable(key_name, 1)
        assert states(info) == {1: "disabled", 2: "active"}
        assert verifies_as(c, key_name, s1) is None
        assert verifies_as(c, key_name, s2) == 2
        c.disable(key_name, 2)
        pems = {v.version: v.public_key_pem for v in c.key_info(key_name).versions}

    # The states are on the token: a new daemon process reads them back.
    d.restart()
    with d.client() as c:
        info = c.key_info(key_name)
        assert states(info) == {1: "disabled", 2: "disabled"}
        assert {v.version: v.public_key_pem for v in info.versions} == pems
        with pytest.raises(VersionNotUsable):
            c.sign(key_name, b"after restart")
        assert verifies_as(c, key_name, s1) is None
        assert verifies_as(c, key_name, s2) is None
        info = c.enable(key_name, 2)
        assert states(info) == {1: "disabled", 2: "active"}
        check_signed(info, signed(c, key_name, 2))
        assert verifies_as(c, key_name, s2) == 2
        assert verifies_as(c, key_name, s1) is None


# --------------------------------------------------------------------------
# destroy


def test_destroy_needs_deletion_allowed_and_removes_only_the_private_key(
    make_daemon: Callable[..., Daemon], key_name: str, p11: Any
) -> None:
    d = make_daemon()
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        s1 = signed(c, key_name)
        info = c.rotate(key_name)
        s2 = signed(c, key_name)
        pems = {v.version: v.public_key_pem for v in info.versions}
        ids = {v: object_id(p11, key_name, v) for v in (1, 2)}

        with pytest.raises(DeletionNotAllowed, match="deletion_allowed") as exc:
            c.destroy(key_name, 1)
        assert exc.value.code == ErrorCode.DELETION_NOT_ALLOWED
        assert int(exc.value.code) == 304
        with pytest.raises(DeletionNotAllowed):
            c.destroy(key_name, all=True)
        assert count(p11, ObjectClass.PRIVATE_KEY, ids[1]) == 1  # refused: untouched
        assert states(c.key_info(key_name)) == {1: "verify-only", 2: "active"}

        info = c.update_key(key_name, deletion_allowed=True)
        assert info.deletion_allowed is True
        # "Every version" is never implied: the daemon itself refuses a destroy
        # that names neither a version nor all (or both), past the client's check.
        for args in (DestroyArgs(key=key_name), DestroyArgs(key=key_name, version=1, all=True)):
            with pytest.raises(InvalidArgument, match="exactly one"):
                c.call(Call("destroy", args, KeyInfo))
        assert states(c.key_info(key_name)) == {1: "verify-only", 2: "active"}
        info = c.destroy(key_name, 1)
        assert states(info) == {1: "destroyed", 2: "active"}
        assert version(info, 1).public_key_pem == pems[1]  # kept, for audit
        # On the token: v1's private key is gone, its public key and v2 remain.
        assert count(p11, ObjectClass.PRIVATE_KEY, ids[1]) == 0
        assert count(p11, ObjectClass.PUBLIC_KEY, ids[1]) == 1
        assert count(p11, ObjectClass.PRIVATE_KEY, ids[2]) == 1

        assert verifies_as(c, key_name, s1) is None
        with pytest.raises(VersionNotUsable, match="destroyed"):
            c.verify(key_name, s1[2], s1[1], version=1)
        with pytest.raises(VersionNotUsable):
            c.sign(key_name, b"x", version=1)
        for op in (c.enable, c.disable):
            with pytest.raises(VersionNotUsable, match="destroyed"):
                op(key_name, 1)
        assert c.destroy(key_name, 1) == info  # idempotent
        # The newest is unaffected.
        assert verifies_as(c, key_name, s2) == 2
        check_signed(info, signed(c, key_name))

        # Every version: the key stays, with its public keys, and cannot sign.
        info = c.destroy(key_name, all=True)
        assert states(info) == {1: "destroyed", 2: "destroyed"}
        assert {v.version: v.public_key_pem for v in info.versions} == pems
        assert all(count(p11, ObjectClass.PRIVATE_KEY, i) == 0 for i in ids.values())
        assert all(count(p11, ObjectClass.PUBLIC_KEY, i) == 1 for i in ids.values())
        with pytest.raises(VersionNotUsable, match="cannot sign"):
            c.sign(key_name, b"x")
        assert verifies_as(c, key_name, s2) is None
        # The public keys still check old signatures independently.
        check_signed(info, s1)
        check_signed(info, s2)

    d.restart()
    with d.client() as c:
        info = c.key_info(key_name)
        assert states(info) == {1: "destroyed", 2: "destroyed"}
        assert {v.version: v.public_key_pem for v in info.versions} == pems
        with pytest.raises(VersionNotUsable):
            c.sign(key_name, b"x")
        with pytest.raises(VersionNotUsable):
            c.enable(key_name, 2)
    assert "skipping key" not in d.logs()


def _rewrite_record(p11: Any, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Store the next revision of a key's metadata, as the daemon would (see token.py:
    a private, unmodifiable CKO_DATA object, application "signd", label = key name,
    value = 8-byte revision + JSON), then drop the older revisions."""
    template = {
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.APPLICATION: "signd",
        Attribute.LABEL: name,
    }
    old = list(p11.get_objects(template))
    newest = max(old, key=lambda o: int.from_bytes(bytes(o[Attribute.VALUE])[:8], "big"))
    value = bytes(newest[Attribute.VALUE])
    revision = int.from_bytes(value[:8], "big")
    doc = json.loads(value[8:])
    change(doc)
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    p11.create_object(
        {
            **template,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.MODIFIABLE: False,
            Attribute.VALUE: (revision + 1).to_bytes(8, "big") + body,
        }
    )
    for obj in old:
        obj.destroy()


def test_destroy_interrupted_after_the_record_is_finished_on_start(
    make_daemon: Callable[..., Daemon], signd: Daemon, key_name: str, p11: Any
) -> None:
    """The crash window of destroy: the record says destroyed, the private key is
    still on the token.  Made here by writing that record with the daemon stopped."""
    d = make_daemon()
    with d.client() as c:
        c.create_key(key_name, "ec-p256", deletion_allowed=True)
        s1 = signed(c, key_name)
        info = c.rotate(key_name)
    assert d.stop() == 0
    ids = {v: object_id(p11, key_name, v) for v in (1, 2)}

    def destroy_v1(doc: dict[str, Any]) -> None:
        (v1,) = [v for v in doc["versions"] if v["version"] == 1]
        assert v1["id"] == ids[1].hex()
        v1["state"] = "destroyed"

    _rewrite_record(p11, key_name, destroy_v1)
    assert count(p11, ObjectClass.PRIVATE_KEY, ids[1]) == 1  # the crash window

    d.start()
    with d.client() as c:
        after = c.key_info(key_name)
        assert states(after) == {1: "destroyed", 2: "active"}
        assert version(after, 1).public_key_pem == version(info, 1).public_key_pem
        with pytest.raises(VersionNotUsable):
            c.sign(key_name, b"x", version=1)
        assert verifies_as(c, key_name, s1) is None
        check_signed(after, signed(c, key_name))
    assert count(p11, ObjectClass.PRIVATE_KEY, ids[1]) == 0
    assert count(p11, ObjectClass.PUBLIC_KEY, ids[1]) == 1
    assert count(p11, ObjectClass.PRIVATE_KEY, ids[2]) == 1
    # Whichever daemon on the token read the record first finished the job: this
    # one as it started, or the session's daemon in its periodic re-read.
    finished = [
        rec
        for x in (d, signd)
        for line in x.logs().splitlines()
        if line.startswith("{")
        and (rec := json.loads(line)).get("msg") == "private key destroyed"
        and rec.get("key") == key_name
    ]
    assert {r["version"] for r in finished} == {1}  # by one daemon or both, never another version


# --------------------------------------------------------------------------
# automatic rotation


def on_token(make_daemon: Callable[..., Daemon], token: TokenEnv, config: str) -> Daemon:
    d = make_daemon(config, start=False)
    d.token = token
    d.start()
    return d


def test_auto_rotation_rotates_on_schedule(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, key_name: str
) -> None:
    period = 1.5
    d = on_token(make_daemon, own_token, FAST_KEYS + '\n[audit]\ndir = "audit"\n')
    with d.client() as c:
        # Below the daemon's min_rotate_period (1 s): refused, naming the setting.
        with pytest.raises(InvalidArgument, match="auto_rotate_period"):
            c.create_key(key_name, "ec-p256", auto_rotate_period=0.5)
        info = c.create_key(key_name, "ec-p256", auto_rotate_period=period)
        assert info.auto_rotate_period == period
        assert info.next_rotation == pytest.approx(version(info, 1).created + period)
        with pytest.raises(InvalidArgument, match="auto_rotate_period"):
            c.update_key(key_name, auto_rotate_period=0.5)

        def rotated_twice() -> KeyInfo | None:
            info = c.key_info(key_name)
            return info if info.current_version >= 3 else None

        wait_for(rotated_twice, "two automatic rotations", 3 * period + POLL_TIMEOUT)
        info = c.update_key(key_name, auto_rotate_period=0)  # stop it here
        assert info.next_rotation is None

        numbers = [v.version for v in info.versions]
        assert numbers == list(range(1, len(numbers) + 1))
        assert info.current_version == numbers[-1] >= 3
        created = [v.created for v in info.versions]
        gaps = [b - a for a, b in itertools.pairwise(created)]
        assert all(g >= period - 0.01 for g in gaps), gaps  # never early
        assert len({v.public_key_pem for v in info.versions}) == len(numbers)

        # Let every version sign (all at or above min_sign_version 1), then
        # check one signature of each independently.
        info = c.update_key(key_name, min_sign_version=1)
        assert set(states(info).values()) == {"active"}
        for n in numbers:
            sig = signed(c, key_name, n)
            check_signed(info, sig)
            assert verifies_as(c, key_name, sig) == n
    assert d.proc is not None
    daemon_pid = d.proc.pid
    assert d.stop() == 0
    assert d.logs().count('"key rotated on schedule"') == len(numbers) - 1

    # Each scheduled rotation is audited, in the chain, as the daemon's own act.
    files = sorted((d.workdir / "audit").glob("audit-*.jsonl"))
    assert verify_files(map(str, files)).problems == []
    records = [json.loads(ln) for f in files for ln in f.read_bytes().split(b"\n") if ln]
    auto = [r for r in records if r.get("op") == "auto_rotate"]
    assert [r["version"] for r in auto] == numbers[1:]
    for r in auto:
        assert (r["key"], r["result"], r["code"]) == (key_name, "ok", 0)
        assert (r["uid"], r["pid"], r["user"]) == (os.getuid(), daemon_pid, "signd")


# --------------------------------------------------------------------------
# several daemons on one token


def test_second_daemon_sees_a_disable_within_sync_interval(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, key_name: str
) -> None:
    # A token of their own: two daemons re-reading the shared token's every key
    # twice a second would load the whole machine.
    a = make_daemon(FAST_KEYS, token=own_token)
    b = make_daemon(FAST_KEYS, token=own_token)
    assert a.socket != b.socket
    with a.client() as ca, b.client() as cb:
        ca.create_key(key_name, "ec-p256")
        s1 = signed(cb, key_name)  # b looks the key up on the token
        check_signed(cb.key_info(key_name), s1)

        ca.disable(key_name, 1)

        def refused() -> bool | None:
            try:
                cb.sign(key_name, b"still signing?")
            except VersionNotUsable:
                return True
            return None

        wait_for(refused, "b to refuse signing with the disabled version")
        assert states(cb.key_info(key_name)) == {1: "disabled"}
        assert verifies_as(cb, key_name, s1) is None

        ca.enable(key_name, 1)
        again = wait_for(lambda: _try_sign(cb, key_name), "b to sign again")
        assert again[0] == 1
        check_signed(ca.key_info(key_name), again)


def _try_sign(c: Client, name: str) -> tuple[int, bytes, bytes] | None:
    try:
        return signed(c, name)
    except VersionNotUsable:
        return None


#: SoftHSM's file store tells a process about other processes' changes by a
#: generation counter, and a process's own write takes in every change made
#: since it last looked: it then never sees those until the token changes again.
#: Run with a token's environment: the private key labels under a prefix, as
#: a process that has never written to the token sees them.
LIST_PRIVATE_KEYS = """
import json, sys, pkcs11
from pkcs11 import Attribute, ObjectClass
module, label, pin_file, prefix = sys.argv[1:]
with open(pin_file) as f:
    pin = f.read().rstrip("\\n")
s = pkcs11.lib(module).get_token(token_label=label).open(user_pin=pin)
objs = s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
print(json.dumps(sorted(o[Attribute.LABEL] for o in objs if o[Attribute.LABEL].startswith(prefix))))
"""


def private_key_labels(token: TokenEnv, prefix: str) -> list[str]:
    out = subprocess.run(
        [
            *(sys.executable, "-c", LIST_PRIVATE_KEYS),
            *(token.module, token.label, str(token.pin_file), prefix),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=token.env(),
    )
    assert out.returncode == 0, out.stderr
    labels = json.loads(out.stdout)
    assert isinstance(labels, list)
    return labels


def test_two_daemons_rotating_one_key_make_each_version_once(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, key_name: str
) -> None:
    """Both daemons wake when the key is due; exactly one rotation may land each
    time.  Without exclusion each made its own keypair for the same version
    number, the two records had the same revision, and b kept signing with
    keypairs a never knew (and that no record names after a restart)."""
    a = on_token(make_daemon, own_token, FAST_KEYS)
    b = on_token(make_daemon, own_token, FAST_KEYS)
    sigs: list[tuple[int, bytes, bytes]] = []
    with a.client() as ca, b.client() as cb:
        # RSA: generating a keypair takes long enough for both to be in it.
        ca.create_key(key_name, "rsa-2048", auto_rotate_period=1)
        cb.key_info(key_name)  # b knows the key before it is due

        def rotated_twice() -> bool | None:
            sigs.append(signed(cb, key_name))
            return True if ca.key_info(key_name).current_version >= 3 else None

        wait_for(rotated_twice, "two automatic rotations")
        ca.update_key(key_name, auto_rotate_period=0)
        at_a = ca.key_info(key_name)
    assert a.stop() == 0
    assert b.stop() == 0
    # What is on the token, read by processes that never wrote to it.
    c = on_token(make_daemon, own_token, FAST_KEYS)
    with c.client() as cc:
        info = cc.key_info(key_name)
        assert info.auto_rotate_period == 0  # the change that stopped it was not lost
        numbers = [v.version for v in info.versions]
        assert numbers == list(range(1, len(numbers) + 1))
        assert info.versions == at_a.versions
        assert private_key_labels(own_token, key_name + "/") == sorted(
            f"{key_name}/v{n}" for n in numbers
        )
        # What b signed verifies with the versions the token kept.
        for sig in sigs:
            assert verifies_as(cc, key_name, sig) == sig[0]
            check_signed(info, sig)


def test_a_daemon_busy_writing_still_sees_another_daemons_disable(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, key_name: str
) -> None:
    """b generates a keypair (a rotation of another key) while a disables a
    version: b must still stop signing with that version within sync_interval."""
    a = on_token(make_daemon, own_token, FAST_KEYS)
    b = on_token(make_daemon, own_token, FAST_KEYS)
    other = key_name + "-big"
    with a.client() as ca, b.client() as cb:
        ca.create_key(key_name, "ec-p256")
        ca.create_key(other, "rsa-4096")  # slow to generate: a wide window
        signed(cb, key_name)
        cb.key_info(other)
        errors: list[BaseException] = []

        def rotate_at_b() -> None:
            try:
                with b.client(timeout=120.0) as c:
                    c.rotate(other)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=rotate_at_b)
        t.start()
        # b has the rotation in hand (an RSA-4096 keypair takes it a while)
        wait_for(
            lambda: (b.gauge("signd_requests_in_flight") > 0 or not t.is_alive()) or None,
            "b to take the rotation",
        )
        ca.disable(key_name, 1)
        t.join(120)
        assert not errors

        def refused() -> bool | None:
            try:
                cb.sign(key_name, b"still signing?")
            except VersionNotUsable:
                return True
            return None

        wait_for(refused, "b to refuse the disabled version", 6 * SYNC_INTERVAL)


# --------------------------------------------------------------------------
# version retention: max_versions, pruning


def test_max_versions_refuses_a_rotation_with_nothing_to_prune(
    signd: Daemon, key_name: str
) -> None:
    with signd.client() as c:
        info = c.create_key(key_name, "ec-p256")
        assert info.max_versions == 100  # the daemon's [keys] default_max_versions
        info = c.update_key(key_name, max_versions=2)
        assert info.max_versions == 2
        c.rotate(key_name)
        with pytest.raises(DeletionNotAllowed, match="max_versions is 2") as exc:
            c.rotate(key_name)
        assert int(exc.value.code) == 304
        assert "does not allow deletion" in exc.value.message
        info = c.key_info(key_name)
        assert states(info) == {1: "verify-only", 2: "active"}  # nothing was made
    # signctl: raise the cap, and it is shown.
    out = signd.signctl("update", key_name, "--max-versions", "3")
    assert out.returncode == 0, out.stderr
    assert b"max-versions        3" in out.stdout
    with signd.client() as c:
        assert c.rotate(key_name).current_version == 3
        with pytest.raises(InvalidArgument, match="max_versions"):
            c.update_key(key_name, max_versions=1001)  # above [keys] max_versions_limit


def test_retired_versions_are_pruned_when_deletion_is_allowed(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, key_name: str
) -> None:
    """Pruned by the lifecycle task: the record first, then the private key,
    audited as the daemon's own act.  A key without deletion_allowed keeps them."""
    d = on_token(make_daemon, own_token, FAST_KEYS + '\n[audit]\ndir = "audit"\n')
    keep, prune = key_name + "-keep", key_name + "-prune"
    grace = 1.0
    with d.client() as c:
        # keep first: its version 1 retires before prune's does.
        for name, allowed in ((keep, False), (prune, True)):
            c.create_key(name, "ec-p256", verify_grace=grace, deletion_allowed=allowed)
            c.rotate(name)

        def pruned() -> KeyInfo | None:
            info = c.key_info(prune)
            return info if states(info)[1] == "destroyed" else None

        info = wait_for(pruned, "the retired version to be pruned")
        assert states(info) == {1: "destroyed", 2: "active"}
        # The same pass saw keep's version 1 retired, and left it.
        assert states(c.key_info(keep)) == {1: "retired", 2: "active"}
    assert private_key_labels(own_token, prune + "/") == [f"{prune}/v2"]
    assert private_key_labels(own_token, keep + "/") == [f"{keep}/v1", f"{keep}/v2"]
    assert d.proc is not None
    daemon_pid = d.proc.pid
    assert d.stop() == 0
    files = sorted((d.workdir / "audit").glob("audit-*.jsonl"))
    records = [json.loads(ln) for f in files for ln in f.read_bytes().split(b"\n") if ln]
    auto = [r for r in records if r.get("op") == "auto_prune"]
    assert [(r["key"], r["result"], r["pid"]) for r in auto] == [(prune, "ok", daemon_pid)]


# --------------------------------------------------------------------------
# policy: admin operations need "admin"

GID = 4242
NOBODY = 65534
SETPRIV = shutil.which("setpriv")

#: Run as nobody: each admin operation through the Python client; print outcomes.
AS_NOBODY = """
import json, sys
from signd_client import Client
from signd_client.errors import WireError
sock, key = sys.argv[1], sys.argv[2]
out = {}
with Client(sock, retries=0) as c:
    out["sign"] = c.sign(key, b"nobody may sign").version
    for op, call in [
        ("update_key", lambda: c.update_key(key, min_verify_version=1)),
        ("disable", lambda: c.disable(key, 1)),
        ("enable", lambda: c.enable(key, 1)),
        ("destroy", lambda: c.destroy(key, 1)),
        ("destroy_all", lambda: c.destroy(key, all=True)),
    ]:
        try:
            call()
            out[op] = "ok"
        except WireError as exc:
            out[op] = [exc.name, int(exc.code), exc.message]
print(json.dumps(out))
"""


@pytest.mark.skipif(
    SETPRIV is None or os.geteuid() != 0, reason="needs root and setpriv (util-linux)"
)
def test_admin_operations_need_the_admin_grant(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    # As tests/test_access.py: a socket in a 0711 directory, in a group only
    # the client process holds.
    workdir = Path(tempfile.mkdtemp(prefix="signd-access-", dir="/tmp"))
    try:
        workdir.chmod(0o711)
        d = make_daemon(
            "[[access.rules]]\n"
            f'keys = ["{key_name}"]\n'
            'operations = ["sign", "verify", "read"]\n'
            f'groups = ["{GID}"]\n',
            workdir=workdir,
            server_extra=f"socket_group = {GID}\n",
        )
        with d.client() as c:  # root: trusted
            c.create_key(key_name, "ec-p256", deletion_allowed=True)
            c.rotate(key_name)
            before = c.key_info(key_name)
        assert SETPRIV is not None
        out = subprocess.run(
            [
                *(SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={GID}"),
                *(sys.executable, "-c", AS_NOBODY, d.socket, key_name),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={"PATH": "/usr/bin:/bin", "HOME": "/"},
        )
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert got.pop("sign") == 2  # the grant it has works
        for op, outcome in got.items():
            assert outcome[:2] == ["permission_denied", 400], (op, outcome)
            assert f"uid {NOBODY}" in outcome[2]
            assert f"may not admin key {key_name!r}" in outcome[2], outcome
        with d.client() as c:
            assert c.key_info(key_name) == before  # nothing changed
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
