"""YOLOv8 graphs at the frame's aspect ratio: the COCO export re-targeted to other input sizes
(rebuild_for_shape) and PersonYolo's sessions; the dynamic plate export on a 16:9 canvas; the int8
variants of both the same way."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import pytest
from helpers import ASTRONAUT_PERSON, iou, uk_plate

from stream.detect.base import rgb_unit
from stream.detect.letterbox import letterbox_batch
from stream.detect.models import model_path
from stream.detect.runtime import create_session
from stream.detect.yolo import PersonYolo, rebuild_for_shape

CPU = ("cpu",)


def anchors(height: int, width: int) -> int:
    return sum((height // s) * (width // s) for s in (8, 16, 32))


@pytest.fixture(scope="module", params=["person", "person_int8"])
def coco_path(request: pytest.FixtureRequest):
    """The fp32 export and its int8 variant: both carry the baked 640x640 anchor grid."""
    return model_path(request.param)


@pytest.fixture(scope="module")
def original(coco_path):
    return create_session(coco_path, CPU)


def rebuilt(coco_path, height: int, width: int):
    return create_session(rebuild_for_shape(onnx.load(str(coco_path)), height, width), CPU)


def run(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_original_export_is_fixed_640_batch_1(original) -> None:
    """Guard the premise: the shipped export cannot take another size or a batch by itself."""
    assert original.get_inputs()[0].shape == [1, 3, 640, 640]
    assert original.get_outputs()[0].shape == [1, 84, 8400]


def test_rebuilt_640x640_matches_the_original_exactly(coco_path, original, astronaut: np.ndarray) -> None:
    batch, _ = letterbox_batch([astronaut], 640, pad=114)
    assert batch.shape[1:3] == (640, 640)
    real = rgb_unit(batch)
    noise = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    session = rebuilt(coco_path, 640, 640)
    for x in (real, noise):
        want = run(original, x)
        got = run(session, x)
        assert got.shape == want.shape == (1, 84, 8400)
        assert np.abs(got - want).max() < 1e-4
    assert run(original, real)[0, 4].max() > 0.5, "the astronaut should score as a person"
    # the rebuilt graph also takes a batch: each item as the original gives it alone
    both = np.concatenate([real, noise])
    got = run(session, both)
    assert got.shape == (2, 84, 8400)
    for i in range(2):
        assert np.abs(got[i] - run(original, both[i:i + 1])[0]).max() < 1e-4


@pytest.mark.parametrize(("height", "width"), [(384, 640), (640, 384), (480, 640), (256, 320)])
def test_rebuilt_model_runs_a_batch_of_other_sizes(coco_path, height: int, width: int) -> None:
    x = np.random.default_rng(1).random((2, 3, height, width), dtype=np.float32)
    out = run(rebuilt(coco_path, height, width), x)
    assert out.shape == (2, 84, anchors(height, width))
    if (height, width) == (384, 640):
        assert out.shape == (2, 84, 5040)
    # box centres are in this canvas's pixels: every anchor's centre lies inside it
    cx, cy = out[:, 0], out[:, 1]
    assert cx.min() > -width * 0.1 and cx.max() < width * 1.1
    assert cy.min() > -height * 0.1 and cy.max() < height * 1.1


def test_rebuilt_384x640_finds_what_the_original_finds(coco_path, original, astronaut: np.ndarray) -> None:
    """A 16:9 frame on a 640x384 canvas: the best person box equals the 640x640 one within a few px."""
    frame = np.full((360, 640, 3), 114, np.uint8)
    frame[52:308, 300:556] = astronaut
    wide, _ = letterbox_batch([frame], 640, pad=114)
    assert wide.shape[1:3] == (384, 640)
    square = np.full((1, 640, 640, 3), 114, np.uint8)
    square[0, :384] = wide[0]
    a = run(original, rgb_unit(square))[0]
    b = run(rebuilt(coco_path, 384, 640), rgb_unit(wide))[0]
    assert a[4].max() > 0.5 and b[4].max() > 0.5
    assert abs(float(a[4].max()) - float(b[4].max())) < 0.05
    np.testing.assert_allclose(a[:4, a[4].argmax()], b[:4, b[4].argmax()], atol=4)


def paste_person(width: int, height: int, x0: int, y0: int, size: int,
                 astronaut: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
    frame = np.full((height, width, 3), 128, np.uint8)
    frame[y0:y0 + size, x0:x0 + size] = cv2.resize(astronaut, (size, size), interpolation=cv2.INTER_AREA)
    k = size / 256
    x1, y1, x2, y2 = ASTRONAUT_PERSON
    return frame, (x0 + x1 * k, y0 + y1 * k, x0 + x2 * k, y0 + y2 * k)


def test_person_yolo_16_9_and_4_3_frames_in_one_call(astronaut: np.ndarray) -> None:
    yolo = PersonYolo(threshold=0.3, providers=CPU)  # its own instance: the test inspects its sessions
    wide, wide_person = paste_person(1280, 720, 700, 300, 400, astronaut)
    four3, four3_person = paste_person(640, 480, 40, 100, 300, astronaut)
    out = yolo([wide, four3])
    assert len(out) == 2
    for name, d, person, frame in (("16:9", out[0], wide_person, wide), ("4:3", out[1], four3_person, four3)):
        people = d.with_label("person")
        assert len(people), f"{name}: no person found: {d}"
        best = max(people.boxes, key=lambda b: iou(b, person))
        assert iou(best, person) > 0.8, f"{name}: {best} vs {person}"
        h, w = frame.shape[:2]
        assert np.all(d.boxes[:, [0, 2]] <= w) and np.all(d.boxes[:, [1, 3]] <= h)
    assert set(yolo._backends) == {(480, 640)}, "one batch: one canvas (the 4:3 frame's 640x480)"
    # the 16:9 frame alone costs 640x384, not 640x640, and gives the same box
    (alone,) = yolo([wide])
    assert set(yolo._backends) == {(480, 640), (384, 640)}
    assert iou(max(alone.with_label("person").boxes, key=lambda b: iou(b, wide_person)), wide_person) > 0.8


@pytest.mark.parametrize("name", ["plate", "plate_int8"])
def test_plate_graph_at_the_frame_aspect_ratio_finds_what_the_square_letterbox_finds(
        name: str, chelsea: np.ndarray) -> None:
    """The plate export is dynamic in H and W: a 16:9 frame on its own 640x384 canvas gives the
    box and score it gets on the 640x640 letterbox (the frame top-left, grey below), at 60% of
    the pixels."""
    session = create_session(model_path(name), CPU)
    assert session.get_inputs()[0].shape[2:] == ["height", "width"]
    frame = np.full((360, 640, 3), 90, np.uint8)
    frame[30:330, 95:546] = chelsea
    plate = (265, 166, 385, 194)
    frame[plate[1]:plate[3], plate[0]:plate[2]] = uk_plate()
    wide, _ = letterbox_batch([frame], 640, pad=114)
    assert wide.shape[1:3] == (384, 640)
    square = np.full((1, 640, 640, 3), 114, np.uint8)
    square[0, :384] = wide[0]
    a, b = run(session, rgb_unit(square))[0], run(session, rgb_unit(wide))[0]
    assert a.shape == (5, 8400) and b.shape == (5, anchors(384, 640))
    assert a[4].max() > 0.5 and b[4].max() > 0.5
    assert abs(float(a[4].max()) - float(b[4].max())) < 0.05
    box_a, box_b = (np.concatenate([o[:2, o[4].argmax()] - o[2:4, o[4].argmax()] / 2,
                                    o[:2, o[4].argmax()] + o[2:4, o[4].argmax()] / 2]) for o in (a, b))
    np.testing.assert_allclose(box_a, box_b, atol=2)
    assert iou(box_b, plate) > 0.5
