"""The ssh-agent front end: a second socket where ssh, git and ssh-keygen sign.

Each connection is served by one task, one message at a time (the agent
protocol is request and answer).  The caller is the kernel's record of the
peer at connect time (``principal_of``, as on the main socket).  What it may
do is what the main socket allows it:

* ``REQUEST_IDENTITIES`` lists the current version of each key the
  ``[agent] keys`` patterns expose, that has an SSH form (P-256, P-384,
  Ed25519, RSA), is not watermarked, and that the caller may ``sign`` with;
  commented ``NAME:vN``.  A caller that may sign none of the exposed keys gets
  an empty list, and its record says ``permission_denied``.
* ``SIGN_REQUEST`` for one of those blobs becomes a ``sign`` request handed to
  ``Service.handle``: the same access check, rate limits, key states, metrics
  and token queue as the main socket.  A blob that is not such a key, and an
  ``ssh-rsa`` request (SHA-1: never made), are refused with ``FAILURE``.
* ``session-bind@openssh.com`` is accepted once parsed; ``query`` lists the
  extensions supported; any other extension, and adding, removing or locking
  keys, get ``FAILURE`` and change nothing.

Every listing, signature and refusal is in the audit log (``agent_identities``,
``agent_sign``, ``agent_<message>``), recorded as the main socket records:
in strict mode no answer leaves before its record is durable.  Malformed,
truncated or oversized input closes that connection only.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import trio

from ..access.policy import Principal, principal_of
from ..audit.facts import OK, Outcome
from ..audit.log import AuditLog
from ..audit.records import Notes, Who, who_fields
from ..config import LimitsConfig
from ..errors import (
    InternalError,
    KeyNotFound,
    PermissionDenied,
    UnknownOperation,
    UnsupportedAlgorithm,
    WireError,
)
from ..metrics import Metrics
from ..protocol import HEADER, Request, SignArgs, decode_response
from ..service.base import RESERVED_KEYS
from ..service.core import Service
from . import wire

__all__ = ["EXTENSIONS", "AgentFront", "Exposed"]

log = logging.getLogger("signd.agent")

RECEIVE_SIZE: Final = 65536
#: The extensions this agent answers (the ``query`` extension's answer).
EXTENSIONS: Final = ("query", "session-bind@openssh.com")
#: Blobs made from public keys, kept this many at most.
_BLOB_CACHE: Final = 4096

#: key type -> (SSH key algorithm, sign hash) for the types with an SSH form
_SSH_TYPES: Final = {
    "ec-p256": ("ecdsa-sha2-nistp256", "sha256"),
    "ec-p384": ("ecdsa-sha2-nistp384", "sha384"),
    "ed25519": ("ssh-ed25519", None),
    "rsa-2048": ("ssh-rsa", None),
    "rsa-3072": ("ssh-rsa", None),
    "rsa-4096": ("ssh-rsa", None),
}


@dataclass(frozen=True, slots=True)
class Exposed:
    """A key version the agent socket offers: the current version of a key
    the config exposes, with its SSH public key blob."""

    name: str
    version: int
    key_type: str
    blob: bytes

    @property
    def comment(self) -> str:
        return f"{self.name}:v{self.version}"


class _Answer:
    """Waits for one answer and its audit record (an audit ``Recipient``)."""

    __slots__ = ("done", "frame", "ok")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.frame = b""
        self.ok = False

    def audited(self, request_id: int | None, frame: bytes, ok: bool) -> None:
        self.frame, self.ok = frame, ok
        self.done.set()


class _Conn:
    """One agent connection: who it is, and where its slow work runs."""

    __slots__ = ("audit_who", "nursery", "who")

    def __init__(self, who: Principal, nursery: trio.Nursery, audited: bool) -> None:
        self.who = who
        self.nursery = nursery
        self.audit_who: Who | None = who_fields(who) if audited else None


_request_ids = itertools.count(1)


class AgentFront:
    """Serves the agent protocol on a listening socket, for ``service``.

    ``keys``: names or fnmatch patterns of the keys exposed (empty: none).
    ``limits``: the daemon's ``[limits]`` (connections, per uid, idle time-out).
    Both may be replaced on reload (``apply``).
    """

    def __init__(
        self,
        service: Service,
        keys: Sequence[str],
        limits: LimitsConfig,
        *,
        metrics: Metrics,
        audit: AuditLog | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.keys = tuple(keys)
        self.limits = limits
        self.metrics = metrics
        self.audit = audit
        self.clock = clock
        self.connections = 0
        self.connections_by_uid: dict[int, int] = {}
        self._blobs: dict[tuple[str, int, bytes], bytes | None] = {}
        self._accepting = trio.CancelScope()
        #: set by ``shutdown``: connections stop once their message is answered
        self._stopping = False
        #: messages being answered now, over all connections
        self._busy = 0
        self._idle = trio.Event()
        #: cancel scopes of the connections' reads (waiting for a message)
        self._reads: set[trio.CancelScope] = set()

    def apply(self, keys: Sequence[str], limits: LimitsConfig) -> None:
        """A reload: the keys exposed and the limits, for new requests."""
        self.keys = tuple(keys)
        self.limits = limits

    def shutdown(self) -> None:
        """Stop accepting, and close each connection once the message it is
        answering (if any) is answered and sent: ``drain`` waits for that."""
        self._stopping = True
        self._accepting.cancel()
        for scope in self._reads:
            scope.cancel()

    async def drain(self, deadline: float) -> bool:
        """After ``shutdown``: wait until no message is being answered, or
        until ``deadline`` (trio's clock); whether none is."""
        with trio.move_on_at(deadline):
            while self._busy:
                self._idle = trio.Event()
                await self._idle.wait()
        return not self._busy

    # ------------------------------------------------------------ keys

    def exposed(self) -> list[Exposed]:
        """The current version of every key the config exposes that has an SSH
        form, may sign now, and is not watermarked (a position cannot be
        given through an agent); by name."""
        patterns = self.keys
        if not patterns:
            return []
        now = self.clock()
        out = []
        for key in self.service.keystore.all():
            name = key.record.name
            if name in RESERVED_KEYS or key.kt.name not in _SSH_TYPES:
                continue
            if key.record.settings.watermark:
                continue
            if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                continue
            signer = key.at(now).signer
            if signer is None or signer.public_key is None:
                continue
            cache_key = (name, signer.record.version, signer.spki)
            blob = self._blobs.get(cache_key)
            if cache_key not in self._blobs:
                if len(self._blobs) >= _BLOB_CACHE:
                    self._blobs.clear()
                blob = self._blobs[cache_key] = wire.ssh_public_blob(signer.public_key)
            if blob is not None:
                out.append(Exposed(name, signer.record.version, key.kt.name, blob))
        out.sort(key=lambda e: e.name)
        return out

    def identities(self, who: Principal) -> tuple[list[Exposed], int]:
        """(the exposed keys ``who`` may sign with, how many are exposed)."""
        exposed = self.exposed()
        allows = self.service.policy.allows
        return [e for e in exposed if allows(who, "sign", e.name)], len(exposed)

    # ------------------------------------------------------------ sockets

    async def serve(
        self,
        sock: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on ``sock`` (listening) until ``shutdown`` or cancelled."""
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            with self._accepting:
                task_status.started()
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            log.error("agent accept failed", extra={"error": exc.strerror})
                            await trio.sleep(0.1)
                            continue
                        raise
                    nursery.start_soon(self._accepted, stream)
            await listener.aclose()

    async def _accepted(self, stream: trio.SocketStream) -> None:
        """One connection, whatever happens on it: never raises."""
        try:
            try:
                who = principal_of(stream.socket)
            except OSError:
                return
            lim = self.limits
            held = self.connections_by_uid.get(who.uid, 0)
            if self.connections >= lim.max_connections:
                self.metrics.limit_hit("max_connections")
                self.metrics.agent_request("connection", "busy")
                return
            if held >= lim.max_connections_per_uid:
                self.metrics.limit_hit("max_connections_per_uid")
                self.metrics.agent_request("connection", "busy")
                return
            self.connections += 1
            self.connections_by_uid[who.uid] = held + 1
            try:
                await self.converse(stream, who)
            finally:
                self.connections -= 1
                left = self.connections_by_uid[who.uid] - 1
                if left:
                    self.connections_by_uid[who.uid] = left
                else:
                    del self.connections_by_uid[who.uid]
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer went away
        except* Exception as group:
            log.error("agent connection failed", exc_info=group)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def converse(self, stream: trio.abc.Stream, who: Principal) -> None:
        """Answer ``who``'s messages on ``stream`` until EOF, bad input or the
        idle time-out, then close it.  Raises: what the stream raises (the
        peer went away)."""
        try:
            async with trio.open_nursery() as nursery:
                conn = _Conn(who, nursery, self.audit is not None)
                try:
                    await self._conversation(conn, stream)
                except wire.AgentWireError as exc:
                    self.metrics.agent_request("malformed", "closed")
                    log.debug("agent connection closed", extra={"error": str(exc), "pid": who.pid})
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _conversation(self, conn: _Conn, stream: trio.abc.Stream) -> None:
        """Read, answer, send, until EOF or the idle time-out (nothing read, or
        an answer not taken, for ``idle_timeout``).  Raises: AgentWireError."""
        decoder = wire.MessageDecoder()
        while not self._stopping:
            idle = self.limits.idle_timeout
            for body in decoder.messages():
                self._busy += 1
                try:
                    answer = await self.answer(conn, body)
                    with trio.move_on_after(idle if idle > 0 else math.inf) as sent:
                        await stream.send_all(answer)
                finally:
                    self._busy -= 1
                    if not self._busy:
                        self._idle.set()
                if sent.cancelled_caught:
                    self.metrics.limit_hit("idle_timeout")
                    return
                if self._stopping:
                    return  # shutting down: this message was the last
            with trio.move_on_after(idle if idle > 0 else math.inf) as read:
                self._reads.add(read)
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                finally:
                    self._reads.discard(read)
            if read.cancelled_caught:
                if not self._stopping:
                    self.metrics.limit_hit("idle_timeout")
                return
            if not data:
                return
            decoder.feed(data)

    # ------------------------------------------------------------ messages

    async def answer(self, conn: _Conn, body: bytes) -> bytes:
        """The framed answer to one message.  Raises: AgentWireError."""
        msg = wire.parse(body)
        if isinstance(msg, wire.RequestIdentities):
            return await self._identities(conn)
        if isinstance(msg, wire.SignRequest):
            return await self._sign(conn, msg)
        if isinstance(msg, wire.Extension):
            return self._extension(msg)
        name = wire.message_name(msg.kind)
        error = UnknownOperation(
            f"the agent socket lists and signs only: {name} is refused (signd's keys "
            "are on the token and change through signctl)"
        )
        await self._record(conn, self._notes(f"agent_{name}", None, None, None), error)
        self.metrics.agent_request(name, "refused")
        return wire.encode_failure()

    async def _identities(self, conn: _Conn) -> bytes:
        listed, exposed = self.identities(conn.who)
        error = None
        if exposed and not listed:
            error = PermissionDenied(
                f"{conn.who.describe()} may not sign with any of the {exposed} keys "
                "the agent socket exposes"
            )
        notes = self._notes("agent_identities", None, None, None, items=len(listed))
        if not await self._record(conn, notes, error):
            return wire.encode_failure()
        self.metrics.agent_request("request_identities", "ok" if error is None else error.name)
        return wire.encode_identities([wire.Identity(e.blob, e.comment) for e in listed])

    async def _sign(self, conn: _Conn, msg: wire.SignRequest) -> bytes:
        digest = hashlib.sha256(msg.data).digest()
        target = next((e for e in self.exposed() if e.blob == msg.key_blob), None)
        if target is None:
            refusal: WireError = KeyNotFound(
                "no key the agent socket exposes has this public key (only the current "
                "version of each exposed key signs)"
            )
            return await self._refuse_sign(conn, None, None, digest, refusal)
        ssh_alg, hash_name = _SSH_TYPES[target.key_type]
        padding = None
        if ssh_alg == "ssh-rsa":
            if msg.flags & wire.RSA_SHA2_256:
                ssh_alg, hash_name = "rsa-sha2-256", "sha256"
            elif msg.flags & wire.RSA_SHA2_512:
                ssh_alg, hash_name = "rsa-sha2-512", "sha512"
            else:
                refusal = UnsupportedAlgorithm(
                    "ssh-rsa signatures (SHA-1) are not made; ask for rsa-sha2-256 or rsa-sha2-512"
                )
                return await self._refuse_sign(conn, target.name, target.version, digest, refusal)
            padding = "pkcs1v15"
        args = SignArgs(
            key=target.name,
            message=msg.data,
            hash=hash_name,
            padding=padding,
            format="raw" if ssh_alg.startswith("ecdsa-") else None,
            version=target.version,
        )
        frame, ok = await self._through_service(conn, target, args, digest)
        if not ok:
            self.metrics.agent_request("sign_request", "internal_error")
            return wire.encode_failure()
        response = decode_response(frame[HEADER.size :])
        if response.error is not None or response.result is None:
            name = response.error.name if response.error is not None else "internal_error"
            self.metrics.agent_request("sign_request", name)
            return wire.encode_failure()
        signature = response.result["signature"]
        self.metrics.agent_request("sign_request", "ok")
        return wire.encode_sign_response(wire.ssh_signature(ssh_alg, signature))

    async def _through_service(
        self, conn: _Conn, target: Exposed, args: SignArgs, digest: bytes
    ) -> tuple[bytes, bool]:
        """Hand ``args`` to the service as one ``sign`` request; its answer's
        frame once its audit record is written, and whether it was."""
        request = Request(next(_request_ids), "sign", args)
        answer = _Answer()
        audit, who = self.audit, conn.audit_who
        if audit is None or who is None:

            def reply(request_id: int, frame: bytes, outcome: Outcome) -> None:
                answer.audited(request_id, frame, True)

        else:
            notes = self._notes("agent_sign", target.name, digest, target.version)
            pending = audit.asked(who, notes, answer, request.id)

            def reply(request_id: int, frame: bytes, outcome: Outcome) -> None:
                audit.answered(pending, frame, outcome)

        for work in self.service.handle([request], reply, conn, conn.who, [digest]):
            conn.nursery.start_soon(work)
        await answer.done.wait()
        return answer.frame, answer.ok

    async def _refuse_sign(
        self,
        conn: _Conn,
        key: str | None,
        version: int | None,
        digest: bytes,
        error: WireError,
    ) -> bytes:
        await self._record(conn, self._notes("agent_sign", key, digest, version), error)
        self.metrics.agent_request("sign_request", error.name)
        return wire.encode_failure()

    def _extension(self, msg: wire.Extension) -> bytes:
        if msg.name == b"query":
            self.metrics.agent_request("extension", "ok")
            return wire.encode_query_response(EXTENSIONS)
        if msg.name == b"session-bind@openssh.com":
            try:
                wire.parse_session_bind(msg.contents)
            except wire.AgentWireError:
                self.metrics.agent_request("extension", "invalid")
                return wire.encode_extension_failure()
            self.metrics.agent_request("extension", "ok")
            return wire.encode_success()
        self.metrics.agent_request("extension", "unsupported")
        return wire.encode_failure()

    # ------------------------------------------------------------ audit

    @staticmethod
    def _notes(
        op: str,
        key: str | None,
        digest: bytes | None,
        version: int | None,
        *,
        items: int | None = None,
    ) -> Notes:
        return (op, key, digest, items, version, time.perf_counter_ns())

    async def _record(self, conn: _Conn, notes: Notes, error: WireError | None) -> bool:
        """Record a request answered here (not by the service) and wait until
        the record is written (strict: durable).  False: it could not be, and
        the answer must be withheld (a ``FAILURE`` instead)."""
        if error is not None:
            self.metrics.error(notes[0], error)
        audit, who = self.audit, conn.audit_who
        if audit is None or who is None:
            return True
        answer = _Answer()
        outcome = OK if error is None else Outcome(error=error)
        audit.record(who, notes, b"", outcome, answer, None)
        await answer.done.wait()
        if not answer.ok:
            self.metrics.error(notes[0], InternalError("the audit log could not be written"))
        return answer.ok
