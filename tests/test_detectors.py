"""Real detector weights on real photos: the astronaut's face, a synthetic plate on a real photo, a person."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from helpers import ASTRONAUT_FACE, ASTRONAUT_PERSON, best_iou, finds, iou, uk_plate

from stream.core.detections import LABELS
from stream.detect.base import OnnxDetector


@pytest.fixture(params=["centerface", "yunet"])
def face_model(request: pytest.FixtureRequest) -> OnnxDetector:
    return request.getfixturevalue(request.param)


def test_hand_box_is_where_the_face_is(astronaut: np.ndarray) -> None:
    """Guard the fixture itself: the hand-checked box is mostly skin-coloured pixels."""
    x1, y1, x2, y2 = ASTRONAUT_FACE
    face = astronaut[y1:y2, x1:x2].reshape(-1, 3).astype(int)
    b, g, r = face[:, 0], face[:, 1], face[:, 2]
    skin = (r > 95) & (r > g) & (g > b)
    assert skin.mean() > 0.6


def test_face_found_within_hand_checked_box(face_model: OnnxDetector, astronaut: np.ndarray) -> None:
    dets = face_model([astronaut])[0]
    assert len(dets) == 1, dets
    assert dets.labels == ("face",)
    assert iou(dets.boxes[0], ASTRONAUT_FACE) > 0.5
    assert dets.scores[0] >= face_model.threshold


@pytest.mark.parametrize("input_size", [256, 320, 640])
def test_face_found_at_several_input_sizes(face_model: OnnxDetector, astronaut: np.ndarray,
                                           input_size: int) -> None:
    old = face_model.input_size
    face_model.input_size = input_size
    try:
        dets = face_model([astronaut])[0]
    finally:
        face_model.input_size = old
    assert best_iou(dets.boxes, ASTRONAUT_FACE) > 0.5


def test_no_face_on_a_cat(face_model: OnnxDetector, chelsea: np.ndarray) -> None:
    assert len(face_model([chelsea])[0]) == 0


def test_mixed_size_batch_maps_boxes_back_to_each_source(face_model: OnnxDetector,
                                                         astronaut: np.ndarray) -> None:
    """One batch of a 256x256 frame, the same upscaled 2x and a 190x150 crop at (40, 10)."""
    up = cv2.resize(astronaut, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    ox, oy = 40, 10
    crop = np.ascontiguousarray(astronaut[oy:oy + 150, ox:ox + 190])
    single = face_model([astronaut])[0]
    base, big, cropped = face_model([astronaut, up, crop])
    assert len(base) == len(big) == len(cropped) == 1
    # each box is in its own frame's pixels ...
    assert big.boxes[0][2] > astronaut.shape[1] * 0.6, "the 2x frame's box must be in 2x coordinates"
    assert np.all(cropped.boxes[0][[0, 2]] <= crop.shape[1])
    assert np.all(cropped.boxes[0][[1, 3]] <= crop.shape[0])
    # ... and all three describe the same face
    from_big = big.boxes[0] / 2
    from_crop = cropped.boxes[0] + np.array([ox, oy, ox, oy], np.float32)
    for b in (from_big, from_crop):
        assert iou(b, base.boxes[0]) > 0.85
        assert np.abs(b - base.boxes[0]).max() < 6
    # a frame's result does not depend on what else is in the batch
    assert np.abs(single.boxes[0] - base.boxes[0]).max() < 1.0


def test_empty_batch_returns_nothing(face_model: OnnxDetector) -> None:
    assert face_model([]) == []


@pytest.mark.parametrize("where", ["bottom-left", "bottom-right", "centre"])
def test_plate_model_finds_synthetic_uk_plate(plate_yolo, chelsea: np.ndarray, where: str) -> None:
    """A 120x28 white 'AB12 CDE' plate composed onto the cat photo at a known position."""
    img = chelsea.copy()
    h, w = img.shape[:2]
    pw, ph = 120, 28
    x, y = {"bottom-left": (20, h - ph - 20), "bottom-right": (w - pw - 20, h - ph - 20),
            "centre": ((w - pw) // 2, (h - ph) // 2)}[where]
    img[y:y + ph, x:x + pw] = uk_plate(pw, ph)
    dets = plate_yolo([img])[0]
    assert set(dets.labels) <= {"plate"}
    assert finds(dets.boxes, (x, y, x + pw, y + ph)), dets
    assert dets.scores.max() > 0.5


def test_no_plate_on_the_plain_cat_photo(plate_yolo, chelsea: np.ndarray) -> None:
    assert len(plate_yolo([chelsea])[0]) == 0


def test_person_model_finds_the_astronaut(person_yolo, astronaut: np.ndarray, chelsea: np.ndarray) -> None:
    people = person_yolo([astronaut])[0]
    assert best_iou(people.boxes, ASTRONAUT_PERSON) > 0.5
    assert len(person_yolo([chelsea])[0]) == 0


def test_frame_detector_labels_the_astronaut_face(frame_detector, astronaut: np.ndarray) -> None:
    dets = frame_detector([astronaut])[0]
    assert set(dets.labels) <= set(LABELS)
    faces = dets.with_label("face")
    assert best_iou(faces.boxes, ASTRONAUT_FACE) > 0.5
    # the large person gets no extra head mask (a face already covers the head)
    assert sum(iou(b, ASTRONAUT_FACE) > 0.1 for b in faces.boxes) == 1


def test_frame_detector_batch_of_three(frame_detector, astronaut: np.ndarray, chelsea: np.ndarray) -> None:
    plate_img = chelsea.copy()
    plate_img[250:278, 20:140] = uk_plate()
    out = frame_detector([astronaut, chelsea, plate_img])
    assert len(out) == 3
    assert best_iou(out[0].with_label("face").boxes, ASTRONAUT_FACE) > 0.5
    assert len(out[1]) == 0
    assert finds(out[2].with_label("plate").boxes, (20, 250, 140, 278))
    assert len(out[2].with_label("face")) == 0


def test_both_face_models_merge_into_one_box(both_faces_detector, astronaut: np.ndarray) -> None:
    dets = both_faces_detector([astronaut])[0]
    assert dets.labels == ("face",)
    assert iou(dets.boxes[0], ASTRONAUT_FACE) > 0.5


def test_small_person_gets_a_head_mask(astronaut: np.ndarray) -> None:
    """No face model: a person 120 px tall (under head_max_person_px) gets a 'face' box on the head."""
    from stream.detect.ensemble import DetectorConfig, FrameDetector

    det = FrameDetector(DetectorConfig(faces={}, plate=None, providers=("cpu",)))
    canvas = np.full((300, 451, 3), 128, np.uint8)
    s, x0, y0 = 120, 200, 160
    canvas[y0:y0 + s, x0:x0 + s] = cv2.resize(astronaut, (s, s), interpolation=cv2.INTER_AREA)
    face = tuple(v * s / 256 + o for v, o in zip(ASTRONAUT_FACE, (x0, y0, x0, y0), strict=True))
    dets = det([canvas])[0]
    assert dets.labels and set(dets.labels) == {"face"}
    head = max(dets.boxes, key=lambda b: iou(b, face))
    assert x0 <= (head[0] + head[2]) / 2 <= x0 + s          # horizontally within the person
    assert abs(head[1] - y0) < 12                            # starts at the top of the person
    assert head[3] - head[1] < 0.35 * s                      # head-sized, not body-sized
    ix = min(head[2], face[2]) - max(head[0], face[0])
    iy = min(head[3], face[3]) - max(head[1], face[1])
    assert ix > 0 and iy > 0 and ix * iy > 0.25 * (face[2] - face[0]) * (face[3] - face[1])
