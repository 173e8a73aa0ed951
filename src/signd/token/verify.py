"""Verifications in a token worker: no token, only ``cryptography``.

Workers take verifications too so that a busy daemon verifies on every core,
not only on its own.  No PKCS#11 here: this runs beside the session, not in it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Final

from ..keys import algorithms
from .ipc import VerifyJob

__all__ = ["Verifier"]

#: Public keys a worker keeps loaded (then it starts afresh).
CACHED_KEYS: Final = 4096


class Verifier:
    """Verifies ``VerifyJob``s, with the public keys it loaded cached."""

    def __init__(self) -> None:
        self._keys: dict[bytes, algorithms.PublicKey] = {}

    def verify(self, job: VerifyJob) -> list[Any] | None:
        """``[version, algorithm]`` of the candidate that verifies, or None.

        Raises: UnsupportedAlgorithm (an unknown key type), ValueError (a
        candidate is not a public key of that type).  The daemon checked the
        request's options before it made the job.
        """
        kt = algorithms.key_type(job.key_type)
        version = algorithms.verify_planned(kt, job.plan(), self._public_keys(kt, job.candidates))
        return [version, job.algorithm] if version is not None else None

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
