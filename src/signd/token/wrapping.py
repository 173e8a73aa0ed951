"""The token's backup wrap key: making it (SO), finding it, and asking the
token whether it can wrap a key.  With ``session.py`` the only modules that
import python-pkcs11; they run in worker processes and in ``signd wrap-key``.

A token may hold one *wrap key* (label ``WRAP_KEY_LABEL``), an AES-256 key
that only the SO can mark ``CKA_TRUSTED`` (``signd wrap-key`` puts it there,
see ``wrapkey.py``).  A keypair generated with ``backup=True`` is sensitive
but extractable, and only under a trusted key (``CKA_WRAP_WITH_TRUSTED``):
the token wraps it with the wrap key (``CKM_AES_KEY_WRAP_PAD``) and with
nothing else.  Whether a token can back up a key type is asked of the token
(``probe_wrappable``), not read from a list.  The wrap key's unwrap template
(``_UNWRAP_TEMPLATE``) makes the token refuse to unwrap a backup into
anything but a private, sensitive key that only a trusted key can wrap again.

``WrapKeys`` is a part of ``TokenSession`` (its base class), apart here
because it is a concern of its own.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from typing import Any, Final

import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.attributes import AttributeMapper

from ..errors import InvalidArgument, TokenError, UnsupportedAlgorithm

__all__ = [
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


class WrapKeys:
    """The wrap key's operations of ``TokenSession`` (which provides the session)."""

    _lib: Any
    _so: bool
    _private: dict[bytes, Any]

    def _session_or_raise(self) -> Any:
        raise NotImplementedError  # TokenSession's

    def _find_private(self, object_id: bytes) -> Any:
        raise NotImplementedError  # TokenSession's

    # The wrap key: made by the SO (``signd wrap-key``), used by the user's
    # session to wrap backup-able keys.

    def create_wrap_key(self, secret: bytes, object_id: bytes, label: str = WRAP_KEY_LABEL) -> None:
        """Create the token's wrap key from ``secret`` (AES-256), in the SO's
        session (``open_so``): trusted, wrap and unwrap only, sensitive and
        never extractable, not modifiable and not copyable (a user who could
        add ``CKA_DECRYPT`` to it, or copy it with that, could decrypt a
        backup), and with an unwrap template (``_UNWRAP_TEMPLATE``) that keeps
        every key it unwraps sensitive, wrapped by trusted keys only, and
        private.  It cannot be added later (the key is not modifiable): a wrap
        key the token made without it is refused, and destroyed again.

        ``CKA_PRIVATE`` is false: the SO cannot create private objects
        (SoftHSM answers ``UserNotLoggedIn``), so the key is a public object,
        visible (not readable) without a login.  SoftHSM stores the value of a
        public object unencrypted in its token directory (FIELD-NOTES).

        Raises: InvalidArgument (not an SO session, a secret that is not 32
        bytes, or a key labelled ``label`` exists already); UnsupportedAlgorithm
        if the token refuses a trusted AES key or its unwrap template, or does
        not keep either; TokenError.
        """
        session = self._session_or_raise()
        if not self._so:
            raise InvalidArgument("the wrap key is created in the SO's session")
        if len(secret) != WRAP_KEY_BYTES:
            raise InvalidArgument(
                f"the wrap key is {WRAP_KEY_BYTES} bytes (AES-256), not {len(secret)}"
            )
        for _ in session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
        ):
            raise InvalidArgument(
                f"the token has a key labelled {label!r} already: one wrap key a token; "
                "delete it first if it is really to be replaced (backups made under it "
                "then need its shares to be restored)"
            )
        template: dict[Attribute, Any] = {
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
        try:
            key = session.create_object(template)
        except (
            p11e.AttributeReadOnly,
            p11e.AttributeTypeInvalid,
            p11e.AttributeValueInvalid,
            p11e.TemplateInconsistent,
        ) as exc:
            # opencryptoki 3.8: no CKA_TRUSTED (nor CKA_COPYABLE) on secret keys
            raise UnsupportedAlgorithm(
                "the token refused the wrap key (a trusted, non-copyable AES-256 key "
                "whose unwrap template keeps unwrapped keys sensitive): "
                f"{token_answer(exc)}"
            ) from None
        if not key[Attribute.TRUSTED]:  # a token that ignored it: no use as a wrap key
            key.destroy()
            raise UnsupportedAlgorithm("the token did not keep CKA_TRUSTED on the wrap key")
        try:
            kept = _read_array_attribute(self._lib.so, key, Attribute.UNWRAP_TEMPLATE)
            read = ", ".join(f"0x{t:x}={v.hex()}" for t, v in sorted(kept.items())) or "empty"
        except TokenError as exc:
            kept, read = {}, exc.message
        if kept != _BoolArray.values(_UNWRAP_TEMPLATE):
            # A token that dropped it: anyone could unwrap a backup into a readable key.
            key.destroy()
            raise UnsupportedAlgorithm(
                "the token did not keep the wrap key's unwrap template "
                f"(CKA_UNWRAP_TEMPLATE read back: {read})"
            )

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
        wrap_key = self._wrap_key(wrap_label)
        if wrap_key is None:
            raise InvalidArgument(
                f"the token has no trusted wrap key labelled {wrap_label!r}: "
                "run 'signd wrap-key create' (or import) first"
            )
        key = self._private.get(object_id)
        if key is None:
            key = self._find_private(object_id)
        try:
            probe_wrap(wrap_key, key)
        except p11e.PKCS11Error as exc:
            if not cannot_wrap(exc):
                raise
            raise UnsupportedAlgorithm(
                f"the token cannot wrap the private key {object_id.hex()}: {token_answer(exc)}"
            ) from None

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
