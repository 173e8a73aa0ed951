"""HMAC secrets on the token: generating, restoring and importing them, and
verifying a MAC by having the token compute it.  Part of ``TokenSession``
(as ``WrapKeys`` and ``ImportKeys`` are), which provides the session; worker
side, like ``session.py``."""

from __future__ import annotations

import hmac
from typing import Any, Final

import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from ..errors import InvalidArgument, UnsupportedAlgorithm
from ..keys import algorithms
from .importing import ImportKeys
from .ipc import VerifyJob
from .wrapping import WRAP_KEY_LABEL, WrapKeys, cannot_wrap, probe_wrap, token_answer

__all__ = ["HMAC_MECHANISMS", "SecretKeys", "hmac_secret_template"]

#: The MAC mechanism of each hash (an HMAC key's own: ``algorithms`` checks it).
HMAC_MECHANISMS: Final = {
    "sha256": Mechanism.SHA256_HMAC,
    "sha384": Mechanism.SHA384_HMAC,
    "sha512": Mechanism.SHA512_HMAC,
}


class SecretKeys(WrapKeys, ImportKeys):
    """The HMAC secrets' operations of ``TokenSession``."""

    def _drop_pair(self, *objects: Any) -> None:
        raise NotImplementedError  # KeyPairs'

    def _generate_secret(
        self, kt: algorithms.KeyType, object_id: bytes, label: str, wrap_key: Any | None
    ) -> bytes:
        """Generate an HMAC secret (``CKM_GENERIC_SECRET_KEY_GEN``, the hash's
        output size); return its check value.  ``wrap_key``: backup-able, as
        ``generate`` says, checked with a test wrap.

        Raises: UnsupportedAlgorithm (the token cannot make or back it up).
        """
        template = hmac_secret_template(kt, label, object_id, wrap_key is not None)
        try:
            key = self._session_or_raise().generate_key(
                KeyType.GENERIC_SECRET,
                kt.bits,  # CKA_VALUE_LEN: bits // 8 bytes
                id=object_id,
                label=label,
                store=True,
                mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
                template=template,
            )
        except (
            p11e.MechanismInvalid,
            p11e.AttributeTypeInvalid,
            p11e.AttributeValueInvalid,
            p11e.TemplateInconsistent,
        ) as exc:
            raise UnsupportedAlgorithm(
                f"this token cannot generate {kt.name} keys: {token_answer(exc)}"
            ) from None
        return self._keep_secret(kt, object_id, key, wrap_key)

    def _check_value(self, key: Any) -> bytes:
        """The check value of the HMAC secret ``key``: the first bytes of its
        HMAC-SHA256 over ``algorithms.HMAC_CHECK_MESSAGE``, by the token."""
        mac = key.sign(algorithms.HMAC_CHECK_MESSAGE, mechanism=Mechanism.SHA256_HMAC)
        return algorithms.hmac_check_value(bytes(mac))

    def secret_check_value(self, object_id: bytes) -> bytes:
        """The check value of the HMAC secret ``object_id`` (for an import).

        Raises: TokenError if there is not exactly one such key.
        """
        return self._check_value(self._find_private(object_id))

    def _restore_secret(
        self,
        kt: algorithms.KeyType,
        object_id: bytes,
        label: str,
        check: bytes,
        wrapped: bytes | None,
    ) -> None:
        """``restore_keypair`` for an HMAC key: unwrap the secret (backup-able,
        as generated with backup) and check it against ``check``, its check
        value; for a version without a secret (``wrapped`` None: destroyed)
        there is nothing to put on the token.

        Raises: as ``restore_keypair``; InvalidArgument if the unwrapped
        secret's check value is not ``check`` (nothing is left).
        """
        if wrapped is None:
            return
        wrap_key = self._trusted_wrap_key(WRAP_KEY_LABEL)
        template = hmac_secret_template(kt, label, object_id, True)
        key = self._unwrap_private(wrap_key, kt, wrapped, object_id, label, template)
        try:
            if not hmac.compare_digest(self._check_value(key), check):
                raise InvalidArgument(
                    f"the unwrapped {kt.name} secret does not match its check value"
                )
        except BaseException:
            self._drop_pair(key)
            raise
        self._private[object_id] = key

    def verify_mac(self, job: VerifyJob) -> list[Any] | None:
        """A ``VerifyJob`` for an HMAC key, whose candidates are (version,
        object id): ``[version, algorithm]`` of the first whose MAC over the
        message, computed by the token, is ``job.signature`` (compared in
        constant time), or None.  The secret is never read.

        Raises: InvalidArgument (bad options); TokenError if a secret is missing.
        """
        kt = algorithms.key_type(job.key_type)
        opts = algorithms.request_options(kt, job)
        assert opts.hash is not None
        assert job.message is not None
        mechanism = HMAC_MECHANISMS[opts.hash.name]
        for version, object_id in job.candidates:
            key = self._private.get(object_id)
            if key is None:
                key = self._find_private(object_id)
            try:
                mac = bytes(key.sign(job.message, mechanism=mechanism))
            except BaseException:
                self._private.pop(object_id, None)
                raise
            if hmac.compare_digest(mac, job.signature):
                return [version, opts.algorithm]
        return None

    def _keep_secret(
        self, kt: algorithms.KeyType, object_id: bytes, key: Any, wrap_key: Any | None
    ) -> bytes:
        """A secret just made (generated or imported): checked with a test
        wrap under ``wrap_key`` if it is to be backed up, cached, and its
        check value returned; deleted again if either fails.

        Raises: UnsupportedAlgorithm (the token cannot back it up).
        """
        try:
            if wrap_key is not None:
                try:
                    probe_wrap(wrap_key, key)
                except Exception as exc:
                    if not cannot_wrap(exc):
                        raise
                    raise UnsupportedAlgorithm(
                        f"this token cannot back up {kt.name} keys: {token_answer(exc)}"
                    ) from None
            check = self._check_value(key)
        except BaseException:
            self._drop_pair(key)
            raise
        self._private[object_id] = key
        return check

    def _import_secret(
        self,
        kt: algorithms.KeyType,
        object_id: bytes,
        label: str,
        import_key_id: str,
        wrapped_key: bytes,
        wrapped_material: bytes,
        backup: bool,
    ) -> bytes:
        """``import_keypair`` for an HMAC key: the secret unwrapped straight
        into a secret key as ``generate`` makes one (``hmac_secret_template``:
        sign and verify only, sensitive; extractable under a trusted key only
        with ``backup``, then wrapped once as a check); returns its check value.

        Raises: as ``import_keypair``.
        """
        wrap_key = self._trusted_wrap_key(WRAP_KEY_LABEL) if backup else None
        key = self.unwrap_imported(
            import_key_id,
            wrapped_key,
            wrapped_material,
            ObjectClass.SECRET_KEY,
            KeyType.GENERIC_SECRET,
            object_id,
            label,
            hmac_secret_template(kt, label, object_id, backup),
            f"{kt.name} secret",
        )
        return self._keep_secret(kt, object_id, key, wrap_key)


def hmac_secret_template(
    kt: algorithms.KeyType, label: str, object_id: bytes, backup: bool
) -> dict[Attribute, Any]:
    """The attributes of an HMAC key's secret on the token, for generating,
    unwrapping or creating one (the caller adds CKA_VALUE_LEN or CKA_VALUE):
    a private token object that signs and verifies (``CKM_SHA*_HMAC``) and
    does nothing else, sensitive; extractable only with ``backup``, and then
    only under a trusted key (as a backup-able private key is).
    """
    return {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.LABEL: label,
        Attribute.ID: object_id,
        Attribute.SIGN: True,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.DECRYPT: False,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: backup,
        # only when set: opencryptoki 3.8 refuses the attribute on secret keys
        # (AttributeTypeInvalid), and false is its default
        **({Attribute.WRAP_WITH_TRUSTED: True} if backup else {}),
    }
