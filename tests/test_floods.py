"""One hostile local user must not deny service to the others.

The flooder (``flooder.py``) runs as ``nobody`` through ``setpriv``; the
granted user is root (trusted).  Under each flood root's ``sign`` is still
answered, and the daemon's memory stays within its budget: the bytes it
counts (``signd_buffered_bytes``) within ``max_buffered_bytes_per_uid``, and
its peak RSS (``VmHWM`` in ``/proc/PID/status``, reset before the flood)
within ``RSS_BUDGET`` of what it was before.  Nothing waits on wall-clock
time but bounded polls for an event.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from signd_client.errors import KeyNotFound
from support import wait_until

if TYPE_CHECKING:
    from conftest import Daemon

GID = 4242
NOBODY = 65534
SETPRIV = shutil.which("setpriv")
FLOODER = str(Path(__file__).with_name("flooder.py"))
WAIT = 30.0
MiB = 1 << 20
#: What each flood here may add to the daemon's peak RSS: the per-uid share
#: (4 MiB below) held at once, the copies a flush makes of it (answers are
#: joined, then what the kernel does not take is kept), and the allocator's
#: slack (measured: 7.5-9.3 MiB).  Without the budget, these floods added
#: 60 and 39 MiB.
SHARE = 4 * MiB
RSS_BUDGET = 24 * MiB
LIMITS = (
    "[limits]\n"
    "max_output_buffer = 65536\n"
    f"max_buffered_bytes_per_uid = {SHARE}\n"
    f"max_buffered_bytes = {4 * SHARE}\n"
)
RULES = (
    "[[access.rules]]\n"
    'keys = ["app-*"]\n'
    'operations = ["sign", "verify", "read"]\n'
    f"uids = [{NOBODY}]\n"
)

pytestmark = pytest.mark.skipif(
    SETPRIV is None or os.geteuid() != 0, reason="needs root and setpriv (util-linux)"
)


@pytest.fixture
def flood_daemon(make_daemon: Callable[..., Daemon]) -> Iterator[Callable[[str], Daemon]]:
    """A daemon ``nobody`` can reach (a 0711 directory, socket group GID),
    which grants ``nobody`` the ``app-*`` keys."""
    dirs: list[Path] = []

    def make(limits: str) -> Daemon:
        workdir = Path(tempfile.mkdtemp(prefix="signd-flood-", dir="/tmp"))
        workdir.chmod(0o711)
        dirs.append(workdir)
        return make_daemon(
            limits + "\n" + RULES, workdir=workdir, server_extra=f"socket_group = {GID}\n"
        )

    yield make
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def flood(d: Daemon, *args: str) -> Iterator[dict[str, Any]]:
    """``flooder.py`` as nobody, flooding until the block ends; then its summary."""
    assert SETPRIV is not None
    proc = subprocess.Popen(
        [
            *(SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={GID}"),
            *(sys.executable, FLOODER, d.socket, *args),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "HOME": "/"},
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    summary: dict[str, Any] = {}
    try:
        ready, _, _ = select.select([proc.stdout], [], [], WAIT)
        assert ready, "the flooder never started flooding"
        assert proc.stdout.readline() == b"flooding\n", proc.poll()
        yield summary
    finally:
        proc.stdin.close()
        out = proc.stdout.read()
        proc.stdout.close()
        proc.wait(WAIT)
        if out.strip():
            summary.update(json.loads(out.splitlines()[-1]))


def status(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def reset_peak(pid: int) -> int:
    """Reset the process's peak RSS to its RSS now; the RSS now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return status(pid, "VmRSS")


def hits(d: Daemon, limit: str) -> float:
    with urllib.request.urlopen(d.metrics_url(), timeout=10) as r:  # loopback
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "signd_limit_hits_total" and s.labels["limit"] == limit:
                return float(s.value)
    return 0.0


def wait_for(what: str, check: Callable[[], bool], d: Daemon) -> None:
    try:
        wait_until(check, what, WAIT)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{d.logs()[-3000:]}") from None


def serves_root(d: Daemon, key: tuple[str, Any], times: int = 5) -> None:
    """Root's signature is answered, several times over, while the flood goes on."""
    for _ in range(times):
        d.check_signs(key)


def test_one_uid_cannot_take_every_connection(flood_daemon: Callable[[str], Daemon]) -> None:
    """``max_connections`` was global: nobody held all 16 and root got ``busy``.
    Now nobody gets at most its share (default: 8 of 16), refused ``busy``
    past it and counted, and root is still served."""
    d = flood_daemon("[limits]\nmax_connections = 16\n")
    key = d.new_ec_key("app-conns")
    with flood(d, "connections", "16"):
        wait_for("8 refused per uid", lambda: hits(d, "max_connections_per_uid") >= 8, d)
        serves_root(d, key)
    assert hits(d, "max_connections_per_uid") == 8
    assert hits(d, "max_connections") == 0
    assert d.stop() == 0


def _flooded(d: Daemon, key: tuple[str, Any], *args: str) -> tuple[int, dict[str, Any]]:
    """Flood with ``args``; root is served meanwhile and the counted bytes stay
    within the share.  The growth of the daemon's peak RSS, and the summary."""
    assert d.proc is not None
    before = reset_peak(d.proc.pid)
    with flood(d, *args) as summary:
        wait_for("a connection closed", lambda: hits(d, "max_buffered_bytes_per_uid") >= 2, d)
        for _ in range(5):
            serves_root(d, key, 2)
            assert d.gauge("signd_buffered_bytes") <= SHARE + 64 * 1024
    growth = status(d.proc.pid, "VmHWM") - before
    print(f"\n{args}: peak RSS +{growth / MiB:.1f} MiB, {summary}")
    return growth, summary


def test_unread_answers_stay_within_the_budget(flood_daemon: Callable[[str], Daemon]) -> None:
    """16 connections, each sending 3,000 ``health`` and reading nothing: the
    answers once grew the daemon by ~5 MB a connection.  Now the uid's
    connections holding the most are closed past its share."""
    d = flood_daemon(LIMITS)
    key = d.new_ec_key("app-unread")
    growth, _ = _flooded(d, key, "health", "16", "3000")
    assert growth < RSS_BUDGET
    assert d.stop() == 0


def test_partial_frames_stay_within_the_budget(flood_daemon: Callable[[str], Daemon]) -> None:
    """32 connections, each holding 1 MiB - 1 of a frame: ~33 MB once."""
    d = flood_daemon(LIMITS)
    key = d.new_ec_key("app-partial")
    growth, _ = _flooded(d, key, "partial", "32", str(MiB))
    assert growth < RSS_BUDGET
    assert d.stop() == 0


def test_unknown_key_names_do_not_stall_others(flood_daemon: Callable[[str], Daemon]) -> None:
    """1,000 pipelined ``sign`` requests for random names that nobody's glob
    grant matches once caused 1,000 token searches, one after another on the
    worker that signs, and root's ``sign`` waited seconds behind them.  Now
    the names waiting are looked up together, a few distinct names per uid at
    a time (the rest are answered ``busy``): a handful of searches in all."""
    d = flood_daemon("")
    key = d.new_ec_key("app-known")
    before = d.gauge("signd_key_lookups_total")
    with flood(d, "unknown", "1000", "app-r") as summary:
        serves_root(d, key)
    searches = d.gauge("signd_key_lookups_total") - before
    answers = summary["answers"]
    print(f"\n1,000 unknown names: {searches:g} token searches, answers {answers}")
    assert sum(answers.values()) == 1000
    assert set(answers) <= {"key_not_found", "busy"}, answers
    assert 1 <= searches <= 10


def test_a_key_made_elsewhere_is_found_by_one_search(
    signd: Daemon, make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    """A key another daemon on the token made is found on the first request
    for it, by one search; a name found absent is not searched again at once."""
    d = make_daemon()
    with signd.client() as c:
        c.create_key(key_name, "ec-p256")
    before = d.gauge("signd_key_lookups_total")
    with d.client(retries=0) as c:
        assert c.sign(key_name, b"made elsewhere").version == 1
        assert c.sign(key_name, b"known now").version == 1
        for _ in range(3):
            with pytest.raises(KeyNotFound):
                c.sign(key_name + "-absent", b"x")
    assert 2 <= d.gauge("signd_key_lookups_total") - before <= 3  # 3: a slow second


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ("max_connections = 16\nmax_connections_per_uid = 17\n", "limits.max_connections_per_uid"),
        ("max_buffered_bytes_per_uid = 65536\n", "limits.max_buffered_bytes_per_uid"),
        ("max_buffered_bytes = 1048576\n", "limits.max_buffered_bytes"),
    ],
)
def test_bad_shares_name_the_field(
    make_daemon: Callable[..., Daemon], table: str, field: str
) -> None:
    out = make_daemon("[limits]\n" + table, start=False).check_config()
    assert out.returncode == 2
    assert field in out.stderr, out.stderr
