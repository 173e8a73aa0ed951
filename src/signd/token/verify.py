"""Verifications in a token worker: no token, only ``cryptography``.

Workers take verifications too so that a busy daemon verifies on every core,
not only on its own.  No PKCS#11 here: this runs beside the session, not in it.
An HMAC key has no public key: its jobs go to ``mac``, the session's
``verify_mac``, which has the token compute the MAC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from ..errors import UnsupportedAlgorithm
from ..keys import algorithms
from .ipc import VerifyJob

__all__ = ["Verifier"]

#: Public keys a worker keeps loaded (then it starts afresh).
CACHED_KEYS: Final = 4096


class Verifier:
    """Verifies ``VerifyJob``s, with the public keys it loaded cached."""

    def __init__(self, mac: Callable[[VerifyJob], list[Any] | None] | None = None) -> None:
        self._keys: dict[bytes, algorithms.PublicKey] = {}
        self._mac = mac

    def verify(self, job: VerifyJob) -> list[Any] | None:
        """``[version, algorithm]`` of the candidate that verifies, or None.

        Raises: InvalidArgument, InvalidDigest, UnsupportedAlgorithm (the
        request, or a key, is not what it claims).
        """
        kt = algorithms.key_type(job.key_type)
        if kt.family is algorithms.Family.HMAC:
            if self._mac is None:
                raise UnsupportedAlgorithm(f"{kt.name} keys are verified on the token")
            return self._mac(job)
        found = algorithms.verify_any(kt, self._public_keys(kt, job.candidates), job, job.sha256)
        return list(found) if found is not None else None

    def _public_keys(
        self, kt: algorithms.KeyType, candidates: Sequence[Sequence[Any]]
    ) -> Iterator[tuple[int, algorithms.PublicKey]]:
        """(version, public key) of each candidate (version, SPKI DER), loaded
        once per process; as they are needed, so a match stops the loading."""
        keys = self._keys
        for version, spki in candidates:
            pub = keys.get(spki)
            if pub is None:
                if len(keys) >= CACHED_KEYS:
                    keys.clear()
                pub = keys[spki] = algorithms.load_public_key(kt, spki)
            yield version, pub
