"""signctl audit verify: check audit log files (offline, or with the daemon's chain head)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from cryptography.hazmat.primitives import serialization

from .._sync import Client
from ..audit import AUDIT_KEY, AuditKeys, ChainState, Head, verify_files
from ..errors import SigndError
from ._common import EXIT_ERROR, EXIT_NEGATIVE, EXIT_OK, UsageError, print_json, read_input

__all__ = ["add_parsers", "audit_verify"]


def add_parsers(
    add: Callable[..., argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """``audit verify``'s parser; ``common`` holds the options every command takes."""
    au = add("audit", help="work with signd's audit log files (offline)")
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


def _head(text: str) -> Head:
    try:
        return Head.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _audit_keys(args: argparse.Namespace) -> tuple[AuditKeys, Head | None]:
    """The audit key's public keys, and the daemon's chain head if it is asked.

    Raises:
        UsageError: no public key can be had.
    """
    keys = None
    if args.public_key is not None:
        data = read_input(args.public_key, sys.stdin.buffer)
        try:
            keys = AuditKeys.from_pem(data)
        except ValueError as exc:
            raise UsageError(f"{args.public_key}: {exc}") from None
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
        raise UsageError(
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


def audit_verify(args: argparse.Namespace) -> int:
    try:
        keys, daemon_head = _audit_keys(args)
    except UsageError as exc:
        print(f"signctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    head = args.head or daemon_head
    state = verify_files(args.files, keys=keys, after=args.after, head=head)
    fatal = any(p.fatal for p in state.problems)
    if args.json:
        print_json(
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
