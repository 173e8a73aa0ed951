"""The token session: with the parts it is made of (``keypairs.py``,
``hmac_secrets.py``, ``wrapping.py``, ``ceremony.py``, ``importing.py``,
``metadata.py``, and the helpers ``mechanisms.py``, ``objects.py`` and
``arrays.py``) the only modules that import python-pkcs11.  Runs in worker
processes (and in ``signd wrap-key``).

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

Backups (the wrap key, and keys only it may wrap) are ``wrapping.py``, the
ceremony that makes the wrap key (as the SO) ``ceremony.py``;
keypairs (``generate``, and ``restore_keypair`` and ``import_keypair``, as
they make keypairs as ``generate`` does) are ``keypairs.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import pkcs11
import pkcs11.exceptions as p11e
from pkcs11 import MGF, Attribute, Mechanism, ObjectClass

from ..errors import InternalError, TokenError, TokenUnavailable, WireError
from . import profiles
from .arrays import array_attribute_mapper
from .ceremony import WrapKeyCeremony
from .hmac_secrets import HMAC_MECHANISMS, hmac_secret_template
from .ipc import Outcome, SignJob, TokenInfo, VerifyJob, failed
from .keypairs import KeyPairs
from .mechanisms import MECHANISMS, capabilities, mechanism_name
from .metadata import APPLICATION, MetadataObjects
from .objects import spki_of as _spki

#: a label no object has: the deep probe searches for it
PROBE_LABEL: Final = "signd probe: matches nothing"
#: Pauses before asking ``C_GetTokenInfo`` again after it failed: SoftHSM
#: rewrites its token file in place when another process logs in, and a
#: reader catching it half-written gets GeneralError (measured: 39 of 238,234
#: probes against 1,380 logins a second; 1 still failing 10 ms later, none
#: after 60 ms).  A token really gone still fails after them.
CHECK_PAUSES: Final = (0.01, 0.05, 0.2)

__all__ = [
    "APPLICATION",
    "TokenSession",
    "hmac_secret_template",
    "map_error",
    "mechanism_name",
    "unraisable_hook",
]

log = logging.getLogger("signd.token")


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


class TokenSession(KeyPairs, WrapKeyCeremony, MetadataObjects):
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
            **capabilities(token.slot),
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
        which alone could also mean a key another process deleted).  A failure
        is asked again after ``CHECK_PAUSES``, before the token is taken for gone.

        Raises: TokenUnavailable (and ``lost`` is set).
        """
        if self.lost is None:
            for pause in (*CHECK_PAUSES, None):
                try:
                    self._slot.get_token()
                    break
                except p11e.PKCS11Error as exc:
                    if pause is None:
                        self.lost = f"{type(exc).__name__} from C_GetTokenInfo"
                    else:  # another process may be rewriting the token file
                        time.sleep(pause)
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
        mechanisms = MECHANISMS
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
