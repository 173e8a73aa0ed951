"""The operations that change keys: create_key, rotate, update_key, disable,
enable, destroy (one at a time, each re-reading the key from the token), with
their idempotency; and the daemon's own audit key."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import trio

from ..audit.log import AUDIT_KEY
from ..errors import (
    Conflict,
    DeletionNotAllowed,
    InternalError,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    UnsupportedAlgorithm,
)
from ..keys import algorithms
from ..keys.algorithms import KeyType
from ..keys.records import DESTROYED, DISABLED, ENABLED, KeyRecord, KeySettings, check_key_name
from ..keys.recordstore import Superseded
from ..keys.store import LoadedKey, load_key
from ..protocol import (
    CreateKeyArgs,
    DestroyArgs,
    KeyInfo,
    Message,
    Request,
    RotateArgs,
    UpdateKeyArgs,
    VersionRefArgs,
    check_idempotency_key,
)
from ..state import StateError
from .context import Batch, Reply
from .convert import key_info, request_settings, requested
from .lookup import Lookups

__all__ = ["Admin"]

log = logging.getLogger("signd.service")

#: What makes a new version's keypair on the token: ``(key type, key name,
#: version, backup) -> (CKA_ID, SPKI DER)``; ``Admin._generate`` by default,
#: an import's unwrap for ``import_key`` (``service/importing.py``).
Make = Callable[[KeyType, str, int, bool], Awaitable[tuple[bytes, bytes]]]

#: Random object ids drawn for a new keypair before giving up (ids the token
#: already uses are re-drawn; with 16-bit ids and ~1,000 objects, one in 65).
ID_DRAWS: Final = 8


class _Replay(Exception):
    """A create_key or rotate whose idempotency key made ``version`` already."""

    def __init__(self, record: KeyRecord, version: int) -> None:
        super().__init__(record.name, version)
        self.record = record
        self.version = version


class Admin(Lookups):
    """Changes to keys, under the admin lock."""

    def op_admin(self, req: Request, batch: Batch) -> None:
        """create_key, rotate, update_key, disable, enable, destroy: as a task."""
        batch.slow.append(partial(self._admin, req, batch.reply))

    async def _admin(self, req: Request, reply: Reply) -> None:
        try:
            # Shielded: a key half made must not be left behind by a cancel.
            with trio.CancelScope(shield=True):
                async with self._admin_lock:
                    key, made = await self._change(req.op, req.args)
            self._changed.set()
            info = self._with_mark(key_info(key))
            if made is not None:  # create_key, rotate: the version they made
                version, replayed = made
                info = dataclasses.replace(info, created_version=version)
                if req.op == "rotate" and not replayed:
                    self.metrics.rotated(key.record.name, "manual")
        except Exception as exc:
            self._fail(reply, req, exc)
            return
        self._answer(reply, req, info)

    async def _change(self, op: str, args: Message) -> tuple[LoadedKey, tuple[int, bool] | None]:
        """Run one admin operation (under the admin lock).

        Returns the key, and for create_key and rotate (version made, replayed).
        """
        if isinstance(args, CreateKeyArgs | RotateArgs):
            return await self._make_version(args)
        return await self._change_key(op, args), None

    async def _make_version(
        self, args: CreateKeyArgs | RotateArgs
    ) -> tuple[LoadedKey, tuple[int, bool]]:
        """create_key or rotate, answered again if its idempotency key made a version.

        The key is stored with the version, in the same compare-and-swap
        write of the key's record: a repeat (here, in another process on the
        token, or after a restart) finds it there.  If that write loses a race
        (``Conflict``), the winner may have been this very request, sent again
        to another process: the record is read once more before giving up.
        """
        name = check_key_name(args.key)
        idempotency = None
        if args.idempotency_key is not None:
            check_idempotency_key(args.idempotency_key)
            idempotency = (args.idempotency_key, requested(args))
        try:
            if isinstance(args, CreateKeyArgs):
                key = await self._create(args, idempotency)
            else:
                key = await self._rotate_request(name, idempotency)
        except _Replay as replay:
            return await self._replay(replay.record, replay.version, raced=False)
        except Conflict:
            if idempotency is None:
                raise
            record = await self._read_record(name)
            made = record.made_by(*idempotency) if record is not None else None
            if record is None or made is None:
                raise
            return await self._replay(record, made.version, raced=True)
        return key, (key.record.latest.version, False)

    async def _replay(
        self, record: KeyRecord, version: int, *, raced: bool
    ) -> tuple[LoadedKey, tuple[int, bool]]:
        """The answer to a request repeated under its idempotency key: nothing is done.

        ``raced``: the repeat was in progress here when the first one's write landed.
        """
        key = await self._store(record, None)
        log.info(
            "idempotent request repeated; answered again",
            extra={"key": record.name, "version": version, "raced": raced},
        )
        return key, (version, True)

    async def _rotate_request(self, name: str, idempotency: tuple[str, str] | None) -> LoadedKey:
        # Always from the token, never the cache: another process may have changed it.
        record = await self._read_record(name)
        if record is None:
            self.keystore.forget(name)
            raise KeyNotFound(f"no key named {name!r}")
        if idempotency is not None:
            made = record.made_by(*idempotency)
            if made is not None:
                raise _Replay(record, made.version)
        return await self._rotate(record, idempotency)

    async def _change_key(self, op: str, args: Message) -> LoadedKey:
        """update_key, disable, enable or destroy."""
        name = check_key_name(getattr(args, "key", ""))
        # Always from the token, never the cache: another process may have changed it.
        record = await self._read_record(name)
        if record is None:
            self.keystore.forget(name)
            raise KeyNotFound(f"no key named {name!r}")
        if isinstance(args, UpdateKeyArgs) and args.raise_mark is not None:
            await self._raise_mark(record, args.raise_mark)
        if isinstance(args, UpdateKeyArgs):
            # The rotation floor applies to a period being set, not to one set
            # before the floor was raised (that would block every other change).
            floor = self.min_rotate_period if args.auto_rotate_period is not None else 0.0
            # Likewise the limit: to a max_versions being set.
            limit = self.max_versions_limit if args.max_versions is not None else 1 << 62
            settings = request_settings(args, record.settings).check(
                record.latest.version, floor, limit
            )
            if settings == record.settings:
                return await self._store(record, None)
            return await self._store(record.with_settings(settings), "key settings changed")
        if isinstance(args, VersionRefArgs):
            return await self._set_state(
                record, args.version, DISABLED if op == "disable" else ENABLED
            )
        assert isinstance(args, DestroyArgs)
        if (args.version is None) == (args.all is not True):
            raise InvalidArgument("destroy: give exactly one of 'version' and 'all': true")
        return await self._destroy(record, args.version)

    async def _store(self, record: KeyRecord, what: str | None) -> LoadedKey:
        """Write ``record`` (a new revision) unless ``what`` is None; cache it."""
        if what is not None:
            await self.records.write_metadata(record.name, record.revision, record.to_bytes())
        key = await self._load(record)
        self.keystore.put(key)
        if what is not None:
            log.info(what, extra={"key": record.name, "revision": record.revision})
        return key

    async def _set_state(self, record: KeyRecord, version: int, state: str) -> LoadedKey:
        new = record.with_state([version], state)
        if new.versions == record.versions:
            return await self._store(record, None)  # already so: nothing to write
        verb = "disabled" if state == DISABLED else "enabled"
        return await self._store(new, f"key version {version} {verb}")

    async def _destroy(self, record: KeyRecord, version: int | None) -> LoadedKey:
        if not record.settings.deletion_allowed:
            raise DeletionNotAllowed(
                f"key {record.name!r} does not allow deletion; set deletion_allowed first "
                "(an admin operation)"
            )
        numbers = [v.version for v in record.versions] if version is None else [version]
        new = record.with_state(numbers, DESTROYED)
        if new.versions == record.versions:
            return await self._store(record, None)  # already destroyed (or being finished)
        # The record first: once it says destroyed the version never signs again,
        # and loading it deletes the private keys (see ``_load``).
        return await self._store(new, "key versions destroyed")

    async def _create(
        self,
        args: CreateKeyArgs,
        idempotency: tuple[str, str] | None = None,
        make: Make | None = None,
    ) -> LoadedKey:
        """Raises: _Replay when the key exists, made by this same request.

        ``make``: what makes the keypair (default: generated on the token)."""
        name = check_key_name(args.key)
        kt = algorithms.key_type(args.type)
        self.profile.check_key_name(name)
        settings = request_settings(args, KeySettings(backup=self.default_backup)).check(
            1, self.min_rotate_period, self.max_versions_limit
        )
        if settings.watermark and self.state is None:
            raise InvalidArgument(
                "a watermarked key needs the daemon's state directory, and this daemon has "
                "none: set [state] dir (OPERATIONS.md, 'The state directory')"
            )
        blobs = await self.token.load_metadata(name)
        if blobs:
            if idempotency is not None:
                try:
                    record = KeyRecord.from_bytes(name, blobs[0].revision, blobs[0].value)
                except ValueError:
                    pass  # whatever it is, the name is taken
                else:
                    made = record.made_by(*idempotency)
                    if made is not None:
                        raise _Replay(record, made.version)
            await self._refresh(name)
            raise KeyExists(f"a key named {name!r} already exists")
        object_id, spki = await (make or self._generate)(kt, name, 1, settings.backup)
        check = spki if kt.family is algorithms.Family.HMAC else None
        record = KeyRecord.new(name, kt, self._clock(), object_id, settings, idempotency, check)
        await self._write_new_version(record, object_id)
        key = load_key(record, {object_id: spki}, self._clock(), self._cap(record))
        self.keystore.put(key)
        log.info("key created", extra={"key": name, "type": kt.name})
        return key

    async def _rotate(
        self,
        record: KeyRecord,
        idempotency: tuple[str, str] | None = None,
        make: Make | None = None,
    ) -> LoadedKey:
        """Raises: DeletionNotAllowed (the key is at its ``max_versions`` and
        no version may be pruned: nothing was made).

        ``make``: what makes the keypair (default: generated on the token)."""
        kt = algorithms.key_type(record.type)
        # Retired versions make room (pruned in the same write); a full key
        # with none is refused before a keypair is made for it.
        prune = record.room_for_one_more(self._clock(), self._cap(record))
        # The new version exists on the token before any record points to it.
        object_id, spki = await (make or self._generate)(
            kt, record.name, record.next_version, record.settings.backup
        )
        check = spki if kt.family is algorithms.Family.HMAC else None
        record = record.rotated(self._clock(), object_id, idempotency, prune, check)
        await self._write_new_version(record, object_id)
        # Loading a record that says destroyed deletes the private keys, or
        # the next load does if a crash comes first (see ``_load``).
        key = await self._load(record)
        self.keystore.put(key)
        log.info("key rotated", extra={"key": record.name, "version": record.latest.version})
        if prune:
            log.info("retired versions pruned", extra={"key": record.name, "versions": prune})
        return key

    async def _generate(
        self, kt: KeyType, name: str, version: int, backup: bool = False
    ) -> tuple[bytes, bytes]:
        """A new keypair for ``name`` version ``version``: its CKA_ID and SPKI DER.

        ``backup``: its private key is exportable wrapped under the token's
        wrap key; the token is asked whether it can wrap it (a test wrap).

        Raises: UnsupportedAlgorithm (the token cannot make ``kt``, or not
        back it up), InvalidArgument (the label does not fit the token; or
        ``backup`` and the token has no wrap key).
        """
        info = self.token.info
        if info is not None and info.key_types.get(kt.name) is not None:
            can = [t for t, why in info.key_types.items() if why is None]
            raise UnsupportedAlgorithm(
                f"this token ({info.manufacturer} {info.model}) cannot make {kt.name} keys: "
                f"{info.key_types[kt.name]}; it can make: {', '.join(can) or 'none'}"
            )
        label = self.profile.object_label(name, version)
        for _ in range(ID_DRAWS - 1):
            object_id = self.profile.new_object_id()
            try:
                return object_id, await self.token.generate(kt.name, object_id, label, backup)
            except Conflict:  # the id is taken: short ids (YubiHSM: 16 bits) collide
                continue
        object_id = self.profile.new_object_id()
        return object_id, await self.token.generate(kt.name, object_id, label, backup)

    async def _write_new_version(self, record: KeyRecord, object_id: bytes) -> None:
        """Write a record that adds the keypair ``object_id``.

        Raises: Conflict, after deleting the keypair no record will ever name;
        Superseded (a Conflict), keeping it: a newer record may name it.
        """
        try:
            await self.records.write_metadata(record.name, record.revision, record.to_bytes())
        except Superseded:
            raise
        except Conflict:
            await self.token.destroy_keys(object_id, public=True)
            raise

    # ------------------------------------------------------------ watermarks

    def _with_mark(self, info: KeyInfo) -> KeyInfo:
        """``info`` with its key's mark, if it is watermarked and has one."""
        if info.watermark and self.state is not None:
            mark = self.state.mark(info.name)
            if mark is not None:
                return dataclasses.replace(info, mark=mark)
        return info

    async def _raise_mark(self, record: KeyRecord, position: int) -> None:
        """``update_key raise_mark``: the mark of the key at least
        ``position``, durably (an operator's fix after restoring an old bundle).

        Raises: InvalidArgument (not watermarked; no state), InternalError.
        """
        name = record.name
        if not record.settings.watermark:
            raise InvalidArgument(f"key {name!r} has no watermark: it has no mark to raise")
        if self.state is None:
            raise InvalidArgument("raise_mark needs the daemon's state directory ([state] dir)")
        try:
            raised = self.state.raise_mark(name, position)
            await self.state.commit()
        except StateError as exc:
            raise InternalError(str(exc)) from None
        if raised:
            log.info("watermark raised by hand", extra={"key": name, "mark": position})

    # ------------------------------------------------------------ the daemon's own key

    async def ensure_audit_key(self) -> LoadedKey:
        """The audit key, made on the token if it is not there yet (ec-p256, or
        rsa-2048 on a token without EC), the way ``create_key`` makes a key.

        Raises: WireError.
        """
        async with self._admin_lock:
            key = await self._refresh(AUDIT_KEY)
            if key is not None:
                return key
            info = self.token.info
            ec_ok = info is None or info.key_types.get("ec-p256") is None
            kt = algorithms.key_type("ec-p256" if ec_ok else "rsa-2048")
            object_id, spki = await self._generate(kt, AUDIT_KEY, 1)
            record = KeyRecord.new(AUDIT_KEY, kt, self._clock(), object_id, KeySettings())
            try:
                await self._write_new_version(record, object_id)
            except Conflict:  # another daemon on this token made it meanwhile
                key = await self._refresh(AUDIT_KEY)
                if key is None:
                    raise
                return key
            key = load_key(record, {object_id: spki}, self._clock())
            self.keystore.put(key)
            log.info("audit key created", extra={"key": AUDIT_KEY, "type": kt.name})
            return key

    def audit_key_version(self) -> int:
        """The audit key's version that signs now.  Raises: WireError."""
        key = self.keystore.get(AUDIT_KEY)
        return key.at(self._clock()).signing(None).record.version
