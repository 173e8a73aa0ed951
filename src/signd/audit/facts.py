"""What an answer says, as the service knows it when it makes the answer:
the audit log records these facts without decoding the frame again."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import WireError

__all__ = ["Outcome"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer's error (None: a result), the key version it names, and
    for ``verify`` whether the signature was valid."""

    error: WireError | None = None
    version: int | None = None
    valid: bool | None = None
