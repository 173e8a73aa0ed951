"""The ``[agent]`` section, parsed and checked like the others (off by default),
and how the sockets systemd passes are told apart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from signd.config import AgentConfig, ConfigError
from signd.config_parse import parse
from signd.server.listener import ListenerError, systemd_sockets

TOKEN = {"token": {"module": "/x.so", "label": "t", "pin_file": "/pin"}}


def agent(table: dict[str, Any], **more: Any) -> AgentConfig:
    return parse({**TOKEN, "agent": table, **more}, None, Path("/etc/signd")).agent


def test_off_unless_a_socket_is_set() -> None:
    assert parse(dict(TOKEN), None, Path("/etc/signd")).agent == AgentConfig()
    assert AgentConfig().socket is None
    assert agent({}) == AgentConfig()


def test_a_full_section() -> None:
    a = agent(
        {
            "socket": "agent.sock",
            "socket_mode": "0640",
            "socket_group": "ssh-users",
            "keys": ["ssh-*", "git-signing"],
        }
    )
    assert a == AgentConfig(
        socket="/etc/signd/agent.sock",  # relative to the config file
        socket_mode=0o640,
        socket_group="ssh-users",
        keys=("git-signing", "ssh-*"),
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"keys": ["x"]}, "agent.socket: required"),
        ({"socket": ""}, "agent.socket: must not be empty"),
        ({"socket": "/a", "keys": "ssh-*"}, "agent.keys: must be a list"),
        ({"socket": "/a", "keys": [""]}, "agent.keys: must be a list"),
        ({"socket": "/a", "socket_mode": "0666"}, "agent.socket_mode: must not give access"),
        ({"socket": "/a", "socket_group": ""}, "agent.socket_group: must be a group"),
        ({"socket": "/a", "key": ["x"]}, "agent.key: unknown setting"),
        ({"socket": "/run/signd/signd.sock"}, "agent.socket: must not be server.socket"),
    ],
)
def test_bad_settings_name_their_field(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        agent(table)


@pytest.mark.parametrize(
    ("fds", "names", "message"),
    [
        ("2", None, "2 sockets for the signd socket"),
        ("2", "agent:agent", "2 sockets for the agent socket"),
        ("2", "agent", "2 sockets but 1 names"),
    ],
)
def test_systemd_sockets_are_told_apart_by_name(fds: str, names: str | None, message: str) -> None:
    """Checked before any fd is touched (the real passing is in test_ssh_agent.py)."""
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": fds}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    with pytest.raises(ListenerError, match=message):
        systemd_sockets(env)


def test_no_systemd_sockets() -> None:
    assert systemd_sockets({}) == {}
    assert systemd_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "2"}) == {}  # not for this process
