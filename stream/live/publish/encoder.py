"""An output thread shared by RTSP push and recording: newest-wins queue, H.264, steady timestamps.

Redacted frames are handed over without blocking (the redaction stage never waits on a network
write); if the encoder falls behind, the older waiting frame is dropped and counted. Timestamps
come from each frame's capture time on one clock for the output's whole life, so they only
ever increase, across dropped frames and reconnects alike.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from fractions import Fraction

import av
import av.error
import cv2
import numpy as np

from stream.core.frames import Drop
from stream.core.metrics import Metrics

log = logging.getLogger(__name__)

TIME_BASE = Fraction(1, 90_000)


class OutputError(Exception):
    """An output that cannot be opened or written; the message names the fix, not credentials."""


class EncoderOutput:
    """Base of outputs: subclasses say how to open a container (:meth:`open_container`)."""

    kind = "output"
    keep_size = False
    """True: frames of a new size are scaled to the first size; False: the encoder restarts"""

    def __init__(self, stream_id: str, label: str, metrics: Metrics, fps: float = 25.0,
                 bitrate_kbps: int | None = None, gop_s: float = 1.0, queue_size: int = 2) -> None:
        self.stream_id = stream_id
        self.label = label
        self.metrics = metrics
        self.fps = fps
        self.bitrate_kbps = bitrate_kbps
        self.gop_s = gop_s
        self._queue: deque[tuple[np.ndarray, float]] = deque()
        self._queue_size = queue_size
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._container: av.container.OutputContainer | None = None
        self._vstream: av.VideoStream | None = None
        self._size: tuple[int, int] | None = None
        self._t0: float | None = None
        self._last_pts = -1
        self.frames_written = 0
        self.up = False

    # -- called by the redaction stage -----------------------------------------------------------
    def submit(self, image: np.ndarray, captured_at: float) -> None:
        """Queue a redacted frame; never blocks."""
        dropped = False
        with self._cond:
            if len(self._queue) >= self._queue_size:
                self._queue.popleft()
                dropped = True
            self._queue.append((image, captured_at))
            self._cond.notify()
        if dropped:
            self.metrics.frames_dropped.labels(self.stream_id, Drop.OUTPUT_BUSY.value).inc()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.kind}-{self.stream_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread ------------------------------------------------------------------------------
    def _next(self) -> tuple[np.ndarray, float] | None:
        with self._cond:
            while not self._queue and not self._stop.is_set():
                self._cond.wait(0.5)
            if self._queue:
                return self._queue.popleft()
            return None

    def _run(self) -> None:
        try:
            while True:
                item = self._next()
                if item is None:
                    break
                self.handle(*item)
        except Exception:
            log.exception("stream %s: output %s stopped on an unexpected error", self.stream_id, self.label)
        finally:
            self._close(flush=True)

    def handle(self, image: np.ndarray, captured_at: float) -> None:
        """Write one frame; subclasses decide what a failure means (retry or give up)."""
        self.write(image, captured_at)

    def write(self, image: np.ndarray, captured_at: float) -> None:
        h, w = image.shape[:2]
        size = (w - w % 2, h - h % 2)  # yuv420p needs even sides: drop a last odd row/column
        if self._container is not None and size != self._size:
            assert self._size is not None
            if self.keep_size:
                image, size = cv2.resize(image, self._size, interpolation=cv2.INTER_AREA), self._size
            else:
                log.warning("stream %s: output %s restarts at the new size %dx%d", self.stream_id,
                            self.label, *size)
                self._close(flush=True)
        if self._container is None:
            self._open(size)
        image = image[: size[1], : size[0]]
        assert self._vstream is not None and self._container is not None
        if self._t0 is None:
            self._t0 = captured_at
        pts = max(self._last_pts + 1, round((captured_at - self._t0) / TIME_BASE))
        self._last_pts = pts
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
        frame.pts = pts
        frame.time_base = TIME_BASE
        for packet in self._vstream.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1
        self.metrics.frames_sent.labels(self.stream_id, self.label).inc()
        self.metrics.latency.labels(self.stream_id, self.label).observe(time.monotonic() - captured_at)

    def _open(self, size: tuple[int, int]) -> None:
        container = self.open_container()
        try:
            vs = container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
            vs.width, vs.height = size
            vs.pix_fmt = "yuv420p"
            vs.time_base = TIME_BASE
            vs.codec_context.time_base = TIME_BASE
            vs.codec_context.gop_size = max(1, round(self.gop_s * self.fps))
            vs.codec_context.max_b_frames = 0
            opts = {"preset": "ultrafast", "tune": "zerolatency", "repeat-headers": "1"}
            if self.bitrate_kbps:
                vs.codec_context.bit_rate = self.bitrate_kbps * 1000
            else:
                opts["crf"] = "23"
            vs.options = opts
        except BaseException:
            container.close()
            raise
        self._container, self._vstream, self._size = container, vs, size
        self._set_up(True)

    def _set_up(self, up: bool) -> None:
        self.up = up
        self.metrics.output_up.labels(self.stream_id, self.label).set(1 if up else 0)

    def _close(self, flush: bool) -> None:
        container, vs = self._container, self._vstream
        self._container = self._vstream = None
        self._size = None
        if container is None:
            return
        try:
            if flush and vs is not None:
                for packet in vs.encode(None):
                    container.mux(packet)
        except (av.error.FFmpegError, OSError, ValueError):
            pass  # the peer is gone; nothing left to save
        finally:
            with contextlib.suppress(av.error.FFmpegError, OSError):
                container.close()
            self._set_up(False)

    def open_container(self) -> av.container.OutputContainer:
        raise NotImplementedError
