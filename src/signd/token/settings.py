"""What the token pool is built with (from the config's [token] section)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PoolSettings:
    module: str
    token_label: str
    pin: str
    #: signing workers, the bulk ones included
    workers: int = 1
    #: of them, the last ones take only bulk work (``sign_batch``; see ``scheduler``)
    bulk_workers: int = 0
    queue_limit: int = 65536
    batch_max: int = 64
    depth: int = 2
    quantum: int = 4
    #: seconds a worker polls for the next batch before it sleeps
    spin: float = 0.0
    log_level: str = "info"
    #: seconds between ``C_GetTokenInfo`` probes by idle workers
    probe_interval: float = 1.0
    #: seconds a signing worker may hold work without answering (then: hung)
    stall_timeout: float = 5.0
    #: MB a signing worker's RSS may grow (past its warm-up) before a fresh
    #: process takes over from it; 0: never
    recycle_mb: float = 0.0
    #: the token profile's name (see ``profiles.py``)
    profile: str = "softhsm"
