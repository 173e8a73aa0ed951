"""The metrics' gauges are read, at each scrape, from the snapshot function
the registry was built with (the daemon hands it the running parts' view)."""

from __future__ import annotations

from prometheus_client import generate_latest

from signd.metrics import KeyState, Metrics, Snapshot


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the output")


def test_each_scrape_reads_the_snapshot_the_registry_was_built_with() -> None:
    states = iter(
        [
            Snapshot(token_up=True, ready=True, connections_open=3),
            Snapshot(token_up=False, connections_open=1),
        ]
    )
    registry = Metrics().registry(lambda: next(states))

    first = generate_latest(registry).decode()
    assert _value(first, "signd_token_up") == 1
    assert _value(first, "signd_ready") == 1
    assert _value(first, "signd_connections_open") == 3

    second = generate_latest(registry).decode()
    assert _value(second, "signd_token_up") == 0
    assert _value(second, "signd_connections_open") == 1


def test_a_registry_without_key_names_still_reads_the_gauges() -> None:
    snap = Snapshot(token_up=True, keys=(KeyState("app-signing", 2, 1.0, None),))
    full = generate_latest(Metrics().registry(lambda: snap)).decode()
    public = generate_latest(Metrics().registry(lambda: snap, per_key=False)).decode()
    assert _value(public, "signd_token_up") == 1
    assert "app-signing" in full
    assert "app-signing" not in public
