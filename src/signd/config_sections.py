"""The configuration's types: one frozen dataclass per TOML table, and ``Secret``.

``config_parse`` makes them from a TOML document, checking every field;
``config`` reads the file and the secrets.  Import them from ``signd.config``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Final

from .access.policy import Rule
from .token.profiles import PROFILES, Profile

__all__ = [
    "AccessConfig",
    "AgentConfig",
    "AuditConfig",
    "Config",
    "ConfigError",
    "KeysConfig",
    "LimitsConfig",
    "LogConfig",
    "MetricsConfig",
    "RateLimitsConfig",
    "ReplayConfig",
    "Secret",
    "ServerConfig",
    "StateConfig",
    "TokenConfig",
    "DEFAULT_MODULE",
    "DEFAULT_SOCKET",
    "DEFAULT_STATE_DIR",
    "LOG_LEVELS",
    "SOFTHSM_MODULES",
    "find_softhsm_module",
]

DEFAULT_SOCKET: Final = "/run/signd/signd.sock"
DEFAULT_MODULE: Final = "/usr/lib/softhsm/libsofthsm2.so"
#: The state directory (systemd's StateDirectory=signd).
DEFAULT_STATE_DIR: Final = "/var/lib/signd"
#: Where Debian's softhsm2 puts its PKCS#11 module (the first is a symlink).
SOFTHSM_MODULES: Final = (DEFAULT_MODULE, "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def find_softhsm_module() -> str | None:
    """The installed SoftHSM module, or None."""
    return next((p for p in SOFTHSM_MODULES if os.path.exists(p)), None)


class ConfigError(Exception):
    """The configuration is invalid; the message names the field."""


class Secret:
    """A string that never shows itself in repr, str or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class ServerConfig:
    socket: str = DEFAULT_SOCKET
    socket_mode: int = 0o660
    #: group given to the socket file (a name or a gid), so its members can connect
    socket_group: str | int | None = None


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The ssh-agent socket (``signd.agent``): off while ``socket`` is None."""

    socket: str | None = None
    socket_mode: int = 0o660
    socket_group: str | int | None = None
    #: names or fnmatch patterns of the keys it offers (empty: none)
    keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """Who may do what; see ``policy.py``.  No rules: only trusted users."""

    trust_root: bool = True
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenConfig:
    module: str = DEFAULT_MODULE
    #: how this kind of token is driven (see ``profiles.py``)
    profile: Profile = PROFILES["softhsm"]
    #: YubiHSM: the auth key whose password the PIN file holds
    auth_key_id: int | None = None
    label: str = "signd"
    pin_file: str | None = None
    pin_credential: str | None = None
    #: Worker processes, each with its own session; None means "auto".
    workers: int | None = None
    #: Worker processes besides them that take only ``sign_batch`` items;
    #: None means "auto".
    bulk_workers: int | None = None
    #: Most signatures handed to a worker at once.
    batch: int = 64
    #: Batches a worker may hold (one signing, the rest waiting to be).
    depth: int = 2
    #: Microseconds the daemon and its workers keep polling after activity
    #: before they sleep: lower latency for a lone client, a little CPU (0: never).
    spin_us: int = 500
    #: Seconds between checks that the token is still there (idle workers ask it).
    probe_interval: float = 1.0
    #: Seconds a worker may hold work without answering before the token is
    #: taken for hung: its requests fail ``token_unavailable`` and it is replaced.
    stall_timeout: float = 5.0
    #: MB a signing worker's memory may grow (after warming up) before a
    #: fresh process takes over from it, without a gap (0: never).
    recycle_mb: float = 4.0

    @property
    def worker_count(self) -> int:
        """``workers``, or for "auto": for SoftHSM (whose file store is safe
        across processes) one per core but one, which the daemon's own loop
        needs, from 1 to 4; for other modules 1 (a serial device like the
        YubiHSM gains nothing from more)."""
        if self.workers is not None:
            return self.workers
        if self.profile.auto_workers is not None:
            return self.profile.auto_workers
        return max(1, min(4, (os.cpu_count() or 1) - 1))

    @property
    def bulk_worker_count(self) -> int:
        """``bulk_workers``, or for "auto": one for SoftHSM on a machine of two
        cores or more (a ``sign_batch`` leaves the daemon's loop idle enough
        for a second worker to add throughput), none for other modules."""
        if self.bulk_workers is not None:
            return self.bulk_workers
        if self.profile.auto_workers is not None:
            return 0
        return 1 if (os.cpu_count() or 1) >= 2 else 0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_frame: int = 1 << 20
    max_connections: int = 1024
    #: connections one uid may hold open (default: a quarter of max_connections,
    #: at least 8 or max_connections)
    max_connections_per_uid: int = 256
    #: bytes all connections together may hold: partial frames, requests read
    #: and not answered, answers not sent
    max_buffered_bytes: int = 256 << 20
    #: the share of it one uid may hold (default: a quarter of max_buffered_bytes)
    max_buffered_bytes_per_uid: int = 64 << 20
    max_inflight_per_connection: int = 1024
    max_output_buffer: int = 4 << 20
    token_queue: int = 65536
    request_timeout: float = 30.0
    drain_timeout: float = 10.0
    #: seconds a connection with nothing in flight may stay silent before the
    #: daemon closes it (0: never)
    idle_timeout: float = 300.0


@dataclass(frozen=True, slots=True)
class RateLimitsConfig:
    """Token buckets: (signatures per second, burst) per peer uid and per key."""

    per_principal: tuple[float, float] | None = None
    per_key: tuple[float, float] | None = None


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The audit log: off unless ``dir`` is set."""

    dir: str | None = None
    mode: str = "strict"
    max_bytes: int = 64 << 20
    #: a checkpoint (the chain head signed on the token) after this many records...
    checkpoint_every: int = 1000
    #: ...or this many seconds after the last, if records were written since
    checkpoint_interval: float = 60.0
    #: the log does not match the chain head kept on the token: "refuse" to
    #: start, or "continue" with a record of the mismatch in the log
    on_mismatch: str = "refuse"


@dataclass(frozen=True, slots=True)
class KeysConfig:
    """The key lifecycle (per-key settings live on the token, not here)."""

    #: shortest ``auto_rotate_period`` a key may be given, in seconds: a typo
    #: must not fill the token with a new version every minute
    min_rotate_period: float = 3600.0
    #: seconds between re-reads of the key records on the token, so changes
    #: made by another process sharing the token take effect here
    sync_interval: float = 5.0
    #: most versions not destroyed a key may hold when it sets no
    #: ``max_versions`` of its own
    default_max_versions: int = 100
    #: highest ``max_versions`` a key may be given (and held to)
    max_versions_limit: int = 1000
    #: a new key is made backup-able (exportable wrapped under the token's wrap
    #: key) unless its create_key says otherwise
    backup: bool = False


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint: loopback only unless an address says otherwise."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9464
    #: where the bearer token that unlocks per-key series is read from (at most
    #: one of the two; neither: /metrics shows no key names)
    token_file: str | None = None
    token_credential: str | None = None


@dataclass(frozen=True, slots=True)
class StateConfig:
    """The state directory: watermarks and accepted nonces (``signd.state``)."""

    dir: str = DEFAULT_STATE_DIR
    #: ``dir`` was set in the config: it must be usable (made if missing).
    #: Not set: the default is used if it exists; else the daemon has no state,
    #: and refuses watermarked keys and replay-checked verifies.
    required: bool = False


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """Replay-checked verify: the time window and the nonce memory's bound."""

    #: seconds a timestamp may be off the daemon's clock (either way)
    window: int = 300
    #: most nonces held, all keys together (memory: see README, "Replay protection")
    max_nonces: int = 1_000_000


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    token: TokenConfig = field(default_factory=TokenConfig)
    #: the other tokens of ``[[token]]``: every backup-able key is held on each
    #: (``token.tokenset``); ``token`` is the first
    replicas: tuple[TokenConfig, ...] = ()
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    rate_limits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    state: StateConfig = field(default_factory=StateConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    path: str | None = None
