"""Access control: who may do what to which key.

The rules are tested in-process, as any user: ``Policy`` and ``Principal``
built directly, and requests through the in-process service (the principal
is what the server would have read from the kernel).  The kernel's part
needs root and ``setpriv``: the socket's group and mode, and a real second
uid (``nobody``) whose identity and groups the daemon takes from
``SO_PEERCRED`` and ``SO_PEERGROUPS`` at connect time, never from what the
client says (the race of an exec against the accept is in test_identity.py).
The socket gets group ``GID``, a group that exists nowhere on the machine:
only the test's client process holds it (``setpriv --groups``), so nothing
on the machine changes.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signd.access.policy import Policy, Principal, Rule
from signd.config import ConfigError, load_config
from signd.protocol import (
    CreateKeyArgs,
    Empty,
    JwksArgs,
    KeyRefArgs,
    Message,
    PublicKeyArgs,
    RotateArgs,
    SignArgs,
    VerifyArgs,
)
from signd.service.core import Service
from signd_client.audit import AUDIT_KEY
from signd_client.errors import PermissionDenied
from support import call_service, principal, service_with_keys

if TYPE_CHECKING:
    from conftest import Daemon

GID = 4242
NOBODY = 65534
SETPRIV = shutil.which("setpriv")
SIGNCTL = str(Path(sys.executable).parent / "signctl")

needs_root = pytest.mark.skipif(
    SETPRIV is None or os.geteuid() != 0, reason="needs root and setpriv (util-linux)"
)

# --------------------------------------------------------------------------
# the rules, in-process

KEY, OTHER = "app-key", "app-key-other"
PEER = principal(NOBODY, user="nobody", groups=[GID], group_names=["signers"])


def _rule(operations: set[str], keys: tuple[str, ...] = (KEY,), **who: Any) -> Rule:
    return Rule(keys=keys, operations=frozenset(operations), **who)


def _service(*rules: Rule, trust_root: bool = True) -> Service:
    return service_with_keys(Policy(rules, trust_root=trust_root), [KEY, OTHER, AUDIT_KEY])


async def _denied(service: Service, who: Principal, op: str, args: Message) -> str:
    with pytest.raises(PermissionDenied) as info:
        await call_service(service, who, op, args)
    return info.value.message


async def _signs(service: Service, who: Principal, key: str) -> None:
    """``who`` signs with ``key``; the signature checks out against its public key."""
    res = await call_service(service, who, "sign", SignArgs(key=key, message=b"hello"))
    root = principal(0, user="root")
    pem = (await call_service(service, root, "public_key", PublicKeyArgs(key=key)))[
        "public_key_pem"
    ]
    pub = serialization.load_pem_public_key(pem.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(res["signature"], b"hello", ec.ECDSA(hashes.SHA256()))  # an independent check


async def test_no_rule_means_denied() -> None:
    service = _service(_rule({"sign"}, keys=("*",), uids=frozenset({1234})))
    message = await _denied(service, PEER, "sign", SignArgs(key=KEY, message=b"hello"))
    assert f"uid {NOBODY}" in message
    assert f"may not sign key {KEY!r}" in message
    # Reads are denied too, and the key list shows nothing it may not read.
    await _denied(service, PEER, "public_key", PublicKeyArgs(key=KEY))
    await _denied(service, PEER, "key_info", KeyRefArgs(key=KEY))
    assert (await call_service(service, PEER, "list_keys", Empty()))["keys"] == []
    # health and whoami need no grant: they are for everyone who can connect.
    await call_service(service, PEER, "health", Empty())
    assert (await call_service(service, PEER, "whoami", Empty()))["keys"] == []


async def test_a_denied_peer_learns_nothing_of_a_key_that_does_not_exist() -> None:
    service = _service()
    message = await _denied(service, PEER, "key_info", KeyRefArgs(key="no-such-key"))
    assert "may not read key 'no-such-key'" in message


@pytest.mark.parametrize(
    "who",
    [{"groups": frozenset({str(GID)})}, {"groups": frozenset({"signers"})}],
    ids=["gid", "group name"],
)
async def test_group_rule_allows_exactly_what_it_names(who: dict[str, Any]) -> None:
    service = _service(_rule({"sign", "verify", "read"}, **who))
    await _signs(service, PEER, KEY)
    keys = await call_service(service, PEER, "list_keys", Empty())
    assert [k["name"] for k in keys["keys"]] == [KEY]
    # Not granted: another key, and an operation the rule does not name.
    await _denied(service, PEER, "sign", SignArgs(key=OTHER, message=b"x"))
    message = await _denied(service, PEER, "rotate", RotateArgs(key=KEY))
    assert f"may not rotate key {KEY!r}" in message
    message = await _denied(service, PEER, "create_key", CreateKeyArgs(key="new", type="ec-p256"))
    assert "may not create key 'new'" in message
    # jwks needs "read" on every key it names, checked before any is looked up.
    jwks = await call_service(service, PEER, "jwks", JwksArgs(keys=(KEY,)))
    assert [k["kid"] for k in jwks["keys"]] == [f"{KEY}:1"]
    message = await _denied(service, PEER, "jwks", JwksArgs(keys=(KEY, OTHER)))
    assert f"may not read key {OTHER!r}" in message
    message = await _denied(service, PEER, "jwks", JwksArgs(keys=(KEY, "unknown")))
    assert "may not read key 'unknown'" in message


async def test_a_group_the_peer_is_not_in_grants_nothing() -> None:
    service = _service(_rule({"sign"}, groups=frozenset({"4243", "admins"})))
    await _denied(service, PEER, "sign", SignArgs(key=KEY, message=b"x"))


async def test_user_rule_and_glob() -> None:
    service = _service(_rule({"read"}, keys=(KEY[:5] + "*",), users=frozenset({"nobody"})))
    await call_service(service, PEER, "public_key", PublicKeyArgs(key=OTHER))
    await _denied(service, PEER, "sign", SignArgs(key=KEY, message=b"x"))
    someone = principal(1000, user="someone")
    await _denied(service, someone, "public_key", PublicKeyArgs(key=KEY))


async def test_uid_rule() -> None:
    service = _service(_rule({"verify"}, uids=frozenset({NOBODY})))
    answer = await call_service(
        service, PEER, "verify", VerifyArgs(key=KEY, signature=b"junk", message=b"x")
    )
    assert answer["valid"] is False
    await _denied(service, principal(NOBODY + 1), "verify", VerifyArgs(key=KEY, signature=b"j"))


async def test_root_and_the_daemons_own_user_are_trusted_unless_told_not_to() -> None:
    trusting = _service()
    for uid in {0, os.geteuid()}:
        await _signs(trusting, principal(uid), KEY)
    strict = _service(trust_root=False)
    root = principal(0, user="root")
    message = await _denied(strict, root, "create_key", CreateKeyArgs(key="new", type="ec-p256"))
    assert "may not create" in message
    await _denied(strict, principal(os.geteuid()), "sign", SignArgs(key=KEY, message=b"x"))


async def test_the_reserved_key_is_only_read_and_verified_whatever_the_grants() -> None:
    service = _service()
    root = principal(0, user="root")
    for op, args in (
        ("sign", SignArgs(key=AUDIT_KEY, message=b"x")),
        ("rotate", RotateArgs(key=AUDIT_KEY)),
    ):
        message = await _denied(service, root, op, args)
        assert f"no client may {op} it" in message
    await call_service(service, root, "key_info", KeyRefArgs(key=AUDIT_KEY))
    await call_service(service, root, "public_key", PublicKeyArgs(key=AUDIT_KEY))


def test_policy_grants() -> None:
    policy = Policy([_rule({"sign", "read"}, users=frozenset({"nobody"}))], trust_root=False)
    assert policy.granted(PEER, KEY) == {"sign", "read"}
    assert policy.granted(PEER, OTHER) == frozenset()
    assert policy.allows(PEER, None, OTHER)  # no verb needed: anyone
    with pytest.raises(PermissionDenied, match=f"may not admin key {KEY!r}"):
        policy.check(PEER, "admin", KEY)


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
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    cfg = tmp_path / "signd.toml"
    cfg.write_text('[token]\npin_file = "pin"\n' + access)
    with pytest.raises(ConfigError) as info:
        load_config(str(cfg))
    assert field in str(info.value)


def test_rules_from_the_config_grant_what_they_say(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    cfg = tmp_path / "signd.toml"
    cfg.write_text(
        '[token]\npin_file = "pin"\n[[access.rules]]\nkeys = ["app-*"]\n'
        f'operations = ["sign"]\ngroups = ["{GID}"]\n'
    )
    access = load_config(str(cfg)).access
    policy = Policy(access.rules, trust_root=access.trust_root)
    assert policy.granted(PEER, KEY) == {"sign"}
    assert policy.granted(principal(1000), KEY) == frozenset()


# --------------------------------------------------------------------------
# the kernel's part: a real second uid (root only)


@pytest.fixture
def access_daemon(make_daemon: Callable[..., Daemon]) -> Iterator[Callable[[str], Daemon]]:
    """A daemon whose socket ``nobody`` can reach (a 0711 directory), group GID."""
    dirs: list[Path] = []

    def make(access: str) -> Daemon:
        workdir = Path(tempfile.mkdtemp(prefix="signd-access-", dir="/tmp"))
        workdir.chmod(0o711)
        dirs.append(workdir)
        return make_daemon(access, workdir=workdir, server_extra=f"socket_group = {GID}\n")

    yield make
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def as_nobody(
    daemon: Daemon, *args: str, groups: bool = True, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    assert SETPRIV is not None
    priv = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}"]
    priv += [f"--groups={GID}"] if groups else ["--clear-groups"]
    return subprocess.run(
        [*priv, SIGNCTL, "--socket", daemon.socket, *args],
        input=input,
        capture_output=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": "/"},
    )


def _key(daemon: Daemon, name: str) -> ec.EllipticCurvePublicKey:
    with daemon.client() as c:  # root: trusted by default
        c.create_key(name, "ec-p256")
        pub = serialization.load_pem_public_key(c.public_key(name).public_key_pem.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    return pub


@needs_root
def test_socket_gets_its_group_and_mode(access_daemon: Callable[[str], Daemon]) -> None:
    d = access_daemon("")
    st = os.stat(d.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert st.st_gid == GID
    assert stat.S_IMODE(st.st_mode) == 0o660


@needs_root
def test_peer_outside_the_socket_group_cannot_connect(
    access_daemon: Callable[[str], Daemon],
) -> None:
    d = access_daemon("")
    out = as_nobody(d, "health", groups=False)
    assert out.returncode == 2
    assert b"Permission denied" in out.stderr


@needs_root
def test_the_kernels_groups_grant_and_the_socket_carries_them(
    access_daemon: Callable[[str], Daemon], key_name: str
) -> None:
    """nobody, with group GID only as setpriv gave it: the daemon reads the
    group from SO_PEERGROUPS and the rule for it applies; nothing else does."""
    d = access_daemon(
        f'[[access.rules]]\nkeys = ["{key_name}"]\noperations = ["sign"]\ngroups = ["{GID}"]\n'
    )
    pub = _key(d, key_name)
    other = key_name + "-other"
    _key(d, other)
    out = as_nobody(d, "--json", "sign", key_name, "--in", "-", input=b"signed by nobody")
    assert out.returncode == 0, out.stderr
    sig = base64.b64decode(json.loads(out.stdout)["signature"])
    pub.verify(sig, b"signed by nobody", ec.ECDSA(hashes.SHA256()))
    denied = as_nobody(d, "sign", other, "--in", "-", input=b"x")
    assert denied.returncode == 2
    err = denied.stderr.decode()
    assert "permission_denied (error 400)" in err
    assert f"uid {NOBODY}" in err
    assert f"may not sign key {other!r}" in err


@needs_root
def test_both_outcomes_of_another_uid_are_audited(
    access_daemon: Callable[[str], Daemon], key_name: str
) -> None:
    d = access_daemon(
        '[audit]\ndir = "audit"\n\n[[access.rules]]\n'
        f'keys = ["{key_name}"]\noperations = ["sign"]\ngroups = ["{GID}"]\n'
    )
    _key(d, key_name)
    assert as_nobody(d, "sign", key_name, "--in", "-", input=b"allowed").returncode == 0
    assert as_nobody(d, "rotate", key_name).returncode == 2
    assert d.stop() == 0
    recs = [
        json.loads(line)
        for f in sorted((d.workdir / "audit").glob("audit-*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    # Requests only: not checkpoints; request records (strict mode, "phase":
    # "request") say who asked, their outcome records say the same and the result.
    recs = [r for r in recs if "kind" not in r and r.get("phase") != "request"]
    mine = [(r["op"], r["result"], r["code"]) for r in recs if r["uid"] == NOBODY]
    assert mine == [("sign", "ok", 0), ("rotate", "permission_denied", 400)]
    assert all(r["exe"] and r["gid"] == NOBODY for r in recs if r["uid"] == NOBODY)
