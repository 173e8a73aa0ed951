"""signctl's signing commands: sign, verify, sign-batch."""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

from .._sync import Client
from ..protocol import MAX_BATCH, BatchItem
from ._common import (
    EXIT_NEGATIVE,
    EXIT_OK,
    HASHES,
    UsageError,
    print_json,
    read_input,
)

__all__ = ["HANDLERS", "add_parsers"]

_BATCH_EPILOG = (
    "Prints one line per item, in order: the base64 signature, or\n"
    "'error: <name> (error <code>): <message>' for an item that failed alone\n"
    f"(e.g. a digest of the wrong length). At most {MAX_BATCH} items; the options apply to\n"
    "every item. --json prints the whole answer (key, version, algorithm, results).\n\n"
    "exit codes: 0 every item signed; 1 some items failed (the others are signed);\n"
    "            2 error (bad usage, daemon unreachable, or an error answer for the\n"
    "            whole batch, such as an unknown key or bad options)"
)


def add_parsers(add: Callable[..., argparse.ArgumentParser]) -> None:
    """The signing commands' parsers, made with ``add(name, help=...)``."""
    for cmd, helptext in (
        ("sign", "sign a message or a digest"),
        ("verify", "check a signature (exit 0 valid, 1 invalid, 2 error)"),
    ):
        s = add(cmd, help=helptext)
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
            choices=HASHES,
            help="hash algorithm (required with --digest; default per key type)",
        )
        s.add_argument(
            "--padding", choices=("pkcs1v15", "pss"), help="RSA padding (default pkcs1v15)"
        )
        s.add_argument(
            "--format",
            choices=("der", "raw", "eth"),
            help="ECDSA signature encoding: der (default), raw r||s or eth r||s||v (secp256k1)",
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
            s.add_argument(
                "--position",
                type=int,
                metavar="N",
                help="a watermarked key: the position to sign at, above the key's mark",
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

    b = add(
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
        choices=HASHES,
        help="hash algorithm (required with --digests; default per key type)",
    )
    b.add_argument("--padding", choices=("pkcs1v15", "pss"), help="RSA padding (default pkcs1v15)")
    b.add_argument(
        "--format",
        choices=("der", "raw", "eth"),
        help="ECDSA signature encoding: der (default), raw r||s or eth r||s||v (secp256k1)",
    )
    b.add_argument(
        "--version",
        type=int,
        metavar="N",
        help="sign with this version, which must be active (default: the newest)",
    )


def _data_args(args: argparse.Namespace, stdin: BinaryIO) -> dict[str, Any]:
    if args.digest is not None:
        if args.infile is not None:
            raise UsageError("give --in or --digest, not both")
        if args.hash is None:
            raise UsageError("--digest needs --hash")
        try:
            digest = bytes.fromhex(args.digest)
        except ValueError:
            raise UsageError("--digest is not valid hex") from None
        return {"digest": digest, "hash": args.hash}
    return {"message": read_input(args.infile or "-", stdin), "hash": args.hash}


def _batch_args(args: argparse.Namespace, stdin: BinaryIO) -> dict[str, Any]:
    if args.digests is not None:
        if args.hash is None:
            raise UsageError("--digests needs --hash")
        digests = []
        text = read_input(args.digests, stdin)
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            try:
                digests.append(bytes.fromhex(line.decode("ascii")))
            except (UnicodeDecodeError, ValueError):
                raise UsageError(f"{args.digests}, line {number}: not a hex digest") from None
        if not digests:
            raise UsageError(f"no digests in {args.digests}")
        return {"digests": digests, "hash": args.hash}
    if args.infiles.count("-") > 1:
        raise UsageError("stdin ('-') can be read only once")
    return {"messages": [read_input(path, stdin) for path in args.infiles], "hash": args.hash}


def _item_line(item: BatchItem) -> str:
    if item.error is not None:
        e = item.error
        return f"error: {e.name} (error {e.code}): {e.message}"
    assert item.signature is not None
    return base64.b64encode(item.signature).decode()


def _sign(args: argparse.Namespace, client: Client, stdin: BinaryIO) -> int:
    res = client.sign(
        args.name,
        padding=args.padding,
        format=args.format,
        version=args.version,
        position=args.position,
        **_data_args(args, stdin),
    )
    if args.out:
        try:
            with open(args.out, "wb") as f:
                f.write(res.signature)
        except OSError as exc:
            raise UsageError(f"cannot write {args.out}: {exc.strerror}") from None
    if args.json:
        print_json(res)
    elif not args.out:
        print(base64.b64encode(res.signature).decode())
    else:
        print(f"signed with {res.key} version {res.version} ({res.algorithm})", file=sys.stderr)
    return EXIT_OK


def _sign_batch(args: argparse.Namespace, client: Client, stdin: BinaryIO) -> int:
    batch = client.sign_batch(
        args.name,
        padding=args.padding,
        format=args.format,
        version=args.version,
        **_batch_args(args, stdin),
    )
    if args.json:
        print_json(batch)
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


def _verify(args: argparse.Namespace, client: Client, stdin: BinaryIO) -> int:
    if args.sig is not None:
        sig = read_input(args.sig, stdin)
    else:
        try:
            sig = base64.b64decode(args.sig_base64, validate=True)
        except binascii.Error:
            raise UsageError("--sig-base64 is not valid base64") from None
    vres = client.verify(
        args.name,
        sig,
        padding=args.padding,
        format=args.format,
        version=args.version,
        **_data_args(args, stdin),
    )
    if args.json:
        print_json(vres)
    elif vres.valid:
        print(f"valid: {vres.key} version {vres.version} ({vres.algorithm})")
    else:
        print(f"invalid signature for {vres.key}")
    return EXIT_OK if vres.valid else EXIT_NEGATIVE


#: command -> what runs it
HANDLERS: dict[str, Callable[[argparse.Namespace, Client, BinaryIO], int]] = {
    "sign": _sign,
    "verify": _verify,
    "sign-batch": _sign_batch,
}
