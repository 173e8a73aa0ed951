"""signctl's entry point: the parser, made of the command families, and ``main``."""

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any, Final

from .. import __version__
from .._sync import Client
from ..errors import SigndError
from . import _audit, _backup, _import, _keys, _signing, _status
from ._common import EXIT_CODES, EXIT_ERROR, UsageError, common_options

__all__ = ["HANDLERS", "OP_COMMANDS", "main"]

#: The signctl command that sends each wire op (every op in ``protocol.OPS``:
#: a test checks that none is missing).
OP_COMMANDS: Final[Mapping[str, str]] = types.MappingProxyType(
    {
        "create_key": "create",
        "list_keys": "keys",
        "key_info": "info",
        "public_key": "pubkey",
        "jwks": "jwks",
        "sign": "sign",
        "sign_batch": "sign-batch",
        "verify": "verify",
        "rotate": "rotate",
        "update_key": "update",
        "disable": "disable",
        "enable": "enable",
        "destroy": "destroy",
        "health": "health",
        "whoami": "whoami",
        "backup": "backup",
        "restore": "restore",
        "import_params": "import-key",
        "import_key": "import",
    }
)

#: command -> what runs it with a connected client
HANDLERS: Final = types.MappingProxyType(
    {
        **_keys.HANDLERS,
        **_signing.HANDLERS,
        **_status.HANDLERS,
        **_backup.HANDLERS,
        **_import.HANDLERS,
    }
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="signctl",
        description="Talk to signd: manage keys on the token, sign and verify.",
        epilog=(
            "The socket is --socket, else $SIGND_SOCKET, else /run/signd/signd.sock.\n" + EXIT_CODES
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common_options(p, argparse.SUPPRESS)
    p.set_defaults(socket=None, json=False, timeout=30.0)
    p.add_argument("--version", action="version", version=f"signctl {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common_options(common, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, **kw: Any) -> argparse.ArgumentParser:
        kw.setdefault("description", kw.get("help"))
        kw.setdefault("epilog", EXIT_CODES)
        return sub.add_parser(
            name,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )

    _keys.add_parsers(add)
    _signing.add_parsers(add)
    _status.add_parsers(add)
    _backup.add_parsers(add)
    _import.add_parsers(add)
    _audit.add_parsers(add, common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "audit":
        return _audit.audit_verify(args)
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            return HANDLERS[args.command](args, client, sys.stdin.buffer)
    except UsageError as exc:
        print(f"signctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except SigndError as exc:
        print(f"signctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
