"""signctl's key commands: keys, create, info, update, disable, enable, destroy,
rotate, pubkey, jwks."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

from .._sync import Client
from ..protocol import KEY_TYPES, KeyInfo
from ._common import (
    DURATION_HELP,
    EXIT_CODES,
    EXIT_OK,
    UsageError,
    boolean,
    duration,
    print_json,
    span,
    version_number,
    when,
)

__all__ = ["HANDLERS", "add_parsers"]

_DESTROY_EPILOG = (
    "Deletes the private key of one version (--version N), or of every version\n"
    "(--all, which also needs --yes), from the token. There is no undo and no\n"
    "confirmation prompt: the public keys stay, so old signatures can still be\n"
    "checked with standard tools, but the versions never sign or verify again.\n"
    "The key must allow it first: signctl update NAME --deletion-allowed true\n"
    "(else the answer is deletion_not_allowed, error 304).\n\n" + EXIT_CODES
)


def add_parsers(add: Callable[..., argparse.ArgumentParser]) -> None:
    """The key commands' parsers, made with ``add(name, help=...)``."""
    add("keys", help="list the keys")

    c = add("create", help="make a new key on the token")
    c.add_argument("name")
    c.add_argument("--type", required=True, choices=KEY_TYPES, help="key type")
    _settings_options(c, versions=False)
    backup = c.add_mutually_exclusive_group()
    backup.add_argument(
        "--backup",
        dest="backup",
        action="store_const",
        const=True,
        help="its private keys may be exported wrapped under the token's wrap key "
        "(signctl backup); fixed for the key's life (default: the daemon's [keys] backup)",
    )
    backup.add_argument(
        "--no-backup",
        dest="backup",
        action="store_const",
        const=False,
        help="its private keys never leave the token, under any key",
    )
    c.add_argument(
        "--watermark",
        action="store_const",
        const=True,
        help="every sign must carry a --position above the highest signed so far "
        "(README, 'Replay protection'); fixed for the key's life",
    )
    _idempotency_option(c, "create")

    i = add("info", help="settings, versions, their states and public keys of a key")
    i.add_argument("name")

    u = add(
        "update",
        help="change a key's lifecycle settings (the ones not given stay as they are)",
    )
    u.add_argument("name")
    _settings_options(u, versions=True)
    u.add_argument(
        "--raise-mark",
        type=int,
        metavar="POSITION",
        help="a watermarked key: raise its mark to POSITION (never lowered), e.g. after "
        "restoring an old backup bundle",
    )

    for cmd, helptext in (
        ("disable", "stop a version signing and verifying (undo with enable)"),
        ("enable", "let a disabled version sign or verify again, as its settings allow"),
    ):
        d = add(cmd, help=helptext)
        d.add_argument("name")
        d.add_argument("--version", type=int, required=True, metavar="N", help="the version")

    x = add(
        "destroy",
        help="delete private keys from the token, for good",
        epilog=_DESTROY_EPILOG,
    )
    x.add_argument("name")
    which = x.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int, metavar="N", help="destroy this version")
    which.add_argument("--all", action="store_true", help="destroy every version (needs --yes)")
    x.add_argument("--yes", action="store_true", help="confirm --all")

    k = add("pubkey", help="print a version's public key as PEM")
    k.add_argument("name")
    k.add_argument("--version", type=int, help="version (default: current)")

    j = add(
        "jwks",
        help="print a JWK Set (JSON) of every version of the keys that may still verify",
    )
    j.add_argument("names", nargs="+", metavar="NAME")

    r = add("rotate", help="add a new version of a key and make it current")
    r.add_argument("name")
    _idempotency_option(r, "rotate")


def _settings_options(p: argparse.ArgumentParser, *, versions: bool) -> None:
    """The key lifecycle settings of ``create`` and ``update``."""
    p.add_argument(
        "--auto-rotate-period",
        type=duration,
        metavar="DUR",
        help="rotate the key this often, automatically; " + DURATION_HELP + "; 0 = off",
    )
    p.add_argument(
        "--verify-grace",
        type=duration,
        metavar="DUR",
        help="how long an older version keeps verifying after the next version is made; "
        + DURATION_HELP
        + "; 0 = no limit",
    )
    if versions:
        p.add_argument(
            "--min-sign-version",
            type=version_number,
            metavar="N",
            help="versions from N up to the newest may sign, when a request names them; "
            "0 = only the newest signs",
        )
        p.add_argument(
            "--min-verify-version",
            type=version_number,
            metavar="N",
            help="versions below N neither sign nor verify (retired); 0 = no minimum",
        )
    p.add_argument(
        "--deletion-allowed",
        type=boolean,
        metavar="true|false",
        help="whether 'signctl destroy' may delete this key's private keys, and signd "
        "destroy its retired versions by itself",
    )
    p.add_argument(
        "--max-versions",
        type=version_number,
        metavar="N",
        help="most versions not destroyed the key may hold; a rotation beyond them is "
        "refused unless a retired version can be destroyed; 0 = the daemon's default",
    )


def _idempotency_option(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help=f"run this again with the same KEY and it will not {verb} twice, but answer "
        "as the first run did (1-128 printable ASCII characters, no spaces; default: a "
        "new random one, which still makes signctl's own retries safe)",
    )


def _settings_args(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "auto_rotate_period",
        "verify_grace",
        "min_sign_version",
        "min_verify_version",
        "deletion_allowed",
        "max_versions",
    )
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _settings_lines(info: KeyInfo) -> list[str]:
    """The lifecycle settings (absent from an older daemon's answer: then none)."""
    lines = []
    period = info.auto_rotate_period
    if period is not None:
        if period == 0:
            text = "0 (off)"
        elif info.next_rotation is not None:
            text = f"{span(period)} (next rotation {when(info.next_rotation)})"
        else:
            text = span(period)
        lines.append(f"auto-rotate-period  {text}")
    if info.verify_grace is not None:
        grace = info.verify_grace
        lines.append(f"verify-grace        {span(grace) if grace else '0 (no limit)'}")
    if info.min_sign_version is not None:
        n = info.min_sign_version
        lines.append(f"min-sign-version    {n if n else '0 (only the newest version signs)'}")
    if info.min_verify_version is not None:
        n = info.min_verify_version
        lines.append(f"min-verify-version  {n if n else '0 (no minimum)'}")
    if info.deletion_allowed is not None:
        lines.append(f"deletion-allowed    {str(info.deletion_allowed).lower()}")
    if info.max_versions is not None:
        lines.append(f"max-versions        {info.max_versions}")
    lines.append(
        f"backup              {'yes (exportable under the wrap key)' if info.backup else 'no'}"
    )
    if info.watermark:
        mark = "none yet" if info.mark is None else str(info.mark)
        lines.append(f"watermark           yes, mark {mark} (sign above it)")
    return lines


def _print_key(info: KeyInfo, *, pems: bool) -> None:
    print(f"{info.name}  type {info.type}  current version {info.current_version}")
    for line in _settings_lines(info):
        print(f"  {line}")
    width = max(len(v.state) for v in info.versions) if info.versions else 0
    for v in info.versions:
        line = f"  v{v.version}  {v.state:<{width}}  created {when(v.created)}"
        if v.verify_until is not None:
            line += f"  verifies until {when(v.verify_until)}"
        if v.eth_address is not None:
            line += f"  address {v.eth_address}"
        print(line)
    if pems:
        for v in info.versions:
            if v.public_key_pem is not None:  # an HMAC key has none
                print(f"\nversion {v.version}:\n{v.public_key_pem}", end="")


def _admin(args: argparse.Namespace, client: Client) -> KeyInfo:
    """create, info, rotate, update, disable, enable, destroy: all answer KeyInfo."""
    cmd = args.command
    if cmd == "create":
        return client.create_key(
            args.name,
            args.type,
            idempotency_key=args.idempotency_key,
            backup=args.backup,
            watermark=args.watermark,
            **_settings_args(args),
        )
    if cmd == "rotate":
        return client.rotate(args.name, idempotency_key=args.idempotency_key)
    if cmd == "info":
        return client.key_info(args.name)
    if cmd == "update":
        settings = _settings_args(args)
        if args.raise_mark is not None:
            settings["raise_mark"] = args.raise_mark
        if not settings:
            raise UsageError(
                "nothing to change: give at least one of --auto-rotate-period, "
                "--verify-grace, --min-sign-version, --min-verify-version, --deletion-allowed, "
                "--max-versions, --raise-mark"
            )
        return client.update_key(args.name, **settings)
    if cmd == "disable":
        return client.disable(args.name, args.version)
    if cmd == "enable":
        return client.enable(args.name, args.version)
    assert cmd == "destroy"
    if args.all and not args.yes:
        raise UsageError(
            f"--all destroys the private key of every version of {args.name!r}, for good; "
            "add --yes to do it"
        )
    if args.all:
        return client.destroy(args.name, all=True)
    return client.destroy(args.name, args.version)


def _keys(args: argparse.Namespace, client: Client, stdin: BinaryIO) -> int:
    keys = client.list_keys().keys
    if args.json:
        print_json(keys)
    else:
        for k in keys:
            print(f"{k.name}\t{k.type}\tv{k.current_version}")
    return EXIT_OK


def _key_info(args: argparse.Namespace, client: Client, stdin: BinaryIO) -> int:
    cmd = args.command
    info = _admin(args, client)
    if args.json:
        print_json(info)
        return EXIT_OK
    if cmd == "destroy":
        numbers = [v.version for v in info.versions] if args.all else [args.version]
        label = "version" if len(numbers) == 1 else "versions"
        print(
            f"destroyed {info.name} {label} {', '.join(map(str, numbers))}: private "
            f"key{'s' if len(numbers) > 1 else ''} deleted from the token, public "
            f"key{'s' if len(numbers) > 1 else ''} kept"
        )
    _print_key(info, pems=cmd == "info")
    made = info.created_version
    if made is not None and made != info.current_version:  # a replay, rotated since
        print(f"this request made version {made}")
    return EXIT_OK


def _pubkey(args: argparse.Namespace, client: Client, stdin: BinaryIO) -> int:
    pk = client.public_key(args.name, args.version)
    if args.json:
        print_json(pk)
    else:
        sys.stdout.write(pk.public_key_pem)
    return EXIT_OK


def _jwks(args: argparse.Namespace, client: Client, stdin: BinaryIO) -> int:
    # always JSON: the output is a JWK Set document (RFC 7517)
    print(json.dumps(client.jwks(args.names).to_wire(), indent=2))
    return EXIT_OK


#: command -> what runs it
HANDLERS: dict[str, Callable[[argparse.Namespace, Client, BinaryIO], int]] = {
    "keys": _keys,
    "create": _key_info,
    "info": _key_info,
    "update": _key_info,
    "disable": _key_info,
    "enable": _key_info,
    "destroy": _key_info,
    "rotate": _key_info,
    "pubkey": _pubkey,
    "jwks": _jwks,
}
