"""The second plate pass on vehicle crops: crop geometry, mapping back, batching, and a plate it finds."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from helpers import BUS, read_bgr, textured_background, uk_plate

from stream.core.detections import Detections, FrameRef
from stream.core.yuv import I420
from stream.detect.crops import CropConfig, crop_box, cut, plan_crops, to_frame
from stream.detect.ensemble import FrameDetector
from stream.detect.presets import detector_config


def vehicles(boxes: list[list[float]], scores: list[float] | None = None) -> Detections:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    s = np.array(scores if scores is not None else [0.5] * len(b), np.float32)
    return Detections(b, s, ("vehicle",) * len(b))


# -- geometry --------------------------------------------------------------------------------------
def test_crop_grows_by_the_margin_and_rounds_outwards_to_even_pixels() -> None:
    assert crop_box(np.array([101, 51, 201, 91]), 640, 360, 0.1) == (90, 46, 212, 96)
    assert crop_box(np.array([100, 50, 200, 90]), 640, 360, 0.0) == (100, 50, 200, 90)


@pytest.mark.parametrize(("vehicle", "expected"), [
    ([-30, -10, 50, 40], (0, 0, 58, 46)),  # partly out at the top left: cut at the frame
    ([600, 300, 700, 400], (590, 290, 638, 358)),  # out at the bottom right of an odd-sized frame
    ([700, 380, 800, 400], None),  # wholly outside
])
def test_crop_at_the_frame_edges(vehicle: list[float], expected: tuple | None) -> None:
    assert crop_box(np.array(vehicle, np.float32), 639, 359, 0.1) == expected


def test_boxes_found_on_a_crop_map_back_exactly() -> None:
    frame = textured_background(640, 360, seed=3)
    box = crop_box(np.array([201, 97, 333, 181], np.float32), 640, 360, 0.1)
    assert box is not None
    pixels = cut(frame, box)
    assert np.array_equal(pixels, frame[box[1]:box[3], box[0]:box[2]])
    on_crop = Detections(np.array([[3.5, 4.0, 30.0, 12.25]], np.float32), np.array([0.7], np.float32),
                         ("plate",))
    back = to_frame(on_crop, box)
    x1, y1, x2, y2 = back.boxes[0]
    assert (x1, y1, x2, y2) == (box[0] + 3.5, box[1] + 4.0, box[0] + 30.0, box[1] + 12.25)
    assert back.scores[0] == pytest.approx(0.7) and back.labels == ("plate",)
    # the same pixels whether the frame is BGR or I420 (cut on the planes, converted once)
    yuv = I420.from_bgr(frame)
    same = cut(yuv, box)
    assert same.shape == pixels.shape
    assert np.abs(same.astype(int) - yuv.to_bgr()[box[1]:box[3], box[0]:box[2]].astype(int)).max() <= 2


def test_plan_picks_tall_enough_vehicles_most_certain_first_up_to_the_cap() -> None:
    cfg = CropConfig(min_vehicle_px=20, max_per_frame=2)
    frame0 = vehicles([[0, 0, 50, 10], [10, 10, 90, 60], [100, 10, 180, 70], [200, 10, 290, 80]],
                      [0.9, 0.3, 0.8, 0.5])
    plan = plan_crops([frame0, None, vehicles([[5, 5, 45, 35]])], [(360, 640)] * 3, cfg)
    assert [(c.frame, c.vehicle) for c in plan] == [(0, 2), (0, 3), (2, 0)]  # 10 px one too short


# -- in the detector -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bus_with_plate() -> np.ndarray:
    """The bus photo with a clean synthetic plate on its front, where its real one is."""
    bus = read_bgr(BUS).copy()
    bus[222:232, 113:157] = uk_plate(44, 10)
    return bus


def street(bus: np.ndarray, scale: float, at: tuple[int, int] = (900, 600)) -> tuple[np.ndarray, tuple]:
    """A 1920x1080 frame with the bus at ``scale``; and where its plate is."""
    frame = textured_background(1920, 1080, seed=1)
    w, h = int(270 * scale), int(360 * scale)
    x, y = at
    frame[y:y + h, x:x + w] = cv2.resize(bus, (w, h), interpolation=cv2.INTER_AREA)
    return frame, (x + 113 * scale, y + 222 * scale, x + 157 * scale, y + 232 * scale)


@pytest.fixture(scope="module")
def detectors() -> dict[bool, FrameDetector]:
    # the plate model's passes only: the text pass reads the test plate from the whole frame
    return {crops: FrameDetector(detector_config("accurate", providers=("cpu",), vehicle_plates=0,
                                                 text_plates=False, plate_crops=crops))
            for crops in (False, True)}


def covers(found: Detections, plate: tuple) -> bool:
    x1, y1, x2, y2 = plate
    return any(b[0] <= x1 + 2 and b[1] <= y1 + 2 and b[2] >= x2 - 2 and b[3] >= y2 - 2
               for b in found.with_label("plate").boxes)


def test_a_plate_the_full_frame_pass_misses_is_found_on_its_vehicles_crop(
        bus_with_plate: np.ndarray, detectors: dict[bool, FrameDetector]) -> None:
    frame, plate = street(bus_with_plate, 0.7)  # the plate is 31 x 7 px in a 1920 px frame
    assert not covers(detectors[False].detect([frame])[0], plate), "the full-frame pass alone sees it"
    with_crops = detectors[True]
    before = with_crops.crops_run
    assert covers(with_crops.detect([frame])[0], plate)
    assert with_crops.crops_run == before + 1
    # an I420 frame (the live path) gives the same plate
    assert covers(with_crops.detect([I420.from_bgr(frame)])[0], plate)


def test_crops_of_a_whole_batch_go_to_the_plate_model_as_one_batch(
        bus_with_plate: np.ndarray, detectors: dict[bool, FrameDetector], monkeypatch) -> None:
    det = detectors[True]
    (model,) = det.crop_models
    calls: list[int] = []
    run = model.run

    def spy(images, frames=None):
        calls.append(len(images))
        return run(images, frames)

    monkeypatch.setattr(model, "run", spy)
    a, plate_a = street(bus_with_plate, 0.7)
    b, plate_b = street(bus_with_plate, 0.6, at=(300, 200))
    found = det.detect([a, b, a[:540, :960].copy()], [FrameRef("cam1", 1), FrameRef("cam2", 1),
                                                      FrameRef("cam3", 1)])
    assert calls == [2], "one plate-model batch for the vehicles of every frame (the third has none)"
    assert covers(found[0], plate_a) and covers(found[1], plate_b)
    assert not len(found[2].with_label("plate"))


def test_no_crop_pass_without_the_person_model_or_plates() -> None:
    assert FrameDetector(detector_config("fast", providers=("cpu",), heads=False)).crop_models == []
    assert FrameDetector(detector_config("fast", providers=("cpu",), plates=False)).crop_models == []


def test_warmup_runs_the_crop_pass_too(detectors: dict[bool, FrameDetector], monkeypatch) -> None:
    """Black frames have no vehicles: the crop models get runs of their own, so a GPU builds their
    engines before the first real vehicle rather than on it."""
    det = detectors[True]
    (model,) = det.crop_models
    sizes: list[int] = []
    run = model.run
    monkeypatch.setattr(model, "run", lambda images, frames=None: sizes.append(len(images)) or run(images))
    det.warmup(shape=(360, 640), max_batch=2)
    assert sizes == [1, 2]
