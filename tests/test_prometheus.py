"""The Prometheus extras in prometheus/, and signd's /metrics seen by real tools.

- The alert rules pass ``promtool check rules`` and their unit tests pass
  ``promtool test rules``; every alert is tested firing and not firing.
- The rules and the Grafana dashboard use only metric names that signd exports,
  as listed in prometheus/metrics.txt (the one list of them); the dashboard
  uses every family in it.
- A real signd's /metrics output is clean for ``promtool check metrics`` and
  exports exactly the families, types and labels of metrics.txt.
- A real Prometheus server (Debian's ``prometheus`` package; scripts/dev.sh
  installs it) scrapes a real signd every second while clients sign, and its
  query API returns a per-key sign rate above zero and the latency quantiles;
  the alert rules evaluate without error against the real series, and every
  dashboard expression is accepted.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from signd_client.errors import KeyNotFound

if TYPE_CHECKING:
    from conftest import Daemon

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "prometheus"
METRICS_TXT = PROM / "metrics.txt"
RULES = PROM / "signd-alerts.yml"
RULE_TESTS = PROM / "signd-alerts.test.yml"
DASHBOARD = PROM / "grafana-signd.json"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin")
INSTALL_HINT = "apt-get install prometheus (scripts/dev.sh setup does it)"
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool missing: {INSTALL_HINT}")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason=f"the prometheus server is missing: {INSTALL_HINT}"
)

METRIC_NAME = re.compile(r"\bsignd_[a-z0-9_]*[a-z0-9]")
TYPES = ("counter", "gauge", "histogram")


@dataclass(frozen=True)
class Family:
    name: str
    type: str
    labels: frozenset[str]

    def series(self) -> set[str]:
        """The names its samples have in the exposition (and so in PromQL)."""
        if self.type == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}


def families() -> dict[str, Family]:
    """prometheus/metrics.txt: NAME TYPE LABELS a line."""
    out: dict[str, Family] = {}
    for line in METRICS_TXT.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, kind, labels = line.split()
        assert name not in out, f"{name} listed twice"
        out[name] = Family(
            name, kind, frozenset() if labels == "-" else frozenset(labels.split(","))
        )
    return out


def exported_series() -> set[str]:
    return {s for f in families().values() for s in f.series()}


def promtool(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=PROM,
    )


# ---------------------------------------------------------------- the list itself


def test_metrics_list_is_well_formed() -> None:
    fams = families()
    assert len(fams) >= 20
    for f in fams.values():
        assert f.name.startswith("signd_"), f.name
        assert f.type in TYPES, f
        assert f.name.endswith("_total") == (f.type == "counter"), f"{f.name}: _total iff counter"
        assert not f.labels & {"le", "quantile"}, f
        if f.type == "histogram":
            assert f.name.endswith(("_seconds", "_size")), f"{f.name}: say the unit"


# ---------------------------------------------------------------- alert rules


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text(), re.MULTILINE)


@needs_promtool
def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", RULES.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in out.stdout, out.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    out = promtool("test", "rules", RULE_TESTS.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout, out.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    """Each alert has a test case with exp_alerts and one expecting none."""
    text = RULE_TESTS.read_text()
    cases = re.split(r"^\s*- eval_time: ", text, flags=re.MULTILINE)[1:]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in cases:
        m = re.search(r"^\s*alertname: (\w+)\s*$", case, re.MULTILINE)
        assert m is not None, case
        (firing if "exp_alerts:" in case else silent).add(m.group(1))
    names = set(alert_names())
    assert len(names) >= 8
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"
    assert (firing | silent) - names == set(), "tests of alerts that do not exist"


def test_alert_rules_cover_the_issue_and_are_labelled() -> None:
    text = RULES.read_text()
    for metric in (
        "signd_token_up",
        "signd_ready",
        "signd_errors_total",
        "signd_sign_duration_seconds_bucket",
        "signd_key_next_rotation_timestamp_seconds",
        "signd_audit_write_failures_total",
    ):
        assert f"{metric}" in text, metric
    rules = re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]
    assert len(rules) == len(alert_names())
    for rule in rules:
        name = rule.split()[0]
        assert re.search(r"severity: (critical|warning)\b", rule), name
        assert "summary:" in rule, name
        assert "description:" in rule, name
        if "by (job, instance, key" in rule or "signd_key_" in rule:
            assert "{{ $labels.key }}" in rule, f"{name}: a per-key alert should name its key"


def test_alert_rules_use_only_exported_metrics() -> None:
    used = set(METRIC_NAME.findall(RULES.read_text()))
    assert used, "no signd_ metric in the rules?"
    # (descriptions may name a histogram by its family name)
    assert used - exported_series() - set(families()) == set(), "not in prometheus/metrics.txt"


# ---------------------------------------------------------------- the dashboard


def dashboard() -> dict[str, Any]:
    d = json.loads(DASHBOARD.read_text())
    assert isinstance(d, dict)
    return d


def panels(d: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])  # a collapsed row holds its panels


def dashboard_exprs(d: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query on the dashboard."""
    return [(p["title"], t["expr"]) for p in panels(d) for t in p.get("targets", [])]


def variable_queries(d: dict[str, Any]) -> list[str]:
    out = []
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def test_dashboard_is_valid_grafana_json() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 36
    assert d["title"]
    assert d["uid"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for p in panels(d):
        g = p["gridPos"]
        assert 0 <= g["x"] < g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        for t in [p, *p["targets"]]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]


def test_dashboard_uses_exported_metrics_only_and_all_of_them() -> None:
    d = dashboard()
    texts = [e for _, e in dashboard_exprs(d)] + variable_queries(d)
    used = {n for text in texts for n in METRIC_NAME.findall(text)}
    assert used - exported_series() == set(), "not in prometheus/metrics.txt"
    unused = {f.name for f in families().values() if not f.series() & used}
    assert unused == set(), "exported but not on the dashboard"


def test_dashboard_has_the_issues_panels() -> None:
    exprs = [e for _, e in dashboard_exprs(dashboard())]

    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert has(r"sum by \(key\) \(rate\(signd_signatures_total")  # per-key signs/s
    assert has(r"signd_key_signatures_per_second")  # the daemon's window
    for q in ("0.5", "0.99"):
        assert has(rf"histogram_quantile\({q}, .*signd_sign_duration_seconds_bucket")
    assert has(r"signd_token_sign_duration_seconds_bucket")
    assert has(r"sum by \(code, name\) \(rate\(signd_errors_total")
    assert has(r"signd_token_up")
    assert has(r"signd_ready")


# ---------------------------------------------------------------- a real signd


def fetch(url: str, timeout: float = 10.0, token: str | None = None) -> tuple[int, str]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as r:  # loopback only
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert isinstance(port, int)
        return port


METRICS_CONFIG = '[audit]\ndir = "audit"\n\n[metrics]\nlisten = "127.0.0.1:0"\nenabled = true\n'
#: The bearer token that shows the per-key series (``[metrics] token_file``).
TOKEN = secrets.token_hex(16)


def metrics_target(d: Daemon) -> str:
    url = urllib.parse.urlsplit(d.metrics_url())
    assert url.path == "/metrics", url
    assert url.hostname == "127.0.0.1", url
    return url.netloc


def exercise(d: Daemon, key: str) -> None:
    """Traffic that gives most families a sample: signs, verifies, an error, rotations."""
    with d.client() as c:
        c.create_key(key, "ed25519", auto_rotate_period=86400)
        sig = c.sign(key, b"hello").signature
        assert c.verify(key, sig, b"hello").valid
        assert not c.verify(key, sig, b"other").valid
        c.sign_batch(key, [b"a", b"b", b"c"])
        with pytest.raises(KeyNotFound):
            c.sign(key + "-missing", b"x")
        c.rotate(key)
        c.sign(key, b"after rotation")


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \S+)?$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """(family name -> type, samples) of a Prometheus text exposition."""
    types: dict[str, str] = {}
    samples = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            m = SAMPLE.match(line)
            assert m is not None, line
            samples.append((m.group(1), dict(LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return types, samples


@needs_promtool
def test_real_metrics_output_is_clean_and_matches_the_list(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon(METRICS_CONFIG, metrics_token=TOKEN)
    exercise(d, key_name)
    assert fetch(d.metrics_url())[0] == 401  # the token is required
    status, text = fetch(d.metrics_url(), token=TOKEN)
    assert status == 200, text

    out = promtool("check", "metrics", input=text)
    report = f"promtool check metrics:\n{out.stdout}{out.stderr}"
    assert out.returncode == 0, report
    assert not (out.stdout + out.stderr).strip(), report

    types, samples = parse_exposition(text)
    fams = families()
    assert types == {f.name: f.type for f in fams.values()}, "signd's /metrics vs metrics.txt"
    owner = {s: f for f in fams.values() for s in f.series()}
    seen: set[str] = set()
    for name, labels, value in samples:
        f = owner.get(name)
        assert f is not None, f"sample {name} of no listed family"
        want = f.labels | ({"le"} if name.endswith("_bucket") else set())
        assert set(labels) == want, f"{name}{labels}: labels should be {sorted(want)}"
        assert 0 <= value < math.inf, (name, labels, value)
        seen.add(f.name)
    # The traffic above gives a sample to every family but this one, which
    # needs a rate-limit refusal.
    assert set(fams) - seen <= {"signd_rate_limited_total"}, set(fams) - seen

    def value(metric: str, /, **labels: str) -> float:
        found = [v for n, ls, v in samples if n == metric and ls.items() >= labels.items()]
        assert found, (metric, labels)
        return sum(found)

    k = key_name
    assert value("signd_signatures_total", key=k, algorithm="ed25519") == 5  # 1 + 3 + 1
    assert value("signd_sign_requests_total", key=k, version="1", result="ok") == 2
    assert value("signd_sign_requests_total", key=k, version="2", result="ok") == 1
    assert value("signd_verify_requests_total", key=k, result="valid") == 1
    assert value("signd_verify_requests_total", key=k, result="invalid") == 1
    assert value("signd_errors_total", code="300", name="key_not_found", op="sign") == 1
    assert value("signd_rotations_total", key=k, trigger="manual") == 1
    assert value("signd_key_current_version", key=k) == 2
    assert value("signd_key_next_rotation_timestamp_seconds", key=k) > time.time()
    assert value("signd_sign_duration_seconds_count", key=k) == 3
    assert value("signd_sign_duration_seconds_bucket", key=k, le="+Inf") == 3
    assert value("signd_token_up") == 1
    assert value("signd_ready") == 1
    assert value("signd_audit_records_total") >= 8
    assert value("signd_audit_write_failures_total") == 0
    assert value("signd_build_info") == 1


@needs_promtool
def test_metrics_without_a_token_are_clean_and_name_no_key(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon(METRICS_CONFIG)
    exercise(d, key_name)
    status, text = fetch(d.metrics_url())
    assert status == 200, text
    assert key_name not in text
    out = promtool("check", "metrics", input=text)
    assert out.returncode == 0, out.stdout + out.stderr
    types, samples = parse_exposition(text)
    fams = families()
    assert types == {f.name: f.type for f in fams.values()}, "the same families"
    for name, labels, _ in samples:
        if "key" in labels:
            assert labels["key"] == "", (name, labels)
    assert d.stop() == 0


# ---------------------------------------------------------------- a real Prometheus


class Prometheus:
    """Debian's prometheus server on a free loopback port with its own storage."""

    def __init__(self, workdir: Path, target: str, token: str | None = None) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        config = workdir / "prometheus.yml"
        auth = ""
        if token is not None:  # as OPERATIONS.md says: the token in a file only it reads
            credentials = workdir / "signd-metrics.token"
            credentials.write_text(token + "\n")
            credentials.chmod(0o600)
            auth = f"    authorization:\n      credentials_file: {json.dumps(str(credentials))}\n"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            f"rule_files:\n  - {json.dumps(str(RULES))}\n"
            "scrape_configs:\n"
            "  - job_name: signd\n"
            f"{auth}"
            "    static_configs:\n"
            f"      - targets: [{json.dumps(target)}]\n"
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError):
                if fetch(f"{self.base}/-/ready", timeout=2)[0] == 200:
                    return
            time.sleep(0.1)
        pytest.fail(f"prometheus not ready in {timeout}s:\n{self.logs()}")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = fetch(url)
        answer = json.loads(body)
        assert status == 200, (params, answer)
        assert answer["status"] == "success", (params, answer)
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result = data["result"]
        assert isinstance(result, list)
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def prometheus(workdir: Path, target: str, token: str | None = None) -> Iterator[Prometheus]:
    p = Prometheus(workdir, target, token)
    try:
        p.wait_ready()
        yield p
    finally:
        p.stop()


class Load:
    """Clients signing with ``key`` in threads until stopped."""

    def __init__(self, d: Daemon, key: str, threads: int = 4) -> None:
        self.d, self.key = d, key
        self.stopping = threading.Event()
        self.signed = [0] * threads
        self.errors: list[BaseException] = []
        self.last: tuple[bytes, bytes] | None = None
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(threads)]

    def run(self, i: int) -> None:
        try:
            with self.d.client() as c:
                n = 0
                while not self.stopping.is_set():
                    msg = f"load {i} {n}".encode()
                    self.last = (msg, c.sign(self.key, msg).signature)
                    n += 1
                    self.signed[i] = n
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads), "a load thread hangs"


def first_value(result: list[dict[str, Any]]) -> float | None:
    """The value of a single-series answer; None when there is none (or NaN)."""
    if len(result) != 1:
        return None
    v = float(result[0]["value"][1])
    return v if math.isfinite(v) else None


@pytest.mark.slow
@needs_prometheus
def test_real_prometheus_scrapes_signd_under_load(
    make_daemon: Callable[..., Daemon], key_name: str, tmp_path: Path
) -> None:
    d = make_daemon(METRICS_CONFIG, metrics_token=TOKEN)
    with d.client() as c:
        c.create_key(key_name, "ed25519")
        pem = c.public_key(key_name).public_key_pem

    sel = f'{{job="signd",key="{key_name}"}}'

    def quantile(q: float, histogram: str = "signd_sign_duration_seconds", sel: str = sel) -> str:
        return f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{sel}[10s])))"

    seen: dict[str, float] = {}
    with prometheus(tmp_path, metrics_target(d), TOKEN) as prom, Load(d, key_name) as load:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(seen) < 5:
            assert not load.errors, load.errors
            for name, expr in (
                ("rate", f"sum by (key) (rate(signd_signatures_total{sel}[10s]))"),
                ("p50", quantile(0.5)),
                ("p99", quantile(0.99)),
                ("window", f"signd_key_signatures_per_second{sel}"),
                ("token p99", quantile(0.99, "signd_token_sign_duration_seconds", "")),
            ):
                v = first_value(prom.query(expr))
                if v is not None and v > 0:
                    seen[name] = v
            time.sleep(0.5)
        assert set(seen) == {"rate", "p50", "p99", "window", "token p99"}, (
            f"after 90 s of load Prometheus had only {seen}:\n{prom.logs()}\n{d.logs()}"
        )
        signed = sum(load.signed)
        # Sanity, not timing: quantiles are latencies within the buckets, in order.
        assert 0 < seen["p50"] <= seen["p99"] <= 10, seen

        # The scrape target is healthy, under the job name the rules expect.
        targets = prom.api("targets")["activeTargets"]
        assert [(t["labels"]["job"], t["health"]) for t in targets] == [("signd", "up")], targets
        assert first_value(prom.query('up{job="signd"}')) == 1

        # The alert rules evaluate against the real series without an error.
        health: dict[str, str] = {}
        rules_deadline = time.monotonic() + 30
        while time.monotonic() < rules_deadline:
            groups = prom.api("rules")["groups"]
            health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
            if health and all(h != "unknown" for h in health.values()):
                break
            time.sleep(0.5)
        assert health == dict.fromkeys(alert_names(), "ok"), health

        # Every dashboard query is valid PromQL for the real server, and the
        # per-key panels find this key.
        for title, expr in dashboard_exprs(dashboard()):
            concrete = (
                expr.replace("$__rate_interval", "10s")
                .replace("$__range", "1m")
                .replace('"$instance"', '".+"')
                .replace('"$key"', json.dumps(key_name))
            )
            result = prom.query(concrete)
            if "signd_signatures_total" in expr and "by (key)" in expr:
                assert [r["metric"]["key"] for r in result] == [key_name], (title, result)

    assert not load.errors, load.errors
    assert signed > 0
    # The load was real signing: a signature checks out with an independent verifier.
    assert load.last is not None
    msg, sig = load.last
    public = serialization.load_pem_public_key(pem.encode())
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(sig, msg)
