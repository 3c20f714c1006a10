"""CPU lanes: a batch's model runs side by side, with the same boxes as one after the other."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest
from helpers import BUS, face_sprite, finds, read_bgr, sprite_face_box, textured_background, uk_plate
from pydantic import ValidationError

from stream.config import DetectionConfig
from stream.core.detections import FrameRef
from stream.detect.ensemble import FrameDetector
from stream.detect.lanes import MAX_LANES, Lanes, plan_lanes, split
from stream.detect.presets import detector_config


# -- planning --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("lanes", "threads", "gpu", "cores", "expected"), [
    (0, 0, False, 2, (2, 1)),       # the development machine: one lane per core, one thread each
    (0, 0, False, 1, (1, 0)),       # one core: as before, ONNX Runtime's own threads
    (0, 0, False, 16, (MAX_LANES, 4)),
    (0, 1, False, 2, (2, 1)),       # threads set: lanes fill the cores at that many threads each
    (0, 2, False, 2, (1, 2)),       # several processes sharing cores (threads = cores / processes)
    (0, 4, False, 16, (MAX_LANES, 4)),
    (1, 0, False, 2, (1, 0)),       # one lane: one model at a time on every core
    (3, 0, False, 16, (3, 5)),
    (2, 3, False, 2, (2, 3)),       # both given: as given
    (0, 0, True, 16, (1, 0)),       # a GPU (or the torch backend): no lanes
    (4, 2, True, 16, (1, 2)),
])
def test_lanes_and_threads_fill_the_cores_once(lanes: int, threads: int, gpu: bool, cores: int,
                                               expected: tuple[int, int]) -> None:
    assert plan_lanes(lanes, threads, gpu, available=cores) == expected


@pytest.mark.parametrize(("n", "parts"), [(1, 2), (2, 2), (5, 2), (7, 3), (3, 8)])
def test_split_keeps_every_item_once_in_order(n: int, parts: int) -> None:
    out = split(list(range(n)), parts)
    assert [i for p in out for i in p] == list(range(n))
    assert len(out) == min(n, parts) and max(map(len, out)) - min(map(len, out)) <= 1


def test_lanes_are_a_setting_with_a_bounded_range() -> None:
    assert DetectionConfig(lanes=3).detector_settings().lanes == 3
    with pytest.raises(ValidationError, match="lanes"):
        DetectionConfig(lanes=-1)
    with pytest.raises(ValidationError, match="lanes"):
        DetectionConfig(lanes=17)


# -- running ---------------------------------------------------------------------------------------
def test_tasks_run_side_by_side_and_results_keep_their_order() -> None:
    lanes = Lanes(2)
    met = threading.Barrier(2, timeout=30)  # passes only if both tasks are running at once

    def task(k: int) -> int:
        met.wait()
        return k

    try:
        assert lanes.run([lambda: task(1), lambda: task(2)]) == [1, 2]
        assert [n for n in lanes.run([lambda k=k: k for k in range(7)])] == list(range(7))
    finally:
        lanes.close()


def test_one_lane_runs_the_tasks_in_the_callers_thread() -> None:
    caller = threading.current_thread()
    assert Lanes(1).run([threading.current_thread, threading.current_thread]) == [caller, caller]


def test_a_failed_task_is_raised_after_every_other_task_has_finished() -> None:
    lanes = Lanes(2)
    failed, finished = threading.Event(), threading.Event()

    def fails() -> None:
        failed.set()
        raise RuntimeError("model run failed")

    def slower() -> None:
        assert failed.wait(30)
        finished.set()

    try:
        with pytest.raises(RuntimeError, match="model run failed"):
            lanes.run([fails, slower])
        assert finished.is_set(), "a run of the batch outlived the batch's failure"
    finally:
        lanes.close()


# -- in the detector -------------------------------------------------------------------------------
def scene(seed: int) -> np.ndarray:
    """A 640x360 frame with a face, a bus carrying a small plate, and a loose plate."""
    frame = textured_background(640, 360, seed=seed)
    bus = read_bgr(BUS).copy()
    bus[222:232, 113:157] = uk_plate(44, 10)
    frame[150:330, 380:515] = cv2.resize(bus, (135, 180), interpolation=cv2.INTER_AREA)
    x = 40 + 6 * seed
    frame[60:140, x:x + 72] = face_sprite()
    frame[300:328, 60:180] = uk_plate()
    return frame


@pytest.fixture(scope="module")
def detectors() -> dict[int, FrameDetector]:
    # every pass of the ensemble: faces every frame, plates, text and persons (with the crop pass on
    # their vehicles) on cadences
    return {lanes: FrameDetector(detector_config("fast", providers=("cpu",), text_plates=True, lanes=lanes))
            for lanes in (1, 2)}


def test_lanes_find_the_same_boxes_as_one_model_after_the_other(detectors: dict[int, FrameDetector]) -> None:
    assert detectors[1].lanes.count == 1 and detectors[2].lanes.count == 2
    frames = [scene(k) for k in range(6)]
    out: dict[int, list] = {}
    for lanes, det in detectors.items():
        found = []
        for k in range(0, 6, 2):  # batches of two streams' frames, cadences counted per stream
            refs = [FrameRef("cam1", k // 2), FrameRef("cam2", k // 2)]
            found += det.detect(frames[k:k + 2], refs)
        out[lanes] = found
    assert sum(len(d) for d in out[1]) > 0
    for one, two in zip(out[1], out[2], strict=True):
        assert one.labels == two.labels and one.observed == two.observed
        np.testing.assert_allclose(one.boxes, two.boxes, atol=1e-3)
        np.testing.assert_allclose(one.scores, two.scores, atol=1e-4)
    first = out[2][0]
    assert {"face", "plate"} <= set(first.labels), first.labels
    assert finds(first.with_label("face").boxes, sprite_face_box(40, 60), min_iou=0.3, min_cover=0.7), \
        first.with_label("face").boxes


def test_a_batch_of_frames_is_split_between_the_lanes(detectors: dict[int, FrameDetector],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    det = detectors[2]
    (face, _), = det.face_models
    threads: list[str] = []
    complete = face.complete

    def spy(chunks: list) -> list:
        threads.append(threading.current_thread().name)
        return complete(chunks)

    monkeypatch.setattr(face, "complete", spy)
    frames = [scene(k) for k in range(4)]
    found = det.detect(frames, [FrameRef(f"split{k}", 0) for k in range(4)])
    assert len(threads) == 2 and all(t.startswith("detect-lane") for t in threads), threads
    assert all(len(d.with_label("face")) for d in found), "every frame's face, whichever lane ran it"


def test_a_model_that_fails_in_a_lane_fails_the_batch(detectors: dict[int, FrameDetector],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    det = detectors[2]

    def broken(chunks: list) -> list:
        raise RuntimeError("plate model: device lost")

    monkeypatch.setattr(det.plate_model, "complete", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        det.detect([scene(0)], [FrameRef("broken", 0)])  # a stream's first frame runs every model
