"""The daemon's edge: exceptions to wire errors, requests to domain settings.

``wire_error`` is the one map from what the daemon raises to what a client is
answered: every reply site of the service goes through it.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import trio
from cryptography.hazmat.primitives.asymmetric import ec

from ..audit.facts import Outcome, outcome_of
from ..errors import DeadlineExceeded, InternalError, WireError
from ..keys import algorithms, eth
from ..keys.records import KeySettings, request_digest
from ..keys.store import LoadedKey
from ..protocol import (
    CreateKeyArgs,
    ErrorInfo,
    Jwk,
    KeyInfo,
    KeySummary,
    Message,
    RotateArgs,
    UpdateKeyArgs,
    VersionInfo,
    encode_error,
    encode_result,
)
from .context import Reply

__all__ = [
    "error_info",
    "jwks_of",
    "key_info",
    "key_summary",
    "request_settings",
    "requested",
    "send_error",
    "send_result",
    "wire_error",
]

log = logging.getLogger("signd.service")


def wire_error(exc: BaseException, what: str | None = None, **context: Any) -> WireError:
    """The error a client is answered for ``exc``: a ``WireError`` as it is;
    a trio timeout as ``deadline_exceeded``; anything else is a bug here,
    logged with its traceback and answered ``internal_error``.

    ``what`` names the work that failed (``"key look-up"``), for the message;
    ``context`` goes into the log record.
    """
    if isinstance(exc, WireError):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return DeadlineExceeded(f"{what or 'request'} timed out")
    if what is None:
        log.exception("internal error", extra=context, exc_info=exc)
        return InternalError("internal error; see daemon log")
    log.exception(f"{what} failed", extra=context, exc_info=exc)
    return InternalError(f"{what} failed; see daemon log")


def send_result(reply: Reply, request_id: int, result: Message) -> None:
    """Answer ``request_id`` with ``result``."""
    reply(request_id, encode_result(request_id, result), outcome_of(result))


def send_error(reply: Reply, request_id: int, error: WireError) -> None:
    """Answer ``request_id`` with ``error``."""
    reply(request_id, encode_error(request_id, error), Outcome(error=error))


def error_info(exc: BaseException) -> ErrorInfo:
    """``exc`` as one item's error in a batch answer (see ``wire_error``)."""
    error = wire_error(exc)
    return ErrorInfo(code=int(error.code), name=error.name, message=error.message)


def key_info(key: LoadedKey) -> KeyInfo:
    """``key`` (its states brought up to date by the caller) on the wire."""
    r = key.record
    st = r.settings
    until = key.verify_until()
    return KeyInfo(
        name=r.name,
        type=r.type,
        created=r.created,
        current_version=r.latest.version,
        versions=tuple(
            VersionInfo(
                version=v.record.version,
                state=v.state,
                created=v.record.created,
                public_key_pem=v.public_key_pem,
                verify_until=until.get(v.record.version),
                eth_address=_eth_address(key.kt, v.public_key),
            )
            for v in sorted(key.versions.values(), key=lambda v: v.record.version)
        ),
        auto_rotate_period=st.auto_rotate_period,
        verify_grace=st.verify_grace,
        min_sign_version=st.min_sign_version,
        min_verify_version=st.min_verify_version,
        deletion_allowed=st.deletion_allowed,
        next_rotation=r.next_rotation(),
        max_versions=key.version_cap or None,
        backup=True if st.backup else None,  # absent: no (frames as before backups)
        watermark=True if st.watermark else None,  # likewise
    )


def _eth_address(kt: algorithms.KeyType, public_key: algorithms.PublicKey | None) -> str | None:
    """A secp256k1 version's Ethereum address (EIP-55); None for other key types."""
    if kt.curve != "secp256k1" or not isinstance(public_key, ec.EllipticCurvePublicKey):
        return None
    return eth.address(public_key)


def key_summary(key: LoadedKey) -> KeySummary:
    r = key.record
    return KeySummary(name=r.name, type=r.type, created=r.created, current_version=r.latest.version)


def jwks_of(key: LoadedKey) -> list[Jwk]:
    """Every version of ``key`` that may verify now (the caller brought its
    states up to date), as JWKs whose ``kid`` is ``name:version``; none for
    an HMAC key (it has no public key to publish)."""
    name = key.record.name
    return [
        Jwk(**algorithms.jwk(key.kt, v.public_key, f"{name}:{v.record.version}"))
        for v in key.verifiers
        if v.public_key is not None
    ]


def requested(args: CreateKeyArgs | RotateArgs) -> str:
    """What a create_key or rotate asks, for telling a repeat from a reuse of
    its idempotency key.  create_key: the type and the settings it asks for
    (an absent setting and its default are the same request)."""
    if isinstance(args, RotateArgs):
        return request_digest("rotate")
    settings = request_settings(args, KeySettings())
    return request_digest("create_key", type=args.type, settings=settings.to_json())


def request_settings(args: CreateKeyArgs | UpdateKeyArgs, old: KeySettings) -> KeySettings:
    """``old`` with every setting ``args`` gives."""
    return KeySettings(
        auto_rotate_period=_pick(args.auto_rotate_period, old.auto_rotate_period),
        verify_grace=_pick(args.verify_grace, old.verify_grace),
        min_sign_version=_pick(getattr(args, "min_sign_version", None), old.min_sign_version),
        min_verify_version=_pick(getattr(args, "min_verify_version", None), old.min_verify_version),
        deletion_allowed=_pick(args.deletion_allowed, old.deletion_allowed),
        max_versions=_pick(args.max_versions, old.max_versions),
        backup=_pick(getattr(args, "backup", None), old.backup),  # create_key only
        watermark=_pick(getattr(args, "watermark", None), old.watermark),  # create_key only
    )


T = TypeVar("T")


def _pick(new: T | None, old: T) -> T:
    return old if new is None else new
