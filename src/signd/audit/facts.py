"""What the service knows about an answer, handed to the audit log with it.

The audit log records these facts as they are, so it never decodes a frame.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import WireError

__all__ = ["Outcome"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """An answer's facts: the error it carries, or the key version that
    signed, or whether a verification held."""

    error: WireError | None = None
    version: int | None = None
    valid: bool | None = None
