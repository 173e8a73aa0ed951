"""Every message of signd's wire protocol: the arguments and results of each op.

``protocol`` re-exports them all, and its ``OPS`` table says which op takes
and answers which; ``PROTOCOL.md`` describes each field.
"""

from __future__ import annotations

from typing import Annotated, Final

from ._codec import Between, Message, message

__all__ = [
    "MAX_POSITION",
    "MAX_VERSION",
    "AuditHead",
    "BackupArgs",
    "BackupResult",
    "BatchItem",
    "CreateKeyArgs",
    "DestroyArgs",
    "Empty",
    "ErrorInfo",
    "Health",
    "ImportKeyArgs",
    "ImportParamsArgs",
    "ImportParamsResult",
    "Jwk",
    "Jwks",
    "JwksArgs",
    "KeyGrant",
    "KeyInfo",
    "KeyList",
    "KeyRefArgs",
    "KeySummary",
    "Position",
    "PublicKey",
    "PublicKeyArgs",
    "RestoreArgs",
    "RestoreResult",
    "RotateArgs",
    "SignArgs",
    "SignBatchArgs",
    "SignBatchResult",
    "SignResult",
    "TokenStatus",
    "UpdateKeyArgs",
    "VerifyArgs",
    "VerifyResult",
    "VersionInfo",
    "VersionNumber",
    "VersionRefArgs",
    "VersionSetting",
    "Whoami",
]

#: Highest key version a request may name: versions count from 1 by one per
#: rotation, and stay within a signed 32-bit integer.
MAX_VERSION: Final = (1 << 31) - 1
#: A version a request names: 1 to ``MAX_VERSION``.
VersionNumber = Annotated[int, Between(1, MAX_VERSION)]
#: A version setting (``min_sign_version``...): 0 (off) to ``MAX_VERSION``.
VersionSetting = Annotated[int, Between(0, MAX_VERSION)]
#: Highest watermark position (and replay timestamp): an unsigned 64-bit integer.
MAX_POSITION: Final = (1 << 64) - 1
#: A watermark position or a replay timestamp: 0 to ``MAX_POSITION``.
Position = Annotated[int, Between(0, MAX_POSITION)]


# ---- arguments ----


@message
class Empty(Message):
    """No arguments, or no result fields."""


@message
class CreateKeyArgs(Message):
    """A new key; the settings are those of ``UpdateKeyArgs`` (off when absent).

    ``idempotency_key``: sent again with the same key, the request answers as
    the first one did instead of failing with ``key_exists``.
    """

    key: str
    type: str
    auto_rotate_period: float | None = None
    verify_grace: float | None = None
    deletion_allowed: bool | None = None
    idempotency_key: str | None = None
    max_versions: int | None = None
    #: the private key may be exported wrapped under the token's wrap key
    #: (``signctl backup``); fixed for the key's life.  Absent: the daemon's
    #: ``[keys] backup`` default
    backup: bool | None = None
    #: every ``sign`` must carry a ``position`` above the highest signed so
    #: far (PROTOCOL.md, "Replay protection"); fixed for the key's life
    watermark: bool | None = None


@message
class UpdateKeyArgs(Message):
    """Change a key's lifecycle settings; an absent field keeps its value.

    Durations are seconds, and 0 turns the setting off (no automatic rotation;
    no grace limit).  Versions: 0 means no minimum.  ``max_versions``: the
    most versions not destroyed the key may hold; 0 means the daemon's default.
    """

    key: str
    auto_rotate_period: float | None = None
    verify_grace: float | None = None
    min_sign_version: VersionSetting | None = None
    min_verify_version: VersionSetting | None = None
    deletion_allowed: bool | None = None
    max_versions: int | None = None
    #: a watermarked key's mark is raised to this position (never lowered):
    #: what an operator does after restoring from an old bundle
    raise_mark: Position | None = None


@message
class VersionRefArgs(Message):
    """Arguments of ``disable`` and ``enable``: one version of a key."""

    key: str
    version: VersionNumber


@message
class DestroyArgs(Message):
    """Arguments of ``destroy``: exactly one of ``version`` and ``all=true``.

    "Every version" is never the default: a client that leaves out a field it
    did not set cannot destroy a whole key by mistake.
    """

    key: str
    version: VersionNumber | None = None
    all: bool | None = None


@message
class KeyRefArgs(Message):
    """Arguments of ``key_info``: a key name."""

    key: str


@message
class RotateArgs(Message):
    """Arguments of ``rotate``.

    ``idempotency_key``: a rotation of this key made with the same key already
    is answered again, not repeated (see ``IDEMPOTENCY_KEY_OPS``).
    """

    key: str
    idempotency_key: str | None = None


@message
class PublicKeyArgs(Message):
    key: str
    version: VersionNumber | None = None


@message
class JwksArgs(Message):
    """Names of keys whose verifying versions go into one JWK Set (1 to ``MAX_JWKS_KEYS``)."""

    keys: tuple[str, ...]


@message
class SignArgs(Message):
    key: str
    message: bytes | None = None
    digest: bytes | None = None
    hash: str | None = None
    padding: str | None = None
    format: str | None = None
    version: VersionNumber | None = None
    #: required on a watermarked key, refused on others: above its mark
    position: Position | None = None


@message
class VerifyArgs(Message):
    key: str
    signature: bytes
    message: bytes | None = None
    digest: bytes | None = None
    hash: str | None = None
    padding: str | None = None
    format: str | None = None
    version: VersionNumber | None = None
    #: replay-checked verify (both or neither): the signature covers
    #: ``signd_client.replay.signed_payload(message, timestamp, nonce)``
    timestamp: Position | None = None
    #: 8 to 64 bytes, never accepted twice for the key
    nonce: bytes | None = None


@message
class SignBatchArgs(Message):
    """Many signatures with one key and one set of options (``MAX_BATCH`` at most)."""

    key: str
    messages: tuple[bytes, ...] | None = None
    digests: tuple[bytes, ...] | None = None
    hash: str | None = None
    padding: str | None = None
    format: str | None = None
    version: VersionNumber | None = None
    #: a watermarked key: the first item's position, the others follow by one
    position: Position | None = None


@message
class BackupArgs(Message):
    """A backup bundle of backup-able keys: those named, or (absent) every one."""

    keys: tuple[str, ...] | None = None


@message
class RestoreArgs(Message):
    """Restore one key from a backup bundle (``BACKUP.md``): the bundle's
    header and the key's entry, each with its MAC.  ``check``: only check
    and say what would be done; nothing is written."""

    key: str
    header: bytes
    header_mac: bytes
    entry: bytes
    entry_mac: bytes
    check: bool | None = None


@message
class ImportParamsArgs(Message):
    """Arguments of ``import_params``: the key that is to be imported (the
    caller needs the ``import`` verb on it; the answer is the same for every key)."""

    key: str


@message
class ImportKeyArgs(Message):
    """Bring an existing private key or HMAC secret onto the token (BYOK).

    ``wrapped_key`` is a fresh AES-256 key K encrypted with RSA-OAEP (SHA-1,
    MGF1-SHA1, no label) under the import key ``import_key_id`` (from
    ``import_params``); ``wrapped_material`` is the material under K with AES
    key wrap with padding (RFC 5649): a private key's PKCS#8 DER, or an HMAC
    secret's bytes.  ``public_key``: the private key's SubjectPublicKeyInfo
    DER (asymmetric types; absent for HMAC).  ``new_version``: the material
    becomes the next version of the existing key ``key`` (of this ``type``),
    as a rotation; otherwise ``key`` is a new key, with the settings of
    ``create_key`` (which a new version takes from its key instead).
    ``idempotency_key``: as for ``create_key``.
    """

    key: str
    type: str
    import_key_id: str
    wrapped_key: bytes
    wrapped_material: bytes
    public_key: bytes | None = None
    new_version: bool | None = None
    auto_rotate_period: float | None = None
    verify_grace: float | None = None
    deletion_allowed: bool | None = None
    max_versions: int | None = None
    backup: bool | None = None
    idempotency_key: str | None = None


# ---- results ----


@message
class VersionInfo(Message):
    version: int
    #: active, verify-only, retired, disabled or destroyed
    state: str
    created: float
    #: absent for an HMAC key's version (a secret: no public key)
    public_key_pem: str | None = None
    #: when a verify-only version retires (its grace ends); absent: no limit
    verify_until: float | None = None
    #: ``ec-secp256k1`` keys: the version's Ethereum address, EIP-55
    #: checksummed (``0x`` and 40 hex digits); absent for other key types
    eth_address: str | None = None


@message
class KeyInfo(Message):
    name: str
    type: str
    created: float
    #: the newest version: what ``sign`` uses unless the request names one
    current_version: int
    versions: tuple[VersionInfo, ...]
    auto_rotate_period: float | None = None
    verify_grace: float | None = None
    min_sign_version: int | None = None
    min_verify_version: int | None = None
    deletion_allowed: bool | None = None
    #: when the next automatic rotation is due; absent when it is off
    next_rotation: float | None = None
    #: answers to ``create_key`` and ``rotate``: the version the request made
    #: (for a replay under an ``idempotency_key``, the one the first request made)
    created_version: int | None = None
    #: the most versions not destroyed the key may hold: its own setting or
    #: the daemon's default (absent from daemons before retention)
    max_versions: int | None = None
    #: true: its private keys can be exported wrapped under the token's wrap
    #: key, for backup; absent: they cannot
    backup: bool | None = None
    #: true: every sign carries a position above ``mark``; absent: no watermark
    watermark: bool | None = None
    #: a watermarked key's highest position signed (or burned); absent: none yet
    mark: int | None = None


@message
class BackupResult(Message):
    """A backup bundle (``BACKUP.md``), ready to be written to a file."""

    bundle: bytes
    #: the keys in it, and how many versions they hold (destroyed ones included)
    keys: tuple[str, ...]
    versions: int
    #: keys left out: not backup-able (created without ``backup``)
    skipped: tuple[str, ...]


@message
class RestoreResult(Message):
    """What a restore did (or, with ``check``, would do) to one key."""

    key: str
    #: ``created`` (the key was not on the token), ``updated`` (the token held
    #: older versions only: the bundle's were added and its record written),
    #: or ``unchanged`` (the token holds these versions, or newer ones)
    outcome: str
    #: versions put on the token (or that would be)
    restored: tuple[int, ...]
    #: versions the token held already, with the same public keys
    present: tuple[int, ...]


@message
class ImportParamsResult(Message):
    """What a client wraps key material under for ``import_key``."""

    #: the wrapping, by name: ``rsa-oaep-sha1+aes-kwp``
    algorithm: str
    #: the import key's id: the SHA-256 of ``public_key``, hex
    import_key_id: str
    #: the import key (RSA-3072) as SubjectPublicKeyInfo DER
    public_key: bytes


@message
class KeySummary(Message):
    name: str
    type: str
    created: float
    current_version: int


@message
class KeyList(Message):
    keys: tuple[KeySummary, ...]


@message
class PublicKey(Message):
    name: str
    version: int
    type: str
    public_key_pem: str


@message
class Jwk(Message):
    """One version's public key as a JSON Web Key (RFC 7517, 7518, 8037).

    Binary members (``x``, ``y``, ``n``, ``e``) are base64url strings without
    padding, as in JSON, so a result serialised to JSON is a valid JWK.
    ``kid`` is ``NAME:VERSION``; ``alg`` is absent for RSA keys, which sign
    both RS256 and PS256.
    """

    kty: str
    kid: str
    use: str
    alg: str | None = None
    crv: str | None = None
    x: str | None = None
    y: str | None = None
    n: str | None = None
    e: str | None = None


@message
class Jwks(Message):
    """A JWK Set: every version of the named keys that may still verify."""

    keys: tuple[Jwk, ...]


@message
class SignResult(Message):
    signature: bytes
    key: str
    version: int
    algorithm: str


@message
class ErrorInfo(Message):
    """An error inside a result (``sign_batch`` items), shaped like a wire error."""

    code: int
    name: str
    message: str


@message
class BatchItem(Message):
    """One ``sign_batch`` item: its signature, or its error."""

    signature: bytes | None = None
    error: ErrorInfo | None = None


@message
class SignBatchResult(Message):
    key: str
    version: int
    algorithm: str
    results: tuple[BatchItem, ...]


@message
class VerifyResult(Message):
    valid: bool
    key: str
    version: int | None = None
    algorithm: str | None = None
    #: a replay-checked verify: ``valid``, ``invalid``, ``replayed`` or
    #: ``stale`` (``valid`` is true only for ``valid``); absent otherwise
    status: str | None = None


@message
class TokenStatus(Message):
    label: str
    manufacturer: str
    model: str
    serial: str
    logged_in: bool
    #: the token profile signd drives it with: softhsm, yubihsm or generic
    profile: str | None = None
    #: the key types the token can make and sign with (read from its mechanisms)
    key_types: tuple[str, ...] | None = None
    #: the token's mechanisms, as CKM_ names
    mechanisms: tuple[str, ...] | None = None
    #: with several tokens (``Health.tokens``): ``serving``, ``catching_up``
    #: or ``unavailable``
    state: str | None = None


@message
class AuditHead(Message):
    """The audit log's chain head, as the newest checkpoint signed it (and as
    the daemon keeps it on the token): record ``seq`` has hash ``hash`` and is
    in ``file``; signed at ``time``."""

    chain: str
    seq: int
    hash: str
    file: str
    time: float


@message
class Health(Message):
    status: str
    live: bool
    ready: bool
    daemon_version: str
    protocol_version: int
    uptime: float
    keys: int
    token: TokenStatus | None = None
    detail: str | None = None
    #: only to a peer that may read the audit key, and only with an audit log
    audit: AuditHead | None = None
    #: with several tokens: each one, in config order, with its ``state``
    tokens: tuple[TokenStatus, ...] | None = None


@message
class KeyGrant(Message):
    """One key the caller may use, and how: its verbs, sorted."""

    name: str
    #: sign, verify, read, create, rotate or admin (the policy's verbs)
    verbs: tuple[str, ...]


@message
class Whoami(Message):
    """Who the daemon takes the caller to be (from the kernel's peer
    credentials), and every existing key on which the caller has at least one
    verb, sorted by name."""

    uid: int
    gid: int
    #: the caller's groups, sorted, the primary group included
    groups: tuple[int, ...]
    #: the user name of ``uid``, absent when it has none
    user: str | None = None
    keys: tuple[KeyGrant, ...] = ()
