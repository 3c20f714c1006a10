"""Ramp mode: raise the number of streams until a target breaks; the largest K that held is the result.

Why a ramp and not one big run: capacity is the knee where drops, blanking, latency or leaks
start, and only a sweep finds it. A point holds when, in its window, no frame was dropped or
blanked, every stream delivered at least 97% of the camera rate, p99 glass-to-glass latency
stayed under the bound, and no ground-truth object was visible (over the whole run). The first
point that breaks ends that mode's ramp. Baselines run in the same invocation on the same
machine: the transcode-only ceiling (no detection) and batching off (max_batch 1), so figures
are ratios that carry over to other machines. With several ``--workers`` values each mode is
ramped once per value, and the ratios add how much N worker processes deliver against one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from stream.loadtest.driver import Progress, RunSpec, run_point
from stream.loadtest.report import workers_of
from stream.loadtest.scene import Material


def ramp(base: RunSpec, ks: list[int], material: Material, progress: Progress) -> dict[str, Any]:
    """Run `base` at each K in order until a point does not hold."""
    points: list[dict[str, Any]] = []
    best = 0
    for k in ks:
        spec = dataclasses.replace(base, streams=k)
        progress(f"[{spec.label}] K={k}")
        try:
            p = run_point(spec, material, progress)
        except RuntimeError as e:  # a point that could not even start has not held
            progress(f"[{spec.label}] K={k} failed: {e}")
            points.append({"mode": spec.mode, "workers": spec.workers, "k": k, "size": spec.size,
                           "held": False, "broke_on": [f"error: {str(e).splitlines()[0]}"],
                           "error": str(e)[-2000:]})
            break
        points.append(p)
        verdict = "held" if p["held"] else "broke: " + ", ".join(p["broke_on"])
        progress(f"[{spec.label}] K={k} {verdict}")
        if not p["held"]:
            break
        best = k
    workers = workers_of(points[0]) if points else base.workers  # a remote deployment: as measured
    return {"size": base.size, "mode": base.mode, "workers": workers, "largest_k_held": best,
            "points": points, "largest_k_by_p99_bound_ms": by_latency_bound(points)}


def by_latency_bound(points: list[dict[str, Any]], bounds: tuple[float, ...] = (100, 200, 500, 1000)
                     ) -> dict[str, int]:
    """Largest K held under each tighter p99 bound too (every other target unchanged): one ramp,
    run at a loose bound, answers "how many streams at 200 ms?" and "at 500 ms?" alike."""
    out = {}
    for bound in bounds:
        best = 0
        for p in points:
            if not p.get("held") or p["latency_ms"]["p99"] is None or p["latency_ms"]["p99"] >= bound:
                break
            best = p["k"]
        out[f"{bound:g}"] = best
    return out


def throughput(run: dict[str, Any]) -> float:
    """Most frames per second a run delivered over all streams at any of its points."""
    return max((p["k"] * p["delivered_fps_mean"] for p in run["points"] if "delivered_fps_mean" in p),
               default=0.0)


def _ratio(by: dict[str, dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    if a not in by or b not in by:
        return None
    return _compare(by[a], by[b])


def _compare(run_a: dict[str, Any], run_b: dict[str, Any]) -> dict[str, Any]:
    ka, kb = run_a["largest_k_held"], run_b["largest_k_held"]
    ta, tb = throughput(run_a), throughput(run_b)
    return {"largest_k": f"{ka}/{kb}", "throughput_fps": f"{ta:.1f}/{tb:.1f}",
            "throughput_ratio": round(ta / tb, 2) if tb else None}


def ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per size and worker count: batched vs unbatched and redaction vs transcode ceiling, by largest
    K and throughput; per size, each mode with N workers against the same mode with 1.

    Keyed by size (``640x360``) for one worker, as reports before the workers axis were, and
    ``640x360 workers=N`` for N."""
    out: dict[str, dict[str, Any]] = {}
    pairs = {"batched_vs_unbatched": ("redact", "redact-b1"),
             "redact_vs_transcode": ("redact", "transcode"),
             "faces_vs_transcode": ("redact-faces", "transcode"),
             "faces_batched_vs_unbatched": ("redact-faces", "redact-faces-b1")}
    for size, w in sorted({(r["size"], workers_of(r)) for r in runs}):
        by = {r["mode"]: r for r in runs if r["size"] == size and workers_of(r) == w}
        row = {name: r for name, (a, b) in pairs.items() if (r := _ratio(by, a, b)) is not None}
        if w != 1:
            ones = {r["mode"]: r for r in runs if r["size"] == size and workers_of(r) == 1}
            row.update({f"{mode}_workers_{w}_vs_1": _compare(run, ones[mode])
                        for mode, run in by.items() if mode in ones})
        out[size if w == 1 else f"{size} workers={w}"] = row
    return out
