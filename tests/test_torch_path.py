"""The GPU stage's torch path, run on the CPU: graphs frozen per shape with no shape op or host read
left, decoding on the device equal to the host decoders on real frames (and the host fallback when
the device cannot certify a frame), and the per-shape replay run eagerly, faults included."""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from live_helpers import wait_for

from stream.core.detections import Detections
from stream.core.frames import Failure, Frame, Job, JobQueue
from stream.core.metrics import Metrics
from stream.core.nms import nms
from stream.detect.centerface import CenterFace
from stream.detect.ensemble import DetectorConfig, FrameDetector, ModelConfig
from stream.detect.models import model_path
from stream.detect.runtime import make_dynamic
from stream.detect.yolo import PersonYolo, PlateYolo, keep_rows, rebuild_for_shape
from stream.detect.yunet import YuNet
from stream.live.batcher import Batcher

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "onnx2torch")),
    reason="torch and onnx2torch are not installed (CI installs them: .ci/run)")

FIXTURES = Path(__file__).parent / "fixtures"
SHAPE = (2, 3, 384, 640)


def graphs() -> dict[str, onnx.ModelProto]:
    """Each detector's graph as its detector loads it (person: re-targeted to 640x384, rows kept)."""
    return {
        "plate": onnx.load(str(model_path("plate"))),
        "person": keep_rows(rebuild_for_shape(onnx.load(str(model_path("person"))), 384, 640),
                            [0, 1, 2, 3, 4, 6, 7, 9, 11]),
        "yunet": make_dynamic(onnx.load(str(model_path("yunet")))),
        "centerface": make_dynamic(onnx.load(str(model_path("centerface")))),
    }


def model_input(name: str, seed: int = 0) -> np.ndarray:
    x = np.random.RandomState(seed).rand(*SHAPE).astype(np.float32)
    return x if name in ("plate", "person") else x * 255


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})


def scene() -> list[np.ndarray]:
    """Real faces, a bus with its plate, people and a cat, at three sizes."""
    astro = cv2.imread(str(FIXTURES / "astronaut_256.jpg"))
    bus = cv2.imread(str(FIXTURES / "bus_360.jpg"))
    wide = np.full((720, 1280, 3), 90, np.uint8)
    wide[200:456, 400:656] = astro
    wide[300:300 + bus.shape[0], 700:700 + bus.shape[1]] = bus
    return [wide, bus, cv2.imread(str(FIXTURES / "chelsea.jpg"))]


DETECTORS = [
    (CenterFace, {"threshold": 0.35, "input_size": 640}),
    (YuNet, {"threshold": 0.5, "input_size": 640}),
    (PlateYolo, {"threshold": 0.05, "input_size": 640}),  # low: several plate candidates per frame
    (PersonYolo, {"threshold": 0.3, "input_size": 640, "vehicles": True, "screens": True}),
]


def same(a: Detections, b: Detections) -> None:
    assert sorted(a.labels) == sorted(b.labels)
    order_a, order_b = np.lexsort(a.boxes.T[::-1]), np.lexsort(b.boxes.T[::-1])
    np.testing.assert_allclose(a.boxes[order_a], b.boxes[order_b], atol=0.05)
    np.testing.assert_allclose(a.scores[order_a], b.scores[order_b], atol=1e-4)


# -- static graphs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["plate", "person", "yunet", "centerface"])
def test_a_frozen_graph_has_no_shape_op_left_and_the_same_outputs(name: str) -> None:
    from stream.detect.static_graph import freeze, shape_ops

    model = graphs()[name]
    frozen = freeze(model, SHAPE)
    assert shape_ops(frozen) == []
    x = model_input(name)
    for a, b in zip(ort_run(model, x), ort_run(frozen, x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_the_plate_export_computes_shapes_until_frozen() -> None:
    from stream.detect.static_graph import shape_ops

    left = shape_ops(graphs()["plate"])
    assert any(s.startswith("Shape") for s in left) and any(s.startswith("Reshape:1") for s in left)


@pytest.mark.parametrize("name", ["plate", "person", "yunet", "centerface"])
def test_the_torch_module_of_a_frozen_graph_reads_nothing_on_the_host(name: str) -> None:
    import torch
    from onnx2torch import convert

    from stream.detect.backend import for_onnx2torch
    from stream.detect.static_graph import count_host_reads, freeze, host_tensors, to_torch

    model = graphs()[name]
    module = to_torch(for_onnx2torch(freeze(model, SHAPE))).eval()
    x = model_input(name)
    with torch.inference_mode():
        with count_host_reads(host_tensors(module)) as reads:
            out = module(torch.from_numpy(x))
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        if name in ("plate", "yunet"):  # onnx2torch's own module reads shapes on every call
            with count_host_reads() as before:
                convert(for_onnx2torch(model)).eval()(torch.from_numpy(x))
            assert len(before) > 20
    assert reads == []
    for a, b in zip(ort_run(model, x), out, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-3, atol=2e-3)


def test_sigmoid_times_x_becomes_one_silu() -> None:
    import torch

    from stream.detect.backend import for_onnx2torch
    from stream.detect.static_graph import freeze, to_torch

    module = to_torch(for_onnx2torch(freeze(graphs()["plate"], SHAPE)))
    silu = [n for n in module.graph.nodes if n.target is torch.nn.functional.silu]
    sigmoids = [m for m in module.modules() if isinstance(m, torch.nn.Sigmoid)]
    assert len(silu) == 57 and len(sigmoids) == 1, "every SiLU of YOLOv8n fused; the score sigmoid stays"


def test_frozen_graphs_are_cached_on_disk_and_a_torn_file_is_folded_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from stream.detect import static_graph

    model = graphs()["yunet"]
    first = static_graph.frozen_cached(model, SHAPE, tmp_path, key="yunet-abc")
    files = list((tmp_path / "static").glob("*.onnx"))
    assert [f.name for f in files] == [f"yunet-abc-{static_graph.digest(model)}-2x3x384x640.onnx"]

    def no_folding(*a: object) -> None:
        raise AssertionError("folded again although cached")

    monkeypatch.setattr(static_graph, "freeze", no_folding)
    again = static_graph.frozen_cached(model, SHAPE, tmp_path, key="yunet-abc")
    assert again.SerializeToString() == first.SerializeToString()
    monkeypatch.undo()
    files[0].write_bytes(b"torn")
    with caplog.at_level(logging.WARNING):
        rebuilt = static_graph.frozen_cached(model, SHAPE, tmp_path, key="yunet-abc")
    assert "unreadable" in caplog.text and static_graph.shape_ops(rebuilt) == []
    assert onnx.load(str(files[0])).graph.node, "the cache file was written again"


def test_one_set_of_weights_cut_two_ways_is_cached_as_two_graphs(tmp_path: Path) -> None:
    """The person model runs as a 5-row graph (persons) or a 9-row one (vehicles too), both from
    the same weights at the same shape: each must get its own frozen graph back, not the other's
    (keyed by the weights alone, the vehicle rows went missing and device decoding failed)."""
    from stream.detect import static_graph

    shape = (1, 3, 384, 640)
    for rows in ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 6, 7, 9, 11]):
        graph = keep_rows(rebuild_for_shape(onnx.load(str(model_path("person"))), 384, 640), rows)
        frozen = static_graph.frozen_cached(graph, shape, tmp_path, key="person-abc")
        out = ort_run(frozen, np.zeros(shape, np.float32))[0]
        assert out.shape[1] == len(rows), f"the {len(rows)}-row graph came back with {out.shape[1]} rows"
    assert len(list((tmp_path / "static").glob("person-abc-*.onnx"))) == 2


# -- decoding on the device ------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "kw"), DETECTORS, ids=[c.__name__ for c, _ in DETECTORS])
def test_device_decoding_equals_host_decoding_on_real_frames(cls: type, kw: dict, tmp_path: Path) -> None:
    frames = scene()
    host = cls(providers=["cpu"], backend="torch", device_decode=False, cache_dir=tmp_path, **kw).run(frames)
    model = cls(providers=["cpu"], backend="torch", cache_dir=tmp_path, **kw)
    dev = model.run(frames)
    assert model.decoded_on_device == len(frames) and model.decoded_on_host == 0
    assert sum(len(d) for d in host) >= 2, "the scene gives this model something to find"
    for a, b in zip(host, dev, strict=True):
        same(a, b)
    reference = cls(providers=["cpu"], backend="onnxruntime", **kw).run(frames)
    assert [len(d) for d in reference] == [len(d) for d in dev]


def test_a_frame_with_more_candidates_than_k_is_decoded_on_the_host(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    from stream.detect import device_decode

    frames = scene()
    kw = {"threshold": 0.05, "input_size": 640}
    host = PlateYolo(providers=["cpu"], backend="torch", device_decode=False, cache_dir=tmp_path,
                     **kw).run(frames)
    monkeypatch.setattr(device_decode, "DEFAULT_K", 2)
    model = PlateYolo(providers=["cpu"], backend="torch", cache_dir=tmp_path, **kw)
    dev = model.run(frames)
    assert model.decoded_on_host >= 1, "the plate-rich frames overflow K = 2"
    assert model.decoded_on_device + model.decoded_on_host == len(frames)
    for a, b in zip(host, dev, strict=True):
        same(a, b)


def test_an_nms_result_that_is_not_certified_is_decoded_on_the_host(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    from stream.detect import device_decode

    frames = scene()
    kw = {"threshold": 0.35, "input_size": 640}
    host = CenterFace(providers=["cpu"], backend="torch", device_decode=False, cache_dir=tmp_path,
                      **kw).run(frames)
    monkeypatch.setattr(device_decode, "NMS_ITERATIONS", 0)  # "keep all" is never greedy NMS's answer
    model = CenterFace(providers=["cpu"], backend="torch", cache_dir=tmp_path, **kw)
    dev = model.run(frames)
    assert model.decoded_on_host >= 2, "frames with overlapping face peaks fall back"
    for a, b in zip(host, dev, strict=True):
        same(a, b)


@pytest.mark.parametrize("seed", range(12))
def test_cluster_nms_is_greedy_nms_when_certified(seed: int) -> None:
    import torch

    from stream.detect.device_decode import cluster_nms

    rng = np.random.RandomState(seed)
    n = 60
    xy = rng.rand(n, 2).astype(np.float32) * 200
    wh = rng.rand(n, 2).astype(np.float32) * 60 + 5
    boxes = np.concatenate([xy, xy + wh], 1)
    scores = rng.rand(n).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    sb = torch.from_numpy(boxes[order])[None]
    keep, certified = cluster_nms(sb, torch.ones(1, n, dtype=torch.bool), torch.zeros(1, n, dtype=torch.long),
                                  0.4, iterations=n)
    assert bool(certified[0])
    expected = set(nms(boxes, scores, 0.4).tolist())
    assert set(order[keep[0].numpy()].tolist()) == expected


def test_a_suppression_chain_longer_than_the_iterations_is_not_certified() -> None:
    import torch

    from stream.detect.device_decode import cluster_nms

    # boxes sliding right by a little each: each suppresses the next, so greedy keeps every other
    n = 10
    boxes = torch.tensor([[i * 10.0, 0, i * 10.0 + 40, 40] for i in range(n)])[None]
    valid, classes = torch.ones(1, n, dtype=torch.bool), torch.zeros(1, n, dtype=torch.long)
    keep, certified = cluster_nms(boxes, valid, classes, 0.5, iterations=2)
    assert not bool(certified[0])
    keep, certified = cluster_nms(boxes, valid, classes, 0.5, iterations=n)
    assert bool(certified[0]) and keep[0].tolist() == [i % 2 == 0 for i in range(n)]


def test_classes_do_not_suppress_each_other() -> None:
    import torch

    from stream.detect.device_decode import cluster_nms

    boxes = torch.tensor([[[0.0, 0, 50, 50], [1, 1, 51, 51]]])
    keep, _ = cluster_nms(boxes, torch.ones(1, 2, dtype=torch.bool), torch.tensor([[0, 1]]), 0.4)
    assert keep[0].tolist() == [True, True]
    keep, _ = cluster_nms(boxes, torch.ones(1, 2, dtype=torch.bool), torch.tensor([[0, 0]]), 0.4)
    assert keep[0].tolist() == [True, False]


# -- the replay path, eagerly on the CPU ---------------------------------------------------------
def fast_config(tmp_path: Path, **kw: object) -> DetectorConfig:
    return DetectorConfig(faces={"yunet": ModelConfig(threshold=0.5, input_size=640)},
                          plate=ModelConfig(threshold=0.2, input_size=640),
                          person_heads=ModelConfig(threshold=0.3, input_size=512),
                          providers=("cpu",), backend="torch", cache_dir=tmp_path, **kw)


def test_the_whole_detector_on_the_replay_path_equals_the_eager_path(tmp_path: Path) -> None:
    frames = scene()
    eager = FrameDetector(fast_config(tmp_path, static_graphs=False, device_decode=False, cuda_graphs=False))
    replayed = FrameDetector(fast_config(tmp_path))
    a, b = eager.detect(frames), replayed.detect(frames)
    for x, y in zip(a, b, strict=True):
        same(x, y)
        assert x.observed == y.observed
    assert sum(len(d) for d in a) >= 4
    replays = [r for m in replayed.models for bk in [m.backend or m.backend_for(288, 512)]
               for r in getattr(bk, "replays", list)()]
    assert replays and all(not r.captured and r.calls >= 1 for r in replays), "eager on the CPU"


def test_a_fault_inside_the_replay_fails_the_batch_closed_and_the_stage_is_rebuilt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[FrameDetector] = []
    broken = threading.Event()
    broken.set()

    def explode(self: object, outputs: list, n: int, canvas: tuple, names: list) -> tuple:
        raise RuntimeError("injected fault inside the graph")

    original = YuNet.device_candidates

    def candidates(self: YuNet, outputs: list, n: int, canvas: tuple, names: list) -> tuple:
        if broken.is_set():
            return explode(self, outputs, n, canvas, names)
        return original(self, outputs, n, canvas, names)

    monkeypatch.setattr(YuNet, "device_candidates", candidates)

    def factory() -> FrameDetector:
        d = FrameDetector(DetectorConfig(faces={"yunet": ModelConfig(threshold=0.5, input_size=320)},
                                         plate=None, person_heads=None, providers=("cpu",),
                                         backend="torch", cache_dir=tmp_path))
        built.append(d)
        return d

    metrics = Metrics()
    batcher = Batcher(factory, metrics, max_batch=2, max_wait_s=0.0)
    queue = JobQueue("cam", 4)
    batcher.attach(queue)
    batcher.start()
    try:
        def submit() -> Job:
            now = time.monotonic()
            j = Job(Frame("cam", int(now * 1e6), scene()[1], now, time.time()), deadline=now + 20)
            queue.put(j)
            wait_for(lambda: j.done, timeout=60, what="the frame resolved")
            return j

        first = submit()
        assert first.failure is Failure.DETECTOR_ERROR and first.detections is None
        broken.clear()
        wait_for(lambda: submit().detections is not None, timeout=90, what="a rebuilt stage detecting")
        assert len(built) >= 2, "the stage was rebuilt after the fault"
    finally:
        batcher.stop()


# -- uploads and letterboxes shared by the models --------------------------------------------------
def test_a_batch_goes_up_packed_through_a_reused_staging_buffer() -> None:
    from stream.detect.device import DeviceFrames, StagingRing

    ring = StagingRing("cpu", slots=2)
    rng = np.random.RandomState(3)
    batches = [[rng.randint(0, 255, (h, w, 3), np.uint8) for h, w in sizes]
               for sizes in ([(36, 64), (48, 64)], [(72, 128)] * 3, [(20, 30)], [(90, 160)] * 4)]
    sent = [DeviceFrames(b, "cpu", ring) for b in batches]
    for frames, got in zip(batches, sent, strict=True):
        assert [tuple(t.shape) for t in got.tensors] == [f.shape for f in frames]
        for f, t in zip(frames, got.tensors, strict=True):
            np.testing.assert_array_equal(t.numpy(), f)
    assert ring.uploads == 4
    assert ring.grown == 3, "two buffers made, the third batch fits the first again, the fourth grows one"


def even(frame: np.ndarray) -> np.ndarray:
    """The frame cut to even sides (I420 needs them)."""
    return frame[: frame.shape[0] // 2 * 2, : frame.shape[1] // 2 * 2]


def test_i420_pictures_go_up_as_they_are_and_become_on_the_device_what_opencv_converts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from stream.core.yuv import I420
    from stream.detect import device
    from stream.detect.device import DeviceFrames, StagingRing

    monkeypatch.setattr(device, "I420_GROUP", 2)  # five pictures of one size: converted 2 + 2 + 1
    rng = np.random.RandomState(5)
    pictures = [I420.from_bgr(even(frame)) for frame in scene()]
    pictures += [I420(rng.randint(0, 256, (h * 3 // 2, w)).astype(np.uint8))
                 for h, w in ((2, 2), *[(36, 62)] * 5)]
    mixed = [*pictures, scene()[1]]  # a BGR frame in the same batch passes as it is
    ring = StagingRing("cpu")
    for frames in (DeviceFrames(mixed, "cpu"), DeviceFrames(mixed, "cpu", ring)):
        for pic, t in zip(mixed, frames.tensors, strict=True):
            want = pic.to_bgr() if isinstance(pic, I420) else pic
            np.testing.assert_array_equal(t.numpy(), want)  # the same integer arithmetic: not a level off
    assert ring._buffers[0].numel() == sum(p.data.nbytes for p in pictures) + scene()[1].nbytes, \
        "the I420 planes went up, not a BGR copy (1.5 bytes a pixel, not 3)"


def test_a_detector_reading_i420_on_the_device_finds_what_it_finds_in_bgr(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stream.core.yuv import I420
    from stream.detect.base import OnnxDetector

    pictures = [I420.from_bgr(even(frame)) for frame in scene()]
    bgr = [p.to_bgr() for p in pictures]
    cfg = DetectorConfig(faces={"centerface": ModelConfig(threshold=0.35, input_size=640)},
                         plate=ModelConfig(threshold=0.2, input_size=640),
                         person_heads=ModelConfig(threshold=0.3, input_size=640),
                         providers=("cpu",), backend="torch", cache_dir=tmp_path)
    monkeypatch.setattr(OnnxDetector, "on_gpu", property(lambda self: True))  # the GPU's code path
    det = FrameDetector(cfg)
    det.device, det.upload = "cpu", True
    want = det.detect(bgr)
    assert sum(len(d) for d in want) >= 3, "the scene gives the models something to find"

    def host_conversion(*a: object) -> None:
        raise AssertionError("converted on the host although every model reads from the device")

    monkeypatch.setattr(I420, "to_bgr", host_conversion)
    got = det.detect(pictures)
    for a, b in zip(want, got, strict=True):
        same(a, b)


def test_a_large_batch_is_packed_on_several_threads_in_pieces_exactly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from stream.detect import device

    monkeypatch.setattr(device, "PACK_PIECE", 1000)  # frames cut into many pieces, unevenly
    rng = np.random.RandomState(4)
    frames = [rng.randint(0, 255, (h, w, 3), np.uint8) for h, w in ((36, 64), (17, 31), (90, 160), (1, 1))]
    ring = device.StagingRing("cpu", pack_threads=3)
    assert ring._pool is not None
    for _ in range(3):  # the buffer reused: nothing of the last batch may survive in the next
        got = device.DeviceFrames(frames, "cpu", ring)
        for f, t in zip(frames, got.tensors, strict=True):
            np.testing.assert_array_equal(t.numpy(), f)
        frames = frames[::-1]
    assert device.StagingRing("cpu", pack_threads=1)._pool is None, "one thread: no pool to wait on"


def test_models_with_the_same_canvas_share_one_resize_and_get_what_they_would_alone() -> None:
    from stream.detect.device import DeviceFrames

    frames = scene()
    shared = DeviceFrames(frames, "cpu")
    yolo, _ = shared.letterbox(640, pad=114, rgb=True, unit=True)
    assert len(shared._resized) == len(frames)
    face, _ = shared.subset([0, 2]).letterbox(640, pad=0)
    assert len(shared._resized) == len(frames), "the subset reused the resized frames"
    alone, _ = DeviceFrames([frames[0], frames[2]], "cpu").letterbox(640, pad=0)
    assert np.array_equal(face.numpy(), alone.numpy())
    alone_yolo, _ = DeviceFrames(frames, "cpu").letterbox(640, pad=114, rgb=True, unit=True)
    assert np.array_equal(yolo.numpy(), alone_yolo.numpy())


def test_a_new_shape_runs_at_once_on_the_dynamic_graph_while_its_static_one_is_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stream.detect import backend as backend_mod

    frames = scene()[:2]
    model = YuNet(threshold=0.5, input_size=640, providers=["cpu"], backend="torch", cache_dir=tmp_path)
    first = model.run(frames)  # nothing built yet: the dynamic graph answers, the build starts
    bk = model.backend
    assert bk.wait_static(120)
    shape = next(iter(bk._static))
    assert bk.static_ready(shape)
    again = model.run(frames)
    for a, b in zip(first, again, strict=True):
        same(a, b)
    replays = bk.replays()
    assert len(replays) == 1 and replays[0].static, "the shape's replay now runs its static module"
    # past the cap, further shapes stay on the dynamic graph: no endless conversions
    monkeypatch.setattr(backend_mod, "MAX_STATIC_SHAPES", 1)
    other = model.run([frames[0]])  # batch 1: another input shape
    assert bk.wait_static(120) and len(bk._static) == 1
    assert len(other) == 1 and len(other[0]) == len(first[0])


def test_warmup_builds_every_static_graph_before_the_first_frame(tmp_path: Path) -> None:
    det = FrameDetector(DetectorConfig(faces={"yunet": ModelConfig(threshold=0.5, input_size=320)},
                                       plate=None, person_heads=None, providers=("cpu",), backend="torch",
                                       cache_dir=tmp_path, buckets=(1, 2)))
    det.warmup(shape=(180, 320), max_batch=2)
    (bk,) = det.backends()
    assert sorted(s[0] for s in bk._static) == [1, 2] and all(bk.static_ready(s) for s in bk._static)
    assert all(r.static for r in bk.replays()), "the second warm-up pass ran every shape on its static graph"
