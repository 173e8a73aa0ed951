"""The PIN never reaches a core dump: the daemon and every token worker run with
``RLIMIT_CORE`` 0 and are not dumpable (``PR_SET_DUMPABLE`` 0).

What the kernel shows, and so what this proves:

* ``/proc/<pid>/limits`` says ``Max core file size 0 0``: no core file is
  written, whatever the process dies of.  The daemon is started with the core
  limit raised to unlimited, so the 0 is signd's own doing.
* A process that is not dumpable has its ``/proc/<pid>`` owned by root, and
  another process of its own uid may no longer read its memory or environment
  there (nor ptrace it).  Both are visible only for a daemon that does not run
  as root, so this one runs as ``nobody`` (through ``setpriv``) on a token of
  its own.

No process is crashed here: where a core would go depends on the machine's
``core_pattern``, and what matters is that the kernel will not write one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import SOFTHSM_INIT

if TYPE_CHECKING:
    from conftest import Daemon

NOBODY = 65534
SETPRIV = shutil.which("setpriv")
PRLIMIT = shutil.which("prlimit")

pytestmark = pytest.mark.skipif(
    SETPRIV is None or PRLIMIT is None or os.geteuid() != 0,
    reason="needs root, setpriv and prlimit (util-linux)",
)


def core_limit(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return line.split()[4:6]
    raise AssertionError(f"no core limit in /proc/{pid}/limits")


def real_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return out


def as_nobody(*argv: str) -> list[str]:
    assert SETPRIV is not None
    return [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def nobody_env(**extra: str) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return {**env, **extra}


def python_for_nobody() -> tuple[str, dict[str, str]]:
    """An interpreter that nobody can run, and run again from itself (the
    daemon execs its workers with ``sys.executable``), with signd importable;
    and the environment for it.  This one, else the system's with this one's
    packages (an interpreter under /root, as pyenv's, is out of nobody's reach)."""
    packages = ":".join(p for p in sys.path if p.endswith("-packages"))
    probe = (
        "import subprocess, sys, signd.cli; subprocess.run([sys.executable, '-c', ''], check=True)"
    )
    for python, env in (
        (sys.executable, nobody_env()),
        (
            "/usr/bin/python3",
            nobody_env(PYTHONPATH=f"{os.environ.get('PYTHONPATH', '')}:{packages}"),
        ),
    ):
        ok = subprocess.run(
            as_nobody(python, "-c", probe), capture_output=True, timeout=60, check=False, env=env
        )
        if ok.returncode == 0:
            return python, env
    pytest.fail(f"no Python that uid {NOBODY} can run signd with (tried {sys.executable})")


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory of nobody's own (0700) in /tmp, as signd's state directory would be."""
    d = Path(tempfile.mkdtemp(prefix="signd-core-", dir="/tmp"))
    os.chown(d, NOBODY, NOBODY)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_daemon_and_workers_cannot_dump_core(nobody_dir: Path) -> None:
    assert PRLIMIT is not None
    # A token of nobody's own, made by nobody.
    script = nobody_dir / "softhsm-init.sh"
    shutil.copy(SOFTHSM_INIT, script)
    os.chown(script, NOBODY, NOBODY)
    state = nobody_dir / "softhsm"
    init = subprocess.run(
        as_nobody("bash", str(script), "--state-dir", str(state), "--label", "core", "--quiet"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=nobody_env(),
    )
    assert init.returncode == 0, init.stderr
    conf = init.stdout.strip().split("=", 1)[1]
    config = nobody_dir / "signd.toml"
    from signd.config import find_softhsm_module

    config.write_text(
        f'[server]\nsocket = "{nobody_dir / "signd.sock"}"\n'
        f'[token]\nmodule = "{find_softhsm_module()}"\nlabel = "core"\n'
        f'pin_file = "{state / "user.pin"}"\nworkers = 2\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    os.chown(config, NOBODY, NOBODY)
    config.chmod(0o600)
    python, env = python_for_nobody()
    log_path = nobody_dir / "signd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                *(PRLIMIT, "--core=unlimited:unlimited", "--"),
                *as_nobody(python, "-m", "signd", "serve", "--config", str(config)),
            ],
            stdout=log,
            stderr=log,
            env={**env, "SOFTHSM2_CONF": conf},
        )
    try:
        deadline = time.monotonic() + 60
        while b'"msg": "ready"' not in log_path.read_bytes():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        workers = [
            c
            for c in children(proc.pid)
            if b"signd.token" in Path(f"/proc/{c}/cmdline").read_bytes()
        ]
        assert len(workers) >= 2, workers  # the signing workers and the writer
        for pid in [proc.pid, *workers]:
            assert real_uid(pid) == NOBODY
            assert core_limit(pid) == ["0", "0"], pid
            # Not dumpable: the files in its /proc entry belong to root, not to nobody.
            assert os.stat(f"/proc/{pid}/status").st_uid == 0, pid
        # nobody cannot read the daemon's environment, though the daemon is nobody too.
        peek = subprocess.run(
            as_nobody("cat", f"/proc/{proc.pid}/environ"),
            capture_output=True,
            timeout=30,
            check=False,
            env=nobody_env(),
        )
        assert peek.returncode != 0
        assert b"Permission denied" in peek.stderr
        assert b"core dumps not fully disabled" not in log_path.read_bytes()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_root_daemon_has_no_core_limit_either(signd: Daemon) -> None:
    assert signd.proc is not None
    workers = signd.token_workers()
    assert workers
    for pid in [signd.proc.pid, *workers]:
        assert core_limit(pid) == ["0", "0"], pid
