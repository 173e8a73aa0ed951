"""``whoami``: the caller as the kernel recorded it, and its grants per key.

In-process: the service is built with a policy and keys in its keystore (no
token, no socket); the principal is what the server would have read from
``SO_PEERCRED``/``SO_PEERGROUPS``.
"""

from __future__ import annotations

import pytest

from signd.access.policy import Policy, Rule
from signd.protocol import Empty, SignArgs
from signd_client.audit import AUDIT_KEY
from signd_client.errors import PermissionDenied
from support import call_service, principal, service_with_keys

ALICE = principal(1000, 100, user="alice", groups=[4242, 7])
STRANGER = principal(5555)
KEYS = ["app-one", "app-two", "ops", "other", AUDIT_KEY]
RULES = (
    Rule(keys=("app-*",), operations=frozenset({"sign", "read"}), users=frozenset({"alice"})),
    Rule(keys=("*",), operations=frozenset({"verify"}), groups=frozenset({"4242"})),
    Rule(keys=("ops",), operations=frozenset({"admin", "rotate"}), uids=frozenset({3000})),
)


async def test_whoami_lists_the_callers_grants_by_key() -> None:
    service = service_with_keys(Policy(RULES, trust_root=False), KEYS)
    answer = await call_service(service, ALICE, "whoami", Empty())
    assert answer == {
        "uid": 1000,
        "gid": 100,
        "groups": [7, 100, 4242],
        "user": "alice",
        "keys": [
            {"name": "app-one", "verbs": ["read", "sign", "verify"]},
            {"name": "app-two", "verbs": ["read", "sign", "verify"]},
            {"name": "ops", "verbs": ["verify"]},
            {"name": "other", "verbs": ["verify"]},
            {"name": AUDIT_KEY, "verbs": ["verify"]},
        ],
    }


async def test_whoami_needs_no_grant_and_lists_no_key_without_one() -> None:
    service = service_with_keys(Policy(RULES, trust_root=False), KEYS)
    answer = await call_service(service, STRANGER, "whoami", Empty())
    assert answer["uid"] == 5555
    assert "user" not in answer  # no name for the uid: absent (nil is not sent)
    assert answer["keys"] == []


async def test_a_trusted_caller_gets_every_verb_but_the_reserved_keys_read_and_verify() -> None:
    service = service_with_keys(Policy(RULES, trust_root=True), KEYS)
    answer = await call_service(service, principal(0, user="root"), "whoami", Empty())
    every = ["admin", "create", "read", "rotate", "sign", "verify"]
    assert answer["keys"] == [
        *({"name": n, "verbs": every} for n in KEYS[:-1]),
        {"name": AUDIT_KEY, "verbs": ["read", "verify"]},
    ]


async def test_whoami_agrees_with_what_the_service_then_allows() -> None:
    service = service_with_keys(Policy(RULES, trust_root=False), KEYS)
    answer = await call_service(service, ALICE, "whoami", Empty())
    may_sign = {k["name"] for k in answer["keys"] if "sign" in k["verbs"]}
    assert may_sign == {"app-one", "app-two"}
    for name in set(KEYS) - may_sign:
        with pytest.raises(PermissionDenied):
            await call_service(service, ALICE, "sign", SignArgs(key=name, message=b"m"))
