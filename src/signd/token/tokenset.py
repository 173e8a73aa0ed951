"""Several tokens serving one key set (``[[token]]`` in the config).

Each token has its own pool of workers (``pool.py``); a ``TokenSet`` puts
them behind the one interface the service uses, so the service does not know
how many there are.  The rules, also in README "Several tokens":

* **Every backup-able keypair is on every token.**  A new key or version is
  generated on the *primary* (the first serving token in config order),
  wrapped under the wrap key and unwrapped onto every other serving token
  (same ``CKA_ID``, same label) before its record is written, so before it
  becomes current.  A key made without ``backup`` lives on the token that
  made it only, and is unavailable while that token is.
* **Records are mirrored.**  Each token keeps its own copy of every record.
  The compare-and-swap of a change happens on the primary; the same record
  objects are then written on every other serving token, each first given
  what it lacks of the keypairs the record names (a token caught up while a
  keypair was being made missed it; a key without backup leaves its public
  key there).  Several daemons on one *set* of tokens are not supported (one
  daemon on one token each, as before, is).
* **A token that goes away stops serving at once** (its queued signatures
  go to another token that holds the key, not back to the client).  One that
  returns, or joins at start, is *caught up* before it serves: for each key,
  the token holding the highest revision of its record is the source (the
  returning one too, if it served alone while the others were away); the
  missing versions are unwrapped onto it from there, versions destroyed
  meanwhile (or whose destruction failed there) lose their private keys,
  and the record is copied.  A rotation
  while a token is away is made on the tokens present; the away token gets
  the new version when it returns.
* **Signatures go to the least busy serving token that holds the key**;
  verifications to the least busy serving token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Final

import trio

from ..errors import Busy, InvalidArgument, TokenUnavailable, WireError
from ..keys import algorithms
from ..keys.records import DESTROYED, INTERNAL_RECORD_PREFIX, KeyRecord
from .ipc import MetadataBlob, SignJob, TokenInfo, VerifyJob
from .pool import TokenPool
from .profiles import Profile
from .scheduler import Entry

__all__ = ["TokenSet", "Tokens"]

log = logging.getLogger("signd.workers")

#: How often the set looks for a token that went away or came back.
WATCH_INTERVAL: Final = 0.1


class TokenSet:
    """Several token pools behind the interface of one (see the module docstring)."""

    def __init__(self, pools: Sequence[TokenPool], profile: Profile) -> None:
        if not pools:
            raise InvalidArgument("a token set needs at least one token")
        self.pools = list(pools)
        self.profile = profile
        self.settings = pools[0].settings
        #: tokens caught up and serving
        self.serving = [False] * len(pools)
        #: object id -> the tokens holding its private key
        self._holders: dict[bytes, set[int]] = {}
        #: held by everything that writes to the tokens, and by a catch-up
        self._lock = trio.Lock()
        #: how many times each token was caught up (for tests and the log)
        self.catch_ups = [0] * len(pools)

    # ------------------------------------------------------------ state

    @property
    def info(self) -> TokenInfo | None:
        i = self._primary_or_none()
        return self.pools[i if i is not None else 0].info

    @property
    def is_open(self) -> bool:
        return any(self._up(i) for i in range(len(self.pools)))

    @property
    def pending(self) -> int:
        return sum(p.pending for p in self.pools)

    @property
    def alive_workers(self) -> int:
        return sum(p.alive_workers for p in self.pools)

    @property
    def respawns(self) -> int:
        return sum(p.respawns for p in self.pools)

    def states(self) -> list[tuple[TokenInfo | None, str]]:
        """Each token's info and state: ``serving``, ``catching_up`` (open,
        not caught up yet) or ``unavailable``."""
        out = []
        for i, pool in enumerate(self.pools):
            if self._up(i):
                state = "serving"
            elif pool.is_open:
                state = "catching_up"
            else:
                state = "unavailable"
            out.append((pool.info, state))
        return out

    def _up(self, i: int) -> bool:
        return self.serving[i] and self.pools[i].is_open

    def _primary_or_none(self) -> int | None:
        return next((i for i in range(len(self.pools)) if self._up(i)), None)

    def _primary(self) -> TokenPool:
        i = self._primary_or_none()
        if i is None:
            raise TokenUnavailable("no token is serving (every token is away); retry")
        return self.pools[i]

    # ------------------------------------------------------------ the hot path

    def enqueue(self, source: object, entries: Sequence[Entry]) -> None:
        """Queue each entry on the least busy serving token that holds its key;
        all of ``entries`` are queued, or none.

        Raises: TokenUnavailable (no serving token holds a key), Busy,
        InvalidArgument (as ``TokenPool.enqueue``).
        """
        chosen: dict[int, list[Entry]] = {}
        for entry in entries:
            i = self._route(entry.job, ())
            chosen.setdefault(i, []).append(self._with_failover(source, entry, (i,)))
        for i, mine in chosen.items():
            pool = self.pools[i]
            limit = pool.settings.queue_limit
            if len(mine) > limit:
                raise InvalidArgument(f"{len(mine)} signatures exceed the token queue of {limit}")
            if pool.pending + len(mine) > limit:
                raise Busy(f"the token queue is full ({pool.pending} signatures waiting)")
        for i, mine in chosen.items():
            self.pools[i].enqueue(source, mine)

    def pump(self) -> None:
        for i in range(len(self.pools)):
            self.pools[i].pump()

    def drop(self, source: object, error: WireError) -> int:
        return sum(p.drop(source, error) for p in self.pools)

    def _route(self, job: SignJob | VerifyJob, tried: Sequence[int]) -> int:
        """The token for ``job``: serving, not tried yet, least busy; for a
        signature, one that holds the key.  Raises: TokenUnavailable."""
        if isinstance(job, SignJob) or _is_mac(job):
            # An HMAC key's MAC is checked by a token holding its secret (the newest).
            oid = job.object_id if isinstance(job, SignJob) else job.candidates[0][1]
            holders = self._holders.get(oid)
            candidates = (
                [i for i in holders if self._up(i) and i not in tried]
                if holders is not None
                else [i for i in [self._primary_or_none()] if i is not None and i not in tried]
            )
        else:
            candidates = [i for i in range(len(self.pools)) if self._up(i) and i not in tried]
        if not candidates:
            raise TokenUnavailable("no serving token holds this key now; retry")
        return min(candidates, key=lambda i: (self.pools[i].pending, i))

    def _with_failover(self, source: object, entry: Entry, tried: tuple[int, ...]) -> Entry:
        """``entry`` whose ``token_unavailable`` outcome is not the answer while
        another serving token holds the key: it is queued there instead."""
        answer = entry.callback

        def callback(ok: bool, value: Any) -> None:
            if not ok and isinstance(value, TokenUnavailable):
                try:
                    i = self._route(entry.job, tried)
                    again = self._with_failover(source, entry, (*tried, i))
                    self.pools[i].enqueue(source, [again])
                except WireError:
                    pass  # no other token: the answer stands
                else:
                    self.pools[i].pump()
                    return
            answer(ok, value)

        return Entry(entry.job, callback, entry.deadline, entry.bulk)

    # ------------------------------------------------------------ reads

    async def load_metadata(self, name: str | None = None) -> list[MetadataBlob]:
        return await self._primary().load_metadata(name)

    async def revisions(self, name: str) -> list[int]:
        return await self._primary().revisions(name)

    async def public_keys(self, object_ids: Sequence[bytes]) -> dict[bytes, tuple[bytes, bool]]:
        """The primary's answer, every serving token asked: whose private keys
        each holds is noted for routing.  A private key held only by a token
        that is away counts as existing (the key is unavailable, not broken)."""
        answers: dict[int, dict[bytes, tuple[bytes, bool]]] = {}
        for i in range(len(self.pools)):
            if self._up(i):
                answers[i] = await self.pools[i].public_keys(object_ids)
        if not answers:
            raise TokenUnavailable("no token is serving (every token is away); retry")
        for i, found in answers.items():
            for oid in object_ids:
                has_private = found.get(oid, (b"", False))[1]
                holders = self._holders.setdefault(oid, set())
                if has_private:
                    holders.add(i)
                else:
                    holders.discard(i)
        merged: dict[bytes, tuple[bytes, bool]] = {}
        for oid in object_ids:
            der = next((a[oid][0] for a in answers.values() if oid in a), None)
            if der is not None:
                merged[oid] = (der, bool(self._holders.get(oid)))
        return merged

    # ------------------------------------------------------------ writes

    async def create_metadata(self, name: str, revision: int, value: bytes) -> None:
        """On the primary, then on every other serving token, which is first
        made to hold the keypairs the record names as the primary holds them."""
        async with self._lock:
            primary = self._primary()
            await primary.create_metadata(name, revision, value)
            src = self.pools.index(primary)
            record = _key_record(name, revision, value)

            async def mirrored(pool: TokenPool) -> None:
                if record is not None:  # (private keys go after the record: destroy_keys)
                    await self._copy_keypairs(src, self.pools.index(pool), record, destroy=False)
                await pool.create_metadata(name, revision, value)

            await self._mirror(primary, mirrored)

    async def drop_created(self) -> None:
        async with self._lock:
            primary = self._primary()
            await primary.drop_created()
            await self._mirror(primary, lambda p: p.drop_created())

    async def drop_older(self, name: str, revision: int) -> None:
        async with self._lock:
            primary = self._primary()
            await primary.drop_older(name, revision)
            await self._mirror(primary, lambda p: p.drop_older(name, revision))

    async def destroy_keys(self, object_id: bytes, *, public: bool = False) -> int:
        async with self._lock:
            primary = self._primary()
            count = await primary.destroy_keys(object_id, public=public)
            await self._mirror(primary, lambda p: p.destroy_keys(object_id, public=public))
            self._holders.pop(object_id, None)
            return count

    async def generate(
        self, key_type: str, object_id: bytes, label: str, backup: bool = False
    ) -> bytes:
        """On the primary; a backup-able keypair also on every other serving
        token (unwrapped from the primary's wrap) before this returns."""
        async with self._lock:
            primary = self._primary()
            spki = await primary.generate(key_type, object_id, label, backup)
            holders = {self.pools.index(primary)}
            self._holders[object_id] = holders
            if backup:
                wrapped = await primary.wrap_private(object_id)
                for i in await self._mirror(
                    primary,
                    lambda p: p.restore_keypair(key_type, object_id, label, spki, wrapped),
                ):
                    holders.add(i)
            return spki

    async def restore_keypair(
        self, key_type: str, object_id: bytes, label: str, spki: bytes, wrapped: bytes | None
    ) -> None:
        async with self._lock:
            primary = self._primary()
            await primary.restore_keypair(key_type, object_id, label, spki, wrapped)
            done = await self._mirror(
                primary, lambda p: p.restore_keypair(key_type, object_id, label, spki, wrapped)
            )
            if wrapped is not None:
                self._holders[object_id] = {self.pools.index(primary), *done}

    async def import_keypair(
        self,
        key_type: str,
        object_id: bytes,
        label: str,
        import_key_id: str,
        wrapped_key: bytes,
        wrapped_material: bytes,
        spki: bytes,
        backup: bool,
    ) -> bytes:
        """On the primary (whose import key ``import_params`` answered); a
        backup-able keypair also on every other serving token, as ``generate``
        puts one there."""
        async with self._lock:
            primary = self._primary()
            got = await primary.import_keypair(
                key_type,
                object_id,
                label,
                import_key_id,
                wrapped_key,
                wrapped_material,
                spki,
                backup,
            )
            holders = {self.pools.index(primary)}
            self._holders[object_id] = holders
            if backup:
                wrapped = await primary.wrap_private(object_id)
                for i in await self._mirror(
                    primary,
                    lambda p: p.restore_keypair(key_type, object_id, label, got, wrapped),
                ):
                    holders.add(i)
            return got

    async def _mirror(self, primary: TokenPool, call: Callable[[TokenPool], Any]) -> list[int]:
        """``call`` on every other serving token; one that fails stops serving
        (it is caught up again).  Returns the tokens it succeeded on."""
        done = []
        for i, pool in enumerate(self.pools):
            if pool is primary or not self.serving[i]:
                continue
            if not pool.is_open:  # away since the watch last looked: caught up on return
                self._stop_serving(i, "the token went away")
                continue
            try:
                await call(pool)
            except WireError as exc:
                self._stop_serving(i, f"a mirrored write failed: {exc.message}")
            else:
                done.append(i)
        return done

    # ------------------------------------------------------------ the primary's own

    async def wrap_private(self, object_id: bytes) -> bytes:
        return await self._primary().wrap_private(object_id)

    async def wrap_check_value(self) -> str | None:
        return await self._primary().wrap_check_value()

    async def import_public(self) -> tuple[bytes, str]:
        """The primary's import key (each token has its own)."""
        return await self._primary().import_public()

    async def backup_mac(self, data: bytes) -> bytes:
        return await self._primary().backup_mac(data)

    async def verify_backup_mac(self, data: bytes, mac: bytes) -> bool:
        return await self._primary().verify_backup_mac(data, mac)

    # ------------------------------------------------------------ away and back

    async def start(self) -> None:
        """Catch every open token up with the others (at start, the token
        holding each record's highest revision is its source)."""
        first = next((i for i, p in enumerate(self.pools) if p.is_open), None)
        if first is None:
            return
        self.serving[first] = True
        for i, pool in enumerate(self.pools):
            if pool.is_open:
                await self._catch_up(i, both_ways=True)

    async def run(self) -> None:
        """Watch the tokens: one that went away stops serving; one that is
        back is caught up, then serves.  Runs until cancelled."""
        while True:
            for i, pool in enumerate(self.pools):
                if self.serving[i] and not pool.is_open:
                    self._stop_serving(i, "the token went away")
                elif not self.serving[i] and pool.is_open and self._primary_or_none() is not None:
                    try:
                        # both ways: if the others were away too, and this one
                        # served alone meanwhile, its records are the newer
                        await self._catch_up(i, both_ways=True)
                    except WireError as exc:
                        log.warning(
                            "catching a token up failed; trying again",
                            extra={"token": self._label(i), "error": exc.message},
                        )
                elif not self.serving[i] and pool.is_open:
                    self.serving[i] = True  # the only token there: nothing to catch up from
                    log.warning("token serving alone", extra={"token": self._label(i)})
            await trio.sleep(WATCH_INTERVAL)

    def _stop_serving(self, i: int, why: str) -> None:
        if self.serving[i]:
            self.serving[i] = False
            log.error("token stopped serving", extra={"token": self._label(i), "reason": why})

    def _label(self, i: int) -> str:
        info = self.pools[i].info
        return info.label if info is not None else f"token {i + 1}"

    async def _catch_up(self, i: int, *, both_ways: bool = False) -> None:
        """Bring token ``i`` up to the serving tokens, then let it serve.

        ``both_ways``: a record newer on ``i`` than on the serving tokens (it
        served alone while they were away) is copied to them instead.  A
        record ``i`` holds already has its keypairs checked there (one read of
        ``i`` each).
        """
        async with self._lock:
            dst = self.pools[i]
            sources = [j for j in range(len(self.pools)) if j != i and self._up(j)]
            copied = 0
            if sources:
                mine = {b.name: b for b in await dst.load_metadata(None, writer=True)}
                theirs: dict[str, tuple[int, MetadataBlob]] = {}
                for j in sources:
                    for blob in await self.pools[j].load_metadata(None, writer=True):
                        best = theirs.get(blob.name)
                        if best is None or blob.revision > best[1].revision:
                            theirs[blob.name] = (j, blob)
                for name, (j, blob) in sorted(theirs.items()):
                    held = mine.get(name)
                    if held is None or held.revision < blob.revision:
                        await self._copy(j, i, blob)
                        copied += 1
                    elif both_ways and held.revision > blob.revision:
                        for k in sources:
                            await self._copy(i, k, held)
                        copied += 1
                    elif held.revision == blob.revision:
                        # The same record, but a mirrored call that failed on
                        # ``i`` (it then stopped serving) may have left its
                        # keypairs behind: a destroyed version's private key.
                        record = _key_record(name, blob.revision, blob.value)
                        if record is not None:
                            await self._copy_keypairs(j, i, record)
                if both_ways:
                    for name, held in sorted(mine.items()):
                        if name not in theirs:
                            for k in sources:
                                await self._copy(i, k, held)
                            copied += 1
            self.serving[i] = True
            self.catch_ups[i] += 1
            log.info(
                "token caught up and serving",
                extra={"token": self._label(i), "records_copied": copied},
            )

    async def _copy(self, src_i: int, dst_i: int, blob: MetadataBlob) -> None:
        """Make token ``dst_i`` hold ``blob`` (a record of ``src_i``) and every
        backup-able keypair it names, as ``src_i`` holds them."""
        record = _key_record(blob.name, blob.revision, blob.value)
        if record is not None:
            await self._copy_keypairs(src_i, dst_i, record)
        dst = self.pools[dst_i]
        await dst.create_metadata(blob.name, blob.revision, blob.value)
        await dst.drop_older(blob.name, blob.revision)

    async def _copy_keypairs(
        self, src_i: int, dst_i: int, record: KeyRecord, *, destroy: bool = True
    ) -> None:
        """Make token ``dst_i`` hold the keypairs ``record`` names as token
        ``src_i`` holds them: a backup-able private key unwrapped from its
        wrap there, the public key alone otherwise; a destroyed version's
        private key deleted (unless not ``destroy``: destroyed versions are
        left alone).  ``src_i`` is asked only if ``dst_i`` lacks something."""
        src, dst = self.pools[src_i], self.pools[dst_i]
        here = await dst.public_keys([v.object_id for v in record.versions], writer=True)
        todo = []
        for v in record.versions:
            present = v.object_id in here
            dst_private = present and here[v.object_id][1]
            if v.state == DESTROYED:
                if destroy and (dst_private or not present):
                    todo.append(v)
            elif dst_private:
                self._holders.setdefault(v.object_id, set()).add(dst_i)
            elif not present or record.settings.backup:
                todo.append(v)
        if not todo:
            return
        there = await src.public_keys([v.object_id for v in todo], writer=True)
        for v in todo:
            spki, src_private = there.get(v.object_id, (None, False))
            _, dst_private = here.get(v.object_id, (None, False))
            if v.state == DESTROYED:
                if dst_private:
                    await dst.destroy_keys(v.object_id)
                if v.object_id not in here and spki is not None:
                    await dst.restore_keypair(
                        record.type,
                        v.object_id,
                        self._object_label(record, v.version),
                        spki,
                        None,
                    )
                continue
            if spki is None:  # nothing to copy
                continue
            wrapped = None
            if record.settings.backup and src_private:
                wrapped = await src.wrap_private(v.object_id)
            if v.object_id not in here or wrapped is not None:
                if v.object_id in here:  # a public key alone: replaced with the pair
                    await dst.destroy_keys(v.object_id, public=True)
                await dst.restore_keypair(
                    record.type,
                    v.object_id,
                    self._object_label(record, v.version),
                    spki,
                    wrapped,
                )
            if wrapped is not None:
                self._holders.setdefault(v.object_id, set()).add(dst_i)

    def _object_label(self, record: KeyRecord, version: int) -> str:
        return self.profile.object_label(record.name, version)


def _is_mac(job: VerifyJob) -> bool:
    """Whether ``job`` checks an HMAC key's MAC (on a token holding the secret)."""
    kt = algorithms.KEY_TYPES.get(job.key_type)
    return kt is not None and kt.family is algorithms.Family.HMAC and bool(job.candidates)


def _key_record(name: str, revision: int, value: bytes) -> KeyRecord | None:
    """The key record stored as ``name``; None for one of the daemon's own
    (no keypairs) or one this version cannot read (logged: it is copied as
    it is, without keypairs)."""
    if name.startswith(INTERNAL_RECORD_PREFIX):
        return None
    try:
        return KeyRecord.from_bytes(name, revision, value)
    except ValueError as exc:
        log.warning("a key record that cannot be read", extra={"key": name, "error": str(exc)})
        return None


#: What the service, the server and the gauges are given: one token's pool,
#: or several behind a set.
Tokens = TokenPool | TokenSet
