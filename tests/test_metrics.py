"""Prometheus metrics: what a real daemon exports after real traffic.

The text is parsed with prometheus_client's own parser (an independent reader
of the exposition format), and the numbers are checked against the requests
this test made.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from signd_client.errors import KeyNotFound, RateLimited, VersionNotFound, VersionNotUsable

if TYPE_CHECKING:
    from conftest import Daemon

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(d: Daemon, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(d.metrics_url().replace("/metrics", path), timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(all_samples: Samples, metric: str, /, **labels: str) -> float:
    """The sum of every sample of ``metric`` whose labels include ``labels``."""
    want = set(labels.items())
    found = [v for (n, ls), v in all_samples.items() if n == metric and want <= set(ls)]
    assert found, f"no sample {metric}{labels}"
    return sum(found)


def label_values(all_samples: Samples, label: str) -> set[str]:
    return {v for (_, ls), _ in all_samples.items() for k, v in ls if k == label}


def test_counts_follow_the_traffic(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    d = make_daemon()
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        sigs = [c.sign(key_name, b"m%d" % i).signature for i in range(7)]
        c.sign_batch(key_name, [b"a", b"b", b"c"])
        assert c.verify(key_name, sigs[0], b"m0").valid
        assert not c.verify(key_name, sigs[0], b"other").valid
        with pytest.raises(VersionNotFound):
            c.sign(key_name, b"x", version=9)  # there is no version 9
        with pytest.raises(KeyNotFound):
            c.sign("no-such-key-" + key_name, b"x")
        c.rotate(key_name)
    status, kind, text = scrape(d)
    assert status == 200
    assert kind.startswith("text/plain; version=0.0.4")
    m = samples(text)
    alg = "ecdsa-p256-sha256"
    assert value(m, "signd_signatures_total", key=key_name, version="1") == 7 + 3
    assert value(m, "signd_sign_requests_total", key=key_name, result="ok") == 8
    assert value(m, "signd_sign_requests_total", key=key_name, algorithm=alg) == 8
    assert value(m, "signd_verify_requests_total", key=key_name, result="valid") == 1
    assert value(m, "signd_verify_requests_total", key=key_name, result="invalid") == 1
    assert value(m, "signd_rotations_total", key=key_name, trigger="manual") == 1
    assert value(m, "signd_key_current_version", key=key_name) == 2
    assert value(m, "signd_errors_total", name="key_not_found", op="sign") == 1
    assert value(m, "signd_sign_requests_total", key=key_name, result="version_not_found") == 1
    # An unknown key name never becomes a label value.
    assert "no-such-key-" + key_name not in label_values(m, "key")
    # Latency: one observation per answered sign request.
    assert value(m, "signd_sign_duration_seconds_count", key=key_name) == 8
    assert value(m, "signd_sign_duration_seconds_bucket", key=key_name, le="+Inf") == 8
    assert value(m, "signd_sign_duration_seconds_sum", key=key_name) > 0
    # Token time and batch sizes come from the workers.
    assert value(m, "signd_token_batch_size_count") >= 1
    assert value(m, "signd_token_batch_size_sum") >= 7 + 3
    assert value(m, "signd_token_sign_duration_seconds_count") >= 1
    assert value(m, "signd_token_up") == 1
    assert value(m, "signd_ready") == 1
    assert value(m, "signd_build_info") == 1
    assert d.stop() == 0


def test_error_by_state_is_counted_per_key(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon()
    with d.client() as c:
        c.create_key(key_name, "ed25519")
        c.rotate(key_name)
        with pytest.raises(VersionNotUsable):
            c.sign(key_name, b"x", version=1)  # verify-only: may not sign
    m = samples(scrape(d)[2])
    assert value(m, "signd_sign_requests_total", key=key_name, result="version_not_usable") == 1
    assert value(m, "signd_errors_total", name="version_not_usable", code="303") == 1
    assert d.stop() == 0


def test_signatures_per_second_gauge(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    d = make_daemon()
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        # A second of traffic, then the gauge must count it (it averages whole
        # seconds, so it does once the second the batch fell in has ended).
        c.sign_batch(key_name, [b"%d" % i for i in range(500)])

    def rate() -> float:
        return value(samples(scrape(d)[2]), "signd_key_signatures_per_second", key=key_name)

    # 500 signatures within the 10 s window: 50/s, exactly (and never more).
    deadline = time.monotonic() + 10
    while (now := rate()) != pytest.approx(50.0):
        assert now < 50.0, now
        assert time.monotonic() < deadline, f"the gauge still says {now}/s"
        time.sleep(0.05)
    assert d.stop() == 0


def test_health_endpoints_and_unknown_paths(signd: Daemon) -> None:
    assert scrape(signd, "/healthz")[0] == 200
    status, _, body = scrape(signd, "/readyz")
    assert (status, body) == (200, "ready\n")
    assert scrape(signd, "/nothing")[0] == 404


def test_endpoint_listens_on_loopback_only(signd: Daemon) -> None:
    url = signd.metrics_url()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    listening = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, _, state = line.split()[1:4]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":  # LISTEN
                listening.append(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    assert listening == ["127.0.0.1"]


def test_a_garbage_request_gets_400_and_the_daemon_goes_on(signd: Daemon) -> None:
    host, port = signd.metrics_url().split("//")[1].split("/")[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"\x00\xff garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert scrape(signd)[0] == 200
    with signd.client() as c:
        assert c.health().ready


@pytest.mark.parametrize(
    ("listen", "problem"),
    [("9464", "host:port"), ("::1:9464", "brackets"), ("localhost:99999", "host:port")],
)
def test_bad_listen_address_is_refused(
    make_daemon: Callable[..., Daemon], listen: str, problem: str
) -> None:
    d = make_daemon(f'[metrics]\nlisten = "{listen}"\n', start=False)
    out = d.check_config()
    assert out.returncode == 2
    assert "metrics.listen" in out.stderr
    assert problem in out.stderr


def test_metrics_can_be_disabled(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("[metrics]\nenabled = false\n")
    assert '"metrics endpoint"' not in d.logs()
    with d.client() as c:
        assert c.health().ready
    assert d.stop() == 0


def test_rate_limited_requests_are_counted_by_scope(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon("[rate_limits]\nper_key = 0.001\nper_key_burst = 2\n")
    with d.client(retries=0) as c:
        c.create_key(key_name, "ec-p256")
        c.sign(key_name, b"1")
        c.sign(key_name, b"2")
        with pytest.raises(RateLimited):
            c.sign(key_name, b"3")
    m = samples(scrape(d)[2])
    assert value(m, "signd_rate_limited_total", scope="key") == 1
    assert value(m, "signd_rate_limited_total", scope="principal") == 0
    assert value(m, "signd_sign_requests_total", key=key_name, result="rate_limited") == 1
    assert d.stop() == 0
