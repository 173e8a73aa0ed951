"""Files and directories the daemon trusts, checked the way OpenSSH's StrictModes does.

A file signd trusts (its config, the PIN file) and the directory of its
socket must be out of reach of every other local user: otherwise whoever can
write them decides what the daemon does, or learns the PIN.  So:

* every directory on the way, from ``/`` down, is owned by root or by the
  user signd runs as, and is not writable by its group or by others, unless
  it is a root-owned sticky directory (``/tmp``);
* a symbolic link on the way is followed only if root or signd's user owns it
  (its directory is checked like any other), and the file itself must not be
  one;
* the file is a regular file (opened with ``O_NONBLOCK``, so a FIFO never
  hangs the open), owned by root or signd's user, not writable by its group or
  by others; a secret (the PIN) is not readable by others either.

The walk opens each directory relative to the one before it
(``O_PATH|O_NOFOLLOW``), so what is checked is what is used: a path swapped
after a check cannot redirect the open.  Each refusal is a ``NotTrusted``
whose message names the file or directory and the command that fixes it.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from typing import Final

__all__ = [
    "NotTrusted",
    "check_directory",
    "open_trusted_dir",
    "open_trusted_file",
    "trusted_uids",
]

#: Symbolic links followed on one path at most (the kernel's own limit).
MAX_LINKS: Final = 40
_DIR_FLAGS: Final = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class NotTrusted(Exception):
    """A file or directory another user could change; the message says how to fix it."""


def trusted_uids() -> frozenset[int]:
    """The owners a trusted file may have: root and the user signd runs as."""
    return frozenset({0, os.geteuid()})


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _owner(uid: int) -> str:
    name = _user(uid)
    return name if name.startswith("uid ") else f"{name} (uid {uid})"


def _owners() -> str:
    me = os.geteuid()
    return "root" if me == 0 else f"root or the user signd runs as ({_user(me)})"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _writers(mode: int) -> str:
    return {0o020: "its group", 0o002: "others"}.get(mode & 0o022, "its group and others")


def check_directory(st: os.stat_result, path: str, what: str) -> None:
    """Refuse a directory that another user could change.

    Raises:
        NotTrusted: owned by another user, or writable by group or others and
            not a root-owned sticky directory.
    """
    if st.st_uid not in trusted_uids():
        raise NotTrusted(
            f"{what}: directory {path} is owned by {_owner(st.st_uid)}, not by {_owners()}; "
            f"run: chown {_user(os.geteuid())} {path} (or use another directory)"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and not (st.st_uid == 0 and mode & stat.S_ISVTX):
        raise NotTrusted(
            f"{what}: directory {path} is writable by {_writers(mode)} (mode {mode:04o}); "
            f"run: chmod go-w {path}"
        )


def _walk(path: str, what: str) -> tuple[int, str]:
    """Open the directory ``path`` (O_PATH), checking every directory and
    symbolic link from ``/`` down; returns its fd and its real path.

    Raises:
        NotTrusted: a directory or a link on the way is not trusted.
        OSError: a component is missing or cannot be opened.
    """
    fd = os.open("/", _DIR_FLAGS)
    try:
        check_directory(os.fstat(fd), "/", what)
        where = "/"
        pending = [c for c in reversed(path.split("/")) if c]
        links = 0
        while pending:
            name = pending.pop()
            if name == ".":
                continue
            here = os.path.normpath(os.path.join(where, name))
            nfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            target: str | None = None
            try:
                st = os.fstat(nfd)
                if stat.S_ISLNK(st.st_mode):
                    if st.st_uid not in trusted_uids():
                        raise NotTrusted(
                            f"{what}: {here} is a symbolic link owned by {_owner(st.st_uid)}, "
                            f"not by {_owners()}; use the real path "
                            f"({os.path.realpath(here)}) instead"
                        )
                    links += 1
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                    target = os.readlink(name, dir_fd=fd)
                elif not stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), here)
                else:
                    check_directory(st, here, what)
            except BaseException:
                os.close(nfd)
                raise
            if target is None:  # a directory: go into it
                os.close(fd)
                fd, where = nfd, here
                continue
            os.close(nfd)  # a link: go on with its target
            pending.extend(c for c in reversed(target.split("/")) if c)
            if target.startswith("/"):
                root = os.open("/", _DIR_FLAGS)
                os.close(fd)
                fd, where = root, "/"
        return fd, where
    except BaseException:
        os.close(fd)
        raise


def open_trusted_dir(path: str, what: str) -> tuple[int, str]:
    """An ``O_PATH`` fd of the directory ``path`` and its real path, after
    checking it and every directory above it.  ``what`` names the setting in
    messages (e.g. ``server.socket``).

    Raises:
        NotTrusted: a directory or a link on the way is not trusted.
        OSError: it is missing or cannot be opened.
    """
    return _walk(os.path.abspath(path), what)


def open_trusted_file(path: str, what: str, *, secret: bool = False, walk: bool = True) -> int:
    """A read-only fd of the regular file ``path``, after StrictModes' checks.

    ``secret``: not readable by others either (a PIN).  ``walk=False`` skips
    the directories (for a file in a directory systemd made, such as
    ``$CREDENTIALS_DIRECTORY``); the file itself is still checked.

    Raises:
        NotTrusted: the file, a directory or a link on the way is not trusted;
            the message names it and the fix.
        OSError: it is missing or cannot be opened.
    """
    full = os.path.abspath(path)
    head, name = os.path.split(full)
    if not name:
        raise NotTrusted(f"{what}: {path} is a directory, not a file")
    if walk:
        dfd, real_dir = _walk(head, f"{what} {full}")
        shown = os.path.join(real_dir, name)
    else:
        dfd, shown = os.open(head, _DIR_FLAGS), full
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotTrusted(
                f"{what}: {shown} is a symbolic link; name the file itself "
                f"({os.path.realpath(shown)})"
            ) from None
        raise OSError(exc.errno, exc.strerror, shown) from None
    finally:
        os.close(dfd)
    try:
        _check_file(os.fstat(fd), shown, what, secret)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_file(st: os.stat_result, path: str, what: str, secret: bool) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise NotTrusted(f"{what}: {path} is {_kind(st.st_mode)}, not a regular file")
    if st.st_uid not in trusted_uids():
        raise NotTrusted(
            f"{what}: {path} is owned by {_owner(st.st_uid)}, not by {_owners()}; "
            f"run: chown {_user(os.geteuid())} {path}"
        )
    mode = stat.S_IMODE(st.st_mode)
    fix = f"chmod 600 {path}" if secret else f"chmod go-w {path}"
    if mode & 0o022:
        raise NotTrusted(
            f"{what}: {path} is writable by {_writers(mode)} (mode {mode:04o}); run: {fix}"
        )
    if secret and mode & 0o007:
        raise NotTrusted(f"{what}: {path} is readable by others (mode {mode:04o}); run: {fix}")
