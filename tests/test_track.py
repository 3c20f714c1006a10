"""Tracker: coasting through missed detections, separate identities, matching small fast boxes."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import contains, iou

from stream.core.detections import Detections
from stream.core.redact import RedactConfig, Redactor
from stream.core.track import Seen, Tracker, TrackerConfig


def dets(*boxes: tuple[float, float, float, float], label: str = "face",
         labels: tuple[str, ...] | None = None) -> Detections:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return Detections(boxes=b, scores=np.full(len(b), 0.9, np.float32),
                      labels=labels if labels is not None else (label,) * len(b))


def moving(frame: int, speed: float, start=(100.0, 100.0), size=40.0) -> tuple[float, float, float, float]:
    x, y = start[0] + speed * frame, start[1]
    return (x, y, x + size, y + size)


@pytest.mark.parametrize("max_coast", [0, 1, 3, 12])
def test_coasts_for_max_coast_frames_then_disappears(max_coast: int) -> None:
    t = Tracker(TrackerConfig(max_coast=max_coast))
    ids = set()
    for f in range(5):
        out = t.update(dets(moving(f, 5)))
        assert len(out) == 1 and not out.coasted[0]
        ids.add(int(out.track_ids[0]))
    assert len(ids) == 1
    for missed in range(1, max_coast + 1):
        out = t.update(Detections())
        assert len(out) == 1, f"lost after {missed} missed frame(s), max_coast={max_coast}"
        assert bool(out.coasted[0]) and int(out.track_ids[0]) in ids
    assert len(t.update(Detections())) == 0, "still shown after max_coast + 1 missed frames"
    assert [tr.track_id for tr in t.changes.ended] == list(ids)


@pytest.mark.parametrize("speed", [0, 5, 10, -8])
def test_coasted_box_covers_constant_velocity_motion(speed: float) -> None:
    """Detected in frames 0-4, then missed for 12 frames: the coasted box follows the motion."""
    t = Tracker(TrackerConfig(max_coast=12))
    for f in range(5):
        t.update(dets(moving(f, speed)))
    for f in range(5, 17):
        out = t.update(Detections())
        truth = moving(f, speed)
        box = out.boxes[0]
        assert out.coasted[0]
        assert contains(box, truth), f"frame {f}: coasted {box.round(1)} does not cover {truth}"
        last_seen = moving(4, speed)
        if speed:  # it moved with the object rather than staying where it was last seen
            assert iou(box, truth) > iou(box, last_seen) or f == 5


@pytest.mark.parametrize("speed", [5, 10, 20])
def test_painted_region_of_coasted_face_covers_the_face(speed: float) -> None:
    """What reaches the frame is the coasted box enlarged by the face mask_scale: it must cover the face."""
    t = Tracker(TrackerConfig(max_coast=12))
    redactor = Redactor(RedactConfig())
    for f in range(5):
        t.update(dets(moving(f, speed)))
    for f in range(5, 17):
        out = t.update(Detections())
        (region,) = redactor.regions(out, 2000, 1000)
        assert region.coasted
        assert contains(region.box, moving(f, speed)), f"frame {f}"


def test_two_objects_keep_separate_track_ids() -> None:
    t = Tracker()
    history: dict[int, list[np.ndarray]] = {}
    for f in range(20):
        a = moving(f, 6, start=(50, 50))
        b = moving(f, -6, start=(400, 300))
        out = t.update(dets(b, a) if f % 2 else dets(a, b))  # detection order must not matter
        assert len(out) == 2
        assert len(set(out.track_ids.tolist())) == 2
        for tid, box in zip(out.track_ids.tolist(), out.boxes, strict=True):
            history.setdefault(tid, []).append(box)
    assert len(history) == 2, f"identities were swapped or re-created: {sorted(history)}"
    for boxes in history.values():
        xs = [b[0] for b in boxes]
        assert xs == sorted(xs) or xs == sorted(xs, reverse=True), "a track jumped between objects"


def test_one_object_missing_does_not_steal_the_other_id() -> None:
    t = Tracker()
    ids = {}
    for f in range(6):
        out = t.update(dets(moving(f, 4, start=(50, 50)), moving(f, 4, start=(300, 50))))
        ids = {round(float(b[0])): int(i) for b, i in zip(out.boxes, out.track_ids, strict=True)}
    right_id = ids[max(ids)]
    for f in range(6, 9):  # the left one is missed, the right one still detected
        out = t.update(dets(moving(f, 4, start=(300, 50))))
        live = {int(i): bool(c) for i, c in zip(out.track_ids, out.coasted, strict=True)}
        assert live[right_id] is False
        assert list(live.values()).count(True) == 1


def test_labels_never_share_a_track() -> None:
    t = Tracker()
    box = (100, 100, 160, 130)
    out = t.update(dets(box, box, labels=("face", "plate")))
    assert len(set(out.track_ids.tolist())) == 2
    out2 = t.update(dets(box, box, labels=("plate", "face")))
    before = dict(zip(out.labels, out.track_ids.tolist(), strict=True))
    after = dict(zip(out2.labels, out2.track_ids.tolist(), strict=True))
    assert before == after


@pytest.mark.parametrize(
    ("size", "speed", "same_track"),
    [
        (10, 12, True),   # IoU 0 between frames, centre moves 0.85 diagonals: matched by distance
        (6, 7, True),     # 6 px face, 7 px/frame
        (10, 30, False),  # 2.1 diagonals in one frame: a different object
    ],
)
def test_tiny_fast_box_continues_by_centre_distance(size: float, speed: float, same_track: bool) -> None:
    t = Tracker()
    ids = []
    for f in range(8):
        x = 50 + speed * f
        prev = (x - speed, 50, x - speed + size, 50 + size)
        box = (x, 50, x + size, 50 + size)
        assert iou(prev, box) == 0.0
        out = t.update(dets(box))
        fresh = out.select(~out.coasted)
        assert len(fresh) == 1
        ids.append(int(fresh.track_ids[0]))
    if same_track:
        assert len(set(ids)) == 1, ids
    else:
        assert len(set(ids)) == len(ids), ids


def test_new_track_masks_from_its_first_detection() -> None:
    out = Tracker().update(dets((10, 10, 50, 50)))
    assert len(out) == 1 and not out.coasted[0] and out.track_ids[0] >= 1
    np.testing.assert_array_equal(out.boxes[0], [10, 10, 50, 50])


# --- frames where a label was not looked for (Detections.observed) ------------------------------

PLATE = (300.0, 200.0, 420.0, 228.0)
FACES_ONLY = frozenset({"face"})
BOTH = frozenset({"face", "plate"})


def observed(*boxes: tuple[float, float, float, float], seen: frozenset[str] | None,
             labels: tuple[str, ...] = ()) -> Detections:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return Detections(boxes=b, scores=np.full(len(b), 0.9, np.float32), labels=labels, observed=seen)


def plate_tracker(max_coast: int) -> tuple[Tracker, int]:
    t = Tracker(TrackerConfig(max_coast=max_coast))
    for _ in range(3):
        out = t.update(observed(PLATE, seen=BOTH, labels=("plate",)))
    assert len(out) == 1 and not out.coasted[0]
    return t, int(out.track_ids[0])


def width(box: np.ndarray) -> float:
    return float(box[2] - box[0])


@pytest.mark.parametrize("max_coast", [1, 3, 12])
def test_unobserved_plate_survives_past_max_coast_up_to_four_times(max_coast: int) -> None:
    """Plates not looked for (faces only) are not missed: the track lives 4 * max_coast frames, coasting."""
    t, tid = plate_tracker(max_coast)
    widths = [width(np.array(PLATE))]
    for since in range(1, 4 * max_coast + 1):
        out = t.update(observed(seen=FACES_ONLY))
        assert len(out) == 1, f"plate dropped after {since} unobserved frame(s), max_coast={max_coast}"
        assert out.labels == ("plate",) and int(out.track_ids[0]) == tid
        assert bool(out.coasted[0]), f"frame {since}: an unobserved plate must be reported as coasted"
        assert contains(out.boxes[0], PLATE), f"frame {since}: {out.boxes[0]} does not cover {PLATE}"
        widths.append(width(out.boxes[0]))
        assert widths[-1] > widths[-2], f"frame {since}: coasted box did not grow: {widths}"
    assert t.tracks[0].missed == 0, "an unobserved frame was counted as a miss"
    assert len(t.update(observed(seen=FACES_ONLY))) == 0, "still shown after 4 * max_coast unobserved frames"
    assert [tr.track_id for tr in t.changes.ended] == [tid]


@pytest.mark.parametrize("max_coast", [1, 3, 12])
@pytest.mark.parametrize("seen", [BOTH, None, frozenset({"plate"})], ids=["face+plate", "None", "plate"])
def test_observed_absent_plate_expires_after_max_coast(max_coast: int, seen: frozenset[str] | None) -> None:
    t, tid = plate_tracker(max_coast)
    for missed in range(1, max_coast + 1):
        out = t.update(observed(seen=seen))
        assert len(out) == 1 and bool(out.coasted[0]) and int(out.track_ids[0]) == tid, f"miss {missed}"
    assert len(t.update(observed(seen=seen))) == 0, "still shown after max_coast + 1 observed misses"
    assert [tr.track_id for tr in t.changes.ended] == [tid]


def test_only_observed_frames_count_as_misses() -> None:
    """5 unobserved frames cost nothing; then max_coast observed misses are still allowed."""
    t, tid = plate_tracker(max_coast=3)
    for _ in range(5):
        assert len(t.update(observed(seen=FACES_ONLY))) == 1
    for missed in range(1, 4):
        out = t.update(observed(seen=BOTH))
        assert len(out) == 1 and int(out.track_ids[0]) == tid, f"dropped at observed miss {missed}"
    assert len(t.update(observed(seen=BOTH))) == 0


def test_plate_found_again_after_unobserved_frames_keeps_its_id() -> None:
    t, tid = plate_tracker(max_coast=2)
    for _ in range(6):  # > max_coast, <= 4 * max_coast
        t.update(observed(seen=FACES_ONLY))
    out = t.update(observed(PLATE, seen=BOTH, labels=("plate",)))
    assert len(out) == 1 and int(out.track_ids[0]) == tid and not out.coasted[0]
    np.testing.assert_array_equal(out.boxes[0], PLATE)  # back to the detected size, not the grown one


def test_observed_is_per_label() -> None:
    """A face missed in a faces-only frame expires after max_coast while the unobserved plate stays."""
    t = Tracker(TrackerConfig(max_coast=2))
    face_box = (50.0, 50.0, 90.0, 90.0)
    out = t.update(observed(face_box, PLATE, seen=BOTH, labels=("face", "plate")))
    ids = dict(zip(out.labels, out.track_ids.tolist(), strict=True))
    for _ in range(2):
        out = t.update(observed(seen=FACES_ONLY))
        assert sorted(out.labels) == ["face", "plate"] and all(out.coasted)
    out = t.update(observed(seen=FACES_ONLY))
    assert out.labels == ("plate",) and out.track_ids.tolist() == [ids["plate"]]
    assert [tr.track_id for tr in t.changes.ended] == [ids["face"]]


@pytest.mark.parametrize("speed", [4, 8, -6])
def test_dropped_frames_move_and_grow_the_coasted_box_by_the_frames_that_passed(speed: float) -> None:
    """Under overload the next update comes many source frames later: the object kept moving."""
    t = Tracker(TrackerConfig(max_coast=12))
    naive = Tracker(TrackerConfig(max_coast=12))  # the same updates, told nothing of the gap
    for f in range(5):  # detected on consecutive frames
        t.update(dets(moving(f, speed)))
        naive.update(dets(moving(f, speed)))
    out = t.update(Detections(), elapsed=8)  # frames 5-11 dropped, missed on frame 12
    truth = moving(12, speed)
    assert contains(out.boxes[0], truth), f"{out.boxes[0].round(1)} misses {truth}"
    stale = naive.update(Detections()).boxes[0]
    assert not contains(stale, truth), "told nothing of the gap, the box lags behind the object"


def bouncing(frame: int, turn: int = 10) -> tuple[float, float, float, float]:
    """A 170 x 36 plate moving down-right at 1.5 px a frame that turns back at ``turn`` (a frame's
    corner, a braking car), as the load harness's plates do."""
    step = frame if frame <= turn else 2 * turn - frame
    x, y = 400 + 1.5 * step, 280 + 1.5 * step
    return (x, y, x + 170, y + 36)


def test_a_coasting_plate_that_turns_back_stays_covered() -> None:
    """The plate model misses the plate from frame 5 on (7 runs in a row on the harness) while it
    turns back: the coasting box reaches back to the last sighting, so the plate never shows."""
    t = Tracker(TrackerConfig(max_coast=24))
    for f in range(5):
        t.update(dets(bouncing(f), label="plate"))
    for f in range(5, 25):
        out = t.update(observed(seen=frozenset({"plate"})))
        assert len(out) == 1 and out.coasted[0]
        assert contains(out.boxes[0], bouncing(f), tol=1), f"frame {f}: {out.boxes[0].round(1)}"


def test_a_coasting_face_is_only_predicted_forward() -> None:
    """Faces are painted as ellipses, which a box stretched back to the last sighting would not fill
    at its ends; their face model runs on every frame. A face's coasting box is its predicted box."""
    t = Tracker(TrackerConfig(max_coast=24))
    for f in range(5):
        t.update(dets(moving(f, 6)))
    box = t.update(Detections()).boxes[0]
    w = box[2] - box[0]
    assert w == pytest.approx(40 * (1 + TrackerConfig().coast_growth), abs=0.01), "not stretched back"
    plate = Tracker(TrackerConfig(max_coast=24))
    for f in range(5):
        plate.update(dets(moving(f, 6), label="plate"))
    for _ in range(4):
        pbox = plate.update(Detections()).boxes[0]
    assert pbox[0] <= moving(4, 6)[0] and pbox[2] >= moving(8, 6)[2], "a plate's box spans both places"


def test_size_noise_between_detections_never_shrinks_a_coasted_box() -> None:
    """Two detections of a still object whose boxes happen to differ by 20 px (detector jitter, or
    a moment of occlusion), then missed: extrapolated, that shrink would turn the box inside out."""
    t = Tracker(TrackerConfig(max_coast=12))
    t.update(dets((100, 100, 160, 160), label="plate"))
    t.update(dets((110, 110, 150, 150), label="plate"))
    for missed in range(1, 6):
        box = t.update(Detections()).boxes[0]
        assert contains(box, (110, 110, 150, 150)), f"missed {missed}: {box.round(1)}"
    moving_away = Tracker(TrackerConfig(max_coast=12))  # a growing box still grows
    moving_away.update(dets((100, 100, 140, 140)))
    moving_away.update(dets((95, 95, 145, 145)))
    box = moving_away.update(Detections()).boxes[0]
    assert contains(box, (90, 90, 150, 150))


# --- track life as the tracker reports it (TrackChanges) -----------------------------------------

def at(seq: int) -> Seen:
    return Seen(seq, 1000.0 + seq / 25, seq / 25, (640, 360))


def scored(box: tuple[float, float, float, float], score: float) -> Detections:
    return Detections(boxes=np.array([box], np.float32), scores=np.array([score], np.float32),
                      labels=("face",))


def test_changes_report_start_going_on_and_end_with_the_best_detection() -> None:
    t = Tracker(TrackerConfig(max_coast=1))
    t.update(scored((10, 10, 50, 50), 0.6), seen=at(1))
    (started,) = t.changes.started
    assert t.changes.updated == () and t.changes.ended == ()
    assert (started.label, started.hits, started.coasted) == ("face", 1, False)
    assert started.score == pytest.approx(0.6)
    assert started.first_seen == started.last_seen == started.best_seen == at(1)
    tid = started.track_id
    t.update(scored((12, 10, 52, 50), 0.9), seen=at(2))
    t.update(scored((14, 10, 54, 50), 0.7), seen=at(3))
    (going,) = t.changes.updated
    assert t.changes.started == () and going.track_id == tid and going.hits == 3
    assert going.best_score == pytest.approx(0.9) and going.best_seen == at(2)
    np.testing.assert_array_equal(going.best_box, [12, 10, 52, 50])
    t.update(Detections(), seen=at(4))  # missed: coasting, the mask grown, the last detection kept
    (coasting,) = t.changes.updated
    assert coasting.coasted and coasting.last_seen == at(3)
    np.testing.assert_array_equal(coasting.box, [14, 10, 54, 50])
    assert coasting.shown[2] - coasting.shown[0] > coasting.box[2] - coasting.box[0]  # where the mask is now
    t.update(Detections(), seen=at(5))
    assert t.changes.updated == () and t.changes.started == ()
    (ended,) = t.changes.ended
    assert ended.track_id == tid and ended.hits == 3
    assert ended.first_seen == at(1) and ended.last_seen == at(3)
    assert ended.best_score == pytest.approx(0.9) and ended.best_seen == at(2)
    np.testing.assert_array_equal(ended.best_box, [12, 10, 52, 50])


def test_reports_are_copies_later_updates_do_not_change() -> None:
    t = Tracker()
    t.update(scored((10, 10, 50, 50), 0.6), seen=at(1))
    (first,) = t.changes.started
    t.update(scored((20, 10, 60, 50), 0.9), seen=at(2))
    np.testing.assert_array_equal(first.box, [10, 10, 50, 50])
    assert first.score == pytest.approx(0.6) and first.hits == 1 and first.last_seen == at(1)


def test_changes_follow_the_order_of_the_masked_boxes() -> None:
    """Tracks that go on come first, then new ones: the order of ``update``'s boxes."""
    t = Tracker()
    t.update(dets((10, 10, 50, 50)))
    out = t.update(dets((300, 10, 340, 50), (11, 10, 51, 50)))
    ids = [i.track_id for i in (*t.changes.updated, *t.changes.started)]
    assert ids == out.track_ids.tolist() and len(t.changes.started) == 1


def test_a_nan_score_is_never_the_best() -> None:
    """A broken detector's NaN must not stick as a track's best score: the next real score wins."""
    t = Tracker()
    t.update(scored((10, 10, 50, 50), float("nan")), seen=at(1))
    t.update(scored((10, 10, 50, 50), 0.4), seen=at(2))
    (going,) = t.changes.updated
    assert going.best_score == pytest.approx(0.4) and going.best_seen == at(2)
