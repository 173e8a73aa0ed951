"""SIGHUP reloads policy, rate limits and limits without dropping a connection;
a bad config is refused with a clear log line and the old one stays in force."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from signd_client.errors import PermissionDenied, RateLimited

if TYPE_CHECKING:
    from conftest import Daemon

LIMITED = "[rate_limits]\nper_key = 0.001\nper_key_burst = 1\n"
REFUSED = "config reload refused; the running config stays"
PENDING = "config changes that need a restart were not applied"


def test_rate_limits_change_on_sighup_and_the_connection_stays(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon(LIMITED)
    with d.client(retries=0) as c:  # one connection, kept across the reloads
        c.create_key(key_name, "ec-p256")
        c.sign(key_name, b"1")
        with pytest.raises(RateLimited):
            c.sign(key_name, b"2")
        line = d.reload("", "config reloaded")
        assert "rate_limits" in line["changed"]
        for i in range(5):
            c.sign(key_name, b"after %d" % i)
        d.reload(LIMITED, "config reloaded")
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
        line = d.reload(
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
        d.reload(read_only.replace('"create"]', '"create", "sign"]'), "config reloaded")
        assert c.sign(key_name, b"x").version == 1
        d.reload(read_only, "config reloaded")
        with pytest.raises(PermissionDenied):
            c.sign(key_name, b"y")
    assert d.stop() == 0


def test_changes_that_need_a_restart_are_named(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon()
    with d.client(retries=0) as c:
        c.create_key(key_name, "ec-p256")
        line = d.reload(
            "[keys]\nsync_interval = 9\n", "config changes that need a restart were not applied"
        )
        assert line["sections"] == ["keys"]
        assert c.sign(key_name, b"x").version == 1
    assert d.stop() == 0
