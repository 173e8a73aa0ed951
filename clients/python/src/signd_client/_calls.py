"""Every operation, defined once: what it sends and what it returns.

``Client`` and ``AsyncClient`` wrap these builders, so both have the same
typed methods without writing them twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import InvalidArgument
from .importing import WrappedMaterial
from .protocol import (
    OPS,
    BackupArgs,
    BackupResult,
    CreateKeyArgs,
    DestroyArgs,
    Empty,
    Health,
    ImportKeyArgs,
    ImportParamsArgs,
    ImportParamsResult,
    Jwks,
    JwksArgs,
    KeyInfo,
    KeyList,
    KeyRefArgs,
    Message,
    PublicKey,
    PublicKeyArgs,
    RestoreArgs,
    RestoreResult,
    Retry,
    RotateArgs,
    SignArgs,
    SignBatchArgs,
    SignBatchResult,
    SignResult,
    UpdateKeyArgs,
    VerifyArgs,
    VerifyResult,
    VersionRefArgs,
    Whoami,
    check_idempotency_key,
)

R = TypeVar("R", bound=Message)


@dataclass(frozen=True, slots=True)
class Call(Generic[R]):
    op: str
    args: Message
    result: type[R]

    @property
    def retry(self) -> Retry:
        """The op's retry class, from ``OPS``."""
        return OPS[self.op].retry

    @property
    def idempotent(self) -> bool:
        """Safe to send again: by its nature, or by the idempotency key it carries."""
        retry = self.retry
        return retry is Retry.SAFE or (retry is Retry.WITH_KEY and self.idempotency_key is not None)

    @property
    def idempotency_key(self) -> str | None:
        key = getattr(self.args, "idempotency_key", None)
        return key if isinstance(key, str) else None


def create_key(
    name: str,
    type: str,
    *,
    auto_rotate_period: float | None = None,
    verify_grace: float | None = None,
    deletion_allowed: bool | None = None,
    idempotency_key: str | None = None,
    max_versions: int | None = None,
    backup: bool | None = None,
    watermark: bool | None = None,
) -> Call[KeyInfo]:
    """Generate a new key on the token.  ``type``: ec-p256, ec-p384, ed25519,
    rsa-2048, rsa-3072 or rsa-4096.  The settings are those of ``update_key``.

    ``backup``: every version's private key is exportable wrapped under the
    token's wrap key (and nothing else), for ``signctl backup``; fixed for the
    key's life.  None: the daemon's ``[keys] backup`` default.  Refused with
    InvalidArgument when the token has no wrap key, and UnsupportedAlgorithm
    when the token cannot wrap this type (SoftHSM: Ed25519).

    ``watermark``: every ``sign`` must then carry a ``position`` above the
    highest signed so far (PROTOCOL.md, "Replay protection"); fixed for the
    key's life.

    ``idempotency_key``: sent again with the same key (and arguments), the
    call answers as the first did instead of raising KeyExists.  ``Client``
    and ``AsyncClient`` make one up when none is given, so their own retries
    after a lost answer are safe.

    Raises: KeyExists, InvalidArgument (also: the idempotency key was used with
    other arguments), UnsupportedAlgorithm, TokenError.
    """
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key)
    args = CreateKeyArgs(
        key=name,
        type=type,
        auto_rotate_period=auto_rotate_period,
        verify_grace=verify_grace,
        deletion_allowed=deletion_allowed,
        idempotency_key=idempotency_key,
        max_versions=max_versions,
        backup=backup,
        watermark=watermark,
    )
    return Call("create_key", args, KeyInfo)


def list_keys() -> Call[KeyList]:
    """List every key with its type and current version."""
    return Call("list_keys", Empty(), KeyList)


def key_info(name: str) -> Call[KeyInfo]:
    """A key's versions, their states, creation times and public keys.

    Raises: KeyNotFound.
    """
    return Call("key_info", KeyRefArgs(key=name), KeyInfo)


def public_key(name: str, version: int | None = None) -> Call[PublicKey]:
    """The PEM public key of the current version, or of ``version``.

    Raises: KeyNotFound, VersionNotFound.
    """
    return Call("public_key", PublicKeyArgs(key=name, version=version), PublicKey)


def jwks(names: Sequence[str]) -> Call[Jwks]:
    """A JWK Set of every version of ``names`` that may still verify.

    Raises: KeyNotFound (naming the first unknown key).
    """
    return Call("jwks", JwksArgs(keys=tuple(names)), Jwks)


def sign(
    name: str,
    message: bytes | None = None,
    *,
    digest: bytes | None = None,
    hash: str | None = None,
    padding: str | None = None,
    format: str | None = None,
    version: int | None = None,
    position: int | None = None,
) -> Call[SignResult]:
    """Sign ``message`` (hashed by the daemon) or a precomputed ``digest``.

    ``hash``: sha256, sha384 or sha512 (required with ``digest``).
    ``padding`` (RSA): pkcs1v15 (default) or pss.  ``format`` (ECDSA): der
    (default) or raw (r || s, as JOSE uses).  ``version``: sign with this
    version, which must be active; by default the newest.  ``position``: required
    on a watermarked key (and refused on others), above the key's mark.

    Raises: KeyNotFound, VersionNotFound, VersionNotUsable, InvalidDigest,
    InvalidArgument, UnsupportedAlgorithm, TokenUnavailable, Busy;
    PositionUsed (never retried: the position may have been signed).
    """
    args = SignArgs(
        key=name,
        message=message,
        digest=digest,
        hash=hash,
        padding=padding,
        format=format,
        version=version,
        position=position,
    )
    return Call("sign", args, SignResult)


def sign_batch(
    name: str,
    messages: Sequence[bytes] | None = None,
    *,
    digests: Sequence[bytes] | None = None,
    hash: str | None = None,
    padding: str | None = None,
    format: str | None = None,
    version: int | None = None,
    position: int | None = None,
) -> Call[SignBatchResult]:
    """Sign many messages, or many digests, with one key in one request.

    The options are those of ``sign`` and apply to every item.  Each item of
    ``results`` has its ``signature`` or its own ``error`` (e.g. a digest of
    the wrong length); the others are still signed.  ``position`` (a
    watermarked key): the first item's; item ``i`` has ``position + i``.

    Raises: KeyNotFound, InvalidArgument (no items, more than MAX_BATCH, or bad
    options), UnsupportedAlgorithm, Busy.
    """
    return Call(
        "sign_batch",
        SignBatchArgs(
            key=name,
            messages=None if messages is None else tuple(messages),
            digests=None if digests is None else tuple(digests),
            hash=hash,
            padding=padding,
            format=format,
            version=version,
            position=position,
        ),
        SignBatchResult,
    )


def verify(
    name: str,
    signature: bytes,
    message: bytes | None = None,
    *,
    digest: bytes | None = None,
    hash: str | None = None,
    padding: str | None = None,
    format: str | None = None,
    version: int | None = None,
    timestamp: int | None = None,
    nonce: bytes | None = None,
) -> Call[VerifyResult]:
    """Check a signature against ``version``, or every version allowed to verify.

    An invalid signature is an answer (``valid=False``), not an error.

    ``timestamp`` and ``nonce`` (both or neither): a replay-checked verify;
    the signature covers ``replay.signed_payload(message, timestamp, nonce)``
    and the answer's ``status`` is valid, invalid, replayed or stale.  A retry
    of one that was answered ``valid`` is ``replayed``.

    Raises: KeyNotFound, VersionNotFound, VersionNotUsable (a named version
    that may not verify), InvalidDigest, InvalidArgument.
    """
    return Call(
        "verify",
        VerifyArgs(
            key=name,
            signature=signature,
            message=message,
            digest=digest,
            hash=hash,
            padding=padding,
            format=format,
            version=version,
            timestamp=timestamp,
            nonce=nonce,
        ),
        VerifyResult,
    )


def rotate(name: str, *, idempotency_key: str | None = None) -> Call[KeyInfo]:
    """Add a new version and make it current; older versions keep verifying
    for the key's ``verify_grace``.  ``created_version`` of the answer is the
    new version.

    ``idempotency_key``: if a version of this key was made by a rotation with
    the same key, nothing is rotated and the answer names that version.
    ``Client`` and ``AsyncClient`` make one up when none is given, so their own
    retries after a lost answer cannot rotate twice.

    Raises: KeyNotFound, InvalidArgument, TokenError; DeletionNotAllowed when
    the key holds its ``max_versions`` versions and none is retired and
    deletable (nothing was made).
    """
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key)
    return Call("rotate", RotateArgs(key=name, idempotency_key=idempotency_key), KeyInfo)


def update_key(
    name: str,
    *,
    auto_rotate_period: float | None = None,
    verify_grace: float | None = None,
    min_sign_version: int | None = None,
    min_verify_version: int | None = None,
    deletion_allowed: bool | None = None,
    max_versions: int | None = None,
    raise_mark: int | None = None,
) -> Call[KeyInfo]:
    """Change a key's lifecycle settings; ``None`` keeps a setting as it is.

    Durations are seconds; 0 turns rotation off and lifts the grace limit.
    Versions: 0 is no minimum.  ``max_versions``: the most versions not
    destroyed the key may hold (0: the daemon's default); with
    ``deletion_allowed``, retired versions are destroyed to keep under it.
    ``raise_mark``: a watermarked key's mark goes up to it (never down).

    Raises: KeyNotFound, InvalidArgument (naming the setting).
    """
    args = UpdateKeyArgs(
        key=name,
        auto_rotate_period=auto_rotate_period,
        verify_grace=verify_grace,
        min_sign_version=min_sign_version,
        min_verify_version=min_verify_version,
        deletion_allowed=deletion_allowed,
        max_versions=max_versions,
        raise_mark=raise_mark,
    )
    return Call("update_key", args, KeyInfo)


def disable(name: str, version: int) -> Call[KeyInfo]:
    """Stop ``version`` signing and verifying, from the next request on; reversible.

    Raises: KeyNotFound, VersionNotFound, VersionNotUsable (destroyed).
    """
    return Call("disable", VersionRefArgs(key=name, version=version), KeyInfo)


def enable(name: str, version: int) -> Call[KeyInfo]:
    """Undo ``disable``.

    Raises: KeyNotFound, VersionNotFound, VersionNotUsable (destroyed).
    """
    return Call("enable", VersionRefArgs(key=name, version=version), KeyInfo)


def destroy(name: str, version: int | None = None, *, all: bool = False) -> Call[KeyInfo]:
    """Delete the private key of ``version``, or with ``all=True`` of every
    version, from the token, for good.  Public keys stay.  Only when the key's
    ``deletion_allowed`` is set.

    Raises: KeyNotFound, VersionNotFound, DeletionNotAllowed, InvalidArgument
    (neither or both of ``version`` and ``all``).
    """
    if (version is None) != all:
        raise InvalidArgument("destroy: give exactly one of version and all=True")
    return Call("destroy", DestroyArgs(key=name, version=version, all=all or None), KeyInfo)


def health() -> Call[Health]:
    """Liveness and readiness of the daemon and its token."""
    return Call("health", Empty(), Health)


def whoami() -> Call[Whoami]:
    """Who the daemon takes this process to be (uid, gid, groups, user name),
    and every key it may use with the verbs it has on each: what to look at
    when a call is refused with PermissionDenied.
    """
    return Call("whoami", Empty(), Whoami)


def backup(names: Sequence[str] | None = None) -> Call[BackupResult]:
    """A backup bundle of the backup-able keys named, or of every one (keys
    made without ``backup`` are then listed in ``skipped``).  Needs the
    ``admin`` verb on every key in it.  Write ``bundle`` to a file; see
    ``BACKUP.md``.

    Raises: PermissionDenied, KeyNotFound, InvalidArgument (a named key is
    not backup-able; the token has no wrap key).
    """
    keys = tuple(names) if names is not None else None
    return Call("backup", BackupArgs(keys=keys), BackupResult)


def restore(
    name: str,
    header: bytes,
    header_mac: bytes,
    entry: bytes,
    entry_mac: bytes,
    *,
    check: bool = False,
) -> Call[RestoreResult]:
    """Restore one key from a bundle's entry (``bundle.restore_calls`` makes
    these from a file).  ``check``: only say what would be done.

    Raises: InvalidArgument (a changed or damaged bundle; another wrap key),
    KeyExists (the token holds another key under the name), Conflict.
    """
    args = RestoreArgs(
        key=name,
        header=header,
        header_mac=header_mac,
        entry=entry,
        entry_mac=entry_mac,
        check=check or None,
    )
    return Call("restore", args, RestoreResult)


def import_params(name: str) -> Call[ImportParamsResult]:
    """The import key to wrap material under for ``import_key`` of key ``name``
    (``importing.wrap_for_import`` does it): its SubjectPublicKeyInfo DER, its
    id (the SHA-256 of that) and the wrapping algorithm.  Needs the ``import``
    verb on ``name``; the token makes its import key on first need.

    Raises: PermissionDenied, InvalidArgument, TokenUnavailable.
    """
    return Call("import_params", ImportParamsArgs(key=name), ImportParamsResult)


def import_key(
    name: str,
    type: str,
    wrapped: WrappedMaterial | None = None,
    *,
    import_key_id: str | None = None,
    wrapped_key: bytes | None = None,
    wrapped_material: bytes | None = None,
    public_key: bytes | None = None,
    new_version: bool = False,
    auto_rotate_period: float | None = None,
    verify_grace: float | None = None,
    deletion_allowed: bool | None = None,
    max_versions: int | None = None,
    backup: bool | None = None,
    idempotency_key: str | None = None,
) -> Call[KeyInfo]:
    """Bring existing key material onto the token (BYOK): ``wrapped`` is
    ``importing.wrap_for_import(client.import_params(name), material)``.

    A new key ``name`` of ``type`` (ec-p256, ec-p384, ec-secp256k1,
    rsa-2048/3072/4096, hmac-sha256/384/512),
    with the settings of ``create_key``; or with ``new_version`` the next
    version of the existing key ``name`` (of that type), as a rotation to the
    imported material (it keeps its key's settings).  ``created_version`` of
    the answer is the version made.  ``idempotency_key``: as for
    ``create_key`` (``Client`` makes one up when none is given).

    Instead of ``wrapped``, its fields may be given one by one
    (``import_key_id``, ``wrapped_key``, ``wrapped_material``, ``public_key``).

    Raises: InvalidArgument (material that is not a ``type`` key or does not
    match its public key, a damaged wrap, an import key this token does not
    hold), UnsupportedAlgorithm (a type that cannot be imported), KeyExists,
    KeyNotFound (``new_version`` of no key), PermissionDenied (no ``import``
    verb), TokenError.
    """
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key)
    if wrapped is None:
        if import_key_id is None or wrapped_key is None or wrapped_material is None:
            raise InvalidArgument(
                "import_key: give wrapped (importing.wrap_for_import), or import_key_id, "
                "wrapped_key and wrapped_material"
            )
        wrapped = WrappedMaterial(import_key_id, wrapped_key, wrapped_material, public_key)
    elif (import_key_id, wrapped_key, wrapped_material, public_key) != (None,) * 4:
        raise InvalidArgument("import_key: give wrapped or its fields, not both")
    args = ImportKeyArgs(
        key=name,
        type=type,
        import_key_id=wrapped.import_key_id,
        wrapped_key=wrapped.wrapped_key,
        wrapped_material=wrapped.wrapped_material,
        public_key=wrapped.public_key,
        new_version=new_version or None,
        auto_rotate_period=auto_rotate_period,
        verify_grace=verify_grace,
        deletion_allowed=deletion_allowed,
        max_versions=max_versions,
        backup=backup,
        idempotency_key=idempotency_key,
    )
    return Call("import_key", args, KeyInfo)
