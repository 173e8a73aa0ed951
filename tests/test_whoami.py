"""``whoami``: the caller as the kernel recorded it, and its grants per key.

In-process (``fakes.open_harness``): the principal is what the server would
have read from ``SO_PEERCRED``/``SO_PEERGROUPS``.
"""

from __future__ import annotations

from typing import Any

import pytest

from fakes import Harness, open_harness, principal
from signd.access.policy import Policy, Rule
from signd.audit.log import AUDIT_KEY
from signd.protocol import CreateKeyArgs, Empty, KeyGrant, SignArgs, Whoami
from signd_client.errors import PermissionDenied

ROOT = principal(0, user="root")
ALICE = principal(1000, gid=100, user="alice", groups=[4242, 7])
KEYS = ["app-one", "app-two", "ops", "other"]
RULES = (
    Rule(keys=("app-*",), operations=frozenset({"sign", "read"}), users=frozenset({"alice"})),
    Rule(keys=("*",), operations=frozenset({"verify"}), groups=frozenset({"4242"})),
    Rule(keys=("ops",), operations=frozenset({"admin", "rotate"}), uids=frozenset({3000})),
)
EVERY = ("admin", "create", "import", "read", "rotate", "sign", "verify")


async def _keys(h: Harness, policy: Policy) -> None:
    """The keys (and the audit key), made by root; then ``policy`` in force."""
    root = h.connect(ROOT)
    for name in KEYS:
        await root.call("create_key", CreateKeyArgs(key=name, type="ec-p256"))
    await h.service.ensure_audit_key()
    h.service.reconfigure(policy=policy, limiter=None, request_timeout=30.0)


async def test_whoami_lists_the_callers_grants_by_key(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await _keys(h, Policy(RULES, trust_root=False))
        answer = await h.connect(ALICE).call("whoami", Empty())
    assert answer == Whoami(
        uid=1000,
        gid=100,
        groups=(7, 100, 4242),
        user="alice",
        keys=(
            KeyGrant(name="app-one", verbs=("read", "sign", "verify")),
            KeyGrant(name="app-two", verbs=("read", "sign", "verify")),
            KeyGrant(name="ops", verbs=("verify",)),
            KeyGrant(name="other", verbs=("verify",)),
            KeyGrant(name=AUDIT_KEY, verbs=("verify",)),
        ),
    )


async def test_whoami_needs_no_grant_and_lists_no_key_without_one(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await _keys(h, Policy(RULES, trust_root=False))
        answer = await h.connect(principal(5555)).call("whoami", Empty())
    assert (answer.uid, answer.gid, answer.groups) == (5555, 5555, (5555,))
    assert answer.user is None
    assert answer.keys == ()


async def test_a_trusted_caller_gets_every_verb_but_the_reserved_keys_read_and_verify(
    autojump_clock: Any,
) -> None:
    async with open_harness() as h:
        await _keys(h, Policy(RULES, trust_root=True))
        answer = await h.connect(ROOT).call("whoami", Empty())
    assert answer.keys == (
        *(KeyGrant(name=n, verbs=EVERY) for n in KEYS),
        KeyGrant(name=AUDIT_KEY, verbs=("read", "verify")),
    )


async def test_whoami_agrees_with_what_the_service_then_allows(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await _keys(h, Policy(RULES, trust_root=False))
        alice = h.connect(ALICE)
        answer = await alice.call("whoami", Empty())
        may_sign = {k.name for k in answer.keys if "sign" in k.verbs}
        assert may_sign == {"app-one", "app-two"}
        for name in may_sign:
            await alice.call("sign", SignArgs(key=name, message=b"m"))
        for name in {*KEYS, AUDIT_KEY} - may_sign:
            with pytest.raises(PermissionDenied):
                await alice.call("sign", SignArgs(key=name, message=b"m"))
