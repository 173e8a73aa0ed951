"""The Node.js client's own tests (clients/node/test), run against the session daemon.

``node --test`` runs the golden-frame tests, the end-to-end tests, the
JWS/JWT tests and the Ethereum (``format: "eth"``) tests; the last three talk
to the real ``signd`` fixture through ``$SIGND_TEST_SOCKET``.  Missing
``node`` or ``clients/node/node_modules`` is a failure, not a skip: set-up
(``scripts/dev.sh``) installs both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from signd.protocol import OPS

if TYPE_CHECKING:
    from conftest import Daemon

NODE_DIR = Path(__file__).resolve().parents[1] / "clients" / "node"
SETUP_HINT = (
    "run the README's test command (scripts/dev.sh test), which installs Node.js and "
    "runs `npm ci` in clients/node"
)


def test_node_client(signd: Daemon) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not installed: {SETUP_HINT}")
    if not (NODE_DIR / "node_modules" / "@msgpack" / "msgpack").is_dir():
        pytest.fail(f"{NODE_DIR / 'node_modules'} is missing: {SETUP_HINT}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGND_")}
    env["SIGND_TEST_SOCKET"] = signd.socket
    proc = subprocess.run(
        [
            node,
            "--test",
            "test/vectors.test.js",
            "test/e2e.test.js",
            "test/jose.test.js",
            "test/eth.test.js",
        ],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, (
        f"node --test failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )


def test_node_retry_table_is_the_python_one() -> None:
    """The Node client's RETRY (which ops it sends again) matches ``OPS``."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not installed: {SETUP_HINT}")
    if not (NODE_DIR / "node_modules" / "@msgpack" / "msgpack").is_dir():
        pytest.fail(f"{NODE_DIR / 'node_modules'} is missing: {SETUP_HINT}")
    script = 'import { RETRY } from "./src/schema.js"; console.log(JSON.stringify(RETRY));'
    proc = subprocess.run(
        [node, "--input-type=module", "-e", script],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(proc.stdout) == {op: spec.retry.value for op, spec in OPS.items()}
