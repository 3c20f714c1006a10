"""The shared batcher: batches across streams, and fails frames closed when the detector does not answer."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from live_helpers import Hangs, NoFaces, Raises, counter, wait_for

from stream.core.detections import FrameRef
from stream.core.frames import Drop, Failure, Frame, Job, JobQueue
from stream.core.metrics import Metrics
from stream.detect.lanes import Lanes
from stream.live.batcher import ADMIT_MARGIN_S, ADMIT_SLACK, Batcher, ServiceTime

_seq = itertools.count(1)


def job(stream: str, deadline_s: float = 5.0) -> Job:
    now = time.monotonic()
    frame = Frame(stream, next(_seq), np.zeros((48, 64, 3), np.uint8), now, time.time())
    return Job(frame, deadline=now + deadline_s)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    ev = threading.Event()
    yield ev
    ev.set()  # let any hung detector thread finish


def make(factory, **kw) -> tuple[Batcher, Metrics, list[JobQueue]]:
    m = Metrics()
    b = Batcher(factory, m, **kw)
    queues = [JobQueue(f"s{i}", 4) for i in range(3)]
    for q in queues:
        b.attach(q)
    b.start()
    return b, m, queues



def detected(queue: JobQueue, stream_id: str) -> bool:
    """Put one frame of ``stream_id`` and say whether it came back detected (not failed)."""
    j = job(stream_id)
    queue.put(j)
    wait_for(lambda: j.done)
    return j.detections is not None

def test_one_batch_holds_frames_of_several_streams() -> None:
    det = NoFaces()
    b, _, queues = make(lambda: det, max_batch=6, max_wait_s=0.5)
    try:
        jobs = [job(q.stream_id) for q in queues for _ in range(2)]
        for j in jobs:
            next(q for q in queues if q.stream_id == j.frame.stream_id).put(j)
        wait_for(lambda: all(j.done for j in jobs), what="all jobs resolved")
        assert all(j.detections is not None for j in jobs)
        assert max(det.batches) > 1 and sum(det.batches) == 6
        assert all(n <= 6 for n in det.batches)
    finally:
        b.stop()


@pytest.mark.parametrize(("device", "lanes", "expected"), [("cpu", 2, 2), ("cpu", 1, 1), ("cuda:0", 1, 8),
                                                        ("cpu", None, 8)])
def test_max_batch_unset_is_one_frame_per_cpu_lane_and_8_on_a_gpu(device: str, lanes: int | None,
                                                                   expected: int) -> None:
    """A second frame per CPU lane only waits for the first (benchmarks/README.md, "CPU lanes"); a
    detector that says nothing of lanes keeps the old 8."""
    det = NoFaces()
    det.device = device  # type: ignore[attr-defined]
    if lanes is not None:
        det.lanes = Lanes(lanes)  # type: ignore[attr-defined]
    b, _, queues = make(lambda: det, max_batch=None, max_wait_s=0.5)
    try:
        assert b.max_batch == expected
        jobs = [job(q.stream_id) for q in queues for _ in range(3)]
        for j in jobs:
            next(q for q in queues if q.stream_id == j.frame.stream_id).put(j)
        wait_for(lambda: all(j.done for j in jobs), what="all jobs resolved")
        assert max(det.batches) <= expected and sum(det.batches) == 9
    finally:
        b.stop()


def test_max_batch_is_respected() -> None:
    det = NoFaces()
    b, _, queues = make(lambda: det, max_batch=2, max_wait_s=0.2)
    try:
        jobs = [job(q.stream_id) for q in queues]
        for q, j in zip(queues, jobs, strict=True):
            q.put(j)
        wait_for(lambda: all(j.done for j in jobs))
        assert max(det.batches) <= 2
    finally:
        b.stop()


def test_raising_detector_fails_closed_and_is_recreated() -> None:
    built: list[object] = []

    def factory():
        d = Raises() if len(built) < 2 else NoFaces()  # the first rebuild raises too
        built.append(d)
        return d

    b, m, queues = make(factory, max_batch=4, max_wait_s=0.0)
    try:
        first = job("s0")
        queues[0].put(first)
        wait_for(lambda: first.done)
        assert first.failure is Failure.DETECTOR_ERROR and first.detections is None

        def later_one_succeeds() -> bool:
            j = job("s1")
            queues[1].put(j)
            wait_for(lambda: j.done)
            return j.detections is not None

        wait_for(later_one_succeeds, what="a recreated detector")
        assert counter(m, "detector_restarts", reason="error") == 2
        assert len(built) == 3
    finally:
        b.stop()


def test_hung_detector_fails_frames_closed_in_time(release: threading.Event) -> None:
    hung = Hangs(release)
    built: list[object] = []

    def factory():
        built.append(hung if not built else NoFaces())
        return built[-1]

    b, m, queues = make(factory, max_batch=1, max_wait_s=0.0, hang_timeout_s=0.3)
    try:
        first = job("s0")
        queues[0].put(first)
        wait_for(lambda: first.done, timeout=5)
        assert first.failure is Failure.DETECTOR_HUNG
        assert hung.entered.is_set()
        assert counter(m, "detector_restarts", reason="hung") == 1
        wait_for(lambda: detected(queues[2], "s2"), what="a fresh detector after the hang")
    finally:
        b.stop()


def test_frames_past_their_deadline_are_shed_not_detected() -> None:
    det = NoFaces()
    b, _, queues = make(lambda: det, max_batch=4, max_wait_s=0.0)
    try:
        stale = job("s0", deadline_s=-1)
        queues[0].put(stale)
        wait_for(lambda: stale.done)
        assert stale.dropped is Drop.OVERLOAD and stale.failure is None
        assert det.batches == []
    finally:
        b.stop()


def test_admission_sheds_the_frames_that_would_come_back_late() -> None:
    """With the detector known to take 0.5 s a frame, a frame due in 0.3 s is shed before detection
    (dropped for overload, never blanked) and one due in 10 s is detected."""
    det = NoFaces()
    b, _, queues = make(lambda: det, max_batch=4, max_wait_s=0.0)
    try:
        b.service.observe(0.5, 1)
        late, fine = job("s0", deadline_s=0.3), job("s1", deadline_s=10)
        queues[0].put(late)
        queues[1].put(fine)
        wait_for(lambda: late.done and fine.done)
        assert late.dropped is Drop.OVERLOAD and late.detections is None
        assert fine.detections is not None
        assert det.batches == [1], "only the frame that can make its deadline is detected"
    finally:
        b.stop()


def test_admission_sheds_until_the_smaller_batch_makes_it() -> None:
    """Four frames at 0.1 s each would finish in about 0.5 s: the most urgent (due in 0.3 s) is shed,
    and then three finish in about 0.4 s, in time for the next most urgent (due in 0.45 s)."""
    det = NoFaces()
    b, _, queues = make(lambda: det, max_batch=4, max_wait_s=10.0)
    try:
        b.service.observe(0.1, 1)
        assert 0.3 < ADMIT_SLACK * 0.3 + ADMIT_MARGIN_S < 0.45 < ADMIT_SLACK * 0.4 + ADMIT_MARGIN_S
        jobs = [job("s0", deadline_s=0.3), job("s1", deadline_s=0.45), job("s2", deadline_s=2),
                job("s0", deadline_s=20)]
        for j, q in zip(jobs, [queues[0], queues[1], queues[2], queues[0]], strict=True):
            q.put(j)
        wait_for(lambda: all(j.done for j in jobs))
        assert jobs[0].dropped is Drop.OVERLOAD
        assert all(j.detections is not None for j in jobs[1:])
        assert det.batches == [3]
    finally:
        b.stop()


def test_shedding_takes_turns_across_streams() -> None:
    """Stream s0's frames always arrive first, so they are always the most urgent in the batch. At
    1 s a frame only two of the three fit; shedding the most urgent first would leave s0 dark for
    ever. Admission serves the stream served longest ago first: every stream keeps a share."""
    det = NoFaces()
    b, _, queues = make(lambda: det, max_batch=3, max_wait_s=10.0)
    try:
        b.service.observe(1.0, 1)
        b.service.observe = lambda seconds, frames: None  # type: ignore[method-assign]  # keep 1 s a frame
        assert ADMIT_SLACK * 1.0 + ADMIT_MARGIN_S < 2.0 < ADMIT_SLACK * 2.0 + ADMIT_MARGIN_S < 3.0
        assert ADMIT_SLACK * 3.0 + ADMIT_MARGIN_S < 4.5
        served = {"s0": 0, "s1": 0, "s2": 0}
        for _ in range(6):
            jobs = [job("s0", deadline_s=2.0), job("s1", deadline_s=3.0), job("s2", deadline_s=4.5)]
            for j, q in zip(jobs, queues, strict=True):
                q.put(j)
            wait_for(lambda jobs=jobs: all(j.done for j in jobs))
            assert all(j.detections is not None or j.dropped is Drop.OVERLOAD for j in jobs), "never blanked"
            for j in jobs:
                served[j.frame.stream_id] += j.detections is not None
        assert min(served.values()) >= 2, served
        assert sum(served.values()) >= 9, "turns cost at most one frame in two batches"
    finally:
        b.stop()


def test_a_stale_estimate_cannot_shed_every_frame_for_ever(monkeypatch: pytest.MonkeyPatch) -> None:
    """An estimate learned on one dear batch would shed every later frame, and with nothing detected
    it would never be corrected: after PROBE_AFTER_S without a finished batch one frame goes through
    to measure again."""
    import stream.live.batcher as batcher

    monkeypatch.setattr(batcher, "PROBE_AFTER_S", 0.0)
    det = NoFaces()
    b, _, queues = make(lambda: det, max_batch=4, max_wait_s=10.0)
    try:
        b.service.observe(60.0, 1)  # one frame once took a minute
        jobs = [job(f"s{i}", deadline_s=1.0 + i) for i in range(3)] + [job("s0", deadline_s=5.0)]
        for i, j in enumerate(jobs):
            queues[i % 3].put(j)
        wait_for(lambda: all(j.done for j in jobs))
        assert [j.dropped for j in jobs[:3]] == [Drop.OVERLOAD] * 3
        assert jobs[3].detections is not None and det.batches == [1], "the freshest frame probes"
        assert b.service.mean is not None and b.service.mean < 60.0, "the estimate learned again"
    finally:
        b.stop()


def test_service_time_is_pessimistic_about_frames_of_uneven_cost() -> None:
    st = ServiceTime()
    assert st.predict(8) == 0.0, "nothing is shed before the first batch says how long one takes"
    st.observe(0.4, 4)
    assert st.predict(2) == pytest.approx(0.2)
    for seconds in (0.1, 0.3) * 20:  # frames alternately cheap and dear (a heavy model every 2nd)
        st.observe(seconds, 1)
    assert st.mean is not None and 0.15 < st.mean < 0.25
    assert st.predict(1) > 0.28, "mean plus deviations covers the dear frames"


def test_queue_keeps_the_newest() -> None:
    q = JobQueue("s", 2)
    jobs = [job("s") for _ in range(5)]
    evicted = [q.put(j) for j in jobs]
    assert len(q) == 2
    assert q.take(5) == jobs[-2:]
    assert evicted[:2] == [None, None] and evicted[2:] == jobs[:3]
    assert all(j.dropped is Drop.QUEUE_FULL for j in jobs[:3])


def test_job_resolves_once() -> None:
    j = job("s")
    assert j.resolve(failure=Failure.DEADLINE)
    assert not j.resolve(detections=None, failure=Failure.DETECTOR_ERROR)
    assert j.failure is Failure.DEADLINE


def test_stop_leaves_no_job_waiting() -> None:
    det = NoFaces()
    b, _, queues = make(lambda: det, max_batch=4, max_wait_s=10.0)
    waiting = job("s0")
    queues[0].put(waiting)
    b.stop()
    wait_for(lambda: waiting.done, timeout=5, what="the waiting job to be resolved by stop()")


class _Recording(NoFaces):
    """A detector that finds nothing and notes the frame references it was given, in order."""

    seen: list[FrameRef]

    def __call__(self, images, refs=None):
        self.seen.extend(refs)
        return super().__call__(images, refs)


def recording(seen: list[FrameRef]) -> type[_Recording]:
    """A detector class (a factory for the batcher) whose detectors note their references in ``seen``."""
    return type("Recording", (_Recording,), {"seen": seen})


def test_the_detector_is_told_each_frames_stream_and_source_number() -> None:
    """Cadences count source frames: the detector gets each frame's stream and its own number,
    gaps included, never a number the batcher made up."""
    seen: list[FrameRef] = []
    Recording = recording(seen)
    b, _, queues = make(Recording, max_batch=1, max_wait_s=0.0)
    try:
        now = time.monotonic()
        sent = [("s0", 5), ("s0", 6), ("s1", 1), ("s0", 30)]
        for sid, seq in sent:
            j = Job(Frame(sid, seq, np.zeros((8, 8, 3), np.uint8), now, time.time()), deadline=now + 5)
            queues[int(sid[1])].put(j)
            wait_for(lambda j=j: j.done, what=f"frame {seq}")
        assert seen == [FrameRef(sid, seq) for sid, seq in sent]
    finally:
        b.stop()


def test_a_batch_gives_the_detector_each_streams_frames_in_order() -> None:
    """Admission ranks a stream's freshest frame first, but the detector must still get a stream's
    frames oldest first: its cadences read a frame older than the last one run as a restarted
    stream and run every model on it (measured: the plate and person models then ran on every frame
    of every two-frame batch)."""
    seen: list[FrameRef] = []
    Recording = recording(seen)
    b, _, queues = make(Recording, max_batch=3, max_wait_s=10.0)
    try:
        now = time.monotonic()
        jobs = [Job(Frame(sid, seq, np.zeros((8, 8, 3), np.uint8), now + seq / 100, time.time()),
                    deadline=now + 5 + seq / 100) for sid, seq in [("s0", 7), ("s0", 8), ("s1", 3)]]
        for j in jobs:
            queues[int(j.frame.stream_id[1])].put(j)
        wait_for(lambda: all(j.done for j in jobs))
        assert all(j.detections is not None for j in jobs)
        assert [r.seq for r in seen if r.stream == "s0"] == [7, 8]
    finally:
        b.stop()


def test_all_detectors_hung_is_logged_once_and_its_end_once(
        release: threading.Event, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """While every allowed run hangs the batcher re-checks each second; it says so once, not each time."""
    import stream.live.batcher as batcher

    monkeypatch.setattr(batcher, "MAX_ABANDONED", 1)  # one hung run is already the limit
    hung = Hangs(release)
    built: list[object] = []

    def factory():
        built.append(hung if not built else NoFaces())
        return built[-1]

    b, _, queues = make(factory, max_batch=1, max_wait_s=0.0, hang_timeout_s=0.1)
    caplog.set_level("WARNING", logger="stream.live.batcher")
    try:
        first = job("s0")
        queues[0].put(first)
        wait_for(lambda: first.done, timeout=5)
        assert first.failure is Failure.DETECTOR_HUNG
        checks: set[float] = set()

        def rechecked_three_times() -> bool:
            j = job("s1")
            queues[1].put(j)
            wait_for(lambda: j.done)
            assert j.failure is Failure.DETECTOR_UNAVAILABLE  # still blanked, no new detector
            checks.add(b._retry_at)  # moves on at every re-check of the hung runs
            return len(checks) >= 3

        wait_for(rechecked_three_times, what="three re-checks while the detector hangs")
        assert len(built) == 1
        release.set()  # the hung run returns: a new detector is built
        wait_for(lambda: detected(queues[2], "s2"), what="a fresh detector once the hung run returned")
    finally:
        b.stop()
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "detector runs are hung" in m]) == 1, said
    assert len([m for m in said if "a hung detector run returned" in m]) == 1, said


def test_a_run_whose_result_is_thrown_away_restarts_that_streams_cadences(release: threading.Event) -> None:
    """A frame given up on while the detector ran (late, dropped) never brings its boxes to its
    tracker: the detector is told to forget that stream's cadences, so its next frame runs every
    model instead of trusting a run nobody saw."""

    class Forgetful(Hangs):
        def __init__(self) -> None:
            super().__init__(release)
            self.forgotten: list[str] = []

        def forget(self, stream: str) -> None:
            self.forgotten.append(stream)

    det = Forgetful()
    b, _, queues = make(lambda: det, max_batch=1, max_wait_s=0.0)
    try:
        kept, lost = job("s1"), job("s0")
        queues[0].put(lost)
        wait_for(det.entered.is_set, what="the detector to start on the frame")
        assert lost.resolve(dropped=Drop.BACKLOG)  # its runner gave up on it meanwhile
        release.set()
        queues[1].put(kept)
        wait_for(lambda: kept.done, what="the next frame")
        assert det.forgotten == ["s0"]
    finally:
        b.stop()


def test_change_gated_looks_are_counted_in_the_metrics() -> None:
    """With detection.skip_unchanged, a still picture is looked at once and then skipped; the
    metrics say so per look."""
    from helpers import textured_background

    from stream.detect.ensemble import FrameDetector
    from stream.detect.presets import detector_config

    det = FrameDetector(detector_config("fast", providers=("cpu",), regions=True, plates=False, heads=False))
    b, m, queues = make(lambda: det, max_batch=1, max_wait_s=0.0)
    still = textured_background(64, 48)
    try:
        jobs = []
        for _ in range(4):
            now = time.monotonic()
            j = Job(Frame("s0", next(_seq), still.copy(), now, time.time()), deadline=now + 5)
            queues[0].put(j)
            wait_for(lambda j=j: j.done)
            jobs.append(j)
        assert all(j.detections is not None for j in jobs)
        wait_for(lambda: counter(m, "model_looks", look="skip") >= 3, what="skips counted")
        assert counter(m, "model_looks", look="full") == 1
        assert counter(m, "model_looks", look="skip") == det.looks["skip"] == 3
    finally:
        b.stop()
