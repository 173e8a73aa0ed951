"""Replay-checked requests: what a signature covers when ``verify`` checks a
timestamp and a nonce (PROTOCOL.md, "Replay protection").

A sender signs ``signed_payload(message, timestamp, nonce)`` (with signd or
any other signer of the key); the receiver asks signd's ``verify`` with the
same ``message``, ``timestamp`` and ``nonce``, and signd answers ``valid``
once per nonce, ``replayed`` after, ``stale`` outside its time window::

    from signd_client import Client, replay

    ts, nonce = replay.fresh()
    sig = client.sign("api", replay.signed_payload(body, ts, nonce)).signature
    # ... send body, ts, nonce, sig; the receiver:
    client.verify("api", sig, body, timestamp=ts, nonce=nonce).status  # "valid"
"""

from __future__ import annotations

import os
import struct
import time
from typing import Final

from .errors import InvalidArgument

__all__ = [
    "DOMAIN",
    "MAX_NONCE",
    "MIN_NONCE",
    "REPLAYED",
    "STALE",
    "STATUSES",
    "VALID",
    "INVALID",
    "fresh",
    "signed_payload",
]

#: The domain tag that starts every replay-checked payload (16 bytes).
DOMAIN: Final = b"signd-replay-v1\x00"
#: A nonce's length, in bytes.
MIN_NONCE: Final = 8
MAX_NONCE: Final = 64

#: ``VerifyResult.status`` of a replay-checked verify.
VALID: Final = "valid"
INVALID: Final = "invalid"
REPLAYED: Final = "replayed"
STALE: Final = "stale"
STATUSES: Final = (VALID, INVALID, REPLAYED, STALE)

_U64: Final = struct.Struct(">Q")


def signed_payload(message: bytes, timestamp: int, nonce: bytes) -> bytes:
    """The bytes a replay-checked signature covers::

        DOMAIN || u64be(timestamp) || u8(len(nonce)) || nonce || message

    Raises: InvalidArgument (a timestamp that is no uint64, a nonce not 8 to 64 bytes).
    """
    if type(timestamp) is not int or not 0 <= timestamp < 1 << 64:
        raise InvalidArgument(f"field 'timestamp': must be 0 to 2**64-1, got {timestamp!r}")
    if not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise InvalidArgument(
            f"field 'nonce': must be {MIN_NONCE} to {MAX_NONCE} bytes, got {len(nonce)}"
        )
    return b"".join((DOMAIN, _U64.pack(timestamp), bytes((len(nonce),)), nonce, message))


def fresh(nonce_bytes: int = 16) -> tuple[int, bytes]:
    """A timestamp (now, Unix seconds) and a random nonce for one request."""
    return int(time.time()), os.urandom(nonce_bytes)
