"""The second look at plates just lost: where it looks, what it remembers and forgets, and a plate
the full-frame pass misses that it finds."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import numpy as np
import pytest
from helpers import ROOT

from stream.config import DetectionConfig
from stream.core.detections import Detections, FrameRef
from stream.detect.ensemble import FrameDetector
from stream.detect.presets import detector_config
from stream.detect.relook import LostPlates, RelookConfig, square_crop
from stream.loadtest.scene import Scene, load_material
from stream.samples import sample_path

SHAPE = (360, 640)


def _replay_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plate_relook", ROOT / "benchmarks" / "plate_relook.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REPLAY = _replay_module()
"""benchmarks/plate_relook.py, whose coverage rule the tests share"""


def plates(*boxes: list[float]) -> Detections:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return Detections(b, np.full(len(b), 0.6, np.float32), ("plate",) * len(b))


def inside(inner: np.ndarray | list[float], outer: tuple[int, int, int, int]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


# -- where it looks --------------------------------------------------------------------------------
def test_a_plate_not_found_again_is_searched_on_a_square_read_larger() -> None:
    cfg = RelookConfig()
    lost = LostPlates(cfg)
    lost.remember("cam", 10, plates([300, 200, 360, 214]), SHAPE)
    (box,) = lost.crops("cam", 13, Detections(), SHAPE, read_scale=1.0)
    x1, y1, x2, y2 = box
    assert inside([300, 200, 360, 214], box)
    assert all(v % 2 == 0 for v in box)
    # 1.5x the full pass's reading: the square is side / 1.5 source pixels, so it reads at 1.5x
    assert x2 - x1 == y2 - y1 == 256
    assert abs((x1 + x2) / 2 - 330) <= 2 and abs((y1 + y2) / 2 - 207) <= 2


def test_small_plates_are_read_at_least_min_plate_px_wide_and_large_ones_still_fit() -> None:
    cfg = RelookConfig()
    lost = LostPlates(cfg)
    lost.remember("cam", 0, plates([300, 200, 316, 204]), SHAPE)  # 16 px: read at 48 / 16 = 3x
    (box,) = lost.crops("cam", 1, Detections(), SHAPE, read_scale=0.5)
    assert box[2] - box[0] == 128
    lost.remember("cam", 0, plates([100, 100, 400, 160]), (1080, 1920))  # 300 px: fits in 0.9 of the input
    (wide,) = [b for b in lost.crops("cam", 1, Detections(), (1080, 1920), read_scale=1.0) if b[0] < 200]
    assert inside([100, 100, 400, 160], wide)
    assert (wide[2] - wide[0]) * cfg.fit >= 300 - 2


def test_a_plate_found_again_where_it_is_expected_is_not_searched() -> None:
    lost = LostPlates(RelookConfig())
    lost.remember("cam", 10, plates([300, 200, 360, 214]), SHAPE)
    assert lost.crops("cam", 13, plates([305, 202, 365, 216]), SHAPE, 1.0) == []
    # a plate elsewhere does not stand for it
    assert len(lost.crops("cam", 13, plates([10, 10, 70, 24]), SHAPE, 1.0)) == 1
    # another stream's plate is not this stream's
    assert lost.crops("other", 13, Detections(), SHAPE, 1.0) == []


def test_the_crop_follows_a_moving_plate_and_spans_its_last_sighting() -> None:
    lost = LostPlates(RelookConfig())
    lost.remember("cam", 0, plates([100, 100, 160, 114]), SHAPE)
    lost.remember("cam", 3, plates([106, 103, 166, 117]), SHAPE)  # 2 px right, 1 px down a frame
    (box,) = lost.crops("cam", 23, Detections(), SHAPE, 1.0)
    assert inside([106, 103, 166, 117], box)  # where it was last seen
    assert inside([146, 123, 206, 137], box)  # and where it is heading


def test_plates_are_forgotten_after_the_window_on_a_restart_and_when_asked() -> None:
    cfg = RelookConfig(window=20)
    lost = LostPlates(cfg)
    lost.remember("cam", 100, plates([300, 200, 360, 214]), SHAPE)
    assert len(lost.crops("cam", 120, Detections(), SHAPE, 1.0)) == 1
    assert lost.crops("cam", 121, Detections(), SHAPE, 1.0) == []
    lost.remember("cam", 5, Detections(), SHAPE)  # the stream started again
    assert lost.streams() == []
    lost.remember("cam", 5, plates([300, 200, 360, 214]), SHAPE)
    lost.forget("cam")
    assert lost.crops("cam", 6, Detections(), SHAPE, 1.0) == []


def test_the_memory_keeps_only_the_latest_plates_of_a_stream() -> None:
    lost = LostPlates(RelookConfig(max_remembered=3))
    for k in range(6):  # six plates in six places, none following another
        lost.remember("cam", k, plates([10 + 100 * k, 10, 60 + 100 * k, 24]), SHAPE)
    crops = lost.crops("cam", 7, Detections(), SHAPE, 1.0)
    assert len(crops) == 3
    assert all(inside([10 + 100 * k, 10, 60 + 100 * k, 24], c) for k, c in zip((5, 4, 3), crops, strict=True))


def test_at_most_max_per_frame_lost_plates_are_searched_the_latest_seen_first() -> None:
    lost = LostPlates(RelookConfig(max_per_frame=2))
    for k in range(4):
        lost.remember("cam", k, plates([10 + 150 * k, 10, 70 + 150 * k, 24]), SHAPE)
    crops = lost.crops("cam", 10, Detections(), SHAPE, 1.0)
    assert len(crops) == 2
    assert inside([460, 10, 520, 24], crops[0]) and inside([310, 10, 370, 24], crops[1])


@pytest.mark.parametrize(("span", "expected"), [
    ([0, 0, 20, 10], (0, 0, 128, 128)),  # at the top left: moved inside the frame
    ([620, 350, 639, 359], (512, 232, 640, 360)),  # at the bottom right
    ([300, 100, 340, 120], (256, 46, 384, 174)),
])
def test_square_crops_stay_inside_the_frame(span: list[float], expected: tuple[int, ...]) -> None:
    assert square_crop(np.array(span, np.float32), 3.0, 384, 640, 360) == expected


def test_a_square_larger_than_the_frame_is_cut_at_its_edges() -> None:
    assert square_crop(np.array([100, 100, 200, 120], np.float32), 1.0, 384, 320, 240) == (0, 0, 320, 240)


# -- settings --------------------------------------------------------------------------------------
def test_it_is_on_by_default_and_off_where_asked_or_without_plates() -> None:
    assert detector_config("fast").plate_relook is not None
    assert detector_config("accurate").plate_relook is not None
    assert detector_config("fast", plate_relook=False).plate_relook is None
    assert detector_config("fast", plates=False).plate_relook is None
    assert DetectionConfig(plate_relook=False).detector_settings().plate_relook is None
    assert detector_config("fast", plate_threshold=0.5).plate_relook.threshold == 0.5


# -- on the plate model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bouncing_plate() -> Scene:
    """The load test's second camera: a rendered UK plate of 170 x 36 px that the plate model at
    640 px finds on frame 127 (score 0.44) and misses on frame 131 (0.06)."""
    return Scene(load_material(sample_path("talking-face")), 1, 640, 360, 25.0)


def covers(found: Detections, truth: tuple[int, int, int, int]) -> bool:
    """A plate box covers at least half of ``truth``: the replay benchmark's own rule."""
    return bool(REPLAY.covered(found, truth))


@pytest.mark.parametrize("relook", [True, False])
def test_a_plate_the_full_frame_pass_misses_is_found_where_it_was_just_seen(bouncing_plate: Scene,
                                                                            relook: bool) -> None:
    det = FrameDetector(detector_config("fast", providers=("cpu",), lanes=1, plate_every=1,
                                        plate_relook=relook))
    truth = {seq: next((b.x1, b.y1, b.x2, b.y2) for b in bouncing_plate.truth(seq) if b.label == "plate")
             for seq in (127, 131)}
    first = det.detect([bouncing_plate.render(127)], [FrameRef("cam", 127)])[0]
    assert covers(first, truth[127])
    missed = det.detect([bouncing_plate.render(131)], [FrameRef("cam", 131)])[0]
    assert covers(missed, truth[131]) is relook
    assert (det.relooks_run, det.relooks_found) == ((1, 1) if relook else (0, 0))
    # another stream's frame is not searched for this stream's plate
    det.detect([bouncing_plate.render(131)], [FrameRef("other", 131)])
    assert det.relooks_run == (1 if relook else 0)


@pytest.mark.parametrize(("lanes", "regions"), [(2, False), (1, True)])
def test_the_second_look_runs_beside_other_models_and_after_change_gated_runs(
        bouncing_plate: Scene, lanes: int, regions: bool) -> None:
    """With lanes it follows the plate model in that model's task; change-gated plate runs (no
    task) get it after every pass. Either way the missed plate is found, in a batch of two streams."""
    det = FrameDetector(detector_config("fast", providers=("cpu",), lanes=lanes, plate_every=1,
                                        regions=regions))
    truth = next((b.x1, b.y1, b.x2, b.y2) for b in bouncing_plate.truth(131) if b.label == "plate")
    det.detect([bouncing_plate.render(127)], [FrameRef("cam", 127)])
    other = np.zeros((360, 640, 3), np.uint8)
    missed, quiet = det.detect([bouncing_plate.render(131), other], [FrameRef("cam", 131), FrameRef("q", 1)])
    assert covers(missed, truth)
    assert not covers(quiet, truth)
    assert (det.relooks_run, det.relooks_found) == (1, 1)


def test_a_cut_or_a_forgotten_stream_drops_its_lost_plates(bouncing_plate: Scene) -> None:
    det = FrameDetector(detector_config("fast", providers=("cpu",), lanes=1, plate_every=1))
    det.detect([bouncing_plate.render(127)], [FrameRef("cam", 127)])
    assert det._lost is not None and det._lost.streams() == ["cam"]
    det.forget("cam")
    assert det._lost.streams() == []
    det.detect([bouncing_plate.render(127)], [FrameRef("cam", 127)])
    # a cut to another view (bright and grey blocks): the old view's plate is not looked for there
    other = np.zeros((360, 640, 3), np.uint8)
    other[:, :320], other[180:, 320:] = 230, 90
    det.detect([other], [FrameRef("cam", 128)])
    assert det.relooks_run == 0
