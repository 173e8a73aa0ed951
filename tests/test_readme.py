"""The README's Python blocks marked ``readme-test`` run as written.

Each runs as its own process against a fresh daemon on a token of its own, so
the fixed key names in the README cannot collide with other tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Daemon, TokenEnv

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(
    r"<!-- readme-test:[^>]*-->\n```python\n(.*?)```", README.read_text(), flags=re.DOTALL
)


def test_the_readme_has_tested_blocks() -> None:
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, block: str, tmp_path: Path
) -> None:
    d = make_daemon(start=False)
    d.token = own_token
    d.start()
    script = tmp_path / "readme_block.py"
    script.write_text(block)
    out = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "SIGND_SOCKET": d.socket},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
