"""The token's import key, and unwrapping key material a client wrapped under
it (bring your own key).  With ``session.py`` and its other parts the only
modules that import python-pkcs11; they run in worker processes.

The *import key* (label ``IMPORT_KEY_LABEL``) is an RSA-3072 keypair on the
token: its private half unwraps only (no decrypt, no sign), is sensitive and
never extractable; its public half is handed to clients (``import_public``).
It is made on first need, by the writer, not at start: a token that never
imports never pays for (nor holds) one.  It is not secret-bearing for
backups: a lost import key is replaced by a new one, and each token of a
set has its own.

A client wraps in two layers (Vault Transit's BYOK and AWS KMS's
``RSA_AES_KEY_WRAP_SHA_1`` do the same): an ephemeral AES-256 key K under
RSA-OAEP (SHA-1, MGF1-SHA1, no label: SoftHSM 2.6.1 unwraps OAEP with SHA-1
only, FIELD-NOTES; OAEP with SHA-1 is still sound for encryption), and the
material (PKCS#8 DER of a private key, or an HMAC secret) under K with AES key
wrap with padding (RFC 5649).  RSA-OAEP alone cannot carry an RSA PKCS#8 key
(too big), hence K.  The token unwraps K as a session object (never stored),
the material under K straight into a sensitive object, and K is destroyed.

``ImportKeys`` is a part of ``TokenSession`` (its base class), as
``WrapKeys`` is; the keypair itself is finished in
``KeyPairs.import_keypair`` (``keypairs.py``: it makes keypairs as ``generate`` does).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import pkcs11.exceptions as p11e
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass

from ..errors import InvalidArgument
from .objects import spki_of

if TYPE_CHECKING:
    from .profiles import Profile

__all__ = [
    "IMPORT_KEY_BITS",
    "IMPORT_KEY_LABEL",
    "ImportKeys",
    "import_key_id",
]

log = logging.getLogger("signd.token")

#: CKA_LABEL of the token's import key(s).
IMPORT_KEY_LABEL: Final = "signd-import"
#: The import key is RSA-3072 (as AWS KMS's and Vault's wrapping keys may be).
IMPORT_KEY_BITS: Final = 3072
#: RSA-OAEP's parameters: SHA-1, MGF1 with SHA-1, no label.
OAEP_PARAMS: Final = (Mechanism.SHA_1, MGF.SHA1, None)
#: The material's layer: AES key wrap with padding (RFC 5649).
MATERIAL_MECHANISM: Final = Mechanism.AES_KEY_WRAP_PAD
#: K is AES-256.
TRANSPORT_KEY_BYTES: Final = 32

_IMPORT_PUBLIC: Final[dict[Attribute, Any]] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
    Attribute.VERIFY: False,
    Attribute.VERIFY_RECOVER: False,
    Attribute.DERIVE: False,
}
_IMPORT_PRIVATE: Final[dict[Attribute, Any]] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.UNWRAP: True,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.SIGN_RECOVER: False,
    Attribute.DERIVE: False,
}
#: K, as the import key unwraps it: a session object that only unwraps.
_TRANSPORT_KEY: Final[dict[Attribute, Any]] = {
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.UNWRAP: True,
    Attribute.WRAP: False,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}
#: What the token answers when a layer does not decrypt: damaged, or made
#: under another key (SoftHSM 2.6.1, measured in tests/test_import.py).
_NOT_DECRYPTED: Final = (
    p11e.GeneralError,
    p11e.WrappedKeyInvalid,
    p11e.WrappedKeyLenRange,
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.DataInvalid,
    p11e.DataLenRange,
    p11e.ArgumentsBad,
)
#: What the token answers when the material decrypts but is not a key of the
#: type asked (SoftHSM 2.6.1: FunctionFailed for another type of PKCS#8).
_NOT_THAT_TYPE: Final = (
    p11e.FunctionFailed,
    p11e.KeyTypeInconsistent,
    p11e.TemplateInconsistent,
    p11e.AttributeValueInvalid,
    p11e.DomainParamsInvalid,
)


def import_key_id(spki: bytes) -> str:
    """An import key's id: the SHA-256 of its SubjectPublicKeyInfo DER, hex
    (``openssl pkey -pubin -outform DER | sha256sum`` gives the same)."""
    return hashlib.sha256(spki).hexdigest()


class ImportKeys:
    """The import key's operations of ``TokenSession`` (which provides the session)."""

    _profile: Profile

    def _session_or_raise(self) -> Any:
        raise NotImplementedError  # TokenSession's

    def check(self) -> None:
        raise NotImplementedError  # TokenSession's

    def import_public(self) -> tuple[bytes, str]:
        """The import key's SPKI DER and id, made on the token if it has none.

        Several (two daemons made one each at once): the one whose id sorts
        first, so that every process answers the same one; each still unwraps
        what was wrapped under it.
        """
        pairs = self._import_keys()
        if not pairs:
            pairs = [self._make_import_key()]
        spki = min((spki for _, spki in pairs), key=import_key_id)
        return spki, import_key_id(spki)

    def _import_keys(self) -> list[tuple[Any, bytes]]:
        """Each import key on the token: (its private key, its public SPKI DER)."""

        session = self._session_or_raise()
        pairs = []
        # A list first: a search may not start while another is open (OperationActive).
        privs = list(
            session.get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: IMPORT_KEY_LABEL}
            )
        )
        for priv in privs:
            pubs = list(
                session.get_objects(
                    {
                        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                        Attribute.LABEL: IMPORT_KEY_LABEL,
                        Attribute.ID: bytes(priv[Attribute.ID]),
                    }
                )
            )
            if len(pubs) == 1:
                pairs.append((priv, spki_of(pubs[0])))
        return pairs

    def _make_import_key(self) -> tuple[Any, bytes]:
        """A new import keypair (unwrap only, sensitive, never extractable)."""

        session = self._session_or_raise()
        object_id = self._profile.new_object_id()
        pub, priv = session.generate_keypair(
            KeyType.RSA,
            IMPORT_KEY_BITS,
            store=True,
            label=IMPORT_KEY_LABEL,
            id=object_id,
            public_template=_IMPORT_PUBLIC,
            private_template=_IMPORT_PRIVATE,
        )
        spki = spki_of(pub)
        log.info("import key created", extra={"id": import_key_id(spki)})
        return priv, spki

    def unwrap_imported(
        self,
        key_id: str,
        wrapped_key: bytes,
        wrapped_material: bytes,
        object_class: ObjectClass,
        key_type: KeyType,
        object_id: bytes,
        label: str,
        template: Mapping[Attribute, Any],
        what: str,
    ) -> Any:
        """Unwrap K from ``wrapped_key`` under the import key ``key_id``, then
        ``wrapped_material`` under K into a token object (``object_class``,
        ``key_type``, ``template``); K is destroyed whatever happens.

        Raises: InvalidArgument (no import key ``key_id`` on this token; a
        layer that does not decrypt; K not AES-256; material that is not a
        ``what``); TokenUnavailable; the token's other PKCS#11 errors.
        """
        import_private = self._import_private(key_id)
        try:
            transport = import_private.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.AES,
                wrapped_key,
                mechanism=Mechanism.RSA_PKCS_OAEP,
                mechanism_param=OAEP_PARAMS,
                store=False,
                template=dict(_TRANSPORT_KEY),
            )
        except _NOT_DECRYPTED as exc:
            self._still_there(exc)
            raise InvalidArgument(
                "wrapped_key does not decrypt under the import key (RSA-OAEP with SHA-1): "
                f"damaged, or wrapped under another key ({type(exc).__name__})"
            ) from None
        try:
            # SoftHSM 2.6.1 keeps no CKA_VALUE_LEN on an unwrapped AES key (it
            # reads 0, and refuses it in the template: AttributeReadOnly), so K's
            # size is checked only where the token records it.
            size = int(transport[Attribute.VALUE_LEN])
            if size and size != TRANSPORT_KEY_BYTES:
                raise InvalidArgument(
                    f"wrapped_key holds a {size}-byte key, not an AES-256 key "
                    f"({TRANSPORT_KEY_BYTES} bytes)"
                )
            try:
                return transport.unwrap_key(
                    object_class,
                    key_type,
                    wrapped_material,
                    id=object_id,
                    label=label,
                    mechanism=MATERIAL_MECHANISM,
                    store=True,
                    template=dict(template),
                )
            except p11e.GeneralError as exc:
                # AES key wrap's integrity check failed (or the token is gone).
                self._still_there(exc)
                raise InvalidArgument(
                    "wrapped_material does not unwrap under the key in wrapped_key "
                    "(AES key wrap with padding): it is damaged"
                ) from None
            except _NOT_THAT_TYPE as exc:
                raise InvalidArgument(
                    f"the wrapped material is not a {what} ({type(exc).__name__})"
                ) from None
            except _NOT_DECRYPTED as exc:
                raise InvalidArgument(
                    "wrapped_material does not unwrap under the key in wrapped_key "
                    f"(AES key wrap with padding): it is damaged ({type(exc).__name__})"
                ) from None
        finally:
            try:
                transport.destroy()
            except p11e.PKCS11Error as exc:  # a session object: it goes with the session
                log.warning("could not destroy the import's AES key", extra={"error": repr(exc)})

    def _import_private(self, key_id: str) -> Any:
        """The private half of the import key ``key_id``.  Raises: InvalidArgument."""
        for priv, spki in self._import_keys():
            if import_key_id(spki) == key_id:
                return priv
        raise InvalidArgument(
            f"this token has no import key {key_id[:16]!r}...: ask import_params again and "
            "wrap the material under the key it answers"
            if key_id
            else "import_key_id is empty: ask import_params for it"
        )

    def _still_there(self, exc: BaseException) -> None:
        """After a GeneralError: TokenUnavailable if the token is gone (a lost
        token answers GeneralError too)."""
        if isinstance(exc, p11e.GeneralError):
            self.check()
