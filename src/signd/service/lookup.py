"""Keys this process has not seen yet: looked up on the token, together.

Also the loading of key records (with their public keys) from the token,
which every family of operations uses.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Final

import trio

from ..access.policy import Principal
from ..errors import Busy, KeyNotFound, TokenError
from ..keys.records import DESTROYED, INTERNAL_RECORD_PREFIX, KeyRecord
from ..keys.recordstore import SEEN_WRITE_BACKOFF
from ..keys.store import LoadedKey, load_key
from ..protocol import Request
from .base import Round, ServiceBase
from .context import Batch, Reply
from .convert import wire_error

__all__ = ["INTERNAL_RECORD_PREFIX", "Lookups"]

log = logging.getLogger("signd.service")

#: A name a token search found absent is answered key_not_found for this long
#: without another search.
REFRESH_INTERVAL: Final = 1.0
#: Distinct key names one uid may have waiting for a token search; past it,
#: a request for yet another unknown name is answered busy.
MAX_LOOKUP_NAMES_PER_UID: Final = 32
MAX_LOOKUPS_TRACKED: Final = 4096


class Lookups(ServiceBase):
    """Loading keys from the token, and the coalesced look-ups of unknown names."""

    async def load(self) -> None:
        """Read every key's metadata and public keys from the token."""
        records: list[KeyRecord] = []
        for blob in await self.token.load_metadata():
            if blob.name.startswith(INTERNAL_RECORD_PREFIX):
                continue  # not a key (the audit chain head)
            try:
                records.append(KeyRecord.from_bytes(blob.name, blob.revision, blob.value))
            except ValueError as exc:
                log.error("skipping key with unreadable metadata", extra={"error": str(exc)})
        ids = [v.object_id for r in records for v in r.versions]
        public = await self.token.public_keys(ids)
        for record in records:
            try:
                self.keystore.put(await self._load(record, public))
            except ValueError as exc:
                log.error("skipping key", extra={"key": record.name, "error": str(exc)})
        self.loaded = True
        log.info("keys loaded", extra={"keys": len(self.keystore)})

    def _defer_lookup(self, req: Request, name: str, batch: Batch) -> None:
        """Answer ``req`` once ``name`` was looked up on the token (a task)."""
        batch.slow.append(
            partial(self._lookup_then_handle, req, name, batch.reply, batch.source, batch.who)
        )

    async def _lookup_then_handle(
        self, req: Request, name: str, reply: Reply, source: object, who: Principal
    ) -> None:
        """A key this process has not seen: another process may have made it."""
        try:
            with trio.fail_after(self.request_timeout):
                await self._look_up(name, who)
            if name not in self.keystore:
                raise KeyNotFound(f"no key named {name!r}")
        except Exception as exc:
            if isinstance(exc, trio.TooSlowError):
                self.metrics.limit_hit("request_timeout")
            self._fail(reply, req, exc, "key look-up")
            return
        for work in self.handle([req], reply, source, who):  # now known: no slow work
            await work()

    async def _look_up(self, name: str, who: Principal) -> None:
        """Have the token searched for ``name`` by a search that begins now or later.

        Names this process has not loaded are looked up **together**: at most
        one token search runs at a time, and it looks for every name that was
        asked for while the previous one ran (one name: a search by label;
        several: one listing of every key record, which answers them all).
        So a flood of unknown names costs a search per round, not per name,
        and a signing worker has at most one search ahead of signing work.
        The search is made by one of the waiting requests' own tasks, with
        the token call shielded, so a request that gives up cannot leave the
        others without an answer.  Besides:

        * a name found absent is answered ``key_not_found`` without another
          search for ``REFRESH_INTERVAL`` (negative caching, bounded);
        * a request that adds a name to a search costs one token of its
          peer's rate-limit bucket, if there is one (``rate_limited``);
        * a uid may have ``MAX_LOOKUP_NAMES_PER_UID`` distinct names waiting;
          a request for another is answered ``busy``.

        A key another process made is still found on the first request for it.

        Raises: Busy, RateLimited, or the search's WireError.
        """
        if name in self.keystore:
            return
        absent = self._absent.get(name)
        if absent is not None and time.monotonic() - absent < REFRESH_INTERVAL:
            return
        r = self._round
        if name not in r.names:
            uid = who.uid
            waiting = self._lookups_by_uid.get(uid, 0)
            if waiting >= MAX_LOOKUP_NAMES_PER_UID:
                raise Busy(
                    f"uid {uid} has {waiting} key names waiting to be looked up on the "
                    "token; retry later"
                )
            if self.limiter is not None:
                self.limiter.charge(uid, 1)
            r.names[name] = uid
            self._lookups_by_uid[uid] = waiting + 1
        while not r.done:
            if self._searching:
                await self._searched.park()
            else:
                await self._search()
        if r.error is not None:
            raise r.error

    async def _search(self) -> None:
        """Search the token for the waiting names, round after round."""
        self._searching = True
        try:
            while self._round.names:
                r, self._round = self._round, Round()
                with trio.CancelScope(shield=True):
                    await self._search_round(r)
                await trio.lowlevel.checkpoint()  # a cancelled searcher hands over here
        finally:
            self._searching = False
            self._searched.unpark_all()

    async def _search_round(self, r: Round) -> None:
        started = time.monotonic()
        names = list(r.names)
        try:
            blobs = await self.token.load_metadata(names[0] if len(names) == 1 else None)
            self.metrics.key_lookups += 1
            found = {b.name: b for b in blobs}
            for name in names:
                blob = found.get(name)
                if blob is None:
                    self._note_absent(name, started)
                    continue
                cached = self.keystore.get_or_none(name)
                if cached is not None and cached.record.revision >= blob.revision:
                    continue
                try:
                    record = KeyRecord.from_bytes(name, blob.revision, blob.value)
                    self.keystore.put(await self._load(record))
                except ValueError as exc:
                    log.error("skipping key", extra={"key": name, "error": str(exc)})
        except Exception as exc:
            r.error = wire_error(exc, "key look-up", keys=len(names))
        finally:
            r.done = True
            for uid in r.names.values():
                left = self._lookups_by_uid[uid] - 1
                if left:
                    self._lookups_by_uid[uid] = left
                else:
                    del self._lookups_by_uid[uid]
            self._searched.unpark_all()

    def _note_absent(self, name: str, when: float) -> None:
        """Remember that ``name`` was absent; the table is bounded, so random
        names cannot grow it (a name not remembered is just searched again)."""
        if len(self._absent) >= MAX_LOOKUPS_TRACKED:
            self._absent = {n: t for n, t in self._absent.items() if when - t < REFRESH_INTERVAL}
            if len(self._absent) >= MAX_LOOKUPS_TRACKED:
                return
        self._absent[name] = when

    async def _refresh(self, name: str) -> LoadedKey | None:
        """Read one key from the token into the cache; None if it does not exist."""
        key = await self._read_key(name)
        if key is not None:
            self.keystore.put(key)
        return key

    async def _read_record(self, name: str) -> KeyRecord | None:
        """The newest record of ``name`` on the token, to change it: checked as
        ``_read_key`` does, without acting on it (the write that follows loads it)."""
        key = await self._read_key(name, finish=False)
        return key.record if key is not None else None

    async def _read_key(self, name: str, *, finish: bool = True) -> LoadedKey | None:
        """The newest record of ``name`` with its public keys; None if there is none.

        A record may name a keypair this process cannot find: another
        process wrote that record and took it back (a lost compare-and-swap),
        and SoftHSM showed this process the record but not yet its removal.
        So such a record is read again, briefly, until the view settles.

        Raises: TokenError (the record still names a missing keypair),
        TokenUnavailable.
        """
        for wait in (0.0, *SEEN_WRITE_BACKOFF):
            await trio.sleep(wait)
            blobs = await self.token.load_metadata(name)
            if not blobs:
                return None
            record = KeyRecord.from_bytes(name, blobs[0].revision, blobs[0].value)
            try:
                return await self._load(record, finish=finish)
            except ValueError as exc:
                missing = exc
        log.error("key record names keys missing on the token", extra={"key": name})
        raise TokenError(f"{missing}; see OPERATIONS.md, 'A key record names a missing keypair'")

    async def _load(
        self,
        record: KeyRecord,
        public: dict[bytes, tuple[bytes, bool]] | None = None,
        *,
        finish: bool = True,
    ) -> LoadedKey:
        """The record with its public keys; finishes a destroy a crash
        interrupted, unless not ``finish`` (a record about to be changed,
        which may be one another process is taking back).

        Raises: ValueError (a version's keys are missing on the token).
        """
        if public is None:
            public = await self.token.public_keys([v.object_id for v in record.versions])
        for v in record.versions:
            spki, has_private = public.get(v.object_id, (None, False))
            if v.state == DESTROYED and has_private and finish:
                # The record says destroyed, so the private key goes: right after
                # a destroy, or on the next load if a crash came in between.
                await self.token.destroy_keys(v.object_id)
                log.warning(
                    "private key destroyed", extra={"key": record.name, "version": v.version}
                )
            elif v.state != DESTROYED and spki is not None and not has_private:
                raise ValueError(
                    f"key {record.name!r} version {v.version}: its private key is missing "
                    "on the token"
                )
        # This record's versions only: at a start ``public`` holds every key's.
        spkis = {
            v.object_id: public[v.object_id][0] for v in record.versions if v.object_id in public
        }
        return load_key(record, spkis, self._clock(), self._cap(record))

    def _cap(self, record: KeyRecord) -> int:
        """The most versions not destroyed ``record`` may hold on this daemon."""
        return record.settings.version_cap(self.default_max_versions, self.max_versions_limit)
