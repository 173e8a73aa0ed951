"""The token: the only module that imports python-pkcs11.

python-pkcs11 calls ``C_Initialize(NULL)``, so SoftHSM (and YubiHSM's module)
run without mutexes, and two threads in the module at once crash the process
(FIELD-NOTES).  So every PKCS#11 call of the process runs on **one** thread
that this module owns.

Work is *queued* to that thread, never called through a thread hop per
request: ``submit`` puts a batch of sign jobs on a queue and returns at once.
The thread drains everything queued, runs it, and hands all the results back
to trio with one ``run_sync_soon`` call, where each batch's callback runs.
Many requests therefore cost one hand-over each way.  Rare operations
(generate, metadata, status) go through the same queue with ``_call``.

There is one logged-in session for the life of the token (closing a PIN
session logs out every session of the process).  Private-key handles and
public keys are read once and cached.

Key metadata is kept on the token as ``CKO_DATA`` objects (application
``signd``, label = key name).  SoftHSM does not let a data object's value
change, so a write creates the next revision and then destroys older ones:
there is never a moment without metadata, and the newest revision wins.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from . import algorithms
from .algorithms import Family, Scheme
from .errors import (
    Busy,
    DeadlineExceeded,
    InternalError,
    TokenError,
    TokenUnavailable,
    UnsupportedAlgorithm,
    WireError,
)

__all__ = ["APPLICATION", "MetadataBlob", "SignJob", "Token", "TokenInfo"]

log = logging.getLogger("signd.token")

APPLICATION: Final = "signd"
#: CKA_EC_PARAMS for Ed25519: PrintableString "edwards25519" (YubiHSM accepts only this).
ED25519_PARAMS: Final = b"\x13\x0cedwards25519"
#: Jobs taken off the queue before results are handed back in one go.
MAX_DRAIN: Final = 1024

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
_PSS: Final = {
    "sha256": (Mechanism.SHA256, MGF.SHA256, 32),
    "sha384": (Mechanism.SHA384, MGF.SHA384, 48),
    "sha512": (Mechanism.SHA512, MGF.SHA512, 64),
}
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


def _map_error(exc: BaseException, what: str) -> WireError:
    """Translate anything raised on the token thread into a signd error."""
    if isinstance(exc, WireError):
        return exc
    if isinstance(exc, _UNAVAILABLE):
        return TokenUnavailable(f"token unavailable during {what}: {type(exc).__name__}")
    if isinstance(exc, p11e.PKCS11Error):
        return TokenError(f"token failed {what}: {type(exc).__name__}")
    log.error("unexpected error on the token thread during %s", what, exc_info=exc)
    return InternalError(f"internal error during {what}; see the daemon log")


@dataclass(frozen=True, slots=True)
class SignJob:
    """One signature for the token thread: which key, how, and over what."""

    object_id: bytes
    scheme: Scheme
    hash: str | None
    data: bytes


@dataclass(frozen=True, slots=True)
class TokenInfo:
    label: str
    manufacturer: str
    model: str
    serial: str
    mechanisms: int


@dataclass(frozen=True, slots=True)
class MetadataBlob:
    name: str
    revision: int
    value: bytes


T = TypeVar("T")
Outcome = tuple[bool, Any]  # (ok, value or WireError)


class _Item:
    """A unit of work on the queue: run on the thread, delivered in trio."""

    __slots__ = ("deliver", "run", "size")

    def __init__(
        self, run: Callable[[], Outcome], deliver: Callable[[Outcome], None], size: int
    ) -> None:
        self.run = run
        self.deliver = deliver
        self.size = size


_STOP: Final = object()


class Token:
    """Owns the PKCS#11 module, its one login, and the thread that calls it."""

    def __init__(
        self,
        module_path: str,
        token_label: str,
        pin: str,
        *,
        queue_limit: int = 65536,
    ) -> None:
        self._module_path = module_path
        self._token_label = token_label
        self._pin = pin
        self.queue_limit = queue_limit
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        self._pending = 0  # jobs queued and not yet delivered; touched in trio only
        self._thread: threading.Thread | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        # Token-thread state.  Only the token thread reads or writes these.
        self._lib: Any = None
        self._session: Any = None
        self._private: dict[bytes, Any] = {}
        self.info: TokenInfo | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def pending(self) -> int:
        """Jobs queued to the token and not yet answered."""
        return self._pending

    @property
    def is_open(self) -> bool:
        return self.info is not None

    async def open(self) -> TokenInfo:
        """Start the token thread, load the module, find the token and log in.

        Raises:
            TokenUnavailable: the module, the token or the login failed.
        """
        self._trio_token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._thread_main, name="signd-token", daemon=True)
        self._thread.start()
        info = await self._call(self._open_sync, "open")
        self.info = info
        return info

    async def aclose(self) -> None:
        """Log out, close the session and stop the thread after queued work."""
        if self._thread is None:
            return
        with trio.CancelScope(shield=True):
            try:
                await self._call(self._close_sync, "close")
            finally:
                self._queue.put(_STOP)
                await trio.to_thread.run_sync(self._thread.join)
                self._thread = None
                self.info = None

    # ------------------------------------------------------------ hot path

    def submit(
        self,
        jobs: Sequence[SignJob],
        done: Callable[[list[Outcome]], None],
        deadline: float = math.inf,
    ) -> None:
        """Queue a batch of signatures; ``done`` gets one outcome per job, in trio.

        An outcome is ``(True, signature bytes)`` or ``(False, WireError)``.
        A batch still queued at ``deadline`` (``time.monotonic()``) is not
        signed: each job gets ``DeadlineExceeded``.

        Raises:
            Busy: the queue holds ``queue_limit`` jobs already.
        """
        n = len(jobs)
        if self._thread is None:
            raise TokenUnavailable("the token is not open")
        if self._pending + n > self.queue_limit:
            raise Busy(f"token queue is full ({self._pending} signatures waiting)")
        self._pending += n

        def deliver(outcome: Outcome) -> None:
            self._pending -= n
            ok, value = outcome
            done(value if ok else [(False, value)] * n)

        def run() -> Outcome:
            if time.monotonic() > deadline:
                return (False, DeadlineExceeded("the request waited too long for the token"))
            return (True, self._sign_batch_sync(jobs))

        self._queue.put(_Item(run, deliver, n))

    # ------------------------------------------------------------ rare operations

    async def load_metadata(self, name: str | None = None) -> list[MetadataBlob]:
        """Read the newest metadata revision of one key, or of every key."""
        return await self._call(lambda: self._load_metadata_sync(name), "metadata read")

    async def write_metadata(self, name: str, revision: int, value: bytes) -> None:
        """Store revision ``revision`` of a key's metadata, then drop older ones."""
        await self._call(lambda: self._write_metadata_sync(name, revision, value), "metadata write")

    async def public_keys(self, object_ids: Sequence[bytes]) -> dict[bytes, bytes]:
        """Resolve keypairs by id: cache private handles, return SPKI DER per id.

        Ids with no complete keypair on the token are absent from the result.
        """
        return await self._call(lambda: self._resolve_sync(object_ids), "key lookup")

    async def generate(self, kt: algorithms.KeyType, object_id: bytes, label: str) -> bytes:
        """Generate a sign-only, non-extractable keypair; return its SPKI DER.

        Raises:
            UnsupportedAlgorithm, TokenError, TokenUnavailable.
        """
        return await self._call(lambda: self._generate_sync(kt, object_id, label), "key generation")

    # ------------------------------------------------------------ plumbing

    async def _call(self, fn: Callable[[], T], what: str) -> T:
        if self._thread is None:
            raise TokenUnavailable("the token is not open")
        done = trio.Event()
        box: list[Outcome] = []

        def deliver(outcome: Outcome) -> None:
            box.append(outcome)
            done.set()

        def run() -> Any:
            try:
                return (True, fn())
            except BaseException as exc:
                return (False, _map_error(exc, what))

        self._queue.put(_Item(run, deliver, 0))
        await done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def _thread_main(self) -> None:
        assert self._trio_token is not None
        q = self._queue
        while True:
            first = q.get()
            items = [first]
            while len(items) < MAX_DRAIN:
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            done: list[tuple[_Item, Outcome]] = []
            stop = False
            for item in items:
                if item is _STOP:
                    stop = True
                    continue
                assert isinstance(item, _Item)
                done.append((item, item.run()))
            if done:
                try:
                    self._trio_token.run_sync_soon(_deliver_all, done)
                except trio.RunFinishedError:
                    pass
            if stop:
                return

    # ------------------------------------------------------------ token thread

    def _open_sync(self) -> TokenInfo:
        try:
            self._lib = pkcs11.lib(self._module_path)
        except Exception as exc:
            raise TokenUnavailable(
                f"cannot load PKCS#11 module {self._module_path}: {exc}"
            ) from None
        try:
            token = self._lib.get_token(token_label=self._token_label)
        except p11e.NoSuchToken:
            raise TokenUnavailable(f"no token labelled {self._token_label!r}") from None
        except p11e.MultipleTokensReturned:
            raise TokenUnavailable(f"more than one token labelled {self._token_label!r}") from None
        try:
            self._session = token.open(rw=True, user_pin=self._pin)
        except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange):
            raise TokenUnavailable(
                f"login to token {self._token_label!r} failed: wrong PIN"
            ) from None
        except p11e.PinLocked:
            raise TokenUnavailable(
                f"the user PIN of token {self._token_label!r} is locked"
            ) from None
        self._private.clear()
        return TokenInfo(
            label=token.label.strip(),
            manufacturer=token.manufacturer_id.strip(),
            model=token.model.strip(),
            serial=token.serial.decode("ascii", "replace").strip()
            if isinstance(token.serial, bytes)
            else str(token.serial),
            mechanisms=len(token.slot.get_mechanisms()),
        )

    def _close_sync(self) -> None:
        if self._session is not None:
            try:
                self._session.close()
            except p11e.PKCS11Error:
                pass
            self._session = None
        self._private.clear()

    def _session_or_raise(self) -> Any:
        if self._session is None:
            raise TokenUnavailable("no session to the token")
        return self._session

    def _sign_batch_sync(self, jobs: Sequence[SignJob]) -> list[Outcome]:
        out: list[Outcome] = []
        private = self._private
        for job in jobs:
            try:
                key = private.get(job.object_id)
                if key is None:
                    key = self._find_private(job.object_id)
                if job.scheme is Scheme.ECDSA:
                    sig = key.sign(job.data, mechanism=Mechanism.ECDSA)
                elif job.scheme is Scheme.EDDSA:
                    sig = key.sign(job.data, mechanism=Mechanism.EDDSA)
                elif job.scheme is Scheme.RSA_PKCS1:
                    sig = key.sign(job.data, mechanism=Mechanism.RSA_PKCS)
                else:
                    assert job.hash is not None
                    sig = key.sign(
                        job.data, mechanism=Mechanism.RSA_PKCS_PSS, mechanism_param=_PSS[job.hash]
                    )
                out.append((True, sig))
            except BaseException as exc:
                out.append((False, _map_error(exc, "sign")))
        return out

    def _find_private(self, object_id: bytes) -> Any:
        session = self._session_or_raise()
        found = list(
            session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: object_id})
        )
        if len(found) != 1:
            raise TokenError(
                f"expected one private key with id {object_id.hex()}, found {len(found)}"
            )
        self._private[object_id] = found[0]
        return found[0]

    def _resolve_sync(self, object_ids: Sequence[bytes]) -> dict[bytes, bytes]:
        session = self._session_or_raise()
        out: dict[bytes, bytes] = {}
        for oid in object_ids:
            pubs = list(
                session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: oid})
            )
            privs = list(
                session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: oid})
            )
            if len(pubs) != 1 or len(privs) != 1:
                log.warning(
                    "keypair %s incomplete on token: %d public, %d private objects",
                    oid.hex(),
                    len(pubs),
                    len(privs),
                )
                continue
            self._private[oid] = privs[0]
            out[oid] = _spki(pubs[0])
        return out

    def _generate_sync(self, kt: algorithms.KeyType, object_id: bytes, label: str) -> bytes:
        session = self._session_or_raise()
        common: dict[str, Any] = {
            "store": True,
            "label": label,
            "id": object_id,
            "public_template": _PUBLIC_TEMPLATE,
            "private_template": _PRIVATE_TEMPLATE,
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
                    KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: ED25519_PARAMS}, local=True
                )
                pub, priv = params.generate_keypair(
                    mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN, **common
                )
        except (p11e.MechanismInvalid, p11e.AttributeValueInvalid, p11e.DomainParamsInvalid):
            raise UnsupportedAlgorithm(f"this token cannot generate {kt.name} keys") from None
        self._private[object_id] = priv
        return _spki(pub)

    def _load_metadata_sync(self, name: str | None) -> list[MetadataBlob]:
        session = self._session_or_raise()
        template: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.APPLICATION: APPLICATION,
        }
        if name is not None:
            template[Attribute.LABEL] = name
        newest: dict[str, MetadataBlob] = {}
        for obj in session.get_objects(template):
            blob = _parse_blob(obj[Attribute.LABEL], obj[Attribute.VALUE])
            if blob is None:
                log.warning("ignoring a signd data object with an unreadable value")
                continue
            cur = newest.get(blob.name)
            if cur is None or blob.revision > cur.revision:
                newest[blob.name] = blob
        return sorted(newest.values(), key=lambda b: b.name)

    def _write_metadata_sync(self, name: str, revision: int, value: bytes) -> None:
        session = self._session_or_raise()
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.MODIFIABLE: False,
                Attribute.APPLICATION: APPLICATION,
                Attribute.LABEL: name,
                Attribute.VALUE: revision.to_bytes(8, "big") + value,
            }
        )
        stale = [
            obj
            for obj in session.get_objects(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.APPLICATION: APPLICATION,
                    Attribute.LABEL: name,
                }
            )
            if (b := _parse_blob(name, obj[Attribute.VALUE])) is not None and b.revision < revision
        ]
        for obj in stale:
            obj.destroy()


def _parse_blob(label: str, value: bytes) -> MetadataBlob | None:
    if len(value) < 8:
        return None
    return MetadataBlob(label, int.from_bytes(value[:8], "big"), bytes(value[8:]))


def _spki(pub: Any) -> bytes:
    """SubjectPublicKeyInfo DER of a PKCS#11 public key object."""
    kt = pub.key_type
    if kt == KeyType.EC:
        return bytes(encode_ec_public_key(pub))
    if kt == KeyType.EC_EDWARDS:
        point = bytes(pub[Attribute.EC_POINT])
        raw = point[2:] if len(point) == 34 and point[:2] == b"\x04\x20" else point
        return ed25519.Ed25519PublicKey.from_public_bytes(raw).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if kt == KeyType.RSA:
        n = int.from_bytes(pub[Attribute.MODULUS], "big")
        e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
        return (
            rsa.RSAPublicNumbers(e, n)
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    raise TokenError(f"unexpected key type {kt!r} on the token")


def _deliver_all(done: list[tuple[_Item, Outcome]]) -> None:
    # Runs as a trio system callback: an exception here would end the run, so
    # a failing callback is logged and the others still get their results.
    for item, outcome in done:
        try:
            item.deliver(outcome)
        except Exception:
            log.exception("a token result could not be delivered")
