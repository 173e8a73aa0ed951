"""The audit log: one hash-chained JSON line per request, written by its own thread.

Records are queued from the event loop and written by a writer thread with
*group commit*: everything queued is written, and in strict mode made durable
with one ``fsync``, then all of it is handed back to trio at once.  In strict
mode (the default) an answer is sent only after its record is durable, so a
``kill -9`` loses no record of an answered request; relaxed mode answers at
once and syncs every second.  The format and its verification live in
``signd_client.audit`` (``signctl audit verify``).

Records never hold signed data or PINs: only the SHA-256 of what was signed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import trio

from signd_client.audit import GENESIS, seal

from .protocol import Message

__all__ = ["AuditLog", "data_digest"]

log = logging.getLogger("signd.audit")

MODES: Final = ("strict", "relaxed")
_STOP: Final = object()
Done = Callable[[bool], None]  # True: the record is written (durably, in strict mode)


def data_digest(args: Message) -> tuple[str | None, int | None]:
    """SHA-256 (hex) of what a request asks to sign or verify, and its item count."""
    for single in ("message", "digest"):
        value = getattr(args, single, None)
        if value is not None:
            return hashlib.sha256(value).hexdigest(), None
    for many in ("messages", "digests"):
        values = getattr(args, many, None)
        if values is not None:
            h = hashlib.sha256()
            for v in values:
                h.update(hashlib.sha256(v).digest())
            return h.hexdigest(), len(values)
    return None, None


class AuditLog:
    def __init__(self, directory: str, *, mode: str = "strict", max_bytes: int = 64 << 20) -> None:
        if mode not in MODES:
            raise ValueError(f"audit mode must be one of {MODES}")
        self.directory = Path(directory)
        self.mode = mode
        self.max_bytes = max_bytes
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._seq = 0
        self._prev = GENESIS
        self._index = 0
        self._file: Any = None
        self.records_written = 0
        self.failures = 0

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Find where the chain ends, open the current file, start the writer.

        Raises:
            OSError: the directory cannot be used.
        """
        await trio.to_thread.run_sync(self._resume)
        self._trio_token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._main, name="signd-audit", daemon=True)
        self._thread.start()
        log.info(
            "audit log open",
            extra={"file": str(self._path(self._index)), "seq": self._seq, "mode": self.mode},
        )

    async def aclose(self) -> None:
        """Write what is queued, then stop."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._thread.join)
        self._thread = None

    # ------------------------------------------------------------ hot path

    def record(self, rec: dict[str, Any], done: Done) -> None:
        """Queue ``rec``; ``done`` runs in trio once it is written (strict: durable).

        In relaxed mode ``done`` runs at once.
        """
        if self.mode == "relaxed":
            self._queue.put((rec, None))
            done(True)
        else:
            self._queue.put((rec, done))

    # ------------------------------------------------------------ writer thread

    def _path(self, index: int) -> Path:
        return self.directory / f"audit-{index:06d}.jsonl"

    def _resume(self) -> None:
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        files = sorted(self.directory.glob("audit-*.jsonl"))
        if not files:
            self._index = 1
        else:
            last = files[-1]
            self._index = int(last.stem.split("-")[1])
            self._seq, self._prev = _chain_end(last, files[:-1])
        self._file = _open_log(self._path(self._index))

    def _main(self) -> None:
        assert self._trio_token is not None
        last_sync = time.monotonic()
        while True:
            first = self._queue.get()
            items = [first]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(i is _STOP for i in items)
            batch = [i for i in items if i is not _STOP]
            ok = True
            dones: list[Done] = []
            if batch:
                try:
                    lines = []
                    for rec, done in batch:
                        self._seq += 1
                        line, self._prev = seal(rec, self._seq, self._prev)
                        lines.append(line)
                        if done is not None:
                            dones.append(done)
                    self._file.write("\n".join(lines) + "\n")
                    self._file.flush()
                    now = time.monotonic()
                    if self.mode == "strict" or now - last_sync >= 1.0:
                        os.fsync(self._file.fileno())
                        last_sync = now
                    self.records_written += len(batch)
                    if self._file.tell() >= self.max_bytes:
                        self._rotate()
                except OSError as exc:
                    ok = False
                    self.failures += len(batch)
                    log.error("audit write failed", extra={"error": str(exc)})
            if dones:
                try:
                    self._trio_token.run_sync_soon(_finish, dones, ok)
                except trio.RunFinishedError:
                    pass
            if stop:
                with contextlib.suppress(OSError):
                    self._file.flush()
                    os.fsync(self._file.fileno())
                    self._file.close()
                return

    def _rotate(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()
        self._index += 1
        self._file = _open_log(self._path(self._index))
        dirfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


def _open_log(path: Path) -> Any:
    """Open an audit file for appending; never through a symlink, mode 0640."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o640)
    os.fchmod(fd, 0o640)
    return os.fdopen(fd, "a", encoding="utf-8")


def _chain_end(last: Path, older: list[Path]) -> tuple[int, str]:
    """(seq, hash) of the last intact record; a torn tail (a crash mid-write,
    never acknowledged) is cut off.  An empty last file continues the one before."""
    data = last.read_bytes()
    keep = len(data)
    for line in reversed(data.splitlines(keepends=True)):
        try:
            rec = json.loads(line)
            return int(rec["seq"]), str(rec["hash"])
        except (ValueError, KeyError, TypeError):
            keep -= len(line)
            log.warning("cutting a torn audit record", extra={"file": str(last)})
            with open(last, "r+b") as f:
                f.truncate(keep)
    if older:
        return _chain_end(older[-1], older[:-1])
    return 0, GENESIS


def _finish(dones: list[Done], ok: bool) -> None:
    for done in dones:
        try:
            done(ok)
        except Exception:
            log.exception("an audited answer could not be sent")
