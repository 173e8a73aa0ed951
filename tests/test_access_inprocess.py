"""Access rules, in process: the policy a config builds, applied by ``Service.handle``.

The peers are principals built here (what the kernel would report), so every
rule case runs without root or a second uid; test_access.py covers what needs
them (the socket's group and mode, ``SO_PEERCRED`` of a real peer, the audit
records of another uid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fakes import Conn, Harness, open_harness, policy_from_config, principal
from signd.config import ConfigError
from signd.errors import KeyNotFound, PermissionDenied
from signd.protocol import (
    CreateKeyArgs,
    DestroyArgs,
    Empty,
    JwksArgs,
    KeyRefArgs,
    PublicKeyArgs,
    RotateArgs,
    SignArgs,
    SignBatchArgs,
    UpdateKeyArgs,
    VerifyArgs,
    VersionRefArgs,
)

GID = 4242
NOBODY = principal(65534, user="nobody", groups=[GID], group_names=["signers"])
ROOT = principal(0, user="root")


async def _keys(h: Harness, *names: str) -> None:
    root = h.connect(ROOT)  # trusted by default
    for name in names:
        await root.call("create_key", CreateKeyArgs(key=name, type="ec-p256"))


async def _denied(c: Conn, op: str, args: Any, match: str = "may not") -> None:
    with pytest.raises(PermissionDenied, match=match):
        await c.call(op, args)


async def test_no_rule_means_denied(autojump_clock: Any, tmp_path: Path) -> None:
    policy = policy_from_config(
        tmp_path, '[[access.rules]]\nkeys = ["*"]\noperations = ["sign"]\nuids = [71234]\n'
    )
    async with open_harness(policy=policy) as h:
        await _keys(h, "k")
        c = h.connect(NOBODY)
        await _denied(c, "sign", SignArgs(key="k", message=b"x"), "uid 65534.*may not sign key 'k'")
        await _denied(c, "public_key", PublicKeyArgs(key="k"), "may not read key 'k'")
        # A key that does not exist is refused the same way: a peer learns nothing.
        await _denied(c, "key_info", KeyRefArgs(key="absent"), "may not read key 'absent'")
        assert (await c.call("list_keys", Empty())).keys == ()
        assert (await c.call("health", Empty())).live  # liveness needs no grant
        # The uid the rule names may sign, and nothing else.
        named = h.connect(principal(71234))
        assert (await named.call("sign", SignArgs(key="k", message=b"x"))).version == 1
        await _denied(named, "verify", VerifyArgs(key="k", signature=b"s", message=b"x"))


@pytest.mark.parametrize("group", [str(GID), "signers"])
async def test_group_rule_allows_exactly_what_it_names(
    autojump_clock: Any, tmp_path: Path, group: str
) -> None:
    policy = policy_from_config(
        tmp_path,
        '[[access.rules]]\nkeys = ["mine"]\noperations = ["sign", "verify", "read"]\n'
        f'groups = ["{group}"]\n',
    )
    async with open_harness(policy=policy) as h:
        await _keys(h, "mine", "other", "mine2")
        c = h.connect(NOBODY)
        signed = await c.call("sign", SignArgs(key="mine", message=b"m"))
        ok = await c.call(
            "verify", VerifyArgs(key="mine", signature=signed.signature, message=b"m")
        )
        assert ok.valid
        batch = await c.call("sign_batch", SignBatchArgs(key="mine", messages=(b"a", b"b")))
        assert len(batch.results) == 2
        assert [k.name for k in (await c.call("list_keys", Empty())).keys] == ["mine"]
        assert (await c.call("key_info", KeyRefArgs(key="mine"))).name == "mine"
        # Not granted: another key, and the operations the rule does not name.
        await _denied(c, "sign", SignArgs(key="other", message=b"x"), "may not sign key 'other'")
        await _denied(c, "sign", SignArgs(key="mine2", message=b"x"))  # an exact name is exact
        await _denied(c, "rotate", RotateArgs(key="mine"), "may not rotate key 'mine'")
        await _denied(c, "create_key", CreateKeyArgs(key="new", type="ec-p256"), "may not create")
        for op, args in [
            ("update_key", UpdateKeyArgs(key="mine", verify_grace=1.0)),
            ("disable", VersionRefArgs(key="mine", version=1)),
            ("enable", VersionRefArgs(key="mine", version=1)),
            ("destroy", DestroyArgs(key="mine", all=True)),
        ]:
            await _denied(c, op, args, "may not admin key 'mine'")
        # jwks needs "read" on every key it names, checked before any is looked up.
        jwks = await c.call("jwks", JwksArgs(keys=("mine",)))
        assert [k.kid for k in jwks.keys] == ["mine:1"]
        await _denied(c, "jwks", JwksArgs(keys=("mine", "other")), "may not read key 'other'")
        # Without the group, nothing.
        stranger = h.connect(principal(65534, user="nobody"))
        await _denied(stranger, "sign", SignArgs(key="mine", message=b"x"))


async def test_user_rule_and_glob(autojump_clock: Any, tmp_path: Path) -> None:
    policy = policy_from_config(
        tmp_path, '[[access.rules]]\nkeys = ["team-*"]\noperations = ["read"]\nusers = ["nobody"]\n'
    )
    async with open_harness(policy=policy) as h:
        await _keys(h, "team-a", "teams", "other-team-a")
        c = h.connect(NOBODY)
        assert (await c.call("public_key", PublicKeyArgs(key="team-a"))).version == 1
        # The glob is matched whole: a name that only contains it is not granted.
        await _denied(c, "public_key", PublicKeyArgs(key="other-team-a"))
        await _denied(c, "public_key", PublicKeyArgs(key="teams"))
        await _denied(c, "sign", SignArgs(key="team-a", message=b"x"))
        # A granted name that does not exist is simply not found.
        with pytest.raises(KeyNotFound):
            await c.call("key_info", KeyRefArgs(key="team-absent"))
        # The rule names a user: another one is not granted.
        await _denied(
            h.connect(principal(71000, user="alice")), "key_info", KeyRefArgs(key="team-a")
        )


async def test_operations_star_and_admin_grant(autojump_clock: Any, tmp_path: Path) -> None:
    policy = policy_from_config(
        tmp_path,
        '[[access.rules]]\nkeys = ["ops-*"]\noperations = ["*"]\nuids = [70500]\n'
        '[[access.rules]]\nkeys = ["*"]\noperations = ["read"]\nuids = [70501]\n',
    )
    async with open_harness(policy=policy) as h:
        admin = h.connect(principal(70500))
        info = await admin.call("create_key", CreateKeyArgs(key="ops-1", type="ed25519"))
        assert info.name == "ops-1"
        assert (await admin.call("rotate", RotateArgs(key="ops-1"))).current_version == 2
        await admin.call("disable", VersionRefArgs(key="ops-1", version=1))
        await _denied(admin, "create_key", CreateKeyArgs(key="dev-1", type="ed25519"))
        reader = h.connect(principal(70501))
        assert (await reader.call("key_info", KeyRefArgs(key="ops-1"))).current_version == 2
        await _denied(reader, "rotate", RotateArgs(key="ops-1"))


async def test_root_is_refused_when_not_trusted(autojump_clock: Any, tmp_path: Path) -> None:
    policy = policy_from_config(tmp_path, "[access]\ntrust_root = false\n")
    async with open_harness(policy=policy) as h:
        await _denied(h.connect(ROOT), "create_key", CreateKeyArgs(key="k", type="ec-p256"))


async def test_root_is_trusted_by_default(autojump_clock: Any, tmp_path: Path) -> None:
    async with open_harness(policy=policy_from_config(tmp_path, "")) as h:
        root = h.connect(ROOT)
        await root.call("create_key", CreateKeyArgs(key="k", type="ec-p256"))
        assert (await root.call("sign", SignArgs(key="k", message=b"x"))).version == 1
        await _denied(h.connect(NOBODY), "sign", SignArgs(key="k", message=b"x"))


@pytest.mark.parametrize(
    ("access", "field"),
    [
        ('[[access.rules]]\noperations = ["sign"]\nuids = [1]\n', "access.rules[0].keys"),
        ('[[access.rules]]\nkeys = ["*"]\nuids = [1]\n', "access.rules[0].operations"),
        (
            '[[access.rules]]\nkeys = ["*"]\noperations = ["fly"]\nuids = [1]\n',
            "access.rules[0].operations",
        ),
        ('[[access.rules]]\nkeys = ["*"]\noperations = ["sign"]\n', "access.rules[0]"),
        (
            '[[access.rules]]\nkeys = ["*"]\noperations = ["sign"]\nuids = ["x"]\n',
            "access.rules[0].uids",
        ),
        ("[access]\ntrust_root = 1\n", "access.trust_root"),
        ('[access]\nwho = "me"\n', "access.who"),
    ],
)
def test_bad_access_config_names_the_field(tmp_path: Path, access: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        policy_from_config(tmp_path, access)
