"""signctl's backup commands: backup, restore."""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .._sync import Client
from ..bundle import MAX_BUNDLE_BYTES, BundleError, restore_calls
from ..protocol import RestoreResult
from ._common import EXIT_CODES, EXIT_OK, UsageError, jsonable, print_json

__all__ = ["HANDLERS", "add_parsers"]

_BACKUP_EPILOG = (
    "Writes every version of the backup-able keys (or of those named with --key),\n"
    "their private keys wrapped under the token's wrap key, to FILE (mode 0600,\n"
    "written whole or not at all; an existing FILE is never replaced). Keys made\n"
    "without --backup are not in it and are listed. Only a token holding the same\n"
    "wrap key (signd wrap-key) can restore it. Needs the admin grant on each key.\n\n" + EXIT_CODES
)
_RESTORE_EPILOG = (
    "Checks every key of FILE on the token first (its MACs, under the token's\n"
    "backup key), then restores them one by one: a key the token lacks is\n"
    "created, one with older versions only is brought forward, one with these\n"
    "versions or newer is left alone. A changed bundle or another wrap key is\n"
    "refused before anything is written. --check stops after the check.\n\n" + EXIT_CODES
)


def add_parsers(add: Callable[..., argparse.ArgumentParser]) -> None:
    b = add("backup", help="write a backup bundle of the backup-able keys", epilog=_BACKUP_EPILOG)
    b.add_argument("--out", required=True, metavar="FILE", help="the bundle file to write")
    b.add_argument(
        "--key", action="append", dest="keys", metavar="NAME", help="back up this key (repeatable)"
    )
    r = add("restore", help="restore keys from a backup bundle", epilog=_RESTORE_EPILOG)
    r.add_argument("file", metavar="FILE")
    r.add_argument("--check", action="store_true", help="only say what would be restored")


def _backup(args: argparse.Namespace, client: Client, stdin: BinaryIO) -> int:
    out = Path(args.out)
    if out.exists():
        raise UsageError(f"{out} exists: a backup never replaces a file; choose another name")
    result = client.backup(args.keys)
    try:
        _write_new(out, result.bundle)
    except OSError as exc:
        raise UsageError(
            f"cannot write {out}: {exc.strerror or exc}; the bundle was made (and audited) "
            "but not written: run the backup again"
        ) from None
    digest = hashlib.sha256(result.bundle).hexdigest()
    if args.json:
        print_json(
            {
                "file": str(out),
                "sha256": digest,
                "bytes": len(result.bundle),
                "keys": result.keys,
                "versions": result.versions,
                "skipped": result.skipped,
            }
        )
        return EXIT_OK
    print(
        f"wrote {out}: {len(result.keys)} keys, {result.versions} versions, "
        f"{len(result.bundle)} bytes, sha256 {digest}"
    )
    if result.skipped:
        print(f"not backup-able, not in it: {', '.join(result.skipped)}")
    return EXIT_OK


def _write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` (0600), whole or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if path appeared meanwhile: never replaced
    finally:
        tmp.unlink(missing_ok=True)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def _restore(args: argparse.Namespace, client: Client, stdin: BinaryIO) -> int:
    path = Path(args.file)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BUNDLE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        checks = restore_calls(data, check=True)
        writes = restore_calls(data)
    except BundleError as exc:
        raise UsageError(f"{path}: {exc.message}; nothing was written") from None
    planned = [client.call(call) for call in checks]
    results = planned if args.check else [client.call(call) for call in writes]
    if args.json:
        print_json([jsonable(r) for r in results])
        return EXIT_OK
    verb = "would be" if args.check else "is"
    for r in results:
        print(_line(r, verb))
    return EXIT_OK


def _line(r: RestoreResult, verb: str) -> str:
    if r.outcome == "unchanged":
        return f"{r.key}: unchanged (the token holds versions {_versions(r.present)} or newer)"
    what = "created" if r.outcome == "created" else "brought forward"
    return f"{r.key}: {verb} {what}, versions {_versions(r.restored)} restored"


def _versions(numbers: tuple[int, ...]) -> str:
    return ", ".join(map(str, numbers)) or "none"


#: command -> what runs it
HANDLERS: dict[str, Callable[[argparse.Namespace, Client, BinaryIO], int]] = {
    "backup": _backup,
    "restore": _restore,
}
