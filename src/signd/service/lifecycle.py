"""The lifecycle task: scheduled rotations, pruning of retired versions, and
the cache kept in step with the token."""

from __future__ import annotations

import logging

import trio

from ..errors import Conflict, DeletionNotAllowed, WireError
from ..keys.records import DESTROYED, KeyRecord
from .importing import Imports
from .lookup import INTERNAL_RECORD_PREFIX

__all__ = ["Lifecycle"]

log = logging.getLogger("signd.service")


class Lifecycle(Imports):
    """What the daemon does to keys on its own."""

    async def run_lifecycle(self) -> None:
        """Rotate keys on schedule, prune retired versions, and keep the cache
        in step with the token.

        Every ``sync_interval`` the key records are re-read from the token, so
        a change made by another process sharing it (a second daemon, an
        operator's tool) takes effect here too, and the retired versions of
        keys that allow deletion are destroyed.  Runs until cancelled.
        """
        while True:
            due = [
                (t, k.record.name)
                for k in self.keystore.all()
                if (t := k.record.next_rotation(self.min_rotate_period)) is not None
                # refused for max_versions: not again until the record changes
                and self._rotation_refused.get(k.record.name) != k.record.revision
            ]
            wake = min([self._clock() + self.sync_interval, *(t for t, _ in due)])
            self._changed = trio.Event()
            with trio.move_on_after(max(0.0, wake - self._clock())):
                await self._changed.wait()
            try:
                await self._sync()
                for _, name in due:
                    try:
                        await self._rotate_if_due(name)
                    except Conflict:  # another daemon rotated it: the next sync sees that
                        log.info("key rotated elsewhere meanwhile", extra={"key": name})
                await self._prune_retired()
            except WireError as exc:  # the token is away: try again a little later
                log.warning("key lifecycle pass failed", extra={"error": str(exc)})
                await trio.sleep(self.sync_interval)
            except Exception:
                log.exception("key lifecycle pass failed")
                await trio.sleep(self.sync_interval)

    async def _sync(self) -> None:
        """Re-read every key record; reload the keys whose revision moved."""
        for blob in await self.token.load_metadata():
            if blob.name.startswith(INTERNAL_RECORD_PREFIX):
                continue
            cached = self.keystore.get_or_none(blob.name)
            if cached is not None and cached.record.revision >= blob.revision:
                continue  # (older: read before a change made here meanwhile)
            async with self._admin_lock:
                try:
                    record = KeyRecord.from_bytes(blob.name, blob.revision, blob.value)
                    self.keystore.put(await self._load(record))
                except ValueError as exc:
                    log.error("skipping key", extra={"key": blob.name, "error": str(exc)})

    async def _rotate_if_due(self, name: str) -> None:
        with trio.CancelScope(shield=True):
            async with self._admin_lock:
                record = await self._read_record(name)  # fresh: another process may have
                due = record.next_rotation(self.min_rotate_period) if record else None
                if record is None or due is None or due > self._clock():
                    return
                try:
                    key = await self._rotate(record)
                except DeletionNotAllowed as exc:  # full: max_versions, nothing to prune
                    self._rotation_refused[name] = record.revision
                    self.metrics.error("rotate", exc)
                    log.error("scheduled rotation refused", extra={"key": name, "error": str(exc)})
                    return
        self._rotation_refused.pop(name, None)
        self.metrics.rotated(name, "scheduled")
        log.info(
            "key rotated on schedule", extra={"key": name, "version": key.record.latest.version}
        )
        if self.on_auto_rotate is not None:
            await self.on_auto_rotate(key)

    async def _prune_retired(self) -> None:
        """Destroy the retired versions of every key that allows deletion."""
        now = self._clock()
        for name in [k.record.name for k in self.keystore.all() if k.record.prunable(now)]:
            try:
                await self._prune(name)
            except Conflict:  # another process changed it: the next pass looks again
                log.info("key changed elsewhere while pruning", extra={"key": name})

    async def _prune(self, name: str) -> None:
        """Destroy ``name``'s retired versions, if it allows deletion: the
        record first, then the private keys (as ``destroy`` does, so a crash
        in between is finished on the next load)."""
        with trio.CancelScope(shield=True):
            async with self._admin_lock:
                record = await self._read_record(name)  # fresh: another process may have
                prune = record.prunable(self._clock()) if record is not None else []
                if record is None or not prune:
                    return
                new = record.with_state(prune, DESTROYED)
                key = await self._store(new, "retired versions pruned")
        log.info("retired versions pruned", extra={"key": name, "versions": prune})
        if self.on_auto_prune is not None:
            await self.on_auto_prune(key, prune)
