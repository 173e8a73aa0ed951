"""The wrap-key ceremony (``signd wrap-key``, as the SO): the wrap key, the
backup MAC key and the check value, all three made from the one secret (see
``wrapping.py`` for what each is for).  ``WrapKeyCeremony`` is a part of
``TokenSession`` (its base class), as ``WrapKeys`` is; worker side (it runs
in ``signd wrap-key``)."""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import TYPE_CHECKING, Any, Final

import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, ObjectClass

from ..errors import InvalidArgument, TokenError, UnsupportedAlgorithm
from .arrays import BoolArray, read_array_attribute
from .wrapping import (
    BACKUP_MAC_LABEL,
    CHECK_VALUE_LABEL,
    MAC_MECHANISM,
    WRAP_KEY_BYTES,
    WRAP_KEY_LABEL,
    token_answer,
)

if TYPE_CHECKING:
    from .profiles import Profile

__all__ = ["WrapKeyCeremony"]

log = logging.getLogger("signd.token")

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
#: The ceremony's keys, for messages.
_WRAP_KEY: Final = (
    "the wrap key (a trusted, non-copyable AES-256 key whose unwrap template keeps "
    "unwrapped keys sensitive)"
)
_MAC_KEY: Final = "the backup MAC key (a sensitive, non-copyable HMAC-SHA256 key)"
#: What the MAC key is checked with once it is made.
_MAC_PROBE: Final = b"signd backup mac key: does the token compute HMAC-SHA256 with it?"


class WrapKeyCeremony:
    """The wrap-key ceremony's operations of ``TokenSession`` (which provides
    the session, an SO's: ``open_so``)."""

    _lib: Any
    _so: bool
    _profile: Profile

    def _session_or_raise(self) -> Any:
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
            kept = read_array_attribute(self._lib.so, key, Attribute.UNWRAP_TEMPLATE)
            read = ", ".join(f"0x{t:x}={v.hex()}" for t, v in sorted(kept.items())) or "empty"
        except TokenError as exc:
            kept, read = {}, exc.message
        if kept != BoolArray.values(_UNWRAP_TEMPLATE):
            # A token that dropped it: anyone could unwrap a backup into a readable key.
            raise UnsupportedAlgorithm(
                "the token did not keep the wrap key's unwrap template "
                f"(CKA_UNWRAP_TEMPLATE read back: {read})"
            )


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
        Attribute.UNWRAP_TEMPLATE: BoolArray(_UNWRAP_TEMPLATE),
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
