"""A token worker process as the daemon sees it: start, log in, stop.

``spawn`` starts ``python -m signd.token FD ROLE`` on one end of a
socketpair; ``login`` makes the ``Open`` call, the first one; ``reap`` closes
the socket (a worker exits when it sees the end) and waits for the process.
What the pool does with a worker that serves is in ``pool.py``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from ..errors import TokenUnavailable
from ..outbox import Outbox
from .ipc import (
    IPC_MAX_FRAME,
    OPEN_TAG,
    Answer,
    IpcDecoder,
    Open,
    TokenInfo,
    decode_answer,
    encode_request,
)

__all__ = ["PAGE_SIZE", "WorkerProcess", "login", "reap", "rss", "spawn"]

log = logging.getLogger("signd.workers")

PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")


@dataclass(eq=False)
class WorkerProcess:
    index: int
    process: trio.Process
    stream: trio.SocketStream
    outbox: Outbox
    decoder: IpcDecoder = field(default_factory=lambda: IpcDecoder(IPC_MAX_FRAME))
    #: tag -> entries of a sign batch, the (call, event, box) of a call, or PROBE
    waiting: dict[int, Any] = field(default_factory=dict)
    batches: int = 0
    alive: bool = True
    #: when it last answered, or was handed work while it had none
    progress_at: float = 0.0
    #: cancels its reader and writer tasks (set while it serves)
    scope: trio.CancelScope | None = None
    #: signatures it answered, and its RSS once it had answered ``RECYCLE_WARMUP``
    signed: int = 0
    rss_base: int | None = None
    #: set when it should hand over to a fresh process (see ``TokenPool._recycle``)
    recycle: trio.Event = field(default_factory=trio.Event)
    #: it hands over to a fresh process: it gets no more work
    retiring: bool = False
    #: set when it holds nothing more (only while it hands over)
    drained: trio.Event | None = None

    def hand(self, tag: int, pending: Any, frame: bytes) -> None:
        if not self.waiting:
            self.progress_at = time.monotonic()
        self.waiting[tag] = pending
        self.outbox.write(frame)


async def spawn(index: int, role: str) -> WorkerProcess:
    """Start worker ``index``; ``role`` ("sign" or "write") is for people
    reading ``ps`` (and the tests)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "signd.token", str(child.fileno()), role],
            pass_fds=(child.fileno(),),
        )
    finally:
        child.close()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent))
    return WorkerProcess(index, process, stream, Outbox(stream))


async def login(worker: WorkerProcess, call: Open) -> TokenInfo:
    """The ``Open`` handshake, before the worker takes any other work.

    Raises:
        TokenUnavailable: the module, the token or the login failed.
    """
    await worker.stream.send_all(encode_request(OPEN_TAG, call))
    while True:
        for msg in worker.decoder.messages():
            answer = decode_answer(msg)
            if not isinstance(answer, Answer):
                raise TokenUnavailable(answer.reason)
            if answer.error is not None:
                raise answer.error
            return Open.decode_result(answer.value)
        try:
            data = await worker.stream.receive_some(1 << 16)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            raise TokenUnavailable("the token worker exited while logging in")
        worker.decoder.receive_data(data)


async def reap(worker: WorkerProcess) -> None:
    """Close the worker's socket and wait for it to exit (killed after 5 s)."""
    await worker.stream.aclose()
    with trio.move_on_after(5):
        await worker.process.wait()
        return
    log.error("token worker did not exit; killing it", extra={"worker": worker.index})
    worker.process.kill()
    await worker.process.wait()


def rss(pid: int) -> int | None:
    """Resident set size of process ``pid`` in bytes (None: it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None
