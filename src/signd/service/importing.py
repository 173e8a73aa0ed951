"""import_params and import_key: bringing an existing key onto the token (BYOK).

The client wraps the material under the token's import key
(``token/importing.py`` has the two layers); the token unwraps it straight
into a sensitive object.  The key record is written as ``create_key`` and
``rotate`` write theirs (``Admin._create``, ``Admin._rotate``: one
compare-and-swap write after the keypair is on the token, the idempotency
key kept with the version), only the keypair is unwrapped instead of
generated.  Both ops run under the admin lock, as key changes do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from functools import partial

import trio

from ..errors import Conflict, InvalidArgument, KeyNotFound, UnsupportedAlgorithm
from ..keys import algorithms
from ..keys.algorithms import Family, KeyType
from ..keys.records import KeyRecord, KeySettings, check_key_name, request_digest
from ..keys.store import LoadedKey
from ..protocol import (
    IMPORT_ALGORITHM,
    CreateKeyArgs,
    ImportKeyArgs,
    ImportParamsArgs,
    ImportParamsResult,
    Request,
    check_idempotency_key,
)
from .admin import ID_DRAWS, Admin, Make, _Replay
from .context import Batch, Reply
from .convert import key_info, request_settings

__all__ = ["IMPORTABLE", "Imports"]

log = logging.getLogger("signd.service")

#: The key families whose material can be imported.  Ed25519 is not: SoftHSM
#: 2.6.1 cannot unwrap Ed25519 private keys (FIELD-NOTES).
IMPORTABLE = frozenset({Family.EC, Family.RSA, Family.HMAC})
#: The most bytes an imported HMAC secret may have.
MAX_SECRET_WRAPPED = 1024 + 8
#: The settings a new key takes, which a new version takes from its key.
_SETTINGS = ("auto_rotate_period", "verify_grace", "deletion_allowed", "max_versions", "backup")


class Imports(Admin):
    """import_params and import_key (admin operations, one at a time)."""

    def op_import_params(self, req: Request, batch: Batch) -> None:
        batch.slow.append(partial(self._import_params, req, batch.reply))

    def op_import_key(self, req: Request, batch: Batch) -> None:
        batch.slow.append(partial(self._import_key, req, batch.reply))

    async def _import_params(self, req: Request, reply: Reply) -> None:
        assert isinstance(req.args, ImportParamsArgs)
        try:
            check_key_name(req.args.key)
            # Under the admin lock: the import key is made on first need, once.
            with trio.CancelScope(shield=True):
                async with self._admin_lock:
                    spki, key_id = await self.token.import_public()
        except Exception as exc:
            self._fail(reply, req, exc)
            return
        result = ImportParamsResult(
            algorithm=IMPORT_ALGORITHM, import_key_id=key_id, public_key=spki
        )
        self._answer(reply, req, result)

    async def _import_key(self, req: Request, reply: Reply) -> None:
        assert isinstance(req.args, ImportKeyArgs)
        try:
            # Shielded: a keypair half imported must not be left behind by a cancel.
            with trio.CancelScope(shield=True):
                async with self._admin_lock:
                    key, version = await self._import_version(req.args)
            self._changed.set()
            info = dataclasses.replace(key_info(key), created_version=version)
        except Exception as exc:
            self._fail(reply, req, exc)
            return
        self._answer(reply, req, info)

    async def _import_version(self, args: ImportKeyArgs) -> tuple[LoadedKey, int]:
        """A new key, or a new version of one, from the request's material;
        answered again (nothing done) when its idempotency key made a version.

        Returns the key and the version made.

        Raises: InvalidArgument (see ``_check_request`` and
        ``TokenSession.import_keypair``), UnsupportedAlgorithm, KeyExists,
        KeyNotFound, Conflict, TokenError.
        """
        name = check_key_name(args.key)
        kt = algorithms.key_type(args.type)
        _check_request(kt, args)
        idempotency = None
        if args.idempotency_key is not None:
            check_idempotency_key(args.idempotency_key)
            idempotency = (args.idempotency_key, _requested(args))
        make: Make = partial(self._unwrap_material, args)
        try:
            if args.new_version:
                key = await self._import_rotation(name, kt, idempotency, make)
            else:
                create = CreateKeyArgs(
                    key=name, type=kt.name, **{f: getattr(args, f) for f in _SETTINGS}
                )
                key = await self._create(create, idempotency, make)
        except _Replay as replay:
            key, (version, _) = await self._replay(replay.record, replay.version, raced=False)
            return key, version
        except Conflict:
            if idempotency is None:
                raise
            record = await self._read_record(name)
            made = record.made_by(*idempotency) if record is not None else None
            if record is None or made is None:
                raise
            key, (version, _) = await self._replay(record, made.version, raced=True)
            return key, version
        version = key.record.latest.version
        log.info(
            "key material imported",
            extra={"key": name, "type": kt.name, "version": version},
        )
        return key, version

    async def _import_rotation(
        self,
        name: str,
        kt: KeyType,
        idempotency: tuple[str, str] | None,
        make: Make,
    ) -> LoadedKey:
        """The imported material as the next version of ``name``, as ``rotate`` adds one.

        Raises: _Replay, KeyNotFound, InvalidArgument (the key is of another type).
        """
        # Always from the token, never the cache: another process may have changed it.
        record: KeyRecord | None = await self._read_record(name)
        if record is None:
            self.keystore.forget(name)
            raise KeyNotFound(f"no key named {name!r}: import it without new_version first")
        if idempotency is not None:
            made = record.made_by(*idempotency)
            if made is not None:
                raise _Replay(record, made.version)
        if record.type != kt.name:
            raise InvalidArgument(
                f"key {name!r} is {record.type}, not {kt.name}: a new version is of the key's type"
            )
        return await self._rotate(record, idempotency, make)

    async def _unwrap_material(
        self, args: ImportKeyArgs, kt: KeyType, name: str, version: int, backup: bool
    ) -> tuple[bytes, bytes]:
        """``Admin.Make`` for an import: the keypair unwrapped onto the token
        under a fresh object id; its CKA_ID and SPKI DER.

        Raises: UnsupportedAlgorithm (the token cannot hold ``kt``), and as
        ``TokenSession.import_keypair``.
        """
        info = self.token.info
        if info is not None and info.key_types.get(kt.name) is not None:
            raise UnsupportedAlgorithm(
                f"this token ({info.manufacturer} {info.model}) cannot hold {kt.name} keys: "
                f"{info.key_types[kt.name]}"
            )
        label = self.profile.object_label(name, version)
        for draw in range(ID_DRAWS):
            object_id = self.profile.new_object_id()
            try:
                spki = await self.token.import_keypair(
                    kt.name,
                    object_id,
                    label,
                    args.import_key_id,
                    args.wrapped_key,
                    args.wrapped_material,
                    args.public_key or b"",  # none for an HMAC secret
                    backup,
                )
            except Conflict:  # the id is taken: short ids (YubiHSM: 16 bits) collide
                if draw == ID_DRAWS - 1:
                    raise
                continue
            return object_id, spki
        raise AssertionError("unreachable")  # pragma: no cover


def _check_request(kt: KeyType, args: ImportKeyArgs) -> None:
    """Raises: UnsupportedAlgorithm (a type that cannot be imported);
    InvalidArgument (no public key for an asymmetric type; settings with
    ``new_version``)."""
    if kt.family not in IMPORTABLE:
        raise UnsupportedAlgorithm(
            f"{kt.name} keys cannot be imported (the token cannot unwrap them); importable: "
            + ", ".join(
                t for t in algorithms.KEY_TYPES if algorithms.key_type(t).family in IMPORTABLE
            )
        )
    if kt.family is Family.HMAC:
        if args.public_key is not None:
            raise InvalidArgument(f"field 'public_key': a {kt.name} secret has no public key")
        if len(args.wrapped_material) > MAX_SECRET_WRAPPED:
            raise InvalidArgument(
                f"field 'wrapped_material': an HMAC secret is at most {MAX_SECRET_WRAPPED - 8} "
                "bytes"
            )
    elif args.public_key is None:
        raise InvalidArgument(f"field 'public_key': a {kt.name} import needs the public key")
    if args.new_version:
        given = [f for f in _SETTINGS if getattr(args, f) is not None]
        if given:
            raise InvalidArgument(
                f"field {given[0]!r}: a new version takes its key's settings "
                "(change them with update_key)"
            )


def _requested(args: ImportKeyArgs) -> str:
    """What an import asks, for telling a repeat from a reuse of its
    idempotency key: the type, new key or version, the settings, and which
    material (its public key, else the wrapped material)."""
    material = args.public_key if args.public_key is not None else args.wrapped_material
    settings = (
        None
        if args.new_version
        else request_settings(
            CreateKeyArgs(key=args.key, type=args.type, **{f: getattr(args, f) for f in _SETTINGS}),
            KeySettings(),
        ).to_json()
    )
    return request_digest(
        "import_key",
        type=args.type,
        new_version=bool(args.new_version),
        settings=settings,
        material=hashlib.sha256(material).hexdigest(),
    )
