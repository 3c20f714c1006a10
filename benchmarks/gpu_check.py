"""GPU check: GPU inference against the CPU on the same frames, per-bucket timings, and K 1080p30
streams through the batching stage, in one run of a few minutes.

What it runs on: the best GPU path the machine has. ONNX Runtime's TensorRT/CUDA providers where
onnxruntime-gpu is installed (the production path), else the same ONNX graphs under torch
(onnx2torch) on CUDA, else the CPU (a dry run). The JSON names the path behind every number.

Sections:
1. ``correctness``: every model on the same synthetic 1080p frames, ONNX Runtime CPU (reference)
   against the GPU path in fp32 and fp16, with device preprocessing: share of reference boxes
   matched (IoU >= 0.7) and the largest corner difference in pixels.
2. ``models``: per model and batch bucket, ms per batch for upload, device letterbox, inference
   (with the download of outputs) and the whole run with decoding; frames/s.
3. ``preprocess``: device letterbox (1080p uint8 up, resize there) against host letterbox
   (OpenCV resize, float32 canvas up), per frame.
4. ``detector``: the whole detector (faces + plates + heads, every model on every frame) per
   bucket: frames/s, and the 1080p30 streams that rate could serve.
5. ``decode``: H.264 1080p decode on the CPU (OpenCV's FFmpeg), frames/s per process.
   ``breakdown``: one batch of the default detector split into host packing, upload, and per model
   letterbox and forward with decoding (frames already on the device), then the same batch as I420
   pictures (planes packed and uploaded, converted on the device), against the whole call.
6. ``paths``: the torch backend's three paths per model and bucket (1, 8, 16, 32, 64): ``eager``
   (today's: dynamic graph, host decoding), ``static`` (one graph per input shape frozen before
   conversion, decoding on the device) and ``graphed`` (static, replayed as one CUDA graph per
   shape). Per path: ms per ``model.run`` and frames/s; host synchronisations in one run (CUDA sync
   debug warnings; on the CPU the host reads of one forward, ``count_host_reads``); frames decoded
   on the device and on the host; CUDA graphs captured, replayed or failed; and one run's boxes
   against ONNX Runtime CPU (match rate, as in ``correctness``), so a fast wrong path shows. Only
   with the torch backend (skipped, with the reason, under ONNX Runtime or without onnx2torch);
   ``--paths-budget`` (180 s) bounds it.
7. ``pipeline``: K synthetic 1080p30 streams in P worker processes sharing the GPU, for each P of
   ``--procs`` in turn. ``--stage shared`` (default): one detection stage process, the product's
   ``stage_main`` as ``run --workers N`` starts it, batches for every worker; the workers reach it
   through ``RemoteStage``, frames crossing in shared memory. ``--stage per-process``: each worker
   runs its own Batcher and detector, so each has its own CUDA context, and those time-slice the GPU.
   Either way each worker runs the product's JobQueues, tracker and redactor (not its RTSP decode or
   x264 encode, which run on CPU cores and are sized separately). Per step (stage, P, K): delivered
   fps, blanked and dropped frames, capture-to-redacted latency p50/p95/p99, leaks (ground-truth
   faces and plates not covered by a painted region), batches and mean batch, CPU cores used by the
   workers and by the stage process, GPU utilisation (NVML). K is raised until a step fails: p99 >=
   250 ms, delivered < 97%, or any blanked/dropped frame. The JSON is rewritten after every step.

Run: ``python benchmarks/gpu_check.py [--quick] [--out DIR]`` (on a GPU machine: torch + onnx2torch,
or onnxruntime-gpu). Writes ``gpu_check.json`` after every section and prints a table.
``--cpu-smoke`` runs the breakdown (torch on the CPU, one frame), the paths section (torch on the
CPU, buckets 1 and 2) and the pipeline section (ONNX Runtime CPU, 2 streams, 2 processes, shared
stage) in about a minute; the tests run it.

One lease's sections, each bounded, are ``benchmarks/gpu_session.sh`` (its header lists them and
their limits). Times on an H200, 2026-12-04: the whole detector's section 80 s (warm-up 56 s), the
shared stage 65-85 s to start and then about 8 s per K step, the torch paths about 100 s for four
models at five buckets (the text pass, added since, is a fifth), the breakdown about 75 s. Each
worker process with its own detector, for comparison with the shared stage::

    python benchmarks/gpu_check.py --out benchmarks/results/gpu-per-process \
        --skip correctness,models,preprocess,detector,decode,breakdown,paths --stage per-process \
        --procs 4 --seconds 4 --budget 100

The breakdown of one batch (host packing, upload, letterbox, each model), BGR and I420, about 70 s::

    python benchmarks/gpu_check.py --out DIR --buckets 1,8,32,64 \
        --skip correctness,models,preprocess,detector,decode,paths,pipeline
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from gpu_scene import Scene  # noqa: E402

from stream.core.nms import iou_matrix  # noqa: E402
from stream.detect import backend as backend_mod  # noqa: E402

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RAMP = [2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
"""stream counts of the pipeline ramp; each process count climbs it until a step fails"""
PATH_BUCKETS = (1, 8, 16, 32, 64)
"""batch sizes of the paths section: where launch overhead (b1) and throughput (b64) show"""
PATHS: dict[str, dict[str, bool]] = {
    "eager": {"static_graphs": False, "device_decode": False, "cuda_graphs": False},
    "static": {"static_graphs": True, "device_decode": True, "cuda_graphs": False},
    "graphed": {"static_graphs": True, "device_decode": True, "cuda_graphs": True},
}
"""the torch backend's paths: today's eager one, static graphs decoded on the device, and those
replayed as one CUDA graph per shape"""
SYNC_WARNING = "synchronizing CUDA operation"
"""what torch's sync debug mode ("warn") says at each host synchronisation"""


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpu_path() -> tuple[str, list[str]]:
    """(backend, providers) for the best GPU path here; ('onnxruntime', ['cpu']) without a GPU."""
    if backend_mod.ort_gpu_available():
        return "onnxruntime", ["tensorrt", "cuda", "cpu"]
    if backend_mod.torch_cuda_available():
        return "torch", ["cuda"]
    return "onnxruntime", ["cpu"]


def sync() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:
        pass


def timed(fn: Any, reps: int, warm: int = 2) -> float:
    """Median ms of ``fn`` over ``reps`` runs after ``warm`` runs (device synchronised)."""
    for _ in range(warm):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


def environment() -> dict[str, Any]:
    import onnxruntime as ort

    env: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
                           "opencv": cv2.__version__}
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["gpu"] = p.name
            env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
    except ImportError:
        env["torch"] = None
    env["onnx2torch"] = backend_mod.torch_cuda_available() or None
    try:  # the product's frame types import PyAV, which GPU images often lack
        import av

        env["pyav"] = av.__version__
    except ImportError:
        env["pyav"] = None
    # the shared stage's frame slots (8 MiB per 1080p frame) live there: Docker's default is 64 MiB
    with contextlib.suppress(OSError):
        env["dev_shm_free_gib"] = round(shutil.disk_usage("/dev/shm").free / 2**30, 2)
    return env


# -- 1. correctness ------------------------------------------------------------------------------
def model_classes() -> dict[str, tuple[type, dict[str, Any]]]:
    """Every model timed on its own; the text pass (plates read as lines of text, ``accurate``'s)
    last, so a spent time budget skips it first: it has not been measured on a GPU yet, and it is
    not in the whole detector's section (see :func:`detector_config_for`)."""
    from stream.detect.centerface import CenterFace
    from stream.detect.text import TextPlates
    from stream.detect.yolo import PersonYolo, PlateYolo
    from stream.detect.yunet import YuNet

    return {
        "yunet": (YuNet, {"threshold": 0.5, "input_size": 640, "min_input": 640}),
        "centerface": (CenterFace, {"threshold": 0.35, "input_size": 960, "min_input": 640}),
        "plate": (PlateYolo, {"threshold": 0.2, "input_size": 960}),
        "person": (PersonYolo, {"threshold": 0.3, "input_size": 960, "min_input": 640}),
        "text": (TextPlates, {"threshold": 0.5, "input_size": 960}),
    }


def frames_for(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[dict]]:
    scene = Scene(seed=seed)
    pairs = [scene.render(t * 13, phase=t) for t in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def compare(ref: list, got: list, min_score: float) -> dict[str, Any]:
    matched = total = 0
    worst = 0.0
    for a, b in zip(ref, got, strict=True):
        keep = a.scores >= min_score
        boxes = a.boxes[keep]
        total += len(boxes)
        if not len(boxes):
            continue
        if not len(b):
            continue
        iou = iou_matrix(boxes, b.boxes)
        j = iou.argmax(axis=1)
        ok = iou[np.arange(len(boxes)), j] >= 0.7
        matched += int(ok.sum())
        if ok.any():
            worst = max(worst, float(np.abs(boxes[ok] - b.boxes[j[ok]]).max()))
    return {"reference_boxes": total, "matched": matched,
            "match_rate": round(matched / total, 4) if total else None, "max_corner_px": round(worst, 2)}


def correctness(backend: str, providers: list[str], n: int) -> dict[str, Any]:
    from stream.detect.device import DeviceFrames, torch_device_ok

    frames, _ = frames_for(n)
    out: dict[str, Any] = {}
    for name, (cls, kw) in model_classes().items():
        ref_model = cls(providers=["cpu"], backend="onnxruntime", **kw)
        ref = ref_model.run(frames)
        row: dict[str, Any] = {}
        for fp16 in (False, True):
            model = cls(providers=providers, backend=backend, fp16=fp16, **kw)
            on_dev = model.on_gpu and torch_device_ok(model.device)
            got = model.run(frames, DeviceFrames(frames, model.device) if on_dev else None)
            row["fp16" if fp16 else "fp32"] = compare(ref, got, kw["threshold"] + 0.1)
            row["path"] = (model.backend_for(384, 640) if model.per_shape else model.backend).describe()
        out[name] = row
        say(f"correctness {name}: fp32 {row['fp32']} fp16 {row['fp16']}")
    return out


# -- 2./3. per-model timings -----------------------------------------------------------------------
def model_timings(backend: str, providers: list[str], buckets: tuple[int, ...], reps: int) -> dict[str, Any]:
    pool, _ = frames_for(max(buckets))
    out: dict[str, Any] = {}
    for name, (cls, kw) in model_classes().items():
        model = cls(providers=providers, backend=backend, fp16=True, buckets=buckets, **kw)
        out[name] = time_model(model, pool, buckets, reps)
        rows = out[name]["buckets"]
        say(f"models {name} ({out[name]['path']}): " + ", ".join(
            f"b{r['bucket']} {r['run_ms']:.1f} ms ({r['fps']} fps)" for r in rows))
    return out


def time_model(model: Any, pool: list[np.ndarray], buckets: tuple[int, ...], reps: int) -> dict[str, Any]:
    from stream.detect.device import DeviceFrames, torch_device_ok
    from stream.detect.letterbox import letterbox_batch

    on_dev = model.on_gpu and torch_device_ok(model.device)
    geometry = {"pad": model.pad_value, "min_side": model.min_input}
    rows = []
    bk = None
    for b in buckets:
        frames = pool[:b]
        row: dict[str, Any] = {"bucket": b}
        if on_dev:
            row["upload_ms"] = timed(lambda frames=frames: DeviceFrames(frames, model.device), reps)
            dev = DeviceFrames(frames, model.device)
            row["letterbox_ms"] = timed(lambda dev=dev: dev.letterbox(
                model.input_size, rgb=model.rgb, unit=model.unit, **geometry), reps)
            x, _ = dev.letterbox(model.input_size, rgb=model.rgb, unit=model.unit, **geometry)
        else:
            batch, _ = letterbox_batch(frames, model.input_size, **geometry)
            row["letterbox_ms"] = timed(
                lambda frames=frames: letterbox_batch(frames, model.input_size, **geometry), reps)
            x = model.preprocess(batch)
        bk = model.backend_for(*x.shape[2:4])
        row["canvas"] = list(x.shape[2:4])
        row["infer_ms"] = timed(lambda bk=bk, x=x: bk.run(x), reps)
        row["run_ms"] = timed(lambda frames=frames: model.run(
            frames, DeviceFrames(frames, model.device) if on_dev else None), reps)
        row["fps"] = round(b * 1000 / row["run_ms"], 1)
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    return {"path": bk.describe() if bk else "", "device_preprocess": on_dev, "buckets": rows}


def preprocess_compare(backend: str, providers: list[str], reps: int) -> dict[str, Any]:
    """Device letterbox of 1080p frames vs the host path (OpenCV + float32 canvas upload)."""
    from stream.detect.centerface import CenterFace
    from stream.detect.device import DeviceFrames, torch_device_ok
    from stream.detect.letterbox import letterbox_batch

    model = CenterFace(providers=providers, backend=backend, threshold=0.35, input_size=960, min_input=640)
    if not (model.on_gpu and torch_device_ok(model.device)):
        return {"skipped": "no GPU path with torch here"}
    import torch

    frames, _ = frames_for(8)

    def device() -> Any:
        return DeviceFrames(frames, model.device).letterbox(960, min_side=640, rgb=True)

    def host() -> Any:
        batch, _ = letterbox_batch(frames, 960, min_side=640)
        return torch.from_numpy(model.preprocess(batch)).to(model.device)

    d, h = timed(device, reps), timed(host, reps)
    res = {"frames": 8, "device_ms_per_frame": round(d / 8, 3), "host_ms_per_frame": round(h / 8, 3),
           "host_cpu_note": "host path is one Python thread: OpenCV resize + float32 conversion + upload"}
    say(f"preprocess per 1080p frame: device {res['device_ms_per_frame']} ms, "
        f"host {res['host_ms_per_frame']} ms")
    return res


# -- 4. the whole detector -----------------------------------------------------------------------
def detector_config_for(backend: str, providers: list[str], buckets: tuple[int, ...],
                        path: str = "graphed") -> Any:
    """The live pipeline's detector settings; ``path`` one of :data:`PATHS` (the torch backend's
    flags; the product's default is ``graphed``)."""
    from stream.config import DetectionConfig

    # faces (CenterFace 960), plates (960) and heads of small people (960) on every frame; the same
    # conversion the live pipeline makes from its config. Without the text pass, which came after
    # the H200 runs of 2026-12-04: the detector stays the one those numbers are for
    detection = DetectionConfig(preset="accurate", providers=providers, backend=backend, fp16=True,
                                text_plates=False, **PATHS[path])
    return detection.detector_settings(buckets)


def detector_timings(backend: str, providers: list[str], buckets: tuple[int, ...],
                     reps: int) -> dict[str, Any]:
    """The whole detector per bucket, on the product's default path and (torch backend) on the
    eager path it replaced, each warmed first as the live stage warms it (static graphs built,
    CUDA graphs captured), so no timing mixes a shape's first runs into its median."""
    out: dict[str, Any] = {}
    paths = ["graphed", "eager"] if backend == "torch" else ["graphed"]
    for path in paths:
        try:
            out[path] = detector_path(backend, providers, buckets, reps, path, overlap=path == "graphed")
        except Exception as e:  # one path that fails must not lose the other's numbers
            say(f"detector {path} FAILED: {type(e).__name__}: {e}")
            out[path] = {"error": f"{type(e).__name__}: {e}"}
    first = out[paths[0]]
    # the table and older readers look for these at the top level: the default path's
    return {**first, "paths": out} if "buckets" in first else {"paths": out}


def detector_path(backend: str, providers: list[str], buckets: tuple[int, ...], reps: int, path: str,
                  overlap: bool) -> dict[str, Any]:
    from stream.detect.ensemble import FrameDetector

    det = FrameDetector(detector_config_for(backend, providers, buckets, path))
    pool, _ = frames_for(max(buckets))
    t = time.monotonic()
    det.warmup(pool[0].shape[:2], max(buckets))
    warm_s = round(time.monotonic() - t, 1)
    rows = []
    for b in buckets:
        ms = timed(lambda b=b: det(pool[:b]), reps)
        fps = b * 1000 / ms
        rows.append({"bucket": b, "ms": round(ms, 2), "fps": round(fps, 1),
                     "streams_1080p30": int(fps // 30)})
    say(f"detector {path} (warm-up {warm_s} s): " + ", ".join(f"b{r['bucket']} {r['fps']} fps" for r in rows))
    res: dict[str, Any] = {"device": det.device, "device_preprocess": det.upload, "path": path,
                           "warmup_s": warm_s, "buckets": rows}
    graphs = [r for bk in det.backends() if hasattr(bk, "replays") for r in bk.replays()]
    if graphs:
        res["graphs"] = {"shapes": len(graphs), "captured": sum(r.captured for r in graphs),
                         "failed": sorted({r.failed for r in graphs if r.failed})}
    if not overlap:
        return res
    # the batcher runs the detector on a worker thread: the same call, timed there
    box: dict[str, float] = {}
    th = threading.Thread(target=lambda: box.update(ms=timed(lambda: det(pool[:1]), reps)))
    th.start()
    th.join()
    say(f"detector b1 on a worker thread: {box.get('ms', float('nan')):.1f} ms")
    res["b1_thread_ms"] = round(box.get("ms", float("nan")), 2)
    res["overlap"] = overlap_timing(det, pool, max(buckets), reps)
    return res


def overlap_timing(det: Any, pool: list[np.ndarray], b: int, reps: int) -> dict[str, Any]:
    """Batches of ``b`` one after another, against two in flight: one thread prepares the next
    batch (upload, letterbox) while another runs the current one, as the batcher's worker does."""
    import queue

    n = max(4, reps)
    det.detect(pool[:b])
    sync()
    t = time.perf_counter()
    for _ in range(n):
        det.detect(pool[:b])
    sync()
    serial = (time.perf_counter() - t) * 1000 / n
    handoff: queue.Queue = queue.Queue(maxsize=1)

    def prepare_all() -> None:
        for _ in range(n):
            handoff.put(det.prepare(pool[:b]))

    t = time.perf_counter()
    th = threading.Thread(target=prepare_all)
    th.start()
    for _ in range(n):
        det.complete(handoff.get())
    th.join()
    sync()
    both = (time.perf_counter() - t) * 1000 / n
    say(f"overlap b{b}: {serial:.1f} ms per batch one at a time, {both:.1f} ms with two in flight")
    return {"bucket": b, "serial_ms": round(serial, 2), "two_in_flight_ms": round(both, 2),
            "speedup": round(serial / both, 3) if both else None}


def breakdown(backend: str, providers: list[str], buckets: tuple[int, ...], reps: int) -> dict[str, Any]:
    """Where a batch of the default detector's time goes: packing the frames into pinned memory
    (host copies), the one upload, and per model its letterbox (``prepare``) and its forward with
    decoding (``complete``, a CUDA graph replay on a GPU) on frames already on the device, against
    the whole detector's call. It tells which of host, bus or GPU bounds the stage."""
    skipped = torch_only(backend, providers, "the breakdown times the torch backend's device path")
    if skipped:
        return skipped
    from stream.detect.device import DeviceFrames, StagingRing
    from stream.detect.ensemble import FrameDetector

    det = FrameDetector(detector_config_for(backend, providers, buckets, "graphed"))
    pool, _ = frames_for(max(buckets))
    t = time.monotonic()
    det.warmup(pool[0].shape[:2], max(buckets))
    warm_s = round(time.monotonic() - t, 1)
    device = det.device
    ring = StagingRing(device)
    models = {type(m).__name__: m for m in
              [*(m for m, _ in det.face_models), det.plate_model, det.person_model] if m is not None}
    modes = sorted({getattr(bk, "mode", "-") for bk in det.backends()})
    rows = []
    for b in buckets:
        frames = pool[:b]
        row: dict[str, Any] = {"bucket": b, **transfer_times(frames, device, reps)}
        row["ring_upload_ms"] = round(timed(lambda frames=frames: ring.upload(frames), reps), 3)
        on_dev = [x.clone() for x in ring.upload(frames)]
        sync()
        per: dict[str, Any] = {}
        for name, m in models.items():
            def prep(m: Any = m, frames: list[np.ndarray] = frames, on_dev: list = on_dev) -> Any:
                return m.prepare(frames, DeviceFrames(on_dev, device))

            chunks = prep()
            per[name] = {"letterbox_ms": round(timed(prep, reps), 3),
                         "complete_ms": round(timed(lambda m=m, chunks=chunks: m.complete(chunks), reps), 3)}
        row["models"] = per
        row["device_ms"] = round(sum(v["letterbox_ms"] + v["complete_ms"] for v in per.values()), 3)
        row["detector_ms"] = round(timed(lambda frames=frames: det(frames), reps), 3)
        row["device_fps"] = round(b * 1000 / row["device_ms"], 1) if row["device_ms"] else None
        row["i420"] = i420_breakdown(det, frames, device, reps)
        rows.append(row)
        say(f"breakdown b{b}: pack {row['pack_ms']} ms, h2d {row['h2d_ms']} ms ({row['frames_mb']} MB), "
            + ", ".join(f"{k} lb {v['letterbox_ms']} + run {v['complete_ms']}" for k, v in per.items())
            + f" -> device {row['device_ms']} ms ({row['device_fps']} fps), "
            f"detector {row['detector_ms']} ms; I420: {row['i420']}")
    return {"device": device, "pinned": device.startswith("cuda"), "modes": modes, "warmup_s": warm_s,
            "buckets": rows}


def i420_breakdown(det: Any, frames: list[np.ndarray], device: str, reps: int) -> dict[str, Any]:
    """The same batch as I420 pictures (what the decoders give): packing and upload of their planes
    (half the bytes of BGR), the conversion to BGR on the device, and the whole detector's call."""
    import torch

    from stream.core.yuv import I420
    from stream.detect.device import i420_to_bgr

    pics = [I420.from_bgr(f) for f in frames]
    x = torch.from_numpy(np.stack([p.data for p in pics])).to(device)
    h, w = pics[0].shape
    return {**transfer_times([p.data for p in pics], device, reps),
            "convert_ms": round(timed(lambda: i420_to_bgr(x, h, w), reps), 3),
            "detector_ms": round(timed(lambda: det(pics), reps), 3)}


def transfer_times(arrays: list[np.ndarray], device: str, reps: int) -> dict[str, Any]:
    """A batch's way up, as the staging ring takes it: packing into a page-locked buffer on one
    thread (``pack_ms``) and on the ring's threads (``pack_threads_ms``), then one upload."""
    import torch

    from stream.detect.device import StagingRing

    total = sum(a.nbytes for a in arrays)
    pin = device.startswith("cuda")
    buf = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    host = buf.numpy()
    one, ring = StagingRing(device, pack_threads=1), StagingRing(device)
    return {"frames_mb": round(total / 1e6, 1),
            "pack_ms": round(timed(lambda: one._pack(host, arrays, total), reps), 3),
            "pack_threads_ms": round(timed(lambda: ring._pack(host, arrays, total), reps), 3),
            "h2d_ms": round(timed(lambda: buf.to(device, non_blocking=pin), reps), 3)}


def torch_only(backend: str, providers: list[str], why: str) -> dict[str, Any] | None:
    """The reason a torch-backend section is skipped here (another backend, or torch or onnx2torch
    missing), or None when it can run."""
    if backend != "torch":
        return {"skipped": f"the run's backend is {backend} {providers}: {why} (--backend torch measures it)"}
    try:
        import onnx2torch  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        return {"skipped": f"the torch backend needs torch and onnx2torch ({e})"}
    return None


# -- 5. decode -----------------------------------------------------------------------------------
def decode_timing(clip: Path) -> dict[str, Any]:
    if not clip.exists():
        return {"skipped": f"{clip} missing"}
    cap = cv2.VideoCapture(str(clip))
    n = 0
    t0 = time.perf_counter()
    while True:
        ok, _ = cap.read()
        if not ok:
            break
        n += 1
    dt = time.perf_counter() - t0
    res = {"clip": clip.name, "frames": n, "fps": round(n / dt, 1), "decoder": "OpenCV FFmpeg (CPU)"}
    say(f"decode 1080p H.264 on CPU: {res['fps']} fps in one process")
    return res


# -- 6. torch paths: eager, static graphs + device decoding, CUDA graphs -------------------------
def path_timings(backend: str, providers: list[str], buckets: tuple[int, ...], reps: int, warm: int = 2,
                 check_frames: int = 8, budget_s: float = 180.0, save: Any = None) -> dict[str, Any]:
    """Each model and bucket on the torch backend's three paths (:data:`PATHS`): time per run,
    host synchronisations, where decoding happened, whether CUDA graphs were captured, and the
    detections against ONNX Runtime CPU, so a fast path that is wrong shows next to its speed.

    ``save(result)`` after every model; past ``budget_s`` the remaining steps are recorded as
    skipped, so a slow GPU cannot eat the pipeline section's time."""
    skipped = torch_only(backend, providers, "static graphs, device decoding and CUDA graphs are paths "
                                             "of the torch backend")
    if skipped:
        return skipped
    import torch

    cuda = any(p in ("cuda", "tensorrt") for p in providers) and torch.cuda.is_available()
    t_start = time.monotonic()
    pool, _ = frames_for(max(buckets))
    out: dict[str, Any] = {
        "backend": backend, "providers": providers, "device": "cuda:0" if cuda else "cpu", "fp16": cuda,
        "buckets": list(buckets), "reps": reps, "paths": PATHS,
        "syncs_by": "CUDA sync debug warnings in one model.run" if cuda else
                    "host reads (count_host_reads) in one backend forward on the CPU",
        "check": f"one run's detections on its first {min(check_frames, len(pool))} frames against ONNX "
                 "Runtime CPU (IoU >= 0.7, reference scores >= threshold + 0.1)",
        "budget_s": budget_s, "models": {}}
    for name, (cls, kw) in model_classes().items():
        if time.monotonic() - t_start > budget_s:
            out["models"][name] = {"skipped": "time budget", "rows": []}
            continue
        ref = cls(providers=["cpu"], backend="onnxruntime", **kw).run(pool[:check_frames])
        rows: dict[int, dict[str, Any]] = {b: {"bucket": b} for b in buckets}
        out["models"][name] = {"rows": list(rows.values())}
        for path, flags in PATHS.items():
            if time.monotonic() - t_start > budget_s:
                for row in rows.values():
                    row[path] = {"skipped": "time budget"}
                continue
            try:
                model = cls(providers=providers, backend="torch", buckets=buckets, **flags, **kw)
            except Exception as e:  # one path that cannot be built must not lose the others
                for row in rows.values():
                    row[path] = {"error": f"{type(e).__name__}: {e}"}
                continue
            for b in buckets:
                if time.monotonic() - t_start > budget_s:
                    rows[b][path] = {"skipped": "time budget"}
                    continue
                try:
                    rows[b][path] = time_path(model, pool[:b], ref, kw["threshold"] + 0.1, reps, warm,
                                              flags["device_decode"], flags["cuda_graphs"])
                except Exception as e:
                    rows[b][path] = {"error": f"{type(e).__name__}: {e}"}
            del model
            if cuda:
                torch.cuda.empty_cache()
        say(f"paths {name}: " + "; ".join(
            f"b{r['bucket']} " + " / ".join(f"{p} {r[p].get('fps', '-')} fps {r[p].get('syncs', '-')} syncs"
                                             for p in PATHS) for r in rows.values()))
        if save is not None:
            save(out)
    out["seconds"] = round(time.monotonic() - t_start, 1)
    return out


def time_path(model: Any, frames: list[np.ndarray], ref: list, min_score: float, reps: int, warm: int,
              device_decode: bool, graphs: bool) -> dict[str, Any]:
    """One path at one bucket: median ms of ``model.run``, then one checked run (syncs, decoding,
    detections against ``ref``) and one counted forward. The sync count is the point: each is a
    stall on a GPU, and a CUDA graph can hold none."""
    import torch

    from stream.detect.device import DeviceFrames, torch_device_ok
    from stream.detect.static_graph import count_host_reads, host_tensors

    on_dev = model.on_gpu and torch_device_ok(model.device)

    def upload() -> Any:
        return DeviceFrames(frames, model.device) if on_dev else None

    def go() -> list:
        return model.run(frames, upload())

    chunks = model.prepare(frames, upload())
    backends = list({id(bk): bk for bk in (model.backend_for(*c.canvas) for c in chunks)}.values())
    # the replays this bucket adds are its own (a shape's replay is replaced in place once its
    # static graph is ready)
    known = [len(bk.replays()) for bk in backends]
    if any(hasattr(bk, "wait_static") for bk in backends):  # static graphs are built off the hot path
        go()
        for bk in backends:
            if hasattr(bk, "wait_static"):
                bk.wait_static()
    row: dict[str, Any] = {"frames": len(frames), "canvas": list(chunks[0].canvas)}
    row["run_ms"] = round(timed(go, reps, warm), 3)
    row["fps"] = round(len(frames) * 1000 / row["run_ms"], 1)

    allowed = [t for bk in backends for m in bk.modules_for(tuple(chunks[0].x.shape)) if m is not None
               for t in host_tensors(m)]
    on_device, on_host = model.decoded_on_device, model.decoded_on_host
    cuda = model.device.startswith("cuda")
    with warnings.catch_warnings(record=True) as caught, count_host_reads(allowed) as run_reads:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            got = go()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    sync()
    row["host_reads_run"] = len(run_reads)
    bk = model.backend_for(*chunks[0].canvas)
    with torch.inference_mode(), count_host_reads(allowed) as fwd_reads:
        bk.run_device(chunks[0].x)
    sync()
    row["host_reads_forward"] = len(fwd_reads)
    row["syncs"] = sum(SYNC_WARNING in str(w.message) for w in caught) if cuda else len(fwd_reads)
    if device_decode:
        row["decoded_on_device"] = model.decoded_on_device - on_device
        row["decoded_on_host"] = model.decoded_on_host - on_host
    if graphs:
        new = [r for bk, n in zip(backends, known, strict=True) for r in bk.replays()[n:]]
        row["graphs"] = {"shapes": len(new), "captured": sum(r.captured for r in new),
                         "replays": sum(r.replays for r in new),
                         "failed": sorted({r.failed for r in new if r.failed})}
    k = min(len(frames), len(ref))
    row["vs_ort_cpu"] = compare(ref[:k], got[:k], min_score)
    return row


# -- 7. pipeline -----------------------------------------------------------------------------------
def covered(gt: tuple[int, int, int, int], regions: list[Any]) -> bool:
    """True when painted regions cover at least 80% of a ground-truth box (ellipses counted by the
    box inscribed in them)."""
    gx1, gy1, gx2, gy2 = gt
    mask = np.zeros((gy2 - gy1, gx2 - gx1), bool)
    for r in regions:
        x1, y1, x2, y2 = r.box
        if r.shape == "ellipse":
            cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2 / 2**0.5, (y2 - y1) / 2 / 2**0.5
            x1, y1, x2, y2 = cx - hw, cy - hh, cx + hw, cy + hh
        a, b = int(max(x1, gx1) - gx1), int(max(y1, gy1) - gy1)
        c, d = int(min(x2, gx2) - gx1), int(min(y2, gy2) - gy1)
        if c > a and d > b:
            mask[b:d, a:c] = True
    return mask.mean() >= 0.8


def build_detector(backend: str, providers: list[str], buckets: tuple[int, ...], max_batch: int) -> Any:
    """The pipeline's detector, warmed for every bucket up to ``max_batch``.

    Module-level so that a ``functools.partial`` of it pickles into the stage process, which calls
    it on its batcher's worker thread (where cuDNN keeps the plans it tunes)."""
    from stream.detect.ensemble import FrameDetector

    det = FrameDetector(detector_config_for(backend, providers, buckets))
    det.warmup(max_batch=max_batch)
    return det


def stage_config(buckets: tuple[int, ...], max_batch: int, max_wait_ms: float, deadline_ms: float,
                 inflight: int | None, queue_size: int = 2) -> Any:
    """The shared stage's PipelineConfig: the batcher and deadline the per-process workers use, and
    their hang timeout (10 s), so the two modes differ only in where the batcher runs."""
    from stream.config import parse_config

    return parse_config({"streams": [], "queue_size": queue_size,
                         "batcher": {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "inflight": inflight,
                                     "buckets": sorted({*buckets, 1})},
                         "fail_closed": {"max_latency_ms": deadline_ms, "hang_timeout_ms": 10_000}})


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its threads (Linux /proc; psutil elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        pass
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except Exception:
        return float("nan")


class SharedStage:
    """The product's detection stage process (``stage_main``), started once for the pipeline section
    and shared by every worker process, as ``run --workers N`` runs it."""

    def __init__(self, config: Any, factory: Any, timeout_s: float = 300.0) -> None:
        from stream.live.frame_ring import shm_root
        from stream.live.stage_process import stage_main

        self.run_dir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.address = str(self.run_dir / "stage.sock")  # short: a Unix socket path has ~100 bytes
        self.authkey = os.urandom(32)
        self.shm_dir = shm_root()
        self.prefix = f"gpu-check-{os.getpid()}-"
        self.status: dict[str, Any] = {}
        ctx = mp.get_context("spawn")
        self.conn, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=stage_main, name="gpu-check-stage", daemon=True, kwargs={
            "config": config, "address": self.address, "authkey": self.authkey, "shm_dir": str(self.shm_dir),
            "report": send, "parent_pid": os.getpid(), "log_level": logging.WARNING, "factory": factory})
        self.proc.start()
        send.close()  # the child holds the only write end: its death is EOF here
        try:
            self._await_ready(timeout_s)
        except BaseException:
            self.close()
            raise
        threading.Thread(target=self._drain, name="stage-heartbeat", daemon=True).start()

    def _await_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if not self.conn.poll(0.5):
                    continue
                kind, body = self.conn.recv()
            except (EOFError, OSError):
                self.proc.join(5)
                raise RuntimeError(f"stage process exited at start (code {self.proc.exitcode})") from None
            if kind == "failed":
                raise RuntimeError(f"stage process failed to start: {body}")
            if kind == "alive":
                self.status = body
                if body.get("ready"):
                    return
        raise RuntimeError(f"stage process not ready within {timeout_s:.0f} s")

    def _drain(self) -> None:
        """Read its heartbeats: unread, they would fill the pipe and stall its heartbeat thread."""
        with contextlib.suppress(EOFError, OSError):
            while True:
                kind, body = self.conn.recv()
                if kind == "alive":
                    self.status = body

    def spec(self, name: str) -> dict[str, Any]:
        """What a worker process needs to reach the stage (picklable)."""
        return {"address": self.address, "authkey": self.authkey, "shm_dir": str(self.shm_dir),
                "prefix": f"{self.prefix}{name}-"}

    def counters(self) -> dict[str, float]:
        """The stage's batch counters from its metrics endpoint; empty where it does not answer."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        wanted = {"stream_redact_batch_size_count": "batches", "stream_redact_batch_size_sum": "frames",
                  "stream_redact_inference_seconds_sum": "run_s",
                  "stream_redact_detector_restarts_total": "restarts"}
        port = self.status.get("port")
        if not port:
            return {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in wanted:
                    out[wanted[s.name]] = out.get(wanted[s.name], 0.0) + s.value
        return out

    def close(self) -> None:
        """SIGTERM (it stops its batcher), then kill; its workers' slot files and the socket go."""
        from stream.live.frame_ring import remove_prefix

        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(2)
        self.conn.close()
        remove_prefix(self.shm_dir, self.prefix)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _worker(conn: Any, backend: str, providers: list[str], buckets: tuple[int, ...], max_batch: int,
            max_wait_ms: float, deadline_ms: float, fps: float, seed: int, inflight: int | None,
            stage: dict[str, Any] | None = None, picture: str = "bgr") -> None:
    """A pipeline process: its own detector and batcher (``stage`` None), or a RemoteStage to the
    shared stage process; runs the stream counts it is sent. ``picture`` ``i420``: its streams'
    frames are I420, as the product's decoders give them, and cross to the stage as such."""
    calls: list[tuple[float, float, int]] = []
    try:
        batcher = _open_batcher(backend, providers, buckets, max_batch, max_wait_ms, inflight, stage, calls,
                                f"gpu-check-worker-{seed}")
    except Exception as e:  # the detector cannot load, or the stage is not there: say why
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    scene = Scene(seed=seed)
    ring = [scene.render(t) for t in range(48)]
    if picture == "i420":
        from stream.core.yuv import I420

        ring = [(I420.from_bgr(image), gt) for image, gt in ring]
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg is None:
            batcher.stop()
            return
        calls.clear()
        stats = _step(batcher, calls, ring, msg, deadline_ms, fps)
        conn.send({"streams": stats, "batches": len(calls), "frames": sum(c[2] for c in calls),
                   "run_s": sum(c[1] for c in calls)})


def _open_batcher(backend: str, providers: list[str], buckets: tuple[int, ...], max_batch: int,
                  max_wait_ms: float, inflight: int | None, stage: dict[str, Any] | None,
                  calls: list[tuple[float, float, int]], name: str) -> Any:
    """A started Batcher over this process's own detector (its runs appended to ``calls``), or a
    connected RemoteStage; raises where it cannot get ready."""
    from stream.core.metrics import Metrics

    metrics = Metrics()
    batcher: Any
    if stage is None:
        from stream.detect.ensemble import FrameDetector
        from stream.live.batcher import Batcher

        det = FrameDetector(detector_config_for(backend, providers, buckets))

        class Timed:
            """The detector with its prepare/complete halves (two batches in flight), runs timed."""

            device = det.device

            def prepare(self, images: list, seqs: Any = None) -> Any:
                return time.monotonic(), len(images), det.prepare(images, seqs)

            def complete(self, work: Any) -> Any:
                t, n, prepared = work
                out = det.complete(prepared)
                calls.append((t, time.monotonic() - t, n))
                return out

            def __call__(self, images: list, seqs: Any = None) -> Any:
                return self.complete(self.prepare(images, seqs))

        def factory() -> Any:  # runs on the batcher's worker thread, as the product's factory does
            det.warmup(max_batch=max_batch)
            return Timed()

        batcher = Batcher(factory, metrics, max_batch=max_batch, max_wait_s=max_wait_ms / 1000,
                          hang_timeout_s=10, inflight=inflight)
    else:
        from stream.live.frame_ring import SlotWriter
        from stream.live.remote_stage import RemoteStage

        slots = SlotWriter(Path(stage["shm_dir"]), stage["prefix"])
        batcher = RemoteStage(stage["address"], stage["authkey"], slots, metrics, name=name,
                              connect_timeout_s=60)
    batcher.start()  # a Batcher has loaded its detector; a RemoteStage is connected, or gave up
    deadline = time.monotonic() + 60
    while not batcher.ready and time.monotonic() < deadline:
        time.sleep(0.05)  # the stage says it is ready in its first message after the connection
    if not batcher.ready:
        batcher.stop()
        raise RuntimeError("the detection stage did not answer as ready within 60 s")
    return batcher


def _step(batcher: Any, calls: list, ring: list, msg: tuple, deadline_ms: float, fps: float) -> list[dict]:
    """One K step in a worker: its streams produced at ``fps``, batched, tracked and painted."""
    from stream.core.detections import Detections
    from stream.core.frames import Drop, Failure, Frame, Job, JobQueue
    from stream.core.redact import RedactConfig, Redactor
    from stream.core.track import Tracker, TrackerConfig

    n_streams, start_at, seconds, warm_s, prefix = msg
    stats = [{"sent": 0, "published": 0, "blanked": 0, "dropped": 0, "lat": [], "gt": {}, "leaks": {}}
             for _ in range(n_streams)]
    stop = threading.Event()
    threads = []

    def produce(i: int, q: JobQueue, ordered: deque, cond: threading.Condition) -> None:
        st = stats[i]
        t0 = start_at
        t = 0
        while not stop.is_set():
            due = t0 + t / fps
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            if time.time() > start_at + warm_s + seconds:
                break
            image, gt = ring[(t + i * 5) % len(ring)]
            now = time.monotonic()
            frame = Frame(f"{prefix}{i}", t, image.copy(), now, time.time())  # a decoder's new buffer
            job = Job(frame, deadline=now + deadline_ms / 1000)
            job.gt = gt  # type: ignore[attr-defined]
            job.measured = time.time() >= start_at + warm_s  # type: ignore[attr-defined]
            if job.measured:
                st["sent"] += 1
            evicted = q.put(job)
            if evicted is not None:
                evicted.resolve(dropped=Drop.QUEUE_FULL)
            with cond:
                ordered.append(job)
                cond.notify()
            t += 1
        with cond:
            ordered.append(None)
            cond.notify()

    def consume(i: int, ordered: deque, cond: threading.Condition) -> None:
        st = stats[i]
        tracker, redactor = Tracker(TrackerConfig()), Redactor(RedactConfig())
        while True:
            with cond:
                while not ordered:
                    cond.wait()
                job = ordered.popleft()
            if job is None:
                return
            if not job.wait(max(0.0, job.deadline - time.monotonic())):
                job.resolve(failure=Failure.DEADLINE)
            if job.dropped is not None:
                st["dropped"] += job.measured
                continue
            if job.detections is None:
                tracker.update(Detections(observed=frozenset()))
                st["blanked"] += job.measured
                why = st.setdefault("why", {})
                reason = job.failure.value if job.failure else "none"
                why[reason] = why.get(reason, 0) + 1
                continue
            tracked = tracker.update(job.detections)
            regions = redactor.apply(job.frame.image, tracked)
            lat = (time.monotonic() - job.frame.captured_at) * 1000
            if job.measured:
                st["published"] += 1
                st["lat"].append(lat)
                for label, boxes in job.gt.items():
                    mine = [r for r in regions if r.label == label]
                    st["gt"][label] = st["gt"].get(label, 0) + len(boxes)
                    st["leaks"][label] = st["leaks"].get(label, 0) + sum(not covered(b, mine) for b in boxes)

    for i in range(n_streams):
        q = JobQueue(f"{prefix}{i}", 2)
        batcher.attach(q)
        ordered: deque = deque()
        cond = threading.Condition()
        threads += [threading.Thread(target=produce, args=(i, q, ordered, cond), daemon=True),
                    threading.Thread(target=consume, args=(i, ordered, cond), daemon=True)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(warm_s + seconds + 30)
    stop.set()
    for i in range(n_streams):
        batcher.detach(f"{prefix}{i}")
    if calls:
        d = sorted(c[1] for c in calls)
        say(f"worker {prefix}: {len(calls)} detector calls, "
            f"mean batch {statistics.mean(c[2] for c in calls):.1f}, "
            f"ms p50 {d[len(d) // 2] * 1000:.0f} max {d[-1] * 1000:.0f}; failures "
            + str([s.get("why") for s in stats]))
    return stats


class Usage:
    """GPU utilisation (NVML, sampled every 0.2 s) and CPU cores used by the workers and the stage
    process over a step."""

    def __init__(self, pids: list[int], stage_pid: int | None = None) -> None:
        self.pids, self.stage_pid = pids, stage_pid
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._cpu0 = self._stage0 = 0.0
        self._t0 = 0.0
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml: Any = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            self.nvml = None

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            u = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
            m = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            self.samples.append((u.gpu, m.used / 2**30))

    def _stage(self) -> float:
        return _cpu_seconds(self.stage_pid) if self.stage_pid is not None else 0.0

    def begin(self) -> None:
        self._cpu0, self._stage0 = sum(map(_cpu_seconds, self.pids)), self._stage()
        self._t0 = time.monotonic()
        if self.nvml is not None:
            threading.Thread(target=self._sample, daemon=True).start()

    def end(self) -> dict[str, Any]:
        self._stop.set()
        dt = max(1e-6, time.monotonic() - self._t0)
        workers = sum(map(_cpu_seconds, self.pids)) - self._cpu0
        out: dict[str, Any] = {"worker_cpu_cores": round(workers / dt, 2)}
        if self.stage_pid is not None:
            out["stage_cpu_cores"] = round((self._stage() - self._stage0) / dt, 2)
        if self.samples:
            util = [u for u, _ in self.samples]
            out.update(gpu_util_mean=round(statistics.mean(util), 1), gpu_util_max=max(util),
                       gpu_mem_gib=round(max(m for _, m in self.samples), 2))
        return out


class Workers:
    """P pipeline processes, kept across K steps: each with its own detector and batcher, or each
    sending its frames to the one shared stage process."""

    def __init__(self, procs: int, backend: str, providers: list[str], buckets: tuple[int, ...],
                 max_batch: int, max_wait_ms: float, deadline_ms: float, fps: float,
                 inflight: int | None = None, stage: SharedStage | None = None,
                 timeout_s: float = 300.0, picture: str = "bgr") -> None:
        ctx = mp.get_context("spawn")
        self.stage, self.conns, self.procs = stage, [], []
        try:
            for i in range(procs):
                a, b = ctx.Pipe()
                spec = stage.spec(f"P{procs}w{i}") if stage is not None else None
                p = ctx.Process(target=_worker, args=(b, backend, providers, buckets, max_batch, max_wait_ms,
                                                      deadline_ms, fps, i, inflight, spec, picture),
                                daemon=True)
                p.start()
                self.conns.append(a)
                self.procs.append(p)
            deadline = time.monotonic() + timeout_s
            for i, c in enumerate(self.conns):
                if not c.poll(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"worker {i} not ready within {timeout_s:.0f} s")
                try:
                    kind, why = c.recv()
                except EOFError:
                    kind, why = "failed", f"exited (code {self.procs[i].exitcode}); see its traceback above"
                if kind != "ready":
                    raise RuntimeError(f"worker {i} failed to start: {why}")
        except BaseException:
            self.close()
            raise

    def run(self, k: int, seconds: float, warm_s: float) -> tuple[list[dict], dict[str, Any]]:
        """Per-stream stats, and the step's batches, GPU utilisation and CPU use (where measurable)."""
        n = len(self.conns)
        split = [k // n + (1 if i < k % n else 0) for i in range(n)]
        start_at = time.time() + 1.0
        for i, (c, m) in enumerate(zip(self.conns, split, strict=True)):
            c.send((m, start_at, seconds, warm_s, f"P{n}p{i}s"))
        usage = Usage([p.pid for p in self.procs], self.stage.proc.pid if self.stage is not None else None)
        time.sleep(max(0.0, start_at + warm_s - time.time()))
        before = self.stage.counters() if self.stage is not None else {}
        usage.begin()
        out: list[dict] = []
        batches = {"batches": 0.0, "frames": 0.0, "run_s": 0.0}
        for c in self.conns:
            got = c.recv()
            out.extend(got["streams"])
            for key in batches:
                batches[key] += got[key]
        used = usage.end()
        if self.stage is not None:  # the stage batches for every worker: its own counters say how
            after = self.stage.counters()
            batches = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in batches}
            used["stage_detector_restarts"] = int(after.get("restarts", 0.0))
        b = batches["batches"]
        used.update(batches=int(b), mean_batch=round(batches["frames"] / b, 2) if b else None,
                    batch_ms=round(batches["run_s"] * 1000 / b, 1) if b else None)
        return out, used

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError, ValueError):
                c.send(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(2)


def summarise(k: int, stats: list[dict], fps: float, seconds: float) -> dict[str, Any]:
    lat = np.array([x for s in stats for x in s["lat"]] or [np.nan])
    sent = sum(s["sent"] for s in stats)
    pub = sum(s["published"] for s in stats)
    gt: dict[str, int] = {}
    leaks: dict[str, int] = {}
    for s in stats:
        for label, v in s["gt"].items():
            gt[label] = gt.get(label, 0) + v
        for label, v in s["leaks"].items():
            leaks[label] = leaks.get(label, 0) + v
    worst_stream = min((s["published"] / s["sent"] for s in stats if s["sent"]), default=0.0)
    row = {"streams": k, "sent": sent, "published": pub,
           "delivered_ratio": round(pub / sent, 4) if sent else 0.0,
           "worst_stream_ratio": round(worst_stream, 4),
           "delivered_fps": round(pub / seconds, 1),
           "fps_per_stream": round(pub / max(1, k) / seconds, 2),
           "blanked": sum(s["blanked"] for s in stats), "dropped": sum(s["dropped"] for s in stats),
           **{f"p{q}_ms": round(float(np.percentile(lat, q)), 1) for q in (50, 95, 99)},
           "ground_truth": gt, "leaks": leaks,
           "leak_rate": {lb: round(leaks.get(lb, 0) / n, 5) for lb, n in gt.items() if n}}
    row["held"] = bool(row["p99_ms"] < 250 and row["worst_stream_ratio"] >= 0.97 and not row["blanked"]
                       and not row["dropped"])
    return row


def pipeline(backend: str, providers: list[str], buckets: tuple[int, ...], ks: list[int], procs: list[int],
             seconds: float, warm_s: float, budget_s: float, inflight: int | None = None,
             stage: str = "shared", fps: float = 30.0, max_wait_ms: float = 8.0, deadline_ms: float = 1000.0,
             save: Any = None, picture: str = "bgr") -> dict[str, Any]:
    """The K ramp for each worker-process count in turn; ``save(result)`` after every step, so a run
    cut off by its time limit still reports what it measured.

    ``budget_s`` covers the whole section (stage start included); each process count gets an
    equal share of what is left, so the last ones are not starved by a slow start."""
    max_batch = max(buckets)
    t_start = time.monotonic()
    out: dict[str, Any] = {
        "stage": stage, "picture": picture, "fps": fps, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
        "deadline_ms": deadline_ms, "procs": procs, "inflight": inflight or "default (2 on a GPU)",
        "seconds": seconds, "runs": [], "largest_k_held": {}, "steps": []}

    def saved() -> None:
        if save is not None:
            save(out)

    saved()
    shared: SharedStage | None = None
    try:
        if stage == "shared":
            factory = functools.partial(build_detector, backend, providers, buckets, max_batch)
            config = stage_config(buckets, max_batch, max_wait_ms, deadline_ms, inflight)
            shared = SharedStage(config, factory)
            out["stage_startup_s"] = round(time.monotonic() - t_start, 1)
            say(f"pipeline: shared stage process ready in {out['stage_startup_s']} s")
            saved()
        for n, p in enumerate(procs):
            left = budget_s - (time.monotonic() - t_start)
            p_deadline = time.monotonic() + left / (len(procs) - n)
            run: dict[str, Any] = {"procs": p}
            out["runs"].append(run)
            if left < seconds + warm_s + 10:
                run["skipped"] = "time budget"
                say(f"pipeline: time budget reached before {p} procs")
                saved()
                continue
            t = time.monotonic()
            try:
                workers = Workers(p, backend, providers, buckets, max_batch, max_wait_ms, deadline_ms, fps,
                                  inflight, shared, picture=picture)
            except Exception as e:  # one process count that cannot start must not lose the others
                run["error"] = f"{type(e).__name__}: {e}"
                say(f"pipeline {p} procs FAILED to start: {run['error']}")
                saved()
                continue
            run["startup_s"] = round(time.monotonic() - t, 1)
            say(f"pipeline: {p} worker processes ({stage} stage) ready in {run['startup_s']} s")
            try:
                for k in ks:
                    if time.monotonic() + seconds + warm_s + 5 > p_deadline:
                        run["stopped"] = f"time budget before K={k}"
                        say(f"pipeline {p} procs: time budget reached before K={k}")
                        break
                    stats, usage = workers.run(k, seconds, warm_s)
                    row = {"stage": stage, "procs": p} | summarise(k, stats, fps, seconds) | usage
                    out["steps"].append(row)
                    held = [r["streams"] for r in out["steps"] if r["procs"] == p and r["held"]]
                    out["largest_k_held"][str(p)] = max(held) if held else 0
                    saved()
                    say(f"pipeline {stage} P={p} K={k}: delivered {row['delivered_ratio']:.3f} "
                        f"({row['delivered_fps']} fps, worst stream {row['worst_stream_ratio']:.3f}), "
                        f"blanked {row['blanked']}, dropped {row['dropped']}, p50/p95/p99 {row['p50_ms']}/"
                        f"{row['p95_ms']}/{row['p99_ms']} ms, leaks {row['leaks']} of {row['ground_truth']} "
                        f"-> {'held' if row['held'] else 'FAILED'}; usage {usage}")
                    if not row["held"]:
                        break
            finally:
                workers.close()
    finally:
        if shared is not None:
            shared.close()
    saved()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="few reps, buckets 1-8 (paths: 1 and 8), small K: a dry run of every section")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="on the CPU only: the paths section (torch on the CPU, buckets 1 and 2, one rep) "
                         "and the pipeline section (ONNX Runtime, 2 streams in 2 processes for 1.5 s): "
                         "proves the GPU run's code paths in well under a minute")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    ap.add_argument("--clip", type=Path, default=ROOT / ".gpu" / "clip_1080p30.mp4")
    ap.add_argument("--ks", default="", help="comma-separated stream counts for the pipeline ramp")
    ap.add_argument("--stage", choices=["shared", "per-process"], default="shared",
                    help="shared: one detection stage process batches for every worker process (as "
                         "run --workers N does); per-process: each worker process has its own batcher and "
                         "detector")
    ap.add_argument("--procs", default=None,
                    help="comma-separated worker process counts, each ramped in turn, e.g. 1,4,8,14 "
                         "(default 1; 2 with --cpu-smoke)")
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per K step")
    ap.add_argument("--budget", type=float, default=240.0,
                    help="seconds the whole pipeline section may take (stage start included)")
    ap.add_argument("--inflight", type=int, choices=[1, 2, 3, 4], default=None,
                    help="batches in flight in the pipeline section (default: the product's, 2 on a GPU)")
    ap.add_argument("--fps", type=float, default=30.0, help="frames/s of each synthetic stream")
    ap.add_argument("--frames", choices=["bgr", "i420"], default="bgr",
                    help="the pipeline's frames: BGR arrays, or I420 pictures as the product's decoders "
                         "give them (they cross to the stage and up to the GPU as I420)")
    ap.add_argument("--max-wait-ms", type=float, default=8.0,
                    help="the batcher's longest wait to fill a batch")
    ap.add_argument("--deadline-ms", type=float, default=1000.0,
                    help="capture-to-detections deadline (fail_closed.max_latency_ms); later frames are "
                         "blanked")
    ap.add_argument("--skip", default="",
                    help="comma-separated sections to skip: correctness, models, preprocess, detector, "
                         "decode, breakdown, paths, pipeline")
    ap.add_argument("--paths-budget", type=float, default=180.0,
                    help="seconds the paths section may take; later steps are recorded as skipped")
    ap.add_argument("--backend", choices=["auto", "onnxruntime", "torch"], default="auto",
                    help="force a backend (with --providers), e.g. torch on the CPU for a dry run")
    ap.add_argument("--providers", default="", help="comma-separated, e.g. cpu or tensorrt,cuda,cpu")
    ap.add_argument("--buckets", default="",
                    help="comma-separated batch buckets of the models, detector and pipeline sections "
                         f"(default {','.join(map(str, BUCKETS))})")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    backend, providers = gpu_path()
    if args.backend != "auto":
        backend, providers = args.backend, (args.providers or "cpu").split(",")
    buckets = (1, 2, 4, 8) if args.quick else BUCKETS
    if args.buckets:
        buckets = tuple(sorted({1, *(int(b) for b in args.buckets.split(","))}))
    path_buckets = (1, 8) if args.quick else PATH_BUCKETS
    reps = 2 if args.quick else 10
    path_reps, path_warm = reps, 2
    # the paths section measures the torch backend's paths: on the run's backend, or torch on the CPU
    paths_backend, paths_providers = backend, providers
    # the breakdown reads the frames on the device: the torch backend's path (a GPU's, or the CPU's)
    breakdown_args = (backend, providers, buckets, reps)
    seconds, warm_s = (2.0, 1.0) if args.quick else (args.seconds, 2.0)
    procs_arg, ks_default = args.procs or "1", [1, 2] if args.quick else RAMP
    fps, deadline_ms = args.fps, args.deadline_ms
    if args.cpu_smoke:
        # 1080p "accurate" on 2 CPU cores: ~0.4 s a frame, so few frames a second and a long deadline;
        # the point is that every step of the GPU run executes, not its numbers
        backend, providers = ("onnxruntime", ["cpu"]) if args.backend == "auto" else (backend, providers)
        skip |= {"correctness", "models", "preprocess", "detector", "decode"}
        buckets, seconds, warm_s, ks_default = (1, 2), 1.5, 0.5, [2]
        # paths: torch on the CPU (or as --backend torch --providers say), one unwarmed rep per step
        path_buckets, path_reps, path_warm = (1, 2), 1, 0
        paths_backend, paths_providers = "torch", providers if backend == "torch" else ["cpu"]
        breakdown_args = (paths_backend, paths_providers, (1,), 1)
        procs_arg, fps, deadline_ms = args.procs or "2", 5.0, 5000.0
    result: dict[str, Any] = {"environment": environment(), "backend": backend, "providers": providers}
    say(f"path: backend={backend} providers={providers} env={result['environment']}")
    t0 = time.monotonic()

    def save_paths(partial: dict[str, Any]) -> None:
        result["paths"] = partial
        write(args.out, result)

    sections = [
        ("correctness", lambda: correctness(backend, providers, 4 if args.quick else 12)),
        ("models", lambda: model_timings(backend, providers, buckets, reps)),
        ("preprocess", lambda: preprocess_compare(backend, providers, reps)),
        ("detector", lambda: detector_timings(backend, providers, buckets, reps)),
        ("decode", lambda: decode_timing(args.clip)),
        ("breakdown", lambda: breakdown(*breakdown_args)),
        ("paths", lambda: path_timings(paths_backend, paths_providers, path_buckets, path_reps, path_warm,
                                       budget_s=args.paths_budget, save=save_paths)),
    ]
    for name, fn in sections:
        if name in skip:
            continue
        t = time.monotonic()
        try:
            result[name] = fn()
        except Exception as e:  # one broken section must not lose the others' numbers
            say(f"{name} FAILED: {type(e).__name__}: {e}")
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        result.setdefault("section_seconds", {})[name] = round(time.monotonic() - t, 1)
        write(args.out, result)
    if "pipeline" not in skip:
        ks = [int(k) for k in args.ks.split(",")] if args.ks else ks_default
        # more processes than streams would leave some idle: the count is capped at the largest K
        procs = list(dict.fromkeys(min(max(1, int(p)), max(ks)) for p in procs_arg.split(",")))

        def save(partial: dict[str, Any]) -> None:
            result["pipeline"] = partial
            write(args.out, result)

        t = time.monotonic()
        try:
            result["pipeline"] = pipeline(backend, providers, buckets, ks, procs, seconds, warm_s,
                                          args.budget, args.inflight, args.stage, fps, args.max_wait_ms,
                                          deadline_ms, save, args.frames)
        except Exception as e:
            say(f"pipeline FAILED: {type(e).__name__}: {e}")
            result["pipeline"] = {**result.get("pipeline", {}), "error": f"{type(e).__name__}: {e}"}
        result.setdefault("section_seconds", {})["pipeline"] = round(time.monotonic() - t, 1)
    result["total_seconds"] = round(time.monotonic() - t0, 1)
    write(args.out, result)
    table(result)
    return 0


def write(out: Path, result: dict[str, Any]) -> None:
    """Replace the JSON whole (written beside, then renamed): a run killed mid-write leaves the last one."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(out / "gpu_check.json")


def table(r: dict[str, Any]) -> None:
    print("\n## GPU check:", r["environment"].get("gpu", "no GPU"), "| backend", r["backend"], r["providers"])
    det = r.get("detector")
    if isinstance(det, dict):
        print("| detector path | bucket | ms/batch | frames/s | 1080p30 streams |\n|---|---|---|---|---|")
        for name, d in (det.get("paths") or {det.get("path", "-"): det}).items():
            if "buckets" not in d:
                print(f"| {name} | - | {d.get('error', '-')} | | |")
            for b in d.get("buckets", []):
                print(f"| {name} | {b['bucket']} | {b['ms']} | {b['fps']} | {b['streams_1080p30']} |")
    paths_table(r.get("paths"))
    p = r.get("pipeline", {})
    if p.get("steps"):
        print("\n| stage | procs | K | delivered | fps | blanked | dropped | p50 | p99 | leaks | mean batch "
              "| worker / stage cores | GPU % | held |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s in p["steps"]:
            print(f"| {s['stage']} | {s['procs']} | {s['streams']} | {s['delivered_ratio']} "
                  f"| {s['delivered_fps']} | {s['blanked']} | {s['dropped']} | {s['p50_ms']} | {s['p99_ms']} "
                  f"| {s['leaks']} "
                  f"| {s.get('mean_batch')} | {s.get('worker_cpu_cores')} / {s.get('stage_cpu_cores', '-')} "
                  f"| {s.get('gpu_util_mean', '-')} | {s['held']} |")
        print(f"largest K held per process count: {p['largest_k_held']}")


def paths_table(paths: dict[str, Any] | None) -> None:
    """The paths section in one line per model and bucket: the speed of each path next to its syncs,
    and a note only where something is off (a wrong box, a host fallback, a graph not captured)."""
    if not isinstance(paths, dict) or not paths:
        return
    if "models" not in paths:
        print(f"\npaths: {paths.get('skipped') or paths.get('error')}")
        return
    names = list(PATHS)
    print(f"\npaths on {paths['device']} (syncs: {paths['syncs_by']})")
    print(f"| model | bucket | fps {' / '.join(names)} | syncs {' / '.join(names)} | notes |")
    print("|---|---|---|---|---|")
    for model, m in paths["models"].items():
        if m.get("skipped"):
            print(f"| {model} | - | - | - | {m['skipped']} |")
        for row in m["rows"]:
            cells = [row.get(name) or {} for name in names]
            fps = " / ".join(str(c.get("fps", "-")) for c in cells)
            syncs = " / ".join(str(c.get("syncs", "-")) for c in cells)
            print(f"| {model} | {row['bucket']} | {fps} | {syncs} | {path_notes(row, paths['device'])} |")


def path_notes(row: dict[str, Any], device: str) -> str:
    """What is off in one model and bucket of the paths section, path by path; ``ok`` when nothing."""
    notes = []
    for name in PATHS:
        c = row.get(name) or {}
        why = c.get("error") or c.get("skipped")
        if why:
            notes.append(f"{name}: {str(why)[:60]}")
            continue
        rate = (c.get("vs_ort_cpu") or {}).get("match_rate")
        if rate is not None and rate < 1.0:
            notes.append(f"{name} match {rate}")
        if c.get("decoded_on_host"):
            notes.append(f"{name} host-decoded {c['decoded_on_host']}")
        g = c.get("graphs")
        if g and device.startswith("cuda") and g["captured"] < g["shapes"]:
            notes.append(f"{name} graphs {g['captured']}/{g['shapes']} captured"
                         + (f" ({g['failed'][0][:60]})" if g["failed"] else ""))
    return "; ".join(notes) or "ok"


if __name__ == "__main__":
    sys.exit(main())
