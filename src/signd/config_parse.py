"""A TOML document to a ``Config``: every table and field checked.

Every problem is a ``ConfigError`` naming the field, e.g.
``limits.max_frame: must be between 1024 and 67108864, got 12``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, TypeVar

from .access.policy import OPERATIONS, Rule
from .config_sections import (
    DEFAULT_MODULE,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    LOG_LEVELS,
    AccessConfig,
    AgentConfig,
    AuditConfig,
    Config,
    ConfigError,
    KeysConfig,
    LimitsConfig,
    LogConfig,
    MetricsConfig,
    RateLimitsConfig,
    ReplayConfig,
    ServerConfig,
    StateConfig,
    TokenConfig,
)
from .token.profiles import ProfileError, profile_for

__all__ = ["parse"]

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


#: Most tokens one daemon serves one key set from.
MAX_TOKENS: Final = 8


def _token(table: Any, base: Path, where: str) -> TokenConfig:
    """One ``[token]`` table (``where``: its name in messages, ``token`` or ``token[2]``).

    Raises: ConfigError.
    """
    t = _Section(where, table)
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
        raise ConfigError(
            f"{where}.auth_key_id: must be an integer 1 to 65535, got {auth_key_id!r}"
        )
    if auth_key_id is not None and not profile.auth_key_pin:
        raise ConfigError(
            f"{where}.auth_key_id: only the yubihsm profile logs in with an auth key id "
            f"(this is the {profile.name} profile)"
        )
    batch = t.take("batch", int, profile.batch, _between(1, 4096))
    depth = t.take("depth", int, 2, _between(1, 16))
    spin_us = t.take("spin_us", int, 500, _between(0, 10_000))
    probe_interval = t.take("probe_interval", float, profile.probe_interval, _between(0.05, 3600))
    stall_timeout = t.take("stall_timeout", float, profile.stall_timeout, _between(0.1, 3600))
    recycle_mb = t.take("recycle_mb", float, 4.0, _between(0, 1 << 20))
    workers_raw = t.table.pop("workers", "auto")
    bulk_raw = t.table.pop("bulk_workers", "auto")
    t.done()
    workers: int | None
    if workers_raw == "auto":
        workers = None
    elif type(workers_raw) is int and 1 <= workers_raw <= 64:
        workers = workers_raw
    else:
        raise ConfigError(f'{where}.workers: must be "auto" or 1 to 64, got {workers_raw!r}')
    if workers is not None and profile.max_workers is not None and workers > profile.max_workers:
        raise ConfigError(
            f"{where}.workers: the {profile.name} profile allows {profile.max_workers} "
            f"(the device runs one command at a time), got {workers}"
        )
    bulk_workers: int | None
    if bulk_raw == "auto":
        bulk_workers = None
    elif type(bulk_raw) is int and 0 <= bulk_raw <= 16:
        bulk_workers = bulk_raw
    else:
        raise ConfigError(f'{where}.bulk_workers: must be "auto" or 0 to 16, got {bulk_raw!r}')
    if bulk_workers and profile.max_workers is not None:
        raise ConfigError(
            f"{where}.bulk_workers: the {profile.name} profile allows no bulk workers "
            f"(the device runs one command at a time), got {bulk_workers}"
        )
    if bool(pin_file) == bool(pin_cred):
        raise ConfigError(f"{where}: set exactly one of pin_file and pin_credential")
    return TokenConfig(
        module=module,
        profile=profile,
        auth_key_id=auth_key_id,
        label=label,
        pin_file=str(base / pin_file) if pin_file else None,
        pin_credential=pin_cred or None,
        workers=workers,
        bulk_workers=bulk_workers,
        batch=batch,
        depth=depth,
        spin_us=spin_us,
        probe_interval=probe_interval,
        stall_timeout=stall_timeout,
        recycle_mb=recycle_mb,
    )


def parse(doc: Mapping[str, Any], path: str | None, base: Path) -> Config:
    """The ``Config`` that ``doc`` (from the file at ``path``, relative paths
    taken from ``base``) describes.

    Raises:
        ConfigError: a table or field is invalid.
    """
    sections = dict(doc)
    s = _Section("server", sections.pop("server", {}))
    sock = s.take("socket", str, DEFAULT_SOCKET, _nonempty)
    mode = s.take("socket_mode", str, "0660", _mode)
    group = _socket_group(s)
    s.done()
    server = ServerConfig(socket=str(base / sock), socket_mode=int(mode, 8), socket_group=group)

    raw_token = sections.pop("token", {})
    if isinstance(raw_token, list):  # [[token]]: several tokens serving one key set
        if not 1 <= len(raw_token) <= MAX_TOKENS:
            raise ConfigError(
                f"token: give 1 to {MAX_TOKENS} [[token]] tables, got {len(raw_token)}"
            )
        tokens = [
            _token(table, base, "token" if i == 0 else f"token[{i + 1}]")
            for i, table in enumerate(raw_token)
        ]
    else:
        tokens = [_token(raw_token, base, "token")]
    seen: set[tuple[str, str]] = set()
    for tc in tokens:
        if (tc.module, tc.label) in seen:
            raise ConfigError(f"token: the token {tc.label!r} of {tc.module} is named twice")
        seen.add((tc.module, tc.label))
    token, replicas = tokens[0], tuple(tokens[1:])

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
        backup=ks.take("backup", bool, dk.backup),
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
    state, replay = _state(sections.pop("state", {}), sections.pop("replay", {}), base)
    agent = _agent(sections.pop("agent", {}), base)
    if agent.socket is not None and agent.socket == server.socket:
        raise ConfigError("agent.socket: must not be server.socket")
    if sections:
        raise ConfigError(f"{sorted(sections)[0]}: unknown section")
    return Config(
        server=server,
        token=token,
        replicas=replicas,
        limits=limits,
        access=access,
        audit=audit,
        rate_limits=rate_limits,
        keys=keys,
        metrics=metrics,
        log=LogConfig(level),
        state=state,
        replay=replay,
        agent=agent,
        path=path,
    )


def _state(state_table: Any, replay_table: Any, base: Path) -> tuple[StateConfig, ReplayConfig]:
    """``[state]`` and ``[replay]``.  Raises: ConfigError."""
    st = _Section("state", state_table)
    directory = st.take("dir", str, "", _nonempty)
    st.done()
    state = StateConfig(str(base / directory), required=True) if directory else StateConfig()
    rp = _Section("replay", replay_table)
    d = ReplayConfig()
    replay = ReplayConfig(
        window=rp.take("window", int, d.window, _between(1, 7 * 86400)),
        max_nonces=rp.take("max_nonces", int, d.max_nonces, _between(1, 100_000_000)),
    )
    rp.done()
    assert DEFAULT_STATE_DIR == StateConfig().dir
    return state, replay


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


def _socket_group(s: _Section) -> str | int | None:
    """``socket_group``: a group name or a gid.  Raises: ConfigError."""
    group = s.table.pop("socket_group", None)
    if group is not None and not (
        (type(group) is str and group.strip()) or (type(group) is int and 0 <= group < 2**31)
    ):
        raise ConfigError(f"{s.name}.socket_group: must be a group name or a gid, got {group!r}")
    return group


def _agent(table: Any, base: Path) -> AgentConfig:
    """``[agent]``: the ssh-agent socket; no ``socket``: off.  Raises: ConfigError."""
    a = _Section("agent", table)
    sock = a.take("socket", str, "", _nonempty)
    mode = a.take("socket_mode", str, "0660", _mode)
    group = _socket_group(a)
    raw_keys = a.table.pop("keys", [])
    a.done()
    keys = tuple(sorted(_strings("agent.keys", raw_keys))) if raw_keys != [] else ()
    if not sock and (keys or "socket_mode" in table or group is not None):
        raise ConfigError("agent.socket: required when [agent] sets anything else")
    return AgentConfig(
        socket=str(base / sock) if sock else None,
        socket_mode=int(mode, 8),
        socket_group=group,
        keys=keys,
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
