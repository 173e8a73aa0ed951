"""The soak test's report: its verdict, the JSON and the table (see
:mod:`signd_bench.soak`)."""

from __future__ import annotations

import os
import resource
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._measure import percentile
from .soak_load import (
    Sample,
    Soak,
)
from .soak_specs import (
    WEIGHTS,
)

# ------------------------------------------------------------ the report


@dataclass
class SoakReport:
    data: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.data["passed"])


def _rss_summary(samples: Sequence[Sample], warmup: float, attr: str) -> dict[str, Any] | None:
    if not samples:
        return None
    after = [s for s in samples if s.t >= warmup] or list(samples[-1:])
    values = [getattr(s, attr) for s in after]
    baseline, end = values[0], values[-1]
    return {
        "baseline_mb": round(baseline, 2),
        "baseline_at_s": round(after[0].t, 1),
        "max_mb": round(max(values), 2),
        "end_mb": round(end, 2),
        "growth_mb": round(end - baseline, 2),
    }


def _ms(values: Sequence[float], q: float) -> float | None:
    v = percentile(values, q)
    return None if v is None else round(v * 1e3, 2)


def build_report(
    soak: Soak, *, rss_bound: float, daemon: str, log_errors: list[str] | None
) -> SoakReport:
    st = soak.stats
    total = sum(st.requests.values())
    errors = sum(st.errors.values())
    ops: dict[str, dict[str, Any]] = {}
    all_lat: list[float] = []
    for op in (*WEIGHTS, "rotate"):
        lat = st.latencies.get(op, array("d"))
        all_lat.extend(lat)
        ops[op] = {
            "requests": st.requests[op],
            "errors": sum(n for k, n in st.errors.items() if k.split(":")[0] == op),
            "p50_ms": _ms(lat, 50),
            "p99_ms": _ms(lat, 99),
        }
    main_rss = _rss_summary(soak.samples, soak.warmup, "rss_mb")
    workers_rss = _rss_summary(soak.samples, soak.warmup, "workers_rss_mb")
    fds = [s.fds for s in soak.samples if s.fds is not None and s.t >= soak.warmup]
    failures: list[str] = []
    if errors:
        failures.append(f"{errors} errors")
    if st.wrong:
        failures.append(f"{st.wrong} wrong answers")
    if st.bad_signatures:
        failures.append(f"{st.bad_signatures} signatures did not verify")
    if st.held != soak.connections:
        failures.append(f"{st.held} of {soak.connections} connections held")
    if main_rss is None or workers_rss is None:
        failures.append("RSS not measured (no daemon pid)")
    else:
        for who, rss in (("daemon", main_rss), ("token workers", workers_rss)):
            if rss["growth_mb"] >= rss_bound:
                failures.append(f"{who} RSS grew {rss['growth_mb']:+.1f} MB")
    if log_errors:
        failures.append(f"the daemon logged {len(log_errors)} errors")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    data: dict[str, Any] = {
        "passed": not failures,
        "failures": failures,
        "daemon": daemon,
        "pid": soak.pid,
        "connections": soak.connections,
        "duration_s": soak.duration,
        "elapsed_s": round(soak.elapsed, 1),
        "think_s": soak.think,
        "check_every": soak.check_every,
        "rotate_every_s": soak.rotate_every,
        "ops_mix": soak.ops,
        "key_types": soak.key_types,
        "seed": soak.seed,
        "cpus": os.cpu_count(),
        "connected": st.connected,
        "held": st.held,
        "reconnects": st.reconnects,
        "requests": total,
        "throughput_per_s": round(total / soak.elapsed, 1) if soak.elapsed else 0.0,
        "p50_ms": _ms(all_lat, 50),
        "p99_ms": _ms(all_lat, 99),
        "ops": ops,
        "errors": errors,
        "error_kinds": dict(st.errors),
        "signatures": st.signatures,
        "signatures_per_s": round(st.signatures / soak.elapsed, 1) if soak.elapsed else 0.0,
        "checked": st.checked,
        "bad_signatures": st.bad_signatures,
        "verify_valid": st.verify_valid,
        "verify_invalid": st.verify_invalid,
        "wrong_answers": st.wrong,
        "rotations": st.rotations,
        "examples": st.examples,
        "keys": [{"name": k.name, "type": k.type, "versions": len(k.publics)} for k in soak.keys],
        "rss_bound_mb": rss_bound,
        "warmup_s": soak.warmup,
        "rss": main_rss,
        "workers_rss": workers_rss,
        "fds": None
        if not fds
        else {"baseline": fds[0], "max": max(fds), "end": fds[-1], "growth": fds[-1] - fds[0]},
        "samples": [
            {
                "t": round(s.t, 1),
                "rss_mb": round(s.rss_mb, 2),
                "workers_rss_mb": round(s.workers_rss_mb, 2),
                "workers": s.workers,
                "fds": s.fds,
            }
            for s in soak.samples
        ],
        "daemon_cpu_s": None if soak.daemon_cpu is None else round(soak.daemon_cpu, 1),
        "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "daemon_log_errors": log_errors,
    }
    return SoakReport(data)


def table(report: SoakReport) -> str:
    d = report.data

    def num(v: float | None, digits: int = 1) -> str:
        return "-" if v is None else f"{v:,.{digits}f}"

    lines = [
        f"signd soak: {d['connections']} connections held for {d['elapsed_s']:.0f} s, "
        f"mixed operations; {d['daemon']}",
        "",
        "| operation | requests | errors | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for op, o in d["ops"].items():
        lines.append(
            f"| {op} | {o['requests']:,} | {o['errors']} | {num(o['p50_ms'], 2)} | "
            f"{num(o['p99_ms'], 2)} |"
        )
    lines.append(
        f"| all | {d['requests']:,} ({d['throughput_per_s']:,.0f}/s) | {d['errors']} | "
        f"{num(d['p50_ms'], 2)} | {num(d['p99_ms'], 2)} |"
    )
    sampled = "every signature" if d["check_every"] == 1 else f"1 request in {d['check_every']}"
    rows = [
        (
            "connections",
            f"{d['held']} of {d['connections']} held for the whole run "
            f"({d['reconnects']} reconnects)",
        ),
        (
            "signatures checked with cryptography",
            f"{d['checked']:,} of {d['signatures']:,} ({sampled}), {d['bad_signatures']} bad; "
            f"{d['signatures_per_s']:,.0f} signatures/s",
        ),
        (
            "verify answers",
            f"{d['verify_valid']:,} valid, {d['verify_invalid']:,} deliberately invalid "
            f"(valid=false); {d['wrong_answers']} wrong answers in all",
        ),
        ("rotations", f"{d['rotations']} of key {d['keys'][-1]['name'] if d['keys'] else '-'}"),
    ]
    for label, key in (("daemon RSS", "rss"), ("token workers RSS", "workers_rss")):
        r = d[key]
        if r is None:
            rows.append((label, "not measured"))
            continue
        if key == "workers_rss" and d["samples"]:
            label = f"{label} ({d['samples'][-1]['workers']} processes)"
        elif d["pid"] is not None:
            label = f"{label} (pid {d['pid']})"
        rows.append(
            (
                label,
                f"baseline {r['baseline_mb']:.1f} MB (at {r['baseline_at_s']:.0f} s), "
                f"max {r['max_mb']:.1f}, end {r['end_mb']:.1f}, growth {r['growth_mb']:+.1f} MB "
                f"(bound {d['rss_bound_mb']:g} MB); {len(d['samples'])} samples",
            )
        )
    if d["fds"] is not None:
        f = d["fds"]
        rows.append(
            (
                "daemon open descriptors",
                f"baseline {f['baseline']:,}, max {f['max']:,}, end {f['end']:,}",
            )
        )
    rows.append(
        (
            "CPU seconds",
            f"daemon and workers {num(d['daemon_cpu_s'])}, soak client {num(d['client_cpu_s'])} "
            f"({d['cpus']} CPUs)",
        )
    )
    if d["daemon_log_errors"] is not None:
        rows.append(("daemon log", f"{len(d['daemon_log_errors'])} error lines"))
    verdict = "PASS" if d["passed"] else "FAIL: " + "; ".join(d["failures"])
    rows.append(("result", verdict))
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)
