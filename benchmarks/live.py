"""Live pipeline load test: K simulated RTSP cameras through `stream-redact run`, ramped until it breaks.

For each mode and resolution, K real RTSP cameras (GStreamer's RTSP server serving a real H.264
clip at 25 fps, looping) are pulled by one pipeline process, which pushes every redacted stream
to a real RTSP relay. After a warm-up, the pipeline's own /metrics are read at the start and end
of a measurement window; the deltas give, per stream, frames in / published / dropped / blanked
and the capture-to-publish latency distribution; /proc gives the pipeline's CPU and RSS.

Modes (each a ratio on the same machine, in the same run):
- ``transcode``: decode + re-encode with no detection (the ceiling; a benchmark-only worker);
- ``redact``: `stream-redact run` with the configured preset, batching on;
- ``redact-b1``: the same with ``max_batch: 1``;
- ``redact-faces``: faces only (no plate or person detector), the cheapest redaction there is.

A K "holds" when, in the window, no frame was dropped or blanked and every stream published at
least 97% of the camera's frame rate. Run: ``.venv/bin/python benchmarks/live.py`` (see --help).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.loadtest.probe import bucket_quantile  # noqa: E402
from stream.sim.server import RtspServer, transcode_clip  # noqa: E402

SAMPLE = ROOT / ".samples" / "talking-face"
SOURCE = SAMPLE / "WolfgangLanger_Pexels.mp4"  # `python -m stream.samples fetch` (deploy/setup.sh)
SIZES = ("640x360", "1280x720")
MODES = ("transcode", "redact", "redact-b1", "redact-faces")

WORKER = """
import asyncio, sys
from stream.config import load_config
from stream.core.detections import Detections
from stream.live.service import serve

def no_detection():  # transcode ceiling only: looks at nothing, so the frame goes out unchanged
    return lambda images, seqs=None: [Detections(observed=frozenset()) for _ in images]

sys.exit(asyncio.run(serve(load_config(__import__("pathlib").Path(sys.argv[1])), no_detection)))
"""


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text format -> {(name, labels): value} (enough of the format for our own output)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def total(snap: dict, name: str, **want: str) -> float:
    return sum(v for (n, labels), v in snap.items()
               if n == name and all((k, w) in labels for k, w in want.items()))


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Upper-bound estimate from cumulative (le, count) pairs, interpolated inside the bucket."""
    return bucket_quantile(buckets, q)


def latency_buckets(a: dict, b: dict, stream: str | None = None) -> list[tuple[float, float]]:
    acc: dict[float, float] = {}
    for (n, labels), v in b.items():
        if n != "stream_redact_latency_seconds_bucket":
            continue
        d = dict(labels)
        if stream is not None and d.get("stream") != stream:
            continue
        le = float(d["le"])
        acc[le] = acc.get(le, 0.0) + v - a.get((n, labels), 0.0)
    return sorted(acc.items())


def proc_cpu_rss(pid: int) -> tuple[float, int]:
    """CPU seconds (user+sys, children included) and RSS bytes of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    cpu = sum(int(x) for x in fields[11:15]) / tick
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def run_point(mode: str, k: int, clip: Path, args: argparse.Namespace, work: Path) -> dict:
    paths = {f"/cam{i}": clip for i in range(k)}
    with RtspServer(cameras=paths, relays=[f"/out{i}" for i in range(k)]) as server:
        doc = {
            "streams": [{"id": f"cam{i}", "source": {"type": "rtsp", "url": server.url(f"/cam{i}")},
                         "outputs": [{"type": "rtsp", "url": server.url(f"/out{i}")}]} for i in range(k)],
            "batcher": {"max_batch": 1 if mode == "redact-b1" else args.max_batch,
                        "max_wait_ms": args.max_wait_ms},
            "detection": {"preset": args.preset, "providers": ["cpu"],
                          **({"plates": False, "heads": False} if mode == "redact-faces" else {})},
            "http": {"port": 0},
        }
        cfg = work / f"{mode}-{k}.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        if mode == "transcode":
            cmd = [sys.executable, "-c", WORKER, str(cfg)]
        else:
            cmd = [str(Path(sys.executable).parent / "stream-redact"), "run", "--config", str(cfg)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            url = None
            assert proc.stderr is not None
            for line in proc.stderr:
                if "metrics at http://" in line:
                    url = line.split("metrics at ")[1].split(",")[0]
                    break
            if url is None:
                raise RuntimeError(f"{mode} K={k}: pipeline did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(args.warmup)  # benchmark pacing, not synchronisation
            a, (cpu_a, _) = scrape(url), proc_cpu_rss(proc.pid)
            srv_a = proc_cpu_rss(server.pid)[0] if getattr(server, "pid", None) else 0.0
            t_a = time.monotonic()
            time.sleep(args.window)
            b, (cpu_b, rss) = scrape(url), proc_cpu_rss(proc.pid)
            srv_b = proc_cpu_rss(server.pid)[0] if getattr(server, "pid", None) else 0.0
            dt = time.monotonic() - t_a
        finally:
            proc.terminate()
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    streams = []
    for i in range(k):
        sid = f"cam{i}"

        def d(name: str, sid: str = sid, **lab: str) -> float:
            return total(b, name, stream=sid, **lab) - total(a, name, stream=sid, **lab)

        lat = latency_buckets(a, b, sid)
        streams.append({
            "stream": sid,
            "in_fps": d("stream_redact_frames_in_total") / dt,
            "published_fps": d("stream_redact_frames_published_total") / dt,
            "dropped": d("stream_redact_frames_dropped_total"),
            "blanked": d("stream_redact_frames_blanked_total"),
            "latency_p50_ms": (quantile(lat, 0.5) or 0) * 1000,
            "latency_p99_ms": (quantile(lat, 0.99) or 0) * 1000,
        })
    lat_all = latency_buckets(a, b)
    batches = total(b, "stream_redact_batch_size_count") - total(a, "stream_redact_batch_size_count")
    frames = total(b, "stream_redact_batch_size_sum") - total(a, "stream_redact_batch_size_sum")
    point = {
        "mode": mode, "k": k, "window_s": round(dt, 2),
        "published_fps_min": min(s["published_fps"] for s in streams),
        "dropped": sum(s["dropped"] for s in streams), "blanked": sum(s["blanked"] for s in streams),
        "latency_p50_ms": (quantile(lat_all, 0.5) or 0) * 1000,
        "latency_p99_ms": (quantile(lat_all, 0.99) or 0) * 1000,
        "mean_batch": frames / batches if batches else None,
        "pipeline_cpu_cores": (cpu_b - cpu_a) / dt, "pipeline_rss_mb": rss / 2**20,
        "server_cpu_cores": (srv_b - srv_a) / dt,
        "streams": streams,
    }
    point["held"] = (point["dropped"] == 0 and point["blanked"] == 0
                     and point["published_fps_min"] >= 0.97 * args.fps)
    return point


def ramp(mode: str, clip: Path, args: argparse.Namespace, work: Path) -> tuple[int, list[dict]]:
    best, points = 0, []
    for k in args.ks:
        p = run_point(mode, k, clip, args, work)
        points.append(p)
        print(f"  {mode:10s} K={k:<3d} held={'yes' if p['held'] else 'no ':3s} "
              f"min fps {p['published_fps_min']:5.1f}  dropped {p['dropped']:5.0f}  "
              f"blanked {p['blanked']:4.0f}  "
              f"p50 {p['latency_p50_ms']:6.1f} ms  p99 {p['latency_p99_ms']:6.1f} ms  "
              f"cpu {p['pipeline_cpu_cores']:.2f}  rss {p['pipeline_rss_mb']:.0f} MB", flush=True)
        if not p["held"]:
            break
        best = k
    return best, points


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 10, 12, 16])
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--preset", default="fast", choices=["fast", "accurate"])
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=6.0, help="seconds before the window opens")
    ap.add_argument("--window", type=float, default=12.0, help="seconds measured per point")
    ap.add_argument("--work", type=Path, default=Path("/tmp/stream-redact-bench"))
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "live.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version()},
                     "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "runs": []}
    for size in args.sizes:
        w, h = (int(x) for x in size.split("x"))
        clip = transcode_clip(SOURCE, args.work / f"cam_{size}_{args.fps}.mp4", w, h, args.fps,
                              max_seconds=10)
        print(f"{size} @ {args.fps} fps ({clip.name})", flush=True)
        for mode in args.modes:
            best, points = ramp(mode, clip, args, args.work)
            results["runs"].append({"size": size, "mode": mode, "largest_k_held": best, "points": points})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print("\n| size | mode | largest K held | p50 / p99 latency at that K (ms) | CPU cores | RSS MB |")
    print("|---|---|---|---|---|---|")
    for run in results["runs"]:
        held = [p for p in run["points"] if p["held"]]
        p = held[-1] if held else run["points"][0]
        print(f"| {run['size']} | {run['mode']} | {run['largest_k_held']} | "
              f"{p['latency_p50_ms']:.0f} / {p['latency_p99_ms']:.0f} | {p['pipeline_cpu_cores']:.2f} | "
              f"{p['pipeline_rss_mb']:.0f} |")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
