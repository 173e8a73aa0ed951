"""Access control: who may do what to which key.

The rules are tested in-process, as any user: ``Policy`` and ``Principal``
built directly here, and requests through the in-process service in
test_access_inprocess.py.  The kernel's part needs root and ``setpriv``:
the socket's group and mode, and a real second uid (``nobody``) whose
identity and groups the daemon takes from ``SO_PEERCRED`` and
``SO_PEERGROUPS`` at connect time, never from what the client says (the
race of an exec against the accept is in test_identity.py).
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

from fakes import principal
from signd.access.policy import OPERATIONS, Policy, Rule
from signd_client.errors import PermissionDenied

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
# the policy alone (the rules through the service: test_access_inprocess.py)

KEY, OTHER = "app-key", "app-key-other"
PEER = principal(NOBODY, user="nobody", groups=[GID], group_names=["signers"])


def _rule(operations: set[str], keys: tuple[str, ...] = (KEY,), **who: Any) -> Rule:
    return Rule(keys=keys, operations=frozenset(operations), **who)


def test_policy_grants() -> None:
    policy = Policy([_rule({"sign", "read"}, users=frozenset({"nobody"}))], trust_root=False)
    assert policy.granted(PEER, KEY) == {"sign", "read"}
    assert policy.granted(PEER, OTHER) == frozenset()
    assert policy.allows(PEER, None, OTHER)  # no verb needed: anyone
    with pytest.raises(PermissionDenied, match=f"may not admin key {KEY!r}"):
        policy.check(PEER, "admin", KEY)


def test_root_and_the_daemons_own_user_are_trusted_unless_told_not_to() -> None:
    for uid in {0, os.geteuid()}:
        assert Policy(()).granted(principal(uid), KEY) == set(OPERATIONS)
        assert Policy((), trust_root=False).granted(principal(uid), KEY) == frozenset()


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
