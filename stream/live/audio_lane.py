"""One live stream's audio: decoded frames in, redacted audio out to every output, in step with video.

The source thread hands over decoded frames without waiting; this lane's thread converts them
(48 kHz float), gives them a time on the same clock as the stream's video frames (the moment
their data arrived, smoothed over the stream's steady arrival offset so audio has no jitter),
redacts them and holds each redacted block until the video frames of the same moment have been
published: a viewer hears a word no earlier than the picture of its speaker, whatever the two
pipelines' delays. If the video stalls (detector down with ``withhold``), audio is released
after ``max_latency`` so the sound does not stop with it.

Fail closed: a block the lane reaches after its deadline (the lane fell behind) is muted
without being scored; a redactor error mutes what it covered. Neither passes clear speech.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np

from stream.audio.codec import RATE, AudioIn
from stream.audio.redactor import (
    AudioPolicy,
    AudioRedactConfig,
    AudioRedactor,
    MuteReason,
    Released,
    SpeechSegment,
)
from stream.audio.vad import SpeechConfig, shared_model
from stream.config.audio import AudioConfig
from stream.core.metrics import Metrics

log = logging.getLogger(__name__)

AudioSink = Callable[[np.ndarray, float], None]
"""called with each redacted block ([n, channels] float32 at 48 kHz) and the stream-clock time of
its first sample (``time.monotonic()`` seconds); must not block"""

REPORT_S = 5.0
"""while audio is muted for a fault or lateness, the muted seconds are reported at most this often"""
MAX_QUEUED_S = 5.0
"""decoded audio waiting for the lane beyond this is dropped (the lane is stuck; a bound on memory)"""


class ArrivalClock:
    """Maps a source's media timestamps to the local clock: time = media time + the smallest
    arrival offset seen. Arrival jitter only ever makes data later than that, so the minimum is
    the steady path delay; a jump of the media clock (a reconnect) starts a new offset.

    The stream's video frames keep one (their capture times are their arrival); audio with
    timestamps on the same media timeline (one RTSP session, one file) is placed with the video's
    offset, so a camera server that sends audio a second ahead of its video, as a file-backed one
    does after preroll, still comes out in sync."""

    def __init__(self, jump_s: float = 1.0) -> None:
        self.jump_s = jump_s
        self.offset: float | None = None

    def time(self, media: float | None, arrived: float) -> float:
        if media is None:
            return arrived
        lag = arrived - media
        if self.offset is None or lag < self.offset or lag - self.offset > self.jump_s:
            self.offset = lag
        return media + self.offset


class AudioLane:
    """Redacts one stream's audio on its own thread and feeds ``sinks`` in step with the video."""

    def __init__(self, stream_id: str, config: AudioConfig, metrics: Metrics, max_latency_s: float,
                 on_speech: Callable[[SpeechSegment], None] | None = None,
                 on_muted: Callable[[str, float], None] | None = None,
                 video_clock: ArrivalClock | None = None, model_dir: Path | None = None) -> None:
        """``video_clock``: the clock of the stream's video frames, for audio whose media times are on
        the video's timeline (see :meth:`on_audio`)."""
        self.stream_id = stream_id
        self.config = config
        self.policy = AudioPolicy(config.policy)
        # loaded now: a missing speech detector stops the stream from starting, with the fix named,
        # instead of failing on every block once audio flows
        self._model = shared_model(model_dir) if self.policy in (AudioPolicy.MUTE_SPEECH,
                                                                 AudioPolicy.DISGUISE) else None
        self.metrics = metrics
        self.max_latency_s = max_latency_s
        self.on_speech = on_speech
        self.on_muted = on_muted
        self.sinks: list[AudioSink] = []
        self.key = secrets.randbits(32)
        """the disguise key: random per stream and per start, never logged"""
        self.channels = 0
        """1 or 2 once audio has arrived; outputs add an audio track from then on"""
        self._in = AudioIn()
        self._clock = ArrivalClock()
        self.video_clock = video_clock
        self._redactor: AudioRedactor | None = None
        self._cond = threading.Condition()
        self._inbox: deque[tuple[av.AudioFrame, float, float | None]] = deque()
        self._queued_s = 0.0
        self._held: deque[Released] = deque()
        self._video_mark: float | None = None
        """the capture time of the newest published video frame"""
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"audio-{stream_id}", daemon=True)
        self.delay_s = 0.0
        self._faults_seen = 0
        self._muted: dict[MuteReason, list[Any] | None] = {}
        """samples muted for a fault or lateness not yet reported, and since when"""
        for r in ("kept", *MuteReason):
            metrics.audio_seconds.labels(stream_id, str(r))
        metrics.audio_faults.labels(stream_id)
        metrics.audio_speech_segments.labels(stream_id)

    # -- called by the source and the video side ---------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Flush what is held (the tail is scored against silence) and stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def on_audio(self, frame: av.AudioFrame, arrived: float | None = None,
                 media: float | None = None) -> None:
        """A decoded frame from the source; never blocks. ``media``: its time (seconds) on the timeline
        of the video frames' ``pts``, where the source has one; else it is timed by its arrival."""
        now = time.monotonic()
        seconds = frame.samples / max(1, frame.sample_rate)
        with self._cond:
            if self._stopping:
                return
            self._inbox.append((frame, now if arrived is None else min(arrived, now), media))
            self._queued_s += seconds
            while self._queued_s > MAX_QUEUED_S and len(self._inbox) > 1:  # stuck: drop the oldest
                old, _, _ = self._inbox.popleft()
                self._queued_s -= old.samples / max(1, old.sample_rate)
                self.metrics.audio_seconds.labels(self.stream_id, MuteReason.LATE.value).inc(
                    old.samples / max(1, old.sample_rate))
            self._cond.notify()

    def video_published(self, captured_at: float) -> None:
        """The video frame captured at ``captured_at`` went out: audio up to then may follow."""
        with self._cond:
            if self._video_mark is None or captured_at > self._video_mark:
                self._video_mark = captured_at
                if self._held:
                    self._cond.notify()

    # -- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._inbox and not self._stopping:
                    self._cond.wait(0.02 if self._held else 0.5)
                batch = list(self._inbox)
                self._inbox.clear()
                self._queued_s = 0.0
                stopping = self._stopping
            try:
                for frame, arrived, media in batch:
                    self._take(frame, arrived, media)
                if stopping and self._redactor is not None:
                    for r in self._redactor.flush():
                        self._held.append(r)
                        self._account(r)
                    self._report_muted()
            except Exception:
                log.exception("stream %s: audio lane failed; its audio is dropped until the next frame",
                              self.stream_id)
                self.metrics.audio_faults.labels(self.stream_id).inc()
            self._release(everything=stopping)
            if stopping:
                return

    def _take(self, frame: av.AudioFrame, arrived: float, media: float | None) -> None:
        video = self.video_clock.offset if self.video_clock is not None else None
        if media is not None and video is not None:
            t = media + video
        else:
            t = self._clock.time(float(frame.time) if frame.time is not None else None, arrived)
        samples = self._in.convert(frame)
        if not len(samples):
            return
        if self._redactor is None or self._redactor.channels != self._in.channels:
            self._redactor = self._make_redactor(self._in.channels)
        # a block this far behind cannot be scored and still go out in time: muted, never clear
        late = time.monotonic() - t > self.max_latency_s + self.delay_s
        for r in self._redactor.push(samples, t, late=late):
            self._held.append(r)
            self._account(r)

    def _make_redactor(self, channels: int) -> AudioRedactor:
        cfg = AudioRedactConfig(policy=self.policy, lookahead_s=self.config.lookahead_ms / 1000,
                                speech=SpeechConfig(start=self.config.speech_threshold,
                                                    stop=min(self.config.speech_threshold,
                                                             max(0.05, self.config.speech_threshold - 0.15))),
                                key=self.key)
        red = AudioRedactor(RATE, channels, cfg, model=self._model, on_segment=self._segment,
                            stream_id=self.stream_id)
        self._faults_seen = 0
        self.channels = channels
        self.delay_s = red.delay_s
        self.metrics.audio_delay.labels(self.stream_id).set(red.delay_s)
        return red

    def _account(self, r: Released) -> None:
        n = len(r.samples)
        muted = sum(r.muted.values())
        self.metrics.audio_seconds.labels(self.stream_id, "kept").inc(max(0, n - muted) / RATE)
        for reason, k in r.muted.items():
            self.metrics.audio_seconds.labels(self.stream_id, reason.value).inc(k / RATE)
        assert self._redactor is not None
        if self._redactor.faults > self._faults_seen:
            self.metrics.audio_faults.labels(self.stream_id).inc(self._redactor.faults - self._faults_seen)
            self._faults_seen = self._redactor.faults
        now = time.monotonic()
        for reason in (MuteReason.FAULT, MuteReason.LATE):
            k = r.muted.get(reason, 0)
            if k:
                if self._muted.get(reason) is None:
                    self._muted[reason] = [0, now]
                self._muted[reason][0] += k
            # one report when the stretch ends, and one every REPORT_S while it lasts
            pending = self._muted.get(reason)
            if pending is not None and (not k or now - pending[1] >= REPORT_S):
                if self.on_muted is not None:
                    self.on_muted(reason.value, pending[0] / RATE)
                self._muted[reason] = None if not k else [0, now]

    def _report_muted(self) -> None:
        for reason, pending in self._muted.items():
            if pending is not None and pending[0] and self.on_muted is not None:
                self.on_muted(reason.value, pending[0] / RATE)
        self._muted.clear()

    def _segment(self, seg: SpeechSegment) -> None:
        self.metrics.audio_speech_segments.labels(self.stream_id).inc()
        if self.on_speech is not None:
            self.on_speech(seg)

    def _release(self, everything: bool = False) -> None:
        """Hand held blocks to the sinks once the video of their time is out (or is overdue)."""
        now = time.monotonic()
        with self._cond:
            mark = self._video_mark
        while self._held:
            r = self._held[0]
            end = r.t + len(r.samples) / RATE
            overdue = now - end > self.max_latency_s
            if not (everything or overdue or (mark is not None and end <= mark + 0.02)):
                break
            self._held.popleft()
            for sink in list(self.sinks):
                try:
                    sink(r.samples, r.t)
                except Exception:
                    log.exception("stream %s: an audio output failed", self.stream_id)

    def status(self) -> dict[str, Any]:
        return {"policy": self.policy.value, "channels": self.channels,
                "delay_ms": round(self.delay_s * 1000),
                "faults": self._redactor.faults if self._redactor is not None else 0}
