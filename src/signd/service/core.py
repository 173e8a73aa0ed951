"""Requests to responses: keystore, token and algorithms, no sockets.

``Service.handle`` takes every request that one read of a connection
delivered and answers it through ``reply``, dispatching on the op table
(``signd.ops``):

* reads and ``verify`` are answered at once, in the caller's task;
* every ``sign`` of the batch goes to the token as **one** submission, and the
  answers come back in one callback;
* the rare operations (``create_key``, ``rotate``, and a look-up of a key this
  process has not seen yet) are returned as coroutines for the transport to run
  as tasks.

Each request gets exactly one ``reply``; the transport counts on that.

The operations live by family: ``reads``, ``signing`` (token work),
``admin`` (key changes), ``lifecycle`` (the daemon's own), ``lookup`` (keys
not seen yet); ``convert`` is the edge to the wire (errors included).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..access.policy import Principal
from ..errors import Busy, PermissionDenied, WireError
from ..ops import TABLE, Op
from ..protocol import Request
from .base import RESERVED_KEYS, RESERVED_VERBS
from .context import Batch, Reply, SlowWork
from .reads import Reads

__all__ = ["Reply", "Service", "SlowWork"]


class Service(Reads):
    """The daemon's operations on keys; built by ``signd.daemon``."""

    def handle(
        self,
        requests: Sequence[Request],
        reply: Reply,
        source: object,
        who: Principal,
        sha256s: Sequence[bytes | None] | None = None,
    ) -> list[SlowWork]:
        """Answer ``requests`` from ``source`` (a connection, for fair queueing).

        ``sha256s``, if the caller has them (the audit log's digests), are the
        SHA-256 of each request's one ``message`` (None where it has none): a
        SHA-256 signature or verification uses it instead of hashing again.

        Returns the slow ones, for the caller to run as tasks.
        """
        batch = Batch(
            reply,
            source,
            who,
            now=self._clock(),
            deadline=time.monotonic() + self.request_timeout,
            started=time.perf_counter(),
            inline_ok=len(requests) == 1 and self.token.pending == 0,
        )
        for i, req in enumerate(requests):
            if sha256s is not None:
                batch.sha256 = sha256s[i]
            try:
                op = TABLE[req.op]
                self._check_access(op, req, who)
                op.handler(self, req, batch)
            except Exception as exc:
                self._fail(reply, req, exc)
        if batch.entries:
            for req, entries in batch.entries:
                if not entries:
                    continue  # a batch whose every item was refused is answered already
                try:
                    self.token.enqueue(source, entries)
                except WireError as exc:  # busy, or no worker: the request fails whole
                    if isinstance(exc, Busy):
                        self.metrics.limit_hit("token_queue")
                    self._fail(reply, req, exc)
            self.token.pump()
        return batch.slow

    def _check_access(self, op: Op, req: Request, who: Principal) -> None:
        """Before the key is even looked up: a peer that may not use a key
        learns nothing about it, not even that it exists.

        Raises: PermissionDenied.
        """
        name = getattr(req.args, "key", None)
        if name is None:
            return
        if name in RESERVED_KEYS and op.verb not in RESERVED_VERBS:
            raise PermissionDenied(
                f"key {name!r} is reserved for signd itself (it signs the audit "
                f"log's checkpoints): no client may {req.op} it"
            )
        if op.verb is not None:
            self.policy.check(who, op.verb, name)
