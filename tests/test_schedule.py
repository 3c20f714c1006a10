"""FrameDetector's per-model schedule (ModelConfig.every) and what it tells the tracker (observed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from helpers import finds, uk_plate

from stream.core.detections import Detections
from stream.core.track import Tracker, TrackerConfig
from stream.detect.ensemble import DetectorConfig, FrameDetector, ModelConfig

PLATE_AT = (20, 250, 140, 278)


class Spy:
    """Wraps a detector and records the frames of every call."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[list[np.ndarray]] = []

    def prepare(self, images: list[np.ndarray], frames: object = None) -> list:
        self.calls.append(list(images))
        return self.inner.prepare(images, frames)

    def complete(self, chunks: list) -> list[Detections]:
        return self.inner.complete(chunks)

    def __call__(self, images: list[np.ndarray], frames: object = None) -> list[Detections]:
        return self.complete(self.prepare(images, frames))


@pytest.fixture(scope="module")
def every3() -> FrameDetector:
    """CenterFace on every frame, plates on every 3rd frame, no person heads."""
    return FrameDetector(DetectorConfig(
        faces={"centerface": ModelConfig(0.35, 320)},
        plate=ModelConfig(threshold=0.2, input_size=640, every=3),
        person_heads=None, providers=("cpu",)))


@pytest.fixture
def spy(every3: FrameDetector):
    inner = every3.plate_model
    every3.plate_model = wrapped = Spy(inner)
    yield wrapped
    every3.plate_model = inner


def plate_frames(chelsea: np.ndarray, n: int) -> list[np.ndarray]:
    img = chelsea.copy()
    x1, y1, x2, y2 = PLATE_AT
    img[y1:y2, x1:x2] = uk_plate(x2 - x1, y2 - y1)
    return [img.copy() for _ in range(n)]  # distinct arrays, so the spy can tell them apart


@pytest.mark.parametrize(
    ("seqs", "due"),
    [
        ([0, 1, 2, 3], [True, False, False, True]),
        ([4, 5, 6, 7], [False, False, True, False]),
        ([9, 10, 11, 12], [True, False, False, True]),
        ([1, 2], [False, False]),
        (None, [True, True, True, True]),  # no frame numbers: every model runs on every frame
        ([1, None, 2], [False, True, False]),  # None: the frame after a gap, every model runs
    ],
    ids=["0-3", "4-7", "9-12", "1-2-none-due", "no-seqs", "after-a-gap"],
)
def test_plate_model_runs_only_on_every_third_frame(every3: FrameDetector, spy: Spy, chelsea: np.ndarray,
                                                    seqs: Sequence[int] | None, due: list[bool]) -> None:
    frames = plate_frames(chelsea, len(due))
    out = every3.detect(frames, seqs)
    assert len(out) == len(frames)
    expected = [f for f, d in zip(frames, due, strict=True) if d]
    if expected:
        assert len(spy.calls) == 1, "the due frames must go to the plate model as one batch"
        sent = spy.calls[0]
        assert len(sent) == len(expected), f"{len(sent)} frames sent to the plate model, {len(expected)} due"
        assert all(a is b for a, b in zip(sent, expected, strict=True)), "wrong frames sent to the plate"
    else:
        assert spy.calls == [], "plate model ran although no frame was due"
    for i, (d, is_due) in enumerate(zip(out, due, strict=True)):
        assert d.observed == (frozenset({"face", "plate"}) if is_due else frozenset({"face"})), i
        plates = d.with_label("plate")
        if is_due:
            assert finds(plates.boxes, PLATE_AT), f"frame {i}: plate not found on a due frame: {d}"
        else:
            assert len(plates) == 0, f"frame {i}: plate boxes on a frame the plate model skipped"


def test_skipped_plate_frames_stay_masked_through_the_tracker(every3: FrameDetector,
                                                              chelsea: np.ndarray) -> None:
    """--plate-every 3 with --coast 1: the plate is masked in every frame, coasted on skipped ones."""
    frames = plate_frames(chelsea, 7)
    tracker = Tracker(TrackerConfig(max_coast=1))
    ids = set()
    for start in range(0, len(frames), 4):  # batches of 4, as the CLI sends them
        batch = frames[start:start + 4]
        seqs = list(range(start, start + len(batch)))
        for seq, d in zip(seqs, every3.detect(batch, seqs), strict=True):
            plates = tracker.update(d).with_label("plate")
            assert len(plates) == 1, f"frame {seq}: plate not masked ({len(plates)} plate boxes)"
            assert bool(plates.coasted[0]) == (seq % 3 != 0), f"frame {seq}"
            assert finds(plates.boxes, PLATE_AT, min_iou=0.3), f"frame {seq}: {plates.boxes}"
            ids.add(int(plates.track_ids[0]))
    assert len(ids) == 1, f"the plate changed track id: {ids}"


class Blind:
    """A face model that runs on every frame and, as for a face a few pixels tall, finds nothing."""

    def prepare(self, images: list[np.ndarray], frames: object = None) -> list[int]:
        return [len(images)]

    def complete(self, chunks: list[int]) -> list[Detections]:
        return [Detections()] * sum(chunks)


def test_head_masks_stay_through_skipped_person_frames(astronaut: np.ndarray) -> None:
    """--person-every 4 with --coast 2: a distant person's head is masked in every frame."""
    import cv2

    det = FrameDetector(DetectorConfig(faces={}, plate=None,
                                       person_heads=ModelConfig(0.3, 640, every=4), providers=("cpu",)))
    det.face_models = [(Blind(), ModelConfig(0.35, 640))]  # type: ignore[list-item]
    frame = np.full((300, 451, 3), 128, np.uint8)
    frame[160:280, 200:320] = cv2.resize(astronaut, (120, 120), interpolation=cv2.INTER_AREA)
    tracker = Tracker(TrackerConfig(max_coast=2))
    masked = [len(tracker.update(det.detect([frame], [seq])[0]).with_label("face")) for seq in range(8)]
    assert masked == [1] * 8, f"head masks per frame: {masked}"
