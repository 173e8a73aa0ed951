"""``signd``: the composition root.  The only place that reads the config and
wires the token, the service and the server together.

Exit codes: 0 clean stop, 1 runtime failure (socket or token), 2 bad usage or
configuration.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .config import Config, ConfigError, Secret, load_config, read_pin
from .errors import WireError
from .log import setup_logging
from .server import ListenerError, Server, open_listener, systemd_socket
from .service import Service
from .token import Token

__all__ = ["main"]

log = logging.getLogger("signd")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


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
    return p


async def _run(cfg: Config, pin: Secret) -> int:
    try:
        inherited = systemd_socket()
        sock = inherited or open_listener(cfg.server.socket, cfg.server.socket_mode)
    except ListenerError as exc:
        log.error("cannot listen", extra={"error": str(exc)})
        return EXIT_FAILURE
    lim = cfg.limits
    token = Token(cfg.token.module, cfg.token.label, pin.reveal(), queue_limit=lim.token_queue)
    service = Service(token, request_timeout=lim.request_timeout)
    server = Server(service, lim)
    try:
        try:
            info = await token.open()
            await service.load()
        except WireError as exc:
            log.error("token unavailable", extra={"error": exc.message})
            return EXIT_FAILURE
        log.info(
            "token open", extra={"label": info.label, "model": info.model, "serial": info.serial}
        )

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("stopping", extra={"signal": signal.Signals(signum).name})
                    server.shutdown()
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            socket_name = cfg.server.socket if inherited is None else "systemd socket"
            await server.serve(
                sock,
                on_ready=lambda: log.info(
                    "ready", extra={"socket": socket_name, "pid": os.getpid()}
                ),
            )
            nursery.cancel_scope.cancel()
        log.info("stopped")
        return EXIT_OK
    finally:
        await token.aclose()
        if inherited is None:
            try:
                os.unlink(cfg.server.socket)
            except FileNotFoundError:
                pass


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        pin = read_pin(cfg.token)
    except ConfigError as exc:
        print(f"signd: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        print(f"signd: {args.config} is valid")
        return EXIT_OK
    setup_logging(cfg.log.level)
    return trio.run(_run, cfg, pin)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
