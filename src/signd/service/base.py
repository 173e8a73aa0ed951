"""The service's state and what every family of operations shares."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from ..access.policy import Policy, Principal
from ..access.ratelimit import RateLimiter
from ..audit.log import AUDIT_KEY
from ..errors import PermissionDenied, VersionNotFound, WireError
from ..keys.records import DEFAULT_MAX_VERSIONS, MAX_VERSIONS_LIMIT, check_key_name
from ..keys.recordstore import RecordStore
from ..keys.store import Keystore, LoadedKey
from ..metrics import Metrics
from ..protocol import AuditHead, Message, Request
from ..state import State
from ..token.profiles import Profile
from ..token.tokenset import Tokens
from .context import Reply, SlowWork
from .convert import send_error, send_result, wire_error

__all__ = ["RESERVED_KEYS", "RESERVED_VERBS", "Round", "ServiceBase"]

#: Keys the daemon keeps for itself (the audit key signs checkpoints): a client
#: may read them (key_info, public_key, jwks) and verify with them, whatever
#: its grants, never sign with or change them, root included.
RESERVED_KEYS: Final = frozenset({AUDIT_KEY})
#: The verbs a client may use on a reserved key.
RESERVED_VERBS: Final = frozenset({"read", "verify"})

AutoRotateHook = Callable[[LoadedKey], Awaitable[None]]
AutoPruneHook = Callable[[LoadedKey, list[int]], Awaitable[None]]


class Round:
    """Names one token search looks for, and its outcome once ``done``."""

    __slots__ = ("done", "error", "names")

    def __init__(self) -> None:
        #: name -> the uid that first asked for it
        self.names: dict[str, int] = {}
        self.done = False
        self.error: WireError | None = None


class ServiceBase:
    """What the service is built with, and the helpers every operation uses."""

    def __init__(
        self,
        token: Tokens,
        records: RecordStore,
        policy: Policy,
        limiter: RateLimiter | None,
        metrics: Metrics,
        *,
        clock: Callable[[], float],
        profile: Profile,
        request_timeout: float = 30.0,
        min_rotate_period: float = 3600.0,
        sync_interval: float = 5.0,
        default_max_versions: int = DEFAULT_MAX_VERSIONS,
        max_versions_limit: int = MAX_VERSIONS_LIMIT,
        default_backup: bool = False,
        on_auto_rotate: AutoRotateHook | None = None,
        on_auto_prune: AutoPruneHook | None = None,
        audit_head: Callable[[], AuditHead | None] | None = None,
        state: State | None = None,
    ) -> None:
        """``token``: the keys and the record reads; ``records``: the key
        records' writes (a compare-and-swap over ``token``).
        ``on_auto_rotate``/``on_auto_prune``: called with each automatic
        rotation and pruning (the audit log's hooks); ``audit_head``: the
        audit chain's head, for ``health`` (None: no audit log).  ``state``:
        the watermarks and nonces (``signd.state``; None: no state directory,
        so watermarked signing and replay-checked verify are refused)."""
        self.token = token
        self.records = records
        self.profile = profile
        self.policy = policy
        self.limiter = limiter
        self.metrics = metrics
        self.keystore = Keystore()
        self.request_timeout = request_timeout
        self.min_rotate_period = min_rotate_period
        self.default_max_versions = min(default_max_versions, max_versions_limit)
        self.max_versions_limit = max_versions_limit
        #: ``[keys] backup``: what a create_key without ``backup`` gets
        self.default_backup = default_backup
        self.sync_interval = sync_interval
        self.on_auto_rotate = on_auto_rotate
        self.on_auto_prune = on_auto_prune
        self.audit_head = audit_head
        self.state = state
        self._clock = clock
        self._started = time.monotonic()
        self._admin_lock = trio.Lock()
        #: set when a key changes here, so the lifecycle task re-plans its sleep
        self._changed = trio.Event()
        self.loaded = False
        # The coalesced look-ups of unknown key names (service.lookup):
        #: names found absent, with when the search that found so began
        self._absent: dict[str, float] = {}
        #: the names the next token search will look for; a search is running
        self._round = Round()
        self._searching = False
        self._searched = trio.lowlevel.ParkingLot()
        #: distinct names waiting for a search, by uid
        self._lookups_by_uid: dict[int, int] = {}
        #: scheduled rotations refused by ``max_versions``: key -> the record
        #: revision refused; tried again once the record changes (service.lifecycle)
        self._rotation_refused: dict[str, int] = {}
        #: threads that verify for keys with many versions while no worker can
        self._verify_threads = trio.CapacityLimiter(2)

    def reconfigure(
        self, *, policy: Policy, limiter: RateLimiter | None, request_timeout: float
    ) -> None:
        """A reload's new rules, rate limits and request timeout, in force
        from the next request on."""
        self.policy = policy
        self.limiter = limiter
        self.request_timeout = request_timeout

    @property
    def ready(self) -> bool:
        return self.loaded and self.token.is_open

    def handle(
        self, requests: Sequence[Request], reply: Reply, source: object, who: Principal
    ) -> list[SlowWork]:
        raise NotImplementedError  # the dispatcher (service.core) answers

    # ------------------------------------------------------------ replies

    def _answer(self, reply: Reply, req: Request, result: Message) -> None:
        send_result(reply, req.id, result)

    def _fail(
        self, reply: Reply, req: Request, exc: BaseException, what: str | None = None
    ) -> None:
        """Answer ``req`` with the wire error ``exc`` maps to (``wire_error``),
        counted as refused."""
        error = wire_error(exc, what, op=req.op)
        self._refused(req, error)
        send_error(reply, req.id, error)

    def _refused(self, req: Request, error: WireError) -> None:
        """Count a request answered with an error before it reached the token."""
        self.metrics.error(req.op, error)
        name = getattr(req.args, "key", None)
        if name is None or name not in self.keystore or isinstance(error, PermissionDenied):
            # An unknown key never becomes a label, and a peer the policy
            # refused moves no key's series (nor learns that the key exists).
            return
        version = getattr(req.args, "version", None)
        if isinstance(error, VersionNotFound):
            version = None  # a version the key does not have never becomes a label
        if req.op in ("sign", "sign_batch"):
            self.metrics.sign_failed(name, version, "", error)
        elif req.op == "verify":
            self.metrics.verified(name, error.name)

    # ------------------------------------------------------------ shared checks

    def _limit(self, who: Principal, key: str, cost: int) -> None:
        """Raises: RateLimited."""
        if self.limiter is not None:
            self.limiter.check(who.uid, key, cost)

    def _key_or_none(self, name: str) -> LoadedKey | None:
        """The key if this process has it; None: look it up on the token first.

        Raises: InvalidArgument (not a key name).
        """
        if name in self.keystore:
            return self.keystore.get(name)
        check_key_name(name)
        return None
