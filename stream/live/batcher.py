"""The one detection stage shared by every live stream: frames of all streams in, batches out.

A loop thread collects jobs from the per-stream queues (up to ``max_batch``, waiting at most
``max_wait_s`` for a batch to fill, round robin so no stream starves the others) and hands each
batch to a worker that owns the detector, keeping up to ``inflight`` batches there at once (on a
GPU the next one is prepared while the current one runs). Batches are resolved in order, each
with a timeout: a run that raises or hangs fails its frames and every other batch on that worker
(the redaction stage blanks them), the worker is abandoned and a fresh detector is built in a new
one, and until it is ready frames are failed at once, so outputs stay live and blank rather than
frozen or, worse, unredacted.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from stream.config import DEFAULT_MAX_BATCH, FailClosedConfig
from stream.core.detections import Detect, Detections, FrameRef
from stream.core.frames import Drop, Failure, Job, JobQueue
from stream.core.metrics import Metrics

log = logging.getLogger(__name__)

DetectorFactory = Callable[[], Detect]


def hang_timeout_ms(fc: FailClosedConfig) -> float:
    """How long a detector run may take before it counts as hung and is rebuilt.

    Much longer than the frame deadline on purpose: late frames are already blanked by their
    deadline, and a detector that is merely slow (a loaded CPU) must not be torn down and
    reloaded, which would make it slower still.
    """
    return fc.hang_timeout_ms or max(5000.0, 4 * fc.max_latency_ms)


class Stage(Protocol):
    """What a pipeline needs of its detection stage: this process's :class:`Batcher`, or a worker's
    handle on the stage process (:class:`~stream.live.remote_stage.RemoteStage`)."""

    def start(self) -> None: ...
    def stop(self, timeout: float = 5.0) -> None: ...
    def attach(self, queue: JobQueue) -> None: ...
    def detach(self, stream_id: str) -> None: ...
    @property
    def alive(self) -> bool: ...
    @property
    def ready(self) -> bool: ...

MAX_ABANDONED = 4
"""hung workers kept waiting for their detector to return; beyond this, no new detector is built"""


class _Call:
    def __init__(self, images: list[np.ndarray], refs: list[FrameRef], notify: threading.Condition) -> None:
        self.images, self.refs = images, refs
        self.result: list[Detections] | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.started = self.finished = 0.0
        self._notify = notify

    def finish(self) -> None:
        self.finished = time.perf_counter()
        self.done.set()
        with self._notify:  # wakes the batcher loop, which may be collecting the next batch
            self._notify.notify_all()


class _Worker:
    """Two threads around one detector: one prepares batches, one runs them, in order.

    A detector with ``prepare``/``complete`` (:class:`FrameDetector`) gets the next batch
    uploaded and letterboxed while the current one runs: with two batches in flight the copies
    and resizes overlap the inference. A plain callable is simply run. The run thread builds
    the detector, since GPU libraries keep per-thread state (cuDNN's autotuned kernels).
    """

    def __init__(self, factory: DetectorFactory, on_ready: Callable[[_Worker, BaseException | None], None],
                 name: str, detector: Detect | None = None) -> None:
        self._factory, self._on_ready = factory, on_ready
        self.detector = detector
        self.ready = detector is not None
        self.abandoned = False
        self._incoming: deque[_Call] = deque()
        self._prepared: deque[tuple[_Call, Any]] = deque()
        self._wake = threading.Condition()
        self._prepare: Callable[[list[np.ndarray], list[FrameRef]], Any] | None = None
        self.name = name
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, call: _Call) -> None:
        with self._wake:
            self._incoming.append(call)
            self._wake.notify_all()

    def abandon(self) -> None:
        with self._wake:
            self.abandoned = True
            self._wake.notify_all()

    def _next(self, queue: deque) -> Any:
        with self._wake:
            while not queue and not self.abandoned:
                self._wake.wait()
            return None if self.abandoned else queue.popleft()

    def _prepare_loop(self) -> None:
        prepare = self._prepare
        while (call := self._next(self._incoming)) is not None:
            call.started = time.perf_counter()
            try:
                work = prepare(call.images, call.refs) if prepare is not None else None
            except BaseException as e:
                call.error = e
                call.finish()
                continue
            with self._wake:
                self._prepared.append((call, work))
                self._wake.notify_all()

    def _run(self) -> None:
        if self.detector is None:
            try:
                self.detector = self._factory()
            except Exception as e:  # a model that fails to load again: the batcher retries later
                self._on_ready(self, e)
                return
        complete = getattr(self.detector, "complete", None)
        prepare = getattr(self.detector, "prepare", None)
        self._prepare = prepare if complete is not None else None
        threading.Thread(target=self._prepare_loop, name=f"{self.name}-prepare", daemon=True).start()
        self.ready = True
        self._on_ready(self, None)
        while (item := self._next(self._prepared)) is not None:
            call, work = item
            try:
                if self._prepare is not None:
                    call.result = complete(work)
                else:
                    call.result = self.detector(call.images, call.refs)
                if len(call.result) != len(call.images):
                    raise RuntimeError(f"detector returned {len(call.result)} results for "
                                       f"{len(call.images)} frames")
            except BaseException as e:
                call.error = e
            call.finish()


ADMIT_SLACK = 1.2
ADMIT_MARGIN_S = 0.05
PROBE_AFTER_S = 2.0
"""with no batch finished for this long, one frame is admitted even if predicted late, so that a
stale estimate cannot shed every frame for ever"""
"""a frame is admitted when its predicted detection time, times the slack plus the margin, ends
before its deadline: room for a scheduler hiccup on a loaded machine, since a frame admitted and
then late goes out black"""


class ServiceTime:
    """How long the detector takes per frame, learned from the batches it ran.

    Admission control predicts a batch's finish with it. The prediction is pessimistic (mean plus
    two mean deviations per frame): frames differ in cost (a frame on which the plate and person
    models are due costs several times one with faces only), and a frame shed needlessly costs one
    frame of the output's rate while one admitted late costs a black frame.
    """

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.mean: float | None = None
        self.dev = 0.0

    def observe(self, seconds: float, frames: int) -> None:
        per = seconds / max(1, frames)
        if self.mean is None:
            self.mean = per
            return
        err = per - self.mean
        self.mean += self.alpha * err
        self.dev += self.alpha * (abs(err) - self.dev)

    def predict(self, frames: int) -> float:
        """Seconds a batch of ``frames`` should take; 0 before the first batch (nothing is shed)."""
        return 0.0 if self.mean is None else frames * (self.mean + 2 * self.dev)


@dataclass
class _Flight:
    """A batch handed to a worker and not yet resolved."""

    call: _Call
    jobs: list[Job]
    worker: _Worker
    deadline: float = float("inf")
    """when the oldest batch in flight counts as hung (set once it is the oldest)"""


class StreamQueues:
    """The per-stream queues a detection stage collects from, and its collecting thread: what the
    local :class:`Batcher` and a worker's :class:`~stream.live.remote_stage.RemoteStage` share.

    A queue's jobs left behind when it is detached or the stage stops are failed (the stream
    blanks them), never dropped unanswered."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._queues: dict[str, JobQueue] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def attach(self, queue: JobQueue) -> None:
        queue.notify = self.cond
        with self.cond:
            self._queues[queue.stream_id] = queue

    def detach(self, stream_id: str) -> None:
        with self.cond:
            q = self._queues.pop(stream_id, None)
            self._detached(stream_id)
        if q is not None:
            for job in q.drain():
                job.resolve(failure=Failure.DETECTOR_UNAVAILABLE)

    def _detached(self, stream_id: str) -> None:
        """Called under ``cond`` when a stream's queue goes."""

    def _end_thread(self, timeout: float) -> None:
        self._stop.set()
        with self.cond:
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _fail_queued(self) -> None:
        for q in list(self._queues.values()):
            for job in q.drain():
                job.resolve(failure=Failure.DETECTOR_UNAVAILABLE)


class Batcher(StreamQueues):
    """Collects jobs across streams and resolves each with detections or a :class:`Failure`."""

    def __init__(self, factory: DetectorFactory, metrics: Metrics, max_batch: int | None = DEFAULT_MAX_BATCH,
                 max_wait_s: float = 0.01, hang_timeout_s: float = 1.0, inflight: int | None = None) -> None:
        super().__init__()
        self.factory = factory
        self.inflight = inflight
        """batches handed to the detector at once; None: 2 on a GPU (the next one is uploaded
        and letterboxed while the current one runs), 1 on CPU (nothing to overlap: the cores
        are busy with inference, and a second batch would only wait longer)"""
        self._flights: deque[_Flight] = deque()
        self.metrics = metrics
        self.max_batch: int = max_batch or 0
        """most frames per batch; None (0 until started): 8 on a GPU, one per CPU lane on a CPU"""
        self.max_wait_s = max_wait_s
        self.hang_timeout_s = hang_timeout_s
        self._rr = 0
        self._worker: _Worker | None = None
        self._abandoned: list[_Worker] = []
        self._failures_in_row = 0
        self._retry_at = 0.0
        self._all_hung = False
        """MAX_ABANDONED runs are hung and no detector is built: said once, not at every retry"""
        self._incident: Failure | None = None
        self._incident_frames = 0
        self.batches = 0
        self._transfers = (0, 0)
        self._looks: tuple[int, dict[str, int]] = (0, {})
        """the detector (by id) whose change-gated looks were last counted, and its counts then"""
        self.service = ServiceTime()
        self._last_observed = time.monotonic()
        self._served: dict[str, float] = {}
        """per stream, when a frame of it was last admitted: shedding takes turns across streams"""
        self.on_admitted: Callable[[list[Job]], None] | None = None
        """called on the loop thread with each batch's admitted jobs (the detection stage process
        tells the stream worker that owns them); must not block"""

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Build the first detector, failing the start with its own error if it cannot load.

        It is built on the worker thread that will run it: GPU libraries keep per-thread state
        (cuDNN's autotuned kernels among it), so a detector warmed up on one thread and run on
        another would tune every shape again, for seconds, on its first real frames.
        """
        built = threading.Event()
        outcome: list[BaseException | None] = []

        def first_ready(worker: _Worker, error: BaseException | None) -> None:
            outcome.append(error)
            built.set()

        worker = _Worker(self.factory, first_ready, "detector-0")
        built.wait()
        if outcome[0] is not None:
            raise outcome[0]
        self._worker = worker
        on_cpu = getattr(worker.detector, "device", "cpu") == "cpu"
        if self.inflight is None:
            self.inflight = 1 if on_cpu else 2
        if not self.max_batch:
            # a second frame per lane would only wait for the first (benchmarks/README.md, "CPU lanes")
            lanes = getattr(worker.detector, "lanes", None)
            self.max_batch = max(1, lanes.count) if on_cpu and lanes is not None else DEFAULT_MAX_BATCH
        self.metrics.detector_up.set(1)
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._end_thread(timeout)
        if self._worker is not None:
            self._worker.abandon()
        while self._flights:
            for job in self._flights.popleft().jobs:
                job.resolve(failure=Failure.DETECTOR_UNAVAILABLE)
        self._fail_queued()

    @property
    def ready(self) -> bool:
        return self._worker is not None and self._worker.ready

    def _detached(self, stream_id: str) -> None:
        self._served.pop(stream_id, None)

    def forget(self, stream_id: str) -> None:
        """A stream's last detections never reached its tracker (the frame was given up on after the
        detector ran): the detector's cadences must not count that run."""
        worker = self._worker
        forget = getattr(worker.detector, "forget", None) if worker is not None else None
        if forget is not None:
            forget(stream_id)

    # -- the loop --------------------------------------------------------------------------------
    def _collect(self) -> list[Job]:
        with self.cond:
            first_seen: float | None = None
            while not self._stop.is_set():
                total = sum(len(q) for q in self._queues.values())
                if total >= self.max_batch:
                    break
                now = time.monotonic()
                oldest = self._flights[0] if self._flights else None
                if oldest is not None and (oldest.call.done.is_set() or now >= oldest.deadline):
                    return []  # the loop resolves it first; what is queued is taken right after
                until_oldest = oldest.deadline - now if oldest is not None else 0.2
                if total:
                    first_seen = first_seen or now
                    left = first_seen + self.max_wait_s - now
                    if left <= 0:
                        break
                    self.cond.wait(min(left, until_oldest))
                else:
                    self.cond.wait(min(0.2, until_oldest))
            queues = list(self._queues.values())
        if not queues:
            return []
        self._rr = (self._rr + 1) % len(queues)
        queues = queues[self._rr:] + queues[: self._rr]
        batch: list[Job] = []
        while len(batch) < self.max_batch:
            got = 0
            for q in queues:
                if len(batch) >= self.max_batch:
                    break
                taken = q.take(1)
                batch.extend(taken)
                got += len(taken)
            if not got:
                break
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._reap()
            if len(self._flights) >= (self.inflight or 1):
                oldest = self._flights[0]
                with self.cond:  # woken by the call finishing (or stop); re-checked under the lock
                    if not oldest.call.done.is_set() and not self._stop.is_set():
                        self.cond.wait(max(0.0, oldest.deadline - time.monotonic()))
                continue
            batch = self._collect()
            if batch:
                self._submit(batch)

    def _submit(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live = self._admit(batch, now)
        if not live:
            return
        worker = self._worker
        if worker is None or not worker.ready:
            self._maybe_rebuild()
            self._fail(live, Failure.DETECTOR_UNAVAILABLE, None)
            return
        call = _Call([j.frame.image for j in live], [FrameRef(j.frame.stream_id, j.frame.seq) for j in live],
                     self.cond)
        flight = _Flight(call, live, worker)
        if not self._flights:
            flight.deadline = now + self.hang_timeout_s
        self._flights.append(flight)
        worker.submit(call)

    def _admit(self, batch: list[Job], now: float) -> list[Job]:
        """Admission control: the jobs of ``batch`` that can be detected before their deadline.

        When the stage cannot keep up, frames that would come back after their deadline are shed
        here, before detection (and so before encoding), as dropped for ``overload``: the stream
        publishes fewer frames, each one redacted and on time, instead of spending detection on
        frames that would go out black.

        Shedding is even across streams: candidates are taken in :meth:`_fair_order` (the stream
        served longest ago first, its freshest frame first) and each is admitted if the batch with
        it still finishes before every admitted frame's deadline. Taking the most urgent frame
        first instead would shed the same streams over and over (a stream whose frames always
        arrive just before a batch forms is always the oldest in it) and leave them dark.
        """
        ahead = self._work_ahead()
        admitted: list[Job] = []
        shed: list[Job] = []
        earliest = float("inf")
        for job in self._fair_order([j for j in batch if not j.done]):
            finish = now + ADMIT_SLACK * (ahead + self.service.predict(len(admitted) + 1)) + ADMIT_MARGIN_S
            if min(earliest, job.deadline) > finish:
                admitted.append(job)
                earliest = min(earliest, job.deadline)
            else:
                shed.append(job)
        if not admitted and now - self._last_observed >= PROBE_AFTER_S:
            # everything would be shed on an estimate no batch has confirmed for a while (it may
            # have been learned on a batch of first frames, every model on every stream): let the
            # freshest frame through to measure again, rather than shed for ever
            fresh = max((j for j in shed if j.deadline > now), key=lambda j: j.deadline, default=None)
            if fresh is not None:
                shed.remove(fresh)
                admitted.append(fresh)
        for job in shed:
            job.resolve(dropped=Drop.OVERLOAD)
        for job in admitted:
            job.admitted = True
            self._served[job.frame.stream_id] = now
        if admitted and self.on_admitted is not None:
            self.on_admitted(admitted)
        # the detector gets each stream's frames in the order they were taken: its cadences count
        # source frames forward, and a stream's frame older than the last one it ran on reads as the
        # stream having started again (every model would run)
        return sorted(admitted, key=lambda j: (j.frame.captured_at, j.frame.seq))

    def _fair_order(self, jobs: list[Job]) -> list[Job]:
        """Each stream's freshest frame before any stream's second one; among those, the stream
        whose last admitted frame is oldest first (never admitted: first of all)."""
        rank: dict[str, int] = {}
        keyed = []
        for job in sorted(jobs, key=lambda j: -j.deadline):
            sid = job.frame.stream_id
            rank[sid] = rank.get(sid, -1) + 1
            keyed.append((rank[sid], self._served.get(sid, float("-inf")), -job.deadline, job))
        keyed.sort(key=lambda k: k[:3])
        return [k[3] for k in keyed]

    def _work_ahead(self) -> float:
        """Predicted seconds until the batches already in flight are done (they run in order)."""
        if not self._flights:
            return 0.0
        total = sum(self.service.predict(len(f.jobs)) for f in self._flights)
        started = self._flights[0].call.started
        return max(0.0, total - (time.perf_counter() - started if started else 0.0))

    def _reap(self) -> None:
        """Resolve the batches in flight that are done, oldest first; fail a broken one closed."""
        while self._flights:
            oldest = self._flights[0]
            error = oldest.call.error if oldest.call.done.is_set() else None
            if error is not None:
                self._abort(oldest.worker, Failure.DETECTOR_ERROR,
                            f"detector raised {type(error).__name__}: {error}", "error")
            elif oldest.call.done.is_set():
                self._flights.popleft()
                if self._flights:  # the next one now has the detector to itself
                    self._flights[0].deadline = time.monotonic() + self.hang_timeout_s
                self._settle(oldest)
            elif time.monotonic() >= oldest.deadline:
                self._abort(oldest.worker, Failure.DETECTOR_HUNG,
                            f"detector did not return within {self.hang_timeout_s * 1000:.0f} ms", "hung")
            else:
                return

    def _settle(self, flight: _Flight) -> None:
        call, live, worker = flight.call, flight.jobs, flight.worker
        self.metrics.inference_seconds.observe(call.finished - call.started)
        self.service.observe(call.finished - call.started, len(live))
        self._last_observed = time.monotonic()
        self.metrics.batch_size.observe(len(live))
        self.metrics.batch_fill.observe(len(live) / self.max_batch)
        self._count_transfers(worker.detector)
        self._count_looks(worker.detector)
        self.batches += 1
        if self._incident is not None:
            log.warning("detector recovered after %s: %d frame(s) failed closed", self._incident.value,
                        self._incident_frames)
            self._incident, self._incident_frames = None, 0
        self._failures_in_row = 0
        assert call.result is not None
        forget = getattr(worker.detector, "forget", None)
        for job, dets in zip(live, call.result, strict=True):
            if not job.resolve(detections=dets) and forget is not None:
                # the frame was given up on meanwhile (late, or dropped): its tracker never gets
                # these boxes, so the cadences must not count this run; the stream's next frame
                # runs every model
                forget(job.frame.stream_id)

    def _abort(self, worker: _Worker, why: Failure, detail: str | None, reason: str) -> None:
        """A detector that raised or hung: every batch in flight (all of them on this worker) fails
        closed, since a CUDA error leaves the device's state in doubt, and a fresh detector is
        scheduled."""
        while self._flights:
            self._fail(self._flights.popleft().jobs, why, detail)
        self._replace(worker, reason)

    def _count_transfers(self, detector: Detect | None) -> None:
        """Export the bytes the detector's GPU backends moved since the last batch."""
        totals = getattr(detector, "transfer_bytes", None)
        if totals is None:
            return
        h2d, d2h = totals()
        last_h2d, last_d2h = self._transfers
        if h2d > last_h2d:
            self.metrics.transfer_bytes.labels("h2d").inc(h2d - last_h2d)
        if d2h > last_d2h:
            self.metrics.transfer_bytes.labels("d2h").inc(d2h - last_d2h)
        self._transfers = (max(h2d, last_h2d), max(d2h, last_d2h))

    def _count_looks(self, detector: Detect | None) -> None:
        """Export the change-gated model runs since the last batch, by what the models looked at."""
        looks = getattr(detector, "looks", None)
        if not isinstance(looks, dict):
            return
        who, last = self._looks
        if who != id(detector):  # a fresh detector counts from 0
            last = {}
        for kind, n in looks.items():
            if n > last.get(kind, 0):
                self.metrics.model_looks.labels(kind).inc(n - last.get(kind, 0))
        self._looks = (id(detector), dict(looks))

    def _fail(self, jobs: list[Job], why: Failure, detail: str | None) -> None:
        for job in jobs:
            job.resolve(failure=why)
        if self._incident is None:
            self._incident = why
            log.error("detection failed (%s)%s; frames are failed closed until it recovers", why.value,
                      f": {detail}" if detail else "")
        self._incident_frames += len(jobs)

    # -- recovery --------------------------------------------------------------------------------
    def _replace(self, worker: _Worker, reason: str) -> None:
        """Abandon a worker that raised or hung and schedule a fresh detector."""
        worker.abandon()
        if worker.thread.is_alive():
            self._abandoned.append(worker)
        self._worker = None
        self.metrics.detector_up.set(0)
        self.metrics.detector_restarts.labels(reason).inc()
        self._failures_in_row += 1
        delay = min(10.0, 0.25 * 2 ** (self._failures_in_row - 1)) if self._failures_in_row > 1 else 0.0
        self._retry_at = time.monotonic() + delay * (1 + 0.2 * random.random())
        self._maybe_rebuild()

    def _maybe_rebuild(self) -> None:
        if self._worker is not None or time.monotonic() < self._retry_at:
            return
        self._abandoned = [w for w in self._abandoned if w.thread.is_alive()]
        if len(self._abandoned) >= MAX_ABANDONED:
            if not self._all_hung:
                self._all_hung = True
                log.error("%d detector runs are hung; no new detector is built until one returns "
                          "(frames stay blanked)", len(self._abandoned))
            self._retry_at = time.monotonic() + 1.0
            return
        if self._all_hung:
            self._all_hung = False
            log.warning("a hung detector run returned; building a new detector")
        with self.cond:  # held until assigned: the new worker's _worker_ready must find itself there
            self._worker = _Worker(self.factory, self._worker_ready, f"detector-{self.metrics_restarts()}")

    def metrics_restarts(self) -> int:
        return int(sum(s.value for m in self.metrics.detector_restarts.collect() for s in m.samples
                       if s.name.endswith("_total")))

    def _worker_ready(self, worker: _Worker, error: BaseException | None) -> None:
        """On the new worker's thread, once its detector is built (or failed to build)."""
        if error is not None:
            log.error("recreating the detector failed (%s: %s); retrying", type(error).__name__, error)
            with self.cond:
                if self._worker is worker:
                    self._worker = None
                    self._failures_in_row += 1
                    self._retry_at = time.monotonic() + min(10.0, 0.5 * 2 ** self._failures_in_row)
            return
        log.warning("detector recreated")
        with self.cond:
            if self._worker is worker:
                self.metrics.detector_up.set(1)
