"""What the audit log is told about an answer: facts, not frames.

The service knows how each request ended when it answers; it hands that to
the audit log as an ``Outcome`` next to the answer's frame, so the audit
writer never decodes a frame to learn it.  A record's ``result`` is the
error's name or ``"ok"``, its ``code`` the wire code, its ``version`` the
version the request named or else the one the answer names (``create_key``
and ``rotate``: the version made), and ``valid`` is a verification's verdict.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import WireError
from ..protocol import Message

__all__ = ["OK", "Outcome", "outcome_of"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a request ended, as its audit record says it.

    ``error``: the error answered, None for a result.  ``version``: the
    version the result names (ignored with an error, as the record's
    ``version`` then comes from the request alone).  ``valid``: a
    verification's verdict, None for every other op.
    """

    error: WireError | None = None
    version: int | None = None
    valid: bool | None = None


#: A result that names no version and no verdict.
OK = Outcome()


def outcome_of(result: Message) -> Outcome:
    """The outcome of answering ``result``: the version it names (``version``,
    else ``created_version``, else ``current_version``, the first present) and
    ``valid`` if it has one.  Attribute reads only, no encoding.  Answers
    that name the same version and verdict get the same ``Outcome``."""
    version = getattr(result, "version", None)
    if version is None:
        version = getattr(result, "created_version", None)
        if version is None:
            version = getattr(result, "current_version", None)
    valid = getattr(result, "valid", None)
    if version is None and valid is None:
        return OK
    return _outcome(version, valid)


@functools.lru_cache(maxsize=4096)
def _outcome(version: int | None, valid: bool | None) -> Outcome:
    """One ``Outcome`` per (version, valid): the answers of a key version share
    it, so answering builds no object for its record (this runs on the event
    loop, on every answer)."""
    return Outcome(version=version, valid=valid)
