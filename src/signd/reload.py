"""A reload (SIGHUP): the config read again and applied to the running parts.

``daemon.py`` builds the parts; this module hands each its new section on a
SIGHUP (access rules, rate limits, limits, the log level, the agent socket's
keys), without dropping a connection.  A SIGHUP that comes while the daemon
starts is remembered (``note_startup_hangup``) and applied once it serves.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Final

from .access.policy import Policy
from .access.ratelimit import RateLimiter
from .agent.front import AgentFront
from .config import Config, ConfigError, RateLimitsConfig, load_config
from .server.core import Server
from .service.core import Service

__all__ = ["RELOADABLE", "limiter_for", "note_startup_hangup", "reload", "take_startup_hangup"]

log = logging.getLogger("signd")


def limiter_for(rl: RateLimitsConfig, old: RateLimiter | None) -> RateLimiter | None:
    """The rate limiter ``rl`` asks for (None: no limits); the refusal counters
    of ``old`` carry on in it (they are metrics)."""
    if rl.per_principal is None and rl.per_key is None:
        return None
    refused = old.refused if old is not None else None
    return RateLimiter(rl.per_principal, rl.per_key, refused=refused)


#: Sections a reload applies; the others need a restart (of ``agent``, only
#: its ``keys`` are reloaded).
RELOADABLE: Final = ("access", "rate_limits", "limits", "log")


def reload(
    cfg: Config, service: Service, server: Server, agent: AgentFront | None = None
) -> Config:
    """SIGHUP: read the config again and apply policy, rate limits, limits and
    the log level, without dropping a connection.  A config that does not load
    is refused with its reason, and the one in force stays; changes to other
    sections are named in a warning and wait for a restart.  Returns the config
    now in force."""
    assert cfg.path is not None
    try:
        new = load_config(cfg.path)
    except ConfigError as exc:
        log.error("config reload refused; the running config stays", extra={"error": str(exc)})
        return cfg
    changed = [
        f.name for f in dataclasses.fields(new) if getattr(new, f.name) != getattr(cfg, f.name)
    ]
    pending = [name for name in changed if name not in RELOADABLE and name != "path"]
    if "agent" in pending and dataclasses.replace(new.agent, keys=cfg.agent.keys) == cfg.agent:
        pending.remove("agent")  # only its keys changed: applied below
    limiter = service.limiter
    if new.rate_limits != cfg.rate_limits:  # the buckets start full again only then
        limiter = limiter_for(new.rate_limits, service.limiter)
    service.reconfigure(
        policy=Policy(new.access.rules, trust_root=new.access.trust_root),
        limiter=limiter,
        request_timeout=new.limits.request_timeout,
    )
    server.apply_limits(new.limits)
    if agent is not None:
        agent.apply(new.agent.keys, new.limits)
    logging.getLogger().setLevel(new.log.level.upper())
    log.info("config reloaded", extra={"changed": [n for n in changed if n not in pending]})
    if pending:
        log.warning(
            "config changes that need a restart were not applied", extra={"sections": pending}
        )
        # What is in force: the new reloadable sections, the old rest.
        return dataclasses.replace(
            cfg,
            access=new.access,
            rate_limits=new.rate_limits,
            limits=new.limits,
            log=new.log,
            agent=dataclasses.replace(cfg.agent, keys=new.agent.keys),
        )
    return new


#: A SIGHUP came before the reload handler was in place (see ``main``).
_startup_hangup = False


def note_startup_hangup(signum: int, frame: object) -> None:
    """SIGHUP's handler while the daemon starts (``cli.main`` installs it)."""
    global _startup_hangup
    _startup_hangup = True


def take_startup_hangup() -> bool:
    global _startup_hangup
    pending, _startup_hangup = _startup_hangup, False
    return pending
