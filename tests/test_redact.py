"""Redactor: every style really obscures, nothing outside the region changes, boxes are as reported."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from helpers import ASTRONAUT_FACE, laplacian_var

from stream.core.detections import Detections
from stream.core.redact import RedactConfig, Redactor, Region, Style, ellipse_mask

STYLES = list(Style)


def one(box, label: str = "face", score: float = 0.9) -> Detections:
    return Detections(boxes=np.array([box], np.float32), scores=np.array([score], np.float32),
                      labels=(label,))


def noise(h: int = 300, w: int = 400, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def painted(style: Style, box, image: np.ndarray, label: str = "plate",
            **cfg) -> tuple[np.ndarray, list[Region]]:
    out = image.copy()
    regions = Redactor(RedactConfig(style=style, mask_scale={}, **cfg)).apply(out, one(box, label))
    return out, regions


def outside_unchanged(before: np.ndarray, after: np.ndarray, region: Region) -> None:
    x1, y1, x2, y2 = region.box
    keep = np.ones(before.shape[:2], bool)
    if region.shape == "ellipse":
        keep[y1:y2, x1:x2] = ~ellipse_mask(x2 - x1, y2 - y1)
    else:
        keep[y1:y2, x1:x2] = False
    np.testing.assert_array_equal(after[keep], before[keep])


def assert_obscured(before: np.ndarray, after: np.ndarray, box, margin: int, style: Style) -> None:
    """Uniform, or high-frequency energy down by >= 70%; pixelation: at most 6x6 flat blocks.

    Block edges are high-frequency by design, so a pixelated smooth face can keep much of its
    Laplacian energy; what makes it anonymous is that no more than 36 flat cells remain.
    """
    x1, y1, x2, y2 = box
    roi = after[y1:y2, x1:x2]
    if np.all(roi == roi.reshape(-1, 3)[0]):
        return  # uniform
    if style is Style.PIXELATE:
        cells = np.unique(roi.reshape(-1, 3), axis=0)
        assert len(cells) <= 36, f"{len(cells)} distinct colours: finer than 6x6 blocks"
        rows = np.unique(roi, axis=0)
        cols = np.unique(roi, axis=1)
        assert len(rows) <= 6 and cols.shape[1] <= 6
        return
    e0 = laplacian_var(before, box, margin)
    e1 = laplacian_var(after, box, margin)
    assert e1 <= 0.3 * e0, f"high-frequency energy only dropped from {e0:.0f} to {e1:.0f}"


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("size", [8, 32, 200])
def test_each_style_obscures_noise_at_every_size(style: Style, size: int) -> None:
    img = noise()
    box = (50, 40, 50 + size, 40 + size)
    out, (region,) = painted(style, box, img)
    assert region.box == box and region.shape == "rect"
    assert_obscured(img, out, box, margin=1 if size <= 8 else 2, style=style)
    outside_unchanged(img, out, region)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("size", [8, 32, 200])
def test_each_style_obscures_a_real_face(style: Style, size: int, astronaut: np.ndarray) -> None:
    """The astronaut's face crop scaled to the face size, pasted on a flat frame, then redacted."""
    x1, y1, x2, y2 = ASTRONAUT_FACE
    crop = cv2.resize(astronaut[y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_AREA)
    img = np.full((260, 260, 3), 90, np.uint8)
    img[30:30 + size, 30:30 + size] = crop
    box = (30, 30, 30 + size, 30 + size)
    out, (region,) = painted(style, box, img)
    assert_obscured(img, out, box, margin=1 if size <= 8 else 2, style=style)
    outside_unchanged(img, out, region)
    # no fine detail survives: the output differs from the input by more than a light smoothing would
    diff = np.abs(out[30:30 + size, 30:30 + size].astype(int) - crop.astype(int)).mean()
    assert diff > 3


@pytest.mark.parametrize("style", STYLES)
def test_ellipse_leaves_box_corners_untouched(style: Style) -> None:
    img = noise()
    out, (region,) = painted(style, (100, 80, 180, 180), img, label="face")
    assert region.shape == "ellipse"
    x1, y1, x2, y2 = region.box
    for cx, cy in [(x1, y1), (x2 - 1, y1), (x1, y2 - 1), (x2 - 1, y2 - 1), (x1 + 3, y1 + 3)]:
        np.testing.assert_array_equal(out[cy, cx], img[cy, cx])
    assert not np.array_equal(out[(y1 + y2) // 2, (x1 + x2) // 2], img[(y1 + y2) // 2, (x1 + x2) // 2])
    outside_unchanged(img, out, region)
    # the inscribed ellipse itself is fully obscured
    mask = ellipse_mask(x2 - x1, y2 - y1)
    assert (out[y1:y2, x1:x2][mask] != img[y1:y2, x1:x2][mask]).any(axis=-1).mean() > 0.9


def test_solid_fills_exactly_the_region_with_the_colour() -> None:
    img = noise()
    out, (region,) = painted(Style.SOLID, (10, 20, 70, 60), img, solid_color=(1, 2, 3))
    assert np.all(out[20:60, 10:70] == (1, 2, 3))
    outside_unchanged(img, out, region)


@pytest.mark.parametrize(
    ("box", "clipped"),
    [
        ((-20, 50, 40, 120), (0, 50, 40, 120)),     # left edge
        ((360, 50, 430, 120), (360, 50, 400, 120)),  # right edge
        ((100, -30, 160, 40), (100, 0, 160, 40)),    # top edge
        ((100, 260, 160, 340), (100, 260, 160, 300)),  # bottom edge
        ((-10, -10, 30, 30), (0, 0, 30, 30)),        # corner
    ],
)
def test_face_cut_by_frame_edge_becomes_rect_covering_the_clipped_box(box, clipped) -> None:
    img = noise()
    out, (region,) = painted(Style.SOLID, box, img, label="face", solid_color=(0, 255, 0))
    assert region.shape == "rect"
    assert region.box == clipped
    x1, y1, x2, y2 = clipped
    assert np.all(out[y1:y2, x1:x2] == (0, 255, 0)), "part of the clipped face left unpainted"
    outside_unchanged(img, out, region)


def test_face_inside_frame_stays_ellipse() -> None:
    (r,) = Redactor().regions(one((100, 100, 150, 160)), 400, 300)
    assert r.shape == "ellipse"


def test_box_entirely_outside_frame_is_dropped() -> None:
    assert Redactor().regions(one((500, 500, 560, 560)), 400, 300) == []


@pytest.mark.parametrize(
    ("label", "box", "expected"),
    [
        ("face", (100, 100, 200, 150), (80, 90, 220, 160)),     # default face scale 1.4
        ("plate", (100, 100, 200, 140), (87, 95, 213, 145)),    # default plate scale 1.25
        ("other", (100, 100, 200, 140), (100, 100, 200, 140)),  # no scale for unknown labels
    ],
)
def test_mask_scale_enlarges_boxes_about_their_centre(label: str, box, expected) -> None:
    (r,) = Redactor().regions(one(box, label), 1000, 1000)
    assert r.box == expected


def test_face_scale_option_changes_the_box() -> None:
    (r,) = Redactor(RedactConfig(mask_scale={"face": 2.0})).regions(one((100, 100, 140, 120)), 1000, 1000)
    assert r.box == (80, 90, 160, 130)


@pytest.mark.parametrize(
    ("box", "min_size", "expected"),
    [
        ((100, 100, 102, 101), 6, (98, 97, 104, 104)),  # 2x1 -> 6x6 about its centre (floor/ceil)
        ((100, 100, 103, 103), 12, (95, 95, 108, 108)),  # centre 101.5 +- 6
        ((100, 100, 140, 140), 6, (100, 100, 140, 140)),  # already large enough
    ],
)
def test_min_size_grows_tiny_boxes(box, min_size: int, expected) -> None:
    r = Redactor(RedactConfig(mask_scale={}, min_size=min_size)).regions(one(box, "plate"), 1000, 1000)[0]
    assert r.box == expected
    assert r.box[2] - r.box[0] >= min_size and r.box[3] - r.box[1] >= min_size


def test_regions_are_exclusive_integer_boxes_within_the_frame() -> None:
    rng = np.random.default_rng(3)
    boxes = rng.uniform(-50, 450, (200, 2)).astype(np.float32)
    wh = rng.uniform(1, 120, (200, 2)).astype(np.float32)
    dets = Detections(boxes=np.concatenate([boxes, boxes + wh], 1), scores=np.full(200, 0.5, np.float32),
                      labels=tuple(rng.choice(["face", "plate"], 200)))
    for r in Redactor().regions(dets, 400, 300):
        assert all(isinstance(v, int) for v in r.box)
        x1, y1, x2, y2 = r.box
        assert 0 <= x1 < x2 <= 400 and 0 <= y1 < y2 <= 300
        assert r.shape in {"rect", "ellipse"}


def test_region_json_fields() -> None:
    d = Detections(boxes=np.array([[10, 5, 50, 60]], np.float32), scores=np.array([0.912345], np.float32),
                   labels=("face",), track_ids=np.array([7]), coasted=np.array([True]))
    (r,) = Redactor().regions(d, 200, 200)  # 1.4x: x 2..58, y -6..71 clipped at the top -> rect
    assert r.as_json() == {"label": "face", "box": [2, 0, 58, 71], "shape": "rect", "score": 0.9123,
                           "track_id": 7, "coasted": True}


def test_apply_on_no_detections_changes_nothing() -> None:
    img = noise()
    out = img.copy()
    assert Redactor().apply(out, Detections()) == []
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("model", ["centerface", "yunet"])
def test_redacted_face_is_not_found_again(style: Style, model: str, astronaut: np.ndarray,
                                          request: pytest.FixtureRequest) -> None:
    """Detect, redact with the default face mask, detect again: neither face model finds a face."""
    img = astronaut.copy()
    first = request.getfixturevalue(model)([img])[0]
    assert len(first) == 1
    Redactor(RedactConfig(style=style)).apply(img, first)
    for name in ("centerface", "yunet"):
        assert len(request.getfixturevalue(name)([img])[0]) == 0, f"{name} still sees a face after {style}"
