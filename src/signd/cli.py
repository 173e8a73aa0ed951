"""``signd``: the command line.  Parses the arguments, reads the config and
the secrets, sets up the process (hardening, logging, descriptor limit), and
hands over to ``daemon.run``, which builds and runs the daemon.  ``signd
wrap-key`` is an operator's command of its own (``wrapkey.py``).

Exit codes: 0 clean stop, 1 runtime failure (socket or token), 2 bad usage or
configuration.
"""

from __future__ import annotations

import argparse
import logging
import resource
import signal
import sys
from collections.abc import Sequence

import trio

from . import __version__, wrapkey
from .config import ConfigError, load_config, read_metrics_token, read_pin
from .daemon import EXIT_OK, run
from .hardening import no_core_dumps
from .log import setup_logging
from .reload import note_startup_hangup

__all__ = ["main"]

log = logging.getLogger("signd")

EXIT_USAGE = 2  # EXIT_OK and EXIT_FAILURE: the daemon's


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="signd",
        description="signd: a signing daemon whose private keys live on a PKCS#11 token.",
        epilog="Exit codes: 0 clean stop, 1 runtime failure, 2 bad usage or config.",
    )
    p.add_argument("--version", action="version", version=f"signd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
    check = sub.add_parser("check-config", help="validate a config file and its PIN source")
    check.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
    wrapkey.add_parser(sub)
    return p


def _raise_fd_limit(max_connections: int) -> None:
    """Lift RLIMIT_NOFILE's soft limit to the hard limit.

    Every connection holds a descriptor, and the usual soft limit (1024) is
    below ``max_connections``' default plus the daemon's own files; the token
    workers, started later, inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit
            log.debug("file descriptor limit not raised", extra={"soft": soft, "error": str(exc)})
        else:
            log.debug("file descriptor limit raised", extra={"from": soft, "to": hard})
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < max_connections + 64:
        log.warning(
            "file descriptor limit below max_connections; connections beyond it will fail",
            extra={"limit": soft, "max_connections": max_connections},
        )


def main(argv: Sequence[str] | None = None) -> int:
    # Before the PIN is read: no core dump, and no same-uid debugger, may see it.
    hardening_problems = no_core_dumps()
    args = _parser().parse_args(argv)
    if args.command == "wrap-key":  # an operator's command: no daemon, no user PIN
        return wrapkey.main(args, hardening_problems)
    if args.command == "serve":
        # SIGHUP's default action is to end the process: while signd starts
        # (reading its config, opening the token) a reload asked for early
        # (systemd's ExecReload, logrotate) would kill it.  It is noted
        # instead, and applied once the reload handler takes over.  Token
        # workers are exec'd, so they start with the default action again.
        signal.signal(signal.SIGHUP, note_startup_hangup)
    try:
        cfg = load_config(args.config)
        pin = read_pin(cfg.token)
        replica_pins = [read_pin(tc) for tc in cfg.replicas]
        metrics_token = read_metrics_token(cfg.metrics)
    except ConfigError as exc:
        print(f"signd: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        print(f"signd: {args.config} is valid")
        return EXIT_OK
    setup_logging(cfg.log.level)
    for problem in hardening_problems:
        log.warning("core dumps not fully disabled", extra={"error": problem})
    _raise_fd_limit(cfg.limits.max_connections)
    return trio.run(run, cfg, pin, metrics_token, replica_pins)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
