"""Requests to responses: keystore, token and algorithms, no sockets.

``Service.handle`` takes every request that one read of a connection
delivered and answers it through ``reply``:

* reads and ``verify`` are answered at once, in the caller's task;
* every ``sign`` of the batch goes to the token as **one** submission, and the
  answers come back in one callback;
* the rare operations (``create_key``, ``rotate``, and a look-up of a key this
  process has not seen yet) are returned as coroutines for the transport to run
  as tasks.

Each request gets exactly one ``reply``; the transport counts on that.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Final, TypeVar

import trio

from .. import __version__
from ..access.policy import Policy, Principal
from ..access.ratelimit import RateLimiter
from ..audit.log import AUDIT_KEY
from ..errors import (
    Busy,
    Conflict,
    DeadlineExceeded,
    DeletionNotAllowed,
    InternalError,
    InvalidArgument,
    InvalidDigest,
    KeyExists,
    KeyNotFound,
    PermissionDenied,
    UnsupportedAlgorithm,
    VersionNotFound,
    WireError,
)
from ..keys import algorithms
from ..keys.algorithms import KeyType
from ..keys.store import (
    DEFAULT_MAX_VERSIONS,
    DESTROYED,
    DISABLED,
    ENABLED,
    MAX_VERSIONS_LIMIT,
    KeyRecord,
    KeySettings,
    Keystore,
    LoadedKey,
    LoadedVersion,
    check_key_name,
    load_key,
    request_digest,
)
from ..metrics import Metrics
from ..protocol import (
    MAX_BATCH,
    MAX_JWKS_KEYS,
    PROTOCOL_VERSION,
    AuditHead,
    BatchItem,
    CreateKeyArgs,
    DestroyArgs,
    ErrorInfo,
    Health,
    Jwk,
    Jwks,
    JwksArgs,
    KeyList,
    KeyRefArgs,
    Message,
    PublicKey,
    PublicKeyArgs,
    Request,
    RotateArgs,
    SignArgs,
    SignBatchArgs,
    SignBatchResult,
    SignResult,
    TokenStatus,
    UpdateKeyArgs,
    VerifyArgs,
    VerifyResult,
    VersionRefArgs,
    check_idempotency_key,
    encode_error,
    encode_result,
)
from ..token.ipc import SignJob, VerifyJob
from ..token.pool import Entry, TokenPool
from ..token.profiles import PROFILES, Profile

__all__ = ["Reply", "Service", "SlowWork"]

log = logging.getLogger("signd.service")

#: ``reply(request_id, frame)``: hand one encoded response to the transport.
Reply = Callable[[int, bytes], None]
SlowWork = Callable[[], Awaitable[None]]

#: A name a token search found absent is answered key_not_found for this long
#: without another search.
REFRESH_INTERVAL: Final = 1.0
#: Distinct key names one uid may have waiting for a token search; past it,
#: a request for yet another unknown name is answered busy.
MAX_LOOKUP_NAMES_PER_UID: Final = 32
#: Random object ids drawn for a new keypair before giving up (ids the token
#: already uses are re-drawn; with 16-bit ids and ~1,000 objects, one in 65).
ID_DRAWS: Final = 8
MAX_LOOKUPS_TRACKED: Final = 4096
#: Operations that change a key: one at a time, each re-reading the key from the token.
ADMIN_OPS: Final = frozenset({"create_key", "rotate", "update_key", "disable", "enable", "destroy"})
#: Keys the daemon keeps for itself (the audit key signs checkpoints): a client
#: may read them (key_info, public_key, jwks) and verify with them, whatever
#: its grants, never sign with or change them, root included.
RESERVED_KEYS: Final = frozenset({AUDIT_KEY})
RESERVED_KEY_OPS: Final = frozenset({"key_info", "public_key", "verify"})
#: Token data objects of the daemon's own (the audit chain head) start so: not a
#: valid key name, so no key record can take one.
INTERNAL_RECORD_PREFIX: Final = "signd:"
#: The token queue's source for the daemon's own signatures (fair queueing).
_OWN_WORK: Final = object()
#: A lone ``verify`` with at most this many versions to try is answered inline
#: (fastest); one with more goes to the token workers (or a thread), so a key
#: with many versions never holds up this loop.
INLINE_VERIFY_CANDIDATES: Final = 4


class Service:
    def __init__(
        self,
        token: TokenPool,
        policy: Policy | None = None,
        *,
        limiter: RateLimiter | None = None,
        request_timeout: float = 30.0,
        min_rotate_period: float = 3600.0,
        sync_interval: float = 5.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        profile: Profile = PROFILES["softhsm"],
        default_max_versions: int = DEFAULT_MAX_VERSIONS,
        max_versions_limit: int = MAX_VERSIONS_LIMIT,
    ) -> None:
        self.token = token
        self.profile = profile
        self.policy = policy if policy is not None else Policy(())
        self.limiter = limiter
        self.keystore = Keystore()
        self.request_timeout = request_timeout
        self.metrics = metrics if metrics is not None else Metrics()
        self.min_rotate_period = min_rotate_period
        self.default_max_versions = min(default_max_versions, max_versions_limit)
        self.max_versions_limit = max_versions_limit
        self.sync_interval = sync_interval
        self._clock = clock
        self._started = time.monotonic()
        self._admin_lock = trio.Lock()
        #: set when a key changes here, so the lifecycle task re-plans its sleep
        self._changed = trio.Event()
        #: called with each automatic rotation (the audit log's hook)
        self.on_auto_rotate: Callable[[LoadedKey], Awaitable[None]] | None = None
        #: names found absent, with when the search that found so began
        self._absent: dict[str, float] = {}
        #: the names the next token search will look for; a search is running
        self._round = _Round()
        self._searching = False
        self._searched = trio.lowlevel.ParkingLot()
        #: distinct names waiting for a search, by uid
        self._lookups_by_uid: dict[int, int] = {}
        #: called with each pruning of retired versions, and the versions (the audit log's hook)
        self.on_auto_prune: Callable[[LoadedKey, list[int]], Awaitable[None]] | None = None
        #: scheduled rotations refused by ``max_versions``: key -> the record
        #: revision refused; tried again once the record changes
        self._rotation_refused: dict[str, int] = {}
        #: threads that verify for keys with many versions while no worker can
        self._verify_threads = trio.CapacityLimiter(2)
        self.loaded = False
        #: the audit log's chain head, for ``health`` (set when there is a log)
        self.audit_head: Callable[[], AuditHead | None] | None = None

    @property
    def ready(self) -> bool:
        return self.loaded and self.token.is_open

    async def load(self) -> None:
        """Read every key's metadata and public keys from the token."""
        records: list[KeyRecord] = []
        for blob in await self.token.load_metadata():
            if blob.name.startswith(INTERNAL_RECORD_PREFIX):
                continue  # not a key (the audit chain head)
            try:
                records.append(KeyRecord.from_bytes(blob.name, blob.revision, blob.value))
            except ValueError as exc:
                log.error("skipping key with unreadable metadata", extra={"error": str(exc)})
        ids = [v.object_id for r in records for v in r.versions]
        public = await self.token.public_keys(ids)
        for record in records:
            try:
                self.keystore.put(await self._load(record, public))
            except ValueError as exc:
                log.error("skipping key", extra={"key": record.name, "error": str(exc)})
        self.loaded = True
        log.info("keys loaded", extra={"keys": len(self.keystore)})

    # ------------------------------------------------------------ dispatch

    def handle(
        self, requests: Sequence[Request], reply: Reply, source: object, who: Principal
    ) -> list[SlowWork]:
        """Answer ``requests`` from ``source`` (a connection, for fair queueing).

        Returns the slow ones, for the caller to run as tasks.
        """
        groups: list[tuple[Request, list[Entry]]] = []  # (request, its entries)
        slow: list[SlowWork] = []
        deadline = time.monotonic() + self.request_timeout
        now = self._clock()
        started = time.perf_counter()
        metrics = self.metrics
        inline_ok = len(requests) == 1 and self.token.pending == 0
        for req in requests:
            try:
                args = req.args
                name = getattr(args, "key", None)
                if name is not None:
                    if name in RESERVED_KEYS and req.op not in RESERVED_KEY_OPS:
                        raise PermissionDenied(
                            f"key {name!r} is reserved for signd itself (it signs the audit "
                            f"log's checkpoints): no client may {req.op} it"
                        )
                    # Before the key is even looked up: a peer that may not
                    # use a key learns nothing about it, not even that it exists.
                    self.policy.check(who, req.op, name)
                if isinstance(args, SignArgs | SignBatchArgs):
                    key = self._key_or_none(args.key)
                    if key is None:
                        lookup = partial(
                            self._lookup_then_handle, req, args.key, reply, source, who
                        )
                        slow.append(lookup)
                        continue
                    # The version's state is checked on every request, so a
                    # disable takes effect on the very next one.
                    version = key.at(now).signing(args.version)
                    if isinstance(args, SignArgs):
                        self._limit(who, args.key, 1)
                        plan = algorithms.plan_sign(key.kt, args)
                        done = _sign_done(req.id, key, version, plan, reply, metrics, started)
                        groups.append((req, [Entry(_job(version, plan), done, deadline)]))
                    else:
                        # A batch costs its item count; a malformed one costs nothing.
                        self._limit(who, args.key, len(_batch_items(args)))
                        entries = _batch_entries(
                            req.id, key, version, args, reply, deadline, metrics, started
                        )
                        groups.append((req, entries))
                elif isinstance(args, VerifyArgs):
                    key = self._key_or_none(args.key)
                    if key is None:
                        slow.append(
                            partial(self._lookup_then_handle, req, args.key, reply, source, who)
                        )
                        continue
                    candidates = key.at(now).verifying(args.version)
                    self._limit(who, args.key, 1)
                    few = len(candidates) <= INLINE_VERIFY_CANDIDATES
                    if few and (inline_ok or not self.token.is_open):
                        # A lone verification is fastest right here; under
                        # load they go to the workers, so every core verifies
                        # and this loop keeps to the sockets (measured: doing
                        # a share here too only slows the loop down).  So do
                        # the many versions of a key: each costs a verification.
                        answer = _verify(key, candidates, args)
                        metrics.verified(args.key, "valid" if answer.valid else "invalid")
                        reply(req.id, encode_result(req.id, answer))
                    elif not self.token.is_open:  # no worker to take many: a thread
                        slow.append(partial(self._verify_in_thread, req, key, candidates, reply))
                    else:
                        entry = Entry(
                            _verify_job(key, candidates, args),
                            _verify_done(req.id, key, reply, metrics),
                            deadline,
                        )
                        groups.append((req, [entry]))
                elif req.op in ADMIN_OPS:
                    slow.append(partial(self._admin, req, reply))
                else:
                    result = self._read(req, who)
                    if isinstance(result, str):  # a key to look up on the token first
                        lookup = partial(self._lookup_then_handle, req, result, reply, source, who)
                        slow.append(lookup)
                        continue
                    reply(req.id, encode_result(req.id, result))
            except WireError as exc:
                self._refused(req, exc)
                reply(req.id, encode_error(req.id, exc))
            except Exception:
                log.exception("internal error", extra={"op": req.op})
                bug = InternalError("internal error; see daemon log")
                self._refused(req, bug)
                reply(req.id, encode_error(req.id, bug))
        if groups:
            for req, entries in groups:
                if not entries:
                    continue  # a batch whose every item was refused is answered already
                try:
                    self.token.enqueue(source, entries)
                except WireError as exc:  # busy, or no worker: the request fails whole
                    if isinstance(exc, Busy):
                        metrics.limit_hit("token_queue")
                    self._refused(req, exc)
                    reply(req.id, encode_error(req.id, exc))
            self.token.pump()
        return slow

    def _refused(self, req: Request, exc: WireError) -> None:
        """Count a request answered with an error before it reached the token."""
        self.metrics.error(req.op, exc)
        name = getattr(req.args, "key", None)
        if name is None or name not in self.keystore or isinstance(exc, PermissionDenied):
            # An unknown key never becomes a label, and a peer the policy
            # refused moves no key's series (nor learns that the key exists).
            return
        version = getattr(req.args, "version", None)
        if isinstance(exc, VersionNotFound):
            version = None  # a version the key does not have never becomes a label
        if req.op in ("sign", "sign_batch"):
            self.metrics.sign_failed(name, version, "", exc)
        elif req.op == "verify":
            self.metrics.verified(name, exc.name)

    def _limit(self, who: Principal, key: str, cost: int) -> None:
        """Raises: RateLimited."""
        if self.limiter is not None:
            self.limiter.check(who.uid, key, cost)

    def _key_or_none(self, name: str) -> LoadedKey | None:
        if name in self.keystore:
            return self.keystore.get(name)
        check_key_name(name)
        return None

    def _read(self, req: Request, who: Principal) -> Message | str:
        """Answer a read, or name a key that must first be looked up on the token."""
        args = req.args
        if req.op == "health":
            health = self.health()
            if self.audit_head is not None and self.policy.allows(who, "read", AUDIT_KEY):
                health = dataclasses.replace(health, audit=self.audit_head())
            return health
        if req.op == "list_keys":  # only the keys this peer may read
            allows = self.policy.allows
            return KeyList(
                keys=tuple(
                    k.summary() for k in self.keystore.all() if allows(who, "read", k.record.name)
                )
            )
        if isinstance(args, JwksArgs):
            return self._jwks(args, who)
        assert isinstance(args, KeyRefArgs | PublicKeyArgs)
        key = self._key_or_none(args.key)
        if key is None:
            return args.key
        key.at(self._clock())
        if isinstance(args, PublicKeyArgs):
            if args.version is not None:
                v = key.version(args.version)
            else:  # the version sign uses, or else the newest
                v = key.signer or key.version(key.record.latest.version)
            return PublicKey(
                name=key.record.name,
                version=v.record.version,
                type=key.kt.name,
                public_key_pem=v.public_key_pem,
            )
        return key.info()

    def _jwks(self, args: JwksArgs, who: Principal) -> Jwks | str:
        """Every version of the named keys that may verify now, as JWKs."""
        # The limit counts the names as sent, repeats included (PROTOCOL.md).
        if not 1 <= len(args.keys) <= MAX_JWKS_KEYS:
            raise InvalidArgument(
                f"'keys' must name 1 to {MAX_JWKS_KEYS} keys, got {len(args.keys)}"
            )
        names = list(dict.fromkeys(args.keys))  # repeats named once, order kept
        for name in names:
            check_key_name(name)
            self.policy.check(who, "jwks", name)
        now = self._clock()
        out: list[Jwk] = []
        for name in names:
            key = self._key_or_none(name)
            if key is None:
                return name
            kt = key.at(now).kt
            out.extend(
                algorithms.jwk(kt, v.public_key, f"{name}:{v.record.version}")
                for v in key.verifiers
            )
        return Jwks(keys=tuple(out))

    def health(self) -> Health:
        info = self.token.info
        token = None
        if info is not None:
            token = TokenStatus(
                label=info.label,
                manufacturer=info.manufacturer,
                model=info.model,
                serial=info.serial,
                logged_in=True,
                profile=self.profile.name,
                key_types=tuple(t for t, why in info.key_types.items() if why is None),
                mechanisms=tuple(info.mechanisms),
            )
        ready = self.ready
        return Health(
            status="ok" if ready else "unavailable",
            live=True,
            ready=ready,
            daemon_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            uptime=time.monotonic() - self._started,
            keys=len(self.keystore),
            token=token,
            detail=None if ready else "the token is not open or the keys are not loaded",
        )

    # ------------------------------------------------------------ slow paths

    async def _lookup_then_handle(
        self, req: Request, name: str, reply: Reply, source: object, who: Principal
    ) -> None:
        """A key this process has not seen: another process may have made it."""
        try:
            with trio.fail_after(self.request_timeout):
                await self._look_up(name, who)
            if name not in self.keystore:
                raise KeyNotFound(f"no key named {name!r}")
        except trio.TooSlowError:
            exc: WireError = DeadlineExceeded("key look-up timed out")
            self.metrics.limit_hit("request_timeout")
            self._refused(req, exc)
            reply(req.id, encode_error(req.id, exc))
            return
        except WireError as error:
            self._refused(req, error)
            reply(req.id, encode_error(req.id, error))
            return
        except Exception:
            log.exception("key look-up failed", extra={"key": name})
            exc = InternalError("key look-up failed; see daemon log")
            self._refused(req, exc)
            reply(req.id, encode_error(req.id, exc))
            return
        for work in self.handle([req], reply, source, who):  # now known: no slow work
            await work()

    async def _verify_in_thread(
        self, req: Request, key: LoadedKey, candidates: list[LoadedVersion], reply: Reply
    ) -> None:
        """A verification with many versions to try while no token worker can
        take it: in a thread (two at most), so this loop goes on serving."""
        args = req.args
        assert isinstance(args, VerifyArgs)
        try:
            answer = await trio.to_thread.run_sync(
                _verify, key, candidates, args, limiter=self._verify_threads
            )
        except WireError as exc:
            self._refused(req, exc)
            reply(req.id, encode_error(req.id, exc))
            return
        except Exception:
            log.exception("internal error", extra={"op": req.op})
            bug = InternalError("internal error; see daemon log")
            self._refused(req, bug)
            reply(req.id, encode_error(req.id, bug))
            return
        self.metrics.verified(args.key, "valid" if answer.valid else "invalid")
        reply(req.id, encode_result(req.id, answer))

    async def _look_up(self, name: str, who: Principal) -> None:
        """Have the token searched for ``name`` by a search that begins now or later.

        Names this process has not loaded are looked up **together**: at most
        one token search runs at a time, and it looks for every name that was
        asked for while the previous one ran (one name: a search by label;
        several: one listing of every key record, which answers them all).
        So a flood of unknown names costs a search per round, not per name,
        and a signing worker has at most one search ahead of signing work.
        The search is made by one of the waiting requests' own tasks, with
        the token call shielded, so a request that gives up cannot leave the
        others without an answer.  Besides:

        * a name found absent is answered ``key_not_found`` without another
          search for ``REFRESH_INTERVAL`` (negative caching, bounded);
        * a request that adds a name to a search costs one token of its
          peer's rate-limit bucket, if there is one (``rate_limited``);
        * a uid may have ``MAX_LOOKUP_NAMES_PER_UID`` distinct names waiting;
          a request for another is answered ``busy``.

        A key another process made is still found on the first request for it.

        Raises: Busy, RateLimited, or the search's WireError.
        """
        if name in self.keystore:
            return
        absent = self._absent.get(name)
        if absent is not None and time.monotonic() - absent < REFRESH_INTERVAL:
            return
        r = self._round
        if name not in r.names:
            uid = who.uid
            waiting = self._lookups_by_uid.get(uid, 0)
            if waiting >= MAX_LOOKUP_NAMES_PER_UID:
                raise Busy(
                    f"uid {uid} has {waiting} key names waiting to be looked up on the "
                    "token; retry later"
                )
            if self.limiter is not None:
                self.limiter.charge(uid, 1)
            r.names[name] = uid
            self._lookups_by_uid[uid] = waiting + 1
        while not r.done:
            if self._searching:
                await self._searched.park()
            else:
                await self._search()
        if r.error is not None:
            raise r.error

    async def _search(self) -> None:
        """Search the token for the waiting names, round after round."""
        self._searching = True
        try:
            while self._round.names:
                r, self._round = self._round, _Round()
                with trio.CancelScope(shield=True):
                    await self._search_round(r)
                await trio.lowlevel.checkpoint()  # a cancelled searcher hands over here
        finally:
            self._searching = False
            self._searched.unpark_all()

    async def _search_round(self, r: _Round) -> None:
        started = time.monotonic()
        names = list(r.names)
        try:
            blobs = await self.token.load_metadata(names[0] if len(names) == 1 else None)
            self.metrics.key_lookups += 1
            found = {b.name: b for b in blobs}
            for name in names:
                blob = found.get(name)
                if blob is None:
                    self._note_absent(name, started)
                    continue
                cached = self.keystore.get_or_none(name)
                if cached is not None and cached.record.revision >= blob.revision:
                    continue
                try:
                    record = KeyRecord.from_bytes(name, blob.revision, blob.value)
                    self.keystore.put(await self._load(record))
                except ValueError as exc:
                    log.error("skipping key", extra={"key": name, "error": str(exc)})
        except WireError as exc:
            r.error = exc
        except Exception:
            log.exception("key look-up failed", extra={"keys": len(names)})
            r.error = InternalError("key look-up failed; see daemon log")
        finally:
            r.done = True
            for uid in r.names.values():
                left = self._lookups_by_uid[uid] - 1
                if left:
                    self._lookups_by_uid[uid] = left
                else:
                    del self._lookups_by_uid[uid]
            self._searched.unpark_all()

    def _note_absent(self, name: str, when: float) -> None:
        """Remember that ``name`` was absent; the table is bounded, so random
        names cannot grow it (a name not remembered is just searched again)."""
        if len(self._absent) >= MAX_LOOKUPS_TRACKED:
            self._absent = {n: t for n, t in self._absent.items() if when - t < REFRESH_INTERVAL}
            if len(self._absent) >= MAX_LOOKUPS_TRACKED:
                return
        self._absent[name] = when

    async def _refresh(self, name: str) -> LoadedKey | None:
        """Read one key from the token into the cache; None if it does not exist."""
        record = await self._read_record(name)
        if record is None:
            return None
        key = await self._load(record)
        self.keystore.put(key)
        return key

    async def _read_record(self, name: str) -> KeyRecord | None:
        blobs = await self.token.load_metadata(name)
        if not blobs:
            return None
        return KeyRecord.from_bytes(name, blobs[0].revision, blobs[0].value)

    async def _load(
        self, record: KeyRecord, public: dict[bytes, tuple[bytes, bool]] | None = None
    ) -> LoadedKey:
        """The record with its public keys; finishes a destroy a crash interrupted.

        Raises: ValueError (a version's keys are missing on the token).
        """
        if public is None:
            public = await self.token.public_keys([v.object_id for v in record.versions])
        for v in record.versions:
            spki, has_private = public.get(v.object_id, (None, False))
            if v.state == DESTROYED and has_private:
                # The record says destroyed, so the private key goes: right after
                # a destroy, or on the next load if a crash came in between.
                await self.token.destroy_keys(v.object_id)
                log.warning(
                    "private key destroyed", extra={"key": record.name, "version": v.version}
                )
            elif v.state != DESTROYED and spki is not None and not has_private:
                raise ValueError(
                    f"key {record.name!r} version {v.version}: its private key is missing "
                    "on the token"
                )
        spkis = {oid: spki for oid, (spki, _) in public.items()}
        return load_key(record, spkis, self._clock(), self._cap(record))

    def _cap(self, record: KeyRecord) -> int:
        """The most versions not destroyed ``record`` may hold on this daemon."""
        return record.settings.version_cap(self.default_max_versions, self.max_versions_limit)

    async def _admin(self, req: Request, reply: Reply) -> None:
        try:
            # Shielded: a key half made must not be left behind by a cancel.
            with trio.CancelScope(shield=True):
                async with self._admin_lock:
                    key, made = await self._change(req.op, req.args)
            self._changed.set()
            info = key.info()
            if made is not None:  # create_key, rotate: the version they made
                version, replayed = made
                info = dataclasses.replace(info, created_version=version)
                if req.op == "rotate" and not replayed:
                    self.metrics.rotated(key.record.name, "manual")
            reply(req.id, encode_result(req.id, info))
        except WireError as exc:
            self._refused(req, exc)
            reply(req.id, encode_error(req.id, exc))
        except Exception:
            log.exception("internal error", extra={"op": req.op})
            error = InternalError("internal error; see daemon log")
            self._refused(req, error)
            reply(req.id, encode_error(req.id, error))

    async def _change(self, op: str, args: Message) -> tuple[LoadedKey, tuple[int, bool] | None]:
        """Run one admin operation (under the admin lock).

        Returns the key, and for create_key and rotate (version made, replayed).
        """
        if isinstance(args, CreateKeyArgs | RotateArgs):
            return await self._make_version(args)
        return await self._change_key(op, args), None

    async def _make_version(
        self, args: CreateKeyArgs | RotateArgs
    ) -> tuple[LoadedKey, tuple[int, bool]]:
        """create_key or rotate, answered again if its idempotency key made a version.

        The key is stored with the version, in the same compare-and-swap
        write of the key's record: a repeat (here, in another process on the
        token, or after a restart) finds it there.  If that write loses a race
        (``Conflict``), the winner may have been this very request, sent again
        to another process: the record is read once more before giving up.
        """
        name = check_key_name(args.key)
        idempotency = None
        if args.idempotency_key is not None:
            check_idempotency_key(args.idempotency_key)
            idempotency = (args.idempotency_key, _request_digest(args))
        try:
            if isinstance(args, CreateKeyArgs):
                key = await self._create(args, idempotency)
            else:
                key = await self._rotate_request(name, idempotency)
        except _Replay as replay:
            return await self._replay(replay.record, replay.version, raced=False)
        except Conflict:
            if idempotency is None:
                raise
            record = await self._read_record(name)
            made = record.made_by(*idempotency) if record is not None else None
            if record is None or made is None:
                raise
            return await self._replay(record, made.version, raced=True)
        return key, (key.record.latest.version, False)

    async def _replay(
        self, record: KeyRecord, version: int, *, raced: bool
    ) -> tuple[LoadedKey, tuple[int, bool]]:
        """The answer to a request repeated under its idempotency key: nothing is done.

        ``raced``: the repeat was in progress here when the first one's write landed.
        """
        key = await self._store(record, None)
        log.info(
            "idempotent request repeated; answered again",
            extra={"key": record.name, "version": version, "raced": raced},
        )
        return key, (version, True)

    async def _rotate_request(self, name: str, idempotency: tuple[str, str] | None) -> LoadedKey:
        # Always from the token, never the cache: another process may have changed it.
        record = await self._read_record(name)
        if record is None:
            self.keystore.forget(name)
            raise KeyNotFound(f"no key named {name!r}")
        if idempotency is not None:
            made = record.made_by(*idempotency)
            if made is not None:
                raise _Replay(record, made.version)
        return await self._rotate(record, idempotency)

    async def _change_key(self, op: str, args: Message) -> LoadedKey:
        """update_key, disable, enable or destroy."""
        name = check_key_name(getattr(args, "key", ""))
        # Always from the token, never the cache: another process may have changed it.
        record = await self._read_record(name)
        if record is None:
            self.keystore.forget(name)
            raise KeyNotFound(f"no key named {name!r}")
        if isinstance(args, UpdateKeyArgs):
            # The rotation floor applies to a period being set, not to one set
            # before the floor was raised (that would block every other change).
            floor = self.min_rotate_period if args.auto_rotate_period is not None else 0.0
            # Likewise the limit: to a max_versions being set.
            limit = self.max_versions_limit if args.max_versions is not None else 1 << 62
            settings = _settings(args, record.settings).check(record.latest.version, floor, limit)
            if settings == record.settings:
                return await self._store(record, None)
            return await self._store(record.with_settings(settings), "key settings changed")
        if isinstance(args, VersionRefArgs):
            return await self._set_state(
                record, args.version, DISABLED if op == "disable" else ENABLED
            )
        assert isinstance(args, DestroyArgs)
        if (args.version is None) == (args.all is not True):
            raise InvalidArgument("destroy: give exactly one of 'version' and 'all': true")
        return await self._destroy(record, args.version)

    async def _store(self, record: KeyRecord, what: str | None) -> LoadedKey:
        """Write ``record`` (a new revision) unless ``what`` is None; cache it."""
        if what is not None:
            await self.token.write_metadata(record.name, record.revision, record.to_bytes())
        key = await self._load(record)
        self.keystore.put(key)
        if what is not None:
            log.info(what, extra={"key": record.name, "revision": record.revision})
        return key

    async def _set_state(self, record: KeyRecord, version: int, state: str) -> LoadedKey:
        new = record.with_state([version], state)
        if new.versions == record.versions:
            return await self._store(record, None)  # already so: nothing to write
        verb = "disabled" if state == DISABLED else "enabled"
        return await self._store(new, f"key version {version} {verb}")

    async def _destroy(self, record: KeyRecord, version: int | None) -> LoadedKey:
        if not record.settings.deletion_allowed:
            raise DeletionNotAllowed(
                f"key {record.name!r} does not allow deletion; set deletion_allowed first "
                "(an admin operation)"
            )
        numbers = [v.version for v in record.versions] if version is None else [version]
        new = record.with_state(numbers, DESTROYED)
        if new.versions == record.versions:
            return await self._store(record, None)  # already destroyed (or being finished)
        # The record first: once it says destroyed the version never signs again,
        # and loading it deletes the private keys (see ``_load``).
        return await self._store(new, "key versions destroyed")

    async def _create(
        self, args: CreateKeyArgs, idempotency: tuple[str, str] | None = None
    ) -> LoadedKey:
        """Raises: _Replay when the key exists, made by this same request."""
        name = check_key_name(args.key)
        kt = algorithms.key_type(args.type)
        self.profile.check_key_name(name)
        settings = _settings(args, KeySettings()).check(
            1, self.min_rotate_period, self.max_versions_limit
        )
        blobs = await self.token.load_metadata(name)
        if blobs:
            if idempotency is not None:
                try:
                    record = KeyRecord.from_bytes(name, blobs[0].revision, blobs[0].value)
                except ValueError:
                    pass  # whatever it is, the name is taken
                else:
                    made = record.made_by(*idempotency)
                    if made is not None:
                        raise _Replay(record, made.version)
            await self._refresh(name)
            raise KeyExists(f"a key named {name!r} already exists")
        object_id, spki = await self._generate(kt, name, 1)
        record = KeyRecord.new(name, kt, self._clock(), object_id, settings, idempotency)
        await self._write_new_version(record, object_id)
        key = load_key(record, {object_id: spki}, self._clock(), self._cap(record))
        self.keystore.put(key)
        log.info("key created", extra={"key": name, "type": kt.name})
        return key

    async def _rotate(
        self, record: KeyRecord, idempotency: tuple[str, str] | None = None
    ) -> LoadedKey:
        """Raises: DeletionNotAllowed (the key is at its ``max_versions`` and
        no version may be pruned: nothing was made)."""
        kt = algorithms.key_type(record.type)
        # Retired versions make room (pruned in the same write); a full key
        # with none is refused before a keypair is made for it.
        prune = record.room_for_one_more(self._clock(), self._cap(record))
        # The new version exists on the token before any record points to it.
        object_id, _ = await self._generate(kt, record.name, record.next_version)
        record = record.rotated(self._clock(), object_id, idempotency, prune)
        await self._write_new_version(record, object_id)
        # Loading a record that says destroyed deletes the private keys, or
        # the next load does if a crash comes first (see ``_load``).
        key = await self._load(record)
        self.keystore.put(key)
        log.info("key rotated", extra={"key": record.name, "version": record.latest.version})
        if prune:
            log.info("retired versions pruned", extra={"key": record.name, "versions": prune})
        return key

    async def _generate(self, kt: KeyType, name: str, version: int) -> tuple[bytes, bytes]:
        """A new keypair for ``name`` version ``version``: its CKA_ID and SPKI DER.

        Raises: UnsupportedAlgorithm (the token cannot make ``kt``),
        InvalidArgument (the label does not fit the token).
        """
        info = self.token.info
        if info is not None and info.key_types.get(kt.name) is not None:
            can = [t for t, why in info.key_types.items() if why is None]
            raise UnsupportedAlgorithm(
                f"this token ({info.manufacturer} {info.model}) cannot make {kt.name} keys: "
                f"{info.key_types[kt.name]}; it can make: {', '.join(can) or 'none'}"
            )
        label = self.profile.object_label(name, version)
        for _ in range(ID_DRAWS - 1):
            object_id = self.profile.new_object_id()
            try:
                return object_id, await self.token.generate(kt.name, object_id, label)
            except Conflict:  # the id is taken: short ids (YubiHSM: 16 bits) collide
                continue
        object_id = self.profile.new_object_id()
        return object_id, await self.token.generate(kt.name, object_id, label)

    async def _write_new_version(self, record: KeyRecord, object_id: bytes) -> None:
        """Write a record that adds the keypair ``object_id``.

        Raises: Conflict, after deleting the keypair no record will ever name.
        """
        try:
            await self.token.write_metadata(record.name, record.revision, record.to_bytes())
        except Conflict:
            await self.token.destroy_keys(object_id, public=True)
            raise

    # ------------------------------------------------------------ the daemon's own key

    async def ensure_audit_key(self) -> LoadedKey:
        """The audit key, made on the token if it is not there yet (ec-p256, or
        rsa-2048 on a token without EC), the way ``create_key`` makes a key.

        Raises: WireError.
        """
        async with self._admin_lock:
            key = await self._refresh(AUDIT_KEY)
            if key is not None:
                return key
            info = self.token.info
            ec_ok = info is None or info.key_types.get("ec-p256") is None
            kt = algorithms.key_type("ec-p256" if ec_ok else "rsa-2048")
            object_id, spki = await self._generate(kt, AUDIT_KEY, 1)
            record = KeyRecord.new(AUDIT_KEY, kt, self._clock(), object_id, KeySettings())
            try:
                await self._write_new_version(record, object_id)
            except Conflict:  # another daemon on this token made it meanwhile
                key = await self._refresh(AUDIT_KEY)
                if key is None:
                    raise
                return key
            key = load_key(record, {object_id: spki}, self._clock())
            self.keystore.put(key)
            log.info("audit key created", extra={"key": AUDIT_KEY, "type": kt.name})
            return key

    def audit_key_version(self) -> int:
        """The audit key's version that signs now.  Raises: WireError."""
        key = self.keystore.get(AUDIT_KEY)
        return key.at(self._clock()).signing(None).record.version

    async def sign_audit(self, version: int, message: bytes) -> bytes:
        """Sign ``message`` with the audit key (SHA-256; ECDSA DER or PKCS#1 v1.5),
        through the token queue like any signature.  Only the daemon calls this.

        Raises: WireError.
        """
        key = self.keystore.get(AUDIT_KEY)
        signer = key.at(self._clock()).signing(version)
        plan = algorithms.plan_sign(key.kt, SignArgs(key=AUDIT_KEY, message=message))
        answered = trio.Event()
        outcome: list[Any] = []

        def done(ok: bool, value: Any) -> None:
            outcome[:] = [ok, value]
            answered.set()

        deadline = time.monotonic() + self.request_timeout
        self.token.enqueue(_OWN_WORK, [Entry(_job(signer, plan), done, deadline)])
        self.token.pump()
        await answered.wait()
        ok, value = outcome
        if not ok:
            assert isinstance(value, WireError)
            raise value
        return algorithms.finish_signature(plan, value)

    # ------------------------------------------------------------ lifecycle task

    async def run_lifecycle(self) -> None:
        """Rotate keys on schedule, prune retired versions, and keep the cache
        in step with the token.

        Every ``sync_interval`` the key records are re-read from the token, so
        a change made by another process sharing it (a second daemon, an
        operator's tool) takes effect here too, and the retired versions of
        keys that allow deletion are destroyed.  Runs until cancelled.
        """
        while True:
            due = [
                (t, k.record.name)
                for k in self.keystore.all()
                if (t := k.record.next_rotation(self.min_rotate_period)) is not None
                # refused for max_versions: not again until the record changes
                and self._rotation_refused.get(k.record.name) != k.record.revision
            ]
            wake = min([self._clock() + self.sync_interval, *(t for t, _ in due)])
            self._changed = trio.Event()
            with trio.move_on_after(max(0.0, wake - self._clock())):
                await self._changed.wait()
            try:
                await self._sync()
                for _, name in due:
                    try:
                        await self._rotate_if_due(name)
                    except Conflict:  # another daemon rotated it: the next sync sees that
                        log.info("key rotated elsewhere meanwhile", extra={"key": name})
                await self._prune_retired()
            except WireError as exc:  # the token is away: try again a little later
                log.warning("key lifecycle pass failed", extra={"error": str(exc)})
                await trio.sleep(self.sync_interval)
            except Exception:
                log.exception("key lifecycle pass failed")
                await trio.sleep(self.sync_interval)

    async def _sync(self) -> None:
        """Re-read every key record; reload the keys whose revision moved."""
        for blob in await self.token.load_metadata():
            if blob.name.startswith(INTERNAL_RECORD_PREFIX):
                continue
            cached = self.keystore.get_or_none(blob.name)
            if cached is not None and cached.record.revision >= blob.revision:
                continue  # (older: read before a change made here meanwhile)
            async with self._admin_lock:
                try:
                    record = KeyRecord.from_bytes(blob.name, blob.revision, blob.value)
                    self.keystore.put(await self._load(record))
                except ValueError as exc:
                    log.error("skipping key", extra={"key": blob.name, "error": str(exc)})

    async def _rotate_if_due(self, name: str) -> None:
        with trio.CancelScope(shield=True):
            async with self._admin_lock:
                record = await self._read_record(name)  # fresh: another process may have
                due = record.next_rotation(self.min_rotate_period) if record else None
                if record is None or due is None or due > self._clock():
                    return
                try:
                    key = await self._rotate(record)
                except DeletionNotAllowed as exc:  # full: max_versions, nothing to prune
                    self._rotation_refused[name] = record.revision
                    self.metrics.error("rotate", exc)
                    log.error("scheduled rotation refused", extra={"key": name, "error": str(exc)})
                    return
        self._rotation_refused.pop(name, None)
        self.metrics.rotated(name, "scheduled")
        log.info(
            "key rotated on schedule", extra={"key": name, "version": key.record.latest.version}
        )
        if self.on_auto_rotate is not None:
            await self.on_auto_rotate(key)

    async def _prune_retired(self) -> None:
        """Destroy the retired versions of every key that allows deletion."""
        now = self._clock()
        for name in [k.record.name for k in self.keystore.all() if k.record.prunable(now)]:
            try:
                await self._prune(name)
            except Conflict:  # another process changed it: the next pass looks again
                log.info("key changed elsewhere while pruning", extra={"key": name})

    async def _prune(self, name: str) -> None:
        """Destroy ``name``'s retired versions, if it allows deletion: the
        record first, then the private keys (as ``destroy`` does, so a crash
        in between is finished on the next load)."""
        with trio.CancelScope(shield=True):
            async with self._admin_lock:
                record = await self._read_record(name)  # fresh: another process may have
                prune = record.prunable(self._clock()) if record is not None else []
                if record is None or not prune:
                    return
                new = record.with_state(prune, DESTROYED)
                key = await self._store(new, "retired versions pruned")
        log.info("retired versions pruned", extra={"key": name, "versions": prune})
        if self.on_auto_prune is not None:
            await self.on_auto_prune(key, prune)


class _Round:
    """Names one token search looks for, and its outcome once ``done``."""

    __slots__ = ("done", "error", "names")

    def __init__(self) -> None:
        #: name -> the uid that first asked for it
        self.names: dict[str, int] = {}
        self.done = False
        self.error: WireError | None = None


class _Replay(Exception):
    """A create_key or rotate whose idempotency key made ``version`` already."""

    def __init__(self, record: KeyRecord, version: int) -> None:
        super().__init__(record.name, version)
        self.record = record
        self.version = version


def _request_digest(args: CreateKeyArgs | RotateArgs) -> str:
    """What a create_key or rotate asks, for telling a repeat from a reuse of
    its idempotency key.  create_key: the type and the settings it asks for
    (an absent setting and its default are the same request)."""
    if isinstance(args, RotateArgs):
        return request_digest("rotate")
    settings = _settings(args, KeySettings())
    return request_digest("create_key", type=args.type, settings=settings.to_json())


def _settings(args: CreateKeyArgs | UpdateKeyArgs, old: KeySettings) -> KeySettings:
    """``old`` with every setting ``args`` gives."""
    return KeySettings(
        auto_rotate_period=_pick(args.auto_rotate_period, old.auto_rotate_period),
        verify_grace=_pick(args.verify_grace, old.verify_grace),
        min_sign_version=_pick(getattr(args, "min_sign_version", None), old.min_sign_version),
        min_verify_version=_pick(getattr(args, "min_verify_version", None), old.min_verify_version),
        deletion_allowed=_pick(args.deletion_allowed, old.deletion_allowed),
        max_versions=_pick(args.max_versions, old.max_versions),
    )


T = TypeVar("T")


def _pick(new: T | None, old: T) -> T:
    return old if new is None else new


def _verify(key: LoadedKey, candidates: list[LoadedVersion], args: VerifyArgs) -> VerifyResult:
    """Raises: InvalidArgument, InvalidDigest, UnsupportedAlgorithm (bad options)."""
    pairs = ((v.record.version, v.public_key) for v in candidates)
    found = algorithms.verify_any(key.kt, pairs, args)
    if found is None:
        return VerifyResult(valid=False, key=key.record.name)
    version, algorithm = found
    return VerifyResult(valid=True, key=key.record.name, version=version, algorithm=algorithm)


def _verify_job(key: LoadedKey, candidates: list[LoadedVersion], args: VerifyArgs) -> VerifyJob:
    pairs = tuple((v.record.version, v.spki) for v in candidates)
    return VerifyJob(key.kt.name, pairs, args.to_wire())


def _verify_done(
    rid: int, key: LoadedKey, reply: Reply, metrics: Metrics
) -> Callable[[bool, Any], None]:
    name = key.record.name

    def done(ok: bool, value: Any) -> None:
        if not ok:
            if isinstance(value, DeadlineExceeded):
                metrics.limit_hit("request_timeout")
            metrics.verified(name, value.name)
            metrics.error("verify", value)
            reply(rid, encode_error(rid, value))
        elif value is None:
            metrics.verified(name, "invalid")
            reply(rid, encode_result(rid, VerifyResult(valid=False, key=name)))
        else:
            metrics.verified(name, "valid")
            version, algorithm = value
            result = VerifyResult(valid=True, key=name, version=version, algorithm=algorithm)
            reply(rid, encode_result(rid, result))

    return done


def _job(version: LoadedVersion, plan: algorithms.SignPlan) -> SignJob:
    h = plan.hash.name if plan.hash is not None else None
    return SignJob(version.record.object_id, plan.scheme, h, plan.data)


def _sign_done(
    rid: int,
    key: LoadedKey,
    signer: LoadedVersion,
    plan: algorithms.SignPlan,
    reply: Reply,
    metrics: Metrics,
    started: float,
) -> Callable[[bool, Any], None]:
    name, version = key.record.name, signer.record.version

    def done(ok: bool, value: Any) -> None:
        if ok:
            sig = algorithms.finish_signature(plan, value)
            result = SignResult(signature=sig, key=name, version=version, algorithm=plan.algorithm)
            metrics.signed(name, version, plan.algorithm, 1, started, time.perf_counter())
            reply(rid, encode_result(rid, result))
        else:
            if isinstance(value, DeadlineExceeded):
                metrics.limit_hit("request_timeout")
            metrics.sign_failed(name, version, plan.algorithm, value)
            metrics.error("sign", value)
            reply(rid, encode_error(rid, value))

    return done


def _batch_items(args: SignBatchArgs) -> tuple[bytes, ...]:
    """The batch's items (messages or digests).

    Raises:
        InvalidArgument: not exactly one of them, or not 1 to MAX_BATCH items.
    """
    if (args.messages is None) == (args.digests is None):
        raise InvalidArgument("exactly one of 'messages' and 'digests' is required")
    items = args.messages if args.messages is not None else args.digests
    assert items is not None
    if not 0 < len(items) <= MAX_BATCH:
        raise InvalidArgument(f"a batch has 1 to {MAX_BATCH} items, got {len(items)}")
    return items


def _batch_entries(
    rid: int,
    key: LoadedKey,
    signer: LoadedVersion,
    args: SignBatchArgs,
    reply: Reply,
    deadline: float,
    metrics: Metrics,
    started: float,
) -> list[Entry]:
    """One entry per item; the reply goes out when the last item is answered.

    Raises:
        InvalidArgument, UnsupportedAlgorithm: the batch as a whole is wrong.
    """
    items = _batch_items(args)
    by_message = args.messages is not None
    opts = algorithms.options(
        key.kt, args.hash, args.padding, args.format, by_digest=not by_message
    )
    algorithm = opts.algorithm
    plans: list[algorithms.SignPlan | WireError] = []
    for item in items:
        try:
            if by_message:
                plans.append(algorithms.plan(opts, item, None))
            else:
                plans.append(algorithms.plan(opts, None, item))
        except InvalidDigest as exc:  # this item only; the options are fine
            plans.append(exc)
    results: list[BatchItem | None] = [None] * len(items)
    left = [len(items)]
    timed_out = [False]  # an item answered deadline_exceeded: counted once per request
    name, version = key.record.name, signer.record.version

    def finish() -> None:
        left[0] -= 1
        if left[0] == 0:
            if timed_out[0]:
                metrics.limit_hit("request_timeout")
            signed = sum(1 for r in results if r is not None and r.signature is not None)
            metrics.signed(name, version, algorithm, signed, started, time.perf_counter())
            answer = SignBatchResult(
                key=name,
                version=version,
                algorithm=algorithm,
                results=tuple(r if r is not None else BatchItem() for r in results),
            )
            reply(rid, encode_result(rid, answer))

    def item_done(i: int, plan: algorithms.SignPlan) -> Callable[[bool, Any], None]:
        def done(ok: bool, value: Any) -> None:
            if ok:
                results[i] = BatchItem(signature=algorithms.finish_signature(plan, value))
            else:
                timed_out[0] = timed_out[0] or isinstance(value, DeadlineExceeded)
                results[i] = BatchItem(error=_error_info(value))
            finish()

        return done

    entries = []
    for i, p in enumerate(plans):
        if isinstance(p, WireError):
            results[i] = BatchItem(error=_error_info(p))
            finish()
        else:
            entries.append(Entry(_job(signer, p), item_done(i, p), deadline))
    return entries


def _error_info(exc: WireError) -> ErrorInfo:
    return ErrorInfo(code=int(exc.code), name=exc.name, message=exc.message)
