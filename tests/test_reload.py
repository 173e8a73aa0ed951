"""SIGHUP reloads policy, rate limits and limits without dropping a connection;
a bad config is refused with a clear log line and the old one stays in force."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from signd_client.errors import PermissionDenied, RateLimited

if TYPE_CHECKING:
    from conftest import Daemon

WAIT = 20.0
LIMITED = "[rate_limits]\nper_key = 0.001\nper_key_burst = 1\n"
REFUSED = "config reload refused; the running config stays"
PENDING = "config changes that need a restart were not applied"


def records(d: Daemon, msg: str) -> list[dict[str, Any]]:
    out = []
    for line in d.logs().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == msg:
            out.append(rec)
    return out


def reload(d: Daemon, extra: str, outcome: str) -> dict[str, Any]:
    """Write ``extra`` as the config's extra part, send SIGHUP, and wait for the
    daemon's log line ``outcome``; returns that line."""
    before = len(records(d, outcome))
    d.extra_config = extra
    d.write_config()
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT
    while len(records(d, outcome)) == before:
        assert d.proc.poll() is None, d.logs()
        assert time.monotonic() < deadline, f"no {outcome!r} line:\n{d.logs()}"
        time.sleep(0.02)
    return records(d, outcome)[-1]


def test_rate_limits_change_on_sighup_and_the_connection_stays(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon(LIMITED)
    with d.client(retries=0) as c:  # one connection, kept across the reloads
        c.create_key(key_name, "ec-p256")
        c.sign(key_name, b"1")
        with pytest.raises(RateLimited):
            c.sign(key_name, b"2")
        line = reload(d, "", "config reloaded")
        assert "rate_limits" in line["changed"]
        for i in range(5):
            c.sign(key_name, b"after %d" % i)
        reload(d, LIMITED, "config reloaded")
        c.sign(key_name, b"3")  # a fresh bucket of one
        with pytest.raises(RateLimited):
            c.sign(key_name, b"4")
    assert d.stop() == 0


def test_a_bad_config_is_refused_and_the_old_one_stays(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon(LIMITED)
    with d.client(retries=0) as c:
        c.create_key(key_name, "ec-p256")
        line = reload(
            d,
            LIMITED + "per_key_burst_typo = 3\n",
            "config reload refused; the running config stays",
        )
        assert "rate_limits.per_key_burst_typo" in line["error"]
        c.sign(key_name, b"1")
        with pytest.raises(RateLimited):  # the old limit is still in force
            c.sign(key_name, b"2")
        assert c.health().ready
    assert d.stop() == 0


def test_policy_changes_on_sighup(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    read_only = (
        "[access]\ntrust_root = false\n\n[[access.rules]]\n"
        f'keys = ["{key_name}"]\noperations = ["read", "create"]\nuids = [0]\n'
    )
    d = make_daemon(read_only)
    with d.client(retries=0) as c:
        c.create_key(key_name, "ec-p256")
        with pytest.raises(PermissionDenied):
            c.sign(key_name, b"x")
        reload(d, read_only.replace('"create"]', '"create", "sign"]'), "config reloaded")
        assert c.sign(key_name, b"x").version == 1
        reload(d, read_only, "config reloaded")
        with pytest.raises(PermissionDenied):
            c.sign(key_name, b"y")
    assert d.stop() == 0


def test_changes_that_need_a_restart_are_named(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon()
    with d.client(retries=0) as c:
        c.create_key(key_name, "ec-p256")
        line = reload(
            d, "[keys]\nsync_interval = 9\n", "config changes that need a restart were not applied"
        )
        assert line["sections"] == ["keys"]
        assert c.sign(key_name, b"x").version == 1
    assert d.stop() == 0
