"""PKCS#11 mechanisms: the one signd signs with for each scheme, their
PKCS#11 names, and what a token's mechanisms make possible.  Worker side."""

from __future__ import annotations

from typing import Any, Final

import pkcs11.exceptions as p11e
from pkcs11 import Mechanism

from ..keys.algorithms import Scheme
from . import profiles

__all__ = ["CKM_VENDOR_DEFINED", "MECHANISMS", "capabilities", "mechanism_name"]

#: The mechanism of each signature scheme (a dict: an enum's attribute costs
#: more than a dict lookup, once per signature).
MECHANISMS: Final = {
    Scheme.ECDSA: Mechanism.ECDSA,
    Scheme.EDDSA: Mechanism.EDDSA,
    Scheme.RSA_PKCS1: Mechanism.RSA_PKCS,
    Scheme.RSA_PSS: Mechanism.RSA_PKCS_PSS,
    Scheme.HMAC: Mechanism.SHA256_HMAC,  # stands for the three below: by the job's hash
}

#: Mechanism numbers from here up are the vendors' own (``CKM_VENDOR_DEFINED``).
CKM_VENDOR_DEFINED: Final = 0x80000000


def mechanism_name(mech: int) -> str:
    """The PKCS#11 name of a mechanism (``CKM_ECDSA``, ``CKM_MD5``), or its
    number as ``0x%08x`` for a vendor's or one python-pkcs11 does not name.

    python-pkcs11 names a mechanism that PKCS#11 deprecated with a leading
    underscore (``Mechanism._MD5``): that is not part of the PKCS#11 name.
    """
    if isinstance(mech, Mechanism) and int(mech) < CKM_VENDOR_DEFINED:
        return "CKM_" + mech.name.lstrip("_")
    return f"0x{int(mech):08x}"


def capabilities(slot: Any) -> dict[str, Any]:
    """The token's mechanisms by name, and the key types they make possible."""
    sizes: dict[str, tuple[int, int]] = {}
    for mech in slot.get_mechanisms():
        name = mechanism_name(mech)
        try:
            info = slot.get_mechanism_info(mech)
            sizes[name] = (int(info.min_key_length), int(info.max_key_length))
        except p11e.PKCS11Error:
            sizes[name] = (0, 0)
    return {"mechanisms": sorted(sizes), "key_types": profiles.capable_key_types(sizes)}
