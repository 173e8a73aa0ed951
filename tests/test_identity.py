"""A connection's identity is what the kernel recorded at connect time.

A real setuid helper (a root-owned mode 4755 copy of ``setpriv``) and a real
unprivileged client (uid ``nobody``, run through ``setpriv``) race an exec
against the daemon's accept: see ``exec_racer.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Daemon

NOBODY = 65534
#: the group an [access] rule grants ``sign``; no process holds it but the helper's
GRANTED_GID = 4343
ROUNDS = 50
SETPRIV = shutil.which("setpriv")
RACER = Path(__file__).with_name("exec_racer.py")

pytestmark = pytest.mark.skipif(
    SETPRIV is None or os.geteuid() != 0, reason="needs root and setpriv (util-linux)"
)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A root-owned 0711 directory that ``nobody`` can reach: for the daemon's
    socket, the setuid helper and the racer script."""
    d = Path(tempfile.mkdtemp(prefix="signd-ident-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` as uid/gid ``nobody`` with no supplementary groups."""
    assert SETPRIV is not None
    env = {"PATH": "/usr/bin:/bin", "HOME": "/"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run(
        [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def test_exec_of_a_setuid_helper_does_not_lend_its_groups(
    make_daemon: Callable[..., Daemon], public_dir: Path, key_name: str
) -> None:
    assert SETPRIV is not None
    helper = public_dir / "setpriv-suid"
    shutil.copy(SETPRIV, helper)
    os.chown(helper, 0, 0)
    helper.chmod(0o4755)
    racer = public_dir / RACER.name
    shutil.copy(RACER, racer)
    racer.chmod(0o644)
    # nobody reaches the socket through its primary group (nogroup); only
    # GRANTED_GID may sign with the key.
    d = make_daemon(
        f'[[access.rules]]\nkeys = ["{key_name}"]\noperations = ["sign"]\n'
        f'groups = ["{GRANTED_GID}"]\n',
        workdir=public_dir,
        server_extra=f"socket_group = {NOBODY}\n",
    )
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
    python = sys.executable

    # Without the group: denied.  Through the helper, from the start of the
    # connection: granted (the helper is setuid and the rule works).
    alone = as_nobody(python, str(racer), "once", d.socket, key_name)
    assert alone.stdout.strip() == "permission_denied", alone
    helped = as_nobody(
        *(str(helper), f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={GRANTED_GID}"),
        *(python, str(racer), "once", d.socket, key_name),
    )
    assert helped.stdout.strip() == "signed", helped

    out = as_nobody(
        python, str(racer), "race", d.socket, key_name, str(helper), str(GRANTED_GID), str(ROUNDS)
    )
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    assert len(answers) == ROUNDS
    signed = answers.count("signed")
    assert answers == ["permission_denied"] * ROUNDS, f"{signed} of {ROUNDS} signed: {answers}"


def test_every_group_is_read_however_many() -> None:
    """More groups than ``socket.getsockopt`` can take (256): the call is made
    again with the size the kernel asks for (ERANGE)."""
    assert SETPRIV is not None
    groups = list(range(20000, 20300))
    script = (
        "import socket\n"
        "from signd.access.policy import principal_of\n"
        "a, b = socket.socketpair(socket.AF_UNIX)\n"
        "print(' '.join(map(str, sorted(principal_of(a).groups))))\n"
    )
    out = subprocess.run(
        [SETPRIV, f"--groups={','.join(map(str, groups))}", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert [int(g) for g in out.stdout.split()] == sorted([os.getgid(), *groups])
