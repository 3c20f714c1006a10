"""Plates too small for the plate model: a mask over the middle of each small vehicle without one."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from helpers import BUS, BUS_VEHICLE, ROOT, contains, iou, read_bgr

from stream.core.detections import Detections
from stream.core.redact import Redactor
from stream.core.track import Tracker, TrackerConfig
from stream.core.vehicle_plates import (
    LABEL,
    PLATE_FRESH_FRAMES,
    STAND_IN_COAST,
    TEXT_COAST,
    TEXT_LABEL,
    covered,
    plates_from_vehicles,
    vehicles_of,
    zones_of,
)
from stream.detect.ensemble import FrameDetector
from stream.detect.presets import detector_config
from stream.detect.yolo import PersonYolo


def dets(boxes: list[list[float]], label: str) -> Detections:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return Detections(b, np.full(len(b), 0.8, np.float32), (label,) * len(b))


def test_a_small_vehicle_without_a_plate_gets_a_mask_on_its_middle() -> None:
    zones = plates_from_vehicles(dets([[100, 100, 200, 160]], "vehicle"), Detections(), 200)
    assert zones.labels == (LABEL,)
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
                                          plate_crops=False, text_plates=False))
    small = blind.detect([bus])[0]
    assert set(small.labels) <= {"face", LABEL}  # vehicles place masks, they are not masks
    plates = small.with_label(LABEL).boxes
    assert len(plates) == 1 and iou(plates[0], zone_of(BUS_VEHICLE)) > 0.8, plates
    large = cv2.resize(bus, None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR)  # the bus is 516 px tall
    assert len(blind.detect([large])[0].with_label(LABEL)) == 0
    off = FrameDetector(detector_config("accurate", providers=("cpu",), plate_threshold=0.99,
                                        vehicle_plates=0, text_plates=False))
    assert len(off.detect([bus])[0].with_label(LABEL)) == 0


def test_a_searched_vehicle_gets_a_mask_only_below_the_limit(bus: np.ndarray) -> None:
    """The crop pass searched the bus (172 px tall) and found nothing: over a 120 px limit, no
    middle mask; shrunk below it, one."""
    blind = FrameDetector(detector_config("accurate", providers=("cpu",), plate_threshold=0.99,
                                          vehicle_plates=120))
    assert blind.config.plate_crops is not None and blind.config.plate_crops.threshold == 0.99
    assert len(blind.detect([bus])[0].with_label(LABEL)) == 0
    assert blind.crops_run == 1
    canvas = np.full((360, 640, 3), 128, np.uint8)
    canvas[100:100 + 180, 200:200 + 135] = cv2.resize(bus, (135, 180), interpolation=cv2.INTER_AREA)
    found = blind.detect([canvas])[0].with_label(LABEL)
    assert blind.crops_run >= 2, "the small bus was searched too"
    assert len(found) == 1 and found.boxes[0, 3] - found.boxes[0, 1] < 60  # the middle of an 86 px bus


def test_a_vehicle_whose_plate_was_found_gets_no_second_mask(bus: np.ndarray) -> None:
    # the plate model's plate (the text pass reads the bus's lettering too: see the test below)
    found = FrameDetector(detector_config("accurate", providers=("cpu",), text_plates=False)).detect([bus])[0]
    plates = found.with_label("plate").boxes
    assert len(plates) == 1 and contains(BUS_VEHICLE, plates[0])  # the plate on the bus's front
    assert len(found.with_label(LABEL)) == 0
    assert iou(plates[0], zone_of(BUS_VEHICLE)) < 0.1


def test_text_read_on_a_vehicle_does_not_cancel_its_stand_in(bus: np.ndarray) -> None:
    """The text pass finds the bus's lettering (destination, livery) as lines; with no plate found
    by the plate model, the bus keeps its middle mask all the same: a badge or a slogan read as
    text must not stand for the plate that is too small to find."""
    blind = FrameDetector(detector_config("accurate", providers=("cpu",), plate_threshold=0.99,
                                          plate_crops=False))
    found = blind.detect([bus])[0]
    assert len(found.with_label(TEXT_LABEL)) >= 2  # lines of text on and around the bus
    zones = found.with_label(LABEL).boxes
    assert len(zones) == 1 and iou(zones[0], zone_of(BUS_VEHICLE)) > 0.8


def test_zone_geometry_inverts_exactly() -> None:
    cars = np.array([[100, 100, 200, 160], [0.5, 3, 41.5, 30]], np.float32)
    assert np.allclose(vehicles_of(zones_of(cars)), cars, atol=1e-3)
    assert covered(zones_of(cars), np.array([[140, 150, 160, 158]], np.float32)).tolist() == [True, False]


BOTH = frozenset({"face", "plate", LABEL, TEXT_LABEL})
CAR, OTHER = [100, 100, 200, 160], [300, 100, 400, 160]


def track(tracker: Tracker, *parts: Detections, observed: frozenset[str] = BOTH,
          elapsed: int = 1) -> Detections:
    d = Detections.concat(list(parts))
    return tracker.update(Detections(d.boxes, d.scores, d.labels, observed=observed), elapsed=elapsed)


def test_a_stand_in_ends_when_its_vehicles_plate_is_detected() -> None:
    """The middle mask stands in for a plate not found yet: when a plate is detected on the vehicle
    the stand-in ends at once, instead of coasting and growing beside the plate for 12 frames; a
    plate missed for a frame or two still stands for itself, one coasting longer gets a stand-in as
    its backup."""
    t = Tracker(TrackerConfig(max_coast=12))
    zones = plates_from_vehicles(dets([CAR, OTHER], "vehicle"), Detections(), 200)
    out = track(t, zones)
    assert out.labels == (LABEL, LABEL)
    out = track(t, dets([[140, 145, 160, 151]], "plate"))  # the car's plate, found on the next frame
    assert out.labels == (LABEL, "plate") and out.boxes[0, 0] > 300, "only the other car keeps its mask"
    assert [i.label for i in t.changes.ended] == [LABEL]
    # the plate is missed for a frame while the vehicle model still sees both cars: no stand-in yet
    out = track(t, zones)
    assert sorted(out.labels) == sorted([LABEL, "plate"])
    # missed for longer than PLATE_FRESH_FRAMES: the car's stand-in is back
    out = track(t, zones, elapsed=PLATE_FRESH_FRAMES)
    assert sorted(out.labels) == sorted([LABEL, LABEL, "plate"])
    assert [i.label for i in t.changes.started] == [LABEL]
    car = out.boxes[[i for i, lb in enumerate(out.labels) if lb == LABEL]]
    assert (car[:, 0] < 200).sum() == 1, "one stand-in on the car, one on the other car"
    # detected again: the stand-in ends again, the other car's stays
    out = track(t, dets([[141, 145, 161, 151]], "plate"))
    assert sorted(out.labels) == sorted([LABEL, "plate"])


def test_a_stand_in_outlives_its_vehicle_briefly_and_never_grows() -> None:
    """A plate track coasts for ``max_coast`` looks, growing; a stand-in, already a generous zone
    over its vehicle, coasts for STAND_IN_COAST looks at its own size."""
    t = Tracker(TrackerConfig(max_coast=12, coast_growth=0.06))
    zone = plates_from_vehicles(dets([CAR], "vehicle"), Detections(), 200)
    plate = dets([[300, 145, 320, 151]], "plate")  # on another vehicle, whose zone is not here
    track(t, zone, plate)
    size = {lb: None for lb in (LABEL, "plate")}
    for look in range(1, 13):
        out = track(t, Detections())  # both looked for, neither found
        got = dict(zip(out.labels, out.boxes, strict=True))
        assert "plate" in got, f"the plate track coasts all 12 looks (look {look})"
        assert (LABEL in got) == (look <= STAND_IN_COAST), f"look {look}: {out.labels}"
        if LABEL in got:
            assert np.allclose(got[LABEL], zone.boxes[0]), "a stand-in keeps its size"
        size = {lb: float(np.prod(b[2:] - b[:2])) for lb, b in got.items()}
    assert size["plate"] > 120 * 1.5, "the plate box grew while coasting"
    # a stand-in whose vehicle is found on every look lives on
    for _ in range(20):
        assert LABEL in track(t, zone).labels


def test_a_text_only_plate_neither_ends_a_stand_in_nor_coasts_long() -> None:
    """A line of text where the plate model found no plate is weaker evidence than a plate: it may be
    a badge or a slogan on the vehicle, so its track does not end the vehicle's stand-in, and it may
    be a sign or paving read as text, so it outlives its last detection by TEXT_COAST looks (a plate
    track: ``max_coast``). It is a plate in every output."""
    t = Tracker(TrackerConfig(max_coast=12))
    zone = plates_from_vehicles(dets([CAR], "vehicle"), Detections(), 200)
    badge = dets([[140, 145, 160, 151]], TEXT_LABEL)  # where the car's plate would be
    out = track(t, zone, badge)
    assert sorted(out.labels) == sorted([LABEL, TEXT_LABEL]) and not t.changes.ended
    sign = dets([[300, 20, 380, 40]], TEXT_LABEL)
    plate = dets([[300, 145, 320, 151]], "plate")
    t = Tracker(TrackerConfig(max_coast=12))
    track(t, sign, plate)
    for look in range(1, 13):
        out = track(t, Detections())
        assert "plate" in out.labels, f"the plate coasts all 12 looks (look {look})"
        assert (TEXT_LABEL in out.labels) == (look <= TEXT_COAST), f"look {look}: {out.labels}"
    (as_text,) = Redactor().regions(dets([[300, 20, 380, 40]], TEXT_LABEL), 640, 360)
    (as_plate,) = Redactor().regions(dets([[300, 20, 380, 40]], "plate"), 640, 360)
    assert as_text == as_plate, "painted and reported as a plate, with a plate's margin"


def test_the_option_is_range_checked() -> None:
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "redact", str(BUS), "-o", "/tmp/x.jpg",
                           "--vehicle-plates", "-5"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--vehicle-plates" in proc.stderr and "between 0 and 4096" in proc.stderr
