"""The value types that travel between live stages: a decoded frame, and a frame awaiting detection."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

from stream.core.detections import Detections
from stream.core.queues import BoundedQueue
from stream.core.yuv import Picture


@dataclass(frozen=True)
class Frame:
    """One decoded picture of one stream.

    ``captured_at`` is ``time.monotonic()`` when the frame's data arrived, where the source knows it
    (RTSP: when its packet was read), else when it left the decoder; its deadline and latency are
    measured from it. ``wall_time`` is the same instant as Unix time, for events; ``pts`` is the source's
    own timestamp in seconds (restarts when the source reconnects, so it is informative only).
    """

    stream_id: str
    seq: int
    image: Picture
    """BGR (H x W x 3 uint8) or :class:`~stream.core.yuv.I420`, as the source decoded it"""
    captured_at: float
    wall_time: float
    pts: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]


class Failure(StrEnum):
    """Why a frame got no detections; each is counted separately."""

    DETECTOR_ERROR = "detector_error"
    DETECTOR_HUNG = "detector_hung"
    DETECTOR_UNAVAILABLE = "detector_unavailable"
    DEADLINE = "deadline"


class Drop(StrEnum):
    """Why a frame was not published at all (not a safety event: nothing was shown)."""

    QUEUE_FULL = "queue_full"
    BACKLOG = "backlog"
    OVERLOAD = "overload"
    """shed by admission control: detection would have finished after the frame's deadline"""
    OUTPUT_BUSY = "output_busy"
    OUTPUT_DOWN = "output_down"
    STOPPING = "stopping"


@dataclass(eq=False)
class Job:
    """A frame and, once the batcher is done with it, its detections or the reason there are none.

    Resolved exactly once; the per-stream redaction stage waits on it until the frame's deadline.
    If no detections came by then, a frame the detector had (``admitted``) is blanked: detection
    was late; one still waiting for its turn is shed like any frame the stage had no time for.
    """

    frame: Frame
    deadline: float
    detections: Detections | None = None
    failure: Failure | None = None
    dropped: Drop | None = None
    admitted: bool = False
    """set by the batcher when the frame is handed to the detector"""
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def resolve(self, detections: Detections | None = None, failure: Failure | None = None,
                dropped: Drop | None = None) -> bool:
        """Set the outcome once; later calls are ignored and return False."""
        with self._lock:
            if self._done.is_set():
                return False
            self.detections, self.failure, self.dropped = detections, failure, dropped
            self._done.set()
            return True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None) -> bool:
        return self._done.wait(timeout)

    def expired(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.deadline


class JobQueue(BoundedQueue[Job]):
    """A per-stream queue of jobs waiting for the batcher: bounded, the newest frame wins.

    ``put`` never blocks: when full, the oldest waiting job is resolved as dropped and returned so
    the caller can count it. ``notify`` wakes whoever collects from many such queues.
    """

    def __init__(self, stream_id: str, maxsize: int, notify: threading.Condition | None = None) -> None:
        super().__init__(maxsize, drop="oldest")
        self.stream_id = stream_id
        self.notify = notify

    def put(self, job: Job) -> Job | None:
        evicted = super().put(job)
        if evicted is not None:
            evicted.resolve(dropped=Drop.QUEUE_FULL)
        if self.notify is not None:
            with self.notify:
                self.notify.notify()
        return evicted
