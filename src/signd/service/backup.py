"""backup and restore: backup-able keys out to a bundle, and back onto a token.

The bundle's format is in ``keys/bundle.py`` (and ``BACKUP.md``); the token
wraps, unwraps and computes the bundle's MACs.  Both run under the admin
lock, as key changes do: a backup sees each key at one revision, and a
restore is one compare-and-swap write per key, made after its keypairs are
on the token (as ``create_key`` and ``rotate`` make theirs).
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import Final

import trio

from ..access.policy import Principal
from ..errors import (
    Conflict,
    InternalError,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    TokenError,
)
from ..keys.bundle import (
    MAX_BUNDLE_BYTES,
    BundleError,
    Entry,
    Header,
    VersionBlob,
    decode_entry,
    decode_header,
    encode_bundle,
    entry_mac_input,
    header_mac_input,
)
from ..keys.records import DESTROYED, KeyRecord, check_key_name
from ..keys.recordstore import Superseded
from ..protocol import BackupArgs, BackupResult, Request, RestoreArgs, RestoreResult
from ..state import StateError
from .admin import ID_DRAWS
from .base import RESERVED_KEYS
from .context import Batch, Reply
from .lifecycle import Lifecycle
from .lookup import INTERNAL_RECORD_PREFIX

__all__ = ["Backups"]

log = logging.getLogger("signd.service")

CREATED: Final = "created"
UPDATED: Final = "updated"
UNCHANGED: Final = "unchanged"


class Backups(Lifecycle):
    """backup and restore (admin operations, one at a time with key changes)."""

    def op_backup(self, req: Request, batch: Batch) -> None:
        batch.slow.append(partial(self._backup, req, batch.who, batch.reply))

    def op_restore(self, req: Request, batch: Batch) -> None:
        batch.slow.append(partial(self._restore, req, batch.reply))

    # ------------------------------------------------------------ backup

    async def _backup(self, req: Request, who: Principal, reply: Reply) -> None:
        assert isinstance(req.args, BackupArgs)
        try:
            async with self._admin_lock:
                result = await self._make_bundle(req.args, who)
        except Exception as exc:
            self._fail(reply, req, exc)
            return
        log.info(
            "backup bundle made",
            extra={"keys": len(result.keys), "versions": result.versions, "by": who.uid},
        )
        self._answer(reply, req, result)

    async def _make_bundle(self, args: BackupArgs, who: Principal) -> BackupResult:
        """Raises: PermissionDenied (a key the caller may not ``admin``),
        KeyNotFound, InvalidArgument (a named key that is not backup-able; no
        wrap key or backup MAC key; too big), TokenError."""
        named = args.keys is not None
        if args.keys is not None:
            names = sorted({check_key_name(n) for n in args.keys})
        else:
            names = sorted(
                b.name
                for b in await self.token.load_metadata()
                # the daemon's own records, and its audit key (each token's daemon
                # makes its own: OPERATIONS.md section 13)
                if not b.name.startswith(INTERNAL_RECORD_PREFIX) and b.name not in RESERVED_KEYS
            )
        for name in names:  # every key first: a refusal names the key, and nothing is wrapped
            self.policy.check(who, "admin", name)
        records: list[KeyRecord] = []
        skipped: list[str] = []
        for name in names:
            record = await self._read_record(name)
            if record is None:
                if named:
                    raise KeyNotFound(f"no key named {name!r}")
                continue  # deleted since the listing
            if not record.settings.backup:
                if named:
                    raise InvalidArgument(
                        f"key {name!r} is not backup-able: its private keys were made "
                        "non-extractable (create_key without backup) and no wrap key can "
                        "export them"
                    )
                skipped.append(name)
                continue
            records.append(record)
        check_value = await self.token.wrap_check_value()
        if check_value is None:
            raise InvalidArgument(
                "the token has no wrap key check value: run the wrap key ceremony "
                "('signd wrap-key create', or 'import' with its shares) first"
            )
        entries = [await self._entry(record) for record in records]
        info = self.token.info
        source = (
            (info.label, info.manufacturer, info.model, info.serial) if info else ("", "", "", "")
        )
        header = Header(self._clock(), check_value, len(entries), source).encode()
        header_mac = await self.token.backup_mac(header_mac_input(header))
        macs = [await self.token.backup_mac(entry_mac_input(header, e)) for e in entries]
        bundle = encode_bundle(header, header_mac, list(zip(entries, macs, strict=True)))
        if len(bundle) > MAX_BUNDLE_BYTES:
            raise InvalidArgument(
                f"the bundle would be {len(bundle)} bytes, over {MAX_BUNDLE_BYTES}: back up "
                "fewer keys at a time (name them)"
            )
        return BackupResult(
            bundle=bundle,
            keys=tuple(r.name for r in records),
            versions=sum(len(r.versions) for r in records),
            skipped=tuple(skipped),
        )

    async def _entry(self, record: KeyRecord) -> bytes:
        """One key's entry: each version's public key, and its private key
        wrapped (none for a destroyed version)."""
        public = await self.token.public_keys([v.object_id for v in record.versions])
        blobs = []
        for v in record.versions:
            spki, has_private = public.get(v.object_id, (None, False))
            if spki is None and v.state == DESTROYED and v.check is not None:
                spki = v.check  # a destroyed HMAC version: nothing left on the token
            if spki is None or (v.state != DESTROYED and not has_private):
                raise TokenError(
                    f"key {record.name!r} version {v.version}: its keypair is missing on "
                    "the token; see OPERATIONS.md, 'A key record names a missing keypair'"
                )
            wrapped = None if v.state == DESTROYED else await self.token.wrap_private(v.object_id)
            blobs.append(VersionBlob(v.version, spki, wrapped))
        mark = None
        if record.settings.watermark and self.state is not None:
            mark = self.state.mark(record.name)
        return Entry(record, tuple(blobs), mark).encode()

    # ------------------------------------------------------------ restore

    async def _restore(self, req: Request, reply: Reply) -> None:
        assert isinstance(req.args, RestoreArgs)
        try:
            # Shielded: keypairs half restored must not be left behind by a cancel.
            with trio.CancelScope(shield=True):
                async with self._admin_lock:
                    result = await self._restore_key(req.args)
            if result.restored and not req.args.check:
                self._changed.set()
        except Exception as exc:
            self._fail(reply, req, exc)
            return
        self._answer(reply, req, result)

    async def _restore_key(self, args: RestoreArgs) -> RestoreResult:
        """Raises: InvalidArgument (a damaged or changed bundle, another wrap
        key, an entry for another key), KeyExists (the token holds another key
        under this name), Conflict (another process changed the key meanwhile:
        nothing was written), UnsupportedAlgorithm, TokenError."""
        entry = await self._checked_entry(args)
        name = entry.name
        self.profile.check_key_name(name)
        if entry.mark is not None and not args.check:
            await self._restore_mark(name, entry.mark)
        current = await self._read_key(name, finish=False)
        held = {n: v.spki for n, v in current.versions.items()} if current is not None else {}
        blobs = {v.version: v for v in entry.versions}
        for number, spki in held.items():
            # Versions are never dropped from a record: one the bundle lacks is
            # newer than the bundle (fine); one it has must be the same keypair.
            if number in blobs and blobs[number].public_key != spki:
                raise KeyExists(
                    f"the token holds another key named {name!r}: its version {number} is "
                    "not the bundle's; restore never mixes two keys under one name"
                )
        present = tuple(sorted(n for n in held if n in blobs))
        if current is not None and current.record.latest.version >= entry.record.latest.version:
            return RestoreResult(key=name, outcome=UNCHANGED, restored=(), present=present)
        missing = [v for v in entry.versions if v.version not in held]
        outcome = CREATED if current is None else UPDATED
        restored = tuple(v.version for v in missing)
        if args.check:
            return RestoreResult(key=name, outcome=outcome, restored=restored, present=present)
        ids: dict[int, bytes] = {}
        if current is not None:
            ids = {v.version: v.object_id for v in current.record.versions}
        made: list[bytes] = []
        try:
            for blob in missing:
                wanted = entry.record.versions[entry.versions.index(blob)].object_id
                ids[blob.version] = await self._restore_keypair(entry, blob, wanted)
                made.append(ids[blob.version])
            revision = 1 if current is None else current.record.revision + 1
            versions = tuple(
                dataclasses.replace(v, object_id=ids[v.version]) for v in entry.record.versions
            )
            record = dataclasses.replace(entry.record, versions=versions, revision=revision)
            await self.records.write_metadata(name, record.revision, record.to_bytes())
        except Superseded:
            raise  # a newer record may name them: kept
        except BaseException:
            for object_id in made:
                await self.token.destroy_keys(object_id, public=True)
            raise
        key = await self._load(record)
        self.keystore.put(key)
        log.info(
            "key restored from a backup",
            extra={"key": name, "outcome": outcome, "versions": list(restored)},
        )
        return RestoreResult(key=name, outcome=outcome, restored=restored, present=present)

    async def _restore_mark(self, name: str, mark: int) -> None:
        """The bundle's mark for ``name``, if above the one held here, durably
        (first: whatever the restore does next, no position it names signs).

        Raises: InternalError (the journal failed).
        """
        if self.state is None:
            log.warning(
                "a watermarked key restored on a daemon without a state directory: it "
                "cannot sign here",
                extra={"key": name},
            )
            return
        try:
            if self.state.raise_mark(name, mark):
                await self.state.commit()
                log.info("watermark raised from a backup bundle", extra={"key": name, "mark": mark})
        except StateError as exc:
            raise InternalError(str(exc)) from None

    async def _checked_entry(self, args: RestoreArgs) -> Entry:
        """The request's entry, once the token has checked both MACs.

        Raises: InvalidArgument.
        """
        check_key_name(args.key)
        try:
            header = decode_header(args.header)
        except BundleError as exc:
            raise InvalidArgument(f"the bundle's header: {exc.message}") from None
        ok = await self.token.verify_backup_mac(header_mac_input(args.header), args.header_mac)
        ok = ok and await self.token.verify_backup_mac(
            entry_mac_input(args.header, args.entry), args.entry_mac
        )
        if not ok:
            held = await self.token.wrap_check_value()
            if held is not None and held != header.wrap_key:
                raise InvalidArgument(
                    f"the bundle was made under wrap key {header.wrap_key}, this token holds "
                    f"wrap key {held}: put that wrap key on this token first ('signd wrap-key "
                    "import' with its shares); nothing was written"
                )
            raise InvalidArgument(
                "the bundle does not verify under this token's backup key: it was changed "
                "or damaged after it was made; nothing was written"
            )
        entry = decode_entry(args.entry)
        if entry.name != args.key:
            raise InvalidArgument(f"the entry is for key {entry.name!r}, not {args.key!r}")
        return entry

    async def _restore_keypair(self, entry: Entry, blob: VersionBlob, wanted: bytes) -> bytes:
        """Put one version's keypair on the token, under its old object id if
        that is free here; returns the id used."""
        label = self.profile.object_label(entry.name, blob.version)
        object_id = wanted
        for _ in range(ID_DRAWS):
            try:
                await self.token.restore_keypair(
                    entry.record.type, object_id, label, blob.public_key, blob.wrapped
                )
            except Conflict:  # the id is taken here
                object_id = self.profile.new_object_id()
                continue
            return object_id
        raise Conflict(f"no free object id found for {entry.name!r} version {blob.version}")
