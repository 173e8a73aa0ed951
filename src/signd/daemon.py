"""The daemon: builds its parts from a config, and runs them until a signal.

``run`` is what ``signd serve`` runs (``cli.py`` parses the arguments and sets
up the process); this module is the only place that builds the daemon's
components and hands each its collaborators:

    metrics -> token pool -> record store -> audit log, chain head
            -> service -> checkpointer -> server, metrics endpoint,
               ssh-agent front end (``[agent]``)

A reload (SIGHUP) is applied to the running parts by ``reload.py``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from typing import Final

import trio

from .access.policy import Policy
from .agent.front import AgentFront
from .agent.sockets import agent_socket
from .audit.checkpoint import Checkpointer, TokenHead, head_label
from .audit.facts import outcome_of
from .audit.files import AuditError
from .audit.log import AuditLog, record_own_action
from .config import Config, Secret, TokenConfig
from .errors import WireError
from .gauges import gauges
from .keys.recordstore import RecordStore
from .keys.store import LoadedKey
from .metrics import Metrics, Snapshot
from .reload import limiter_for, reload, take_startup_hangup
from .server.core import Server
from .server.http import serve_http
from .server.listener import ListenerError, open_listener, systemd_sockets
from .server.systemd import Notifier
from .service.convert import key_info
from .service.core import Service
from .state import State, StateError
from .token.pool import PoolSettings, open_token_pool
from .token.tokenset import Tokens, TokenSet

__all__ = ["EXIT_FAILURE", "EXIT_OK", "run"]

log = logging.getLogger("signd")

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1


def _pool_settings(cfg: Config, tc: TokenConfig, pin: Secret) -> PoolSettings:
    """One token's pool: its own module, label, PIN and workers."""
    return PoolSettings(
        module=tc.module,
        token_label=tc.label,
        pin=pin.reveal(),
        workers=tc.worker_count + tc.bulk_worker_count,
        bulk_workers=tc.bulk_worker_count,
        batch_max=tc.batch,
        depth=tc.depth,
        spin=tc.spin_us / 1e6,
        queue_limit=cfg.limits.token_queue,
        log_level=cfg.log.level,
        probe_interval=tc.probe_interval,
        stall_timeout=tc.stall_timeout,
        recycle_mb=tc.recycle_mb,
        profile=tc.profile.name,
    )


async def run(
    cfg: Config,
    pin: Secret,
    metrics_token: Secret | None = None,
    replica_pins: Sequence[Secret] = (),
) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code (``EXIT_OK``, or
    ``EXIT_FAILURE`` when the socket, the token or the audit log fails).
    ``replica_pins``: the PINs of ``cfg.replicas``, in order."""
    # Before the token workers start: they must not inherit $NOTIFY_SOCKET.
    notifier = Notifier.from_environ()
    agent_sock: socket.socket | None = None
    agent_inherited = False
    try:
        passed = systemd_sockets()
        inherited = passed.get("signd")
        sock = inherited or open_listener(
            cfg.server.socket, cfg.server.socket_mode, cfg.server.socket_group
        )
    except ListenerError as exc:
        log.error("cannot listen", extra={"error": str(exc)})
        return EXIT_FAILURE
    try:
        agent_sock, agent_inherited = agent_socket(cfg.agent, passed.get("agent"))
    except ListenerError as exc:
        log.error("cannot listen on the agent socket", extra={"error": str(exc)})
        sock.close()
        if inherited is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg.server.socket)
        return EXIT_FAILURE
    pins = [pin, *replica_pins]
    settings = [
        _pool_settings(cfg, tc, p) for tc, p in zip((cfg.token, *cfg.replicas), pins, strict=True)
    ]
    failed = False
    metrics = Metrics()
    try:
        try:
            async with contextlib.AsyncExitStack() as stack:
                pools = [
                    await stack.enter_async_context(open_token_pool(s, metrics)) for s in settings
                ]
                pool: Tokens = pools[0]
                if len(pools) > 1:
                    pool = TokenSet(pools, cfg.token.profile)
                    await pool.start()
                return await _serve(
                    cfg,
                    sock,
                    inherited is not None,
                    pool,
                    metrics,
                    notifier=notifier,
                    metrics_token=metrics_token,
                    agent_sock=agent_sock,
                )
        except* WireError as group:
            for err in group.exceptions:
                log.error("token unavailable", extra={"error": str(err)})
            failed = True
    finally:
        if inherited is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg.server.socket)
        if agent_sock is not None and not agent_inherited and cfg.agent.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg.agent.socket)
    assert failed
    return EXIT_FAILURE


async def _serve(
    cfg: Config,
    sock: socket.socket,
    inherited: bool,
    pool: Tokens,
    metrics: Metrics,
    *,
    notifier: Notifier,
    metrics_token: Secret | None = None,
    agent_sock: socket.socket | None = None,
) -> int:
    audit = None
    if cfg.audit.dir is not None:
        audit = AuditLog(
            cfg.audit.dir,
            mode=cfg.audit.mode,
            max_bytes=cfg.audit.max_bytes,
            checkpoint_every=cfg.audit.checkpoint_every,
            checkpoint_interval=cfg.audit.checkpoint_interval,
            on_write=metrics.audit_write,
        )
        try:
            await audit.open()
        except (AuditError, OSError) as exc:
            log.error("the audit log cannot be used", extra={"error": str(exc)})
            return EXIT_FAILURE
    else:
        log.warning("audit log disabled: set [audit] dir to keep one")
    try:
        state = await _open_state(cfg)
    except StateError as exc:
        log.error("the state directory cannot be used", extra={"error": str(exc)})
        if audit is not None:
            await audit.aclose()
        return EXIT_FAILURE
    try:
        return await _serve_state(
            cfg, sock, inherited, pool, metrics, audit, state, notifier, metrics_token, agent_sock
        )
    finally:
        if state is not None:
            state.close()


async def _open_state(cfg: Config) -> State | None:
    """The state directory's watermarks and nonces (read in a thread); None:
    the default directory is missing (watermarked keys and replay-checked
    verifies are then refused).  Raises: StateError."""
    return await trio.to_thread.run_sync(_open_state_now, cfg, time.time())


def _open_state_now(cfg: Config, now: float) -> State | None:
    st = cfg.state
    if not st.required and not os.path.isdir(st.dir):
        log.warning(
            "no state directory: watermarked keys and replay-checked verifies are refused; "
            "set [state] dir to keep them",
            extra={"dir": st.dir},
        )
        return None
    return State.open(
        st.dir,
        window=cfg.replay.window,
        max_nonces=cfg.replay.max_nonces,
        now=now,
        create=st.required,
    )


async def _serve_state(
    cfg: Config,
    sock: socket.socket,
    inherited: bool,
    pool: Tokens,
    metrics: Metrics,
    audit: AuditLog | None,
    state: State | None,
    notifier: Notifier,
    metrics_token: Secret | None,
    agent_sock: socket.socket | None,
) -> int:
    """``_serve`` once the audit log and the state are open."""
    records = RecordStore(pool)
    head = None if audit is None else TokenHead(records, head_label(audit.directory))
    service = Service(
        pool,
        records,
        Policy(cfg.access.rules, trust_root=cfg.access.trust_root),
        limiter_for(cfg.rate_limits, None),
        metrics,
        clock=time.time,
        profile=cfg.token.profile,
        request_timeout=cfg.limits.request_timeout,
        min_rotate_period=cfg.keys.min_rotate_period,
        sync_interval=cfg.keys.sync_interval,
        default_max_versions=cfg.keys.default_max_versions,
        max_versions_limit=cfg.keys.max_versions_limit,
        default_backup=cfg.keys.backup,
        on_auto_rotate=None if audit is None else functools.partial(_audit_auto_rotation, audit),
        on_auto_prune=None if audit is None else functools.partial(_audit_auto_prune, audit),
        audit_head=None if head is None else lambda: head.head,
        state=state,
    )
    checkpoints: Checkpointer | None = None  # signs with the service's audit key
    if audit is not None and head is not None:
        info = pool.info
        checkpoints = Checkpointer(
            audit,
            service,
            head,
            token=f"{info.label}/{info.serial}" if info is not None else "?",
            on_mismatch=cfg.audit.on_mismatch,
        )
    # Keeping the loop warm (polling after light traffic) holds the GIL; with a
    # strict audit log the writer thread is on every answer's path and would
    # wait out the whole poll (measured, one synchronous client: p50 1.1 ms
    # polling, 0.5 ms not), so the loop sleeps instead.
    strict = audit is not None and audit.mode == "strict"
    keep_warm = 0.0 if strict else cfg.token.spin_us / 1e6
    server = Server(
        service,
        cfg.limits,
        metrics=metrics,
        drop=pool.drop,
        audit=audit,
        keep_warm=keep_warm,
    )
    agent = None
    if agent_sock is not None:
        front = AgentFront(
            service, cfg.agent.keys, cfg.limits, metrics=metrics, audit=audit, clock=time.time
        )
        agent = (front, agent_sock)
    snapshot = gauges(service, server, pool, audit, checkpoints)
    try:
        async with trio.open_nursery() as nursery:
            if isinstance(pool, TokenSet):
                nursery.start_soon(pool.run)
            if cfg.metrics.enabled:
                await _start_metrics(nursery, cfg, service, snapshot, metrics_token)
            try:
                return await _serve_with(
                    cfg,
                    inherited,
                    pool,
                    service,
                    server,
                    sock,
                    notifier=notifier,
                    checkpoints=checkpoints,
                    agent=agent,
                )
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if audit is not None:
            await audit.aclose()


async def _start_metrics(
    nursery: trio.Nursery,
    cfg: Config,
    service: Service,
    snapshot: Callable[[], Snapshot],
    token: Secret | None,
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
        snapshot,
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
    outcome = outcome_of(key_info(key))
    if not await record_own_action(audit, "auto_rotate", key.record.name, outcome):
        log.error("a scheduled rotation could not be audited", extra={"key": key.record.name})


async def _audit_auto_prune(audit: AuditLog, key: LoadedKey, versions: list[int]) -> None:
    """Retired versions destroyed by the daemon: recorded like a scheduled
    rotation, with the version the key's info names."""
    outcome = outcome_of(key_info(key))
    if not await record_own_action(audit, "auto_prune", key.record.name, outcome):
        log.error(
            "a pruning of retired versions could not be audited",
            extra={"key": key.record.name, "versions": versions},
        )


async def _serve_with(
    cfg: Config,
    inherited: bool,
    pool: Tokens,
    service: Service,
    server: Server,
    sock: socket.socket,
    *,
    notifier: Notifier,
    checkpoints: Checkpointer | None,
    agent: tuple[AgentFront, socket.socket] | None = None,
) -> int:
    await service.load()
    front = None if agent is None else agent[0]
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

    #: when the agent socket's answers in flight must be sent by (at SIGTERM)
    drain_by = [math.inf]

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()  # caught from now on: "ready" is logged after this
            async for signum in signals:
                name = signal.Signals(signum).name
                log.info("stopping", extra={"signal": name})
                notifier.stopping(f"Stopping on {name}: answering requests in flight")
                server.shutdown()
                if front is not None:
                    front.shutdown()
                    drain_by[0] = trio.current_time() + cfg.limits.drain_timeout
                return

    async def watch_reload() -> None:
        nonlocal cfg
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            if take_startup_hangup():  # asked for while starting: the config may be newer
                log.info("SIGHUP came during startup: reloading the config now")
                cfg = reload(cfg, service, server, front)
            async for _ in signals:
                cfg = reload(cfg, service, server, front)

    socket_name = "systemd socket" if inherited else cfg.server.socket

    async with trio.open_nursery() as nursery:

        def ready() -> None:
            log.info("ready", extra={"socket": socket_name, "pid": os.getpid()})
            keys = service.health().keys
            notifier.ready(f"Serving {keys} key{'s' * (keys != 1)} of token {info.label!r}")
            # After READY=1: systemd arms the watchdog only then.
            nursery.start_soon(notifier.run_watchdog)

        if checkpoints is not None:
            try:
                await _start_checkpoints(checkpoints, service, nursery)
            except (AuditError, WireError) as exc:
                log.error("the audit log cannot be used", extra={"error": str(exc)})
                nursery.cancel_scope.cancel()
                return EXIT_FAILURE
        await nursery.start(watch_signals)
        nursery.start_soon(watch_reload)
        nursery.start_soon(service.run_lifecycle)
        if agent is not None:
            await nursery.start(agent[0].serve, trio.socket.from_stdlib_socket(agent[1]))
            log.info(
                "agent socket",
                extra={"socket": cfg.agent.socket, "keys": list(cfg.agent.keys)},
            )
        await server.serve(sock, on_ready=ready)
        if front is not None:
            front.shutdown()  # (again, if the signal did)
            by = min(drain_by[0], trio.current_time() + cfg.limits.drain_timeout)
            if not await front.drain(by):
                log.warning("drain timed out on the agent socket")
        if checkpoints is not None and not await checkpoints.now("shutdown"):
            log.error("the audit log's last checkpoint could not be written")
        nursery.cancel_scope.cancel()
    log.info("stopped")
    return EXIT_OK


async def _start_checkpoints(
    checkpoints: Checkpointer, service: Service, nursery: trio.Nursery
) -> None:
    """The audit key and the chain head on the token; the log checked against
    that head, and its start checkpointed.

    Raises: AuditError (the log does not match and on_mismatch is refuse), WireError.
    """
    await service.ensure_audit_key()
    await checkpoints.start(nursery)
