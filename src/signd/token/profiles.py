"""Token profiles: what differs between PKCS#11 tokens, in one table.

A profile says how to log in, how to name objects within the token's limits,
which Ed25519 parameters to send, and how much concurrency and batching the
device takes.  ``[token] profile`` picks one ("auto": by the module's file
name).  Pure logic: no PKCS#11 here (``token.py`` is the only place that
touches it), so every rule is unit-tested without a token.

What the token can do is not part of a profile: it is read from the token
(``C_GetMechanismList``), see ``capable_key_types``.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ..errors import InvalidArgument

__all__ = [
    "ED25519_OID",
    "ED25519_STRING",
    "PROFILES",
    "Profile",
    "ProfileError",
    "capable_key_types",
    "profile_for",
]

#: CKA_EC_PARAMS for Ed25519 as the PrintableString "edwards25519": what
#: YubiHSM accepts (only this) and SoftHSM accepts.
ED25519_STRING: Final = b"\x13\x0cedwards25519"
#: CKA_EC_PARAMS for Ed25519 as the OID 1.3.101.112 (RFC 8410), which PKCS#11
#: 3.0 also allows and newer modules prefer.
ED25519_OID: Final = b"\x06\x03\x2b\x65\x70"

_HEX4 = re.compile(r"[0-9a-fA-F]{4}")


class ProfileError(ValueError):
    """A setting does not fit the profile (reported as a config error)."""


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    #: CKA_EC_PARAMS sent to generate an Ed25519 key
    ed25519_params: bytes
    #: CKA_ID length of a new keypair (YubiHSM object ids are 16-bit)
    object_id_bytes: int
    #: longest CKA_LABEL the token stores, in bytes (None: no limit known)
    max_label: int | None
    #: longest key name; the label ``NAME/vN`` must fit ``max_label``
    max_key_name: int
    #: the PIN is the auth key id (4 hex digits) followed by the password
    auth_key_pin: bool
    #: worker processes when ``workers = "auto"`` (None: one per core but one, 1 to 4)
    auto_workers: int | None
    #: most worker processes the device takes (None: no limit)
    max_workers: int | None
    #: default ``[token] batch``, ``probe_interval``, ``stall_timeout``, ``label``
    batch: int
    probe_interval: float
    stall_timeout: float
    default_label: str
    #: key records (CKO_DATA) are private objects with CKA_MODIFIABLE false;
    #: the YubiHSM module refuses both attributes on data objects
    standard_records: bool
    #: the idle probe also lists objects, a command that reaches the device
    #: (a YubiHSM answers C_GetTokenInfo from its module's cache)
    deep_probe: bool
    #: what the profile says about the device, for ``health`` and the log
    summary: str

    def login_pin(self, secret: str, auth_key_id: int | None) -> str:
        """The PIN for ``C_Login`` from the PIN file's text.

        YubiHSM: the 4 hex digits of the auth key id, then the password.
        With ``auth_key_id`` set the file holds only the password; without,
        it must hold the whole ``0001password`` form.

        Raises: ProfileError (the message never contains the secret).
        """
        if not self.auth_key_pin:
            if auth_key_id is not None:
                raise ProfileError(
                    f"token.auth_key_id: only the yubihsm profile uses it, not {self.name}"
                )
            return secret
        if auth_key_id is not None:
            secret = f"{auth_key_id:04x}{secret}"
        if len(secret) <= 4 or not _HEX4.fullmatch(secret[:4]):
            raise ProfileError(
                "token: the yubihsm profile logs in with the auth key id and its password: "
                "set token.auth_key_id, or make the PIN file hold 4 hex digits of the id "
                "followed by the password (e.g. 0002 then the password)"
            )
        if not 8 <= len(secret) - 4 <= 64:
            raise ProfileError(
                f"token: a YubiHSM auth key password has 8 to 64 characters; "
                f"this one has {len(secret) - 4}"
            )
        return secret

    def check_key_name(self, name: str) -> None:
        """Raises: InvalidArgument when ``name`` is too long for this token's labels."""
        if len(name) > self.max_key_name:
            raise InvalidArgument(
                f"key name {name!r} is {len(name)} characters; the {self.name} profile allows "
                f"at most {self.max_key_name} (the token stores labels of at most "
                f"{self.max_label} bytes)"
            )

    def object_label(self, name: str, version: int) -> str:
        """CKA_LABEL of a version's keypair, ``NAME/vN``: readable in ``pkcs11-tool -O``.

        Raises: InvalidArgument if it does not fit the token (a name within
        ``max_key_name`` fits up to version 999999).
        """
        label = f"{name}/v{version}"
        if self.max_label is not None and len(label.encode()) > self.max_label:
            raise InvalidArgument(
                f"object label {label!r} is longer than the {self.max_label} bytes "
                "this token stores"
            )
        return label

    def new_object_id(self) -> bytes:
        """A random CKA_ID for a new keypair (the token layer re-draws one that is taken)."""
        return secrets.token_bytes(self.object_id_bytes)


_GENERIC_BATCH = 64

PROFILES: Final[Mapping[str, Profile]] = {
    p.name: p
    for p in (
        Profile(
            name="softhsm",
            ed25519_params=ED25519_STRING,
            object_id_bytes=8,
            max_label=None,
            max_key_name=64,
            auth_key_pin=False,
            auto_workers=None,
            max_workers=None,
            batch=_GENERIC_BATCH,
            probe_interval=1.0,
            stall_timeout=5.0,
            default_label="signd",
            standard_records=True,
            deep_probe=False,
            summary="SoftHSM 2: a file store, safe across processes; one worker per core but one",
        ),
        Profile(
            name="yubihsm",
            ed25519_params=ED25519_STRING,
            object_id_bytes=2,
            max_label=40,
            max_key_name=32,
            auth_key_pin=True,
            auto_workers=1,
            max_workers=1,
            batch=4,
            # The device drops a session after 30 s idle: the idle probe, which
            # lists objects on the device, keeps it (and notices a lost device).
            probe_interval=10.0,
            # Generating an RSA key holds the device for seconds, and a batch
            # waiting behind it must not be taken for a hang.
            stall_timeout=30.0,
            default_label="YubiHSM",  # the module labels every device so
            standard_records=False,
            deep_probe=True,
            summary=(
                "YubiHSM 2: one command at a time (~10 signatures/s), 16-bit object ids, "
                "40-byte labels, sessions expire after 30 s idle"
            ),
        ),
        Profile(
            name="generic",
            ed25519_params=ED25519_OID,
            object_id_bytes=8,
            max_label=None,
            max_key_name=64,
            auth_key_pin=False,
            auto_workers=1,
            max_workers=None,
            batch=_GENERIC_BATCH,
            probe_interval=1.0,
            stall_timeout=5.0,
            default_label="signd",
            standard_records=True,
            deep_probe=False,
            summary="a PKCS#11 module signd has no profile for: one worker unless configured",
        ),
    )
}


def profile_for(name: str, module: str) -> Profile:
    """The profile called ``name``, or for "auto" the one the module's file name suggests.

    Raises: ProfileError for an unknown name.
    """
    if name == "auto":
        base = os.path.basename(module).lower()
        if "softhsm" in base:
            return PROFILES["softhsm"]
        if "yubihsm" in base:
            return PROFILES["yubihsm"]
        return PROFILES["generic"]
    profile = PROFILES.get(name)
    if profile is None:
        raise ProfileError(f"token.profile: must be auto, {', '.join(PROFILES)}; got {name!r}")
    return profile


#: key type -> (keypair generation mechanism, signing mechanism, key sizes in
#: bits that mean this type: tokens differ, SoftHSM gives Ed25519 256-456,
#: the YubiHSM module 255-255)
_NEEDS: Final[dict[str, tuple[str, str, tuple[int, ...]]]] = {
    "ec-p256": ("CKM_EC_KEY_PAIR_GEN", "CKM_ECDSA", (256,)),
    "ec-p384": ("CKM_EC_KEY_PAIR_GEN", "CKM_ECDSA", (384,)),
    "ed25519": ("CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EDDSA", (255, 256)),
    "rsa-2048": ("CKM_RSA_PKCS_KEY_PAIR_GEN", "CKM_RSA_PKCS", (2048,)),
    "rsa-3072": ("CKM_RSA_PKCS_KEY_PAIR_GEN", "CKM_RSA_PKCS", (3072,)),
    "rsa-4096": ("CKM_RSA_PKCS_KEY_PAIR_GEN", "CKM_RSA_PKCS", (4096,)),
    # the mechanisms do not say which curves a token knows: a token without
    # secp256k1 refuses it at create_key (unsupported_algorithm)
    "ec-secp256k1": ("CKM_EC_KEY_PAIR_GEN", "CKM_ECDSA", (256,)),
}


def capable_key_types(mechanisms: Mapping[str, tuple[int, int]]) -> dict[str, str | None]:
    """Which key types the token can make and sign with, from its mechanisms.

    ``mechanisms`` maps a mechanism name (``CKM_ECDSA``) to its
    ``(ulMinKeySize, ulMaxKeySize)`` from ``C_GetMechanismInfo``; (0, 0)
    means the token gave no sizes.  Returns each key type with None if the
    token can, else the reason it cannot.
    """
    out: dict[str, str | None] = {}
    for kt, (gen, sign, bits) in _NEEDS.items():
        missing = [m for m in (gen, sign) if m not in mechanisms]
        if missing:
            out[kt] = f"the token has no {' or '.join(missing)}"
            continue
        low, high = mechanisms[gen]
        if high and not any(low <= b <= high for b in bits):  # (0, 0): no sizes given
            out[kt] = f"{gen} takes keys of {low} to {high} bits"
            continue
        out[kt] = None
    return out
