"""Key records on the token, written as a compare-and-swap.

A key's record (``store.KeyRecord``, serialised) is kept on the token as a
data object per revision.  PKCS#11 has no compare-and-swap, and SoftHSM does
not let a data object's value change, so a write is three steps on the token
(create the next revision, check, drop the older ones), with checks between
them made by a process that never writes: a process that writes moves
SoftHSM's generation counter for itself and then misses what *other*
processes wrote (see ``token/pool.py``).  ``RecordStore`` does the steps and
the checks; the token pool (its ``RecordToken``) runs each on the right worker.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import trio

from ..errors import Conflict

__all__ = [
    "SAME_WRITE_RECHECK",
    "SEEN_WRITE_BACKOFF",
    "RecordStore",
    "RecordToken",
    "Superseded",
]

#: Waits for a signing worker to see a record the writer just stored.
SEEN_WRITE_BACKOFF: Final = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
#: After a record write looked unopposed, seconds before it is checked again for
#: one another process wrote at the same moment (key records change rarely).
SAME_WRITE_RECHECK: Final = 0.05


class Superseded(Conflict):
    """Another process wrote a newer revision while this write was checked.

    It read a record of this write's revision to make its own: this one (then
    this write landed, and the newer record carries it on) or one this
    process never saw.  Either way the newer record stands; whatever this
    write's record names (a new keypair) must stay on the token, since the
    newer record may name it too.
    """


class RecordToken(Protocol):
    """The token as the record store needs it (the token pool).

    Each raises TokenUnavailable or TokenError.
    """

    async def load_metadata(self, name: str | None = None) -> list[Any]:
        """The newest record of one key, or of every key."""

    async def revisions(self, name: str) -> list[int]:
        """The revisions of a key's record, as a process that never writes sees them."""

    async def create_metadata(self, name: str, revision: int, value: bytes) -> None:
        """Store a revision of a key's record."""

    async def drop_created(self) -> None:
        """Take back the revision ``create_metadata`` stored last."""

    async def drop_older(self, name: str, revision: int) -> None:
        """Delete the revisions of a key's record older than ``revision``."""


class RecordStore:
    """Reads and writes key records (and the audit chain head) on ``token``."""

    def __init__(self, token: RecordToken) -> None:
        self._token = token

    async def load_metadata(self, name: str | None = None) -> list[Any]:
        """The newest record of one key (``name``), or of every key (None).

        Raises: TokenUnavailable, TokenError.
        """
        return await self._token.load_metadata(name)

    async def write_metadata(self, name: str, revision: int, value: bytes) -> None:
        """Store revision ``revision`` of a key's record, then drop older ones.

        A compare-and-swap, as far as PKCS#11 allows: the newest revision on
        the token must be ``revision - 1`` (the one the change was made on),
        and if a writer in another process got the same revision in at the
        same moment, ours is taken back.  Both checks are made by a signing
        worker, which never writes and so sees what other processes wrote.

        Raises: Conflict (nothing was changed), Superseded (a Conflict: the
        change may have landed), TokenUnavailable, TokenError.
        """
        token = self._token
        revisions = await self._revisions(name, revision - 1)
        newest = max(revisions, default=0)
        if newest != revision - 1:
            raise Conflict(
                f"key {name!r} was changed by another process (its record is at revision "
                f"{newest}, this change was made on {revision - 1}); nothing was changed"
            )
        if revisions.count(newest) > 1:
            # Two processes wrote this revision at once and are taking theirs
            # back: building on either would keep a record one of them undoes.
            raise Conflict(
                f"key {name!r} is being changed by two other processes at once; nothing was changed"
            )
        await token.create_metadata(name, revision, value)
        revisions = await self._revisions(name, revision)
        if revisions.count(revision) == 1 and max(revisions) == revision:
            # Looked again a moment later: another process's record of the
            # same revision may become visible to this one only after ours
            # did (SoftHSM's lag between processes, longer under load), and
            # then both would keep theirs.  Seen now, both drop theirs.
            await trio.sleep(SAME_WRITE_RECHECK)
            revisions = await token.revisions(name)
        if max(revisions) > revision:
            # Not taken back: the newer record may have been made from ours
            # (its writer drops ours with the other older revisions).
            raise Superseded(
                f"key {name!r} was changed again by another process while this change "
                f"was written (its record is at revision {max(revisions)}); this change "
                "may be part of it: read the key before repeating it"
            )
        if revisions.count(revision) != 1:
            await token.drop_created()
            raise Conflict(
                f"key {name!r} was changed by another process at the same moment; "
                "nothing was changed"
            )
        await token.drop_older(name, revision)

    async def _revisions(self, name: str, expected: int) -> list[int]:
        """The revisions of a key's record, as a signing worker sees them.

        SoftHSM lets another process see a new object only once the token's
        generation counter has moved, which can lag the write a little
        (measured: about 1 rotation in 200 looked like a conflict).  So
        while the newest revision seen is below ``expected`` (the one just
        written), it is asked again, briefly; a newer one is a real conflict.
        """
        revisions: list[int] = []
        for wait in (0.0, *SEEN_WRITE_BACKOFF):
            await trio.sleep(wait)
            revisions = await self._token.revisions(name)
            if max(revisions, default=0) >= expected:
                break
        return revisions
