"""Fixtures shared by the client's tests.

The daemon fixtures (``signd``, ``make_daemon``, ``key_name``) come from the
repository's root ``conftest.py``.  Plain helpers live in ``_support.py``:
test modules cannot import from a ``conftest.py``, because pytest registers
each one of a session under the same top-level name ``conftest``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _support import SilentListener


@pytest.fixture
def silent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SilentListener]:
    """A Unix socket that accepts connections and never answers."""
    listener = SilentListener(str(tmp_path_factory.mktemp("silent") / "silent.sock"))
    yield listener
    listener.close()
