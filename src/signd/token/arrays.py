"""Array attributes (CKA_UNWRAP_TEMPLATE), which python-pkcs11 cannot
write or read: packing one for a template, and reading one back with the
module's own C_GetAttributeValue.  Worker side (the wrap-key ceremony uses
them, ``ceremony.py``)."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any, Final

from pkcs11 import Attribute
from pkcs11.attributes import AttributeMapper

from ..errors import TokenError

__all__ = ["BoolArray", "array_attribute_mapper", "read_array_attribute"]

# Array attributes (CKA_UNWRAP_TEMPLATE): python-pkcs11 0.10.1 has no handler
# for them, and a handler can only turn a value into bytes, which it copies.
# An array attribute's value is an array of CK_ATTRIBUTEs whose pValue
# pointers point at memory of their own: ``BoolArray`` owns that memory and
# packs the array, and the caller keeps it alive (in the template) during the
# call.  Reading one back is worse: python-pkcs11 would hand the token an
# *uninitialised* array, whose pointers SoftHSM writes through; so it is read
# with C_GetAttributeValue called here (``read_array_attribute``), never with
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


class BoolArray:
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
        """``template`` as ``read_array_attribute`` reads it back."""
        return {int(attr): b"\x01" if value else b"\x00" for attr, value in template.items()}


def _pack_bool_array(value: Any) -> bytes:
    if not isinstance(value, BoolArray):
        raise TypeError(f"an array attribute takes a BoolArray, not {type(value).__name__}")
    return value.pack()


def _unpack_refused(_: bytes) -> Any:
    raise NotImplementedError("array attributes are read with read_array_attribute")


def array_attribute_mapper() -> AttributeMapper:
    """python-pkcs11's attribute mapper, able to write CKA_UNWRAP_TEMPLATE."""
    mapper = AttributeMapper()
    mapper.register_handler(Attribute.UNWRAP_TEMPLATE, _pack_bool_array, _unpack_refused)
    return mapper


#: More elements than this in an array attribute are a token's nonsense.
_MAX_ARRAY: Final = 256


def read_array_attribute(module_path: str, key: Any, attribute: Attribute) -> dict[int, bytes]:
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
