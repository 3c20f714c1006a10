"""Two batches in flight: the next batch is prepared while the current one runs, results stay in
order, and a detector that raises or hangs fails every batch it holds closed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from live_helpers import counter, wait_for

from stream.core.detections import Detections, FrameRef
from stream.core.frames import Failure, Frame, Job, JobQueue
from stream.core.metrics import Metrics
from stream.live.batcher import Batcher

_seq = iter(range(1, 1 << 30))


def job(stream: str, value: int = 0) -> Job:
    """A job whose frame carries ``value`` in its pixels, so a result can be traced to its frame."""
    now = time.monotonic()
    image = np.full((8, 8, 3), value % 256, np.uint8)
    return Job(Frame(stream, next(_seq), image, now, time.time()), deadline=now + 30)


class Split:
    """A detector with the prepare/complete halves; ``complete`` can be held, made to raise or hang."""

    device = "cpu"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.prepared = 0
        self.completing = False
        self.overlaps = 0
        """prepare calls that ran while a complete was running"""
        self.hold = threading.Event()
        self.hold.set()
        self.second_prepared = threading.Event()
        self.fail_complete: BaseException | None = None
        self.fail_prepare: BaseException | None = None
        self.hang: threading.Event | None = None

    def prepare(self, images: list[np.ndarray], refs: list[FrameRef]) -> list[int]:
        with self.lock:
            self.prepared += 1
            if self.completing:
                self.overlaps += 1
            if self.prepared >= 2:
                self.second_prepared.set()
        if self.fail_prepare is not None:
            raise self.fail_prepare
        return [int(im[0, 0, 0]) for im in images]

    def complete(self, values: list[int]) -> list[Detections]:
        with self.lock:
            self.completing = True
        try:
            if self.hang is not None:
                self.hang.wait()
            self.hold.wait(10)
            if self.fail_complete is not None:
                raise self.fail_complete
            boxes = np.array([[v, v, v + 1, v + 1] for v in values], np.float32).reshape(-1, 4)
            return [Detections(boxes[i:i + 1], np.ones(1, np.float32), ("face",)) for i in range(len(values))]
        finally:
            with self.lock:
                self.completing = False

    def __call__(self, images: list[np.ndarray], refs: list[FrameRef]) -> list[Detections]:
        return self.complete(self.prepare(images, refs))


def first_one(configure: Callable[[Split], None]) -> tuple[Callable[[], Split], list[Split]]:
    """A detector factory whose first detector is set up by ``configure``; rebuilt ones are plain."""
    built: list[Split] = []

    def factory() -> Split:
        d = Split()
        if not built:
            configure(d)
        built.append(d)
        return d

    return factory, built


@pytest.fixture
def released() -> Iterator[list[threading.Event]]:
    events: list[threading.Event] = []
    yield events
    for ev in events:
        ev.set()  # let any held or hung detector thread finish


def make(factory, **kw) -> tuple[Batcher, Metrics, JobQueue]:
    m = Metrics()
    b = Batcher(factory, m, **kw)
    q = JobQueue("s0", 64)
    b.attach(q)
    b.start()
    return b, m, q


def test_the_next_batch_is_prepared_while_the_current_one_runs(released: list[threading.Event]) -> None:
    det = Split()
    det.hold.clear()
    released.append(det.hold)
    b, _, q = make(lambda: det, max_batch=1, max_wait_s=0.0, inflight=2)
    try:
        first, second = job("s0", 1), job("s0", 2)
        q.put(first)
        wait_for(lambda: det.completing, what="the first batch to run")
        q.put(second)
        # the first batch is held inside complete(): only a second batch in flight gets prepared now
        wait_for(det.second_prepared.is_set, what="the second batch prepared during the first one's run")
        assert det.overlaps == 1 and not first.done
        det.hold.set()
        wait_for(lambda: first.done and second.done, what="both batches")
        assert first.detections is not None and second.detections is not None
        assert first.detections.boxes[0, 0] == 1 and second.detections.boxes[0, 0] == 2
    finally:
        b.stop()


def test_one_in_flight_never_prepares_during_a_run() -> None:
    det = Split()
    b, _, q = make(lambda: det, max_batch=1, max_wait_s=0.0, inflight=1)
    try:
        jobs = [job("s0", i) for i in range(30)]
        for j in jobs:
            q.put(j)
        wait_for(lambda: all(j.done for j in jobs), what="every job")
        assert det.prepared >= 2 and det.overlaps == 0
    finally:
        b.stop()


def test_results_stay_with_their_frames_with_two_in_flight() -> None:
    det = Split()
    b, _, q = make(lambda: det, max_batch=3, max_wait_s=0.0, inflight=2)
    try:
        jobs = []
        for i in range(60):
            j = job("s0", i)
            jobs.append(j)
            q.put(j)
        wait_for(lambda: all(j.done for j in jobs), what="every job")
        assert all(j.detections is not None and j.detections.boxes[0, 0] == i for i, j in enumerate(jobs))
        assert b.batches >= 20
    finally:
        b.stop()


def test_an_error_fails_every_batch_in_flight_closed(released: list[threading.Event]) -> None:
    def fails(d: Split) -> None:
        d.hold.clear()
        released.append(d.hold)
        d.fail_complete = RuntimeError("CUDA error: an illegal memory access was encountered")

    factory, built = first_one(fails)
    b, m, q = make(factory, max_batch=1, max_wait_s=0.0, inflight=2)
    try:
        first, second = job("s0", 1), job("s0", 2)
        q.put(first)
        wait_for(lambda: built[0].completing, what="the first batch to run")
        q.put(second)
        wait_for(built[0].second_prepared.is_set, what="the second batch in flight")
        built[0].hold.set()
        wait_for(lambda: first.done and second.done, what="both batches")
        # the second batch never ran on the failed device, but its detector is not trusted either
        assert first.failure is Failure.DETECTOR_ERROR and first.detections is None
        assert second.failure is Failure.DETECTOR_ERROR and second.detections is None
        assert counter(m, "detector_restarts", reason="error") == 1

        def recovered() -> bool:
            j = job("s0", 7)
            q.put(j)
            wait_for(lambda: j.done)
            return j.detections is not None

        wait_for(recovered, what="a recreated detector")
    finally:
        b.stop()


def test_a_hang_fails_every_batch_in_flight_closed_in_time(released: list[threading.Event]) -> None:
    def hangs(d: Split) -> None:
        d.hang = threading.Event()
        released.append(d.hang)

    factory, _ = first_one(hangs)
    b, m, q = make(factory, max_batch=1, max_wait_s=0.0, inflight=2, hang_timeout_s=0.3)
    try:
        first, second = job("s0", 1), job("s0", 2)
        q.put(first)
        q.put(second)
        wait_for(lambda: first.done and second.done, timeout=5, what="both batches failed")
        assert first.failure is Failure.DETECTOR_HUNG and second.failure is Failure.DETECTOR_HUNG
        assert counter(m, "detector_restarts", reason="hung") == 1

        def recovered() -> bool:
            j = job("s0", 9)
            q.put(j)
            wait_for(lambda: j.done)
            return j.detections is not None and j.detections.boxes[0, 0] == 9

        wait_for(recovered, what="a fresh detector after the hang")
    finally:
        b.stop()


def test_a_batch_that_cannot_be_prepared_fails_closed() -> None:
    def fails(d: Split) -> None:
        d.fail_prepare = RuntimeError("CUDA error: out of memory")

    factory, _ = first_one(fails)
    b, m, q = make(factory, max_batch=1, max_wait_s=0.0, inflight=2)
    try:
        first = job("s0", 1)
        q.put(first)
        wait_for(lambda: first.done)
        assert first.failure is Failure.DETECTOR_ERROR and first.detections is None
        assert counter(m, "detector_restarts", reason="error") == 1
    finally:
        b.stop()


def test_stop_resolves_the_batches_in_flight(released: list[threading.Event]) -> None:
    det = Split()
    det.hold.clear()
    released.append(det.hold)
    b, _, q = make(lambda: det, max_batch=1, max_wait_s=0.0, inflight=2)
    first, second = job("s0", 1), job("s0", 2)
    q.put(first)
    wait_for(lambda: det.completing, what="the first batch to run")
    q.put(second)
    wait_for(det.second_prepared.is_set, what="the second batch in flight")
    b.stop(timeout=1)
    assert first.failure is Failure.DETECTOR_UNAVAILABLE and second.failure is Failure.DETECTOR_UNAVAILABLE


@pytest.mark.parametrize(("device", "expected"), [("cpu", 1), ("cuda:0", 2)])
def test_two_in_flight_by_default_on_a_gpu_only(device: str, expected: int) -> None:
    det = Split()
    det.device = device  # type: ignore[misc]
    b, _, _ = make(lambda: det)
    try:
        assert b.inflight == expected
    finally:
        b.stop()
