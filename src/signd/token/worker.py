"""A token worker process: ``python -m signd.token FD ROLE``.

The daemon feeds it over a socketpair (``FD``) in the worker protocol of
``ipc.py``; it runs each call on its one ``TokenSession`` (``session.py``),
on its only thread, and answers each message as soon as it is done, so a
batch of signatures costs one hand-over each way and the daemon can refill a
worker while it signs.  ``ROLE`` ("sign" or "write") is only for people
reading ``ps``.

Every failure is answered through one map (``TokenSession.failure``, which
is ``session.map_error`` and a check that the token is still there).
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from ..hardening import no_core_dumps
from ..keys import algorithms
from . import profiles
from .ipc import (
    IPC_MAX_FRAME,
    BackupMac,
    Batch,
    Call,
    CreateMetadata,
    DestroyKeys,
    DropCreated,
    DropOlder,
    Generate,
    ImportKeypair,
    ImportPublic,
    IpcDecoder,
    IpcError,
    LoadMetadata,
    Open,
    Probe,
    PublicKeys,
    RestoreKeypair,
    Revisions,
    RunJobs,
    SignJob,
    TokenInfo,
    VerifyBackupMac,
    VerifyJob,
    WrapCheckValue,
    WrapPrivate,
    decode_jobs,
    decode_request,
    encode_answer,
    encode_batch,
    encode_failure,
    encode_lost,
)
from .session import TokenSession, unraisable_hook
from .verify import Verifier

__all__ = ["Worker", "worker_main"]

log = logging.getLogger("signd.token")

#: A message this small (a few signatures) means light traffic: poll after it.
LIGHT_BYTES: Final = 1024
#: Bytes a worker reads at once (a batch of 64 is a few KB).
RECEIVE_SIZE: Final = 1 << 18


class Worker:
    """What a worker does with each call: the op table, over one session."""

    def __init__(self, session: TokenSession, verifier: Verifier) -> None:
        self.session = session
        self.verifier = verifier
        self._verify = verifier.verify  # bound once: the hot path passes it per batch
        #: seconds to poll for the next message after light traffic (set by ``Open``)
        self.spin = 0.0
        self._table: dict[type[Call[Any]], Callable[[Any], Any]] = {
            RunJobs: self._jobs,
            Open: self._open,
            PublicKeys: self._public_keys,
            LoadMetadata: self._load_metadata,
            Revisions: self._revisions,
            CreateMetadata: lambda c: self.session.create_metadata(c.name, c.revision, c.value),
            DropCreated: lambda c: self.session.drop_created(),
            DropOlder: lambda c: self.session.drop_older(c.name, c.revision),
            Generate: lambda c: self.session.generate(
                algorithms.key_type(c.key_type), c.object_id, c.label, c.backup
            ),
            DestroyKeys: lambda c: self.session.destroy_keys(c.object_id, c.public),
            Probe: lambda c: self.session.check(),
            WrapPrivate: lambda c: self.session.wrap_private(c.object_id),
            WrapCheckValue: lambda c: self.session.wrap_check_value(),
            BackupMac: lambda c: self.session.backup_mac(c.data),
            VerifyBackupMac: lambda c: self.session.verify_backup_mac(c.data, c.mac),
            RestoreKeypair: lambda c: self.session.restore_keypair(
                algorithms.key_type(c.key_type), c.object_id, c.label, c.spki, c.wrapped
            ),
            ImportPublic: lambda c: self.session.import_public(),
            ImportKeypair: lambda c: self.session.import_keypair(
                algorithms.key_type(c.key_type),
                c.object_id,
                c.label,
                c.import_key_id,
                c.wrapped_key,
                c.wrapped_material,
                c.spki,
                c.backup,
            ),
        }

    def handle(self, msg: list[Any]) -> bytes:
        """The answer to one message, as a frame.  Never raises."""
        try:
            # Sign and verify, nearly every message: no Request or call object.
            hot = decode_jobs(msg)
            request = decode_request(msg) if hot is None else None
        except IpcError as exc:
            log.error("a request from the daemon is not understood", extra={"error": str(exc)})
            return encode_failure(exc.tag if isinstance(exc.tag, int) else -1, exc)
        if hot is not None:
            tag, jobs = hot
            try:
                started = time.perf_counter()  # what the token took, as ``_run``
                outcomes = self.session.run_jobs(jobs, self._verify)
                return encode_batch(tag, Batch(time.perf_counter() - started, outcomes))
            except BaseException as exc:
                return encode_failure(tag, self.session.failure(exc, RunJobs.OP))
        assert request is not None
        call = request.call
        try:
            return encode_answer(request.tag, call, self._table[type(call)](call))
        except BaseException as exc:
            return encode_failure(request.tag, self.session.failure(exc, call.OP))

    def _jobs(self, call: RunJobs) -> Batch:
        return self._run(call.jobs)

    def _run(self, jobs: Sequence[SignJob | VerifyJob]) -> Batch:
        """The outcomes, and how long the token took for them."""
        started = time.perf_counter()
        outcomes = self.session.run_jobs(jobs, self._verify)
        return Batch(time.perf_counter() - started, outcomes)

    def _open(self, call: Open) -> TokenInfo:
        logging.getLogger().setLevel(call.log_level.upper())
        self.spin = call.spin
        return self.session.open(
            call.module, call.token_label, call.pin, profiles.PROFILES[call.profile]
        )

    # A token that went away can answer a search with nothing rather than an
    # error (SoftHSM without its directory): a read is only trusted if the
    # token is still there after it.

    def _public_keys(self, call: PublicKeys) -> dict[bytes, tuple[bytes, bool]]:
        keys = self.session.public_keys(call.object_ids)
        self.session.check()
        return keys

    def _load_metadata(self, call: LoadMetadata) -> Any:
        blobs = self.session.load_metadata(call.name)
        self.session.check()
        return blobs

    def _revisions(self, call: Revisions) -> list[int]:
        revisions = self.session.revisions(call.name)
        self.session.check()
        return revisions


def _receive(sock: socket.socket, spin: float, buf: memoryview) -> memoryview:
    """The next bytes from the daemon, in ``buf``.  For ``spin`` seconds the
    worker polls instead of sleeping: under light traffic, being woken costs
    more than the signature (under heavy traffic the caller passes 0: the next
    batch is coming anyway, and polling would take the CPU the daemon needs).

    Into one buffer, not ``recv(n)``: that allocates ``n`` bytes and shrinks
    them to what came, and at a MiB a call that fragmented the heap until the
    worker grew by tens of MB an hour (measured in the soak)."""
    deadline = time.perf_counter() + spin
    while time.perf_counter() < deadline:
        try:
            return buf[: sock.recv_into(buf, 0, socket.MSG_DONTWAIT)]
        except BlockingIOError:
            continue
    return buf[: sock.recv_into(buf)]


def worker_main(fd: int) -> int:
    """Serve one daemon over the socket ``fd`` until it closes; returns the exit code."""
    # First: the PIN comes next, and exec reset the dumpable flag.
    hardening_problems = no_core_dumps()
    # The daemon alone decides when workers stop (it closes the socket after
    # draining); a Ctrl-C or a SIGTERM sent to the whole group must not cut
    # signatures short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ..log import setup_logging

    setup_logging("info")
    for problem in hardening_problems:
        log.warning("core dumps not fully disabled", extra={"error": problem})
    sys.unraisablehook = unraisable_hook
    sock = socket.socket(fileno=fd)
    decoder = IpcDecoder(IPC_MAX_FRAME)
    session = TokenSession()
    worker = Worker(session, Verifier(session.verify_mac))  # HMAC keys: on the token
    light = False  # the last message was small: traffic is light
    buf = memoryview(bytearray(RECEIVE_SIZE))
    try:
        while True:
            data = _receive(sock, worker.spin if light else 0.0, buf)
            if not data:
                return 0
            light = len(data) <= LIGHT_BYTES
            decoder.receive_data(data)
            # Each batch is answered as soon as it is done, so the daemon can
            # hand over the next one while this worker signs the one after.
            for msg in decoder.messages():
                sock.sendall(worker.handle(msg))
                if session.lost is not None:
                    # This process cannot recover the token (p11-kit's
                    # client, for one, fails every call after its server
                    # went away, until the module is loaded afresh): it
                    # says so, exits, and a new one logs in.
                    log.error("token lost", extra={"reason": session.lost})
                    sock.sendall(encode_lost(session.lost))
                    return 0
    except (BrokenPipeError, ConnectionResetError):
        return 0
    finally:
        session.close()
