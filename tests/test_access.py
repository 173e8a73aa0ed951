"""Access control with a real second uid: ``nobody``, run through ``setpriv``.

The socket gets group ``GID``, a group that exists nowhere on the machine: only
the test's client process holds it (``setpriv --groups``), so nothing on the
machine changes.  The daemon learns who the peer is from ``SO_PEERCRED`` and
``SO_PEERGROUPS`` at connect time, never from what the client says (the race
of an exec against the accept is in test_identity.py).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signd_client.errors import PermissionDenied

if TYPE_CHECKING:
    from conftest import Daemon

GID = 4242
NOBODY = 65534
SETPRIV = shutil.which("setpriv")
SIGNCTL = str(Path(sys.executable).parent / "signctl")

pytestmark = pytest.mark.skipif(
    SETPRIV is None or os.geteuid() != 0, reason="needs root and setpriv (util-linux)"
)


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


def test_socket_gets_its_group_and_mode(access_daemon: Callable[[str], Daemon]) -> None:
    d = access_daemon("")
    st = os.stat(d.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert st.st_gid == GID
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_peer_outside_the_socket_group_cannot_connect(
    access_daemon: Callable[[str], Daemon],
) -> None:
    d = access_daemon("")
    out = as_nobody(d, "health", groups=False)
    assert out.returncode == 2
    assert b"Permission denied" in out.stderr


def test_no_rule_means_denied(access_daemon: Callable[[str], Daemon], key_name: str) -> None:
    d = access_daemon('[[access.rules]]\nkeys = ["*"]\noperations = ["sign"]\nuids = [1234]\n')
    _key(d, key_name)
    out = as_nobody(d, "sign", key_name, "--in", "-", input=b"hello")
    assert out.returncode == 2, out
    err = out.stderr.decode()
    assert "permission_denied (error 400)" in err
    assert f"uid {NOBODY}" in err
    assert f"may not sign key {key_name!r}" in err
    # Reads are denied too, and the key list shows nothing it may not read.
    assert as_nobody(d, "pubkey", key_name).returncode == 2
    keys = as_nobody(d, "keys")
    assert keys.returncode == 0
    assert key_name.encode() not in keys.stdout
    # health needs no grant: liveness is for everyone who can connect.
    assert as_nobody(d, "health").returncode == 0


def test_group_rule_allows_exactly_what_it_names(
    access_daemon: Callable[[str], Daemon], key_name: str, tmp_path: Path
) -> None:
    d = access_daemon(
        "[[access.rules]]\n"
        f'keys = ["{key_name}"]\n'
        'operations = ["sign", "verify", "read"]\n'
        f'groups = ["{GID}"]\n'
    )
    pub = _key(d, key_name)
    other = key_name + "-other"
    _key(d, other)
    msg = tmp_path / "msg"
    msg.write_bytes(b"signed by nobody")
    msg.chmod(0o644)
    tmp_path.chmod(0o755)
    out = as_nobody(d, "--json", "sign", key_name, "--in", "-", input=msg.read_bytes())
    assert out.returncode == 0, out.stderr
    import json

    sig = __import__("base64").b64decode(json.loads(out.stdout)["signature"])
    pub.verify(sig, msg.read_bytes(), ec.ECDSA(hashes.SHA256()))  # an independent check
    keys = as_nobody(d, "keys")
    assert key_name.encode() in keys.stdout
    assert other.encode() not in keys.stdout
    # Not granted: another key, and an operation the rule does not name.
    denied = as_nobody(d, "sign", other, "--in", "-", input=b"x")
    assert denied.returncode == 2
    assert b"permission_denied" in denied.stderr
    rotate = as_nobody(d, "rotate", key_name)
    assert rotate.returncode == 2
    assert f"may not rotate key {key_name!r}".encode() in rotate.stderr
    create = as_nobody(d, "create", key_name + "-new", "--type", "ec-p256")
    assert create.returncode == 2
    assert b"may not create" in create.stderr
    # jwks needs "read" on every key it names, checked before any is looked up.
    jwks = as_nobody(d, "jwks", key_name)
    assert jwks.returncode == 0, jwks.stderr
    assert [k["kid"] for k in json.loads(jwks.stdout)["keys"]] == [f"{key_name}:1"]
    mixed = as_nobody(d, "jwks", key_name, other)
    assert mixed.returncode == 2
    assert f"may not read key {other!r}".encode() in mixed.stderr


def test_user_rule_and_glob(access_daemon: Callable[[str], Daemon], key_name: str) -> None:
    d = access_daemon(
        '[[access.rules]]\nkeys = ["' + key_name[:10] + '*"]\n'
        'operations = ["read"]\nusers = ["nobody"]\n'
    )
    _key(d, key_name)
    assert as_nobody(d, "pubkey", key_name).returncode == 0
    assert as_nobody(d, "sign", key_name, "--in", "-", input=b"x").returncode == 2


def test_root_is_refused_when_not_trusted(
    access_daemon: Callable[[str], Daemon], key_name: str
) -> None:
    d = access_daemon("[access]\ntrust_root = false\n")
    with d.client() as c, pytest.raises(PermissionDenied, match="may not create"):
        c.create_key(key_name, "ec-p256")


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
def test_bad_access_config_names_the_field(
    make_daemon: Callable[..., Daemon], access: str, field: str
) -> None:
    out = make_daemon(access, start=False).check_config()
    assert out.returncode == 2
    assert field in out.stderr, out.stderr


def test_both_outcomes_of_another_uid_are_audited(
    access_daemon: Callable[[str], Daemon], key_name: str
) -> None:
    import json

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
