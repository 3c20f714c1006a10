"""MaskingStage: frames come out in order, painted, ``lookback`` frames late, with look-back masks."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import contains, panned, textured_background

from stream.core.detections import Detections
from stream.core.masking import Masked, MaskingStage
from stream.core.redact import RedactConfig, Redactor, Style
from stream.core.track import Tracker

BOX = (120.0, 60.0, 180.0, 130.0)


def face(box=BOX) -> Detections:
    return Detections(boxes=np.array([box], np.float32), scores=np.array([0.9], np.float32), labels=("face",))


def run_stage(lookback: int, born: int, frames: int = 12) -> tuple[list[Masked], list[np.ndarray]]:
    stage = MaskingStage(Tracker(), Redactor(RedactConfig(style=Style.SOLID, solid_color=(0, 0, 255))),
                         lookback=lookback)
    originals = [panned(320, 200, i) for i in range(frames)]
    out: list[Masked] = []
    for i, img in enumerate(originals):
        emitted = list(stage.push(i, img.copy(), face() if i >= born else Detections(), meta=f"m{i}"))
        # frame i can only come out once `lookback` later frames have been pushed
        assert [m.index for m in emitted] == ([i - lookback] if i >= lookback else [])
        out += emitted
    out += list(stage.flush())
    return out, originals


@pytest.mark.parametrize(
    ("lookback", "born"),
    [(0, 5), (1, 5), (4, 5), (4, 6), (4, 2), (4, 0), (3, 11)],
)
def test_track_born_at_t_is_masked_back_to_t_minus_lookback(lookback: int, born: int) -> None:
    out, originals = run_stage(lookback, born)
    assert [m.index for m in out] == list(range(len(originals)))
    assert [m.meta for m in out] == [f"m{i}" for i in range(len(originals))]
    tid = next(r.track_id for r in out[born].regions)
    assert not out[born].regions[0].coasted
    for m in out:
        regions = [r for r in m.regions if r.track_id == tid]
        if m.index >= born:
            assert len(regions) == 1 and not regions[0].coasted
        elif m.index >= born - lookback:
            assert len(regions) == 1, f"frame {m.index} not masked back from frame {born}"
            r = regions[0]
            assert r.coasted and r.label == "face"
            assert contains(r.box, out[born].regions[0].box), "look-back box smaller than the face"
            x1, y1, x2, y2 = r.box
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            assert tuple(m.image[cy, cx]) == (0, 0, 255), "look-back region not painted"
        else:
            assert m.regions == [], f"frame {m.index} masked although {born - m.index} > lookback"
            np.testing.assert_array_equal(m.image, originals[m.index])


def test_lookback_boxes_grow_with_distance() -> None:
    out, _ = run_stage(lookback=4, born=6)
    widths = [out[i].regions[0].box[2] - out[i].regions[0].box[0] for i in (6, 5, 4, 3, 2)]
    assert widths == sorted(widths) and widths[0] < widths[-1]


def test_known_track_gets_no_second_lookback() -> None:
    """A face seen continuously is one region per frame, not one per look-back copy."""
    out, _ = run_stage(lookback=4, born=0)
    assert all(len(m.regions) == 1 for m in out)


def test_lookback_zero_emits_immediately() -> None:
    stage = MaskingStage(Tracker(), Redactor(), lookback=0)
    img = textured_background(64, 64)
    (m,) = stage.push(0, img, face((10, 10, 40, 40)))
    assert m.index == 0 and len(m.regions) == 1
    assert list(stage.flush()) == []


def test_negative_lookback_is_treated_as_zero() -> None:
    assert MaskingStage(Tracker(), Redactor(), lookback=-3).lookback == 0


def test_a_frame_without_detections_comes_out_black_and_tracks_coast_through_it() -> None:
    """Fail closed (live): no detections for a frame means none of its pixels leave the stage."""
    stage = MaskingStage(Tracker(), Redactor(), lookback=0)
    (m,) = stage.push(0, panned(320, 200, 0), face())
    tid = m.dets.track_ids[0]
    (black,) = stage.push(1, panned(320, 200, 1), None, elapsed=1)
    assert black.failed and black.regions == [] and len(black.dets) == 0
    assert not black.image.any()
    (m,) = stage.push(2, panned(320, 200, 2), Detections())
    assert m.dets.track_ids.tolist() == [tid], "a failed frame is not a miss: the track goes on"


@pytest.mark.parametrize("lookback", [0, 2])
def test_failed_frames_keep_their_place_and_get_no_lookback_paint(lookback: int) -> None:
    stage = MaskingStage(Tracker(), Redactor(), lookback=lookback)
    out: list[Masked] = []
    for i in range(6):
        out += stage.push(i, panned(320, 200, i), None if i == 3 else
                          (face() if i >= 4 else Detections()))
    out += stage.flush()
    assert [m.index for m in out] == list(range(6))
    assert [m.failed for m in out] == [i == 3 for i in range(6)]
    assert not out[3].image.any() and out[3].regions == []


def test_a_new_resolution_starts_tracking_afresh_after_the_held_frames() -> None:
    """Boxes of one resolution mean nothing in another: the held frames go out first, so a face found
    just after the change paints no look-back mask into frames of the old size, and the tracker is new."""
    stage = MaskingStage(Tracker(), Redactor(), lookback=2)
    out: list[Masked] = []
    out += stage.push(0, panned(320, 200, 0), face())
    for i in (1, 2):
        out += stage.push(i, panned(320, 200, i), Detections())
    old = stage.tracker
    out += stage.push(3, textured_background(640, 400, seed=3), face((300, 100, 360, 170)))
    assert stage.tracker is not old
    assert [m.index for m in out] == [0, 1, 2], "frames of the old size are out before the new one"
    assert [len(m.regions) for m in out] == [1, 1, 1]  # the old face, detected then coasting
    assert [t.track_id for t in stage.tracker.changes.started] == [1]
    out += stage.flush()
    assert [m.index for m in out] == [0, 1, 2, 3] and len(out[3].regions) == 1
    assert all(r.track_id == 1 and r.coasted is False for r in out[3].regions)
