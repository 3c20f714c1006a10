"""The live pipeline: sources -> per-stream queues -> one shared batcher -> per-stream redaction -> outputs.

Each stream owns a source thread, a redaction thread and its output threads; all streams share
the batcher. The redaction thread takes its stream's frames strictly in order and waits for
each one's detections only until the frame's deadline: a frame with no detections by then
(detector failed, hung, or too slow) is published black or withheld, never as it came in. That
wait is the only place a frame can leave for an output, which is what makes the rule hold.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import av
import numpy as np

from stream.audio.redactor import SpeechSegment
from stream.config import (
    FileOutputConfig,
    FileSourceConfig,
    PipelineConfig,
    RecordOutputConfig,
    RtspOutputConfig,
    StreamConfig,
    WhipSourceConfig,
)
from stream.config.events import state_dir
from stream.config.privacy import OPTIONAL_LABELS, ZoneConfig, zone_set
from stream.core.detections import Detections
from stream.core.frames import Drop, Failure, Frame, Job, JobQueue
from stream.core.masking import NOT_OBSERVED, MaskingStage
from stream.core.metrics import Metrics
from stream.core.observe import Observer
from stream.core.queues import BoundedQueue
from stream.core.redact import Redactor
from stream.core.track import Seen, TrackChanges, Tracker
from stream.core.urls import origins_only
from stream.core.yuv import Picture
from stream.live.audio_lane import ArrivalClock, AudioLane
from stream.live.batcher import Batcher, DetectorFactory, Stage, hang_timeout_ms
from stream.live.gpu import GpuMonitor, start_gpu_monitor
from stream.live.publish.encoder import EncoderOutput, Painted
from stream.live.publish.file import FileOutput
from stream.live.publish.record import RecordOutput
from stream.live.publish.rtsp import RtspOutput
from stream.live.shard import Shard
from stream.live.sources.base import PushedSource, Source
from stream.live.sources.file import FileSource
from stream.live.sources.rtsp import RtspSource
from stream.live.zone_store import ZoneStore

log = logging.getLogger(__name__)


class StreamLimit(Exception):
    """No room for another stream (``api.max_streams``)."""



def model_families(pipeline: PipelineConfig) -> list[str]:
    """The models the shared detector runs (face model names, ``plate``, ``person``), from the same
    one conversion the detector is built from: what a recording's manifests name."""
    s = pipeline.detection.detector_settings(classes=pipeline.privacy_classes())
    return [*s.faces, *(["plate"] if s.plate is not None else []),
            *(["person"] if s.person_heads is not None else [])]


class StreamRunner:
    """One stream: receives frames from its source, redacts them in order, feeds its outputs."""

    def __init__(self, config: StreamConfig, pipeline: PipelineConfig, batcher: Stage, metrics: Metrics,
                 outputs: list[EncoderOutput] | None = None, observers: list[Observer] | None = None) -> None:
        self.config = config
        self.id = config.id
        self.metrics = metrics
        self.batcher = batcher
        self.max_latency_s = pipeline.fail_closed.max_latency_ms / 1000
        self.action = pipeline.fail_closed.action
        self.queue = JobQueue(self.id, pipeline.queue_size)
        self.backlog = pipeline.queue_size + 2 * pipeline.batcher.batch_bound() + 8
        # live frames cannot wait for later ones: no look-back
        self.stage = MaskingStage(Tracker(pipeline.redaction.tracker_config()),
                                  Redactor(pipeline.redaction.redact_config()), lookback=0,
                                  zones=zone_set(config.zones))
        self.configured_zones = config.zones
        """the zones the stream was defined with (config file or API add), before any saved ones"""
        self._unwanted = np.array(sorted(OPTIONAL_LABELS - config.privacy.labels))
        """labels the shared detector reports for other streams that this one does not mask"""
        self._models = model_families(pipeline)
        self.audio: AudioLane | None = None
        """the stream's audio redaction (None with ``audio.policy: drop``)"""
        self.media_clock = ArrivalClock()
        """media time -> capture time of the video frames (audio on their timeline follows it)"""
        if config.audio.policy != "drop":
            self.audio = AudioLane(self.id, config.audio, metrics, self.max_latency_s,
                                   on_speech=self._speech, on_muted=self._audio_muted,
                                   video_clock=self.media_clock, model_dir=pipeline.detection.model_dir)
        self.outputs = outputs if outputs is not None else self._make_outputs()
        if self.audio is not None:
            for out in self.outputs:
                out.audio_bitrate = config.audio.bitrate_kbps * 1000
                if isinstance(out, RtspOutput):
                    out.audio_codec = config.audio.codec
                self.audio.sinks.append(out.submit_audio)
        self.source = self._make_source()
        self.state = "starting"
        self.error: str | None = None
        self.size: tuple[int, int] | None = None
        self.seq = 0
        self.published = 0
        self.blanked = 0
        self.last_frame_at: float | None = None
        self._last_out: float | None = None
        """when a frame last left for the outputs (redacted or black), or the first frame arrived"""
        self._tracked_seq: int | None = None
        self._latency_ms: float | None = None
        self.recent: deque[dict[str, Any]] = deque(maxlen=8)
        """the latest new tracks (label, id, score, time): what the control room lists per stream"""
        self._ordered: BoundedQueue[Job] = BoundedQueue(self.backlog)
        """every accepted frame in source order, until published or dropped; closed by :meth:`stop`"""
        self._incident: Failure | None = None
        self._incident_frames = 0
        self._thread = threading.Thread(target=self._redact_loop, name=f"redact-{self.id}", daemon=True)
        self.on_redacted: list[Callable[[Frame, Picture, Detections], None]] = []
        """hooks called with each published frame and its painted image (viewers); must not block. The
        image is of the kind the source decoded (BGR or I420) and must not be modified"""
        self.observers: list[Observer] = observers if observers is not None else []
        m = metrics
        m.queue_depth.labels(self.id).set_function(lambda: len(self.queue))
        m.stream_up.labels(self.id).set(0)
        for label in ("face", "plate"):
            m.detections.labels(self.id, label)
        for why in Failure:
            (m.frames_blanked if self.action == "blank" else m.frames_withheld).labels(self.id, why.value)
        for d in Drop:
            m.frames_dropped.labels(self.id, d.value)

    def _make_outputs(self) -> list[EncoderOutput]:
        outs: list[EncoderOutput] = []
        kinds = [o.type for o in self.config.outputs]
        for i, o in enumerate(self.config.outputs):
            label = o.type if kinds.count(o.type) == 1 else f"{o.type}{i}"
            if isinstance(o, RtspOutputConfig):
                outs.append(RtspOutput(self.id, label, o, self.metrics))
            elif isinstance(o, FileOutputConfig):
                outs.append(FileOutput(self.id, label, o, self.metrics))
            elif isinstance(o, RecordOutputConfig):
                outs.append(RecordOutput(self.id, label, o, self.metrics, stream=lambda: self.config,
                                         audit=self._recording_audit, models=self._models))
        return outs

    def _recording_audit(self, action: str, fields: dict[str, Any]) -> None:
        self._notify("recording", self.id, action, fields)

    def _make_source(self) -> Source:
        src = self.config.source
        if isinstance(src, FileSourceConfig):
            return FileSource(self.id, src, self)
        if isinstance(src, WhipSourceConfig):
            return PushedSource(self.id, self)
        return RtspSource(self.id, src, self)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.batcher.attach(self.queue)
        for out in self.outputs:
            out.start()
        if self.audio is not None:
            self.audio.start()
        self._thread.start()
        self.source.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the source, publish what is already accepted, then close the outputs."""
        deadline = time.monotonic() + timeout
        self.source.stop()
        self.source.join(max(0.1, deadline - time.monotonic()))
        self._ordered.close()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        self.batcher.detach(self.id)
        if self.audio is not None:  # the held tail goes to the outputs before they close
            self.audio.stop(max(0.1, min(2.0, deadline - time.monotonic())))
        for out in self.outputs:
            out.stop(max(0.1, deadline - time.monotonic()))
        self._end_incident()
        if self.state != "ended":
            self.state = "stopped"
            self._notify("state", self.id, "stopped", None)
        self.metrics.stream_up.labels(self.id).set(0)

    # -- SourceHandler ---------------------------------------------------------------------------
    def on_frame(self, image: Picture, pts: float | None, arrived: float | None = None) -> None:
        now = time.monotonic()
        # the deadline and the latency count from when the frame's data arrived (RTSP: the packet
        # was read), so decoding and any decoder delay use up the frame's time too
        captured = now if arrived is None else min(arrived, now)
        if pts is not None:
            self.media_clock.time(pts, captured)
        self.seq += 1
        frame = Frame(self.id, self.seq, image, captured, time.time() - (now - captured), pts)
        job = Job(frame, deadline=captured + self.max_latency_s)
        self.last_frame_at = now
        if self._last_out is None:
            self._last_out = now
        self.metrics.frames_in.labels(self.id).inc()
        overflow = self._ordered.put(job)
        if overflow is job:  # stopped: nothing more is published
            job.resolve(dropped=Drop.STOPPING)
            self.metrics.frames_dropped.labels(self.id, Drop.STOPPING.value).inc()
            return
        if overflow is not None and overflow.resolve(dropped=Drop.BACKLOG):
            self.metrics.frames_dropped.labels(self.id, Drop.BACKLOG.value).inc()
        if self.queue.put(job) is not None:
            self.metrics.frames_dropped.labels(self.id, Drop.QUEUE_FULL.value).inc()

    @property
    def wants_audio(self) -> bool:
        return self.audio is not None

    def on_audio(self, frame: av.AudioFrame, arrived: float | None = None,
                 media: float | None = None) -> None:
        if self.audio is not None:
            self.audio.on_audio(frame, arrived, media)

    def on_audio_track(self, channels: int) -> None:
        if self.audio is not None:
            for out in self.outputs:
                out.expect_audio(1 if channels == 1 else 2)

    def _speech(self, seg: SpeechSegment) -> None:
        now, wall = time.monotonic(), time.time()
        self._notify("speech", self.id, wall - (now - seg.start), wall - (now - seg.end), seg.probability,
                     self.config.audio.policy)

    def _audio_muted(self, reason: str, seconds: float) -> None:
        self._notify("audio_muted", self.id, reason, seconds)

    def on_up(self, width: int, height: int, codec: str) -> None:
        if self.size is not None and self.size != (width, height):
            log.warning("stream %s: source is now %dx%d %s (was %dx%d)", self.id, width, height, codec,
                        *self.size)
        self.size = (width, height)
        self.state, self.error = "up", None
        self.metrics.stream_up.labels(self.id).set(1)
        log.info("stream %s: up, %dx%d %s", self.id, width, height, codec)
        self._notify("state", self.id, "up", None)

    def on_down(self, kind: str, message: str) -> None:
        was = self.state
        self.state, self.error = "down", message
        self.metrics.stream_up.labels(self.id).set(0)
        self.metrics.source_errors.labels(self.id, kind).inc()
        if was != "down":  # once per outage, not once per retry
            self._notify("state", self.id, "down", message)

    def on_reconnect(self) -> None:
        self.metrics.reconnects.labels(self.id, "source").inc()

    def on_end(self) -> None:
        self.state = "ended"
        self.metrics.stream_up.labels(self.id).set(0)
        log.info("stream %s: source ended", self.id)
        self._notify("state", self.id, "ended", None)

    def _notify(self, method: str, *args: Any) -> None:
        for obs in list(self.observers):
            try:
                getattr(obs, method)(*args)
            except Exception:
                log.exception("stream %s: observer %s.%s failed", self.id, type(obs).__name__, method)

    # -- redaction: the only way out --------------------------------------------------------------
    def _redact_loop(self) -> None:
        while True:
            job = self._ordered.peek()
            if job is None:  # stopped, and every accepted frame is out
                return
            if not job.wait(max(0.0, job.deadline - time.monotonic())):
                # no-op if it was resolved just now; a frame the detector never got is shed (the
                # stage had no time for it), one it had is late: blanked
                if job.admitted:
                    job.resolve(failure=Failure.DEADLINE)
                else:
                    job.resolve(dropped=Drop.OVERLOAD)
            self._ordered.pop_if_head(job)
            try:
                self._finish(job)
            except Exception:
                # a bug while painting must not publish the frame; the frame is lost, the stream goes on
                log.exception("stream %s: redaction failed; frame %d not published", self.id, job.frame.seq)

    def _finish(self, job: Job) -> None:
        if job.dropped is Drop.OVERLOAD and not self._starved():
            self.metrics.frames_dropped.labels(self.id, Drop.OVERLOAD.value).inc()
            return  # shed by admission control: the next frame that makes its deadline goes out
        if job.dropped is not None and job.dropped is not Drop.OVERLOAD:
            return  # counted where it was dropped; nothing is published
        frame = job.frame
        dets = job.detections
        if dets is not None:
            self._end_incident()
            if len(self._unwanted) and len(dets):
                dets = dets.select(~np.isin(np.asarray(dets.labels), self._unwanted))
        # painted in place: no copy on the hot path, and no unredacted copy left for any hook to see;
        # a frame without detections comes out black (look-back 0: exactly one frame out per frame in)
        (masked,) = self.stage.push(frame.seq, frame.image, dets, elapsed=self._elapsed(frame),
                                    seen=Seen.of(frame))
        tracks = self.stage.tracker.changes
        if self.stage.cut:
            self.metrics.shot_cuts.labels(self.id).inc()
        if masked.failed:
            self._fail_closed(job, job.failure or Failure.DEADLINE, masked.image, tracks)
            return
        for r in masked.regions:
            self.metrics.detections.labels(self.id, r.label).inc()
        self._note_new_tracks(frame, tracks)
        self._publish(frame, masked.image, masked.dets)
        self._notify("frame", frame, masked.dets, None, tracks)

    def set_zones(self, zones: list[ZoneConfig]) -> list[ZoneConfig]:
        """Paint ``zones`` from the next frame on (replacing the stream's zones); the old ones."""
        old = self.config.zones
        self.config = self.config.model_copy(update={"zones": list(zones)})
        self.stage.zones = zone_set(self.config.zones)
        return old

    def _starved(self) -> bool:
        """Nothing went out for a whole ``max_latency_ms``: even one frame in that time could not be
        served, so the stream fails closed (a black frame) instead of freezing without a sign."""
        return self._last_out is not None and time.monotonic() - self._last_out >= self.max_latency_s

    def _elapsed(self, frame: Frame) -> int:
        """Source frames since the last tracked one: dropped frames still moved the objects."""
        last, self._tracked_seq = self._tracked_seq, frame.seq
        return frame.seq - last if last is not None and frame.seq > last else 1

    def _note_new_tracks(self, frame: Frame, tracks: TrackChanges) -> None:
        for t in tracks.started:
            self.recent.append({"time": round(frame.wall_time, 3), "label": t.label, "track_id": t.track_id,
                                "score": round(t.score, 3)})

    def _fail_closed(self, job: Job, why: Failure, black: Picture, tracks: TrackChanges) -> None:
        self._incident_frames += 1
        if self._incident is None:
            self._incident = why
            log.error("stream %s: no detections for frame %d (%s); frames are %s until detection is back",
                      self.id, job.frame.seq, why.value, "blanked" if self.action == "blank" else "withheld")
            self._notify("incident", self.id, why, 1, False, self.action)
        if self.action == "withhold":
            self.metrics.frames_withheld.labels(self.id, why.value).inc()
            self._last_out = time.monotonic()  # the starvation window starts again
        else:
            self.metrics.frames_blanked.labels(self.id, why.value).inc()
            self.blanked += 1
            self._publish(job.frame, black, NOT_OBSERVED)
        self._notify("frame", job.frame, NOT_OBSERVED, why, tracks)

    def _end_incident(self) -> None:
        if self._incident is not None:
            log.warning("stream %s: detection back after %d frame(s) failed closed (%s)", self.id,
                        self._incident_frames, self._incident.value)
            self._notify("incident", self.id, self._incident, self._incident_frames, True, self.action)
            self._incident, self._incident_frames = None, 0

    def _publish(self, frame: Frame, image: Picture, dets: Detections) -> None:
        ms = (time.monotonic() - frame.captured_at) * 1000
        self._latency_ms = ms if self._latency_ms is None else 0.9 * self._latency_ms + 0.1 * ms
        self.published += 1
        self._last_out = time.monotonic()
        self.metrics.frames_published.labels(self.id).inc()
        painted = None
        if any(out.wants_painted for out in self.outputs):  # recordings keep what was painted
            h, w = image.shape[:2]
            regions = None if dets is NOT_OBSERVED else tuple(self.stage.redactor.regions(dets, w, h))
            painted = Painted(frame.seq, frame.wall_time, regions)
        for out in self.outputs:
            out.submit(image, frame.captured_at, painted)
        for hook in self.on_redacted:
            hook(frame, image, dets)
        if self.audio is not None:
            self.audio.video_published(frame.captured_at)

    def status(self) -> dict[str, Any]:
        from stream.core.metrics import sample

        m, sid = self.metrics, self.id
        name = "stream_redact_frames_dropped_total"
        dropped = sum(sample(m, name, stream=sid, reason=d.value) for d in Drop)
        return {
            # open (/readyz) and shown on the page: a URL's path or query may carry a token
            "id": sid, "state": self.state, "error": None if self.error is None else origins_only(self.error),
            "size": self.size,
            "frames_in": self.seq, "published": self.published, "blanked": self.blanked,
            "dropped": int(dropped), "queue": len(self.queue),
            "latency_ms": None if self._latency_ms is None else round(self._latency_ms, 1),
            "recent": list(self.recent),
            "outputs": {o.label: {"up": o.up, "frames": o.frames_written} for o in self.outputs},
            "audio": None if self.audio is None else self.audio.status(),
        }


class Pipeline:
    """All streams and the shared batcher; start, add and remove streams, stop."""

    def __init__(self, config: PipelineConfig, detector_factory: DetectorFactory | None,
                 metrics: Metrics | None = None, stage: Stage | None = None) -> None:
        """``detector_factory`` builds a detector (again after one crashed or hung); the service
        builds it from ``config.detection`` (:func:`stream.live.service.detector_factory_for`).
        A worker of ``run --workers N`` passes ``stage`` instead: its handle on the detection
        stage process, shared by every worker."""
        self.config = config
        self.metrics = metrics or Metrics()
        self.zone_store = ZoneStore(config.api.zones_dir or state_dir() / "zones")
        self.cluster: Any = None
        """the :class:`~stream.live.cluster.ClusterMember` in cluster mode: the API adds and removes
        streams through it, for the whole cluster"""
        """zones set through the API, restored when their stream starts"""
        fc = config.fail_closed
        if stage is None:
            if detector_factory is None:
                raise ValueError("a pipeline needs a detector factory or a detection stage")
            stage = Batcher(detector_factory, self.metrics,
                            max_batch=config.batcher.max_batch,
                            max_wait_s=config.batcher.max_wait_ms / 1000,
                            hang_timeout_s=hang_timeout_ms(fc) / 1000,
                            inflight=config.batcher.inflight)
        self.batcher: Stage = stage
        self.streams: dict[str, StreamRunner] = {}
        self.observers: list[Observer] = []
        self.on_stream_added: list[Callable[[StreamRunner], None]] = []
        """called with each new stream before it starts (WebRTC viewers attach their feed here)"""
        self.on_stream_removed: list[Callable[[StreamRunner], None]] = []
        """called with each removed stream after it stopped; a hook must act on that runner only,
        since a stream of the same id may already be on its way back"""
        self._lock = threading.Lock()
        self._id_locks: dict[str, tuple[threading.Lock, int]] = {}
        self.started = False
        self.gpu_monitor: GpuMonitor | None = None
        self.shard: Shard | None = None
        """this worker's shard (`run --shard-index`): the API refuses streams other workers own"""
        self.worker: tuple[int, int] | None = None
        """(index, count) of this process among the workers of ``run --workers N``; the API
        refuses streams that another worker process runs"""
        self.events_health: Callable[[], tuple[bool, str | None]] | None = None
        """``(up, problem)`` of the event sink, shown by ``/readyz``; None when events are off"""

    def start(self) -> None:
        self.batcher.start()
        self.gpu_monitor = start_gpu_monitor(self.metrics)
        self.started = True
        for s in self.config.streams:
            self.add_stream(s)

    @contextlib.contextmanager
    def _serialised(self, stream_id: str) -> Iterator[None]:
        """Adds and removals of one id run one at a time, start to finish (others run freely).

        Without it a removal still stopping its runner could forget the metrics and viewers of
        the stream re-added under the same id meanwhile."""
        with self._lock:
            lock, users = self._id_locks.get(stream_id, (threading.Lock(), 0))
            self._id_locks[stream_id] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._id_locks[stream_id]
                if users == 1:
                    del self._id_locks[stream_id]
                else:
                    self._id_locks[stream_id] = (lock, users - 1)

    def add_stream(self, config: StreamConfig, limit: int | None = None) -> StreamRunner:
        """Start a stream; ValueError if the id is taken, StreamLimit if ``limit`` streams run already."""
        with self._serialised(config.id):
            with self._lock:
                if config.id in self.streams:
                    raise ValueError(f"stream {config.id!r} already exists; remove it first or use "
                                     "another id")
                if limit is not None and len(self.streams) >= limit:
                    raise StreamLimit(f"{len(self.streams)} streams run already, the most api.max_streams "
                                      f"({limit}) allows; remove one or raise api.max_streams")
                runner = StreamRunner(self.zone_store.restore(config), self.config, self.batcher,
                                      self.metrics, observers=self.observers)
                runner.configured_zones = config.zones
                self.streams[config.id] = runner
            for hook in list(self.on_stream_added):
                hook(runner)
            runner.start()
            return runner

    def remove_stream(self, stream_id: str, timeout: float = 5.0) -> None:
        with self._serialised(stream_id):
            with self._lock:
                runner = self.streams.pop(stream_id, None)
            if runner is None:
                raise KeyError(stream_id)
            runner.stop(timeout)
            self.metrics.forget_stream(stream_id)
            for hook in list(self.on_stream_removed):
                hook(runner)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every stream in parallel, then the batcher; returns within about ``timeout``."""
        runners = list(self.streams.values())
        threads = [threading.Thread(target=r.stop, args=(timeout,), daemon=True) for r in runners]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 1)
        self.batcher.stop(timeout=1.0)
        if self.gpu_monitor is not None:
            self.gpu_monitor.stop()

    @property
    def ended(self) -> bool:
        """True when every stream's source has ended (files without loop): nothing more will come."""
        return bool(self.streams) and all(r.state == "ended" for r in self.streams.values())

    @property
    def ready(self) -> bool:
        return self.started and self.batcher.alive and self.batcher.ready

    def status(self) -> dict[str, Any]:
        """What ``/readyz`` shows. Readiness is the detector's alone: events that cannot be stored or
        delivered are reported here (and in metrics) but do not take redacted video off the air."""
        body: dict[str, Any] = {"ready": self.ready, "detector": "up" if self.batcher.ready else "down",
                                "streams": [r.status() for r in self.streams.values()]}
        if self.events_health is not None:
            up, problem = self.events_health()
            body["events"] = {"up": up, "problem": problem}
        return body
