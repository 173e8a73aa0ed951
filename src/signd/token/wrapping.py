"""The token's backup keys: finding them, wrapping and unwrapping private
keys for a backup, and the backup's MAC; making them (as the SO) is
``ceremony.py``.  With ``session.py`` and its other parts the only modules
that import python-pkcs11; they run in worker processes and in ``signd
wrap-key``.

A token may hold one *wrap key* (label ``WRAP_KEY_LABEL``), an AES-256 key
that only the SO can mark ``CKA_TRUSTED`` (``signd wrap-key`` puts it there,
see ``wrapkey.py``).  A keypair generated with ``backup=True`` is sensitive
but extractable, and only under a trusted key (``CKA_WRAP_WITH_TRUSTED``):
the token wraps it with the wrap key (``CKM_AES_KEY_WRAP_PAD``) and with
nothing else.  Whether a token can back up a key type is asked of the token
(``probe_wrappable``), not read from a list.  The wrap key's unwrap template
(``ceremony._UNWRAP_TEMPLATE``) makes the token refuse to unwrap a backup into
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
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

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
    "cannot_wrap",
    "probe_wrap",
    "token_answer",
]

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
#: PKCS#11's key type of each family.
_P11_KEY_TYPES: Final = {
    Family.EC: KeyType.EC,
    Family.RSA: KeyType.RSA,
    Family.ED25519: KeyType.EC_EDWARDS,
    Family.HMAC: KeyType.GENERIC_SECRET,  # a secret key (``ObjectClass.SECRET_KEY``)
}


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
