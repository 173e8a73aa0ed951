"""The token session: with the parts it is made of (``wrapping.py``,
``importing.py``, ``hmac_secrets.py``, ``objects.py``) the only modules that
import python-pkcs11.  Runs in worker processes (and in ``signd wrap-key``).

python-pkcs11 calls ``C_Initialize(NULL)``, so SoftHSM (and YubiHSM's module)
run without mutexes, and two threads in the module at once crash the process
(FIELD-NOTES).  signd therefore never calls PKCS#11 from the daemon process at
all: each token *worker* is a process of its own (``python -m signd.token FD``,
see ``worker.py``)
with its own module instance, one logged-in session and its own cached key
handles, and it runs every call on its only thread.  Several workers give
parallel sessions where the module allows them (SoftHSM's file store locks
across processes); a module that crashes takes one worker down, not signd.

This module is the session alone: ``worker.py`` is the process around it and
``ipc.py`` what the worker and the daemon say.  Every exception PKCS#11 (or a
bug) raises becomes a signd error in one place, ``map_error``, and
``TokenSession.failure`` adds the one question that decides between
``token_error`` and ``token_unavailable``: is the token still there?

Key metadata is kept on the token as ``CKO_DATA`` objects (application
``signd``, label = key name).  SoftHSM does not let a data object's value
change, so a write creates the next revision and then destroys older ones:
there is never a moment without metadata, and the newest revision wins.

Backups (the wrap key, and keys only it may wrap) are ``wrapping.py``;
putting a backed-up keypair back (``restore_keypair``) is here, beside
``generate``, as it makes keypairs as ``generate`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import pkcs11
import pkcs11.exceptions as p11e
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import DEFAULT, MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from ..errors import (
    Conflict,
    InternalError,
    InvalidArgument,
    TokenError,
    TokenUnavailable,
    UnsupportedAlgorithm,
    WireError,
)
from ..keys import algorithms
from ..keys.algorithms import Family, Scheme
from . import profiles
from .hmac_secrets import HMAC_MECHANISMS, SecretKeys, hmac_secret_template
from .ipc import Outcome, SignJob, TokenInfo, VerifyJob, failed
from .metadata import APPLICATION, MetadataObjects
from .objects import spki_of as _spki
from .wrapping import (
    WRAP_KEY_LABEL,
    array_attribute_mapper,
    cannot_wrap,
    probe_wrap,
    token_answer,
)

#: a label no object has: the deep probe searches for it
PROBE_LABEL: Final = "signd probe: matches nothing"

__all__ = [
    "APPLICATION",
    "TokenSession",
    "hmac_secret_template",
    "map_error",
    "mechanism_name",
    "unraisable_hook",
]

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

#: The mechanism of each signature scheme (a dict: an enum's attribute costs
#: more than a dict lookup, once per signature).
_MECHANISMS: Final = {
    Scheme.ECDSA: Mechanism.ECDSA,
    Scheme.EDDSA: Mechanism.EDDSA,
    Scheme.RSA_PKCS1: Mechanism.RSA_PKCS,
    Scheme.RSA_PSS: Mechanism.RSA_PKCS_PSS,
    Scheme.HMAC: Mechanism.SHA256_HMAC,  # stands for the three below: by the job's hash
}
_RSA_PSS: Final = Mechanism.RSA_PKCS_PSS
_HMAC: Final = Mechanism.SHA256_HMAC
_PSS: Final = {
    "sha256": (Mechanism.SHA256, MGF.SHA256, 32),
    "sha384": (Mechanism.SHA384, MGF.SHA384, 48),
    "sha512": (Mechanism.SHA512, MGF.SHA512, 64),
}
#: PKCS#11 errors that mean the session or the token is gone, not that a call failed.
_UNAVAILABLE: Final = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceRemoved,
    p11e.DeviceError,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.NoSuchToken,
    p11e.UserNotLoggedIn,
)


def map_error(exc: BaseException, what: str) -> WireError:
    """The worker's one exception map: anything raised by PKCS#11 (or by a
    bug) during ``what``, as a signd error.  A signd error stays as it is."""
    if isinstance(exc, WireError):
        return exc
    if isinstance(exc, _UNAVAILABLE):
        return TokenUnavailable(f"token unavailable during {what}: {type(exc).__name__}")
    if isinstance(exc, p11e.PKCS11Error):
        return TokenError(f"token failed {what}: {type(exc).__name__}")
    log.error("unexpected error in the token worker during %s", what, exc_info=exc)
    return InternalError(f"internal error during {what}; see the daemon log")


def unraisable_hook(u: Any) -> None:
    """For ``sys.unraisablehook``: python-pkcs11 finishes searches in
    ``__del__``; once the token is gone that fails too, and the traceback
    would say nothing more than "token lost"."""
    if isinstance(u.exc_value, p11e.PKCS11Error):
        log.debug("ignored in a finalizer", extra={"error": type(u.exc_value).__name__})
    else:
        log.warning("ignored in a finalizer", extra={"error": repr(u.exc_value)})


class TokenSession(SecretKeys, MetadataObjects):
    """One logged-in PKCS#11 session and its cached key handles.  Blocking."""

    def __init__(self) -> None:
        self._lib: Any = None
        self._session: Any = None
        self._private: dict[bytes, Any] = {}
        self._created: Any = None  # the record object ``create_metadata`` made last
        self._slot: Any = None
        self._profile = profiles.PROFILES["softhsm"]
        self._so = False  # the session is the SO's (``open_so``)
        #: why the token is taken for lost (set once; the worker then exits)
        self.lost: str | None = None

    def open(
        self, module_path: str, token_label: str, pin: str, profile: profiles.Profile
    ) -> TokenInfo:
        """Raises: TokenUnavailable (module, token or login)."""
        self._profile = profile
        token = self._token(module_path, token_label)
        try:
            self._session = token.open(rw=True, user_pin=pin)
        except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange):
            raise TokenUnavailable(f"login to token {token_label!r} failed: wrong PIN") from None
        except p11e.PinLocked:
            raise TokenUnavailable(f"the user PIN of token {token_label!r} is locked") from None
        self._private.clear()
        self._slot = token.slot
        serial = token.serial
        return TokenInfo(
            label=token.label.strip(),
            manufacturer=token.manufacturer_id.strip(),
            model=token.model.strip(),
            serial=serial.decode("ascii", "replace").strip()
            if isinstance(serial, bytes)
            else str(serial),
            **_capabilities(token.slot),
        )

    def open_so(
        self, module_path: str, token_label: str, so_pin: str, profile: profiles.Profile
    ) -> None:
        """Log in as the token's Security Officer (for ``create_wrap_key``).

        Login is per process: a process holds either this session or a user's
        (``open``), never both.

        Raises: TokenUnavailable (module, token or login).
        """
        self._profile = profile
        token = self._token(module_path, token_label)
        try:
            # The mapper packs CKA_UNWRAP_TEMPLATE for ``create_wrap_key``.
            self._session = token.open(
                rw=True, so_pin=so_pin, attribute_mapper=array_attribute_mapper()
            )
        except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange):
            raise TokenUnavailable(
                f"SO login to token {token_label!r} failed: wrong SO PIN"
            ) from None
        except p11e.PinLocked:
            raise TokenUnavailable(f"the SO PIN of token {token_label!r} is locked") from None
        except (p11e.UserAlreadyLoggedIn, p11e.AnotherUserAlreadyLoggedIn):
            raise TokenUnavailable(
                f"SO login to token {token_label!r} failed: this process is logged in already"
            ) from None
        self._private.clear()
        self._slot = token.slot
        self._so = True

    def _token(self, module_path: str, token_label: str) -> Any:
        """Load the module and find the token labelled ``token_label``.

        Raises: TokenUnavailable.
        """
        try:
            self._lib = pkcs11.lib(module_path)
        except Exception as exc:
            # C_Initialize answers CKR_HOST_MEMORY when a module cannot reach
            # its daemon (opencryptoki without pkcsslotd), not for lack of memory.
            hint = (
                " (is the token's daemon running? opencryptoki needs pkcsslotd)"
                if isinstance(exc, p11e.HostMemory)
                else ""
            )
            what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise TokenUnavailable(
                f"cannot load PKCS#11 module {module_path}: {what}{hint}"
            ) from None
        try:
            token = self._lib.get_token(token_label=token_label)
        except p11e.NoSuchToken:
            raise TokenUnavailable(f"no token labelled {token_label!r}") from None
        except p11e.MultipleTokensReturned:
            raise TokenUnavailable(f"more than one token labelled {token_label!r}") from None
        return token

    def close(self) -> None:
        if self._session is not None:
            try:
                self._session.close()
            except p11e.PKCS11Error:
                pass
            self._session = None
        self._so = False
        self._private.clear()

    def check(self) -> None:
        """Ask the token for its info (``C_GetTokenInfo``): the cheapest call
        that fails once the token is gone, both through p11-kit's client
        (``DeviceError``) and with SoftHSM whose token directory went away
        (``GeneralError``; its key handles then fail ``ObjectHandleInvalid``,
        which alone could also mean a key another process deleted).

        Raises: TokenUnavailable (and ``lost`` is set).
        """
        if self.lost is None:
            try:
                self._slot.get_token()
            except p11e.PKCS11Error as exc:
                self.lost = f"{type(exc).__name__} from C_GetTokenInfo"
        if self.lost is None and self._profile.deep_probe and self._session is not None:
            # A command the device itself answers (a YubiHSM's module answers
            # C_GetTokenInfo from its cache); it also keeps the session alive.
            try:
                for _ in self._session.get_objects({Attribute.LABEL: PROBE_LABEL}):
                    break
            except p11e.PKCS11Error as exc:
                self.lost = f"{type(exc).__name__} from C_FindObjects"
        if self.lost is not None:
            raise TokenUnavailable(f"the token is unavailable ({self.lost}); retry")

    def failure(self, exc: BaseException, what: str) -> WireError:
        """The error to answer for ``exc``: ``token_unavailable`` if the token
        turns out to be gone (it is asked, once, after any token error)."""
        err = map_error(exc, what)
        if self._slot is not None and isinstance(err, TokenError | TokenUnavailable):
            try:
                self.check()
            except TokenUnavailable as lost:
                return lost
        return err

    def _session_or_raise(self) -> Any:
        if self._session is None:
            raise TokenUnavailable("no session to the token")
        return self._session

    def run_jobs(
        self,
        jobs: Sequence[SignJob | VerifyJob],
        verify: Callable[[VerifyJob], list[Any] | None],
    ) -> list[Outcome]:
        """Run a batch of jobs, verifications by ``verify``; one outcome row
        each (see ``ipc.Outcome``)."""
        out: list[Outcome] = []
        private = self._private
        mechanisms = _MECHANISMS
        for job in jobs:
            if isinstance(job, VerifyJob):
                try:
                    out.append([True, verify(job)])
                except BaseException as exc:
                    out.append(failed(self.failure(exc, "verify")))
                continue
            object_id = job.object_id
            if self.lost is not None:  # no more calls into a token that is gone
                out.append(failed(TokenUnavailable(f"the token is unavailable ({self.lost})")))
                continue
            try:
                key = private.get(object_id)
                if key is None:
                    key = self._find_private(object_id)
                mechanism = mechanisms[job.scheme]
                if mechanism is _RSA_PSS:
                    sig = key.sign(
                        job.data, mechanism=mechanism, mechanism_param=_PSS[job.hash or ""]
                    )
                elif mechanism is _HMAC:
                    sig = key.sign(job.data, mechanism=HMAC_MECHANISMS[job.hash or ""])
                else:
                    sig = key.sign(job.data, mechanism=mechanism)
                out.append([True, sig])
            except BaseException as exc:
                # A cached handle may be what failed (a key deleted by
                # another process): the next use looks it up again.
                private.pop(object_id, None)
                out.append(failed(self.failure(exc, "sign")))
        return out

    def _find_private(self, object_id: bytes) -> Any:
        """The key that signs for ``object_id``: its private key, or (an HMAC
        key, searched only when there is no private key) its secret key."""
        session = self._session_or_raise()
        found = list(
            session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: object_id})
        )
        if not found:
            found = _find(session, ObjectClass.SECRET_KEY, object_id)
        if len(found) != 1:
            raise TokenError(
                f"expected one private key with id {object_id.hex()}, found {len(found)}"
            )
        self._private[object_id] = found[0]
        return found[0]

    def public_keys(self, object_ids: Sequence[bytes]) -> dict[bytes, tuple[bytes, bool]]:
        """(SPKI DER, has_private) by object id, of each id with one public key.

        A destroyed version has its public key and no private key; the caller
        knows which versions that is allowed for.  Private handles are cached.
        """
        session = self._session_or_raise()
        if len(object_ids) > BULK_LOOKUP:
            # Many ids (a start, a sync): two searches in all, each id's keys
            # picked by CKA_ID, rather than two searches an id (SoftHSM scans
            # every object on each, so a start would grow with keys squared).
            pubs_of = _by_id(session, ObjectClass.PUBLIC_KEY, object_ids)
            privs_of = _by_id(session, ObjectClass.PRIVATE_KEY, object_ids)
        else:
            pubs_of = {oid: _find(session, ObjectClass.PUBLIC_KEY, oid) for oid in object_ids}
            privs_of = {oid: _find(session, ObjectClass.PRIVATE_KEY, oid) for oid in object_ids}
        out: dict[bytes, tuple[bytes, bool]] = {}
        # HMAC keys: a secret key and no keypair.  Searched for only if some
        # id has no public key (an HMAC key's, or a keypair gone missing).
        lone = [oid for oid in object_ids if not pubs_of.get(oid)]
        if len(lone) > BULK_LOOKUP:
            secrets_of = _by_id(session, ObjectClass.SECRET_KEY, lone)
        else:
            secrets_of = {oid: _find(session, ObjectClass.SECRET_KEY, oid) for oid in lone}
        for oid in object_ids:
            pubs, privs = pubs_of.get(oid, []), privs_of.get(oid, [])
            secret = secrets_of.get(oid, [])
            if not pubs and not privs and len(secret) == 1:
                # The check value stands in for an SPKI (``hmac_check_value``).
                self._private[oid] = secret[0]
                out[oid] = (self._check_value(secret[0]), True)
                continue
            if len(pubs) != 1 or len(privs) > 1:
                log.warning(
                    "keypair incomplete on the token",
                    extra={"id": oid.hex(), "public": len(pubs), "private": len(privs)},
                )
                continue
            if privs:
                self._private[oid] = privs[0]
            out[oid] = (_spki(pubs[0]), bool(privs))
        return out

    def destroy_keys(self, object_id: bytes, public: bool) -> int:
        """Delete the private key with ``object_id``, and its public key if ``public``.

        Returns how many objects were deleted (0: already gone).
        """
        session = self._session_or_raise()
        self._private.pop(object_id, None)
        classes = [ObjectClass.PRIVATE_KEY] + ([ObjectClass.PUBLIC_KEY] if public else [])
        found = [
            obj
            for cls in classes
            for obj in session.get_objects({Attribute.CLASS: cls, Attribute.ID: object_id})
        ]
        if not found:  # an HMAC key's secret (nothing else has the id)
            found = _find(session, ObjectClass.SECRET_KEY, object_id)
        for obj in found:
            obj.destroy()
        return len(found)

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
            pub = self._create_public(key_type, object_id, label, public)
            made.append(pub)
            if _spki(pub) != spki:
                raise InvalidArgument(
                    "the public key does not read back from the token as given: "
                    "give it as the token does (an EC point uncompressed, a named curve)"
                )
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
            pub = self._create_public(key_type, object_id, label, public)
            made.append(pub)
            if _spki(pub) != spki:
                raise InvalidArgument(
                    "the public key does not read back from the token as given: "
                    "give it as the token does (an EC point uncompressed, a named curve)"
                )
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
    ) -> Any:
        """The public key object of ``public``, as ``generate`` makes one.

        Raises: UnsupportedAlgorithm if the token refuses this type of key.
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
            return self._session_or_raise().create_object(attrs)
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


def _capabilities(slot: Any) -> dict[str, Any]:
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
    raw = private.sign(plan.data, mechanism=_MECHANISMS[plan.scheme])
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


#: More ids than this are looked up with one search per object class.
BULK_LOOKUP: Final = 4


def _find(session: Any, cls: ObjectClass, oid: bytes) -> list[Any]:
    """The objects of class ``cls`` with CKA_ID ``oid``."""
    return list(session.get_objects({Attribute.CLASS: cls, Attribute.ID: oid}))


def _by_id(session: Any, cls: ObjectClass, oids: Sequence[bytes]) -> dict[bytes, list[Any]]:
    """The objects of class ``cls`` whose CKA_ID is one of ``oids``, by id: one search."""
    wanted = set(oids)
    found: dict[bytes, list[Any]] = {}
    for obj in session.get_objects({Attribute.CLASS: cls}):
        try:
            oid = bytes(obj[Attribute.ID])
        except p11e.AttributeTypeInvalid:
            continue  # a key without an id is none of ours
        if oid in wanted:
            found.setdefault(oid, []).append(obj)
    return found
