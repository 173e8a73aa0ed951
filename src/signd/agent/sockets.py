"""The ssh-agent socket: the one systemd passed, or bound on ``[agent] socket``."""

from __future__ import annotations

import logging
import socket

from ..config import AgentConfig
from ..server.listener import open_listener

__all__ = ["agent_socket"]

log = logging.getLogger("signd.agent")


def agent_socket(
    cfg: AgentConfig, passed: socket.socket | None
) -> tuple[socket.socket | None, bool]:
    """The agent's listening socket when ``cfg.socket`` is set: ``passed`` (the
    one systemd passed, named ``agent``), else bound on that path as the main
    socket is.  Returns (the socket or None, whether systemd passed it); the
    daemon removes only a socket it bound itself.

    Raises: ListenerError.
    """
    if cfg.socket is None:
        if passed is not None:
            log.error(
                "systemd passed an agent socket but [agent] socket is not set: not serving it"
            )
            passed.close()
        return None, False
    if passed is not None:
        return passed, True
    return open_listener(cfg.socket, cfg.socket_mode, cfg.socket_group), False
