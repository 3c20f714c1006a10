"""Change-gated detection: what a model skips, where it looks again, and that it finds what the
whole-frame run finds (real weights on a rendered still camera with a face walking across it)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from helpers import BUS, CHELSEA, face_sprite, read_bgr, sprite_face_box, textured_background, uk_plate

from stream.core.detections import Detections, FrameRef
from stream.detect.ensemble import IDLE_S, FrameDetector
from stream.detect.letterbox import scaled
from stream.detect.presets import detector_config
from stream.detect.regions import (
    GateConfig,
    RegionGate,
    _quantise,
    changed_cells,
    model_rect,
    signature,
    truncated,
)

SHAPE = (360, 640)


def _dets(*boxes: tuple[float, float, float, float], label: str = "face") -> Detections:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return Detections(b, np.full(len(b), 0.9, np.float32), (label,) * len(b))


def _noisy(image: np.ndarray, rng: np.random.Generator, sigma: float = 3.0) -> np.ndarray:
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def _primed(bg: np.ndarray, boxes: Detections = Detections()) -> tuple[RegionGate, np.ndarray]:  # noqa: B008
    gate = RegionGate()
    sig = signature(bg, gate.config.cell)
    look = gate.look(sig, 1, SHAPE, 1.0)
    assert look.kind == "full" and look.why == "first"
    gate.commit(look, sig, 1, SHAPE, boxes)
    return gate, sig


def test_camera_noise_changes_no_cell() -> None:
    """Sensor-like noise (sigma 3 grey levels per pixel) on a still picture is not a change."""
    rng = np.random.default_rng(1)
    bg = textured_background(640, 360)
    gate, _ = _primed(_noisy(bg, rng))
    for seq in range(2, 12):
        assert gate.look(signature(_noisy(bg, rng), 4), seq, SHAPE, 1.0).kind == "skip"


def test_unchanged_frame_keeps_the_last_boxes() -> None:
    bg = textured_background(640, 360)
    old = _dets((100, 100, 140, 150))
    gate, sig = _primed(bg, old)
    look = gate.look(sig, 2, SHAPE, 1.0)
    assert look.kind == "skip"
    kept = gate.commit(look, sig, 2, SHAPE, Detections())
    np.testing.assert_array_equal(kept.boxes, old.boxes)


@pytest.mark.parametrize("size", [4, 8])
def test_a_small_object_appearing_is_searched(size: int) -> None:
    """A patch as small as a CCTV face's (4-8 px) changes its cells; the crop holds it whole."""
    bg = textured_background(640, 360)
    gate, _ = _primed(bg)
    frame = bg.copy()
    patch = frame[200:200 + size, 300:300 + size]
    patch[:] = (patch.astype(int) + 60).clip(0, 255)
    look = gate.look(signature(frame, 4), 2, SHAPE, 1.0)
    assert look.kind == "crops"
    assert any(x1 <= 300 and y1 <= 200 and x2 >= 300 + size and y2 >= 200 + size
               for x1, y1, x2, y2 in look.crops)


def test_a_change_that_keeps_mean_and_texture_is_a_change() -> None:
    """A patch mirrored in place keeps its cells' mean grey level and edge strength; compared
    pixel by pixel it still differs."""
    bg = cv2.resize(read_bgr(CHELSEA), (640, 360), interpolation=cv2.INTER_AREA)
    gate, _ = _primed(bg)
    frame = bg.copy()
    frame[100:132, 200:232] = frame[100:132, 200:232][::-1, ::-1]
    assert gate.look(signature(frame, 4), 2, SHAPE, 1.0).kind == "crops"


def test_crops_take_in_every_old_box_they_touch() -> None:
    """A change at the edge of a known person's box: the crop holds the whole box, so the object
    is searched whole and its old box can be replaced."""
    bg = textured_background(640, 360)
    person = (250.0, 60.0, 330.0, 300.0)
    gate, _ = _primed(bg, _dets(person, label="person"))
    frame = bg.copy()
    frame[290:310, 320:340] = 255 - frame[290:310, 320:340]  # a hand moves at the box's corner
    look = gate.look(signature(frame, 4), 2, SHAPE, 1.0)
    assert look.kind == "crops"
    assert any(x1 <= person[0] and y1 <= person[1] and x2 >= person[2] and y2 >= person[3]
               for x1, y1, x2, y2 in look.crops)


def test_commit_replaces_boxes_in_crops_and_keeps_the_rest() -> None:
    bg = textured_background(640, 360)
    inside, outside = (300.0, 200.0, 320.0, 220.0), (20.0, 20.0, 60.0, 60.0)
    gate, _ = _primed(bg, _dets(inside, outside))
    frame = bg.copy()
    frame[195:225, 295:325] = 255 - frame[195:225, 295:325]
    sig2 = signature(frame, 4)
    look = gate.look(sig2, 2, SHAPE, 1.0)
    assert look.kind == "crops"
    moved = (305.0, 205.0, 325.0, 225.0)
    now = gate.commit(look, sig2, 2, SHAPE, _dets(moved))
    assert sorted(map(tuple, now.boxes.tolist())) == sorted([outside, moved])
    # the crop's cells now hold the new picture: the same frame again is no change
    assert gate.look(sig2, 3, SHAPE, 1.0).kind == "skip"


def test_slow_drift_adds_up_against_the_reference() -> None:
    """A change below the threshold per frame is still caught once it adds up: a cell's reference
    is what the model last saw there, not the previous frame."""
    bg = textured_background(640, 360).astype(int)
    gate, _ = _primed(bg.astype(np.uint8))
    kinds = []
    for seq, step in enumerate(range(1, 12), start=2):
        frame = bg.copy()
        frame[100:140, 100:140] += 2 * step  # 2 grey levels more every frame
        kinds.append(gate.look(signature(frame.clip(0, 255).astype(np.uint8), 4), seq, SHAPE, 1.0).kind)
    assert kinds[0] == "skip" and "crops" in kinds


def test_whole_frame_on_refresh_gap_restart_size_and_large_change() -> None:
    cfg = GateConfig()
    bg = textured_background(640, 360)
    gate, sig = _primed(bg)
    assert gate.look(sig, 1 + cfg.refresh, SHAPE, 1.0).why == "refresh"
    assert gate.look(sig, 2 + cfg.max_gap, SHAPE, 1.0).why == "gap"
    assert gate.look(sig, 1 + cfg.max_gap, SHAPE, 1.0).kind == "skip"
    assert gate.look(sig, 1, SHAPE, 1.0).why == "restart"
    assert gate.look(signature(textured_background(320, 180), 4), 2, (180, 320), 1.0).why == "first"
    assert gate.look(signature(255 - bg, 4), 2, SHAPE, 1.0).why == "large"


def test_context_adds_picture_around_a_change() -> None:
    """The plate model's crops reach ``context`` model pixels beyond the change on every side."""
    bg = textured_background(640, 360)
    gate, _ = _primed(bg)
    frame = bg.copy()
    frame[200:210, 300:310] = 255 - frame[200:210, 300:310]
    sig = signature(frame, 4)
    tight = gate.look(sig, 2, SHAPE, 1.0)
    wide = gate.look(sig, 2, SHAPE, 1.0, context=64)
    assert tight.kind == wide.kind == "crops" and len(wide.crops) == 1
    x1, y1, x2, y2 = wide.crops[0]
    assert x1 <= 300 - 64 and y1 <= 200 - 64 and x2 >= 310 + 64 and y2 >= 210 + 64
    assert (x2 - x1) * (y2 - y1) > sum((c[2] - c[0]) * (c[3] - c[1]) for c in tight.crops)


@pytest.mark.parametrize("scale", [1.0, 0.8, 640 / 768, 0.5, 1.5])
@pytest.mark.parametrize("q", [32, 128])
def test_quantised_crops_sit_on_the_model_grid(scale: float, q: int) -> None:
    """In the picture the model reads, a crop starts on the 32 px grid and its sides are multiples
    of ``q`` unless it reaches the picture's edge; it always holds the region asked for."""
    rng = np.random.default_rng(7)
    h, w = SHAPE
    mw, mh = round(w * scale), round(h * scale)
    for _ in range(200):
        x1, y1 = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
        r = (x1, y1, rng.uniform(x1 + 1, w), rng.uniform(y1 + 1, h))
        c = _quantise(r, SHAPE, scale, q)
        assert c[0] <= r[0] + 1e-6 and c[1] <= r[1] + 1e-6 and c[2] >= r[2] - 1e-6 and c[3] >= r[3] - 1e-6
        mx1, my1, mx2, my2 = model_rect(c, SHAPE, scale)
        assert mx1 % 32 == 0 and my1 % 32 == 0
        assert mx2 == mw or (mx2 - mx1) % q == 0
        assert my2 == mh or (my2 - my1) % q == 0
        assert 0 <= mx1 < mx2 <= mw and 0 <= my1 < my2 <= mh


def test_crop_of_the_resized_frame_is_the_same_pixels() -> None:
    """A crop gives the model the pixels the whole frame gives it there (cut after resizing)."""
    bg = textured_background(768, 576)
    scale = 640 / 768
    whole = scaled(bg, scale)
    assert whole.shape[:2] == (480, 640)
    c = _quantise((300.0, 200.0, 360.0, 260.0), (576, 768), scale, 32)
    x1, y1, x2, y2 = model_rect(c, (576, 768), scale)
    assert math.isclose(c[0] * scale, x1, abs_tol=1e-6) and math.isclose(c[1] * scale, y1, abs_tol=1e-6)
    assert whole[y1:y2, x1:x2].shape == (y2 - y1, x2 - x1, 3)


def test_truncated_only_inside_the_frame() -> None:
    crop = (100.0, 100.0, 200.0, 200.0)
    assert truncated(_dets((100.5, 150, 120, 170)), crop, SHAPE)
    assert truncated(_dets((150, 150, 199, 170)), crop, SHAPE)
    assert not truncated(_dets((120, 120, 180, 180)), crop, SHAPE)
    at_edge = (0.0, 0.0, 200.0, 200.0)
    assert not truncated(_dets((0, 0, 50, 50)), at_edge, SHAPE)


# -- the detector, real weights -------------------------------------------------------------------

def _walk(frames: int) -> tuple[list[np.ndarray], list[tuple[int, int, int, int] | None]]:
    """A still street-like picture; a face walks in from frame 4 and a plate is parked throughout.
    Frames 0-3 are the same picture (with noise): a model due on them has nothing to look at."""
    rng = np.random.default_rng(3)
    bg = textured_background(640, 360, seed=5)
    bg[250:278, 420:540] = uk_plate(120, 28)
    face = face_sprite()
    out, truth = [], []
    for i in range(frames):
        img = bg.copy()
        box = None
        if i >= 4:
            x, y = 60 + 9 * (i - 4), 120
            img[y:y + 80, x:x + 72] = face
            box = sprite_face_box(x, y)
        out.append(_noisy(img, rng, 2.0))
        truth.append(box)
    return out, truth


def _covered(boxes: np.ndarray, target: tuple[float, ...], need: float = 0.8) -> bool:
    for b in boxes:
        ix = max(0.0, min(b[2], target[2]) - max(b[0], target[0]))
        iy = max(0.0, min(b[3], target[3]) - max(b[1], target[1]))
        if ix * iy >= need * (target[2] - target[0]) * (target[3] - target[1]):
            return True
    return False


@pytest.fixture(scope="module")
def walk() -> tuple[list[np.ndarray], list[tuple[int, int, int, int] | None]]:
    return _walk(24)


def _run(det: FrameDetector, frames: list[np.ndarray]) -> list[Detections]:
    return [det.detect([f], [FrameRef("cam", i + 1)])[0] for i, f in enumerate(frames)]


def test_gated_detector_finds_what_the_whole_frame_run_finds(walk) -> None:
    frames, truth = walk
    whole = _run(FrameDetector(detector_config("fast", providers=("cpu",))), frames)
    gated_det = FrameDetector(detector_config("fast", providers=("cpu",), regions=True))
    gated = _run(gated_det, frames)
    assert gated_det.looks["skip"] > 0 and gated_det.looks["crops"] > 0  # it did gate
    for i, (w, g) in enumerate(zip(whole, gated, strict=True)):
        assert w.observed == g.observed
        if truth[i] is not None and "face" in (g.observed or ()):
            faces = g.boxes[[lab == "face" for lab in g.labels]]
            assert _covered(faces, truth[i]), f"frame {i}: the walking face was not found"
        for lab in ("face", "plate"):
            for b in w.boxes[[x == lab for x in w.labels]]:
                assert _covered(g.boxes[[x == lab for x in g.labels]], tuple(b), 0.6), \
                    f"frame {i}: a {lab} the whole-frame run found is missing"


def test_face_appearing_after_skips_is_found_on_its_first_frame(walk) -> None:
    frames, truth = walk
    det = FrameDetector(detector_config("fast", providers=("cpu",), regions=True, heads=False, plates=False))
    out = _run(det, frames[:5])
    assert det.looks["skip"] >= 3  # frames 1-3 repeat frame 0
    assert _covered(out[4].boxes, truth[4])


def test_plate_arriving_on_a_still_picture_is_found(walk) -> None:
    """A parked plate appears in a corner of a still street: the plate model, due every 3rd frame,
    looks at a crop around it (with its 128 px of context) and finds it, as the whole-frame run
    does."""
    rng = np.random.default_rng(9)
    bg = cv2.resize(read_bgr(BUS), (640, 360), interpolation=cv2.INTER_AREA)  # a real street
    frames = []
    for i in range(12):
        img = bg.copy()
        if i >= 5:
            img[300:328, 490:610] = uk_plate(120, 28, "XY51 ABC")
        frames.append(_noisy(img, rng, 2.0))
    gated_det = FrameDetector(detector_config("fast", providers=("cpu",), regions=True, heads=False))
    whole = _run(FrameDetector(detector_config("fast", providers=("cpu",), heads=False)), frames)
    gated = _run(gated_det, frames)
    plate = (490, 300, 610, 328)
    looked = [i for i in range(5, 12) if "plate" in (gated[i].observed or ())]
    plate_gate = gated_det._gates[(len(gated_det.face_models), "cam")]
    assert looked and plate_gate.counts["crops"] > 0  # the plate model looked at a crop
    for i in looked:
        # the whole-frame run finds it (the model's reach), and so does the gated one
        assert _covered(whole[i].boxes[[lab == "plate" for lab in whole[i].labels]], plate)
        assert _covered(gated[i].boxes[[lab == "plate" for lab in gated[i].labels]], plate), f"frame {i}"


def test_forget_starts_the_stream_afresh(walk) -> None:
    frames, _ = walk
    det = FrameDetector(detector_config("fast", providers=("cpu",), regions=True, heads=False, plates=False))
    _run(det, frames[:2])
    det.forget("cam")
    before = det.looks["full"]
    det.detect([frames[2]], [FrameRef("cam", 3)])
    assert det.looks["full"] == before + 1


def test_too_small_or_resized_is_changed() -> None:
    """A region smaller than a cell, or of another size than its reference, is never 'unchanged'."""
    tiny = np.zeros((3, 3), np.uint8)
    assert changed_cells(tiny, tiny, 4, 6.0).all()
    assert changed_cells(np.zeros((8, 8), np.uint8), np.zeros((8, 12), np.uint8), 4, 6.0).all()


def test_parked_vehicle_is_searched_once_until_it_changes() -> None:
    """The crop pass under gating: a bus standing still is cut at the same box and its pixels match,
    so its plate search is not repeated; what was found is reported again. When the picture
    changes on the bus, it is searched again."""
    rng = np.random.default_rng(4)
    bus = cv2.resize(read_bgr(BUS), (640, 360), interpolation=cv2.INTER_AREA)  # a bus filling the frame
    street = np.zeros((720, 1280, 3), np.uint8) + 90
    street[300:660, 600:1240] = bus
    det = FrameDetector(detector_config("fast", providers=("cpu",), regions=True, person_every=1))
    found = []
    for i in range(4):
        found.append(det.detect([_noisy(street, rng, 2.0)], [FrameRef("cam", i + 1)])[0])
    assert det.crops_run >= 1 and det.crops_reused >= 2, (det.crops_run, det.crops_reused)
    plates = [f.boxes[[lab == "plate" for lab in f.labels]] for f in found]
    assert all(len(p) == len(plates[0]) for p in plates)
    runs = det.crops_run
    changed = street.copy()
    changed[500:540, 700:800] = 255 - changed[500:540, 700:800]  # something new on the bus
    det.detect([changed], [FrameRef("cam", 5)])
    assert det.crops_run > runs


def test_two_frames_of_a_stream_in_one_batch_are_taken_in_turn(walk) -> None:
    """A batch holding two frames of one stream: the second is compared with what the first left,
    so it gets the same boxes as when the two come in batches of their own."""
    frames, _ = walk
    cfg = {"providers": ("cpu",), "regions": True, "plates": False}
    alone = FrameDetector(detector_config("fast", **cfg))
    together = FrameDetector(detector_config("fast", **cfg))
    one = [alone.detect([f], [FrameRef("cam", i + 1)])[0] for i, f in enumerate(frames[:10])]
    two: list[Detections] = []
    for i in range(0, 10, 2):
        batch = together.detect([frames[i + 1], frames[i]], [FrameRef("cam", i + 2), FrameRef("cam", i + 1)])
        two += batch[::-1]
    assert together.looks == alone.looks
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)


def test_a_stream_gone_quiet_is_dropped_from_memory(walk) -> None:
    """A camera removed or a WHIP session ended: its pictures and boxes are not kept for ever."""
    frames, _ = walk
    det = FrameDetector(detector_config("fast", providers=("cpu",), regions=True, plates=False))
    det.detect([frames[0]], [FrameRef("gone", 1)])
    det.detect([frames[0]], [FrameRef("live", 1)])
    assert {k[1] for k in det._gates} == {"gone", "live"}
    later = det._seen_at["gone"] + IDLE_S + 1
    det._seen_at["live"] = later  # still sending
    det._sweep(later)
    assert {k[1] for k in det._gates} == {"live"}
    assert "gone" not in det._seen_at
