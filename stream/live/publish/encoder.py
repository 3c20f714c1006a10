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
from dataclasses import dataclass
from fractions import Fraction

import av
import av.error
import numpy as np

from stream.audio.codec import RATE as AUDIO_RATE
from stream.audio.codec import AudioOut
from stream.core.frames import Drop
from stream.core.h264 import H264Encoder, H264Settings, even_size
from stream.core.metrics import Metrics
from stream.core.queues import BoundedQueue
from stream.core.redact import Region
from stream.core.yuv import Picture, resize_picture

log = logging.getLogger(__name__)

TIME_BASE = Fraction(1, 90_000)
AUDIO_BACKLOG_S = 3.0
"""redacted audio waiting for the output thread beyond this is dropped, oldest first"""


class OutputError(Exception):
    """An output that cannot be opened or written; the message names the fix, not credentials."""


@dataclass(frozen=True)
class Painted:
    """What a published frame carried besides its pixels, for outputs that keep a record of it."""

    seq: int
    wall_time: float
    """when the frame was captured (seconds since the epoch)"""
    regions: tuple[Region, ...] | None
    """the regions painted over; None: the frame went out black (no detections in time)"""


class EncoderOutput:
    """Base of outputs: subclasses say how to open a container (:meth:`open_container`)."""

    kind = "output"
    keep_size = False
    """True: frames of a new size are scaled to the first size; False: the encoder restarts"""
    wants_painted = False
    """True: :meth:`submit` needs each frame's :class:`Painted` (recordings keep the masks)"""

    def __init__(self, stream_id: str, label: str, metrics: Metrics, fps: float = 25.0,
                 bitrate_kbps: int | None = None, gop_s: float = 1.0, queue_size: int = 2) -> None:
        self.stream_id = stream_id
        self.label = label
        self.metrics = metrics
        self.fps = fps
        self.bitrate_kbps = bitrate_kbps
        self.gop_s = gop_s
        self._queue: BoundedQueue[tuple[Picture, float]] = BoundedQueue(queue_size)
        self._thread: threading.Thread | None = None
        self._container: av.container.OutputContainer | None = None
        self._encoder: H264Encoder | None = None
        self._size: tuple[int, int] | None = None
        self._t0: float | None = None
        self._last_pts = -1
        self._key_at: float | None = None
        """capture time of the last keyframe this container got (zerolatency: a frame's packet comes
        out at once)"""
        self.frames_written = 0
        self.up = False
        self.audio_codec = "aac"
        self.audio_bitrate = 64_000
        self._audio: deque[tuple[np.ndarray, float]] = deque()
        self._audio_lock = threading.Lock()
        self._audio_queued = 0
        self._audio_channels = 0
        """channels of the audio the stream has (0: none yet); the container gets a track for it"""
        self._audio_out: AudioOut | None = None
        self.audio_written = 0
        """seconds of audio muxed (all containers of this output)"""
        self.audio_lead_s = 0.0
        """a container with audio starts its clock this long before its first picture, for the sound
        of that moment still on its way (held for the speech look-ahead): a recorder that starts a
        new segment keeps it instead of losing it"""

    # -- called by the redaction stage -----------------------------------------------------------
    def submit(self, image: Picture, captured_at: float, painted: Painted | None = None) -> None:
        """Queue a redacted frame; never blocks. ``painted`` is only read by outputs that want it."""
        if self._queue.put((image, captured_at)) is not None:
            why = Drop.STOPPING if self._queue.closed else Drop.OUTPUT_BUSY
            self.metrics.frames_dropped.labels(self.stream_id, why.value).inc()

    def submit_audio(self, samples: np.ndarray, t: float) -> None:
        """Queue redacted audio ([n, channels] float32 at 48 kHz) whose first sample is at stream-clock
        time ``t``; never blocks. It is muxed beside the video frames, on the output's own clock."""
        with self._audio_lock:
            self._audio_channels = samples.shape[1]
            self._audio.append((samples, t))
            self._audio_queued += len(samples)
            while self._audio_queued > AUDIO_BACKLOG_S * AUDIO_RATE and len(self._audio) > 1:
                old, _ = self._audio.popleft()
                self._audio_queued -= len(old)

    def expect_audio(self, channels: int) -> None:
        """The stream will carry audio of ``channels`` (1 or 2): open with an audio track."""
        with self._audio_lock:
            self._audio_channels = channels

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.kind}-{self.stream_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued, then close the output (within ``timeout``)."""
        self._queue.close()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:  # stopped, and the queue is written
                    break
                self.handle(*item)
        except Exception:
            log.exception("stream %s: output %s stopped on an unexpected error", self.stream_id, self.label)
        finally:
            self._close(flush=True)

    def handle(self, image: Picture, captured_at: float) -> None:
        """Write one frame; subclasses decide what a failure means (retry or give up)."""
        self.write(image, captured_at)

    def write(self, image: Picture, captured_at: float) -> None:
        size = even_size(image.shape[1], image.shape[0])  # 4:2:0: a last odd row/column is dropped
        if self._container is not None and self._audio_channels and (
                self._audio_out is None or self._audio_out.channels != self._audio_channels):
            log.info("stream %s: output %s restarts to carry the stream's audio", self.stream_id, self.label)
            self._close(flush=True)
        if self._container is not None and size != self._size:
            assert self._size is not None
            if self.keep_size:
                image, size = resize_picture(image, self._size), self._size
            else:
                log.warning("stream %s: output %s restarts at the new size %dx%d", self.stream_id,
                            self.label, *size)
                self._close(flush=True)
        if self._container is None:
            self._open(size)
        assert self._encoder is not None and self._container is not None
        if self._t0 is None:
            self._t0 = captured_at - (self.audio_lead_s if self._audio_out is not None else 0.0)
        pts = max(self._last_pts + 1, round((captured_at - self._t0) / TIME_BASE))
        self._last_pts = pts
        # keyframes every gop_s seconds of the stream, not every gop_s x fps frames: under overload a
        # stream publishes a few frames a second, and a reader joining (or recovering from a lost
        # packet) would wait for the keyframe that many frames later, 25 s at 1 frame a second
        key = self._key_at is None or captured_at - self._key_at >= self.gop_s
        for packet in self._encoder.encode(image, pts, keyframe=key):
            if packet.is_keyframe:  # forced here, or the encoder's own (gop_size frames)
                self._key_at = captured_at
            self._container.mux(packet)
        self._write_audio()
        self.frames_written += 1
        self.metrics.frames_sent.labels(self.stream_id, self.label).inc()
        self.metrics.latency.labels(self.stream_id, self.label).observe(time.monotonic() - captured_at)

    def _open(self, size: tuple[int, int]) -> None:
        container = self.open_container()
        try:
            encoder = H264Encoder(*size, self.settings(), rate=Fraction(self.fps).limit_denominator(1001),
                                  time_base=TIME_BASE, container=container)
        except BaseException:
            container.close()
            raise
        self._container, self._encoder, self._size = container, encoder, size
        if self._audio_channels:
            try:
                self._audio_out = AudioOut(container, self.audio_codec, self._audio_channels,
                                           bitrate=self.audio_bitrate)
            except (av.error.FFmpegError, ValueError) as e:  # a container that cannot hold it: video only
                log.error("stream %s: output %s cannot carry %s audio (%s); publishing video only",
                          self.stream_id, self.label, self.audio_codec, e)
                self._audio_channels = 0
        self._set_up(True)

    def _write_audio(self) -> None:
        """Mux the audio queued so far, timed on this output's clock (the first video frame is 0)."""
        with self._audio_lock:
            blocks = list(self._audio)
            self._audio.clear()
            self._audio_queued = 0
        out, container = self._audio_out, self._container
        if out is None or container is None or self._t0 is None:
            return
        for samples, t in blocks:
            if samples.shape[1] != out.channels:
                continue  # the restart for the new layout comes with the next video frame
            at = round((t - self._t0) * AUDIO_RATE)
            if at < 0:  # before this container's first picture
                samples, at = samples[-at:], 0
            if len(samples):
                for packet in out.encode(samples, at):
                    container.mux(packet)
                self.audio_written += len(samples) / AUDIO_RATE

    def settings(self) -> H264Settings:
        """Live H.264: no frame delay, headers with every keyframe (a reader may join at any one)."""
        return H264Settings(tune="zerolatency", repeat_headers=True, b_frames=0, forced_idr=True,
                            gop=max(1, round(self.gop_s * self.fps)),
                            bitrate=self.bitrate_kbps * 1000 if self.bitrate_kbps else None, crf=23)

    def _set_up(self, up: bool) -> None:
        self.up = up
        self.metrics.output_up.labels(self.stream_id, self.label).set(1 if up else 0)

    def _close(self, flush: bool) -> None:
        if flush and self._container is not None:
            with contextlib.suppress(av.error.FFmpegError, OSError, ValueError):
                self._write_audio()  # the audio that came after the last picture
        container, encoder, audio = self._container, self._encoder, self._audio_out
        self._container, self._encoder, self._audio_out = None, None, None
        self._size, self._key_at = None, None
        if container is None:
            return
        try:
            if flush and encoder is not None:
                for packet in encoder.flush():
                    container.mux(packet)
            if flush and audio is not None:
                for packet in audio.flush():
                    container.mux(packet)
        except (av.error.FFmpegError, OSError, ValueError):
            pass  # the peer is gone; nothing left to save
        finally:
            with contextlib.suppress(av.error.FFmpegError, OSError):
                container.close()
            self._set_up(False)

    def open_container(self) -> av.container.OutputContainer:
        raise NotImplementedError
