"""Plates found as text lines (PP-OCRv4's text detector): decoding, the folded normalisation, and a
square two-line plate the plate model does not find."""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from helpers import CHELSEA, coverage, read_bgr, textured_background

from stream.core.detections import Detections, FrameRef
from stream.core.redact import Redactor
from stream.core.vehicle_plates import TEXT_LABEL
from stream.detect.ensemble import FrameDetector
from stream.detect.models import model_path
from stream.detect.presets import detector_config
from stream.detect.text import MAX_ASPECT, MAX_HEIGHT, UNCLIP, TextPlates, merge_lines, text_lines


def test_lines_are_grown_as_dbnet_does_scored_by_their_mean_and_long_ones_dropped() -> None:
    prob = np.zeros((100, 200), np.float32)
    prob[20:30, 40:80] = 0.9  # a plate's line: 40 x 10
    prob[24:26, 60:62] = 0.5  # a dip inside it lowers its mean
    prob[60:64, 10:190] = 0.95  # 180 x 4: a sign's caption, far wider than any plate
    prob[90, 5] = 0.99  # one pixel: noise
    boxes, scores = text_lines(prob)
    assert len(boxes) == 1
    # the 2x2 dilation makes the core 41 x 11; it grows by area * UNCLIP / perimeter on each side
    grow = 41 * 11 * UNCLIP / (2 * (41 + 11))
    np.testing.assert_allclose(boxes[0], [40 - grow, 20 - grow, 81 + grow, 31 + grow], rtol=1e-5)
    region = np.zeros_like(prob, bool)
    region[20:31, 40:81] = True
    assert scores[0] == pytest.approx(prob[region].mean(), rel=1e-5)
    assert scores[0] < 0.9
    assert MAX_ASPECT < 181 / 5  # why the caption went (grown, it is wider still)


def test_an_empty_map_has_no_lines() -> None:
    boxes, scores = text_lines(np.zeros((64, 64), np.float32))
    assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_paddleocr_normalisation_is_folded_into_the_graph() -> None:
    """Fed 0-1 like the YOLO models (so the GPU letterbox serves it too), the graph as loaded gives
    what the shipped graph gives on PaddleOCR's (x - 0.5) / 0.5 input."""
    det = TextPlates(input_size=320, providers=("cpu",))
    x = np.random.default_rng(0).random((1, 3, 64, 96), dtype=np.float32)
    ours = det.backend_for(64, 96).run(x)[0]
    shipped = ort.InferenceSession(str(model_path("text")), providers=["CPUExecutionProvider"])
    theirs = shipped.run(None, {"x": (x - 0.5) / 0.5})[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def square_plate(side: int, lines: tuple[str, str] = ("AB12", "CDE")) -> np.ndarray:
    """A yellow square two-line plate (a motorcycle's, in the UK and elsewhere)."""
    plate = np.full((side, side, 3), (0, 210, 250), np.uint8)
    cv2.rectangle(plate, (0, 0), (side - 1, side - 1), (0, 0, 0), max(1, side // 24))
    font = cv2.FONT_HERSHEY_SIMPLEX
    for k, text in enumerate(lines):
        (tw, th), _ = cv2.getTextSize(text, font, 1.0, 2)
        scale = min(side * 0.8 / tw, side * 0.32 / th)
        thick = max(1, round(scale * 2.2))
        (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
        cv2.putText(plate, text, ((side - tw) // 2, int(side * (0.42, 0.85)[k])), font, scale, (0, 0, 0),
                    thick, cv2.LINE_AA)
    return plate


@pytest.mark.parametrize("side", [40, 72])
def test_a_square_plate_the_plate_model_misses_is_masked_from_its_text(side: int) -> None:
    frame = textured_background(1280, 720, seed=5)
    x, y = 600, 400
    frame[y:y + side, x:x + side] = square_plate(side)
    plate = (x, y, x + side, y + side)
    found = {}
    for text in (False, True):
        det = FrameDetector(detector_config("accurate", text_plates=text, providers=("cpu",)))
        found[text] = det.detect([frame], [FrameRef("cam", 1)])[0]
    assert "plate" not in found[False].labels  # the plate model alone: nothing
    lines = found[True]
    assert lines.labels == (TEXT_LABEL, TEXT_LABEL)  # one box per line of characters, text-only plates
    for box in lines.boxes:
        assert coverage(plate, box) > 0.75  # each line lies on the plate (grown a little past it)
    # painted with the plate masks' margin, the two lines cover the plate as the scorer asks (80%)
    mask = np.zeros(frame.shape[:2], bool)
    for r in Redactor().regions(lines, frame.shape[1], frame.shape[0]):
        x1, y1, x2, y2 = r.box
        mask[y1:y2, x1:x2] = True
    assert mask[y:y + side, x:x + side].mean() >= 0.8


def test_the_torch_backend_runs_the_same_graph() -> None:
    """Where only torch reaches the GPU the text pass runs there too: its weights, held in Constant
    nodes by the export, are moved to initializers for the converter."""
    pytest.importorskip("onnx2torch")
    x = np.random.default_rng(1).random((2, 3, 64, 96), dtype=np.float32)
    on_torch = TextPlates(input_size=320, providers=("cpu",), backend="torch", static_graphs=False)
    on_ort = TextPlates(input_size=320, providers=("cpu",))
    assert type(on_torch.backend_for(64, 96)).__name__ == "TorchBackend"
    np.testing.assert_allclose(np.asarray(on_torch.backend_for(64, 96).run(x)[0]),
                               on_ort.backend_for(64, 96).run(x)[0], atol=1e-5)


def test_lines_taller_than_a_plate_can_be_are_dropped() -> None:
    """On the cat photo the text detector reads both eyes as text (lines a fifth of the frame tall)
    and the whisker pad's spots: only the last is short enough to be a plate's line."""
    cat = read_bgr(CHELSEA)
    lines = TextPlates(input_size=960, threshold=0.5, providers=("cpu",)).run([cat])[0]
    heights = lines.boxes[:, 3] - lines.boxes[:, 1]
    assert len(lines) == 1 and heights.max() <= MAX_HEIGHT * cat.shape[0]
    raw = TextPlates(input_size=960, threshold=0.5, providers=("cpu",))
    raw.max_height = 1.0  # no height limit: the eyes come back
    assert len(raw.run([cat])[0]) == 3


def test_a_line_on_a_found_plate_widens_it_and_others_stand_alone() -> None:
    plates = Detections(np.array([[100, 100, 160, 114]], np.float32), np.array([0.6], np.float32), ("plate",))
    lines = Detections(np.array([[96, 102, 158, 116], [300, 50, 340, 62]], np.float32),
                       np.array([0.9, 0.7], np.float32), ("plate", "plate"))
    merged = merge_lines(plates, lines)
    assert merged.labels == ("plate", TEXT_LABEL)  # the widened plate stays the plate model's
    np.testing.assert_array_equal(merged.boxes, [[96, 100, 160, 116], [300, 50, 340, 62]])
    np.testing.assert_allclose(merged.scores, [0.9, 0.7])
    assert merge_lines(Detections(), lines).labels == (TEXT_LABEL, TEXT_LABEL)
    assert len(merge_lines(plates, Detections())) == 1
