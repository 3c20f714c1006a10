"""One load-test point: K synthetic cameras through a pipeline, outputs read back and measured.

Why this shape: every figure is measured from outside the pipeline, through the interfaces a
deployment has (RTSP in and out, /metrics, the control API, the events file), so the same run
works against a local process started here or a remote deployment (``api`` set). Locally the
built-in relay (GStreamer's RTSP server, ``stream.sim``) stands in for the media server: the
cameras publish to ``/lt-cam<i>``, the pipeline pulls from there and publishes to
``/lt-out<i>``, and the readers pull that. With ``media`` set an existing media server
(e.g. MediaMTX) is used instead, so a remote pipeline can reach the cameras.

A point measures a window after the first stamped frame of every stream and a warm-up; leaks
count over the whole run (one leaked frame in the warm-up is still a leak).

``workers`` runs the local pipeline as ``run --workers N`` (N stream processes and one detection
stage); 1 is the single-process service. The pipeline's CPU and memory are those of its whole
process tree, and its events are read from every worker's file.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from stream.core.frames import Drop
from stream.loadtest import probe
from stream.loadtest.camera import SyntheticCamera
from stream.loadtest.reader import Check, OutputReader, Received
from stream.loadtest.scene import Material, Scene
from stream.loadtest.tracks import completeness, read_track_events

MODES = ("redact", "redact-b1", "redact-faces", "redact-faces-b1", "transcode", "no-redact")
"""redact: the preset, batching on; redact-b1: max_batch 1; redact-faces(-b1): faces only;
transcode: no detection (the ceiling; leaks not judged); no-redact: no detection, leaks judged
(proves the leak check can fail)"""
NO_DETECTION = ("transcode", "no-redact")
"""modes run by the baseline worker of a source checkout, never by anything installed"""
BASELINE_WORKER = Path("benchmarks") / "baseline_worker.py"
CHECKOUT = Path(__file__).resolve().parents[2]
"""the source checkout this package runs from, when it runs from one (else site-packages)"""
FAST_RECONNECT = {"initial_s": 0.2, "max_s": 1.0, "jitter": 0.1}
HELD_FPS_SHARE = 0.97
MAX_WORKERS = 256
"""as PipelineConfig.workers allows"""

Progress = Callable[[str], None]


@dataclass
class RunSpec:
    """What one point runs: K streams of a size, rate and bitrate, through a pipeline in a mode."""

    streams: int
    width: int = 640
    height: int = 360
    fps: float = 25.0
    bitrate_kbps: int = 1500
    duration_s: float = 10.0
    warmup_s: float = 3.0
    mode: str = "redact"
    preset: str = "fast"
    max_batch: int | None = None
    """``batcher.max_batch``; None: the pipeline's own (8 on a GPU, one per CPU lane)"""
    max_wait_ms: float = 10.0
    queue_size: int | None = None
    """frames waiting per stream (``queue_size``); None: the pipeline's own"""
    threads: int = 0
    """ONNX Runtime threads per model session (``detection.threads``; 0: cores / lanes)"""
    lanes: int = 0
    """CPU model runs side by side (``detection.lanes``; 0: the pipeline's own choice)"""
    skip_unchanged: bool = False
    """``detection.skip_unchanged``: models look again only where the picture changed"""
    plate_every: int | None = None
    """``detection.plate_every``; None: the preset's"""
    person_every: int | None = None
    """``detection.person_every``; None: the preset's"""
    latency_bound_ms: float = 200.0
    faces: int = 2
    plates: int = 1
    appearing: bool = False
    """objects vanish and come back whole mid-frame (``scene.APPEARING``): their first frames count"""
    register: str = "config"  # config | api (local); remote deployments always use the API
    api: str | None = None
    token_env: str | None = None
    media: str | None = None
    metrics_url: str | None = None
    start_timeout_s: float = 90.0
    judge: tuple[str, ...] | None = None  # classes the pipeline redacts (None: from the mode)
    baseline_worker: Path | None = None  # for NO_DETECTION modes (None: the checkout's)
    workers: int = 1  # stream worker processes of the local pipeline (1: one process)
    work: Path = field(default_factory=lambda: Path("/tmp/stream-redact-bench"))

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.streams < 1 or self.streams > 255:
            raise ValueError(f"streams must be 1..255, got {self.streams}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1..{MAX_WORKERS}, got {self.workers}")
        if self.api and self.workers != 1:
            raise ValueError("workers applies to a local pipeline; a remote deployment runs with the "
                             "workers it was deployed with")
        if self.api and self.mode in NO_DETECTION:
            raise ValueError(f"mode {self.mode} needs a local pipeline; a remote deployment runs as deployed")
        if self.api and not self.media:
            raise ValueError("a remote deployment (--api) needs a media server both sides reach (--media)")

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def label(self) -> str:
        """How progress lines name the point's series: mode, size and worker processes."""
        return f"{self.mode} {self.size} workers={self.workers}"


class NoBaselineWorker(RuntimeError):
    """A no-detection mode was asked for where there is no baseline worker to run it."""


def find_baseline_worker(given: Path | None = None, checkout: Path = CHECKOUT) -> Path:
    """The no-detection worker of the transcode and no-redact modes: ``given``, else
    ``benchmarks/baseline_worker.py`` of the source checkout this package runs from.

    It publishes every frame unredacted, so it is not part of the installed package: an installed
    stream-redact has no way of its own to run a pipeline without detection."""
    if given is not None:
        if not given.is_file():
            raise NoBaselineWorker(f"--baseline-worker {given}: no such file; give the path of "
                                   f"{BASELINE_WORKER} in a stream-redact source checkout")
        return given
    found = checkout / BASELINE_WORKER
    if (checkout / "pyproject.toml").is_file() and found.is_file():
        return found
    raise NoBaselineWorker(f"modes {' and '.join(NO_DETECTION)} run {BASELINE_WORKER}, a pipeline without "
                           "detection that is not installed with stream-redact, and this stream-redact does "
                           "not run from a source checkout; run bench from a checkout, pass "
                           "--baseline-worker PATH, or leave these modes out (--modes redact ...)")


def _die_with_parent() -> None:
    """In the child: SIGTERM when the harness goes away, however it ends (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LocalPipeline:
    """`stream-redact run` (or the checkout's baseline worker) as a child process, its stderr drained."""

    def __init__(self, config: Path, mode: str, token: str, baseline_worker: Path | None = None) -> None:
        if mode in NO_DETECTION:
            worker = find_baseline_worker(baseline_worker)
            cmd = [sys.executable, str(worker), str(config), "--mode", mode]
        else:
            cmd = [sys.executable, "-m", "stream.cli", "run", "--config", str(config)]
        self.cmd = cmd
        env = {**os.environ, "STREAM_REDACT_TOKENS": token}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self.metrics_url: str | None = None
        self.ready = threading.Event()
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        threading.Thread(target=self._drain, daemon=True, name="pipeline-stderr").start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.tail.append(line)
            if "metrics at http://" in line and self.metrics_url is None:
                self.metrics_url = line.split("metrics at ")[1].split(",")[0].strip()
                self.ready.set()
        self.ready.set()

    @property
    def base_url(self) -> str:
        assert self.metrics_url is not None
        return self.metrics_url.rsplit("/metrics", 1)[0]

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout) or self.metrics_url is None:
            self.stop()
            raise RuntimeError("the pipeline did not start:\n" + "".join(self.tail)[-3000:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _api(base: str, method: str, path: str, token: str, body: dict | None = None) -> None:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    req = urllib.request.Request(base.rstrip("/") + path, method=method, headers=headers,
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=30):
            pass
    except urllib.error.HTTPError as e:  # the body names the problem; the token is never echoed
        why = e.read().decode(errors="replace")[:300]
        raise RuntimeError(f"{method} {path}: HTTP {e.code}: {why}") from None


def stream_doc(sid: str, cam_url: str, out_url: str, bitrate_kbps: int) -> dict[str, Any]:
    """A `streams[]` entry (config file or POST /api/streams body) for one synthetic camera."""
    return {"id": sid,
            "source": {"type": "rtsp", "url": cam_url, "open_timeout_s": 5, "read_timeout_s": 5,
                       "reconnect": FAST_RECONNECT},
            "outputs": [{"type": "rtsp", "url": out_url, "bitrate_kbps": bitrate_kbps,
                         "reconnect": FAST_RECONNECT}]}


def pipeline_doc(spec: RunSpec, streams: list[dict[str, Any]], events_path: Path) -> dict[str, Any]:
    """The generated pipeline config of a local point."""
    detection: dict[str, Any] = {"preset": spec.preset}
    if spec.threads:
        detection["threads"] = spec.threads
    if spec.lanes:
        detection["lanes"] = spec.lanes
    if spec.skip_unchanged:
        detection["skip_unchanged"] = True
    for key in ("plate_every", "person_every"):
        if getattr(spec, key):
            detection[key] = getattr(spec, key)
    if spec.mode.startswith("redact-faces"):
        detection.update(plates=False, heads=False)
    return {
        "streams": streams if spec.register == "config" else [],
        **({"queue_size": spec.queue_size} if spec.queue_size else {}),
        "batcher": {"max_batch": 1 if spec.mode.endswith("-b1") else spec.max_batch,
                    "max_wait_ms": spec.max_wait_ms},
        "detection": detection,
        "http": {"port": 0},
        "events": {"sink": "jsonl", "jsonl": {"path": str(events_path), "fsync": "never"}},
        "workers": spec.workers,
    }


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def run_point(spec: RunSpec, material: Material, progress: Progress = lambda _m: None) -> dict[str, Any]:
    """Run one point and return its measurements (see report.py for the fields)."""
    from stream.sim.server import RtspServer

    k = spec.streams
    spec.work.mkdir(parents=True, exist_ok=True)
    tag = f"{spec.mode}-{spec.size}-w{spec.workers}-k{k}-{int(time.time())}"
    sids = [f"lt{i}" for i in range(k)]
    scenes = {sid: Scene(material, i, spec.width, spec.height, spec.fps, spec.faces, spec.plates,
                         appearing=spec.appearing)
              for i, sid in enumerate(sids)}
    server = None
    if spec.media:
        base = spec.media.rstrip("/")

        def url(path: str) -> str:
            return base + path
    else:
        server = RtspServer(relays=[f"/lt-cam{i}" for i in range(k)] + [f"/lt-out{i}" for i in range(k)])
        server.start()
        url = server.url
    cams = [SyntheticCamera(scenes[sid], url(f"/lt-cam{i}"), spec.bitrate_kbps) for i, sid in enumerate(sids)]
    judged = set(spec.judge or (("face",) if spec.mode.startswith("redact-faces") else ("face", "plate")))
    readers = [OutputReader(scenes[sid], url(f"/lt-out{i}"), spec.mode != "transcode", judged)
               for i, sid in enumerate(sids)]
    docs = [stream_doc(sid, url(f"/lt-cam{i}"), url(f"/lt-out{i}"), spec.bitrate_kbps)
            for i, sid in enumerate(sids)]
    events_path = spec.work / f"{tag}.events.jsonl"
    pipeline: LocalPipeline | None = None
    token = ""
    registered: list[str] = []
    gpu = probe.GpuSampler()
    try:
        for c in cams:
            c.start()
        if spec.api:
            token = os.environ.get(spec.token_env or "", "")
            if not token:
                raise RuntimeError(f"--api needs a token: put it in ${spec.token_env or 'TOKEN_ENV'}")
            api_base = spec.api
            metrics_url = spec.metrics_url or api_base.rstrip("/") + "/metrics"
        else:
            token = secrets.token_urlsafe(24)
            cfg = spec.work / f"{tag}.yaml"
            cfg.write_text(yaml.safe_dump(pipeline_doc(spec, docs, events_path)))
            pipeline = LocalPipeline(cfg, spec.mode, token, spec.baseline_worker)
            progress(f"starting the pipeline ({spec.mode}, {k} x {spec.size} @ {spec.fps:g} fps, "
                     f"{spec.workers} worker process{'es' if spec.workers > 1 else ''})")
            pipeline.wait_ready(spec.start_timeout_s)
            api_base = pipeline.base_url
            metrics_url = spec.metrics_url or pipeline.metrics_url or ""
            if spec.workers > 1:
                _check_workers(probe.scrape(metrics_url), spec, pipeline)
        if spec.api or spec.register == "api":
            for doc in docs:
                _api(api_base, "POST", "/api/streams", token, doc)
                registered.append(doc["id"])
        for r in readers:
            r.start()
        deadline = time.monotonic() + spec.start_timeout_s
        for r in readers:
            r.first_frame.wait(max(0.0, deadline - time.monotonic()))
        not_live = [sid for sid, r in zip(sids, readers, strict=True) if not r.first_frame.is_set()]
        if len(not_live) == k:  # nothing at all: a broken set-up, not a measurement
            tail = "".join(pipeline.tail)[-2000:] if pipeline else ""
            raise RuntimeError(f"no output delivered a frame within {spec.start_timeout_s:g} s "
                               f"(reader: {readers[0].error}; camera: {cams[0].stats.error})\n{tail}")
        readyz = None
        if not_live:  # an overloaded pipeline may never bring some streams up: measured as 0 fps
            progress(f"outputs never live within {spec.start_timeout_s:g} s: {', '.join(not_live)}")
            readyz = _readyz(api_base, [s for s in not_live])
        progress(f"{k - len(not_live)} of {k} outputs live; warming up {spec.warmup_s:g} s")
        threading.Event().wait(spec.warmup_s)  # pacing of the measurement, not synchronisation
        snap_a = probe.scrape(metrics_url)
        pid_cpu_a = probe.tree_cpu_rss(pipeline.proc.pid)[0] if pipeline else None
        srv_cpu_a = probe.proc_cpu_rss(server.pid)[0] if server and server.pid else None
        self_a, sys_a = probe.self_cpu(), probe.system_busy_cpu()
        t_a, mono_a = time.time() * 1000, time.monotonic()
        gpu.start()
        end = mono_a + spec.duration_s
        while (left := end - time.monotonic()) > 0:
            threading.Event().wait(min(2.0, left))
            got = sum(len(r.frames) for r in readers)
            leaks = sum(o.visible for r in readers for f in r.frames for o in f.objects if o.label in judged)
            progress(f"  {spec.duration_s - max(0.0, end - time.monotonic()):4.0f}/{spec.duration_s:g} s  "
                     f"frames received {got}  leaks {leaks}")
        snap_b = probe.scrape(metrics_url)
        window_s = time.monotonic() - mono_a
        t_b = time.time() * 1000
        pid_cpu_b, rss, nprocs = probe.tree_cpu_rss(pipeline.proc.pid) if pipeline else (None, None, None)
        srv_cpu_b = probe.proc_cpu_rss(server.pid)[0] if server and server.pid else None
        self_b, sys_b = probe.self_cpu(), probe.system_busy_cpu()
        gpu_info = gpu.stop()
        # frames sent at the end of the window are still on their way
        threading.Event().wait(min(2.0, 2 * spec.latency_bound_ms / 1000 + 0.5))
    finally:
        for r in readers:
            r.stop()
        for sid in registered:
            try:
                _api(api_base, "DELETE", f"/api/streams/{sid}", token)
            except (RuntimeError, OSError) as e:
                progress(f"could not remove stream {sid}: {e}")
        if pipeline is not None:
            pipeline.stop()
        for c in cams:
            c.stop()
        if server is not None:
            server.stop()
    sent = {sid: dict(c.stats.sent_ms) for sid, c in zip(sids, cams, strict=True)}
    per_stream = [_stream_stats(sid, rd.frames, sent[sid], cams[i].stats.late, snap_a, snap_b, t_a, t_b,
                                window_s)
                  for i, (sid, rd) in enumerate(zip(sids, readers, strict=True))]
    lat = [lat for r in readers for lat in _latencies(r.frames, t_a, t_b)]
    checks = [o for r in readers for f in r.frames for o in f.objects if o.label in judged]
    examples = _leak_examples(sids, readers, judged, spec.work / tag) if spec.mode != "transcode" else []
    # what processes other than the pipeline, the harness and the relay used: the machine's share
    others = (sys_b - sys_a) - (self_b - self_a) - ((pid_cpu_b or 0) - (pid_cpu_a or 0)) \
        - ((srv_cpu_b or 0) - (srv_cpu_a or 0))
    point: dict[str, Any] = {
        "spec": {k2: (str(v) if isinstance(v, Path) else v) for k2, v in asdict(spec).items()
                 if k2 not in ("token_env",)},
        # a remote deployment runs with its own worker processes: as many as its /metrics speaks for
        "mode": spec.mode, "workers": spec.workers if not spec.api else _workers_seen(snap_b),
        "k": k, "size": spec.size, "fps": spec.fps, "window_s": round(window_s, 2),
        "latency_ms": {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "p99": _pct(lat, 99),
                       "max": round(max(lat), 1) if lat else None, "n": len(lat)},
        "latency_hist": _hist(lat),
        "sent": sum(s["sent"] for s in per_stream), "received": sum(s["received"] for s in per_stream),
        "delivered_fps_min": min(s["delivered_fps"] for s in per_stream),
        "delivered_fps_mean": round(sum(s["delivered_fps"] for s in per_stream) / k, 2),
        "blanked_seen": sum(s["blanked_seen"] for s in per_stream),
        "unreadable": sum(s["unreadable"] for s in per_stream),
        "pipeline": {
            "frames_in": probe.delta(snap_a, snap_b, "stream_redact_frames_in_total"),
            "published": probe.delta(snap_a, snap_b, "stream_redact_frames_published_total"),
            "dropped": probe.delta(snap_a, snap_b, "stream_redact_frames_dropped_total"),
            # why: a stream queue that was full, frames shed by admission control, an output busy...
            "dropped_by_reason": {d.value: n for d in Drop
                                  if (n := probe.delta(snap_a, snap_b, "stream_redact_frames_dropped_total",
                                                       reason=d.value))},
            "blanked": probe.delta(snap_a, snap_b, "stream_redact_frames_blanked_total"),
            "withheld": probe.delta(snap_a, snap_b, "stream_redact_frames_withheld_total"),
            "latency_ms": {q: _ms(probe.histogram_quantile(snap_a, snap_b, "stream_redact_latency_seconds",
                                                           v)) for q, v in (("p50", 0.5), ("p99", 0.99))},
            "mean_batch": _ratio(probe.delta(snap_a, snap_b, "stream_redact_batch_size_sum"),
                                 probe.delta(snap_a, snap_b, "stream_redact_batch_size_count")),
            "cpu_cores": round((pid_cpu_b - pid_cpu_a) / window_s, 2)
            if pid_cpu_a is not None and pid_cpu_b is not None else None,
            "rss_mb": round(rss / 2**20) if rss else None,
            "processes": nprocs,
            "metrics_from": probe.label_values(snap_b, "worker"),
            "detector_up": probe.gauge(snap_b, "stream_redact_detector_up"),
            "worker_restarts": probe.delta(snap_a, snap_b, "stream_redact_worker_restarts_total"),
            "gpu": gpu_info,
        },
        "harness_cpu_cores": round((self_b - self_a) / window_s, 2),
        "relay_cpu_cores": round((srv_cpu_b - srv_cpu_a) / window_s, 2)
        if srv_cpu_a is not None and srv_cpu_b is not None else None,
        "machine_busy_cores": round((sys_b - sys_a) / window_s, 2),
        "other_load_cores": round(max(0.0, others) / window_s, 2) if pipeline is not None else None,
        "leaks_judged": sorted(judged) if spec.mode != "transcode" else [],
        "leaks": _leaks(checks) if spec.mode != "transcode" else None,
        "leak_examples": examples,
        "events": completeness(read_track_events(events_path), scenes, sent, judged).as_dict()
        if spec.mode not in NO_DETECTION and not spec.api else None,
        "streams": per_stream,
    }
    point["not_live"] = not_live
    point["readyz_not_live"] = readyz
    p = point
    reasons = [f"never live: {', '.join(not_live)}"] if not_live else []
    if p["pipeline"]["dropped"] > 0:
        why = ", ".join(f"{r} {n:.0f}" for r, n in p["pipeline"]["dropped_by_reason"].items())
        reasons.append(f"{p['pipeline']['dropped']:.0f} dropped" + (f" ({why})" if why else ""))
    if p["pipeline"]["blanked"] + p["blanked_seen"] > 0:
        reasons.append(f"{max(p['pipeline']['blanked'], p['blanked_seen']):.0f} blanked")
    if p["delivered_fps_min"] < HELD_FPS_SHARE * spec.fps:
        reasons.append(f"min {p['delivered_fps_min']:.1f} fps")
    if p["latency_ms"]["p99"] is None or p["latency_ms"]["p99"] >= spec.latency_bound_ms:
        reasons.append(f"p99 {p['latency_ms']['p99']} ms")
    if p["leaks"] is not None and p["leaks"]["visible"] > 0:
        reasons.append(f"{p['leaks']['visible']} leaks")
    p["held"] = not reasons
    p["broke_on"] = reasons
    return p


def _workers_seen(snap: probe.Snapshot) -> int:
    """Stream worker processes a pipeline's /metrics speaks for (``worker-<i>`` labels); 1 for a
    single-process pipeline, whose samples carry no such label."""
    return sum(1 for v in probe.label_values(snap, "worker") if v.startswith("worker-")) or 1


def _check_workers(snap: probe.Snapshot, spec: RunSpec, pipeline: LocalPipeline) -> None:
    """Refuse to measure a point whose pipeline is not the multi-process service asked for (a
    ``--baseline-worker`` copy from before ``workers`` runs one process): its figures would be
    reported under the wrong worker count."""
    seen = _workers_seen(snap)
    if seen == spec.workers:
        return
    what = (f"the baseline worker {pipeline.cmd[1]} does not honour `workers:` in its config; use the "
            f"checkout's {BASELINE_WORKER}" if spec.mode in NO_DETECTION
            else "check that `stream-redact run` honours `workers:` in its config")
    raise RuntimeError(f"asked for {spec.workers} worker processes, but the pipeline's /metrics speaks for "
                       f"{seen}: {what}")


def _readyz(base: str, sids: list[str]) -> Any:
    """What the pipeline says about streams that never delivered (its /readyz), for the report."""
    try:
        with urllib.request.urlopen(base.rstrip("/") + "/readyz", timeout=10) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503 while not ready still carries the JSON
        try:
            doc = json.loads(e.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None
    streams = doc.get("streams", doc) if isinstance(doc, dict) else doc
    if isinstance(streams, dict):
        return {sid: streams.get(sid) for sid in sids}
    if isinstance(streams, list):
        return [st for st in streams if isinstance(st, dict) and st.get("id") in sids]
    return streams


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def _latencies(frames: list[Received], t_a: float, t_b: float) -> list[float]:
    return [f.recv_ms - f.sent_ms for f in frames if f.kind == "stamped" and t_a <= f.sent_ms < t_b]


def _hist(lat: list[float]) -> dict[str, list[float]]:
    if not lat:
        return {"edges_ms": [], "counts": []}
    hi = max(50.0, float(np.percentile(lat, 99.5)) * 1.1)
    counts, edges = np.histogram(np.clip(lat, 0, hi), bins=40, range=(0, hi))
    return {"edges_ms": [round(float(e), 1) for e in edges], "counts": [int(c) for c in counts]}


def _leaks(checks: list[Check]) -> dict[str, Any]:
    """Leak rate overall, per class and per size bucket (share of checked objects visible)."""
    def rate(rows: list[Check]) -> dict[str, Any]:
        vis = sum(1 for r in rows if r.visible)
        return {"checked": len(rows), "visible": vis, "rate": round(vis / len(rows), 5) if rows else None}

    out = rate(checks)
    labels = sorted({r.label for r in checks})
    out["by_class"] = {lab: rate([r for r in checks if r.label == lab]) for lab in labels}
    out["by_size"] = {f"{lab} {b}": rate([r for r in checks if r.label == lab and r.bucket == b])
                      for lab, b in sorted({(r.label, r.bucket) for r in checks})}
    return out


def _leak_examples(sids: list[str], readers: list[OutputReader], judged: set[str], prefix: Path,
                   limit: int = 20) -> list[dict[str, Any]]:
    """The first leaks of each stream (where, when, how clearly), and the received frames as PNG
    evidence with the ground-truth box drawn: a leak must be looked at, not only counted."""
    import cv2

    out: list[dict[str, Any]] = []
    for sid, r in zip(sids, readers, strict=True):
        for f in r.frames:
            for o in f.objects:
                if o.visible and o.label in judged and len(out) < limit:
                    out.append({"stream": sid, "seq": f.seq, "label": o.label, "bucket": o.bucket,
                                "box": list(o.box), "corr": o.corr,
                                "latency_ms": round(f.recv_ms - f.sent_ms, 1)})
        for seq, grey in r.leak_frames:
            img = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
            for f in r.frames:
                if f.seq == seq:
                    for o in f.objects:
                        if o.visible:
                            cv2.rectangle(img, o.box[:2], (o.box[2] - 1, o.box[3] - 1), (0, 0, 255), 2)
                    break
            path = prefix.with_name(f"{prefix.name}.leak-{sid}-{seq}.png")
            cv2.imwrite(str(path), img)
            out.append({"stream": sid, "seq": seq, "evidence": str(path)})
    return out


def _stream_stats(sid: str, frames: list[Received], sent: dict[int, int], late: int, a: probe.Snapshot,
                  b: probe.Snapshot, t_a: float, t_b: float, window_s: float) -> dict[str, Any]:
    in_window = {seq for seq, ms in sent.items() if t_a <= ms < t_b}
    got = {f.seq for f in frames if f.kind == "stamped" and f.seq in in_window}
    blank = sum(1 for f in frames if f.kind == "blank" and t_a <= f.recv_ms < t_b)
    lat = _latencies(frames, t_a, t_b)
    return {
        "stream": sid, "sent": len(in_window), "received": len(got),
        "sent_fps": round(len(in_window) / window_s, 2), "delivered_fps": round(len(got) / window_s, 2),
        "missing": max(0, len(in_window) - len(got) - blank), "blanked_seen": blank,
        # when in the window the frames not received as sent were sent (seconds; the first 20)
        "not_received_at_s": sorted(round((sent[q] - t_a) / 1000, 2) for q in in_window - got)[:20],
        "unreadable": sum(1 for f in frames if f.kind == "unreadable" and t_a <= f.recv_ms < t_b),
        "misrouted": sum(1 for f in frames if f.kind == "misrouted"),
        "camera_late": late,
        "latency_p50_ms": _pct(lat, 50), "latency_p99_ms": _pct(lat, 99),
        "pipeline_dropped": probe.delta(a, b, "stream_redact_frames_dropped_total", stream=sid),
        "pipeline_blanked": probe.delta(a, b, "stream_redact_frames_blanked_total", stream=sid),
    }


def calibrate(material: Material, width: int, height: int, fps: float, seconds: float = 4.0,
              bitrate_kbps: int = 1500) -> dict[str, Any]:
    """Latency of the harness's own path (camera -> relay -> reader, no pipeline): the floor under
    every glass-to-glass figure of a run on this machine."""
    from stream.sim.server import RtspServer

    scene = Scene(material, 0, width, height, fps, faces=1, plates=0)
    with RtspServer(relays=["/lt-direct"]) as server:
        cam = SyntheticCamera(scene, server.url("/lt-direct"), bitrate_kbps)
        reader = OutputReader(scene, server.url("/lt-direct"), check_leaks=False)
        cam.start()
        reader.start()
        try:
            if not reader.first_frame.wait(60):
                raise RuntimeError(f"calibration: no frame back from the relay ({reader.error})")
            threading.Event().wait(1.0)  # past the start-up burst of a joining reader
            t_a = time.time() * 1000
            threading.Event().wait(seconds)
            t_b = time.time() * 1000
            threading.Event().wait(0.5)
        finally:
            reader.stop()
            cam.stop()
    lat = _latencies(reader.frames, t_a, t_b)
    return {"size": f"{width}x{height}", "fps": fps, "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
            "n": len(lat)}
