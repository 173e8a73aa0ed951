"""signctl's status commands: health, and whoami (who the daemon takes you to be)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import BinaryIO

from .._sync import Client
from ..protocol import Whoami
from ._common import EXIT_NEGATIVE, EXIT_OK, print_json

__all__ = ["HANDLERS", "add_parsers", "whoami_lines"]


def add_parsers(add: Callable[..., argparse.ArgumentParser]) -> None:
    """The status commands' parsers, made with ``add(name, help=...)``."""
    add("health", help="daemon and token status (exit 0 ready, 1 not ready)")
    add(
        "whoami",
        help="who signd takes you to be (uid, groups) and what you may do with each key",
        description=(
            "Ask signd who it takes this process to be: the uid, gid and groups the\n"
            "kernel gave it at connect, the user name, and every key this process may\n"
            "use with the verbs it has on each (sign, verify, read, create, rotate,\n"
            "admin). Run it as a service that was refused (sudo -u SERVICE signctl\n"
            "whoami) to see why it got permission_denied."
        ),
    )


def _health(args: argparse.Namespace, client: Client, stdin: BinaryIO) -> int:
    h = client.health()
    if args.json:
        print_json(h)
    else:
        print(
            f"status {h.status}  live {h.live}  ready {h.ready}  keys {h.keys}  "
            f"signd {h.daemon_version}  uptime {h.uptime:.0f}s"
        )
        if h.token is not None:
            t = h.token
            print(f"token {t.label!r}  {t.manufacturer} {t.model}  serial {t.serial}")
        for t in h.tokens or ():
            print(
                f"  {t.state or '?':<12} {t.label!r}  {t.manufacturer} {t.model}  serial {t.serial}"
            )
        if h.detail:
            print(h.detail)
    return EXIT_OK if h.ready else EXIT_NEGATIVE


def whoami_lines(who: Whoami) -> list[str]:
    """``signctl whoami``'s table: the caller, then one line per key with its verbs."""
    user = f" ({who.user})" if who.user is not None else ""
    lines = [
        f"uid {who.uid}{user}  gid {who.gid}  groups {', '.join(map(str, who.groups))}",
    ]
    if not who.keys:
        lines.append("no key: this uid and these groups may use none")
        return lines
    width = max(len("KEY"), *(len(k.name) for k in who.keys))
    lines.append(f"{'KEY':<{width}}  VERBS")
    lines.extend(f"{k.name:<{width}}  {', '.join(k.verbs)}" for k in who.keys)
    return lines


def _whoami(args: argparse.Namespace, client: Client, stdin: BinaryIO) -> int:
    who = client.whoami()
    if args.json:
        print_json(who)
    else:
        print("\n".join(whoami_lines(who)))
    return EXIT_OK


#: command -> what runs it
HANDLERS: dict[str, Callable[[argparse.Namespace, Client, BinaryIO], int]] = {
    "health": _health,
    "whoami": _whoami,
}
