"""What every benchmark row measures, and how.

A row is one path to a signature (in-process python-pkcs11, signd over N
connections, a peer such as p11-kit's server): its rate, the latency
percentiles its clients saw, and what the *server side* cost: CPU seconds and
peak RSS of the processes that did the serving (for in-process rows, none).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ProcessUsage",
    "Row",
    "percentile",
    "process_tree",
    "reset_peak_rss",
    "usage_of",
]


@dataclass
class Row:
    name: str
    key_type: str
    operations: int
    seconds: float
    #: client-seen latencies of single requests, in seconds (a sample is fine)
    latencies: list[float] = field(default_factory=list, repr=False)
    server_cpu: float | None = None
    server_peak_rss_mb: float | None = None
    ratio: float | None = None
    note: str = ""

    @property
    def rate(self) -> float:
        return self.operations / self.seconds if self.seconds > 0 else 0.0

    def p(self, q: float) -> float | None:
        return percentile(self.latencies, q)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["latencies"]
        out["rate"] = self.rate
        out["p50_us"] = _us(self.p(50))
        out["p99_us"] = _us(self.p(99))
        out["samples"] = len(self.latencies)
        return out


def _us(v: float | None) -> float | None:
    return None if v is None else round(v * 1e6, 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


@dataclass
class ProcessUsage:
    """CPU seconds and peak RSS of a set of processes, from /proc."""

    cpu: float
    peak_rss_mb: float


def _proc_stat(pid: int) -> tuple[float, float] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            hwm = next((ln for ln in f if ln.startswith("VmHWM:")), "VmHWM: 0 kB")
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return cpu, int(hwm.split()[1]) / 1024


def usage_of(pids: Iterable[int]) -> ProcessUsage:
    """Sum of CPU seconds and of peak RSS (VmHWM) over ``pids`` right now."""
    cpu = rss = 0.0
    for pid in pids:
        st = _proc_stat(pid)
        if st is not None:
            cpu += st[0]
            rss += st[1]
    return ProcessUsage(cpu, rss)


def reset_peak_rss(pids: Iterable[int]) -> None:
    """Start each process's VmHWM afresh (Linux: ``5 > /proc/PID/clear_refs``)."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (e.g. signd and its token workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out
