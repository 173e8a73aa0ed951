"""The baseline process: ``python -m signd.bench.baseline``.

Reads its job as one JSON line on stdin, then the PIN as the next line (never
argv or the environment), opens its own session, and prints one JSON line:
raw python-pkcs11 signatures, one session, one thread, on the same token and
key that signd uses.
"""

from __future__ import annotations

import json
import sys

from ..token import profiles
from ..token.session import TokenSession


def main() -> None:
    job = json.loads(sys.stdin.readline())
    pin = sys.stdin.readline().rstrip("\n")
    session = TokenSession()
    session.open(job["module"], job["label"], pin, profiles.PROFILES["softhsm"])
    try:
        count, lat = session.time_raw_signatures(
            job["key_label"],
            job["scheme"],
            job.get("hash"),
            bytes.fromhex(job["data"]),
            job["warmup"],
            job["seconds"],
        )
    finally:
        session.close()
    step = max(1, len(lat) // 200_000)
    print(json.dumps({"count": count, "seconds": job["seconds"], "latencies": lat[::step]}))


if __name__ == "__main__":
    main()
