"""``signctl``: the signd command line.

Exit codes: 0 success; 1 a negative answer (``verify``: invalid signature;
``health``: not ready; ``sign-batch``: some items failed); 2 an error (bad
usage, no daemon, or an error answer, printed to stderr as
``signctl: <name> (error <code>): <message>``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, BinaryIO

from cryptography.hazmat.primitives import serialization

from . import __version__
from ._sync import Client
from .audit import AUDIT_KEY, AuditKeys, ChainState, Head, verify_files
from .errors import SigndError
from .protocol import KEY_TYPES, MAX_BATCH, BatchItem, KeyInfo, Message

__all__ = ["main"]

EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_ERROR = 2

_HASHES = ("sha256", "sha384", "sha512")
_EXIT_CODES = (
    "exit codes: 0 success; 1 negative answer (verify: invalid signature, health: not ready,\n"
    "            sign-batch: some items failed);\n"
    "            2 error (bad usage, daemon unreachable, or an error answer)"
)
_BATCH_EPILOG = (
    "Prints one line per item, in order: the base64 signature, or\n"
    "'error: <name> (error <code>): <message>' for an item that failed alone\n"
    f"(e.g. a digest of the wrong length). At most {MAX_BATCH} items; the options apply to\n"
    "every item. --json prints the whole answer (key, version, algorithm, results).\n\n"
    "exit codes: 0 every item signed; 1 some items failed (the others are signed);\n"
    "            2 error (bad usage, daemon unreachable, or an error answer for the\n"
    "            whole batch, such as an unknown key or bad options)"
)


_DESTROY_EPILOG = (
    "Deletes the private key of one version (--version N), or of every version\n"
    "(--all, which also needs --yes), from the token. There is no undo and no\n"
    "confirmation prompt: the public keys stay, so old signatures can still be\n"
    "checked with standard tools, but the versions never sign or verify again.\n"
    "The key must allow it first: signctl update NAME --deletion-allowed true\n"
    "(else the answer is deletion_not_allowed, error 304).\n\n" + _EXIT_CODES
)
_DURATION_HELP = "seconds, or a number with s, m, h or d (90d, 12h, 30m)"
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)")


class _UsageError(Exception):
    pass


def _duration(text: str) -> float:
    """A duration option: ``90d``, ``12h``, ``30m``, ``45s`` or plain seconds."""
    match = _DURATION_RE.fullmatch(text.strip().lower())
    seconds = float(match[1]) * _UNITS[match[2]] if match else math.nan
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use seconds, or a number with s, m, h or d "
            "(e.g. 90d, 12h; 0 = off)"
        )
    return seconds


def _boolean(text: str) -> bool:
    value = {"true": True, "false": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: use true or false")
    return value


def _version_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid version {text!r}: use a number, 0 or more")
    return value


def _settings_options(p: argparse.ArgumentParser, *, versions: bool) -> None:
    """The key lifecycle settings of ``create`` and ``update``."""
    p.add_argument(
        "--auto-rotate-period",
        type=_duration,
        metavar="DUR",
        help="rotate the key this often, automatically; " + _DURATION_HELP + "; 0 = off",
    )
    p.add_argument(
        "--verify-grace",
        type=_duration,
        metavar="DUR",
        help="how long an older version keeps verifying after the next version is made; "
        + _DURATION_HELP
        + "; 0 = no limit",
    )
    if versions:
        p.add_argument(
            "--min-sign-version",
            type=_version_number,
            metavar="N",
            help="versions from N up to the newest may sign, when a request names them; "
            "0 = only the newest signs",
        )
        p.add_argument(
            "--min-verify-version",
            type=_version_number,
            metavar="N",
            help="versions below N neither sign nor verify (retired); 0 = no minimum",
        )
    p.add_argument(
        "--deletion-allowed",
        type=_boolean,
        metavar="true|false",
        help="whether 'signctl destroy' may delete this key's private keys, and signd "
        "destroy its retired versions by itself",
    )
    p.add_argument(
        "--max-versions",
        type=_version_number,
        metavar="N",
        help="most versions not destroyed the key may hold; a rotation beyond them is "
        "refused unless a retired version can be destroyed; 0 = the daemon's default",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="signctl",
        description="Talk to signd: manage keys on the token, sign and verify.",
        epilog=(
            "The socket is --socket, else $SIGND_SOCKET, else /run/signd/signd.sock.\n"
            + _EXIT_CODES
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_options(p, argparse.SUPPRESS)
    p.set_defaults(socket=None, json=False, timeout=30.0)
    p.add_argument("--version", action="version", version=f"signctl {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        kw.setdefault("description", kw.get("help"))
        kw.setdefault("epilog", _EXIT_CODES)
        return add(
            name,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )

    sub.add_parser = add_parser  # type: ignore[method-assign]

    sub.add_parser("keys", help="list the keys")

    c = sub.add_parser("create", help="make a new key on the token")
    c.add_argument("name")
    c.add_argument("--type", required=True, choices=KEY_TYPES, help="key type")
    _settings_options(c, versions=False)
    _idempotency_option(c, "create")

    i = sub.add_parser("info", help="settings, versions, their states and public keys of a key")
    i.add_argument("name")

    u = sub.add_parser(
        "update",
        help="change a key's lifecycle settings (the ones not given stay as they are)",
    )
    u.add_argument("name")
    _settings_options(u, versions=True)

    for cmd, helptext in (
        ("disable", "stop a version signing and verifying (undo with enable)"),
        ("enable", "let a disabled version sign or verify again, as its settings allow"),
    ):
        d = sub.add_parser(cmd, help=helptext)
        d.add_argument("name")
        d.add_argument("--version", type=int, required=True, metavar="N", help="the version")

    x = sub.add_parser(
        "destroy",
        help="delete private keys from the token, for good",
        epilog=_DESTROY_EPILOG,
    )
    x.add_argument("name")
    which = x.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int, metavar="N", help="destroy this version")
    which.add_argument("--all", action="store_true", help="destroy every version (needs --yes)")
    x.add_argument("--yes", action="store_true", help="confirm --all")

    k = sub.add_parser("pubkey", help="print a version's public key as PEM")
    k.add_argument("name")
    k.add_argument("--version", type=int, help="version (default: current)")

    j = sub.add_parser(
        "jwks",
        help="print a JWK Set (JSON) of every version of the keys that may still verify",
    )
    j.add_argument("names", nargs="+", metavar="NAME")

    for cmd, helptext in (
        ("sign", "sign a message or a digest"),
        ("verify", "check a signature (exit 0 valid, 1 invalid, 2 error)"),
    ):
        s = sub.add_parser(cmd, help=helptext)
        s.add_argument("name")
        s.add_argument(
            "--in",
            dest="infile",
            metavar="FILE",
            help="the message, '-' for stdin (the default without --digest)",
        )
        s.add_argument("--digest", metavar="HEX", help="precomputed digest, in hex")
        s.add_argument(
            "--hash",
            choices=_HASHES,
            help="hash algorithm (required with --digest; default per key type)",
        )
        s.add_argument(
            "--padding", choices=("pkcs1v15", "pss"), help="RSA padding (default pkcs1v15)"
        )
        s.add_argument(
            "--format",
            choices=("der", "raw"),
            help="ECDSA signature encoding: der (default) or raw r||s",
        )
        if cmd == "sign":
            s.add_argument(
                "--out",
                metavar="FILE",
                help="write the raw signature here (default: base64 to stdout)",
            )
            s.add_argument(
                "--version",
                type=int,
                metavar="N",
                help="sign with this version, which must be active (default: the newest)",
            )
        else:
            g = s.add_mutually_exclusive_group(required=True)
            g.add_argument("--sig", metavar="FILE", help="file holding the raw signature")
            g.add_argument("--sig-base64", metavar="B64", help="the signature in base64")
            s.add_argument(
                "--version",
                type=int,
                help="check only this version (default: every verifying version)",
            )

    b = sub.add_parser(
        "sign-batch",
        help="sign many files, or many digests, in one request",
        usage=(
            "signctl sign-batch [-h] [--socket PATH] [--json] [--timeout SECONDS]\n"
            "                          name (--in FILE [FILE ...] | --digests FILE)\n"
            "                          [--hash H] [--padding P] [--format F] [--version N]\n"
            "(put the key name before --in: --in takes every file that follows it)"
        ),
        epilog=_BATCH_EPILOG,
    )
    b.add_argument("name")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--in",
        dest="infiles",
        metavar="FILE",
        nargs="+",
        help="the messages: each file is one message ('-' for stdin, once)",
    )
    src.add_argument(
        "--digests",
        metavar="FILE",
        help="a file with one hex digest per line ('-' for stdin); needs --hash",
    )
    b.add_argument(
        "--hash",
        choices=_HASHES,
        help="hash algorithm (required with --digests; default per key type)",
    )
    b.add_argument("--padding", choices=("pkcs1v15", "pss"), help="RSA padding (default pkcs1v15)")
    b.add_argument(
        "--format",
        choices=("der", "raw"),
        help="ECDSA signature encoding: der (default) or raw r||s",
    )
    b.add_argument(
        "--version",
        type=int,
        metavar="N",
        help="sign with this version, which must be active (default: the newest)",
    )

    r = sub.add_parser("rotate", help="add a new version of a key and make it current")
    r.add_argument("name")
    _idempotency_option(r, "rotate")

    sub.add_parser("health", help="daemon and token status (exit 0 ready, 1 not ready)")

    au = sub.add_parser("audit", help="work with signd's audit log files (offline)")
    au_sub = au.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    av = au_sub.add_parser(
        "verify",
        parents=[common],
        help="check audit files: hash chain and signed checkpoints "
        "(exit 0 intact, 1 problems, 2 unreadable)",
        description="Check that no record was edited, inserted, deleted or reordered, that "
        "the log starts at record 1 (or where --after says), and that every checkpoint's "
        "signature verifies with the audit key and matches the records it covers. Give every "
        "file of the log, oldest first (audit-000001.jsonl, ...). The audit key's public key "
        "comes from --public-key, else from the daemon (--socket, $SIGND_SOCKET, or "
        "/run/signd/signd.sock), which also gives its chain head: then a log whose end was cut "
        "off is found too.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 intact; 1 problems found (each printed as FILE:LINE: what);\n"
        "            2 a file cannot be read as an audit log, no public key, or bad usage",
    )
    av.add_argument(
        "--public-key",
        metavar="FILE",
        help=f"PEM public key(s) of the audit key ({AUDIT_KEY!r}), e.g. saved with "
        f"'signctl pubkey {AUDIT_KEY}'; without it they are asked of the daemon",
    )
    av.add_argument(
        "--after",
        metavar="SEQ:HASH",
        type=_head,
        help="the files start after record SEQ whose hash is HASH: where the archived, "
        "older files end (verify printed it when you checked them)",
    )
    av.add_argument(
        "--head",
        metavar="SEQ:HASH",
        type=_head,
        help="the chain head the files must reach (default: the daemon's, when it is asked)",
    )
    av.add_argument("files", nargs="+", metavar="FILE")
    return p


def _common_options(p: argparse.ArgumentParser, default: Any) -> None:
    """Options accepted both before and after the command."""
    p.add_argument("--socket", metavar="PATH", default=default, help="signd's Unix socket")
    p.add_argument("--json", action="store_true", default=default, help="print answers as JSON")
    p.add_argument(
        "--timeout",
        type=float,
        default=default,
        metavar="SECONDS",
        help="give up after this long (default 30)",
    )


def _read(path: str, stdin: BinaryIO) -> bytes:
    if path == "-":
        return stdin.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise _UsageError(f"cannot read {path}: {exc.strerror}") from None


def _data_args(args: argparse.Namespace, stdin: BinaryIO) -> dict[str, Any]:
    if args.digest is not None:
        if args.infile is not None:
            raise _UsageError("give --in or --digest, not both")
        if args.hash is None:
            raise _UsageError("--digest needs --hash")
        try:
            digest = bytes.fromhex(args.digest)
        except ValueError:
            raise _UsageError("--digest is not valid hex") from None
        return {"digest": digest, "hash": args.hash}
    return {"message": _read(args.infile or "-", stdin), "hash": args.hash}


def _batch_args(args: argparse.Namespace, stdin: BinaryIO) -> dict[str, Any]:
    if args.digests is not None:
        if args.hash is None:
            raise _UsageError("--digests needs --hash")
        digests = []
        text = _read(args.digests, stdin)
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            try:
                digests.append(bytes.fromhex(line.decode("ascii")))
            except (UnicodeDecodeError, ValueError):
                raise _UsageError(f"{args.digests}, line {number}: not a hex digest") from None
        if not digests:
            raise _UsageError(f"no digests in {args.digests}")
        return {"digests": digests, "hash": args.hash}
    if args.infiles.count("-") > 1:
        raise _UsageError("stdin ('-') can be read only once")
    return {"messages": [_read(path, stdin) for path in args.infiles], "hash": args.hash}


def _item_line(item: BatchItem) -> str:
    if item.error is not None:
        e = item.error
        return f"error: {e.name} (error {e.code}): {e.message}"
    assert item.signature is not None
    return base64.b64encode(item.signature).decode()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Message):
        return {k: _jsonable(v) for k, v in value.to_wire().items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(_jsonable(value), indent=2, sort_keys=True))


def _when(t: float) -> str:
    """A wire time as UTC, to the second: 2025-01-31T12:00:00Z."""
    moment = datetime.datetime.fromtimestamp(t, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _span(seconds: float) -> str:
    """A duration the way the options take it: 90d, 12h, 30m, 45s, 1.5s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _settings_lines(info: KeyInfo) -> list[str]:
    """The lifecycle settings (absent from an older daemon's answer: then none)."""
    lines = []
    period = info.auto_rotate_period
    if period is not None:
        if period == 0:
            text = "0 (off)"
        elif info.next_rotation is not None:
            text = f"{_span(period)} (next rotation {_when(info.next_rotation)})"
        else:
            text = _span(period)
        lines.append(f"auto-rotate-period  {text}")
    if info.verify_grace is not None:
        grace = info.verify_grace
        lines.append(f"verify-grace        {_span(grace) if grace else '0 (no limit)'}")
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
    return lines


def _print_key(info: KeyInfo, *, pems: bool) -> None:
    print(f"{info.name}  type {info.type}  current version {info.current_version}")
    for line in _settings_lines(info):
        print(f"  {line}")
    width = max(len(v.state) for v in info.versions) if info.versions else 0
    for v in info.versions:
        line = f"  v{v.version}  {v.state:<{width}}  created {_when(v.created)}"
        if v.verify_until is not None:
            line += f"  verifies until {_when(v.verify_until)}"
        print(line)
    if pems:
        for v in info.versions:
            print(f"\nversion {v.version}:\n{v.public_key_pem}", end="")


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


def _idempotency_option(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help=f"run this again with the same KEY and it will not {verb} twice, but answer "
        "as the first run did (1-128 printable ASCII characters, no spaces; default: a "
        "new random one, which still makes signctl's own retries safe)",
    )


def _admin(args: argparse.Namespace, client: Client) -> KeyInfo:
    """create, info, rotate, update, disable, enable, destroy: all answer KeyInfo."""
    cmd = args.command
    if cmd == "create":
        return client.create_key(
            args.name,
            args.type,
            idempotency_key=args.idempotency_key,
            **_settings_args(args),
        )
    if cmd == "rotate":
        return client.rotate(args.name, idempotency_key=args.idempotency_key)
    if cmd == "info":
        return client.key_info(args.name)
    if cmd == "update":
        settings = _settings_args(args)
        if not settings:
            raise _UsageError(
                "nothing to change: give at least one of --auto-rotate-period, "
                "--verify-grace, --min-sign-version, --min-verify-version, --deletion-allowed, "
                "--max-versions"
            )
        return client.update_key(args.name, **settings)
    if cmd == "disable":
        return client.disable(args.name, args.version)
    if cmd == "enable":
        return client.enable(args.name, args.version)
    assert cmd == "destroy"
    if args.all and not args.yes:
        raise _UsageError(
            f"--all destroys the private key of every version of {args.name!r}, for good; "
            "add --yes to do it"
        )
    if args.all:
        return client.destroy(args.name, all=True)
    return client.destroy(args.name, args.version)


def _run(args: argparse.Namespace, client: Client, stdin: BinaryIO, stdout: BinaryIO) -> int:
    cmd = args.command
    if cmd == "keys":
        keys = client.list_keys().keys
        if args.json:
            _print_json(keys)
        else:
            for k in keys:
                print(f"{k.name}\t{k.type}\tv{k.current_version}")
        return EXIT_OK
    if cmd in ("create", "info", "rotate", "update", "disable", "enable", "destroy"):
        info = _admin(args, client)
        if args.json:
            _print_json(info)
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
    if cmd == "pubkey":
        pk = client.public_key(args.name, args.version)
        if args.json:
            _print_json(pk)
        else:
            sys.stdout.write(pk.public_key_pem)
        return EXIT_OK
    if cmd == "jwks":  # always JSON: the output is a JWK Set document (RFC 7517)
        print(json.dumps(client.jwks(args.names).to_wire(), indent=2))
        return EXIT_OK
    if cmd == "sign":
        res = client.sign(
            args.name,
            padding=args.padding,
            format=args.format,
            version=args.version,
            **_data_args(args, stdin),
        )
        if args.out:
            try:
                with open(args.out, "wb") as f:
                    f.write(res.signature)
            except OSError as exc:
                raise _UsageError(f"cannot write {args.out}: {exc.strerror}") from None
        if args.json:
            _print_json(res)
        elif not args.out:
            print(base64.b64encode(res.signature).decode())
        else:
            print(f"signed with {res.key} version {res.version} ({res.algorithm})", file=sys.stderr)
        return EXIT_OK
    if cmd == "sign-batch":
        batch = client.sign_batch(
            args.name,
            padding=args.padding,
            format=args.format,
            version=args.version,
            **_batch_args(args, stdin),
        )
        if args.json:
            _print_json(batch)
        else:
            for item in batch.results:
                print(_item_line(item))
        failed = sum(item.error is not None for item in batch.results)
        if failed:
            print(
                f"signctl: {failed} of {len(batch.results)} items failed",
                file=sys.stderr,
            )
        return EXIT_NEGATIVE if failed else EXIT_OK
    if cmd == "verify":
        if args.sig is not None:
            sig = _read(args.sig, stdin)
        else:
            try:
                sig = base64.b64decode(args.sig_base64, validate=True)
            except binascii.Error:
                raise _UsageError("--sig-base64 is not valid base64") from None
        vres = client.verify(
            args.name,
            sig,
            padding=args.padding,
            format=args.format,
            version=args.version,
            **_data_args(args, stdin),
        )
        if args.json:
            _print_json(vres)
        elif vres.valid:
            print(f"valid: {vres.key} version {vres.version} ({vres.algorithm})")
        else:
            print(f"invalid signature for {vres.key}")
        return EXIT_OK if vres.valid else EXIT_NEGATIVE
    assert cmd == "health"
    h = client.health()
    if args.json:
        _print_json(h)
    else:
        print(
            f"status {h.status}  live {h.live}  ready {h.ready}  keys {h.keys}  "
            f"signd {h.daemon_version}  uptime {h.uptime:.0f}s"
        )
        if h.token is not None:
            t = h.token
            print(f"token {t.label!r}  {t.manufacturer} {t.model}  serial {t.serial}")
        if h.detail:
            print(h.detail)
    return EXIT_OK if h.ready else EXIT_NEGATIVE


def _head(text: str) -> Head:
    try:
        return Head.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _audit_keys(args: argparse.Namespace) -> tuple[AuditKeys, Head | None]:
    """The audit key's public keys, and the daemon's chain head if it is asked.

    Raises:
        _UsageError: no public key can be had.
    """
    keys = None
    if args.public_key is not None:
        data = _read(args.public_key, sys.stdin.buffer)
        try:
            keys = AuditKeys.from_pem(data)
        except ValueError as exc:
            raise _UsageError(f"{args.public_key}: {exc}") from None
        if args.socket is None and not os.environ.get("SIGND_SOCKET"):
            return keys, None  # offline: the daemon is not asked
    try:
        with Client(args.socket, timeout=args.timeout, retries=0) as client:
            info = client.key_info(AUDIT_KEY)
            audit = client.health().audit
    except SigndError as exc:
        if keys is not None:
            print(f"signctl: the daemon's chain head is not known: {exc}", file=sys.stderr)
            return keys, None
        raise _UsageError(
            f"no public key to check the checkpoints with: give --public-key FILE, or "
            f"--socket PATH of the running daemon ({exc})"
        ) from None
    if keys is None:
        keys = AuditKeys(
            {
                v.version: serialization.load_pem_public_key(v.public_key_pem.encode())
                for v in info.versions
                if v.public_key_pem
            }
        )
    head = Head(audit.seq, audit.hash) if audit is not None else None
    return keys, head


def _audit_verify(args: argparse.Namespace) -> int:
    try:
        keys, daemon_head = _audit_keys(args)
    except _UsageError as exc:
        print(f"signctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    head = args.head or daemon_head
    state = verify_files(args.files, keys=keys, after=args.after, head=head)
    fatal = any(p.fatal for p in state.problems)
    if args.json:
        _print_json(
            {
                "records": state.records,
                "first_seq": state.first_seq,
                "last_seq": state.seq,
                "last_hash": state.hash,
                "checkpoints": state.checkpoints,
                "covered": state.covered,
                "unprotected": state.unprotected,
                "head": None if head is None else str(head),
                "problems": [str(p) for p in state.problems],
            }
        )
    elif state.problems:
        for p in state.problems:
            print(p)
        print(f"{len(state.problems)} problem(s) in {state.records} records")
    else:
        print(_summary(state, head))
    if fatal:
        return EXIT_ERROR
    return EXIT_NEGATIVE if state.problems else EXIT_OK


def _summary(state: ChainState, head: Head | None) -> str:
    lines = [
        f"ok: {state.records} records, chain intact from record {state.first_seq} "
        f"to record {state.seq} (hash {state.hash})",
        f"{state.checkpoints} checkpoint(s) verified; the newest covers record {state.covered}",
    ]
    if state.unprotected:
        lines.append(
            f"warning: the last {state.unprotected} record(s) are after the newest checkpoint: "
            "no signature covers them yet"
        )
    if head is not None:
        lines.append(f"the daemon's chain head (record {head.seq}) is in these files")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "audit":
        return _audit_verify(args)
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            return _run(args, client, sys.stdin.buffer, sys.stdout.buffer)
    except _UsageError as exc:
        print(f"signctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except SigndError as exc:
        print(f"signctl: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
