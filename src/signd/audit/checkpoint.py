"""Signed checkpoints of the audit chain, and its head kept on the token.

The writer thread asks for a checkpoint (every ``checkpoint_every`` records,
every ``checkpoint_interval`` seconds when records were written, at rotation,
at start and at shutdown) with the chain head at that moment.  The
``Checkpointer``, a trio task, signs that head with the audit key, stores it
on the token as the chain head (``TokenHead``), and hands the checkpoint
record back to the log, which chains it like any record.  At start it checks
the log against the head on the token: files removed, replaced or rewritten
since the last checkpoint are found there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Final, Protocol

import trio

from signd_client.audit import AUDIT_KEY, CHAIN_MISMATCH, CHECKPOINT, checkpoint_message

from ..errors import Conflict, WireError
from ..protocol import AuditHead
from .files import AuditError
from .log import AuditLog
from .writer import CheckpointAsk

__all__ = [
    "CHECKPOINT_TIMEOUT",
    "Checkpointer",
    "MetadataStore",
    "Signer",
    "TokenHead",
    "head_label",
]

log = logging.getLogger("signd.audit")

#: Seconds a checkpoint's signature and head write may take before it is given up.
CHECKPOINT_TIMEOUT: Final = 10.0


class Signer(Protocol):
    """Signs checkpoints with the audit key (the service)."""

    def audit_key_version(self) -> int:
        """The audit key's version that signs now.  Raises: WireError."""

    async def sign_audit(self, version: int, message: bytes) -> bytes:
        """A signature of ``message`` by that version.  Raises: WireError."""


class MetadataStore(Protocol):
    """Where the chain head is kept: data objects on the token (the token pool)."""

    async def load_metadata(self, name: str | None = None) -> list[Any]: ...

    async def write_metadata(self, name: str, revision: int, value: bytes) -> None: ...


def head_label(directory: Path) -> str:
    """The token object that holds a log's chain head: one per audit directory,
    so daemons sharing a token keep one each.  Not a valid key name (``:``),
    so no client's key record can ever take it."""
    where = os.fsencode(os.path.realpath(directory))
    return "signd:audit-head:" + hashlib.sha256(where).hexdigest()[:16]


class TokenHead:
    """The chain head on the token: the newest checkpoint's (seq, hash, file)."""

    def __init__(self, store: MetadataStore, label: str) -> None:
        self.store = store
        self.label = label
        self.revision = 0
        self.head: AuditHead | None = None

    async def read(self) -> AuditHead | None:
        """Raises: WireError (the token), AuditError (the object is unreadable)."""
        blobs = await self.store.load_metadata(self.label)
        if not blobs:
            return None
        self.revision = blobs[0].revision
        try:
            value = json.loads(blobs[0].value)
            self.head = AuditHead(
                chain=str(value["chain"]),
                seq=int(value["seq"]),
                hash=str(value["hash"]),
                file=str(value["file"]),
                time=float(value["time"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(
                f"the chain head on the token ({self.label}) is unreadable: {exc}"
            ) from None
        return self.head

    async def write(self, head: AuditHead) -> None:
        """Raises: WireError."""
        value = json.dumps(
            {
                "chain": head.chain,
                "seq": head.seq,
                "hash": head.hash,
                "file": head.file,
                "time": head.time,
            },
            sort_keys=True,
        ).encode()
        try:
            await self.store.write_metadata(self.label, self.revision + 1, value)
        except Conflict:  # written elsewhere meanwhile (a second daemon on the same dir?)
            await self.read()
            await self.store.write_metadata(self.label, self.revision + 1, value)
        self.revision += 1
        self.head = head


class Checkpointer:
    """Signs the checkpoints the writer thread asks for, keeps the chain head
    on the token, and checks at start that the log matches that head.

    ``on_mismatch``: ``refuse`` (``start`` raises AuditError) or
    ``continue`` (a ``chain_mismatch`` record is written and the chain goes on).
    """

    def __init__(
        self,
        audit: AuditLog,
        signer: Signer,
        head: TokenHead,
        *,
        token: str,
        on_mismatch: str = "refuse",
    ) -> None:
        self.audit = audit
        self.signer = signer
        self.token_head = head
        self.token = token
        self.on_mismatch = on_mismatch
        self.chain = head.label
        self.chain_ok = True
        self.mismatches = 0
        self.failures = 0
        #: the newest ask taken, and when (trio's clock): checkpoint_interval counts from it
        self._asks_seen = 0
        self._asked_at = 0.0

    @property
    def head(self) -> AuditHead | None:
        """The chain head as the newest checkpoint signed it."""
        return self.token_head.head

    async def start(self, nursery: trio.Nursery) -> None:
        """Check the log against the token's head, then checkpoint its start.

        Raises:
            AuditError: the log does not match and ``on_mismatch`` is refuse.
            WireError: the token cannot be read.
        """
        self._asked_at = trio.current_time()
        head = await self.token_head.read()
        problem = None
        if head is not None:
            problem = await trio.to_thread.run_sync(self._mismatch, head)
        if problem is not None:
            self.chain_ok = False
            self.mismatches += 1
            log.error(
                "AUDIT LOG DOES NOT MATCH THE CHAIN HEAD ON THE TOKEN",
                extra={
                    "problem": problem,
                    "dir": str(self.audit.directory),
                    "on_mismatch": self.on_mismatch,
                },
            )
            if self.on_mismatch != "continue":
                raise AuditError(
                    f"the audit log in {self.audit.directory} does not match the chain head "
                    f"on the token: {problem}. Restore the missing or altered files, or set "
                    '[audit] on_mismatch = "continue" to start a new chain segment (see '
                    "OPERATIONS.md)"
                )
        self.audit.start_checkpoints()
        nursery.start_soon(self._run)
        nursery.start_soon(self._tick)
        if problem is not None and head is not None:
            self.audit.append(
                {
                    "kind": CHAIN_MISMATCH,
                    "detail": problem,
                    "expected_seq": head.seq,
                    "expected_hash": head.hash,
                    "ts": round(time.time(), 6),
                }
            )
        await self.now("start")

    def _mismatch(self, head: AuditHead) -> str | None:
        """What is wrong with the log, given the token's chain head; None if nothing."""
        seq, _ = self.audit.head
        if head.seq == 0:
            return None  # the head of an empty log: every log starts there
        if head.seq > seq:
            return (
                f"the token's chain head is record {head.seq} (checkpoint of "
                f"{_utc(head.time)}, in {head.file}), but the log ends at record {seq}: "
                "records or files were removed"
            )
        found = self.audit.find(head.seq)
        if found is None:
            return (
                f"record {head.seq}, the token's chain head (in {head.file}), is not in the "
                "log: its files were removed or replaced"
            )
        digest, name = found
        if digest != head.hash:
            return (
                f"record {head.seq} in {name} is not the one the token's chain head names "
                "(another hash): the log was rewritten"
            )
        if name != head.file:
            return f"record {head.seq} is in {name}, but the token's chain head says {head.file}"
        return None

    async def now(self, reason: str) -> bool:
        """Checkpoint the chain as it is now and wait until it is written
        (``reason``: start, shutdown); False if that did not happen in time."""
        done = trio.Event()
        self.audit.checkpoint_now(reason, done)
        with trio.move_on_after(2 * CHECKPOINT_TIMEOUT):
            await done.wait()
        return done.is_set()

    async def _tick(self) -> None:
        """Tell the writer when ``checkpoint_interval`` has passed since the
        newest ask (it asks if records were written since, and no other ask
        came meanwhile)."""
        interval = self.audit.checkpoint_interval
        while True:
            await trio.sleep(max(0.01, interval / 4))
            if trio.current_time() - self._asked_at >= interval:
                self.audit.checkpoint_due(self._asks_seen)

    async def _run(self) -> None:
        async for ask in self.audit.checkpoint_asks:
            self._asks_seen, self._asked_at = ask.number, trio.current_time()
            await self._checkpoint(ask)

    async def _checkpoint(self, ask: CheckpointAsk) -> None:
        fields: dict[str, Any] = {
            "chain": self.chain,
            "file": ask.file,
            "head_hash": ask.hash,
            "head_seq": ask.seq,
            "key": AUDIT_KEY,
            "reason": ask.reason,
            "token": self.token,
            "ts": round(time.time(), 6),
        }
        try:
            with trio.fail_after(CHECKPOINT_TIMEOUT):
                fields["version"] = self.signer.audit_key_version()
                sig = await self.signer.sign_audit(fields["version"], checkpoint_message(fields))
        except (WireError, trio.TooSlowError) as exc:
            self.failures += 1
            log.error("an audit checkpoint could not be signed", extra={"error": str(exc)})
            self.audit.unsigned()
            if ask.done is not None:
                ask.done.set()
            return
        # The head on the token first: once the record is in the log, the
        # token must not be behind it (a crash in between leaves the token
        # naming a record the log has, which is no mismatch).
        head = AuditHead(self.chain, ask.seq, ask.hash, ask.file, fields["ts"])
        try:
            with trio.fail_after(CHECKPOINT_TIMEOUT):
                await self.token_head.write(head)
        except (WireError, trio.TooSlowError) as exc:
            self.failures += 1
            log.error(
                "the audit chain head could not be stored on the token",
                extra={"error": str(exc), "seq": ask.seq},
            )
        record = {"kind": CHECKPOINT, **fields, "sig": base64.b64encode(sig).decode()}
        self.audit.append(record, ask.done)
        log.debug("audit checkpoint", extra={"seq": ask.seq, "reason": ask.reason})


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
