"""``signd``: the composition root.  The only place that reads the config and
wires the token, the service and the server together.

Exit codes: 0 clean stop, 1 runtime failure (socket or token), 2 bad usage or
configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Final

import trio

from . import __version__
from .access.policy import Policy
from .access.ratelimit import RateLimiter
from .audit.log import AuditError, AuditLog, Checkpointer, TokenHead, head_label, record_own_action
from .config import Config, ConfigError, Secret, load_config, read_metrics_token, read_pin
from .errors import WireError
from .hardening import no_core_dumps
from .keys.store import LoadedKey
from .log import setup_logging
from .metrics import KeyState, Metrics, Snapshot
from .protocol import encode_result
from .server.core import Server
from .server.http import serve_http
from .server.listener import ListenerError, open_listener, systemd_socket
from .server.systemd import Notifier
from .service.core import Service
from .token.pool import PoolSettings, TokenPool, open_token_pool

__all__ = ["main"]

log = logging.getLogger("signd")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="signd",
        description="signd: a signing daemon whose private keys live on a PKCS#11 token.",
        epilog="Exit codes: 0 clean stop, 1 runtime failure, 2 bad usage or config.",
    )
    p.add_argument("--version", action="version", version=f"signd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
    check = sub.add_parser("check-config", help="validate a config file and its PIN source")
    check.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
    return p


async def _run(cfg: Config, pin: Secret, metrics_token: Secret | None = None) -> int:
    # Before the token workers start: they must not inherit $NOTIFY_SOCKET.
    notifier = Notifier.from_environ()
    try:
        inherited = systemd_socket()
        sock = inherited or open_listener(
            cfg.server.socket, cfg.server.socket_mode, cfg.server.socket_group
        )
    except ListenerError as exc:
        log.error("cannot listen", extra={"error": str(exc)})
        return EXIT_FAILURE
    lim = cfg.limits
    settings = PoolSettings(
        module=cfg.token.module,
        token_label=cfg.token.label,
        pin=pin.reveal(),
        workers=cfg.token.worker_count,
        batch_max=cfg.token.batch,
        depth=cfg.token.depth,
        spin=cfg.token.spin_us / 1e6,
        queue_limit=lim.token_queue,
        log_level=cfg.log.level,
        probe_interval=cfg.token.probe_interval,
        stall_timeout=cfg.token.stall_timeout,
        recycle_mb=cfg.token.recycle_mb,
        profile=cfg.token.profile.name,
    )
    failed = False
    metrics = Metrics()
    try:
        try:
            async with open_token_pool(settings, metrics) as pool:
                return await _serve(
                    cfg,
                    sock,
                    inherited is not None,
                    pool,
                    metrics,
                    notifier=notifier,
                    metrics_token=metrics_token,
                )
        except* WireError as group:
            for err in group.exceptions:
                log.error("token unavailable", extra={"error": str(err)})
            failed = True
    finally:
        if inherited is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg.server.socket)
    assert failed
    return EXIT_FAILURE


async def _serve(
    cfg: Config,
    sock: socket.socket,
    inherited: bool,
    pool: TokenPool,
    metrics: Metrics,
    *,
    notifier: Notifier,
    metrics_token: Secret | None = None,
) -> int:
    policy = Policy(cfg.access.rules, trust_root=cfg.access.trust_root)
    rl = cfg.rate_limits
    limiter = None
    if rl.per_principal is not None or rl.per_key is not None:
        limiter = RateLimiter(rl.per_principal, rl.per_key)
    service = Service(
        pool,
        policy,
        limiter=limiter,
        request_timeout=cfg.limits.request_timeout,
        min_rotate_period=cfg.keys.min_rotate_period,
        sync_interval=cfg.keys.sync_interval,
        profile=cfg.token.profile,
        default_max_versions=cfg.keys.default_max_versions,
        max_versions_limit=cfg.keys.max_versions_limit,
        metrics=metrics,
    )
    audit = None
    if cfg.audit.dir is not None:
        audit = AuditLog(
            cfg.audit.dir,
            mode=cfg.audit.mode,
            max_bytes=cfg.audit.max_bytes,
            checkpoint_every=cfg.audit.checkpoint_every,
            checkpoint_interval=cfg.audit.checkpoint_interval,
        )
        try:
            await audit.open()
        except (AuditError, OSError) as exc:
            log.error("the audit log cannot be used", extra={"error": str(exc)})
            return EXIT_FAILURE
        service.on_auto_rotate = functools.partial(_audit_auto_rotation, audit)
        service.on_auto_prune = functools.partial(_audit_auto_prune, audit)
    else:
        log.warning("audit log disabled: set [audit] dir to keep one")
    # Keeping the loop warm (polling after light traffic) holds the GIL; with a
    # strict audit log the writer thread is on every answer's path and would
    # wait out the whole poll (measured, one synchronous client: p50 1.1 ms
    # polling, 0.5 ms not), so the loop sleeps instead.
    strict = audit is not None and audit.mode == "strict"
    keep_warm = 0.0 if strict else cfg.token.spin_us / 1e6
    server = Server(
        service,
        cfg.limits,
        metrics=service.metrics,
        drop=pool.drop,
        audit=audit,
        keep_warm=keep_warm,
    )
    _count(service.metrics, service, server, pool, audit)
    try:
        async with trio.open_nursery() as nursery:
            if cfg.metrics.enabled:
                await _start_metrics(nursery, cfg, service, metrics_token)
            try:
                return await _serve_with(
                    cfg, inherited, pool, service, server, sock, notifier=notifier
                )
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if audit is not None:
            await audit.aclose()


def _count(
    metrics: Metrics, service: Service, server: Server, pool: TokenPool, audit: AuditLog | None
) -> None:
    """Connect ``metrics`` to what it counts and to what its gauges read."""
    if audit is not None:
        audit.on_write = metrics.audit_write

    def snapshot() -> Snapshot:
        floor = service.min_rotate_period
        cp = audit.checkpointer if audit is not None else None
        return Snapshot(
            token_up=pool.alive_workers > 0,
            ready=service.ready,
            connections_open=server.connections,
            requests_in_flight=sum(c.inflight for c in list(server.live)),
            buffered_bytes=server.buffered,
            token_queue_depth=pool.pending,
            token_reconnects=pool.respawns,
            audit_records=audit.records_written if audit is not None else 0,
            audit_failures=audit.failures if audit is not None else 0,
            audit_checkpoints=audit.checkpoints_written if audit is not None else 0,
            audit_checkpoint_failures=cp.failures if cp is not None else 0,
            audit_chain_ok=cp.chain_ok if cp is not None else True,
            audit_chain_mismatches=cp.mismatches if cp is not None else 0,
            rate_limited=tuple(service.limiter.refused.items()) if service.limiter else (),
            keys=tuple(
                KeyState(
                    k.record.name,
                    k.record.latest.version,
                    k.record.latest.created,
                    k.record.next_rotation(floor),
                )
                for k in service.keystore.all()
            ),
        )

    metrics.snapshot = snapshot


async def _start_metrics(
    nursery: trio.Nursery, cfg: Config, service: Service, token: Secret | None
) -> None:
    """Serve /metrics; an address that cannot be bound is logged, not fatal:
    signing goes on, and Prometheus's own ``up`` shows the endpoint is missing.
    Per-key series only to scrapes that bring ``token``; none without one."""
    host, port = cfg.metrics.host, cfg.metrics.port
    serve = functools.partial(
        serve_http,
        host,
        port,
        service.metrics,
        lambda: service.ready,
        token=None if token is None else token.reveal().encode("ascii"),
    )
    try:
        bound = await nursery.start(serve)
    except OSError as exc:
        log.error(
            "metrics endpoint not started", extra={"host": host, "port": port, "error": str(exc)}
        )
        return
    if host in ("0.0.0.0", "::"):  # noqa: S104 - a check, not a bind
        log.warning("metrics endpoint open on every interface", extra={"port": bound})
    if token is None:
        log.warning(
            "metrics: no key names on /metrics (per-key series are summed into one "
            "with an empty key label); to see them, set [metrics] token_file or "
            "token_credential and scrape with that bearer token (OPERATIONS.md)"
        )
    log.info("metrics endpoint", extra={"url": f"http://{_netloc(host, bound)}/metrics"})


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _audit_auto_rotation(audit: AuditLog, key: LoadedKey) -> None:
    """A scheduled rotation has no request; its record names the daemon itself."""
    frame = encode_result(None, key.info())
    if not await record_own_action(audit, "auto_rotate", key.record.name, frame):
        log.error("a scheduled rotation could not be audited", extra={"key": key.record.name})


async def _audit_auto_prune(audit: AuditLog, key: LoadedKey, versions: list[int]) -> None:
    """Retired versions destroyed by the daemon: recorded like a scheduled
    rotation, the key's info (those versions now destroyed) as the frame."""
    frame = encode_result(None, key.info())
    if not await record_own_action(audit, "auto_prune", key.record.name, frame):
        log.error(
            "a pruning of retired versions could not be audited",
            extra={"key": key.record.name, "versions": versions},
        )


async def _serve_with(
    cfg: Config,
    inherited: bool,
    pool: TokenPool,
    service: Service,
    server: Server,
    sock: socket.socket,
    *,
    notifier: Notifier,
) -> int:
    await service.load()
    info = pool.info
    assert info is not None
    log.info(
        "token open",
        extra={
            "label": info.label,
            "model": info.model,
            "serial": info.serial,
            "workers": pool.settings.workers,
        },
    )

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                log.info("stopping", extra={"signal": name})
                notifier.stopping(f"Stopping on {name}: answering requests in flight")
                server.shutdown()
                return

    async def watch_reload() -> None:
        nonlocal cfg
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            if _take_startup_hangup():  # asked for while starting: the config may be newer
                log.info("SIGHUP came during startup: reloading the config now")
                cfg = _reload(cfg, service, server)
            async for _ in signals:
                cfg = _reload(cfg, service, server)

    socket_name = "systemd socket" if inherited else cfg.server.socket

    async with trio.open_nursery() as nursery:

        def ready() -> None:
            log.info("ready", extra={"socket": socket_name, "pid": os.getpid()})
            keys = service.health().keys
            notifier.ready(f"Serving {keys} key{'s' * (keys != 1)} of token {info.label!r}")
            # After READY=1: systemd arms the watchdog only then.
            nursery.start_soon(notifier.run_watchdog)

        checkpoints = None
        if server.audit is not None:
            try:
                checkpoints = await _start_checkpoints(cfg, server.audit, service, pool, nursery)
            except (AuditError, WireError) as exc:
                log.error("the audit log cannot be used", extra={"error": str(exc)})
                nursery.cancel_scope.cancel()
                return EXIT_FAILURE
        nursery.start_soon(watch_signals)
        nursery.start_soon(watch_reload)
        nursery.start_soon(service.run_lifecycle)
        await server.serve(sock, on_ready=ready)
        if checkpoints is not None and not await checkpoints.now("shutdown"):
            log.error("the audit log's last checkpoint could not be written")
        nursery.cancel_scope.cancel()
    log.info("stopped")
    return EXIT_OK


async def _start_checkpoints(
    cfg: Config, audit: AuditLog, service: Service, pool: TokenPool, nursery: trio.Nursery
) -> Checkpointer:
    """The audit key and the chain head on the token; the log checked against
    that head, and its start checkpointed.

    Raises: AuditError (the log does not match and on_mismatch is refuse), WireError.
    """
    await service.ensure_audit_key()
    info = pool.info
    token = f"{info.label}/{info.serial}" if info is not None else "?"
    checkpoints = Checkpointer(
        audit,
        service,
        TokenHead(pool, head_label(audit.directory)),
        token=token,
        on_mismatch=cfg.audit.on_mismatch,
    )
    audit.checkpointer = checkpoints
    await checkpoints.start(nursery)
    service.audit_head = lambda: checkpoints.head
    return checkpoints


#: Sections a reload applies; the others need a restart.
RELOADABLE: Final = ("access", "rate_limits", "limits", "log")


def _reload(cfg: Config, service: Service, server: Server) -> Config:
    """SIGHUP: read the config again and apply policy, rate limits, limits and
    the log level, without dropping a connection.  A config that does not load
    is refused with its reason, and the one in force stays; changes to other
    sections are named in a warning and wait for a restart.  Returns the config
    now in force."""
    assert cfg.path is not None
    try:
        new = load_config(cfg.path)
    except ConfigError as exc:
        log.error("config reload refused; the running config stays", extra={"error": str(exc)})
        return cfg
    changed = [
        f.name for f in dataclasses.fields(new) if getattr(new, f.name) != getattr(cfg, f.name)
    ]
    pending = [name for name in changed if name not in RELOADABLE and name != "path"]
    service.policy = Policy(new.access.rules, trust_root=new.access.trust_root)
    rl = new.rate_limits
    if rl != cfg.rate_limits:  # the buckets start full again only when the limits changed
        old = service.limiter
        service.limiter = None
        if rl.per_principal is not None or rl.per_key is not None:
            service.limiter = RateLimiter(rl.per_principal, rl.per_key)
            if old is not None:  # the refusal counters are metrics: they carry on
                service.limiter.refused = old.refused
    service.request_timeout = new.limits.request_timeout
    server.apply_limits(new.limits)
    logging.getLogger().setLevel(new.log.level.upper())
    log.info("config reloaded", extra={"changed": [n for n in changed if n not in pending]})
    if pending:
        log.warning(
            "config changes that need a restart were not applied", extra={"sections": pending}
        )
        # What is in force: the new reloadable sections, the old rest.
        return dataclasses.replace(
            cfg, access=new.access, rate_limits=new.rate_limits, limits=new.limits, log=new.log
        )
    return new


def _raise_fd_limit(max_connections: int) -> None:
    """Lift RLIMIT_NOFILE's soft limit to the hard limit.

    Every connection holds a descriptor, and the usual soft limit (1024) is
    below ``max_connections``' default plus the daemon's own files; the token
    workers, started later, inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit
            log.debug("file descriptor limit not raised", extra={"soft": soft, "error": str(exc)})
        else:
            log.debug("file descriptor limit raised", extra={"from": soft, "to": hard})
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < max_connections + 64:
        log.warning(
            "file descriptor limit below max_connections; connections beyond it will fail",
            extra={"limit": soft, "max_connections": max_connections},
        )


#: A SIGHUP came before the reload handler was in place (see ``main``).
_startup_hangup = False


def _note_startup_hangup(signum: int, frame: object) -> None:
    global _startup_hangup
    _startup_hangup = True


def _take_startup_hangup() -> bool:
    global _startup_hangup
    pending, _startup_hangup = _startup_hangup, False
    return pending


def main(argv: Sequence[str] | None = None) -> int:
    # Before the PIN is read: no core dump, and no same-uid debugger, may see it.
    hardening_problems = no_core_dumps()
    args = _parser().parse_args(argv)
    if args.command == "serve":
        # SIGHUP's default action is to end the process: while signd starts
        # (reading its config, opening the token) a reload asked for early
        # (systemd's ExecReload, logrotate) would kill it.  It is noted
        # instead, and applied once the reload handler takes over.  Token
        # workers are exec'd, so they start with the default action again.
        signal.signal(signal.SIGHUP, _note_startup_hangup)
    try:
        cfg = load_config(args.config)
        pin = read_pin(cfg.token)
        metrics_token = read_metrics_token(cfg.metrics)
    except ConfigError as exc:
        print(f"signd: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        print(f"signd: {args.config} is valid")
        return EXIT_OK
    setup_logging(cfg.log.level)
    for problem in hardening_problems:
        log.warning("core dumps not fully disabled", extra={"error": problem})
    _raise_fd_limit(cfg.limits.max_connections)
    return trio.run(_run, cfg, pin, metrics_token)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
