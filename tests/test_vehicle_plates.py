"""Plates too small for the plate model: a mask over the middle of each small vehicle without one."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from helpers import BUS, BUS_VEHICLE, ROOT, contains, iou, read_bgr

from stream.core.detections import Detections
from stream.detect.ensemble import FrameDetector, plates_from_vehicles
from stream.detect.presets import detector_config
from stream.detect.yolo import PersonYolo


def dets(boxes: list[list[float]], label: str) -> Detections:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return Detections(b, np.full(len(b), 0.8, np.float32), (label,) * len(b))


def test_a_small_vehicle_without_a_plate_gets_a_mask_on_its_middle() -> None:
    zones = plates_from_vehicles(dets([[100, 100, 200, 160]], "vehicle"), Detections(), 200)
    assert zones.labels == ("plate",)
    x1, y1, x2, y2 = zones.boxes[0]
    assert (x1, x2) == pytest.approx((115, 185)) and (y1, y2) == pytest.approx((115, 148))


def test_no_zone_where_a_plate_was_found_or_the_vehicle_is_large() -> None:
    cars = dets([[100, 100, 200, 160], [300, 100, 400, 160], [0, 0, 400, 260]], "vehicle")
    found = dets([[140, 130, 160, 136]], "plate")  # on the first car
    zones = plates_from_vehicles(cars, found, 200)
    assert len(zones) == 1 and zones.boxes[0, 0] == pytest.approx(315)  # only the second car
    assert len(plates_from_vehicles(Detections(), found, 200)) == 0


@pytest.fixture(scope="module")
def bus() -> np.ndarray:
    return read_bgr(BUS)


def test_the_person_model_finds_vehicles_only_when_asked(bus: np.ndarray) -> None:
    found = PersonYolo(threshold=0.3, input_size=960, min_input=640, vehicles=True)([bus])[0]
    cars = found.with_label("vehicle")
    assert len(cars) == 1 and iou(cars.boxes[0], BUS_VEHICLE) > 0.8
    assert len(found.with_label("person")) >= 3
    plain = PersonYolo(threshold=0.3, input_size=960, min_input=640)([bus])[0]
    assert set(plain.labels) == {"person"}


def zone_of(vehicle: tuple[int, int, int, int]) -> np.ndarray:
    return plates_from_vehicles(dets([list(vehicle)], "vehicle"), Detections(), 4096).boxes[0]


def test_a_small_bus_without_a_found_plate_gets_a_plate_mask(bus: np.ndarray) -> None:
    # a plate threshold no box reaches stands for a plate too small for the plate model
    blind = FrameDetector(detector_config("accurate", providers=("cpu",), plate_threshold=0.99,
                                          plate_crops=False))
    small = blind.detect([bus])[0]
    assert set(small.labels) <= {"face", "plate"}  # vehicles place masks, they are not masks
    plates = small.with_label("plate").boxes
    assert len(plates) == 1 and iou(plates[0], zone_of(BUS_VEHICLE)) > 0.8, plates
    large = cv2.resize(bus, None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR)  # the bus is 516 px tall
    assert len(blind.detect([large])[0].with_label("plate")) == 0
    off = FrameDetector(detector_config("accurate", providers=("cpu",), plate_threshold=0.99,
                                        vehicle_plates=0))
    assert len(off.detect([bus])[0].with_label("plate")) == 0


def test_a_searched_vehicle_gets_a_mask_only_below_the_limit(bus: np.ndarray) -> None:
    """The crop pass searched the bus (172 px tall) and found nothing: over a 120 px limit, no
    middle mask; shrunk below it, one."""
    blind = FrameDetector(detector_config("accurate", providers=("cpu",), plate_threshold=0.99,
                                          vehicle_plates=120))
    assert blind.config.plate_crops is not None and blind.config.plate_crops.threshold == 0.99
    assert len(blind.detect([bus])[0].with_label("plate")) == 0
    assert blind.crops_run == 1
    canvas = np.full((360, 640, 3), 128, np.uint8)
    canvas[100:100 + 180, 200:200 + 135] = cv2.resize(bus, (135, 180), interpolation=cv2.INTER_AREA)
    found = blind.detect([canvas])[0].with_label("plate")
    assert blind.crops_run >= 2, "the small bus was searched too"
    assert len(found) == 1 and found.boxes[0, 3] - found.boxes[0, 1] < 60  # the middle of an 86 px bus


def test_a_vehicle_whose_plate_was_found_gets_no_second_mask(bus: np.ndarray) -> None:
    found = FrameDetector(detector_config("accurate", providers=("cpu",))).detect([bus])[0]
    plates = found.with_label("plate").boxes
    assert len(plates) == 1 and contains(BUS_VEHICLE, plates[0])  # the plate on the bus's front
    assert iou(plates[0], zone_of(BUS_VEHICLE)) < 0.1


def test_the_option_is_range_checked() -> None:
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "redact", str(BUS), "-o", "/tmp/x.jpg",
                           "--vehicle-plates", "-5"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--vehicle-plates" in proc.stderr and "between 0 and 4096" in proc.stderr
