"""Screens and whole persons: reported by the shared person model, masked only on the streams that ask."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import FIXTURES, encode_frames, read_bgr
from live_helpers import wait_for

from stream.config import parse_config
from stream.detect.letterbox import Placement
from stream.detect.yolo import SCREEN_CLASSES, VEHICLE_CLASSES, PersonYolo
from stream.live.pipeline import Pipeline
from stream.live.service import detector_factory_for

BUS = FIXTURES / "bus_360.jpg"


def _fake_output(rows: list[int], hot: dict[int, float], anchors: int = 8) -> np.ndarray:
    """A person-model output holding only ``rows``; anchor k is a box at (40k+20, 50) scoring
    ``hot[class]`` for the COCO class named by the row."""
    out = np.zeros((1, len(rows), anchors), np.float32)
    for k in range(anchors):
        out[0, :4, k] = (40 * k + 20, 50, 30, 40)
    for k, (cls, score) in enumerate(hot.items()):
        out[0, rows.index(4 + cls), k] = score
    return out


@pytest.mark.parametrize(("vehicles", "screens", "hot", "labels"), [
    (False, False, {0: 0.9}, ["person"]),
    (True, False, {0: 0.9, 2: 0.8, 7: 0.5}, ["person", "vehicle", "vehicle"]),
    (False, True, {62: 0.7, 67: 0.4}, ["screen", "screen"]),
    (True, True, {0: 0.9, 5: 0.6, 63: 0.8}, ["person", "vehicle", "screen"]),
    (True, True, {63: 0.1, 3: 0.1}, []),  # below both thresholds
])
def test_rows_kept_and_decoded_per_class(vehicles: bool, screens: bool, hot: dict[int, float],
                                         labels: list[str]) -> None:
    m = PersonYolo(threshold=0.3, input_size=640, providers=("cpu",), vehicles=vehicles, screens=screens)
    assert m.rows == [0, 1, 2, 3, 4, *([4 + c for c in VEHICLE_CLASSES] if vehicles else []),
                      *([4 + c for c in SCREEN_CLASSES] if screens else [])]
    dets = m._finish([_fake_output(m.rows, hot)], 0, Placement(1.0, 0, 0), (480, 640))
    assert sorted(dets.labels) == sorted(labels)


def test_keeping_screen_rows_changes_no_person_or_vehicle_box() -> None:
    """The Gather that keeps the screen rows must leave what the other rows say untouched."""
    image = read_bgr(BUS)
    plain = PersonYolo(threshold=0.3, input_size=640, providers=("cpu",), vehicles=True)
    both = PersonYolo(threshold=0.3, input_size=640, providers=("cpu",), vehicles=True, screens=True)
    a, b = plain([image])[0], both([image])[0].select(np.asarray(both([image])[0].labels) != "screen")
    assert len(a) >= 3 and a.labels == b.labels
    assert np.allclose(a.boxes, b.boxes, atol=0.5) and np.allclose(a.scores, b.scores, atol=1e-4)


def _still_clip(path: Path, image: np.ndarray, frames: int = 40) -> Path:
    return encode_frames(path, [image] * frames, fps=10)


def test_one_shared_detector_masks_persons_only_on_the_stream_that_asks(tmp_path: Path) -> None:
    clip = _still_clip(tmp_path / "bus.mp4", read_bgr(BUS))
    cfg = parse_config({
        "streams": [
            {"id": "strict", "source": {"type": "file", "path": str(clip), "loop": True},
             "privacy": {"persons": True}},
            {"id": "normal", "source": {"type": "file", "path": str(clip), "loop": True}},
        ],
        "detection": {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"],
                      "person_every": 1},
    })
    assert cfg.privacy_classes() == ("person",)  # head masks off: only what a stream asks for
    labels: dict[str, list[set[str]]] = {"strict": [], "normal": []}

    def hook(sid: str) -> Any:
        return lambda frame, image, dets: labels[sid].append(set(dets.labels))

    p = Pipeline(cfg, detector_factory_for(cfg))
    p.start()
    try:
        for sid in labels:
            p.streams[sid].on_redacted.append(hook(sid))
        wait_for(lambda: min(len(v) for v in labels.values()) >= 8, timeout=60, what="8 frames per stream")
    finally:
        p.stop()
    assert all("person" in s for s in labels["strict"][2:]), labels["strict"]
    assert not any("person" in s or "screen" in s for s in labels["normal"]), labels["normal"]


def _screen_synth() -> Any:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("screen_synth", FIXTURES.parent.parent / "benchmarks" /
                                                  "screen_synth.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["screen_synth"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_a_rendered_monitor_is_found_and_masked_where_it_is() -> None:
    """The screens class end to end on a picture the test renders: a 200 px monitor facing the camera
    (the model scores it about 0.7) is reported as a screen covering it, and painted over."""
    from stream.config import DetectionConfig
    from stream.core.masking import MaskingStage
    from stream.core.redact import Redactor
    from stream.core.track import Tracker
    from stream.detect.ensemble import FrameDetector

    ss = _screen_synth()
    scene = ss.render(200, 0.0, 6, "chelsea.jpg", "astronaut_256.jpg")
    settings = DetectionConfig(preset="accurate", providers=["cpu"], plates=False)
    det = FrameDetector(settings.detector_settings(classes=["screen"]))
    found = det([scene.image])[0]
    screens = found.with_label("screen")
    assert len(screens) == 1 and ss.covered(screens.boxes, scene.box, scene.image.shape[:2]) == 1.0
    redact = parse_config({"redaction": {"style": "solid"}}).redaction.redact_config()
    image = scene.image.copy()
    (masked,) = MaskingStage(Tracker(), Redactor(redact)).push(0, image, found)
    x1, y1, x2, y2 = scene.box
    assert "screen" in {r.label for r in masked.regions}
    assert int(masked.image[y1:y2, x1:x2].max()) == 0, "the screen's picture is still visible"
