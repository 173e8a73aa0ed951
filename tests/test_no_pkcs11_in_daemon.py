"""The daemon process never loads python-pkcs11: only its token workers do.

python-pkcs11 runs the module without locks (``C_Initialize(NULL)``), so a
PKCS#11 call from the daemon's threads could crash it; signd keeps every call
in worker processes, and these tests keep the daemon from even importing it.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pkcs11._pkcs11

import signd

if TYPE_CHECKING:
    from conftest import Daemon  # the root conftest.py

#: The modules that run in a worker process (or are no part of the daemon).
WORKER_SIDE = {
    "signd.token.session",
    "signd.token.wrapping",
    "signd.token.importing",
    "signd.token.objects",
    "signd.token.hmac_secrets",
    "signd.token.metadata",
    "signd.token.keypairs",
    "signd.token.mechanisms",
    "signd.token.ceremony",
    "signd.token.arrays",
    "signd.token.worker",
    "signd.token.__main__",
}
NOT_THE_DAEMON = ("signd.bench", "signd.__main__")

#: python-pkcs11's extension module, as it appears in /proc/PID/maps.
EXTENSION = os.path.realpath(pkcs11._pkcs11.__file__)


def daemon_modules() -> list[str]:
    names = [
        m.name
        for m in pkgutil.walk_packages(signd.__path__, "signd.")
        if m.name not in WORKER_SIDE and not m.name.startswith(NOT_THE_DAEMON)
    ]
    assert "signd.token.pool" in names
    assert "signd.cli" in names
    return names


def mapped_files(pid: int) -> set[str]:
    files = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            files.add(fields[5])
    return files


def test_no_daemon_module_imports_pkcs11() -> None:
    """Every module of the daemon side, imported in a fresh interpreter."""
    names = daemon_modules()
    code = textwrap.dedent(
        f"""
        import importlib, sys
        for name in {names!r}:
            importlib.import_module(name)
        bad = sorted(m for m in sys.modules if m == "pkcs11" or m.startswith("pkcs11."))
        print(" ".join(bad))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"the daemon side imports {out.stdout.strip()}"


def test_the_worker_side_does_import_it() -> None:
    """The check above can fail: the worker's modules bring pkcs11 in."""
    code = "import sys, signd.token.worker; print('pkcs11' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "True"


def test_a_running_daemon_has_no_pkcs11_mapped(signd: Daemon) -> None:
    """Neither python-pkcs11's extension (loaded at the first ``pkcs11.lib``)
    nor the token's PKCS#11 module is in the daemon's memory; both are in
    every worker's."""
    assert signd.proc is not None
    workers = signd.token_workers()
    assert workers
    module = os.path.realpath(signd.token.module)
    daemon = mapped_files(signd.proc.pid)
    assert EXTENSION not in daemon
    assert module not in daemon
    for pid in workers:
        assert {EXTENSION, module} <= mapped_files(pid), pid
