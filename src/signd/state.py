"""The daemon's durable state: watermarks and accepted nonces, in an
append-only journal in the state directory (``[state] dir``).

Every change is a record appended with ``os.write`` and made durable with
``os.fdatasync``, in a thread (never on the event loop), by **group commit**:
while one sync runs, every record that comes in waits, and the next sync
takes them all.  A change is made in memory at once (so the next request
sees it) and the caller awaits ``commit`` before acting on it: a position is
durable before its signature is asked of the token, a nonce before ``valid``
is answered.

The journal is compacted when it is opened (and when it has grown well past
its last snapshot): the state is written to a new file, synced, and renamed
over the old one.  A record cut short by a crash at the end of the file is
ignored (it was never acknowledged); damage anywhere else refuses to start.

Record layout (all integers big-endian)::

    record = u32(len(body)) || u32(crc32(body)) || body
    body   = kind(1) || u8(len(key)) || key || ...
      "M": u64 mark        a watermarked key's mark
      "F": u64 floor       a key's nonce floor (written by compaction)
      "N": u64 timestamp || u8(len(nonce)) || nonce    an accepted nonce
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import trio

from .keys.replay import Marks, Nonces
from .trusted import NotTrusted, open_trusted_dir, trusted_uids

__all__ = ["DEFAULT_STATE_DIR", "JOURNAL", "State", "StateError"]

log = logging.getLogger("signd.state")

DEFAULT_STATE_DIR: Final = "/var/lib/signd"
JOURNAL: Final = "signd-state.journal"
LOCK: Final = "signd-state.lock"
#: The journal is compacted while running once it is this big and four times
#: its last snapshot.
COMPACT_AT: Final = 64 << 20

_HEAD: Final = struct.Struct(">II")
_U64: Final = struct.Struct(">Q")
_MARK: Final = b"M"
_FLOOR: Final = b"F"
_NONCE: Final = b"N"
_FILE_FLAGS: Final = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class StateError(Exception):
    """The state directory or its journal cannot be used."""


def _record(body: bytes) -> bytes:
    return _HEAD.pack(len(body), zlib.crc32(body)) + body


def _keyed(kind: bytes, name: str) -> bytes:
    key = name.encode()
    return kind + bytes((len(key),)) + key


def mark_record(name: str, mark: int) -> bytes:
    return _record(_keyed(_MARK, name) + _U64.pack(mark))


def floor_record(name: str, floor: int) -> bytes:
    return _record(_keyed(_FLOOR, name) + _U64.pack(floor))


def nonce_record(name: str, timestamp: int, nonce: bytes) -> bytes:
    return _record(_keyed(_NONCE, name) + _U64.pack(timestamp) + bytes((len(nonce),)) + nonce)


def _snapshot(
    marks: Iterable[tuple[str, int]],
    floors: Iterable[tuple[str, int]],
    nonces: Iterable[tuple[int, bytes, str]],
) -> bytes:
    parts = [mark_record(n, m) for n, m in marks]
    parts += [floor_record(n, f) for n, f in floors]
    parts += [nonce_record(n, ts, nonce) for ts, nonce, n in nonces]
    return b"".join(parts)


def replay_journal(data: bytes, marks: Marks, nonces: Nonces, now: float, where: str) -> int:
    """Apply the journal ``data`` to ``marks`` and ``nonces``; returns the
    length of its sound part (a torn last record is left out).

    Raises: StateError (a damaged record that is not the last).
    """
    pos, size = 0, len(data)
    while pos < size:
        bad = ""
        if size - pos < _HEAD.size:
            bad = "a record header cut short"
        else:
            length, crc = _HEAD.unpack_from(data, pos)
            end = pos + _HEAD.size + length
            body = data[pos + _HEAD.size : end]
            if length == 0 or end > size:
                bad = "a record cut short"
            elif zlib.crc32(body) != crc:
                bad = "a record whose checksum does not match"
            else:
                try:
                    _apply(body, marks, nonces, now)
                except (ValueError, IndexError, UnicodeDecodeError, struct.error):
                    bad = "a malformed record"
        if bad:
            rest = data[pos:]
            torn = size - pos < _HEAD.size or end >= size or not rest.strip(b"\0")
            if not torn:
                raise StateError(
                    f"{where}: {bad} at offset {pos}, with more records after it: the journal "
                    "is damaged (not by a crash); see OPERATIONS.md, 'The state directory'"
                )
            log.warning(
                "state journal: a torn last record was ignored (a crash while writing it)",
                extra={"journal": where, "offset": pos, "bytes": size - pos},
            )
            return pos
        pos = end
    return pos


def _apply(body: bytes, marks: Marks, nonces: Nonces, now: float) -> None:
    kind, n = body[:1], body[1]
    name = body[2 : 2 + n].decode()
    rest = body[2 + n :]
    if kind == _MARK and len(rest) == 8:
        marks.raise_to(name, _U64.unpack(rest)[0])
    elif kind == _FLOOR and len(rest) == 8:
        nonces.raise_floor(name, _U64.unpack(rest)[0])
    elif kind == _NONCE and len(rest) >= 9 and len(rest) == 9 + rest[8]:
        nonces.add(name, _U64.unpack_from(rest)[0], rest[9:], now)
    else:
        raise ValueError(f"unknown record kind {kind!r}")


def _check_file(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        raise StateError(f"{path} is not a regular file with one link: remove it")
    if st.st_uid not in trusted_uids() or stat.S_IMODE(st.st_mode) & 0o022:
        raise StateError(
            f"{path} is owned by uid {st.st_uid} or writable by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chown signd {path}; chmod 600 {path}"
        )


def _open_file(dirfd: int, directory: Path, name: str, flags: int) -> int:
    try:
        fd = os.open(name, flags | _FILE_FLAGS, 0o600, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateError(f"{directory / name} is a symlink: remove it") from None
        raise StateError(f"{directory / name}: {exc.strerror}") from None
    try:
        _check_file(fd, str(directory / name))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fdatasync(fd)


class _Round:
    """The records of one sync, and its outcome once ``done``."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


class State:
    """Watermarks and nonces, in memory and in the journal.  Use ``open``."""

    def __init__(
        self, directory: Path, dirfd: int, lockfd: int, fd: int, marks: Marks, nonces: Nonces
    ) -> None:
        self.directory = directory
        self.marks = marks
        self.nonces = nonces
        #: fdatasync calls made (tests count group commits with it)
        self.syncs = 0
        self._dirfd = dirfd
        self._lockfd = lockfd
        self._fd = fd
        self._size = os.fstat(fd).st_size
        self._snapshot_size = self._size
        self._buf: list[bytes] = []
        self._round = _Round()
        self._syncing = False
        self._idle = trio.Event()
        self._broken: BaseException | None = None

    # ------------------------------------------------------------ open, close

    @classmethod
    def open(
        cls, directory: str, *, window: int, max_nonces: int, now: float, create: bool = True
    ) -> State:
        """The state in ``directory`` (made, mode 0700, if missing and
        ``create``), its journal read and compacted.  Blocking: call it before
        serving (or in a thread).

        Raises: StateError (the directory is not trusted, another signd uses
        it, the journal is damaged, I/O failed).
        """
        path = Path(directory)
        try:
            if create:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            where, real = open_trusted_dir(str(path), "state.dir")
        except NotTrusted as exc:
            raise StateError(str(exc)) from None
        except OSError as exc:
            raise StateError(f"state.dir {directory}: {exc.strerror or exc}") from None
        try:
            dirfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=where)
        finally:
            os.close(where)
        path = Path(real)
        lockfd = fd = -1
        try:
            lockfd = _open_file(dirfd, path, LOCK, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError(
                    f"another signd process uses the state directory {path}: give each "
                    "daemon its own [state] dir"
                ) from None
            marks, nonces = Marks(), Nonces(window, max_nonces)
            fd = _open_file(dirfd, path, JOURNAL, os.O_RDWR | os.O_CREAT)
            with os.fdopen(os.dup(fd), "rb") as journal:
                data = journal.read()
            replay_journal(data, marks, nonces, now, str(path / JOURNAL))
            nonces.expire(now)
            os.close(fd)
            fd = -1
            fd = cls._rewrite(dirfd, path, _snapshot(marks.items(), nonces.floors(), nonces.held()))
        except BaseException:
            for opened in (fd, lockfd, dirfd):
                if opened >= 0:
                    os.close(opened)
            raise
        log.info(
            "state loaded",
            extra={"dir": str(path), "marks": len(list(marks.items())), "nonces": len(nonces)},
        )
        return cls(path, dirfd, lockfd, fd, marks, nonces)

    @staticmethod
    def _rewrite(dirfd: int, directory: Path, snapshot: bytes) -> int:
        """Replace the journal with ``snapshot`` (durably); its new fd, for appending.

        Raises: StateError.
        """
        new = JOURNAL + ".new"
        try:
            os.unlink(new, dir_fd=dirfd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(f"{directory / new}: {exc.strerror}") from None
        fd = _open_file(dirfd, directory, new, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            _write_all(fd, snapshot)
            os.fsync(fd)
            os.rename(new, JOURNAL, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            os.fsync(dirfd)
        except OSError as exc:
            os.close(fd)
            raise StateError(f"{directory / JOURNAL}: {exc.strerror}") from None
        return fd

    def close(self) -> None:
        for fd in (self._fd, self._lockfd, self._dirfd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lockfd = self._dirfd = -1

    # ------------------------------------------------------------ changes

    def mark(self, name: str) -> int | None:
        return self.marks.get(name)

    def claim(self, name: str, first: int, last: int) -> None:
        """Burn positions ``first`` to ``last`` of ``name`` in memory; ``commit``
        makes it durable.

        Raises: PositionUsed; StateError (the journal failed before).
        """
        self._check()
        self.marks.claim(name, first, last)
        self._buf.append(mark_record(name, last))

    def raise_mark(self, name: str, position: int) -> bool:
        """The mark of ``name`` at least ``position`` (``commit`` makes it
        durable); whether it went up.  Raises: StateError."""
        self._check()
        if not self.marks.raise_to(name, position):
            return False
        self._buf.append(mark_record(name, position))
        return True

    def accept_nonce(self, name: str, timestamp: int, nonce: bytes, now: float) -> str | None:
        """``stale`` or ``replayed``; or None: accepted, in memory (``commit``
        makes it durable).  Raises: StateError."""
        self._check()
        self.nonces.expire(now)
        status = self.nonces.check(name, timestamp, nonce, now)
        if status is None:
            self.nonces.add(name, timestamp, nonce, now)
            self._buf.append(nonce_record(name, timestamp, nonce))
        return status

    def check_writable(self) -> None:
        """Raises: StateError (the journal failed before: every change is refused)."""
        self._check()

    def _check(self) -> None:
        if self._broken is not None:
            raise StateError(
                f"the state journal in {self.directory} failed to write ({self._broken}); "
                "restart signd"
            )

    # ------------------------------------------------------------ group commit

    async def commit(self) -> None:
        """Return once every change made so far is on disk.

        Raises: StateError (the write or sync failed; the store refuses every
        change from then on, failing closed).
        """
        mine = self._round
        while not mine.done.is_set():
            if self._syncing:
                await self._idle.wait()
                continue
            await self._sync_round()
        if mine.error is not None:
            raise StateError(f"the state journal could not be written: {mine.error}")

    async def _sync_round(self) -> None:
        """Write and sync the open round (this task leads it)."""
        self._syncing = True
        data, self._buf = b"".join(self._buf), []
        current, self._round = self._round, _Round()
        try:
            with trio.CancelScope(shield=True):
                if self._broken is not None:
                    raise self._broken
                if data:
                    await trio.to_thread.run_sync(_write_all, self._fd, data)
                    self.syncs += 1
                    self._size += len(data)
                if self._size > max(COMPACT_AT, 4 * self._snapshot_size):
                    await self._compact()
        except (OSError, StateError) as exc:
            self._broken = self._broken or exc
            current.error = exc
            log.error("the state journal could not be written", extra={"error": str(exc)})
        finally:
            current.done.set()
            self._syncing = False
            idle, self._idle = self._idle, trio.Event()
            idle.set()

    async def _compact(self) -> None:
        snapshot = (self.marks.items(), self.nonces.floors(), self.nonces.held())
        data = await trio.to_thread.run_sync(_snapshot, *snapshot)
        fd = await trio.to_thread.run_sync(self._rewrite, self._dirfd, self.directory, data)
        os.close(self._fd)
        self._fd = fd
        self._size = self._snapshot_size = len(data)
        log.info("state journal compacted", extra={"bytes": len(data)})
