"""The token's backup keys: making them (SO), finding them, wrapping and
unwrapping private keys for a backup, and the backup's MAC.  With
``session.py`` the only modules that import python-pkcs11; they run in worker
processes and in ``signd wrap-key``.

A token may hold one *wrap key* (label ``WRAP_KEY_LABEL``), an AES-256 key
that only the SO can mark ``CKA_TRUSTED`` (``signd wrap-key`` puts it there,
see ``wrapkey.py``).  A keypair generated with ``backup=True`` is sensitive
but extractable, and only under a trusted key (``CKA_WRAP_WITH_TRUSTED``):
the token wraps it with the wrap key (``CKM_AES_KEY_WRAP_PAD``) and with
nothing else.  Whether a token can back up a key type is asked of the token
(``probe_wrappable``), not read from a list.  The wrap key's unwrap template
(``_UNWRAP_TEMPLATE``) makes the token refuse to unwrap a backup into
anything but a private, sensitive key that only a trusted key can wrap again.

The ceremony that makes the wrap key makes two more objects from the same
secret: the *backup MAC key* (``BACKUP_MAC_LABEL``, HMAC-SHA256, value
``shares.backup_mac_key(secret)``), with which the token MACs a backup so
that another token given the same shares can check it; and a data object
holding the wrap key's check value (``CHECK_VALUE_LABEL``), so the token says
which shares it was made from.  ``wrap_private`` wraps a backup-able private
key; restoring one (``TokenSession.restore_keypair``) unwraps it with
``_unwrap_private``.

``WrapKeys`` is a part of ``TokenSession`` (its base class), apart here
because it is a concern of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import hmac
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.attributes import AttributeMapper

from ..errors import InvalidArgument, TokenError, UnsupportedAlgorithm
from ..keys import algorithms
from ..keys.algorithms import Family

if TYPE_CHECKING:
    from .profiles import Profile

__all__ = [
    "BACKUP_MAC_LABEL",
    "CHECK_VALUE_LABEL",
    "MAC_MECHANISM",
    "WRAP_KEY_BYTES",
    "WRAP_KEY_LABEL",
    "WRAP_MECHANISM",
    "WrapKeys",
    "array_attribute_mapper",
    "cannot_wrap",
    "probe_wrap",
    "token_answer",
]

log = logging.getLogger("signd.token")

#: CKA_LABEL of the token's one wrap key (the key backups are wrapped with).
WRAP_KEY_LABEL: Final = "signd-wrap"
#: The wrap key is AES-256.
WRAP_KEY_BYTES: Final = 32
#: How a private key is wrapped for a backup: AES key wrap with padding (RFC 5649).
WRAP_MECHANISM: Final = Mechanism.AES_KEY_WRAP_PAD
#: CKA_LABEL of the backup MAC key (an HMAC-SHA256 key the ceremony makes).
BACKUP_MAC_LABEL: Final = "signd-backup-mac"
#: CKA_LABEL of the CKO_DATA object holding the wrap key's check value (ASCII).
CHECK_VALUE_LABEL: Final = "signd-wrap-check"
#: How a backup is MACed: HMAC-SHA256, by the token.
MAC_MECHANISM: Final = Mechanism.SHA256_HMAC
#: The wrap key's CKA_UNWRAP_TEMPLATE: what every key unwrapped with it must
#: be.  SoftHSM refuses (TemplateInconsistent) an unwrap whose template does
#: not state each of these with this value (CKA_PRIVATE: or leaves it out, as
#: true is its default), before it creates anything.  Each is needed:
#:
#: - sensitive: without it a backup unwraps into a key whose value anyone
#:   reads, even a session with no login (measured on SoftHSM 2.6.1);
#: - wrap-with-trusted: without it a user unwraps the backup extractable
#:   and wraps it again under an AES key of their own, whose value they know;
#: - private: a private object needs the user's login, so a session with no
#:   login cannot unwrap a backup at all (it could otherwise unwrap it into a
#:   public session key, sensitive, and sign with it).
#:
#: CKA_EXTRACTABLE is left free: an extractable copy is still wrapped by the
#: trusted wrap key alone, into what the backup already is.
_UNWRAP_TEMPLATE: Final[dict[Attribute, bool]] = {
    Attribute.SENSITIVE: True,
    Attribute.WRAP_WITH_TRUSTED: True,
    Attribute.PRIVATE: True,
}
#: What a token answers when it cannot wrap a key: it cannot back up that type
#: (or the wrapping key is not one it accepts).  Anything else is a token failure.
_CANNOT_WRAP: Final = (
    p11e.KeyNotWrappable,
    p11e.KeyUnextractable,
    p11e.KeyTypeInconsistent,
    p11e.MechanismInvalid,
    p11e.MechanismParamInvalid,
    p11e.FunctionNotSupported,
    p11e.WrappingKeyTypeInconsistent,
    p11e.WrappingKeySizeRange,
    p11e.AttributeSensitive,
    p11e.ArgumentsBad,
)
#: What a token answers when a blob does not unwrap under its wrap key (measured
#: on SoftHSM 2.6.1: GeneralError for a damaged blob or one made under another
#: key, as AES key wrap's integrity check fails; WrappedKeyLenRange for a
#: length the mechanism cannot produce).
_NOT_UNWRAPPED: Final = (
    p11e.GeneralError,
    p11e.WrappedKeyInvalid,
    p11e.WrappedKeyLenRange,
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
)
#: What a token answers when it will not unwrap a blob as the key type asked
#: (SoftHSM 2.6.1: FunctionFailed, for Ed25519 and for a blob of another type).
_UNWRAP_REFUSED: Final = (
    p11e.FunctionFailed,
    p11e.KeyTypeInconsistent,
    p11e.TemplateInconsistent,
    p11e.AttributeTypeInvalid,
    p11e.AttributeValueInvalid,
    p11e.MechanismInvalid,
    p11e.MechanismParamInvalid,
    p11e.FunctionNotSupported,
    p11e.UnwrappingKeyTypeInconsistent,
)
#: What a token answers when it cannot HMAC with the MAC key.
_CANNOT_MAC: Final = (
    p11e.MechanismInvalid,
    p11e.MechanismParamInvalid,
    p11e.KeyTypeInconsistent,
    p11e.KeySizeRange,
    p11e.FunctionNotSupported,
)
#: What a token answers when it refuses an object's template at creation.
_REFUSED_TEMPLATE: Final = (
    p11e.AttributeReadOnly,
    p11e.AttributeTypeInvalid,
    p11e.AttributeValueInvalid,
    p11e.TemplateInconsistent,
)
#: PKCS#11's key type of each family.
_P11_KEY_TYPES: Final = {
    Family.EC: KeyType.EC,
    Family.RSA: KeyType.RSA,
    Family.ED25519: KeyType.EC_EDWARDS,
    Family.HMAC: KeyType.GENERIC_SECRET,  # a secret key (``ObjectClass.SECRET_KEY``)
}
#: The ceremony's keys, for messages.
_WRAP_KEY: Final = (
    "the wrap key (a trusted, non-copyable AES-256 key whose unwrap template keeps "
    "unwrapped keys sensitive)"
)
_MAC_KEY: Final = "the backup MAC key (a sensitive, non-copyable HMAC-SHA256 key)"
#: What the MAC key is checked with once it is made.
_MAC_PROBE: Final = b"signd backup mac key: does the token compute HMAC-SHA256 with it?"


class WrapKeys:
    """The wrap key's operations of ``TokenSession`` (which provides the session)."""

    _lib: Any
    _so: bool
    _private: dict[bytes, Any]
    _profile: Profile

    def _session_or_raise(self) -> Any:
        raise NotImplementedError  # TokenSession's

    def _find_private(self, object_id: bytes) -> Any:
        raise NotImplementedError  # TokenSession's

    def check(self) -> None:
        raise NotImplementedError  # TokenSession's

    # The ceremony (``signd wrap-key``, as the SO): the wrap key, the backup
    # MAC key and the check value, all three made from the one secret.

    def create_wrap_key(
        self,
        secret: bytes,
        object_id: bytes,
        mac_object_id: bytes,
        label: str = WRAP_KEY_LABEL,
    ) -> None:
        """Create the token's wrap key, backup MAC key and check value from
        ``secret``, in the SO's session (``open_so``); all three or none (what
        was made is deleted again if a later step fails).

        The wrap key (``label``, id ``object_id``) is AES-256: trusted, wrap
        and unwrap only, sensitive and never extractable, not modifiable and
        not copyable (a user who could add ``CKA_DECRYPT`` to it, or copy it
        with that, could decrypt a backup), and with an unwrap template
        (``_UNWRAP_TEMPLATE``) that keeps every key it unwraps sensitive,
        wrapped by trusted keys only, and private.  It cannot be added later
        (the key is not modifiable): a wrap key the token made without it is
        refused.

        The backup MAC key (``BACKUP_MAC_LABEL``, id ``mac_object_id``) is a
        32-byte ``CKK_GENERIC_SECRET`` key whose value is
        ``shares.backup_mac_key(secret)``: sign and verify only (HMAC-SHA256),
        sensitive, never extractable, not modifiable, not copyable.  It is
        checked once: the token's HMAC with it must be Python's.

        The check value is a ``CKO_DATA`` object (``CHECK_VALUE_LABEL``) whose
        value is ``shares.check_value(secret)`` in ASCII, not modifiable (where
        the profile's data objects take ``CKA_MODIFIABLE``).

        All three are public objects (``CKA_PRIVATE`` false): the SO cannot
        create private objects (SoftHSM answers ``UserNotLoggedIn``).  So they
        are visible without a login, and the MAC key is *usable* without one:
        a session with no PIN can compute backup MACs.  SoftHSM stores the
        values of public objects unencrypted in its token directory
        (FIELD-NOTES).

        Raises: InvalidArgument (not an SO session, a secret that is not 32
        bytes, the two ids equal, or an object labelled ``label``,
        ``BACKUP_MAC_LABEL`` or ``CHECK_VALUE_LABEL`` exists already);
        UnsupportedAlgorithm if the token refuses a trusted AES key, its unwrap
        template, or the HMAC key, or does not keep them as asked; TokenError
        (the token's PKCS#11 errors, mapped by the caller).
        """
        session = self._session_or_raise()
        if not self._so:
            raise InvalidArgument("the wrap key is created in the SO's session")
        if len(secret) != WRAP_KEY_BYTES:
            raise InvalidArgument(
                f"the wrap key is {WRAP_KEY_BYTES} bytes (AES-256), not {len(secret)}"
            )
        if object_id == mac_object_id:
            raise InvalidArgument("the wrap key and the backup MAC key need different object ids")
        for taken in (label, BACKUP_MAC_LABEL, CHECK_VALUE_LABEL):
            for _ in session.get_objects({Attribute.LABEL: taken}):
                raise InvalidArgument(_label_taken(taken, label))
        # Imported here, as ``wrapkey.py`` does: the rest of signd (the token
        # workers) never depends on signd.shares.
        from ..shares import backup_mac_key, check_value

        mac_value = backup_mac_key(secret)
        made: list[Any] = []
        try:
            made.append(_create(session, _wrap_key_template(secret, object_id, label), _WRAP_KEY))
            self._check_wrap_key(made[-1])
            made.append(_create(session, _mac_key_template(mac_value, mac_object_id), _MAC_KEY))
            _check_mac_key(made[-1], mac_value)
            check: dict[Attribute, Any] = {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.LABEL: CHECK_VALUE_LABEL,
                Attribute.VALUE: check_value(secret).encode("ascii"),
            }
            if self._profile.standard_records:  # YubiHSM: data objects refuse it
                check[Attribute.MODIFIABLE] = False
            made.append(session.create_object(check))
        except BaseException:
            _destroy_made(made)
            raise

    def _check_wrap_key(self, key: Any) -> None:
        """Raises: UnsupportedAlgorithm if the token did not keep the wrap key's
        CKA_TRUSTED or its unwrap template (then it is of no use, or unsafe)."""
        if not key[Attribute.TRUSTED]:
            raise UnsupportedAlgorithm("the token did not keep CKA_TRUSTED on the wrap key")
        try:
            kept = _read_array_attribute(self._lib.so, key, Attribute.UNWRAP_TEMPLATE)
            read = ", ".join(f"0x{t:x}={v.hex()}" for t, v in sorted(kept.items())) or "empty"
        except TokenError as exc:
            kept, read = {}, exc.message
        if kept != _BoolArray.values(_UNWRAP_TEMPLATE):
            # A token that dropped it: anyone could unwrap a backup into a readable key.
            raise UnsupportedAlgorithm(
                "the token did not keep the wrap key's unwrap template "
                f"(CKA_UNWRAP_TEMPLATE read back: {read})"
            )

    def wrap_check_value(self) -> str | None:
        """The wrap key's check value, as the ceremony stored it on the token
        (``CHECK_VALUE_LABEL``); None if the token has none.

        Raises: TokenError if there are several, or the value is not ASCII.
        """
        session = self._session_or_raise()
        found = list(
            session.get_objects(
                {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: CHECK_VALUE_LABEL}
            )
        )
        if not found:
            return None
        if len(found) > 1:
            raise TokenError(
                f"the token has {len(found)} data objects labelled {CHECK_VALUE_LABEL!r}, "
                "not one: which is the wrap key's check value is unknown"
            )
        value = bytes(found[0][Attribute.VALUE])
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise TokenError(
                f"the data object labelled {CHECK_VALUE_LABEL!r} is not an ASCII check value"
            ) from None

    # The wrap key in the user's session: asking, wrapping, unwrapping.

    def wrap_key_check(self, label: str = WRAP_KEY_LABEL) -> bool:
        """Whether the token holds a trusted wrap key labelled ``label``."""
        return self._wrap_key(label) is not None

    def probe_wrappable(self, object_id: bytes, wrap_label: str = WRAP_KEY_LABEL) -> None:
        """Ask the token to wrap the private key ``object_id`` with the wrap key
        (``CKM_AES_KEY_WRAP_PAD``); the result is discarded.

        Raises: InvalidArgument if there is no trusted wrap key;
        UnsupportedAlgorithm naming the token's answer (e.g. KeyNotWrappable)
        if it cannot wrap this key; TokenError for other failures.
        """
        wrap_key = self._trusted_wrap_key(wrap_label)
        key = self._private.get(object_id)
        if key is None:
            key = self._find_private(object_id)
        with _cannot_wrap_is_unsupported(object_id):
            probe_wrap(wrap_key, key)

    def wrap_private(self, object_id: bytes) -> bytes:
        """The private key ``object_id`` wrapped under the trusted wrap key
        (``CKM_AES_KEY_WRAP_PAD``, RFC 5649): the token's PKCS#8 of the key,
        encrypted; its value is never seen in clear here.

        Raises: InvalidArgument if there is no trusted wrap key; TokenError if
        the token has not exactly one private key ``object_id``;
        UnsupportedAlgorithm naming the token's answer if it will not wrap it
        (a key made without backup: KeyUnextractable; an Ed25519 key on
        SoftHSM 2.6.1: KeyNotWrappable); the token's PKCS#11 errors otherwise.
        """
        wrap_key = self._trusted_wrap_key(WRAP_KEY_LABEL)
        key = self._find_private(object_id)  # looked up afresh: a cached handle may be stale
        with _cannot_wrap_is_unsupported(object_id):
            return bytes(wrap_key.wrap_key(key, mechanism=WRAP_MECHANISM))

    def _unwrap_private(
        self,
        wrap_key: Any,
        kt: algorithms.KeyType,
        wrapped: bytes,
        object_id: bytes,
        label: str,
        template: Mapping[Attribute, Any],
    ) -> Any:
        """Unwrap ``wrapped`` under ``wrap_key`` into a private token key of
        type ``kt`` with ``object_id``, ``label`` and ``template``.

        Raises: InvalidArgument if the blob does not unwrap under this wrap
        key (damaged, or made under another: SoftHSM 2.6.1 answers
        GeneralError, and WrappedKeyLenRange for a length AES key wrap cannot
        have; the token is asked first whether it is still there);
        UnsupportedAlgorithm if the token will not unwrap it as a ``kt.name``
        key (SoftHSM 2.6.1: FunctionFailed, both for Ed25519 and for a blob
        that holds another type of key); TokenUnavailable; the token's other
        PKCS#11 errors.
        """
        try:
            return wrap_key.unwrap_key(
                ObjectClass.SECRET_KEY if kt.family is Family.HMAC else ObjectClass.PRIVATE_KEY,
                _P11_KEY_TYPES[kt.family],
                wrapped,
                id=object_id,
                label=label,
                mechanism=WRAP_MECHANISM,
                store=True,
                template=dict(template),
            )
        except _NOT_UNWRAPPED as exc:
            if isinstance(exc, p11e.GeneralError):
                self.check()  # a lost token answers GeneralError too: TokenUnavailable
            raise InvalidArgument(
                "the wrapped key does not unwrap under this token's wrap key "
                f"(damaged, or wrapped under another): {token_answer(exc)}"
            ) from None
        except _UNWRAP_REFUSED as exc:
            raise UnsupportedAlgorithm(
                f"the token will not unwrap the blob as a {kt.name} private key "
                f"({token_answer(exc)}): it cannot restore {kt.name} keys, or the blob "
                "holds another type of key"
            ) from None

    def _trusted_wrap_key(self, label: str) -> Any:
        """The trusted wrap key labelled ``label``.

        Raises: InvalidArgument if there is none.
        """
        wrap_key = self._wrap_key(label)
        if wrap_key is None:
            raise InvalidArgument(
                f"the token has no trusted wrap key labelled {label!r}: "
                "run 'signd wrap-key create' (or import) first"
            )
        return wrap_key

    def _wrap_key(self, label: str) -> Any | None:
        """The trusted wrap key labelled ``label``, or None."""
        session = self._session_or_raise()
        found = list(
            session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})
        )
        for key in found:
            try:
                if key[Attribute.TRUSTED] and key[Attribute.WRAP]:
                    return key
            except p11e.AttributeTypeInvalid:  # a token whose secret keys have no CKA_TRUSTED
                continue
        return None

    # The backup MAC: HMAC-SHA256 computed by the token with the MAC key, so
    # that any token given the same shares checks a backup made on another.

    def backup_mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` with the backup MAC key, computed by the token
        (``CKM_SHA256_HMAC``): 32 bytes.

        Raises: InvalidArgument if the token has no backup MAC key, or several;
        the token's PKCS#11 errors.
        """
        return bytes(self._mac_key().sign(data, mechanism=MAC_MECHANISM))

    def verify_backup_mac(self, data: bytes, mac: bytes) -> bool:
        """Whether ``mac`` is the backup MAC of ``data`` (checked by the token,
        ``C_Verify``: a wrong MAC, or one of the wrong length, is False).

        Raises: InvalidArgument if the token has no backup MAC key, or several;
        the token's other PKCS#11 errors.
        """
        # python-pkcs11's verify answers False for SignatureInvalid and
        # SignatureLenRange, and raises anything else.
        return bool(self._mac_key().verify(data, mac, mechanism=MAC_MECHANISM))

    def _mac_key(self) -> Any:
        """The backup MAC key.  Raises: InvalidArgument (none, or several)."""
        session = self._session_or_raise()
        found = list(
            session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: BACKUP_MAC_LABEL}
            )
        )
        if not found:
            raise InvalidArgument(
                f"the token has no backup MAC key (labelled {BACKUP_MAC_LABEL!r}): run "
                "'signd wrap-key create' (or import) first; a wrap key made before "
                "backups had MACs is deleted (as the SO) and imported again from its shares"
            )
        if len(found) > 1:
            raise InvalidArgument(
                f"the token has {len(found)} keys labelled {BACKUP_MAC_LABEL!r}, not one: "
                "which is the backup MAC key is unknown"
            )
        return found[0]


def _label_taken(taken: str, wrap_label: str) -> str:
    """Why ``create_wrap_key`` refuses, when an object labelled ``taken`` exists."""
    if taken == wrap_label:
        return (
            f"the token has a key labelled {taken!r} already: one wrap key a token; "
            "delete it first if it is really to be replaced (backups made under it "
            "then need its shares to be restored)"
        )
    return (
        f"the token has an object labelled {taken!r} already (left by an earlier wrap "
        "key?): one wrap key, backup MAC key and check value a token; delete it (as the "
        "SO) first if they are really to be replaced"
    )


def _wrap_key_template(secret: bytes, object_id: bytes, label: str) -> dict[Attribute, Any]:
    return {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.LABEL: label,
        Attribute.ID: object_id,
        Attribute.VALUE: secret,
        Attribute.TRUSTED: True,
        Attribute.WRAP: True,
        Attribute.UNWRAP: True,
        Attribute.ENCRYPT: False,
        Attribute.DECRYPT: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.DERIVE: False,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.MODIFIABLE: False,
        Attribute.COPYABLE: False,
        # Its packed CK_ATTRIBUTEs point into this object: the template keeps it alive.
        Attribute.UNWRAP_TEMPLATE: _BoolArray(_UNWRAP_TEMPLATE),
    }


def _mac_key_template(value: bytes, object_id: bytes) -> dict[Attribute, Any]:
    return {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.LABEL: BACKUP_MAC_LABEL,
        Attribute.ID: object_id,
        Attribute.VALUE: value,
        Attribute.SIGN: True,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.DECRYPT: False,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.MODIFIABLE: False,
        Attribute.COPYABLE: False,
    }


def _create(session: Any, template: dict[Attribute, Any], what: str) -> Any:
    """``session.create_object(template)``.

    Raises: UnsupportedAlgorithm if the token refuses the template
    (opencryptoki 3.8: no CKA_TRUSTED nor CKA_COPYABLE on secret keys).
    """
    try:
        return session.create_object(template)
    except _REFUSED_TEMPLATE as exc:
        raise UnsupportedAlgorithm(f"the token refused {what}: {token_answer(exc)}") from None


def _check_mac_key(key: Any, value: bytes) -> None:
    """Raises: UnsupportedAlgorithm if the token's HMAC-SHA256 with ``key`` is
    not Python's with ``value`` (or the token cannot compute it)."""
    try:
        got = bytes(key.sign(_MAC_PROBE, mechanism=MAC_MECHANISM))
    except p11e.PKCS11Error as exc:
        if not (isinstance(exc, _CANNOT_MAC) or type(exc) is p11e.PKCS11Error):
            raise
        raise UnsupportedAlgorithm(
            f"the token cannot compute HMAC-SHA256 with the backup MAC key: {token_answer(exc)}"
        ) from None
    if not hmac.compare_digest(got, hmac.new(value, _MAC_PROBE, hashlib.sha256).digest()):
        raise UnsupportedAlgorithm(
            "the token's HMAC-SHA256 with the backup MAC key is not that of the value it was given"
        )


def _destroy_made(made: list[Any]) -> None:
    """Delete the objects an unfinished ceremony made, newest first (best effort:
    the error that stopped it is the one to report)."""
    for obj in reversed(made):
        try:
            obj.destroy()
        except p11e.PKCS11Error as exc:
            log.warning(
                "could not delete an object of an unfinished wrap-key ceremony; "
                "delete it (as the SO) before trying again",
                extra={"error": type(exc).__name__},
            )


@contextlib.contextmanager
def _cannot_wrap_is_unsupported(object_id: bytes) -> Iterator[None]:
    """The token's "I cannot wrap this key" as UnsupportedAlgorithm naming its answer."""
    try:
        yield
    except p11e.PKCS11Error as exc:
        if not cannot_wrap(exc):
            raise
        raise UnsupportedAlgorithm(
            f"the token cannot wrap the private key {object_id.hex()}: {token_answer(exc)}"
        ) from None


def cannot_wrap(exc: BaseException) -> bool:
    """Whether ``exc`` is the token refusing to wrap a key (rather than failing):
    one of ``_CANNOT_WRAP``, or a code python-pkcs11 does not name (such as
    ``CKR_KEY_FUNCTION_NOT_PERMITTED`` or ``CKR_ACTION_PROHIBITED``)."""
    return isinstance(exc, _CANNOT_WRAP) or type(exc) is p11e.PKCS11Error


def token_answer(exc: BaseException) -> str:
    """The token's answer, for a message: the error's name (``KeyNotWrappable``),
    or python-pkcs11's text for a code it does not name."""
    if type(exc) is p11e.PKCS11Error and str(exc):
        return str(exc)
    return type(exc).__name__


def probe_wrap(wrap_key: Any, key: Any) -> None:
    """Wrap ``key`` with ``wrap_key`` and discard the result.

    Raises: the token's PKCS#11 error.
    """
    wrap_key.wrap_key(key, mechanism=WRAP_MECHANISM)


# Array attributes (CKA_UNWRAP_TEMPLATE): python-pkcs11 0.10.1 has no handler
# for them, and a handler can only turn a value into bytes, which it copies.
# An array attribute's value is an array of CK_ATTRIBUTEs whose pValue
# pointers point at memory of their own: ``_BoolArray`` owns that memory and
# packs the array, and the caller keeps it alive (in the template) during the
# call.  Reading one back is worse: python-pkcs11 would hand the token an
# *uninitialised* array, whose pointers SoftHSM writes through; so it is read
# with C_GetAttributeValue called here (``_read_array_attribute``), never with
# ``key[Attribute.UNWRAP_TEMPLATE]``.


class _CKAttribute(ctypes.Structure):
    """PKCS#11's CK_ATTRIBUTE (CK_ULONG is C's unsigned long on Unix: 24 bytes
    on x86-64)."""

    _fields_ = [
        ("type", ctypes.c_ulong),
        ("pValue", ctypes.c_void_p),
        ("ulValueLen", ctypes.c_ulong),
    ]
    type: int
    pValue: int | None
    ulValueLen: int


class _BoolArray:
    """The value of an array attribute whose elements are CK_BBOOLs, packed
    for python-pkcs11 (``pack``).  Its packed bytes point into this object,
    which must outlive the call they are passed to."""

    def __init__(self, template: Mapping[Attribute, bool]) -> None:
        self._bools = [ctypes.c_ubyte(1 if value else 0) for value in template.values()]
        self._array = (_CKAttribute * len(self._bools))(
            *(
                _CKAttribute(int(attr), ctypes.addressof(value), 1)
                for attr, value in zip(template, self._bools, strict=True)
            )
        )

    def pack(self) -> bytes:
        return bytes(self._array)

    @staticmethod
    def values(template: Mapping[Attribute, bool]) -> dict[int, bytes]:
        """``template`` as ``_read_array_attribute`` reads it back."""
        return {int(attr): b"\x01" if value else b"\x00" for attr, value in template.items()}


def _pack_bool_array(value: Any) -> bytes:
    if not isinstance(value, _BoolArray):
        raise TypeError(f"an array attribute takes a _BoolArray, not {type(value).__name__}")
    return value.pack()


def _unpack_refused(_: bytes) -> Any:
    raise NotImplementedError("array attributes are read with _read_array_attribute")


def array_attribute_mapper() -> AttributeMapper:
    """python-pkcs11's attribute mapper, able to write CKA_UNWRAP_TEMPLATE."""
    mapper = AttributeMapper()
    mapper.register_handler(Attribute.UNWRAP_TEMPLATE, _pack_bool_array, _unpack_refused)
    return mapper


#: More elements than this in an array attribute are a token's nonsense.
_MAX_ARRAY: Final = 256


def _read_array_attribute(module_path: str, key: Any, attribute: Attribute) -> dict[int, bytes]:
    """The array attribute ``attribute`` of ``key``, element type -> value,
    read with the module's own C_GetAttributeValue (the module python-pkcs11
    loaded: dlopen gives the same instance) in three calls: the array's size,
    its elements' types and sizes, their values.

    Raises: TokenError naming the token's answer (CKR_ code).
    """
    get = ctypes.CDLL(module_path).C_GetAttributeValue
    get.argtypes = [ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(_CKAttribute), ctypes.c_ulong]
    get.restype = ctypes.c_ulong
    outer = _CKAttribute(int(attribute), None, 0)

    def call() -> None:
        rv = get(key.session.handle, key.handle, ctypes.byref(outer), 1)
        if rv != 0:
            raise TokenError(f"C_GetAttributeValue answered 0x{rv:08x}")

    call()
    count, rest = divmod(outer.ulValueLen, ctypes.sizeof(_CKAttribute))
    if rest or count > _MAX_ARRAY:  # CK_UNAVAILABLE_INFORMATION with CKR_OK, or nonsense
        raise TokenError(f"C_GetAttributeValue answered a size of {outer.ulValueLen}")
    elements = (_CKAttribute * count)()
    outer.pValue, outer.ulValueLen = ctypes.addressof(elements), ctypes.sizeof(elements)
    call()  # every pValue NULL: the token fills in types and sizes
    buffers = [ctypes.create_string_buffer(e.ulValueLen) for e in elements]
    for element, buffer in zip(elements, buffers, strict=True):
        element.pValue = ctypes.addressof(buffer)
    call()
    return {e.type: buffer.raw[: e.ulValueLen] for e, buffer in zip(elements, buffers, strict=True)}
