"""The gauges the metrics read at scrape time, from the daemon's running parts.

Counters are counted where things happen (``metrics.Metrics``); a gauge is a
reading of a part's state (connections open, the token queue, the audit
chain), taken when Prometheus scrapes.  ``daemon.py`` hands the function
``gauges`` returns to the metrics endpoint.
"""

from __future__ import annotations

from collections.abc import Callable

from .audit.checkpoint import Checkpointer
from .audit.log import AuditLog
from .metrics import KeyState, Snapshot
from .server.core import Server
from .service.core import Service
from .token.tokenset import Tokens, TokenSet

__all__ = ["gauges"]


def gauges(
    service: Service,
    server: Server,
    pool: Tokens,
    audit: AuditLog | None,
    cp: Checkpointer | None,
) -> Callable[[], Snapshot]:
    """What the metrics' gauges read at scrape time, from the running parts."""

    def snapshot() -> Snapshot:
        floor = service.min_rotate_period
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
            tokens=tuple(
                (info.label if info is not None else f"token {i + 1}", state)
                for i, (info, state) in enumerate(pool.states())
            )
            if isinstance(pool, TokenSet)
            else (),
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

    return snapshot
