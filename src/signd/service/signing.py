"""sign, sign_batch and verify: token work submitted in batches, answered
in the token's callbacks; verify inline, on the workers, or in a thread."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any, Final

import trio

from ..audit.log import AUDIT_KEY
from ..errors import DeadlineExceeded, InvalidArgument, InvalidDigest, WireError
from ..keys import algorithms
from ..keys.algorithms import Family
from ..keys.store import LoadedKey, LoadedVersion
from ..metrics import Metrics
from ..protocol import (
    MAX_BATCH,
    BatchItem,
    Request,
    SignArgs,
    SignBatchArgs,
    SignBatchResult,
    SignResult,
    VerifyArgs,
    VerifyResult,
)
from ..token.ipc import SignJob, VerifyJob
from ..token.pool import Entry
from .context import Batch, Reply
from .convert import error_info, send_error, send_result
from .guards import Guards

__all__ = ["INLINE_VERIFY_CANDIDATES", "Signing"]

#: The token queue's source for the daemon's own signatures (fair queueing).
_OWN_WORK: Final = object()
#: A lone ``verify`` with at most this many versions to try is answered inline
#: (fastest); one with more goes to the token workers (or a thread), so a key
#: with many versions never holds up this loop.
INLINE_VERIFY_CANDIDATES: Final = 4


class Signing(Guards):
    """The token operations."""

    def op_sign(self, req: Request, batch: Batch) -> None:
        args = req.args
        assert isinstance(args, SignArgs)
        key = self._key_or_none(args.key)
        if key is None:
            self._defer_lookup(req, args.key, batch)
            return
        # The version's state is checked on every request, so a
        # disable takes effect on the very next one.
        version = key.at(batch.now).signing(args.version)
        self._limit(batch.who, args.key, 1)
        plan = algorithms.plan_sign(key.kt, args, batch.sha256)
        done = _sign_done(req.id, key, version, plan, batch.reply, self.metrics, batch.started)
        entry = Entry(_job(version, plan), done, batch.deadline)
        if key.record.settings.watermark or args.position is not None:  # service.guards
            first = self._watermark_check(key, args.position, 1)
            self._watermarked(req, batch, key, first, 1, [entry])
            return
        batch.entries.append((req, [entry]))

    def op_sign_batch(self, req: Request, batch: Batch) -> None:
        args = req.args
        assert isinstance(args, SignBatchArgs)
        key = self._key_or_none(args.key)
        if key is None:
            self._defer_lookup(req, args.key, batch)
            return
        version = key.at(batch.now).signing(args.version)
        # A batch costs its item count; a malformed one costs nothing.
        self._limit(batch.who, args.key, len(_batch_items(args)))
        entries = _batch_entries(
            req.id, key, version, args, batch.reply, batch.deadline, self.metrics, batch.started
        )
        if key.record.settings.watermark or args.position is not None:  # service.guards
            count = len(_batch_items(args))  # every item has its position, failed or not
            first = self._watermark_check(key, args.position, count)
            self._watermarked(req, batch, key, first, count, entries)
            return
        batch.entries.append((req, entries))

    def op_verify(self, req: Request, batch: Batch) -> None:
        args = req.args
        assert isinstance(args, VerifyArgs)
        key = self._key_or_none(args.key)
        if key is None:
            self._defer_lookup(req, args.key, batch)
            return
        candidates = key.at(batch.now).verifying(args.version)
        self._limit(batch.who, args.key, 1)
        sha256 = batch.sha256
        # An HMAC key has no public key here: the token computes the MAC (a worker).
        on_token = key.kt.family is Family.HMAC
        few = len(candidates) <= INLINE_VERIFY_CANDIDATES and not on_token
        if args.timestamp is not None or args.nonce is not None:  # service.guards
            self._replay_checked(req, batch, key, candidates, few, _verify, _verify_job)
            return
        if few and (batch.inline_ok or not self.token.is_open):
            # A lone verification is fastest right here; under load they go
            # to the workers, so every core verifies and this loop keeps to
            # the sockets (measured: doing a share here too only slows the
            # loop down).  So do the many versions of a key: each costs a
            # verification.
            answer = _verify(key, candidates, args, sha256)
            self.metrics.verified(args.key, "valid" if answer.valid else "invalid")
            self._answer(batch.reply, req, answer)
        elif not self.token.is_open and not on_token:  # no worker to take many: a thread
            verifying = partial(self._verify_in_thread, req, key, candidates, sha256, batch.reply)
            batch.slow.append(verifying)
        else:
            entry = Entry(
                _verify_job(key, candidates, args, sha256),
                _verify_done(req.id, key, batch.reply, self.metrics),
                batch.deadline,
            )
            batch.entries.append((req, [entry]))

    async def _verify_in_thread(
        self,
        req: Request,
        key: LoadedKey,
        candidates: list[LoadedVersion],
        sha256: bytes | None,
        reply: Reply,
    ) -> None:
        """A verification with many versions to try while no token worker can
        take it: in a thread (two at most), so this loop goes on serving."""
        args = req.args
        assert isinstance(args, VerifyArgs)
        try:
            answer = await trio.to_thread.run_sync(
                _verify, key, candidates, args, sha256, limiter=self._verify_threads
            )
        except Exception as exc:
            self._fail(reply, req, exc)
            return
        self.metrics.verified(args.key, "valid" if answer.valid else "invalid")
        self._answer(reply, req, answer)

    async def sign_audit(self, version: int, message: bytes) -> bytes:
        """Sign ``message`` with the audit key (SHA-256; ECDSA DER or PKCS#1 v1.5),
        through the token queue like any signature.  Only the daemon calls this.

        Raises: WireError.
        """
        key = self.keystore.get(AUDIT_KEY)
        signer = key.at(self._clock()).signing(version)
        plan = algorithms.plan_sign(key.kt, SignArgs(key=AUDIT_KEY, message=message))
        answered = trio.Event()
        outcome: list[Any] = []

        def done(ok: bool, value: Any) -> None:
            outcome[:] = [ok, value]
            answered.set()

        deadline = time.monotonic() + self.request_timeout
        self.token.enqueue(_OWN_WORK, [Entry(_job(signer, plan), done, deadline)])
        self.token.pump()
        await answered.wait()
        ok, value = outcome
        if not ok:
            assert isinstance(value, WireError)
            raise value
        return algorithms.finish_signature(plan, value)


def _verify(
    key: LoadedKey, candidates: list[LoadedVersion], args: VerifyArgs, sha256: bytes | None
) -> VerifyResult:
    """``args`` checked against the public keys the daemon holds (``sha256``:
    the SHA-256 of ``args.message``, if the transport had it).

    Raises: InvalidArgument, InvalidDigest, UnsupportedAlgorithm (bad options).
    """
    pairs = ((v.record.version, v.public_key) for v in candidates if v.public_key is not None)
    found = algorithms.verify_any(key.kt, pairs, args, sha256)
    if found is None:
        return VerifyResult(valid=False, key=key.record.name)
    version, algorithm = found
    return VerifyResult(valid=True, key=key.record.name, version=version, algorithm=algorithm)


def _verify_job(
    key: LoadedKey, candidates: list[LoadedVersion], args: VerifyArgs, sha256: bytes | None
) -> VerifyJob:
    """``args`` for a worker, as values (no wire form): the public keys as the
    SPKI DER the daemon holds (an HMAC key's versions as their object ids:
    the worker has the token compute the MAC)."""
    if key.kt.family is Family.HMAC:
        pairs = tuple((v.record.version, v.record.object_id) for v in candidates)
    else:
        pairs = tuple((v.record.version, v.spki) for v in candidates)
    return VerifyJob(
        key.kt.name,
        pairs,
        args.message,
        args.digest,
        args.hash,
        args.padding,
        args.format,
        args.signature,
        sha256,
    )


def _verify_done(
    rid: int, key: LoadedKey, reply: Reply, metrics: Metrics
) -> Callable[[bool, Any], None]:
    name = key.record.name

    def done(ok: bool, value: Any) -> None:
        if not ok:
            if isinstance(value, DeadlineExceeded):
                metrics.limit_hit("request_timeout")
            metrics.verified(name, value.name)
            metrics.error("verify", value)
            send_error(reply, rid, value)
        elif value is None:
            metrics.verified(name, "invalid")
            send_result(reply, rid, VerifyResult(valid=False, key=name))
        else:
            metrics.verified(name, "valid")
            version, algorithm = value
            result = VerifyResult(valid=True, key=name, version=version, algorithm=algorithm)
            send_result(reply, rid, result)

    return done


def _job(version: LoadedVersion, plan: algorithms.SignPlan) -> SignJob:
    h = plan.hash.name if plan.hash is not None else None
    return SignJob(version.record.object_id, plan.scheme, h, plan.data)


def _sign_done(
    rid: int,
    key: LoadedKey,
    signer: LoadedVersion,
    plan: algorithms.SignPlan,
    reply: Reply,
    metrics: Metrics,
    started: float,
) -> Callable[[bool, Any], None]:
    name, version = key.record.name, signer.record.version
    public_key = signer.public_key

    def done(ok: bool, value: Any) -> None:
        if ok:
            try:
                sig = algorithms.finish_signature(plan, value, public_key)
            except WireError as exc:  # format eth: not the version's key
                ok, value = False, exc
        if ok:
            result = SignResult(signature=sig, key=name, version=version, algorithm=plan.algorithm)
            metrics.signed(name, version, plan.algorithm, 1, started, time.perf_counter())
            send_result(reply, rid, result)
        else:
            if isinstance(value, DeadlineExceeded):
                metrics.limit_hit("request_timeout")
            metrics.sign_failed(name, version, plan.algorithm, value)
            metrics.error("sign", value)
            send_error(reply, rid, value)

    return done


def _batch_items(args: SignBatchArgs) -> tuple[bytes, ...]:
    """The batch's items (messages or digests).

    Raises:
        InvalidArgument: not exactly one of them, or not 1 to MAX_BATCH items.
    """
    if (args.messages is None) == (args.digests is None):
        raise InvalidArgument("exactly one of 'messages' and 'digests' is required")
    items = args.messages if args.messages is not None else args.digests
    assert items is not None
    if not 0 < len(items) <= MAX_BATCH:
        raise InvalidArgument(f"a batch has 1 to {MAX_BATCH} items, got {len(items)}")
    return items


def _batch_entries(
    rid: int,
    key: LoadedKey,
    signer: LoadedVersion,
    args: SignBatchArgs,
    reply: Reply,
    deadline: float,
    metrics: Metrics,
    started: float,
) -> list[Entry]:
    """One entry per item; the reply goes out when the last item is answered.

    Raises:
        InvalidArgument, UnsupportedAlgorithm: the batch as a whole is wrong.
    """
    items = _batch_items(args)
    by_message = args.messages is not None
    opts = algorithms.options(
        key.kt, args.hash, args.padding, args.format, by_digest=not by_message
    )
    algorithm = opts.algorithm
    plans: list[algorithms.SignPlan | WireError] = []
    for item in items:
        try:
            if by_message:
                plans.append(algorithms.plan(opts, item, None))
            else:
                plans.append(algorithms.plan(opts, None, item))
        except InvalidDigest as exc:  # this item only; the options are fine
            plans.append(exc)
    results: list[BatchItem | None] = [None] * len(items)
    left = [len(items)]
    timed_out = [False]  # an item answered deadline_exceeded: counted once per request
    name, version = key.record.name, signer.record.version
    public_key = signer.public_key

    def finish() -> None:
        left[0] -= 1
        if left[0] == 0:
            if timed_out[0]:
                metrics.limit_hit("request_timeout")
            signed = sum(1 for r in results if r is not None and r.signature is not None)
            metrics.signed(name, version, algorithm, signed, started, time.perf_counter())
            answer = SignBatchResult(
                key=name,
                version=version,
                algorithm=algorithm,
                results=tuple(r if r is not None else BatchItem() for r in results),
            )
            send_result(reply, rid, answer)

    def item_done(i: int, plan: algorithms.SignPlan) -> Callable[[bool, Any], None]:
        def done(ok: bool, value: Any) -> None:
            if ok:
                try:
                    signature = algorithms.finish_signature(plan, value, public_key)
                except WireError as exc:  # format eth: not the version's key
                    ok, value = False, exc
            if ok:
                results[i] = BatchItem(signature=signature)
            else:
                timed_out[0] = timed_out[0] or isinstance(value, DeadlineExceeded)
                results[i] = BatchItem(error=error_info(value))
            finish()

        return done

    entries = []
    for i, p in enumerate(plans):
        if isinstance(p, WireError):
            results[i] = BatchItem(error=error_info(p))
            finish()
        else:
            entries.append(Entry(_job(signer, p), item_done(i, p), deadline, bulk=True))
    return entries
