"""Replay protection in the service, above every key type: watermarked
``sign``/``sign_batch`` and replay-checked ``verify`` (PROTOCOL.md, "Replay
protection").  The state itself is ``signd.state``.

A watermarked signature's position is burned in memory when the request is
seen (a concurrent request for the same position is refused at once) and the
job goes to the token only once the journal has it on disk: no crash lets a
position be signed twice.  A replay-checked verify answers ``valid`` only
once its nonce is on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from signd_client.replay import INVALID, MAX_NONCE, MIN_NONCE, VALID, signed_payload

from ..errors import Busy, InternalError, InvalidArgument, WireError
from ..keys.store import LoadedKey, LoadedVersion
from ..protocol import MAX_POSITION, Request, VerifyArgs, VerifyResult
from ..state import State, StateError
from ..token.pool import Entry
from .backup import Backups
from .context import Batch, Reply

__all__ = ["Guards", "VerifyFn", "VerifyJobFn"]

log = logging.getLogger("signd.service")

#: ``signing._verify`` and ``signing._verify_job`` (passed in: no import cycle)
VerifyFn = Callable[[LoadedKey, list[LoadedVersion], VerifyArgs, bytes | None], VerifyResult]
VerifyJobFn = Callable[[LoadedKey, list[LoadedVersion], VerifyArgs, bytes | None], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class _How:
    """How ``op_verify`` would verify: inline (``few``), else on a worker."""

    few: bool
    #: the connection, for the token queue's fair queueing
    source: object
    verify: VerifyFn
    verify_job: VerifyJobFn


class Guards(Backups):
    """Watermarks and nonces for the token operations (``Signing``)."""

    def _state_for(self, what: str) -> State:
        """Raises: InvalidArgument (the daemon has no state directory)."""
        if self.state is None:
            raise InvalidArgument(
                f"{what} needs the daemon's state directory, and this daemon has none: set "
                "[state] dir (OPERATIONS.md, 'The state directory')"
            )
        return self.state

    # ------------------------------------------------------------ watermarks

    def _watermark_check(self, key: LoadedKey, position: int | None, count: int) -> int:
        """Whether ``count`` positions from ``position`` may be signed with
        ``key`` now (nothing is burned yet: ``_watermarked`` does); the first.

        Raises: InvalidArgument (no position on a watermarked key, one on
        another key, past 2**64-1), PositionUsed.
        """
        name = key.record.name
        if not key.record.settings.watermark:
            raise InvalidArgument(
                f"key {name!r} has no watermark: a sign with it takes no 'position'"
            )
        state = self._state_for("a watermarked key")
        if position is None:
            mark = state.mark(name)
            above = "any position" if mark is None else f"a position above {mark}"
            raise InvalidArgument(
                f"key {name!r} is watermarked: a sign with it must carry a 'position' ({above})"
            )
        last = position + count - 1
        if last > MAX_POSITION:
            raise InvalidArgument(f"positions {position} to {last} go past 2**64-1")
        state.marks.check(name, position)
        try:
            state.check_writable()
        except StateError as exc:
            raise InternalError(str(exc)) from None
        return position

    def _watermarked(
        self,
        req: Request,
        batch: Batch,
        key: LoadedKey,
        first: int,
        count: int,
        entries: list[Entry],
    ) -> None:
        """Burn ``first`` to ``first + count - 1`` of ``key`` (checked by
        ``_watermark_check``, with no await since) and send ``entries`` to the
        token once that is durable.

        Raises: InternalError (the journal failed before).
        """
        assert self.state is not None
        try:
            self.state.claim(key.record.name, first, first + count - 1)
        except StateError as exc:
            raise InternalError(str(exc)) from None
        batch.slow.append(partial(self._sign_when_durable, req, batch.reply, batch.source, entries))

    async def _sign_when_durable(
        self, req: Request, reply: Reply, source: object, entries: list[Entry]
    ) -> None:
        """The token gets ``entries`` once the positions they burn are on disk."""
        assert self.state is not None
        try:
            await self.state.commit()
        except StateError as exc:
            if entries:  # else every item was refused, and the batch answered already
                self._fail(reply, req, InternalError(f"the position could not be kept: {exc}"))
            return
        if not entries:
            return  # every item of the batch was refused, and answered
        try:
            self.token.enqueue(source, entries)
        except WireError as exc:  # busy, or no worker: the request fails whole
            if isinstance(exc, Busy):
                self.metrics.limit_hit("token_queue")
            self._fail(reply, req, exc)
            return
        self.token.pump()

    # ------------------------------------------------------------ replay-checked verify

    def _replay_checked(
        self,
        req: Request,
        batch: Batch,
        key: LoadedKey,
        candidates: list[LoadedVersion],
        few: bool,
        verify: VerifyFn,
        verify_job: VerifyJobFn,
    ) -> None:
        """A verify with ``timestamp`` and ``nonce``, answered by a task
        (``few``: the candidates are few enough to verify on this loop).

        Raises: InvalidArgument (one without the other, a bad nonce, a
        digest instead of a message, no state directory).
        """
        args = req.args
        assert isinstance(args, VerifyArgs)
        if args.timestamp is None or args.nonce is None:
            raise InvalidArgument("a replay-checked verify needs both 'timestamp' and 'nonce'")
        if not MIN_NONCE <= len(args.nonce) <= MAX_NONCE:
            raise InvalidArgument(
                f"field 'nonce': must be {MIN_NONCE} to {MAX_NONCE} bytes, got {len(args.nonce)}"
            )
        if args.message is None or args.digest is not None:
            raise InvalidArgument(
                "a replay-checked verify takes the 'message' (the signature covers it with "
                "the timestamp and nonce), not a 'digest'"
            )
        self._state_for("a replay-checked verify")
        checked = dataclasses.replace(
            args,
            message=signed_payload(args.message, args.timestamp, args.nonce),
            timestamp=None,
            nonce=None,
        )
        how = _How(few, batch.source, verify, verify_job)
        batch.slow.append(
            partial(self._verify_replay, req, batch.reply, key, candidates, checked, how)
        )

    async def _verify_replay(
        self,
        req: Request,
        reply: Reply,
        key: LoadedKey,
        candidates: list[LoadedVersion],
        checked: VerifyArgs,
        how: _How,
    ) -> None:
        args = req.args
        assert isinstance(args, VerifyArgs)
        assert self.state is not None
        assert args.timestamp is not None
        assert args.nonce is not None
        name = key.record.name
        try:
            answer = await self._verified(key, candidates, checked, how)
            status = INVALID
            if answer.valid:
                # Only an authentic request spends a nonce (a forger cannot
                # fill the memory or raise a floor).
                now = self._clock()
                refused = self.state.accept_nonce(name, args.timestamp, args.nonce, now)
                if refused is None:
                    await self.state.commit()
                status = refused or VALID
        except StateError as exc:
            self._fail(reply, req, InternalError(f"the nonce could not be kept: {exc}"))
            return
        except Exception as exc:
            self._fail(reply, req, exc)
            return
        self.metrics.verified(name, status)
        if status != VALID:
            answer = VerifyResult(valid=False, key=name, status=status)
        else:
            answer = dataclasses.replace(answer, status=status)
        self._answer(reply, req, answer)

    async def _verified(
        self,
        key: LoadedKey,
        candidates: list[LoadedVersion],
        args: VerifyArgs,
        how: _How,
    ) -> VerifyResult:
        """``args`` verified as ``op_verify`` would: here with few versions,
        else on a token worker (or in a thread without one)."""
        name = key.record.name
        if how.few:
            return how.verify(key, candidates, args, None)
        if not self.token.is_open:
            return await trio.to_thread.run_sync(
                how.verify, key, candidates, args, None, limiter=self._verify_threads
            )
        answered = trio.Event()
        outcome: list[Any] = []

        def done(ok: bool, value: Any) -> None:
            outcome[:] = [ok, value]
            answered.set()

        deadline = time.monotonic() + self.request_timeout
        entry = Entry(how.verify_job(key, candidates, args, None), done, deadline)
        self.token.enqueue(how.source, [entry])
        self.token.pump()
        await answered.wait()
        ok, value = outcome
        if not ok:
            assert isinstance(value, WireError)
            raise value
        if value is None:
            return VerifyResult(valid=False, key=name)
        version, algorithm = value
        return VerifyResult(valid=True, key=name, version=version, algorithm=algorithm)
