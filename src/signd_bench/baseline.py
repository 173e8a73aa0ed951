"""The baseline process: ``python -m signd_bench.baseline``.

Reads its job as one JSON line on stdin, then the PIN as the next line (never
argv or the environment), opens its own session, and prints one JSON line:
raw python-pkcs11 signatures, one session, one thread, on the same token and
key that signd uses.

It measures the token's own speed, so it is python-pkcs11 and nothing else:
no code of the daemon's (open the token, log in, find the key, sign in a loop).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Final

import pkcs11
from pkcs11 import MGF, Attribute, Mechanism, ObjectClass

#: signature scheme -> PKCS#11 mechanism (the data is a digest or the message,
#: as signd would hand it to the token for that scheme)
MECHANISMS: Final = {
    "ecdsa": Mechanism.ECDSA,
    "eddsa": Mechanism.EDDSA,
    "rsa-pkcs1v15": Mechanism.RSA_PKCS,
    "rsa-pss": Mechanism.RSA_PKCS_PSS,
    "hmac": Mechanism.SHA256_HMAC,  # an HMAC key's secret: the MAC of the message
}
#: RSA-PSS parameters by hash: (hash mechanism, MGF, salt length)
PSS: Final = {
    "sha256": (Mechanism.SHA256, MGF.SHA256, 32),
    "sha384": (Mechanism.SHA384, MGF.SHA384, 48),
    "sha512": (Mechanism.SHA512, MGF.SHA512, 64),
}


def time_signatures(
    key: Any, mechanism: Mechanism, param: Any, data: bytes, warmup: float, seconds: float
) -> tuple[int, list[float]]:
    """Sign ``data`` with ``key`` in a tight loop: ``warmup`` seconds unmeasured,
    then ``seconds`` measured.  Returns (count, latencies in seconds)."""
    sign = key.sign
    clock = time.perf_counter
    latencies: list[float] = []
    count = 0
    start = clock()
    measure_from = start + warmup
    end = measure_from + seconds
    now = start
    while now < end:
        t0 = clock()
        sign(data, mechanism=mechanism, mechanism_param=param)
        now = clock()
        if t0 >= measure_from:
            count += 1
            latencies.append(now - t0)
    return count, latencies


def run(job: dict[str, Any], pin: str) -> dict[str, Any]:
    """Open the job's token, log in with ``pin``, find its private key and
    time it.  Raises: pkcs11 errors as they come (no token, wrong PIN), and
    StopIteration when the token has no private key labelled ``key_label``."""
    token = pkcs11.lib(job["module"]).get_token(token_label=job["label"])
    scheme = job["scheme"]
    hash_name = job.get("hash")
    param = PSS[hash_name] if scheme == "rsa-pss" and hash_name else None
    with token.open(user_pin=pin) as session:
        key = next(
            iter(
                session.get_objects(
                    {
                        # an HMAC key is a secret key, a keypair signs with its private key
                        Attribute.CLASS: ObjectClass.SECRET_KEY
                        if scheme == "hmac"
                        else ObjectClass.PRIVATE_KEY,
                        Attribute.LABEL: job["key_label"],
                    }
                )
            )
        )
        count, lat = time_signatures(
            key,
            MECHANISMS[scheme],
            param,
            bytes.fromhex(job["data"]),
            job["warmup"],
            job["seconds"],
        )
    step = max(1, len(lat) // 200_000)
    return {"count": count, "seconds": job["seconds"], "latencies": lat[::step]}


def main() -> None:
    job = json.loads(sys.stdin.readline())
    pin = sys.stdin.readline().rstrip("\n")
    print(json.dumps(run(job, pin)))


if __name__ == "__main__":
    main()
