"""Typed, validated configuration from TOML; secrets redacted in repr.

Every problem is reported as ``ConfigError`` naming the field, e.g.
``limits.max_frame: must be between 1024 and 67108864, got 12``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TypeVar

from .access.policy import OPERATIONS, Rule
from .token.profiles import PROFILES, Profile, ProfileError, profile_for
from .trusted import NotTrusted, open_trusted_file

__all__ = [
    "AccessConfig",
    "AuditConfig",
    "RateLimitsConfig",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "LogConfig",
    "MetricsConfig",
    "Secret",
    "ServerConfig",
    "TokenConfig",
    "find_softhsm_module",
    "load_config",
    "read_metrics_token",
    "read_pin",
]

DEFAULT_SOCKET: Final = "/run/signd/signd.sock"
DEFAULT_MODULE: Final = "/usr/lib/softhsm/libsofthsm2.so"
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
class LogConfig:
    level: str = "info"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    token: TokenConfig = field(default_factory=TokenConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    rate_limits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    path: str | None = None


T = TypeVar("T")


class _Section:
    """Reads one TOML table, checking types and names of every field."""

    def __init__(self, name: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: must be a table")
        self.name = name
        self.table: dict[str, Any] = dict(table)

    def take(
        self, key: str, kind: type[T], default: T, check: Callable[[T], str | None] | None = None
    ) -> T:
        if key not in self.table:
            return default
        value = self.table.pop(key)
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind:
            raise ConfigError(
                f"{self.name}.{key}: expected {kind.__name__}, got {type(value).__name__}"
            )
        if check is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{self.name}.{key}: {problem}")
        return value

    def done(self) -> None:
        if self.table:
            raise ConfigError(f"{self.name}.{sorted(self.table)[0]}: unknown setting")


def _between(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo} and {hi}, got {v}"

    return check


def _nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _credential_name(v: str) -> str | None:
    return None if v and "/" not in v else "must be a credential name without '/'"


def _absolute(v: str) -> str | None:
    return None if os.path.isabs(v) else f"must be an absolute path, got {v!r}"


def _mode(v: str) -> str | None:
    try:
        m = int(v, 8)
    except ValueError:
        return f'must be an octal string such as "0660", got {v!r}'
    if not 0 < m <= 0o777:
        return f"must be between 0001 and 0777, got {v!r}"
    if m & 0o600 != 0o600:
        return "must let the owner read and write (0600 at least)"
    if m & 0o007:
        return "must not give access to others; use a group instead"
    return None


def _parse(doc: Mapping[str, Any], path: str | None, base: Path) -> Config:
    sections = dict(doc)
    s = _Section("server", sections.pop("server", {}))
    sock = s.take("socket", str, DEFAULT_SOCKET, _nonempty)
    mode = s.take("socket_mode", str, "0660", _mode)
    group = s.table.pop("socket_group", None)
    if group is not None and not (
        (type(group) is str and group.strip()) or (type(group) is int and 0 <= group < 2**31)
    ):
        raise ConfigError(f"server.socket_group: must be a group name or a gid, got {group!r}")
    s.done()
    server = ServerConfig(socket=str(base / sock), socket_mode=int(mode, 8), socket_group=group)

    t = _Section("token", sections.pop("token", {}))
    module = t.take("module", str, DEFAULT_MODULE, _absolute)
    try:
        profile = profile_for(t.take("profile", str, "auto", _nonempty), module)
    except ProfileError as exc:
        raise ConfigError(str(exc)) from None
    label = t.take(
        "label",
        str,
        profile.default_label,
        lambda v: None if 0 < len(v.encode()) <= 32 else "must be 1-32 bytes",
    )
    pin_file = t.take("pin_file", str, "", _nonempty)
    pin_cred = t.take(
        "pin_credential",
        str,
        "",
        _credential_name,
    )
    auth_key_id = t.table.pop("auth_key_id", None)
    if auth_key_id is not None and not (type(auth_key_id) is int and 1 <= auth_key_id <= 0xFFFF):
        raise ConfigError(f"token.auth_key_id: must be an integer 1 to 65535, got {auth_key_id!r}")
    if auth_key_id is not None and not profile.auth_key_pin:
        raise ConfigError(
            f"token.auth_key_id: only the yubihsm profile logs in with an auth key id "
            f"(this is the {profile.name} profile)"
        )
    batch = t.take("batch", int, profile.batch, _between(1, 4096))
    depth = t.take("depth", int, 2, _between(1, 16))
    spin_us = t.take("spin_us", int, 500, _between(0, 10_000))
    probe_interval = t.take("probe_interval", float, profile.probe_interval, _between(0.05, 3600))
    stall_timeout = t.take("stall_timeout", float, profile.stall_timeout, _between(0.1, 3600))
    recycle_mb = t.take("recycle_mb", float, 4.0, _between(0, 1 << 20))
    workers_raw = t.table.pop("workers", "auto")
    t.done()
    workers: int | None
    if workers_raw == "auto":
        workers = None
    elif type(workers_raw) is int and 1 <= workers_raw <= 64:
        workers = workers_raw
    else:
        raise ConfigError(f'token.workers: must be "auto" or 1 to 64, got {workers_raw!r}')
    if workers is not None and profile.max_workers is not None and workers > profile.max_workers:
        raise ConfigError(
            f"token.workers: the {profile.name} profile allows {profile.max_workers} "
            f"(the device runs one command at a time), got {workers}"
        )
    if bool(pin_file) == bool(pin_cred):
        raise ConfigError("token: set exactly one of pin_file and pin_credential")
    token = TokenConfig(
        module=module,
        profile=profile,
        auth_key_id=auth_key_id,
        label=label,
        pin_file=str(base / pin_file) if pin_file else None,
        pin_credential=pin_cred or None,
        workers=workers,
        batch=batch,
        depth=depth,
        spin_us=spin_us,
        probe_interval=probe_interval,
        stall_timeout=stall_timeout,
        recycle_mb=recycle_mb,
    )

    lim = _Section("limits", sections.pop("limits", {}))
    d = LimitsConfig()
    limits = LimitsConfig(
        max_frame=lim.take("max_frame", int, d.max_frame, _between(1024, 64 << 20)),
        max_connections=lim.take("max_connections", int, d.max_connections, _between(1, 100_000)),
        max_inflight_per_connection=lim.take(
            "max_inflight_per_connection", int, d.max_inflight_per_connection, _between(1, 65536)
        ),
        max_output_buffer=lim.take(
            "max_output_buffer", int, d.max_output_buffer, _between(64 << 10, 1 << 30)
        ),
        token_queue=lim.take("token_queue", int, d.token_queue, _between(1, 10_000_000)),
        request_timeout=lim.take("request_timeout", float, d.request_timeout, _between(0.01, 3600)),
        drain_timeout=lim.take("drain_timeout", float, d.drain_timeout, _between(0, 3600)),
        idle_timeout=lim.take("idle_timeout", float, d.idle_timeout, _between(0, 86400)),
    )
    limits = _client_shares(lim, limits)
    lim.done()

    lg = _Section("log", sections.pop("log", {}))
    level = lg.take(
        "level",
        str,
        "info",
        lambda v: None if v in LOG_LEVELS else f"must be one of {', '.join(LOG_LEVELS)}",
    )
    lg.done()

    access = _access(sections.pop("access", {}))
    au = _Section("audit", sections.pop("audit", {}))
    audit_dir = au.take("dir", str, "", _nonempty)
    audit = AuditConfig(
        dir=str(base / audit_dir) if audit_dir else None,
        mode=au.take(
            "mode",
            str,
            "strict",
            lambda v: None if v in ("strict", "relaxed") else 'must be "strict" or "relaxed"',
        ),
        max_bytes=au.take("max_bytes", int, 64 << 20, _between(4096, 1 << 40)),
        checkpoint_every=au.take("checkpoint_every", int, 1000, _between(1, 1 << 30)),
        checkpoint_interval=au.take("checkpoint_interval", float, 60.0, _between(0.05, 86400)),
        on_mismatch=au.take(
            "on_mismatch",
            str,
            "refuse",
            lambda v: None if v in ("refuse", "continue") else 'must be "refuse" or "continue"',
        ),
    )
    au.done()
    rl = _Section("rate_limits", sections.pop("rate_limits", {}))
    limits_pair: dict[str, tuple[float, float] | None] = {}
    for name in ("per_principal", "per_key"):
        rate = rl.take(name, float, 0.0, _between(0, 10_000_000))
        burst = rl.take(f"{name}_burst", float, max(1.0, rate), _between(1, 10_000_000))
        limits_pair[name] = (rate, burst) if rate > 0 else None
    rl.done()
    rate_limits = RateLimitsConfig(limits_pair["per_principal"], limits_pair["per_key"])
    ks = _Section("keys", sections.pop("keys", {}))
    dk = KeysConfig()
    keys = KeysConfig(
        min_rotate_period=ks.take(
            "min_rotate_period", float, dk.min_rotate_period, _between(1, 10 * 365 * 86400)
        ),
        sync_interval=ks.take("sync_interval", float, dk.sync_interval, _between(0.1, 3600)),
        default_max_versions=ks.take(
            "default_max_versions", int, dk.default_max_versions, _between(1, 100_000)
        ),
        max_versions_limit=ks.take(
            "max_versions_limit", int, dk.max_versions_limit, _between(1, 100_000)
        ),
    )
    ks.done()
    if keys.default_max_versions > keys.max_versions_limit:
        raise ConfigError(
            f"keys.default_max_versions ({keys.default_max_versions}) is above "
            f"keys.max_versions_limit ({keys.max_versions_limit}): lower it or raise the limit"
        )
    mt = _Section("metrics", sections.pop("metrics", {}))
    enabled = mt.take("enabled", bool, True)
    listen = mt.take("listen", str, "127.0.0.1:9464", _listen_address)
    token_file = mt.take("token_file", str, "", _nonempty)
    token_cred = mt.take(
        "token_credential",
        str,
        "",
        _credential_name,
    )
    mt.done()
    if token_file and token_cred:
        raise ConfigError("metrics: set at most one of token_file and token_credential")
    host, _, port_text = listen.rpartition(":")
    metrics = MetricsConfig(
        enabled=enabled,
        host=host.strip("[]"),
        port=int(port_text),
        token_file=str(base / token_file) if token_file else None,
        token_credential=token_cred or None,
    )
    if sections:
        raise ConfigError(f"{sorted(sections)[0]}: unknown section")
    return Config(
        server=server,
        token=token,
        limits=limits,
        access=access,
        audit=audit,
        rate_limits=rate_limits,
        keys=keys,
        metrics=metrics,
        log=LogConfig(level),
        path=path,
    )


def _client_shares(lim: _Section, limits: LimitsConfig) -> LimitsConfig:
    """The per-uid limits and the memory budget, checked against the others.

    A uid's share of the memory must hold at least two connections at their
    fullest (a whole frame and a full output buffer each), or one busy but
    well-behaved connection would be closed.
    """
    conns = lim.take(
        "max_connections_per_uid",
        int,
        max(limits.max_connections // 4, min(limits.max_connections, 8)),
        _between(1, limits.max_connections),
    )
    one = limits.max_frame + limits.max_output_buffer
    total = lim.take("max_buffered_bytes", int, max(256 << 20, 8 * one), _between(4 * one, 1 << 40))
    share = lim.take(
        "max_buffered_bytes_per_uid", int, max(total // 4, 2 * one), _between(2 * one, total)
    )
    return replace(
        limits,
        max_connections_per_uid=conns,
        max_buffered_bytes=total,
        max_buffered_bytes_per_uid=share,
    )


def _listen_address(v: str) -> str | None:
    """host:port, [v6]:port; the host must be written (no silent all-interfaces)."""
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return 'must be "host:port" (e.g. "127.0.0.1:9464", "[::1]:9464")'
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return "an IPv6 address must be in brackets, e.g. [::1]:9464"
    return None


def _strings(where: str, value: Any, allowed: tuple[str, ...] | None = None) -> frozenset[str]:
    if not isinstance(value, list) or not all(type(v) is str and v for v in value):
        raise ConfigError(f"{where}: must be a list of non-empty strings")
    if allowed is not None:
        for v in value:
            if v not in allowed:
                raise ConfigError(f"{where}: {v!r} is not one of {', '.join(allowed)}")
    return frozenset(value)


def _access(table: Any) -> AccessConfig:
    a = _Section("access", table)
    trust_root = a.take("trust_root", bool, True)
    raw_rules = a.table.pop("rules", [])
    a.done()
    if not isinstance(raw_rules, list):
        raise ConfigError("access.rules: must be an array of tables ([[access.rules]])")
    rules = []
    for i, raw in enumerate(raw_rules):
        where = f"access.rules[{i}]"
        r = _Section(where, raw)
        keys = r.table.pop("keys", None)
        ops = r.table.pop("operations", None)
        users = r.table.pop("users", [])
        groups = r.table.pop("groups", [])
        uids = r.table.pop("uids", [])
        r.done()
        if keys is None:
            raise ConfigError(f'{where}.keys: required (key names or patterns; "*" for all)')
        if ops is None:
            raise ConfigError(f"{where}.operations: required")
        operations = _strings(f"{where}.operations", ops, (*OPERATIONS, "*"))
        if "*" in operations:
            operations = frozenset(OPERATIONS)
        if not isinstance(uids, list) or not all(type(u) is int and u >= 0 for u in uids):
            raise ConfigError(f"{where}.uids: must be a list of uids")
        rule = Rule(
            keys=tuple(sorted(_strings(f"{where}.keys", keys))),
            operations=operations,
            users=_strings(f"{where}.users", users) if users else frozenset(),
            groups=_strings(f"{where}.groups", groups) if groups else frozenset(),
            uids=frozenset(uids),
        )
        if not (rule.users or rule.groups or rule.uids):
            raise ConfigError(f"{where}: name at least one of users, groups, uids")
        rules.append(rule)
    return AccessConfig(trust_root=trust_root, rules=tuple(rules))


#: A config file larger than this is refused (it is a few kB).
MAX_CONFIG_BYTES: Final = 1 << 20
#: A PIN file is read up to this many bytes.
MAX_PIN_BYTES: Final = 4096


def _read_trusted(path: str, what: str, limit: int, *, secret: bool, walk: bool = True) -> bytes:
    """Up to ``limit`` bytes of a file signd trusts, after checking its owner,
    mode and type and every directory above it (see ``trusted.py``).

    Raises:
        NotTrusted: another user could change (or, for a secret, read) it.
        OSError: it cannot be opened or read.
    """
    fd = open_trusted_file(path, what, secret=secret, walk=walk)
    try:
        chunks = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_secret(
    what: str,
    file: str | None,
    credential: str | None,
    limit: int,
    environ: Mapping[str, str] | None,
) -> tuple[bytes, str, str]:
    """A secret from its file or systemd credential (``what``: the setting's
    prefix, e.g. ``token.pin``): (up to ``limit`` bytes, the setting, the path).

    The file is checked as ``trusted.py`` says (a credential's directory is
    systemd's, so only the file itself is checked there).

    Raises:
        ConfigError: missing, unreadable, or not trusted.
    """
    env = os.environ if environ is None else environ
    if credential is not None:
        creds = env.get("CREDENTIALS_DIRECTORY")
        if not creds:
            raise ConfigError(
                f"{what}_credential: $CREDENTIALS_DIRECTORY is not set; "
                "is signd running under systemd with LoadCredential=?"
            )
        where, path = f"{what}_credential", os.path.join(creds, credential)
    else:
        assert file is not None
        where, path = f"{what}_file", file
    try:
        data = _read_trusted(path, where, limit, secret=True, walk=credential is None)[:limit]
    except NotTrusted as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot open {path}: {exc.strerror}") from None
    return data, where, path


def load_config(path: str) -> Config:
    """Read and validate a TOML config file.

    Relative paths in it (socket, pin_file) are taken relative to the file.
    The file must be a regular file that only root or the user signd runs as
    can change, in directories only they can change (see ``trusted.py``).

    Raises:
        ConfigError: unreadable, not trusted, not TOML, or a field is invalid.
    """
    try:
        data = _read_trusted(path, "config", MAX_CONFIG_BYTES, secret=False)
    except NotTrusted as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = tomllib.loads(data.decode())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    return _parse(doc, path, Path(path).resolve().parent)


def read_pin(token: TokenConfig, environ: Mapping[str, str] | None = None) -> Secret:
    """Read the user PIN from its file or systemd credential.

    The PIN file must be a regular file owned by root or the user signd runs
    as, not writable by group or others and not readable by others, in
    directories only they can change (see ``trusted.py``).  A credential is
    checked the same way but for its directory, which systemd makes.  One
    trailing newline is stripped.  The PIN itself never appears in an error
    message.

    Raises:
        ConfigError: missing, unreadable, not trusted, or empty.
    """
    data, where, path = _read_secret(
        "token.pin", token.pin_file, token.pin_credential, MAX_PIN_BYTES, environ
    )
    text = data.decode("utf-8", "replace")
    if text.endswith("\n"):
        text = text[:-1]
    if text.endswith("\r"):
        text = text[:-1]
    if not text:
        raise ConfigError(f"{where}: {path} is empty")
    try:
        return Secret(token.profile.login_pin(text, token.auth_key_id))
    except ProfileError as exc:
        raise ConfigError(f"{where}: {exc}") from None


#: A metrics token: printable ASCII without spaces (it travels in an HTTP
#: header), long enough that guessing it over loopback is hopeless.
METRICS_TOKEN_MIN: Final = 16
METRICS_TOKEN_MAX: Final = 4096


def read_metrics_token(
    metrics: MetricsConfig, environ: Mapping[str, str] | None = None
) -> Secret | None:
    """Read the bearer token that /metrics asks for, or None if none is configured.

    The file (or systemd credential) must be a regular file, not a symlink,
    owned by root or the daemon's user, and not readable or writable by
    others.  Surrounding whitespace is stripped, as Prometheus does with its
    ``credentials_file``.  The token never appears in an error message.

    Raises:
        ConfigError: missing, unreadable, too open, or not a usable token.
    """
    if metrics.token_credential is None and metrics.token_file is None:
        return None
    data, where, path = _read_secret(
        "metrics.token",
        metrics.token_file,
        metrics.token_credential,
        METRICS_TOKEN_MAX + 2,
        environ,
    )
    token = data.strip(b" \t\r\n")
    if not METRICS_TOKEN_MIN <= len(token) <= METRICS_TOKEN_MAX or not all(
        0x21 <= b <= 0x7E for b in token
    ):
        raise ConfigError(
            f"{where}: {path} must hold one token of {METRICS_TOKEN_MIN} to "
            f"{METRICS_TOKEN_MAX} printable ASCII characters without spaces "
            "(e.g. the output of: openssl rand -hex 32)"
        )
    return Secret(token.decode("ascii"))
