"""Shot cuts: the old view's masks end at a cut, and nothing else reads as one."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from helpers import textured_background

from stream.core.cuts import MAX_GAP, THRESHOLD, ShotCuts
from stream.core.detections import Detections
from stream.core.masking import Masked, MaskingStage
from stream.core.redact import Redactor
from stream.core.track import Tracker, TrackerConfig
from stream.core.yuv import I420

W, H = 320, 192


def view(seed: int, width: int = W, height: int = H) -> np.ndarray:
    """A street-like view: a textured background lit from one side, with a few large blocks
    (buildings, vehicles); each seed its own camera, with its own exposure."""
    rng = np.random.default_rng(seed + 100)
    ramp = np.linspace(0.4, 1.0, width) if seed % 2 else np.linspace(1.0, 0.6, width)
    lit = textured_background(width, height, seed) * ramp[None, :, None] * rng.uniform(0.6, 1.3)
    img = lit.clip(0, 255).astype(np.uint8)
    for _ in range(6):
        x, y = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 40))
        cv2.rectangle(img, (x, y), (x + int(rng.integers(30, 90)), y + int(rng.integers(20, 60))),
                      tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
    return img


def shot(seed: int, i: int) -> np.ndarray:
    """Frame ``i`` of a shot of view ``seed``, the camera panning 2 px a frame."""
    return np.ascontiguousarray(view(seed, W + 64, H)[:, 2 * i:2 * i + W])


def face(box: tuple[float, float, float, float]) -> Detections:
    return Detections(boxes=np.array([box], np.float32), scores=np.array([0.9], np.float32), labels=("face",))


def cuts_in(frames: list[np.ndarray], elapsed: int = 1) -> list[int]:
    judge = ShotCuts()
    return [i for i, f in enumerate(frames) if judge(f, elapsed)]


def test_a_jump_to_another_view_is_a_cut_and_only_that() -> None:
    frames = [shot(1, i) for i in range(5)] + [shot(2, i) for i in range(5)]
    assert cuts_in(frames) == [5]


@pytest.mark.parametrize("change", ["exposure", "pan", "zoom", "shake", "blur", "noise", "night"])
def test_changes_within_one_shot_are_not_cuts(change: str) -> None:
    """Exposure, day/night mode, camera motion, blur and sensor noise keep consecutive frames of one
    view correlated; a false cut would end the coasting that covers a missed face."""
    base = view(3, 2 * W, 2 * H)
    rng = np.random.default_rng(0)
    frames = []
    for i in range(12):
        if change == "pan":  # 12 px a frame at 320 wide: a fast pan
            img = base[100:100 + H, 12 * i:12 * i + W]
        elif change == "zoom":  # 5% a frame
            s = 1.05 ** i
            cw, ch = int(2 * W / s), int(2 * H / s)
            img = cv2.resize(base[H - ch // 2:H + ch // 2, W - cw // 2:W + cw // 2], (W, H))
        elif change == "shake":
            dx, dy = (int(v) for v in rng.integers(-8, 9, 2))
            img = base[H // 2 + dy:H // 2 + dy + H, W // 2 + dx:W // 2 + dx + W]
        else:
            img = base[H // 2:H // 2 + H, W // 2:W // 2 + W].copy()
            if change == "exposure" and i >= 6:  # lights on: gain and offset
                img = cv2.convertScaleAbs(img, alpha=1.6, beta=30)
            elif change == "blur" and i % 2:
                img = cv2.blur(img, (1, 15))  # vertical motion blur
            elif change == "noise":
                img = cv2.add(img, rng.integers(0, 40, img.shape, dtype=np.uint8))
            elif change == "night" and i >= 6:  # IR mode: grey, darker, noisier
                grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) // 2
                img = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
        frames.append(np.ascontiguousarray(img))
    judge = ShotCuts()
    for i, f in enumerate(frames):
        assert not judge(f), f"frame {i} read as a cut ({change}), correlation {judge.correlation:.2f}"
        if i:
            assert judge.correlation > THRESHOLD + 0.3, f"{change}: correlation {judge.correlation:.2f}"


def test_frames_far_apart_and_flat_frames_are_not_judged() -> None:
    a, b = view(1), view(2)
    assert cuts_in([a, b], elapsed=MAX_GAP) == [1]
    assert cuts_in([a, b], elapsed=MAX_GAP + 1) == [], "frames a second apart under overload are not judged"
    black = np.zeros_like(a)
    assert cuts_in([a, black, b]) == [], "a flat picture has nothing to compare"
    assert ShotCuts(0.0)(a) is False and not cuts_in([a, a])


def test_i420_frames_read_the_same_as_bgr() -> None:
    frames = [view(1), view(1), view(2)]
    bgr, yuv = ShotCuts(), ShotCuts()
    for i, f in enumerate(frames):
        assert bgr(f) == yuv(I420.from_bgr(f)) == (i == 2)
        if i == 0:
            assert bgr.correlation is None and yuv.correlation is None  # nothing to compare with yet
        else:
            assert bgr.correlation == pytest.approx(yuv.correlation, abs=0.05)


def test_a_cut_ends_the_old_views_tracks_and_the_new_view_starts_its_own() -> None:
    """A face missed after the cut: the old view's coasting box would sit over nothing in the new
    one. Every track ends at the cut (and is reported ended); the new view's boxes are new tracks."""
    stage = MaskingStage(Tracker(), Redactor(), lookback=0)
    (m,) = stage.push(0, shot(1, 0), face((40, 40, 80, 90)))
    (m,) = stage.push(1, shot(1, 1), Detections())
    assert m.regions and m.regions[0].coasted, "within the shot a missed face coasts"
    old = m.regions[0].track_id
    (m,) = stage.push(2, shot(2, 0), face((200, 60, 240, 110)))
    assert stage.cut and stage.shots == 1
    assert [r.track_id for r in m.regions] != [old] and len(m.regions) == 1
    assert not m.regions[0].coasted and m.regions[0].box[0] >= 180
    assert [t.track_id for t in stage.tracker.changes.ended] == [old]
    assert [t.track_id for t in stage.tracker.changes.started] == [m.regions[0].track_id]
    (m,) = stage.push(3, shot(2, 1), Detections())
    assert not stage.cut and [r.coasted for r in m.regions] == [True], "the new view's track coasts"


def test_cuts_off_keeps_coasting_across_the_jump() -> None:
    stage = MaskingStage(Tracker(TrackerConfig(cut_threshold=0.0)), Redactor(), lookback=0)
    list(stage.push(0, view(1), face((40, 40, 80, 90))))
    (m,) = stage.push(1, view(2), Detections())
    assert not stage.cut and [r.coasted for r in m.regions] == [True]


def test_lookback_stops_at_the_cut() -> None:
    """A file's look-back masks a face found late in the frames before it, but not in the old view."""
    stage = MaskingStage(Tracker(), Redactor(), lookback=4)
    out: list[Masked] = []
    for i in range(3):
        out += stage.push(i, shot(1, i), Detections())
    for i in range(3, 8):
        out += stage.push(i, shot(2, i), face((100, 50, 150, 110)) if i >= 5 else Detections())
    out += stage.flush()
    assert [m.index for m in out] == list(range(8))
    masked = [m.index for m in out if m.regions]
    assert masked == [3, 4, 5, 6, 7], "masked back to the cut (frame 3), not into the old view (0-2)"
