"""Reading a running pipeline from outside: Prometheus /metrics, /proc CPU and RSS, GPU use.

Why outside: the harness must measure the product as deployed, so it uses the same interfaces
an operator has (the metrics endpoint; the process table for a local process; nvidia-smi where a
GPU is present) and no hooks inside the pipeline.

A pipeline of several processes (``run --workers N``) serves one /metrics in which every child's
samples carry a ``worker`` label (``worker-0``..., ``detector`` for the detection stage). Counters
and histograms are therefore summed series by series, and a restarted child's counters, which
start again from 0, count from there; gauges are never summed across children (:func:`gauge`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout: float = 10.0) -> Snapshot:
    """The metrics at ``url`` (see :func:`parse`)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return parse(r.read().decode())


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)(?: -?\d+)?$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(.)")


def _unescape(value: str) -> str:
    return _ESCAPE.sub(lambda m: "\n" if m[1] == "n" else m[1], value)


def parse(text: str) -> Snapshot:
    """Prometheus text format -> {(name, sorted labels): value}."""
    out: Snapshot = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            labels = tuple(sorted((k, _unescape(v)) for k, v in _LABEL.findall(m.group(2) or "")))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def _matches(labels: tuple[tuple[str, str], ...], want: dict[str, str]) -> bool:
    return all((k, w) in labels for k, w in want.items())


def total(snap: Snapshot, name: str, **want: str) -> float:
    """Sum of a counter over every label set that has the wanted labels (every process's share)."""
    return sum(v for (n, labels), v in snap.items() if n == name and _matches(labels, want))


def _increase(a: Snapshot, key: tuple[str, tuple[tuple[str, str], ...]], now: float) -> float:
    """A counter series' increase since ``a``; lower than before means its process started again
    (counting from 0), so all of ``now`` is new."""
    before = a.get(key, 0.0)
    return now - before if now >= before else now


def delta(a: Snapshot, b: Snapshot, name: str, **want: str) -> float:
    """Increase of a counter between two snapshots, summed series by series: a child process that
    restarted in between adds what it counted since, not a negative jump; a series missing from
    ``b`` (a child whose scrape failed) adds nothing."""
    return sum(_increase(a, key, v) for key, v in b.items() if key[0] == name and _matches(key[1], want))


def gauge(snap: Snapshot, name: str, how: Callable[[list[float]], float] = min, **want: str) -> float | None:
    """A gauge over the series that have the wanted labels, combined by ``how`` (default the lowest:
    for an up/down gauge, 1 only when every process says up), never summed: ``detector_up`` is 1
    in the detection stage and in each worker that reaches it. None when absent."""
    values = [v for (n, labels), v in snap.items() if n == name and _matches(labels, want)]
    return how(values) if values else None


def label_values(snap: Snapshot, label: str) -> list[str]:
    """Every value a label takes in a snapshot, sorted (``worker``: the processes that answered)."""
    return sorted({v for (_n, labels), _v in snap.items() for k, v in labels if k == label})


def histogram_quantile(a: Snapshot, b: Snapshot, name: str, q: float) -> float | None:
    """Quantile of a Prometheus histogram's increase between two snapshots (interpolated in its
    bucket), the buckets of every series (stream, process) added up."""
    acc: dict[float, float] = {}
    for key, v in b.items():
        if key[0] == name + "_bucket":
            le = float(dict(key[1])["le"])
            acc[le] = acc.get(le, 0.0) + _increase(a, key, v)
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


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_rss(pid: int) -> tuple[float, int, int]:
    """CPU seconds, RSS bytes and process count of a local process and all its descendants.

    Why the tree: ``run --workers N`` does its work in child processes that live as long as it
    does, and a parent's /proc counts a child's CPU only once it has exited and been reaped."""
    cpu, rss, n = 0.0, 0, 0
    for p in descendants(pid):
        try:
            c, r = proc_cpu_rss(p)
        except (OSError, IndexError, ValueError):  # exited between the listing and the read
            continue
        cpu, rss, n = cpu + c, rss + r, n + 1
    return cpu, rss, n


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
