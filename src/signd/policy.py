"""Who may do what to which key: principals from the kernel, rules from the config.

A connection's principal comes from ``SO_PEERCRED`` (uid, gid, pid) and, for
its supplementary groups, from ``/proc/<pid>/status``: what the kernel says,
never what the client says.  Rules name keys (exact names or glob patterns,
``*`` for every key), operations, and who: users, groups and uids.  Anything
no rule allows is denied.  Root and the daemon's own user (who can read the
PIN and the token anyway) are trusted unless ``trust_root = false``; then
only the rules grant anything, to them too.
"""

from __future__ import annotations

import fnmatch
import functools
import grp
import os
import pwd
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from .errors import PermissionDenied

__all__ = ["OPERATIONS", "Policy", "Principal", "Rule", "operation_of", "principal_of"]

#: Operations a rule can grant.
OPERATIONS: Final = ("sign", "verify", "read", "rotate", "create", "admin")

#: Wire op -> the operation a rule must grant (None: anyone connected may).
_OPERATION_OF: Final[dict[str, str | None]] = {
    "sign": "sign",
    "sign_batch": "sign",
    "verify": "verify",
    "key_info": "read",
    "public_key": "read",
    "jwks": "read",
    "list_keys": "read",
    "create_key": "create",
    "rotate": "rotate",
    "update_key": "admin",
    "disable": "admin",
    "enable": "admin",
    "destroy": "admin",
    "health": None,
}


def operation_of(op: str) -> str | None:
    return _OPERATION_OF.get(op, "admin")


@dataclass(frozen=True, slots=True)
class Principal:
    uid: int
    gid: int
    pid: int
    user: str | None
    groups: frozenset[int]  # gid and supplementary groups
    group_names: frozenset[str]
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


def _supplementary_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def principal_of(sock: Any) -> Principal:
    """The peer of a connected Unix socket (stdlib or trio), as the kernel knows it."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups = {gid} | _supplementary_groups(pid)
    names = {n for n in (_group_name(g) for g in groups) if n is not None}
    try:
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

    def allows(self, who: Principal, operation: str | None, key: str) -> bool:
        if operation is None or who.uid in self.trusted:
            return True
        return any(rule.grants(who, operation, key) for rule in self.rules)

    def check(self, who: Principal, op: str, key: str) -> None:
        """Raises: PermissionDenied, naming the operation and the key."""
        operation = operation_of(op)
        if not self.allows(who, operation, key):
            raise PermissionDenied(f"{who.describe()} may not {operation} key {key!r}")
