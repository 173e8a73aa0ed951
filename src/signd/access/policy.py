"""Who may do what to which key: principals from the kernel, rules from the config.

A connection's principal is what the kernel recorded when the client called
``connect``: ``SO_PEERCRED`` (uid, gid, pid) and ``SO_PEERGROUPS`` (its
supplementary groups), never what the client says and never anything read
later from ``/proc``, which an exec of a setuid program would have changed by
then.  The executable (``/proc/<pid>/exe``, read after accept) is only a hint
for the audit record: the pid may have exec'd something else or been reused.
It takes no part in any decision.  Rules name keys (exact names or glob patterns,
``*`` for every key), operations, and who: users, groups and uids.  Anything
no rule allows is denied.  Root and the daemon's own user (who can read the
PIN and the token anyway) are trusted unless ``trust_root = false``; then
only the rules grant anything, to them too.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import functools
import grp
import logging
import os
import pwd
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from ..errors import PermissionDenied

log = logging.getLogger("signd.policy")

__all__ = [
    "OPERATIONS",
    "Policy",
    "Principal",
    "Rule",
    "peer_groups",
    "principal_of",
]

#: The verbs a rule can grant; which one each wire operation needs is in the
#: op table (``signd.ops``).
OPERATIONS: Final = ("sign", "verify", "read", "rotate", "create", "admin", "import")


@dataclass(frozen=True, slots=True)
class Principal:
    uid: int
    gid: int
    pid: int
    user: str | None
    groups: frozenset[int]  # gid and supplementary groups, as at connect time
    group_names: frozenset[str]
    #: a hint for the audit record only (read from /proc after accept): never
    #: use it to decide anything
    exe: str | None = None

    def describe(self) -> str:
        who = self.user if self.user is not None else f"uid {self.uid}"
        return f"{who} (uid {self.uid}, pid {self.pid})"


@functools.lru_cache(maxsize=1024)
def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


@functools.lru_cache(maxsize=1024)
def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


#: ``SO_PEERGROUPS`` (Linux 4.13): Python 3.11's socket module lacks the name.
SO_PEERGROUPS: Final[int] = getattr(socket, "SO_PEERGROUPS", 59)
#: Linux's NGROUPS_MAX: no process has more supplementary groups.
NGROUPS_MAX: Final = 65536
_GID_SIZE: Final = 4  # gid_t


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def peer_groups(fd: int) -> frozenset[int] | None:
    """The supplementary groups the peer of the connected Unix socket ``fd``
    had when it called ``connect`` (``SO_PEERGROUPS``), or None where the
    kernel cannot say.

    ``socket.getsockopt`` takes at most 1024 bytes (256 groups), so libc's
    ``getsockopt`` is called directly; on ``ERANGE`` the kernel has written
    the size it needs, and the call is made again with that.
    """
    getsockopt = _libc().getsockopt
    size = 64 * _GID_SIZE
    while True:
        buf = ctypes.create_string_buffer(size)
        length = ctypes.c_uint32(size)
        rc = getsockopt(
            ctypes.c_int(fd),
            ctypes.c_int(socket.SOL_SOCKET),
            ctypes.c_int(SO_PEERGROUPS),
            buf,
            ctypes.byref(length),
        )
        if rc == 0:
            count = length.value // _GID_SIZE
            return frozenset(struct.unpack(f"={count}I", buf.raw[: count * _GID_SIZE]))
        err = ctypes.get_errno()
        if err == errno.ERANGE and size < (NGROUPS_MAX + 1) * _GID_SIZE:
            size = max(length.value, 2 * size)
            continue
        log.warning(
            "the kernel did not give the peer's groups; group rules do not apply to it",
            extra={"error": os.strerror(err)},
        )
        return None


def principal_of(sock: Any) -> Principal:
    """The peer of a connected Unix socket (stdlib or trio), as the kernel
    recorded it at ``connect``.  Where the kernel cannot give the
    supplementary groups, only the primary gid counts (fails closed)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups = {gid} | (peer_groups(sock.fileno()) or frozenset())
    names = {n for n in (_group_name(g) for g in groups) if n is not None}
    try:
        # A hint only, for the audit record: read now, not at connect.
        exe: str | None = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None
    return Principal(uid, gid, pid, _user_name(uid), frozenset(groups), frozenset(names), exe)


@dataclass(frozen=True, slots=True)
class Rule:
    keys: tuple[str, ...]
    operations: frozenset[str]
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()  # names, or decimal gids
    uids: frozenset[int] = frozenset()

    def grants(self, who: Principal, operation: str, key: str) -> bool:
        if operation not in self.operations:
            return False
        if not any(fnmatch.fnmatchcase(key, pattern) for pattern in self.keys):
            return False
        return (
            who.uid in self.uids
            or (who.user is not None and who.user in self.users)
            or any(
                g in who.group_names or (g.isdigit() and int(g) in who.groups) for g in self.groups
            )
        )


class Policy:
    """The rules in force; replaced whole on reload."""

    def __init__(self, rules: Iterable[Rule], *, trust_root: bool = True) -> None:
        self.rules = tuple(rules)
        self.trusted = {0, os.geteuid()} if trust_root else set()

    def allows(self, who: Principal, verb: str | None, key: str) -> bool:
        """Whether ``who`` may ``verb`` key ``key`` (None: anyone may)."""
        if verb is None or who.uid in self.trusted:
            return True
        return any(rule.grants(who, verb, key) for rule in self.rules)

    def granted(self, who: Principal, key: str) -> frozenset[str]:
        """Every verb ``who`` may use on key ``key``."""
        return frozenset(verb for verb in OPERATIONS if self.allows(who, verb, key))

    def check(self, who: Principal, verb: str, key: str) -> None:
        """Raises: PermissionDenied, naming the verb and the key."""
        if not self.allows(who, verb, key):
            raise PermissionDenied(f"{who.describe()} may not {verb} key {key!r}")
