"""``TokenSession.check``: a token that fails ``C_GetTokenInfo`` for a moment
(SoftHSM's token file caught half-rewritten by another process's login) is
not taken for lost; one that keeps failing is.  A slot that fails on cue
stands in for the module: the real race is measured in ``CHECK_PAUSES``'s
comment, and is too rare to provoke on demand."""

from __future__ import annotations

import pkcs11.exceptions as p11e
import pytest

from signd.errors import TokenUnavailable
from signd.token import session as session_module
from signd.token.session import CHECK_PAUSES, TokenSession


class Slot:
    """``get_token`` fails its first ``failures`` calls with GeneralError."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def get_token(self) -> object:
        self.calls += 1
        if self.calls <= self.failures:
            raise p11e.GeneralError()
        return object()


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses ``check`` took (instead of sleeping them)."""
    slept: list[float] = []
    monkeypatch.setattr(session_module.time, "sleep", slept.append)
    return slept


def session_on(slot: Slot) -> TokenSession:
    s = TokenSession()
    s._slot = slot
    return s


@pytest.mark.parametrize("failures", range(len(CHECK_PAUSES) + 1))
def test_a_token_that_answers_again_within_the_pauses_is_not_lost(
    failures: int, pauses: list[float]
) -> None:
    s = session_on(Slot(failures))
    s.check()
    assert s.lost is None
    assert pauses == list(CHECK_PAUSES[:failures])


def test_a_token_that_keeps_failing_is_lost(pauses: list[float]) -> None:
    slot = Slot(failures=len(CHECK_PAUSES) + 1)
    s = session_on(slot)
    with pytest.raises(TokenUnavailable, match="GeneralError from C_GetTokenInfo"):
        s.check()
    assert s.lost == "GeneralError from C_GetTokenInfo"
    assert pauses == list(CHECK_PAUSES)
    # Lost once is lost for good: the module is not asked again.
    with pytest.raises(TokenUnavailable):
        s.check()
    assert slot.calls == len(CHECK_PAUSES) + 1
