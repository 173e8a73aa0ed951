"""The audit directory and its files, used safely.

The directory is checked as ``trusted.py`` checks every path signd trusts;
each file is opened relative to it, never through a symlink, and must be a
regular file with one link.  Files are ``audit-NNNNNN.jsonl``, numbered from
1 (more digits past 999,999); the chain runs through them in that order.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any, Final

from signd_client.audit import GENESIS

from ..trusted import NotTrusted, open_trusted_dir

__all__ = [
    "FILE_RE",
    "AuditError",
    "chain_end",
    "file_name",
    "find",
    "log_files",
    "open_directory",
    "open_log",
    "records",
]

log = logging.getLogger("signd.audit")

#: An audit file's name: audit-NNNNNN.jsonl (more digits past 999,999).
FILE_RE: Final = re.compile(r"audit-(\d{6,})\.jsonl")


class AuditError(Exception):
    """The audit log cannot be used as it is (its directory or a file in it is
    unsafe, or the log does not match the chain head on the token)."""


def file_name(index: int) -> str:
    """The name of the log's file number ``index``."""
    return f"audit-{index:06d}.jsonl"


def open_directory(directory: Path) -> int:
    """The audit directory, opened (made if missing, mode 0750), after checking
    it and every directory above it as ``trusted.py`` does: owned by root or
    this process's user, and no one else may write in it.

    Raises:
        AuditError, OSError.
    """
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    try:
        where, _ = open_trusted_dir(str(directory), "audit.dir")
    except NotTrusted as exc:
        raise AuditError(str(exc)) from None
    try:
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=where)
    finally:
        os.close(where)


def log_files(dirfd: int, directory: Path) -> list[str]:
    """The log's files by index; anything by that name that is not a plain
    regular file (a symlink, a FIFO, a hard link) is refused.

    Raises:
        AuditError.
    """
    found = []
    for name in os.listdir(dirfd):
        m = FILE_RE.fullmatch(name)
        if m is None:
            continue
        _check_file(os.stat(name, dir_fd=dirfd, follow_symlinks=False), directory / name)
        found.append((int(m[1]), name))
    return [name for _, name in sorted(found)]


def _check_file(st: os.stat_result, path: Path) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise AuditError(f"{path} is a symlink; the audit log never follows one: remove it")
    if not stat.S_ISREG(st.st_mode):
        raise AuditError(f"{path} is not a regular file: remove it")
    if st.st_nlink != 1:
        raise AuditError(f"{path} has {st.st_nlink} hard links; an audit file has one")


def _open_at(dirfd: int, directory: Path, name: str, flags: int, mode: int = 0o640) -> int:
    """Open ``name`` in the directory: never through a symlink, never a
    FIFO or device (O_NONBLOCK: no wait on one), checked once open.

    Raises:
        AuditError, OSError.
    """
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(name, flags, mode, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: a symlink
            raise AuditError(
                f"{directory / name} is a symlink; the audit log never follows one: remove it"
            ) from None
        raise
    try:
        _check_file(os.fstat(fd), directory / name)
    except AuditError:
        os.close(fd)
        raise
    return fd


def open_log(dirfd: int, directory: Path, name: str) -> Any:
    """Open an audit file for appending; mode 0640.

    Raises:
        AuditError, OSError.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    fd = _open_at(dirfd, directory, name, flags)
    os.fchmod(fd, 0o640)
    return os.fdopen(fd, "ab")


def records(dirfd: int, directory: Path, name: str) -> list[dict[str, Any]]:
    """The records of one file that parse (others are skipped: verify names them).

    Raises:
        AuditError, OSError.
    """
    fd = _open_at(dirfd, directory, name, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    out = []
    for line in data.split(b"\n"):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def chain_end(dirfd: int, directory: Path, names: list[str]) -> tuple[int, str]:
    """(seq, hash) of the last intact record.  A torn tail (a last line with no
    newline: a crash mid-write, never acknowledged) is cut off; a complete line
    that is not a record is left for ``signctl audit verify`` to report, and
    the chain goes on from the record before it.  An empty last file continues
    the one before.

    Raises:
        AuditError, OSError.
    """
    for name in reversed(names):
        fd = _open_at(dirfd, directory, name, os.O_RDWR)
        with os.fdopen(fd, "r+b") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                log.warning("cutting a torn audit record", extra={"file": str(directory / name)})
                f.truncate(keep)
                data = data[:keep]
        for line in reversed(data.split(b"\n")):
            try:
                rec = json.loads(line)
                seq, digest = rec["seq"], rec["hash"]
            except (ValueError, KeyError, TypeError, RecursionError):
                continue
            if type(seq) is int and isinstance(digest, str):
                return seq, digest
    return 0, GENESIS


def find(dirfd: int, directory: Path, seq: int) -> tuple[str, str] | None:
    """(hash, file name) of record ``seq``, searched from the newest file back;
    None if no file holds it.

    Raises:
        AuditError, OSError.
    """
    for name in reversed(log_files(dirfd, directory)):
        first = None
        for rec in records(dirfd, directory, name):
            s = rec.get("seq")
            if type(s) is not int:
                continue
            first = s if first is None else first
            if s == seq:
                return str(rec.get("hash")), name
        if first is not None and first <= seq:
            return None
    return None
