from conftest import Daemon


def test_daemon_answers_health(signd: Daemon) -> None:
    with signd.client() as c:
        h = c.health()
    assert h.ready
    assert h.token is not None
    assert h.token.label == "signd-test"
