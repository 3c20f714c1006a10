"""The GPU stage's code paths, checked on the CPU: backend choice, buckets, device preprocessing,
I/O binding, GPU metrics, NVDEC fallback, failing closed when the device errors, and the GPU check's
pipeline run."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import onnx
import pytest
from live_helpers import NoFaces, wait_for

from stream.config import parse_config
from stream.core.frames import Failure, Frame, Job, JobQueue
from stream.core.metrics import Metrics, sample
from stream.detect import backend as backend_mod
from stream.detect.backend import TRANSFERS, BackendError, OrtBackend, choose_backend, make_backend
from stream.detect.buckets import check_buckets, padding, plan
from stream.detect.ensemble import FrameDetector
from stream.detect.letterbox import letterbox_batch
from stream.detect.models import model_path
from stream.detect.presets import detector_config
from stream.detect.runtime import make_dynamic
from stream.detect.yolo import PersonYolo
from stream.detect.yunet import YuNet
from stream.live.batcher import Batcher
from stream.live.frame_ring import shm_root
from stream.live.gpu import GpuMonitor, load_nvml
from stream.live.sources.decode import open_video

ROOT = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "onnx2torch"))
CLIP = Path(__file__).parents[1] / ".samples" / "talking-face" / "WolfgangLanger_Pexels.mp4"  # setup.sh


def face_frame(width: int = 1280, height: int = 720) -> np.ndarray:
    """A real face (the astronaut fixture) on a plain wide frame."""
    face = cv2.imread(str(FIXTURES / "astronaut_256.jpg"))
    frame = np.full((height, width, 3), 90, np.uint8)
    frame[200:456, 400:656] = face
    return frame


# -- buckets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "buckets", "runs"), [
    (1, (1, 2, 4, 8, 16, 32), [(1, 1)]),
    (3, (1, 2, 4, 8, 16, 32), [(3, 4)]),          # 3 of 4 filled: one padded run
    (5, (1, 2, 4, 8, 16, 32), [(4, 4), (1, 1)]),  # 5 of 8 is too empty to pad
    (13, (1, 2, 4, 8, 16, 32), [(13, 16)]),
    (11, (1, 2, 4, 8, 16, 32), [(8, 8), (3, 4)]),
    (15, (1, 2, 4, 8, 16, 32), [(15, 16)]),
    (40, (1, 2, 4, 8, 16, 32), [(32, 32), (8, 8)]),
    (5, (1, 8), [(1, 1)] * 5),
    (7, (8, 1), [(7, 8)]),
])
def test_batches_split_into_buckets(n: int, buckets: tuple[int, ...], runs: list[tuple[int, int]]) -> None:
    got = plan(n, buckets)
    assert got == runs
    assert sum(f for f, _ in got) == n and all(b in buckets for _, b in got)
    assert padding(got) == sum(b - f for f, b in runs)


@pytest.mark.parametrize(("buckets", "words"),
                         [([], "positive"), ([2, 4], "include 1"), ([0, 1], "positive")])
def test_bad_buckets_are_refused(buckets: list[int], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        check_buckets(buckets)


def test_config_buckets_must_include_one() -> None:
    with pytest.raises(Exception) as err:
        parse_config({"streams": [], "batcher": {"buckets": [2, 4, 8]}})
    assert "batcher.buckets" in str(err.value) and "add 1" in str(err.value)
    cfg = parse_config({"streams": [], "batcher": {"buckets": [8, 1, 4, 4]}})
    assert cfg.batcher.buckets == [1, 4, 8]


def test_config_gpu_fields_are_checked() -> None:
    with pytest.raises(Exception) as err:
        parse_config({"streams": [], "detection": {"backend": "tensorflow"}})
    assert "detection.backend" in str(err.value)
    with pytest.raises(Exception) as err:
        parse_config({"streams": [{"id": "a", "source": {"type": "rtsp", "url": "rtsp://h/p",
                                                        "decode": "vaapi"}}]})
    assert "decode" in str(err.value)


# -- backend choice --------------------------------------------------------------------------------
def test_auto_backend_prefers_onnxruntime_and_uses_torch_only_when_it_alone_reaches_the_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_mod, "ort_gpu_available", lambda: False)
    monkeypatch.setattr(backend_mod, "torch_cuda_available", lambda: False)
    assert choose_backend("auto", ["cpu"]) == "onnxruntime"
    assert choose_backend("auto", ["cuda", "cpu"]) == "onnxruntime"  # CPU fallback, logged by ORT layer
    monkeypatch.setattr(backend_mod, "torch_cuda_available", lambda: True)
    assert choose_backend("auto", ["cuda", "cpu"]) == "torch"
    assert choose_backend("auto", ["cpu"]) == "onnxruntime"
    monkeypatch.setattr(backend_mod, "ort_gpu_available", lambda: True)
    assert choose_backend("auto", ["tensorrt", "cuda", "cpu"]) == "onnxruntime"
    assert choose_backend("torch", ["cpu"]) == "torch"


def test_gpu_providers_fall_back_to_cpu_with_a_warning(caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from stream.detect import runtime

    monkeypatch.setattr(runtime, "_warned", set())  # warned once per process: any earlier test may have
    model = make_dynamic(onnx.load(str(model_path("yunet"))))
    with caplog.at_level(logging.WARNING):
        b = make_backend(model, "onnxruntime", ["tensorrt", "cuda", "cpu"])
    assert b.name == "ort-cpu" and b.device == "cpu" and not b.on_gpu
    if not backend_mod.ort_gpu_available():
        assert "stream-redact[gpu]" in caplog.text


def test_torch_backend_without_torch_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_torch(name: str, *a, **k):
        if name in ("torch", "onnx2torch"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(BackendError, match="backend: onnxruntime"):
        make_backend(onnx.load(str(model_path("yunet"))), "torch", ["cuda"])


def test_io_binding_gives_the_plain_run_s_outputs() -> None:
    model = make_dynamic(onnx.load(str(model_path("yunet"))))
    x = np.random.default_rng(1).uniform(0, 255, (2, 3, 224, 320)).astype(np.float32)
    plain = OrtBackend(model, ["cpu"], io_binding=False).run(x)
    bound = OrtBackend(model, ["cpu"], io_binding=True).run(x)
    assert len(plain) == len(bound) == 12
    for a, b in zip(plain, bound, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# -- buckets in the detector -----------------------------------------------------------------------
def test_padded_bucket_runs_detect_what_a_plain_run_detects(monkeypatch: pytest.MonkeyPatch) -> None:
    yunet = YuNet(threshold=0.5, input_size=640, providers=["cpu"])
    frames = [face_frame(), face_frame()[:, ::-1].copy(), face_frame(960, 720)]
    plain = yunet.run(frames)
    runs: list[int] = []
    real_run = yunet.backend.run

    def spy(x):
        runs.append(x.shape[0])
        return real_run(x)

    monkeypatch.setattr(yunet.backend, "run", spy)
    monkeypatch.setattr(YuNet, "on_gpu", property(lambda self: True))  # take the GPU code path
    bucketed = yunet.run(frames)
    assert runs == [4], "3 frames are one run padded to the bucket of 4"
    assert [len(d) for d in bucketed] == [len(d) for d in plain] == [1, 1, 1]
    for a, b in zip(plain, bucketed, strict=True):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=0.5)


def test_person_model_downloads_only_the_rows_it_decodes() -> None:
    yolo = PersonYolo(threshold=0.3, input_size=640, providers=["cpu"])
    backend = yolo.backend_for(384, 640)
    out = backend.run(np.zeros((2, 3, 384, 640), np.float32))
    assert out[0].shape == (2, 5, (48 * 80 + 24 * 40 + 12 * 20)), "box + person score, 5 rows, not 84"


def test_warmup_runs_every_bucket_up_to_max_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    det = FrameDetector(detector_config("fast", plates=False, heads=False, providers=["cpu"]))
    seen: list[int] = []
    real = det.detect
    monkeypatch.setattr(det, "detect", lambda images, seqs=None: seen.append(len(images)) or real(images))
    det.warmup(shape=(360, 640), max_batch=8)
    assert seen == [1, 2, 4, 8]


# -- fail closed on a device error -----------------------------------------------------------------
def test_a_gpu_error_fails_frames_closed_and_the_detector_is_rebuilt() -> None:
    built: list[FrameDetector] = []

    def factory() -> FrameDetector:
        det = FrameDetector(detector_config("fast", plates=False, heads=False, providers=["cpu"]))
        if not built:  # the first detector's device is lost mid-run
            def lost(x):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            det.face_models[0][0].backend.run = lost
        built.append(det)
        return det

    m = Metrics()
    b = Batcher(factory, m, max_batch=4, max_wait_s=0.01, hang_timeout_s=5)
    q = JobQueue("cam", 4)
    b.attach(q)
    b.start()
    try:
        now = time.monotonic()
        first = Job(Frame("cam", 1, face_frame(), now, time.time()), deadline=now + 10)
        q.put(first)
        wait_for(lambda: first.done, what="first frame resolved")
        assert first.failure == Failure.DETECTOR_ERROR and first.detections is None
        wait_for(lambda: b.ready, what="a new detector")
        now = time.monotonic()
        second = Job(Frame("cam", 2, face_frame(), now, time.time()), deadline=now + 10)
        q.put(second)
        wait_for(lambda: second.done, what="second frame resolved")
        assert second.failure is None and len(second.detections) == 1
        assert sample(m, "stream_redact_detector_restarts_total", reason="error") == 1
    finally:
        b.stop()


# -- metrics -----------------------------------------------------------------------------------------
def test_batches_export_fill_and_transfer_bytes() -> None:
    class Moving(NoFaces):
        moved = (0, 0)

        def transfer_bytes(self) -> tuple[int, int]:
            self.moved = (self.moved[0] + 1000, self.moved[1] + 10)
            return self.moved

    m = Metrics()
    b = Batcher(Moving, m, max_batch=4, max_wait_s=0.01)
    q = JobQueue("cam", 4)
    b.attach(q)
    b.start()
    try:
        for i in range(3):
            now = time.monotonic()
            job = Job(Frame("cam", i, np.zeros((32, 32, 3), np.uint8), now, time.time()), deadline=now + 5)
            q.put(job)
            wait_for(lambda job=job: job.done, what="frame resolved")
        assert sample(m, "stream_redact_transfer_bytes_total", direction="h2d") == 3000
        assert sample(m, "stream_redact_transfer_bytes_total", direction="d2h") == 30
        assert sample(m, "stream_redact_batch_fill_ratio_count") == 3
        assert sample(m, "stream_redact_batch_fill_ratio_sum") == pytest.approx(0.75)
    finally:
        b.stop()


class FakeNvml:
    """pynvml's calls as the monitor uses them, for two GPUs."""

    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init = fail_init

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=40 + h * 10)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30)


def test_gpu_monitor_exports_utilisation_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    nvml = load_nvml()
    assert nvml is not None
    m = Metrics()
    mon = GpuMonitor(m, nvml, interval_s=0.05).start()
    try:
        assert sample(m, "stream_redact_gpu_utilization_ratio", device="1") == pytest.approx(0.5)
        assert sample(m, "stream_redact_gpu_memory_used_bytes", device="0") == 2**30
        assert sample(m, "stream_redact_gpu_memory_total_bytes", device="1") == 80 * 2**30
    finally:
        mon.stop()
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fail_init=True))
    assert load_nvml() is None, "no driver: no monitor, no zero series"


# -- NVDEC ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CLIP.exists(), reason="sample clip not fetched (deploy/setup.sh)")
def test_nvdec_falls_back_to_cpu_decoding_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        container, used = open_video(str(CLIP), "nvdec", "nvdec-cam")
        with container:
            frame = next(container.decode(video=0))
            assert frame.to_ndarray(format="bgr24").shape == (frame.height, frame.width, 3)
        if used == "cpu":
            assert "decoding on the CPU" in caplog.text
            container, _ = open_video(str(CLIP), "nvdec", "nvdec-cam")
            container.close()
            assert caplog.text.count("decoding on the CPU") == 1, "once per stream, not per reconnect"
    with pytest.raises((FileNotFoundError, OSError)):
        open_video("/no/such/clip.mp4", "nvdec", "nvdec-cam")


def test_nvdec_fallback_warning_never_shows_camera_credentials(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from stream.live.sources import decode

    url = "rtsp://admin:s3cretpass@192.0.2.7:554/live"
    opened = []

    def fake_open(target: str, **kw: object) -> str:
        if "hwaccel" in kw:  # FFmpeg quotes the URL in its errors
            raise OSError(f"[Errno 1] Operation not permitted: '{target}'")
        opened.append(target)
        return "container"

    monkeypatch.setattr(decode, "hwdevices_available", lambda: ["cuda"])
    monkeypatch.setattr(decode.av, "open", fake_open)
    with caplog.at_level(logging.WARNING):
        assert decode.open_video(url, "nvdec", "cred-cam") == ("container", "cpu")
    assert opened == [url] and "decoding on the CPU" in caplog.text
    assert "s3cretpass" not in caplog.text


# -- device preprocessing and the torch backend (where torch is installed) ------------------------
@pytest.mark.skipif(not HAS_TORCH, reason="torch and onnx2torch are not installed")
def test_device_letterbox_matches_the_host_path() -> None:
    from stream.detect.device import DeviceFrames

    frames = [face_frame(), face_frame(960, 720), face_frame()]
    host, places = letterbox_batch(frames, 640, pad=114)
    dev, dplaces = DeviceFrames(frames, "cpu").letterbox(640, pad=114, rgb=True, unit=True, pad_to=4)
    assert dplaces == places and tuple(dev.shape) == (4, 3, *host.shape[1:3])
    ref = host[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32) / 255
    got = dev.numpy()
    assert np.abs(got[:3] - ref).mean() < 2 / 255, "antialiased bilinear vs INTER_AREA: within 2 levels"
    assert np.all(got[3] == pytest.approx(114 / 255)), "padding frame is the pad colour"


@pytest.mark.skipif(not HAS_TORCH, reason="torch and onnx2torch are not installed")
def test_torch_backend_detects_what_onnxruntime_detects() -> None:
    frames = [face_frame(), face_frame(960, 720)]
    ort_dets = YuNet(threshold=0.5, input_size=640, providers=["cpu"], backend="onnxruntime").run(frames)
    torch_dets = YuNet(threshold=0.5, input_size=640, providers=["cpu"], backend="torch").run(frames)
    for a, b in zip(ort_dets, torch_dets, strict=True):
        assert len(a) == len(b) == 1
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1.0)


def test_transfer_totals_only_grow() -> None:
    a = TRANSFERS.snapshot()
    TRANSFERS.add(h2d=5, d2h=1)
    b = TRANSFERS.snapshot()
    assert b[0] - a[0] == 5 and b[1] - a[1] == 1


# -- the GPU check, on the CPU -------------------------------------------------------------------------
def test_gpu_check_cpu_smoke_runs_the_shared_stage_pipeline(tmp_path: Path) -> None:
    """A GPU machine is rare and short: a typo in the GPU check's shared-stage path (the stage
    process, worker processes, frames in shared memory) or in its torch paths section must fail
    here, not there."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke",
                             "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    pipeline = result["pipeline"]
    assert "error" not in pipeline, out[-3000:]
    steps = [s for s in pipeline["steps"] if s["stage"] == "shared"]
    assert steps, out[-3000:]
    step = steps[0]
    assert step["procs"] == 2 and step["streams"] == 2
    assert step["published"] > 0 and step["delivered_fps"] > 0, "frames came back from the stage"
    assert step["batches"] > 0 and step["mean_batch"], "the stage's batch counters were read"
    assert {"worker_cpu_cores", "stage_cpu_cores", "p50_ms", "p99_ms", "blanked", "dropped"} <= step.keys()
    # faces are found in every synthetic frame, so a leak means an answer was lost or misapplied;
    # the synthetic plates are missed by the plate model itself on ONNX Runtime CPU (about half)
    assert step["ground_truth"]["face"] > 0 and step["leaks"]["face"] == 0
    assert not list(shm_root().glob(f"gpu-check-{proc.pid}-*")), "frame slots removed at the end"

    # one batch's time split, torch on the CPU here: every step of it ran, for BGR and for I420
    split = result["breakdown"]
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnx2torch") is None:
        assert "skipped" in split or "error" in split, split
    else:
        assert "error" not in split and "skipped" not in split, split
        (row,) = split["buckets"]
        assert set(row["models"]) == {"CenterFace", "PlateYolo", "PersonYolo"}, row
        assert row["detector_ms"] > 0 and row["i420"]["detector_ms"] > 0 and row["i420"]["convert_ms"] > 0
        assert row["i420"]["frames_mb"] * 2 == pytest.approx(row["frames_mb"], abs=0.1), "I420: half"

    # the torch backend's paths, on the CPU here: every model and bucket on each path
    paths = result["paths"]
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnx2torch") is None:
        assert "onnx2torch" in paths.get("skipped", ""), paths  # the reason is recorded, the run goes on
        return
    assert "error" not in paths and paths["device"] == "cpu" and paths["buckets"] == [1, 2], paths
    assert set(paths["paths"]) == {"eager", "static", "graphed"}
    assert set(paths["models"]) == {"yunet", "centerface", "plate", "person", "text"}
    matched = dict.fromkeys(paths["paths"], 0)
    eager_reads = 0
    for name, m in paths["models"].items():
        for row in m["rows"]:
            for path in paths["paths"]:
                cell = row[path]
                assert "error" not in cell and "skipped" not in cell, (name, row["bucket"], path, cell)
                assert cell["frames"] == row["bucket"] and cell["fps"] > 0
                # torch fp32 on the CPU finds ONNX Runtime's boxes; the plate model finds none on
                # the first two smoke frames (match rate None), the others match every one
                check = cell["vs_ort_cpu"]
                assert check["match_rate"] in (1.0, None), (name, row["bucket"], path, check)
                matched[path] += check["matched"]
            eager_reads += row["eager"]["host_reads_forward"]
            for path in ("static", "graphed"):
                cell = row[path]
                # no host read in the forward (none would be a GPU sync or break a capture); the run's
                # only one is the download of the packed detections
                assert cell["host_reads_forward"] == 0 and cell["syncs"] == 0, (name, path, cell)
                assert cell["host_reads_run"] == 1, (name, path, cell)
                if name == "text":  # a probability map, decoded into lines on the host: its one download
                    assert cell["decoded_on_device"] == 0, (name, path, cell)
                else:
                    assert cell["decoded_on_device"] == cell["frames"] and cell["decoded_on_host"] == 0
            graphs = row["graphed"]["graphs"]  # one shape per bucket, run eagerly: no CUDA here
            # a replay holds the forward and the device decoding together: the text pass has no graph
            assert graphs["shapes"] == (0 if name == "text" else 1), (name, graphs)
            assert graphs["captured"] == 0 and not graphs["failed"], graphs
    assert all(matched.values()), matched  # boxes were compared on every path
    assert eager_reads > 0, "the counter sees the eager graphs' shape reads: the zeros above mean something"
    assert "| model | bucket | fps eager / static / graphed | syncs eager / static / graphed |" in out
