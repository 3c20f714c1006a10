"""Reading a running pipeline from outside: Prometheus /metrics, /proc CPU and RSS, GPU use.

Why outside: the harness must measure the product as deployed, so it uses the same interfaces
an operator has (the metrics endpoint; the process table for a local process; nvidia-smi where a
GPU is present) and no hooks inside the pipeline.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout: float = 10.0) -> Snapshot:
    """Prometheus text format -> {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    out: Snapshot = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def total(snap: Snapshot, name: str, **want: str) -> float:
    """Sum of a metric over every label set that has the wanted labels."""
    return sum(v for (n, labels), v in snap.items()
               if n == name and all((k, w) in labels for k, w in want.items()))


def delta(a: Snapshot, b: Snapshot, name: str, **want: str) -> float:
    return total(b, name, **want) - total(a, name, **want)


def histogram_quantile(a: Snapshot, b: Snapshot, name: str, q: float) -> float | None:
    """Quantile of a Prometheus histogram's increase between two snapshots (interpolated in its bucket)."""
    acc: dict[float, float] = {}
    for (n, labels), v in b.items():
        if n == name + "_bucket":
            le = float(dict(labels)["le"])
            acc[le] = acc.get(le, 0.0) + v - a.get((n, labels), 0.0)
    return bucket_quantile(sorted(acc.items()), q)


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Quantile from cumulative (le, count) pairs, interpolated inside its bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    target = q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= target:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((target - prev_c) / (c - prev_c) if c > prev_c else 1.0)
        prev_le, prev_c = le, c
    return None


def system_busy_cpu() -> float:
    """CPU seconds all processes of the machine have used (from /proc/stat): shows who else is busy."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def proc_cpu_rss(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system, reaped children included) and RSS bytes of a local process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return cpu, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def self_cpu() -> float:
    """CPU seconds of this process (the harness: cameras, readers, checks)."""
    t = os.times()
    return t.user + t.system


class GpuSampler:
    """Samples GPU utilisation and memory once a second through nvidia-smi; absent GPU: no samples."""

    def __init__(self) -> None:
        self.available = shutil.which("nvidia-smi") is not None
        self.samples: list[tuple[float, float]] = []  # (utilisation %, memory MiB), summed over GPUs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="gpu-sampler")

    def start(self) -> None:
        if self.available:
            self._thread.start()

    def stop(self) -> dict | None:
        """Mean utilisation and peak memory, or None without a GPU."""
        self._stop.set()
        if self.available:
            self._thread.join(5)
        if not self.samples:
            return None
        return {"util_percent_mean": round(sum(u for u, _ in self.samples) / len(self.samples), 1),
                "memory_mib_max": max(m for _, m in self.samples), "samples": len(self.samples)}

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                     "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5, check=True).stdout
                rows = [[float(v) for v in line.split(",")] for line in out.strip().splitlines() if line]
                self.samples.append((sum(r[0] for r in rows), sum(r[1] for r in rows)))
            except (OSError, subprocess.SubprocessError, ValueError):
                return
