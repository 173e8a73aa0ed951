#!/usr/bin/env python3
"""Write ``tests/vectors/replay.json``: what a replay-checked signature covers
(PROTOCOL.md, "Replay protection"), for message, timestamp and nonce.

The bytes are put together here by hand, from the definition, not by
``signd_client.replay``, which ``test_replay_inprocess.py`` checks against them::

    payload = "signd-replay-v1" 0x00 || u64be(timestamp) || u8(len(nonce)) || nonce || message

    python tests/vectors/generate_replay.py          # rewrite replay.json
    python tests/vectors/generate_replay.py --check  # exit 1 if it differs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("replay.json")
DOMAIN = "signd-replay-v1".encode("ascii") + b"\x00"

CASES = [
    ("typical", b'{"amount":"10.00","to":"acct-42"}', 1_750_000_000, bytes(range(16))),
    ("empty message", b"", 1_750_000_000, b"\xff" * 8),
    ("shortest nonce, timestamp 0", b"m", 0, b"12345678"),
    ("longest nonce", b"POST /v1/orders", 1_750_000_123, bytes(range(64))),
    ("largest timestamp", b"\x00\x01\x02", (1 << 64) - 1, b"nonce-ab"),
]


def payload(message: bytes, timestamp: int, nonce: bytes) -> bytes:
    return DOMAIN + timestamp.to_bytes(8, "big") + len(nonce).to_bytes(1, "big") + nonce + message


def document() -> str:
    vectors = [
        {
            "name": name,
            "message": m.hex(),
            "timestamp": ts,
            "nonce": n.hex(),
            "payload": payload(m, ts, n).hex(),
        }
        for name, m, ts, n in CASES
    ]
    about = (
        "signd replay-checked verify: the bytes the signature covers, "
        "'signd-replay-v1' 0x00 || u64be(timestamp) || u8(len(nonce)) || nonce || message "
        "(hex; PROTOCOL.md, 'Replay protection')"
    )
    return json.dumps({"about": about, "vectors": vectors}, indent=2) + "\n"


if __name__ == "__main__":
    text = document()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.read_text() == text else 1)
    OUT.write_text(text)
