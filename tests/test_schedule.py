"""FrameDetector's per-model schedule (ModelConfig.every) and what it tells the tracker (observed)."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
from helpers import BUS, finds, read_bgr, uk_plate

from stream.core.detections import Detections, FrameRef
from stream.core.track import Tracker, TrackerConfig
from stream.detect.ensemble import DetectorConfig, FrameDetector, ModelConfig, phase

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

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def every3() -> FrameDetector:
    """CenterFace on every frame, plates on every 3rd frame, no person heads."""
    # one lane: the due frames of a batch reach the model as one batch (lanes split it)
    return FrameDetector(DetectorConfig(
        faces={"centerface": ModelConfig(0.35, 320)},
        plate=ModelConfig(threshold=0.2, input_size=640, every=3),
        person_heads=None, providers=("cpu",), lanes=1))


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


def stream_in_phase(name: str, every: int = 3) -> str:
    """A stream id whose first-run offset is 0, so the expected cadence can be written down."""
    return next(f"{name}-{i}" for i in range(100) if phase(f"{name}-{i}") % every == 0)


@pytest.mark.parametrize(
    ("batches", "due"),
    [
        ([[0, 1, 2, 3], [4, 5, 6, 7]], [[True, False, False, True], [False, False, True, False]]),
        ([[0, 2, 4, 5, 7]], [[True, False, True, False, True]]),  # gaps count as passed frames
        ([[0, 2, 4, 6, 8, 10]], [[True, False, True, False, True, False]]),  # half dropped: every 4th
        ([[0, 20, 21, 22, 23]], [[True, True, False, False, True]]),  # a long gap: runs once, not 8 times
        ([[5, 6, 7, 8], [1, 2]], [[True, False, False, True], [True, False]]),  # the stream started again
        (None, [[True, True, True, True]]),  # no frame references: every model runs on every frame
    ],
    ids=["in-order", "gaps", "every-other-dropped", "long-gap", "restart", "no-refs"],
)
def test_plate_model_cadence_counts_source_frames(every3: FrameDetector, spy: Spy, chelsea: np.ndarray,
                                                  batches: list[list[int]] | None,
                                                  due: list[list[bool]]) -> None:
    sid = stream_in_phase(f"cadence-{len(spy.calls)}-{id(due)}")
    for i, want in enumerate(due):
        frames = plate_frames(chelsea, len(want))
        spy.calls.clear()
        refs = None if batches is None else [FrameRef(sid, s) for s in batches[i]]
        out = every3.detect(frames, refs)
        assert len(out) == len(frames)
        expected = [f for f, d in zip(frames, want, strict=True) if d]
        if expected:
            assert len(spy.calls) == 1, "the due frames must go to the plate model as one batch"
            sent = spy.calls[0]
            assert len(sent) == len(expected), f"{len(sent)} sent to the plate model, {len(expected)} due"
            assert all(a is b for a, b in zip(sent, expected, strict=True)), "wrong frames sent to the plate"
        else:
            assert spy.calls == [], "plate model ran although no frame was due"
        for j, (d, is_due) in enumerate(zip(out, want, strict=True)):
            assert d.observed == (frozenset({"face", "plate"}) if is_due else frozenset({"face"})), (i, j)
            plates = d.with_label("plate")
            if is_due:
                assert finds(plates.boxes, PLATE_AT), f"frame {j}: plate not found on a due frame: {d}"
            else:
                assert len(plates) == 0, f"frame {j}: plate boxes on a frame the plate model skipped"


def test_cadences_are_per_stream_and_staggered(every3: FrameDetector, spy: Spy, chelsea: np.ndarray) -> None:
    """Two streams keep their own cadence; streams started together spread their plate runs."""
    a, b = stream_in_phase("stagger-a"), next(f"stagger-b{i}" for i in range(100)
                                              if phase(f"stagger-b{i}") % 3 == 1)
    frames = plate_frames(chelsea, 2)
    ran = []
    for seq in range(7):
        out = every3.detect(frames, [FrameRef(a, seq), FrameRef(b, seq)])
        ran.append(tuple("plate" in d.observed for d in out))
    assert [r[0] for r in ran] == [True, False, False, True, False, False, True]
    # b's first run counts as one frame earlier: its next comes after 2 frames, then every 3rd
    assert [r[1] for r in ran] == [True, False, True, False, False, True, False]


def test_a_cut_to_another_view_runs_every_model_at_once(every3: FrameDetector, spy: Spy,
                                                       chelsea: np.ndarray) -> None:
    """The tracker ends the old view's tracks at a cut; a plate model due two frames later would leave
    the new view's plates unmasked until then, so a cut starts the stream's cadences afresh."""
    here = plate_frames(chelsea, 1)[0]
    there = cv2.resize(read_bgr(BUS), (here.shape[1], here.shape[0]), interpolation=cv2.INTER_AREA)
    x1, y1, x2, y2 = PLATE_AT
    there[y1:y2, x1:x2] = uk_plate(x2 - x1, y2 - y1)
    for views, want in (([here, here, here, here], [True, False, False, True]),
                        ([here, here, there, there], [True, False, True, False])):
        sid = stream_in_phase(f"cut-{want}")
        ran = []
        for seq, view in enumerate(views):
            (d,) = every3.detect([view.copy()], [FrameRef(sid, seq)])
            ran.append("plate" in d.observed)
            if ran[-1]:
                assert finds(d.with_label("plate").boxes, PLATE_AT), f"frame {seq}: plate not found"
        assert ran == want


def test_skipped_plate_frames_stay_masked_through_the_tracker(every3: FrameDetector,
                                                              chelsea: np.ndarray) -> None:
    """--plate-every 3 with --coast 1: the plate is masked in every frame, coasted on skipped ones."""
    frames = plate_frames(chelsea, 7)
    tracker = Tracker(TrackerConfig(max_coast=1))
    ids = set()
    for start in range(0, len(frames), 4):  # batches of 4, as the CLI sends them
        batch = frames[start:start + 4]
        seqs = list(range(start, start + len(batch)))
        refs = [FrameRef(stream_in_phase("tracker"), seq) for seq in seqs]
        for seq, d in zip(seqs, every3.detect(batch, refs), strict=True):
            plates = tracker.update(d).with_label("plate")
            assert len(plates) == 1, f"frame {seq}: plate not masked ({len(plates)} plate boxes)"
            assert bool(plates.coasted[0]) == (seq % 3 != 0), f"frame {seq}"
            assert finds(plates.boxes, PLATE_AT, min_iou=0.3), f"frame {seq}: {plates.boxes}"
            ids.add(int(plates.track_ids[0]))
    assert len(ids) == 1, f"the plate changed track id: {ids}"


class Blind:
    """A face model that runs on every frame and, as for a face a few pixels tall, finds nothing."""

    on_gpu = False

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
    masked = [len(tracker.update(det.detect([frame], [FrameRef("heads", seq)])[0]).with_label("face"))
              for seq in range(8)]
    assert masked == [1] * 8, f"head masks per frame: {masked}"


@pytest.mark.parametrize("drop_rate", [0.0, 0.3, 0.6, 0.9])
def test_no_model_starves_or_spirals_under_random_drops(every3: FrameDetector, drop_rate: float) -> None:
    """Frames dropped at random (load): the plate model runs at most once per 3 source frames
    (no spiral) and never waits longer than 3 source frames plus the gap before the next frame
    that arrives (no starvation)."""
    rng = np.random.default_rng(int(drop_rate * 100))
    kept = [s for s in range(600) if rng.random() >= drop_rate or s == 0]
    sid = stream_in_phase(f"random-{drop_rate}")
    plate = every3.config.plate
    due = [every3._schedule(99, every3.plate_model, plate, 1, [FrameRef(sid, s)])[0] for s in kept]
    runs = [s for s, d in zip(kept, due, strict=True) if d]
    assert runs[0] == kept[0]
    assert all(b - a >= 3 for a, b in itertools.pairwise(runs)), "ran more often than every 3rd frame"
    for a, b in itertools.pairwise(runs):
        first_due = next(s for s in kept if s >= a + 3)
        assert b == first_due, f"ran at {b}, due at {first_due}: it waited past its cadence"


def test_forget_makes_a_streams_next_frame_run_every_model(every3: FrameDetector) -> None:
    sid = stream_in_phase("forget")
    plate = every3.config.plate
    due = lambda seq: every3._schedule(98, every3.plate_model, plate, 1, [FrameRef(sid, seq)])[0]  # noqa: E731
    assert [due(0), due(1)] == [True, False]
    every3.forget(sid)
    assert due(2) is True, "after forget the next frame runs the model"
    assert due(3) is False


def test_a_batch_out_of_order_counts_each_streams_frames_oldest_first(every3: FrameDetector) -> None:
    """Two frames of one stream in one batch, newest first: the model runs on one of them, not on
    both (the older one must not read as a restarted stream)."""
    sid = stream_in_phase("order")
    plate = every3.config.plate
    every3._schedule(97, every3.plate_model, plate, 1, [FrameRef(sid, 0)])
    due = every3._schedule(97, every3.plate_model, plate, 2, [FrameRef(sid, 4), FrameRef(sid, 3)])
    assert due == [False, True], "frame 3 is the first due (3 source frames after 0), frame 4 is not"


def test_a_streams_plate_and_person_runs_land_on_different_frames() -> None:
    """In the live default (`fast`: plates and persons both every 3rd frame) the two heavy models
    take turns on a stream: a frame that ran both would cost both, and its latency would spike."""
    from stream.config import DetectionConfig

    det = FrameDetector(DetectionConfig(preset="fast").detector_settings([1]))
    plate_slot = len(det.face_models)  # the plan: face models, then plates, then persons
    person_slot = plate_slot + 1
    assert det.config.plate.every == det.config.person_heads.every == 3
    for sid in ("cam-a", "cam-b", "cam-c"):
        plates = [s for s in range(30) if det._schedule(plate_slot, det.plate_model, det.config.plate, 1,
                                                          [FrameRef(sid, s)])[0]]
        people = [s for s in range(30) if det._schedule(person_slot, det.person_model,
                                                          det.config.person_heads, 1, [FrameRef(sid, s)])[0]]
        assert not set(plates[1:]) & set(people[1:]), f"{sid}: plates {plates}, persons {people}"
        assert all(b - a == 3 for a, b in itertools.pairwise(plates[1:])), plates
        assert all(b - a == 3 for a, b in itertools.pairwise(people[1:])), people
