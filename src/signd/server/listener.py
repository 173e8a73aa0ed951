"""The listening socket: bound safely on a path, or passed by systemd.

``open_listener`` binds a Unix socket in a directory no other user can change
(checked as OpenSSH's StrictModes would, see ``trusted.py``), removes a stale
socket left there only when nothing answers on it, and never follows a
symbolic link on the socket's path.  ``systemd_sockets`` takes the sockets
systemd passed (``LISTEN_FDS``): the main one, and the ssh-agent socket by its
name (``LISTEN_FDNAMES``).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat
from typing import Final

from ..trusted import NotTrusted, open_trusted_dir

__all__ = ["AGENT_FD_NAMES", "ListenerError", "open_listener", "systemd_sockets"]

log = logging.getLogger("signd.server")

SD_LISTEN_FDS_START: Final = 3


class ListenerError(Exception):
    """The listening socket could not be set up; the message says why."""


def _probe_live(path: str) -> bool:
    """True if something accepts connections on the Unix socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        return True  # e.g. EAGAIN: a live listener with a full backlog
    finally:
        probe.close()


#: ``LISTEN_FDNAMES`` names of the agent socket (``FileDescriptorName=agent``,
#: or the unit's name, systemd's default); any other name is the main socket.
AGENT_FD_NAMES: Final = ("agent", "signd-agent.socket")


def systemd_sockets(environ: dict[str, str] | None = None) -> dict[str, socket.socket]:
    """The listening sockets systemd passed (``LISTEN_FDS``), by role: ``"signd"``
    the main socket (unnamed, or any name but the agent's), ``"agent"`` the
    ssh-agent socket (``LISTEN_FDNAMES`` ``agent`` or ``signd-agent.socket``).
    Empty when systemd passed none.

    Raises:
        ListenerError: a passed fd is not a listening Unix stream socket, or
            two are for one role.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") not in (None, str(os.getpid())):
        return {}
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        raise ListenerError("LISTEN_FDS is not a number") from None
    if count < 1:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if names and len(names) != count:
        raise ListenerError(f"systemd passed {count} sockets but {len(names)} names")
    roles = ["agent" if n in AGENT_FD_NAMES else "signd" for n in names] or ["signd"] * count
    for role in ("signd", "agent"):
        if roles.count(role) > 1:
            raise ListenerError(
                f"systemd passed {roles.count(role)} sockets for the {role} socket; signd "
                "takes one (name the agent's FileDescriptorName=agent)"
            )
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    out = {}
    for i, role in enumerate(roles):
        sock = socket.socket(fileno=SD_LISTEN_FDS_START + i)
        what = "the socket" if role == "signd" else "the agent socket"
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ListenerError(f"{what} systemd passed is not a Unix stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ListenerError(f"{what} systemd passed is not listening")
        sock.setblocking(False)
        out[role] = sock
    return out


def _gid(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenerError(f"socket group {group!r} does not exist") from None


def _in_dir(dir_fd: int, name: str, fallback: str) -> str:
    """A path to ``name`` in the directory open as ``dir_fd`` that does not
    walk the directory's path again (``/proc/self/fd/N/name``), if /proc is
    there and the path fits ``sun_path``; else ``fallback``."""
    via = f"/proc/self/fd/{dir_fd}/{name}"
    if len(via.encode()) < 108 and os.path.isdir(f"/proc/self/fd/{dir_fd}"):
        return via
    return fallback


def _socket_dir(path: str) -> tuple[int, str]:
    """The socket's directory, checked as OpenSSH's StrictModes would (see
    ``trusted.py``): an ``O_PATH`` fd of it and the socket's file name.

    Raises:
        ListenerError: the directory is missing, or another user could change it.
    """
    parent, name = os.path.split(path)
    if not name:
        raise ListenerError(f"server.socket: {path} names a directory, not a socket")
    try:
        dir_fd, _ = open_trusted_dir(parent or ".", f"server.socket {path}")
    except NotTrusted as exc:
        raise ListenerError(str(exc)) from None
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise ListenerError(f"directory {parent} of the socket does not exist") from None
        raise ListenerError(f"directory {parent} of the socket: {exc.strerror}") from None
    return dir_fd, name


def _remove_stale(dir_fd: int, name: str, path: str) -> None:
    """Remove a dead socket left at ``name``; refuse anything else there."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; refusing to remove it")
    if _probe_live(_in_dir(dir_fd, name, path)):
        raise ListenerError(f"another daemon is already listening on {path}")
    log.info("removing stale socket", extra={"socket": path})
    os.unlink(name, dir_fd=dir_fd)


def _own_socket(dir_fd: int, name: str, path: str, mode: int, gid: int | None) -> None:
    """Give the socket just bound at ``name`` its group and check its mode,
    without following a symbolic link: if something else is there now (a
    link swapped in after the bind), nothing is changed and the start fails.

    Raises:
        ListenerError: ``name`` is no longer this daemon's socket.
    """
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise ListenerError(f"{path} was replaced after it was bound; not touching it")
        # Through the fd: the inode just checked, whatever the name points to now.
        target = f"/proc/self/fd/{fd}"
        if gid is not None and st.st_gid != gid:
            if os.path.exists(target):
                os.chown(target, -1, gid)
            else:  # no /proc: the name, but never through a link
                os.chown(name, -1, gid, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_IMODE(st.st_mode) != mode:  # bind honours the umask, not a default ACL
            if not os.path.exists(target):
                raise ListenerError(
                    f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, not {mode:04o}, and "
                    "without /proc it cannot be changed safely; remove the directory's "
                    "default ACL"
                )
            os.chmod(target, mode)
    finally:
        os.close(fd)


def open_listener(
    path: str, mode: int, group: str | int | None = None, backlog: int = 1024
) -> socket.socket:
    """Bind and listen on ``path``; remove a stale socket file only if dead.

    The socket's directory must be one no other user can change (owned by
    root or signd's user, not writable by group or others unless root-owned
    and sticky).  Nothing done to the socket's path follows a symbolic link:
    everything is done relative to the directory's fd, and the socket gets
    its mode at bind time (from the umask).

    Raises:
        ListenerError: another daemon is live there, or the path is unusable.
    """
    gid = _gid(group) if group is not None else None
    dir_fd, name = _socket_dir(path)
    bound = False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _remove_stale(dir_fd, name, path)
        # Bind with a restrictive umask so the socket is never briefly too open.
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(_in_dir(dir_fd, name, path))
        finally:
            os.umask(old)
        bound = True
        _own_socket(dir_fd, name, path, mode, gid)
        sock.listen(backlog)
        sock.setblocking(False)
    except (OSError, ListenerError) as exc:
        sock.close()
        if bound:  # unlink never follows a link: at worst it removes one swapped in
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
        os.close(dir_fd)
        if isinstance(exc, ListenerError):
            raise
        raise ListenerError(f"cannot listen on {path}: {exc.strerror}") from None
    os.close(dir_fd)
    return sock
