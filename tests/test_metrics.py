"""Prometheus metrics: what a real daemon exports after real traffic.

The text is parsed with prometheus_client's own parser (an independent reader
of the exposition format), and the numbers are checked against the requests
this test made.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from signd_client.errors import KeyNotFound, RateLimited, VersionNotFound, VersionNotUsable
from support import wait_until

if TYPE_CHECKING:
    from conftest import Daemon

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


#: The bearer token of the daemons whose per-key series a test reads.
TOKEN = secrets.token_hex(16)


def scrape(d: Daemon, path: str = "/metrics") -> tuple[int, str, str]:
    """GET ``path`` (with the daemon's metrics token, if it has one)."""
    return d.http_get(path)


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
    d = make_daemon(metrics_token=TOKEN)
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
    # Nor does a version the key does not have (a client could grow the set).
    assert "9" not in label_values(m, "version")
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
    d = make_daemon(metrics_token=TOKEN)
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
    d = make_daemon(metrics_token=TOKEN)
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        # A second of traffic, then the gauge must count it (it averages whole
        # seconds, so it does once the second the batch fell in has ended).
        c.sign_batch(key_name, [b"%d" % i for i in range(500)])

    def rate() -> float:
        return value(samples(scrape(d)[2]), "signd_key_signatures_per_second", key=key_name)

    # 500 signatures within the 10 s window: 50/s, exactly (and never more).
    def counted() -> bool:
        now = rate()
        if now == pytest.approx(50.0):
            return True
        assert now < 50.0, now
        return False

    wait_until(counted, "the gauge to say 50/s", 10)
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
    d = make_daemon("[rate_limits]\nper_key = 0.001\nper_key_burst = 2\n", metrics_token=TOKEN)
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


# ---------------------------------------------------------------- who may read what

SETPRIV = shutil.which("setpriv")
NOBODY = 65534
GID = 4242  # a group that exists nowhere: only the client run as nobody holds it
needs_nobody = pytest.mark.skipif(
    SETPRIV is None or os.geteuid() != 0, reason="needs root and setpriv (util-linux)"
)

AS_NOBODY = """
import json, sys, urllib.error, urllib.request
from signd_client import Client
from signd_client.errors import PermissionDenied
sock, key, url = sys.argv[1:4]
out = {"denied": 0}
with Client(sock, retries=0) as c:
    out["listed"] = [k.name for k in c.list_keys().keys]
    for attempt in (lambda: c.sign(key, b"x"), lambda: c.verify(key, b"s" * 64, b"x"),
                    lambda: c.sign_batch(key, [b"a"]), lambda: c.sign(key, b"x", version=7)):
        try:
            attempt()
        except PermissionDenied:
            out["denied"] += 1
try:
    with urllib.request.urlopen(url, timeout=30) as r:
        out["metrics"] = [r.status, r.read().decode()]
except urllib.error.HTTPError as e:
    out["metrics"] = [e.code, e.read().decode()]
print(json.dumps(out))
"""


@pytest.fixture
def shared_daemon(make_daemon: Callable[..., Daemon]) -> Iterator[Callable[..., Daemon]]:
    """A daemon whose socket ``nobody`` can reach (a 0711 directory, group GID)."""
    dirs: list[Path] = []

    def make(extra: str = "", **kw: Any) -> Daemon:
        workdir = Path(tempfile.mkdtemp(prefix="signd-metrics-", dir="/tmp"))
        workdir.chmod(0o711)
        dirs.append(workdir)
        return make_daemon(extra, workdir=workdir, server_extra=f"socket_group = {GID}\n", **kw)

    yield make
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def as_nobody(d: Daemon, key: str) -> dict[str, Any]:
    """Run ``AS_NOBODY`` as uid nobody: what it was refused, listed, and read at /metrics."""
    assert SETPRIV is not None
    env = {"PATH": "/usr/bin:/bin", "HOME": "/"}
    if "PYTHONPATH" in os.environ:  # the checkout under test, not an installed copy
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    out = subprocess.run(
        [
            *(SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={GID}"),
            *(sys.executable, "-c", AS_NOBODY, d.socket, key, d.metrics_url()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert isinstance(result, dict)
    return result


@needs_nobody
def test_a_uid_with_no_grant_reads_no_key_names_and_moves_no_key_series(
    shared_daemon: Callable[..., Daemon], key_name: str
) -> None:
    # root may do anything; nobody may do nothing (no rule names it).
    d = shared_daemon(metrics_token=TOKEN)
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        c.sign(key_name, b"by root")
    before = samples(scrape(d)[2])
    seen = as_nobody(d, key_name)
    assert seen["listed"] == []
    assert seen["denied"] == 4
    # Without the token, /metrics is refused and says nothing about any key.
    status, body = seen["metrics"]
    assert status == 401
    assert key_name not in body
    assert "signd_" not in body
    # The refusals are counted, but on no series of the key.
    after = samples(scrape(d)[2])
    assert value(after, "signd_errors_total", name="permission_denied") == 4
    assert "permission_denied" not in label_values(after, "result")

    def counted(m: Samples) -> Samples:  # the key's counters and histograms
        counts = ("_total", "_bucket", "_count", "_sum")
        return {k: v for k, v in m.items() if ("key", key_name) in k[1] and k[0].endswith(counts)}

    assert counted(after) == counted(before)
    assert counted(after)
    assert d.stop() == 0


@needs_nobody
def test_without_a_token_metrics_names_no_key(
    shared_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = shared_daemon()
    assert "to see them, set [metrics] token_file" in d.logs()
    with d.client() as c:
        c.create_key(key_name, "ec-p256", auto_rotate_period=86400)
        for i in range(3):
            c.sign(key_name, b"%d" % i)
        sig = c.sign(key_name, b"v").signature
        assert c.verify(key_name, sig, b"v").valid
        c.rotate(key_name)
    seen = as_nobody(d, key_name)
    status, body = seen["metrics"]
    assert status == 200
    assert key_name not in body
    # Every per-key family is there, summed, with an empty key (and version) label.
    m = samples(body)
    assert label_values(m, "key") == {""}
    keyed = {k: v for k, v in m.items() if k[0] != "signd_build_info"}
    assert label_values(keyed, "version") == {""}
    assert value(m, "signd_signatures_total", algorithm="ecdsa-p256-sha256") >= 4
    assert value(m, "signd_sign_requests_total", result="ok") >= 4
    assert value(m, "signd_verify_requests_total", result="valid") >= 1
    assert value(m, "signd_sign_duration_seconds_count") >= 4
    assert value(m, "signd_key_next_rotation_timestamp_seconds") > time.time()
    assert not any(n == "signd_key_current_version" for n, _ in m)
    # The probes stay open and name no key either.
    for path, answer in (("/healthz", "live\n"), ("/readyz", "ready\n")):
        assert scrape(d, path)[0::2] == (200, answer)
    assert d.stop() == 0


def test_the_token_unlocks_per_key_series_and_nothing_else_does(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon(metrics_token=TOKEN)
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        c.sign(key_name, b"x")
    status, _, body = scrape(d)
    assert status == 200
    assert value(samples(body), "signd_signatures_total", key=key_name) == 1
    url = d.metrics_url()
    # A token one hex digit off (flipped, so never the token itself).
    off = TOKEN[:-1] + ("1" if TOKEN[-1] == "0" else "0")
    for auth in (None, "Bearer " + off, "Basic " + TOKEN, "Bearer", TOKEN):
        headers = {} if auth is None else {"Authorization": auth}
        status, text = http(url, headers)
        assert status == 401, auth
        assert key_name not in text
        assert "signd_" not in text
    assert http(url, {"Authorization": "bearer  " + TOKEN})[0] == 200  # scheme is case-blind
    assert http(url.removesuffix("/metrics") + "/readyz", {})[0] == 200
    assert d.stop() == 0


def http(url: str, headers: dict[str, str]) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


@pytest.mark.parametrize(
    ("make_bad", "problem"),
    [
        (lambda p: p.chmod(0o644), "readable by others"),
        (lambda p: p.chmod(0o602), "writable by"),
        (lambda p: p.write_text("short\n"), "printable ASCII"),
        (lambda p: p.write_text("has a space in the middle!\n"), "printable ASCII"),
        (lambda p: (p.unlink(), p.symlink_to(p.with_name("real.token"))), "symbolic link"),
        (lambda p: (p.unlink(), os.mkfifo(p, 0o600)), "not a regular file"),
        (lambda p: os.chown(p, NOBODY, NOBODY), "is owned by"),
        (lambda p: p.unlink(), "cannot open"),
    ],
)
def test_a_bad_token_file_is_refused(
    make_daemon: Callable[..., Daemon], make_bad: Callable[[Path], object], problem: str
) -> None:
    d = make_daemon(metrics_token=TOKEN, start=False)
    d.write_config()
    token_file = d.workdir / "metrics.token"
    (d.workdir / "real.token").write_text(TOKEN)
    (d.workdir / "real.token").chmod(0o600)
    if problem == "is owned by" and os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    make_bad(token_file)
    # check-config reads it as the daemon would (a FIFO must not hang it).
    out = subprocess.run(
        [sys.executable, "-m", "signd", "check-config", "--config", str(d.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=d.env(),
    )
    assert out.returncode == 2, out.stdout
    assert "metrics.token_file" in out.stderr
    assert problem in out.stderr
    assert TOKEN not in out.stderr


def test_token_file_and_credential_are_exclusive(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(
        '[metrics]\nlisten = "127.0.0.1:0"\ntoken_credential = "metrics"\n',
        metrics_token=TOKEN,
        start=False,
    )
    out = d.check_config()
    assert out.returncode == 2
    assert "at most one of token_file and token_credential" in out.stderr


# ---------------------------------------------------------------- Host and held connections


def endpoint(d: Daemon) -> tuple[str, int]:
    host, port = d.metrics_url().split("//")[1].split("/")[0].rsplit(":", 1)
    return host, int(port)


def raw_get(d: Daemon, host_header: str | None, path: str = "/metrics") -> bytes:
    """One request with exactly this Host header (None: none, HTTP/1.0); the whole answer."""
    head = f"GET {path} HTTP/1.1\r\n" if host_header is not None else f"GET {path} HTTP/1.0\r\n"
    if host_header is not None:
        head += f"Host: {host_header}\r\n"
    with socket.create_connection(endpoint(d), timeout=10) as s:
        s.sendall(head.encode() + b"\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "localhost.evil.example:{port}",
        "127.0.0.1.nip.io:{port}",
        "localhost:1",
        "127.0.0.1:{port}0",
        "[::1]x",
        "::1",
        None,
    ],
)
def test_a_foreign_host_header_is_refused(signd: Daemon, host: str | None) -> None:
    port = endpoint(signd)[1]
    answer = raw_get(signd, None if host is None else host.format(port=port))
    status = answer.split(b"\r\n", 1)[0]
    assert status.startswith((b"HTTP/1.1 421", b"HTTP/1.1 400")), answer[:200]
    assert b"signd_" not in answer
    for path in ("/healthz", "/readyz"):
        assert b"live" not in raw_get(signd, host and host.format(port=port), path)


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:{port}", "127.0.0.1", "127.0.0.1:{port}", "[::1]:{port}"]
)
def test_the_endpoints_own_names_are_accepted(signd: Daemon, host: str) -> None:
    answer = raw_get(signd, host.format(port=endpoint(signd)[1]))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"signd_build_info" in answer


def test_held_connections_neither_pile_up_nor_block_a_scrape_or_the_socket(
    make_daemon: Callable[..., Daemon],
) -> None:
    d = make_daemon()
    assert d.proc is not None
    fds = Path(f"/proc/{d.proc.pid}/fd")
    base = len(list(fds.iterdir()))
    # 300 connections that send half a request head and then nothing.
    held = []
    for _ in range(300):
        s = socket.create_connection(endpoint(d), timeout=10)
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        held.append(s)
    try:
        # The daemon takes them in, keeping only the newest few: the others
        # are closed at once (their peer sees the end of the stream).
        def closed() -> bool:
            assert len(list(fds.iterdir())) <= base + 2 * 16 + 8, "held connections pile up"
            return sum(1 for s in held if peer_closed(s)) >= 300 - 2 * 16

        wait_until(closed, "all but the newest 32 of 300 to be closed", 60)
        # With the rest still held, a scrape and a socket health answer.
        assert d.http_get()[0] == 200
        with d.client() as c:
            assert c.health().ready
    finally:
        for s in held:
            s.close()
    assert d.stop() == 0


def peer_closed(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True
