"""Keypairs on the token: generating them, restoring a backed-up one and
importing one (bring your own key), all made with the same templates and,
when something was restored or imported, checked by signing a probe.  Part
of ``TokenSession`` (as ``SecretKeys``, ``WrapKeys`` and ``ImportKeys`` are,
whose methods it calls: HMAC keys are handed to ``SecretKeys``); worker side,
like ``session.py``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final

import pkcs11.exceptions as p11e
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import DEFAULT, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from ..errors import Conflict, InvalidArgument, UnsupportedAlgorithm
from ..keys import algorithms
from ..keys.algorithms import Family
from .hmac_secrets import SecretKeys
from .mechanisms import MECHANISMS
from .objects import spki_of as _spki
from .wrapping import WRAP_KEY_LABEL, cannot_wrap, probe_wrap, token_answer

__all__ = ["KeyPairs"]

log = logging.getLogger("signd.token")

_PRIVATE_TEMPLATE: Final[dict[Attribute, Any]] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.SIGN_RECOVER: False,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
_PUBLIC_TEMPLATE: Final[dict[Attribute, Any]] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.VERIFY: True,
    Attribute.VERIFY_RECOVER: False,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
    Attribute.DERIVE: False,
}
#: The private key of a keypair that can be backed up: still sensitive (its
#: value is never read), but extractable, and only wrapped by a trusted key.
_BACKUP_PRIVATE_TEMPLATE: Final[dict[Attribute, Any]] = {
    **_PRIVATE_TEMPLATE,
    Attribute.EXTRACTABLE: True,
    Attribute.WRAP_WITH_TRUSTED: True,
}
#: A restored private key: as a backup-able one is generated (so it can be
#: backed up again).  python-pkcs11's unwrap writes every capability into its
#: template, and SoftHSM refuses CKA_ENCRYPT, CKA_VERIFY and CKA_WRAP on a
#: private key (AttributeTypeInvalid): those are left to the token (FIELD-NOTES).
_RESTORED_PRIVATE_TEMPLATE: Final[dict[Attribute, Any]] = {
    **_BACKUP_PRIVATE_TEMPLATE,
    Attribute.ENCRYPT: DEFAULT,
    Attribute.VERIFY: DEFAULT,
    Attribute.WRAP: DEFAULT,
}
#: An imported private key that cannot be backed up: as ``generate`` makes one
#: (never extractable), with the capabilities SoftHSM refuses on an unwrap left
#: to the token (as for ``_RESTORED_PRIVATE_TEMPLATE``).
_IMPORTED_PRIVATE_TEMPLATE: Final[dict[Attribute, Any]] = {
    **_PRIVATE_TEMPLATE,
    Attribute.ENCRYPT: DEFAULT,
    Attribute.VERIFY: DEFAULT,
    Attribute.WRAP: DEFAULT,
}
#: What a restored private key signs, to be checked against its public key.
_RESTORE_PROBE: Final = b"signd restore: does the unwrapped private key match its public key?"


class KeyPairs(SecretKeys):
    """The keypairs' operations of ``TokenSession`` (which provides the session)."""

    def generate(
        self, kt: algorithms.KeyType, object_id: bytes, label: str, backup: bool = False
    ) -> bytes:
        """Generate a sign-only, non-extractable keypair; return its SPKI DER.

        ``backup``: the private key is extractable instead, but only under a
        trusted key (``CKA_WRAP_WITH_TRUSTED``), so that the token's wrap key
        can back it up; the token is then asked to wrap it once (the result
        is discarded), and a keypair it cannot wrap is deleted again.

        Raises: Conflict if an object has the id already (short ids, as on a
        YubiHSM, can collide: the caller draws another); InvalidArgument
        (``backup``) if the token has no wrap key; UnsupportedAlgorithm if the
        token cannot make (or, with ``backup``, back up) this type of key.
        """
        session = self._session_or_raise()
        for _ in session.get_objects({Attribute.ID: object_id}):
            raise Conflict(f"object id {object_id.hex()} is taken")
        wrap_key = None
        if backup:
            wrap_key = self._wrap_key(WRAP_KEY_LABEL)
            if wrap_key is None:
                raise InvalidArgument(
                    "backup needs a wrap key on the token: "
                    "run 'signd wrap-key create' (or import) first"
                )
        if kt.family is Family.HMAC:
            return self._generate_secret(kt, object_id, label, wrap_key)
        common: dict[str, Any] = {
            "store": True,
            "label": label,
            "id": object_id,
            "public_template": _PUBLIC_TEMPLATE,
            "private_template": _BACKUP_PRIVATE_TEMPLATE if backup else _PRIVATE_TEMPLATE,
        }
        try:
            if kt.family is Family.RSA:
                pub, priv = session.generate_keypair(KeyType.RSA, kt.bits, **common)
            elif kt.family is Family.EC:
                assert kt.curve is not None
                params = session.create_domain_parameters(
                    KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(kt.curve)},
                    local=True,
                )
                pub, priv = params.generate_keypair(**common)
            else:
                params = session.create_domain_parameters(
                    KeyType.EC_EDWARDS,
                    {Attribute.EC_PARAMS: self._profile.ed25519_params},
                    local=True,
                )
                pub, priv = params.generate_keypair(
                    mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN, **common
                )
        except (p11e.MechanismInvalid, p11e.AttributeValueInvalid, p11e.DomainParamsInvalid):
            raise UnsupportedAlgorithm(f"this token cannot generate {kt.name} keys") from None
        if wrap_key is not None:
            try:
                probe_wrap(wrap_key, priv)
            except Exception as exc:
                self._drop_pair(pub, priv)  # a backup-able key that cannot be backed up
                if not cannot_wrap(exc):
                    raise
                raise UnsupportedAlgorithm(
                    f"this token cannot back up {kt.name} keys: {token_answer(exc)}"
                ) from None
        self._private[object_id] = priv
        return _spki(pub)

    def restore_keypair(
        self,
        key_type: algorithms.KeyType,
        object_id: bytes,
        label: str,
        spki: bytes,
        wrapped: bytes | None,
    ) -> None:
        """Put a backed-up keypair on this token, with ``object_id`` and ``label``.

        The public key is made from ``spki`` (SubjectPublicKeyInfo DER) with
        the attributes ``generate`` gives one, and must read back as ``spki``
        (``public_keys`` then answers it as it was).  Unless ``wrapped`` is
        None (a version whose private key was destroyed: the public key
        alone), the private key is unwrapped from ``wrapped`` under the
        trusted wrap key (``CKM_AES_KEY_WRAP_PAD``) as a backup-able key is
        generated: private, sign only, sensitive, extractable only under a
        trusted key, so it can be backed up again.  It then signs a probe,
        checked with ``cryptography`` against ``spki``: a blob of another key
        is refused.  All or nothing: whatever was made is deleted again if a
        step fails.

        Raises: Conflict if an object has ``object_id`` already;
        InvalidArgument if ``spki`` is not a ``key_type`` public key (or not
        as the token gives it back), there is no trusted wrap key, the blob
        does not unwrap under it, or the private key does not match ``spki``;
        UnsupportedAlgorithm if the token cannot hold or unwrap this type of
        key (SoftHSM 2.6.1: Ed25519 private keys); TokenUnavailable; the
        token's other PKCS#11 errors (TokenError through ``failure``).
        """
        session = self._session_or_raise()
        for _ in session.get_objects({Attribute.ID: object_id}):
            raise Conflict(f"object id {object_id.hex()} is taken")
        if key_type.family is Family.HMAC:
            self._restore_secret(key_type, object_id, label, spki, wrapped)
            return
        try:
            public = algorithms.load_public_key(key_type, spki)
        except ValueError as exc:
            raise InvalidArgument(
                f"the public key is not a {key_type.name} SubjectPublicKeyInfo: {exc}"
            ) from None
        wrap_key = None if wrapped is None else self._trusted_wrap_key(WRAP_KEY_LABEL)
        made: list[Any] = []
        try:
            self._create_public(key_type, object_id, label, public, spki, made)
            if wrap_key is None or wrapped is None:
                return
            priv = self._unwrap_private(
                wrap_key, key_type, wrapped, object_id, label, _RESTORED_PRIVATE_TEMPLATE
            )
            made.append(priv)
            _check_pair(key_type, priv, public)
        except BaseException:
            self._private.pop(object_id, None)
            self._drop_pair(*reversed(made))
            raise
        self._private[object_id] = priv

    # HMAC keys: one secret key object each, no keypair.  Its check value
    # (``algorithms.hmac_check_value``) plays the part of a keypair's SPKI:
    # ``generate`` and ``public_keys`` answer it, ``restore_keypair`` takes it.

    def import_keypair(
        self,
        key_type: algorithms.KeyType,
        object_id: bytes,
        label: str,
        import_key_id: str,
        wrapped_key: bytes,
        wrapped_material: bytes,
        spki: bytes,
        backup: bool,
    ) -> bytes:
        """Put an imported keypair on this token (bring your own key); returns
        its SPKI DER as the token reads it back.

        The public key is made from ``spki`` as ``restore_keypair`` makes it.
        The private key is unwrapped from the client's two layers under the
        import key ``import_key_id`` (``ImportKeys.unwrap_imported``) straight
        into a private, sign-only, sensitive key: never extractable, or with
        ``backup`` extractable under a trusted key only (and then wrapped once
        by the wrap key, as ``generate`` checks a backup-able key).  It must be
        a ``key_type`` key (its curve, or its modulus size) and sign a probe
        that ``spki`` verifies.  All or nothing: whatever was made is deleted
        again if a step fails.

        Raises: Conflict if an object has ``object_id`` already;
        InvalidArgument (``spki`` is not a ``key_type`` public key; a layer
        that does not unwrap; material of another type, curve or size, or not
        matching ``spki``; ``backup`` without a wrap key); UnsupportedAlgorithm
        (the token cannot hold, or back up, this type); TokenUnavailable; the
        token's other PKCS#11 errors.
        """
        session = self._session_or_raise()
        for _ in session.get_objects({Attribute.ID: object_id}):
            raise Conflict(f"object id {object_id.hex()} is taken")
        if key_type.family is Family.HMAC:
            return self._import_secret(
                key_type, object_id, label, import_key_id, wrapped_key, wrapped_material, backup
            )
        try:
            public = algorithms.load_public_key(key_type, spki)
        except ValueError as exc:
            raise InvalidArgument(
                f"the public key is not a {key_type.name} SubjectPublicKeyInfo: {exc}"
            ) from None
        wrap_key = None
        if backup:
            wrap_key = self._trusted_wrap_key(WRAP_KEY_LABEL)
        made: list[Any] = []
        try:
            self._create_public(key_type, object_id, label, public, spki, made)
            priv = self.unwrap_imported(
                import_key_id,
                wrapped_key,
                wrapped_material,
                ObjectClass.PRIVATE_KEY,
                _P11_KEY_TYPES[key_type.family],
                object_id,
                label,
                _RESTORED_PRIVATE_TEMPLATE if backup else _IMPORTED_PRIVATE_TEMPLATE,
                f"{key_type.name} private key",
            )
            made.append(priv)
            _check_imported(key_type, priv)
            _check_pair(key_type, priv, public)
            if wrap_key is not None:
                try:
                    probe_wrap(wrap_key, priv)
                except Exception as exc:
                    if not cannot_wrap(exc):
                        raise
                    raise UnsupportedAlgorithm(
                        f"this token cannot back up {key_type.name} keys: {token_answer(exc)}"
                    ) from None
        except BaseException:
            self._private.pop(object_id, None)
            self._drop_pair(*reversed(made))
            raise
        self._private[object_id] = priv
        return spki

    def _create_public(
        self,
        kt: algorithms.KeyType,
        object_id: bytes,
        label: str,
        public: algorithms.PublicKey,
        spki: bytes,
        made: list[Any],
    ) -> None:
        """Make the public key object of ``public`` (whose SubjectPublicKeyInfo is
        ``spki``), as ``generate`` makes one; appended to ``made`` as soon as
        it exists, for the caller to drop on failure.

        Raises: UnsupportedAlgorithm if the token refuses this type of key;
        InvalidArgument if it does not read back as given.
        """
        attrs: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.ID: object_id,
            Attribute.LABEL: label,
            **_PUBLIC_TEMPLATE,
        }
        if isinstance(public, rsa.RSAPublicKey):
            numbers = public.public_numbers()
            attrs[Attribute.KEY_TYPE] = KeyType.RSA
            attrs[Attribute.MODULUS] = _unsigned(numbers.n)
            attrs[Attribute.PUBLIC_EXPONENT] = _unsigned(numbers.e)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            assert kt.curve is not None
            point = public.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            attrs[Attribute.KEY_TYPE] = KeyType.EC
            attrs[Attribute.EC_PARAMS] = encode_named_curve_parameters(kt.curve)
            attrs[Attribute.EC_POINT] = _octet_string(point)
        else:
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            attrs[Attribute.KEY_TYPE] = KeyType.EC_EDWARDS
            attrs[Attribute.EC_PARAMS] = self._profile.ed25519_params
            attrs[Attribute.EC_POINT] = _octet_string(raw)  # as SoftHSM gives it back
        try:
            obj = self._session_or_raise().create_object(attrs)
        except (
            p11e.AttributeTypeInvalid,
            p11e.AttributeValueInvalid,
            p11e.TemplateInconsistent,
            p11e.KeyTypeInconsistent,
            p11e.DomainParamsInvalid,
        ) as exc:
            raise UnsupportedAlgorithm(
                f"this token cannot hold {kt.name} public keys: {token_answer(exc)}"
            ) from None
        made.append(obj)
        if _spki(obj) != spki:
            raise InvalidArgument(
                "the public key does not read back from the token as given: "
                "give it as the token does (an EC point uncompressed, a named curve)"
            )

    def _drop_pair(self, *objects: Any) -> None:
        """Delete a keypair just made (best effort: it is not in any record)."""
        for obj in objects:
            try:
                obj.destroy()
            except p11e.PKCS11Error as exc:
                log.warning(
                    "could not delete a keypair just made that is not to be kept",
                    extra={"error": type(exc).__name__},
                )


@dataclass(frozen=True, slots=True)
class _Probe:
    """The restore probe's signature, as ``algorithms.verify`` takes a request."""

    signature: bytes
    message: bytes | None = _RESTORE_PROBE
    digest: bytes | None = None
    hash: str | None = None
    padding: str | None = None
    format: str | None = None


def _check_pair(kt: algorithms.KeyType, private: Any, public: algorithms.PublicKey) -> None:
    """Sign ``_RESTORE_PROBE`` with ``private`` on the token, as signd signs
    with ``kt``'s default options, and verify it with ``public``.

    Raises: InvalidArgument if the signature does not verify; the token's
    PKCS#11 errors.
    """
    opts = algorithms.options(kt, None, None, None, by_digest=False)
    plan = algorithms.plan(opts, _RESTORE_PROBE, None)
    raw = private.sign(plan.data, mechanism=MECHANISMS[plan.scheme])
    try:
        signature = algorithms.finish_signature(plan, bytes(raw))
    except ValueError:  # r || s of a key on another curve (low-S: s above kt's order)
        raise InvalidArgument("the unwrapped private key does not match its public key") from None
    if algorithms.verify(kt, public, _Probe(signature)) is None:
        raise InvalidArgument("the unwrapped private key does not match its public key")


#: PKCS#11's key type of each family an import can hold.
_P11_KEY_TYPES: Final = {Family.EC: KeyType.EC, Family.RSA: KeyType.RSA}


def _check_imported(kt: algorithms.KeyType, private: Any) -> None:
    """Raises: InvalidArgument if the unwrapped ``private`` is not a ``kt``
    key: another curve (a P-384 key declared ec-p256), another modulus size."""
    if kt.family is Family.EC:
        assert kt.curve is not None
        if bytes(private[Attribute.EC_PARAMS]) != encode_named_curve_parameters(kt.curve):
            raise InvalidArgument(
                f"the wrapped material is an EC key on another curve, not a {kt.name} key"
            )
    elif kt.family is Family.RSA:
        bits = int.from_bytes(bytes(private[Attribute.MODULUS]), "big").bit_length()
        if bits != kt.bits:
            raise InvalidArgument(f"the wrapped material is an RSA-{bits} key, not a {kt.name} key")


def _unsigned(value: int) -> bytes:
    """A non-negative integer as PKCS#11 writes one: big-endian, no leading zeros."""
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _octet_string(value: bytes) -> bytes:
    """``value`` as a DER OCTET STRING (CKA_EC_POINT)."""
    n = len(value)
    if n < 0x80:
        return bytes((0x04, n)) + value
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x04, 0x80 | len(size))) + size + value
