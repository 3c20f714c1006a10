"""Turns what the pipeline observes into events: tracks started/updated/ended, streams up/down,
fail-closed incidents, and (optionally) every frame's boxes.

The pipeline calls an observer on its redaction threads, so nothing here may block: events are
built from plain numbers and handed to the sink's bounded in-memory queue, which never waits.
A track is reported once when it starts, at most every ``track_update_interval_s`` while it
lasts, and once when the tracker lets go of it, with its duration and its best detection.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stream.config.events import EventsConfig
from stream.core.detections import Detections
from stream.core.frames import Failure, Frame
from stream.core.observe import Observer
from stream.events import schema

log = logging.getLogger(__name__)

Model = dict[str, str]


class Sink(Protocol):
    """Where events go; ``submit`` must never block (see :class:`stream.events.sink.EventSink`)."""

    def submit(self, event: dict[str, Any]) -> bool: ...

    def close(self, timeout: float) -> None: ...


def model_info(detection: Any) -> dict[str, Model]:
    """Name and weights version (sha256 prefix) of the model behind each class, from the config."""
    from stream.detect.models import manifest
    from stream.detect.presets import PRESETS

    specs = manifest()
    face = detection.face_model or str(PRESETS[detection.preset]["face_model"])
    faces = ["centerface", "yunet"] if face == "both" else [face]
    return {
        "face": {"name": "+".join(faces), "version": "+".join(specs[n].sha256[:12] for n in faces)},
        "plate": {"name": "plate", "version": specs["plate"].sha256[:12]},
    }


def _clip(v: float, hi: float) -> float:
    return min(max(v, 0.0), hi) if v == v else 0.0  # NaN (a broken detector) becomes 0, not an exception


def _box(b: np.ndarray, width: int, height: int) -> dict[str, list]:
    x1, y1 = _clip(float(b[0]), width), _clip(float(b[1]), height)
    x2, y2 = _clip(float(b[2]), width), _clip(float(b[3]), height)
    return {"pixel": [round(x1), round(y1), round(x2), round(y2)],
            "normalized": [round(x1 / width, 5), round(y1 / height, 5), round(x2 / width, 5),
                           round(y2 / height, 5)]}


def _frame(f: Frame) -> dict[str, Any]:
    w, h = f.size
    return {"seq": f.seq, "pts": None if f.pts is None else round(float(f.pts), 6),
            "captured_at": schema.rfc3339(f.wall_time), "width": w, "height": h}


def _score(s: float) -> float:
    return round(_clip(float(s), 1.0), 4)


@dataclass
class _Track:
    track_id: int
    label: str
    uid: str
    first_wall: float
    last_frame: dict[str, Any]
    last_box: dict[str, list]
    last_score: float
    last_wall: float
    best_score: float
    best_box: dict[str, list]
    best_frame: dict[str, Any]
    frames: int = 1
    coasted: bool = False
    next_update: float = 0.0


@dataclass
class _Stream:
    lock: threading.Lock = field(default_factory=threading.Lock)
    tracks: dict[int, _Track] = field(default_factory=dict)
    size: tuple[int, int] | None = None
    state: str | None = None
    ended: bool = False
    incident_started: float | None = None


class EventEmitter(Observer):
    """The pipeline observer that produces events; one per pipeline, shared by all streams."""

    def __init__(self, sink: Sink, config: EventsConfig, models: dict[str, Model]) -> None:
        self.sink = sink
        self.source = config.source_uri
        self.per_frame = config.per_frame
        self.update_interval = config.track_update_interval_s
        self.models = models
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _stream(self, stream_id: str) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None:
            with self._lock:
                s = self._streams.setdefault(stream_id, _Stream())
        return s

    def _emit(self, event_type: str, when: float, data: dict[str, Any], subject: str | None) -> None:
        self.sink.submit(schema.envelope(event_type, self.source, when, data, subject))

    # -- Observer ----------------------------------------------------------------------------------
    def frame(self, frame: Frame, detections: Detections, failure: Failure | None) -> None:
        s = self._stream(frame.stream_id)
        with s.lock:
            if self.per_frame:
                self._frame_event(frame, detections, failure)
            if failure is not None:
                return  # nothing was looked for: tracks coast in the tracker, they have not ended
            if s.size is not None and frame.size != s.size:
                self._end_all(frame.stream_id, s, "resolution_change")
            s.size = frame.size
            if detections.track_ids is None or (not len(detections) and not s.tracks):
                return
            self._tracks(frame, detections, s)

    def state(self, stream_id: str, state: str, error: str | None) -> None:
        s = self._stream(stream_id)
        now = time.time()
        with s.lock:
            if state == "up":
                s.ended = False
                if s.state != "up":
                    self._emit(schema.STREAM_UP, now, {"stream_id": stream_id, "state": "up"}, stream_id)
            else:
                if state == "down":
                    self._end_all(stream_id, s, "stream_down")
                elif state == "stopped":
                    self._end_all(stream_id, s, "stopped")
                else:  # ended: frames already decoded may still be on their way; close() ends the tracks
                    s.ended = True
                if s.state != state:
                    data = {"stream_id": stream_id, "state": state,
                            "error": error if state == "down" else None}
                    self._emit(schema.STREAM_DOWN, now, data, stream_id)
            s.state = state

    def incident(self, stream_id: str, reason: Failure, frames: int, ended: bool, action: str) -> None:
        s = self._stream(stream_id)
        now = time.time()
        with s.lock:
            data: dict[str, Any] = {"stream_id": stream_id, "reason": reason.value, "action": action,
                                    "frames": max(1, frames)}
            if not ended:
                s.incident_started = now
                data["started_at"] = schema.rfc3339(now)
                self._emit(schema.INCIDENT_STARTED, now, data, stream_id)
            else:
                started = s.incident_started if s.incident_started is not None else now
                s.incident_started = None
                data.update(started_at=schema.rfc3339(started), ended_at=schema.rfc3339(now),
                            duration_s=round(max(0.0, now - started), 3))
                self._emit(schema.INCIDENT_ENDED, now, data, stream_id)

    # -- tracks ------------------------------------------------------------------------------------
    def _tracks(self, frame: Frame, dets: Detections, s: _Stream) -> None:
        assert dets.track_ids is not None
        w, h = frame.size
        now = frame.captured_at  # stream time: updates follow the frames, not the machine's load
        fdata: dict[str, Any] | None = None
        seen: set[int] = set()
        for i in range(len(dets)):
            tid = int(dets.track_ids[i])
            if tid < 1:
                continue
            seen.add(tid)
            coasted = bool(dets.coasted[i]) if dets.coasted is not None else False
            t = s.tracks.get(tid)
            if t is None and coasted:
                continue  # a track we never saw detected (e.g. begun before a resolution change)
            if fdata is None:
                fdata = _frame(frame)
            if t is None:
                box, score = _box(dets.boxes[i], w, h), _score(dets.scores[i])
                t = _Track(tid, dets.labels[i], os.urandom(8).hex(), frame.wall_time, fdata, box, score,
                           frame.wall_time, score, box, fdata, next_update=now + self.update_interval)
                s.tracks[tid] = t
                self._emit(schema.TRACK_STARTED, frame.wall_time, self._track_data(frame.stream_id, t),
                           frame.stream_id)
                continue
            t.coasted = coasted
            if not coasted:
                t.frames += 1
                t.last_frame, t.last_wall = fdata, frame.wall_time
                t.last_box, t.last_score = _box(dets.boxes[i], w, h), _score(dets.scores[i])
                if t.last_score > t.best_score:
                    t.best_score, t.best_box, t.best_frame = t.last_score, t.last_box, fdata
            if self.update_interval > 0 and now >= t.next_update:
                t.next_update = now + self.update_interval
                data = self._track_data(frame.stream_id, t)
                if coasted:  # where the mask is now, not where the face was last seen
                    data.update(frame=fdata, box=_box(dets.boxes[i], w, h))
                data["frames"] = t.frames
                self._emit(schema.TRACK_UPDATED, frame.wall_time, data, frame.stream_id)
        for tid in [tid for tid in s.tracks if tid not in seen]:
            self._end(frame.stream_id, s.tracks.pop(tid), "lost", frame.wall_time)

    def _track_data(self, stream_id: str, t: _Track) -> dict[str, Any]:
        return {"stream_id": stream_id, "track_id": t.track_id, "track_uid": t.uid, "class": t.label,
                "frame": t.last_frame, "box": t.last_box, "score": t.last_score, "coasted": t.coasted,
                "model": self.models.get(t.label, {"name": "unknown", "version": "unknown"})}

    def _end(self, stream_id: str, t: _Track, reason: str, when: float) -> None:
        data = self._track_data(stream_id, t)
        data.update(coasted=False, reason=reason, first_seen=schema.rfc3339(t.first_wall),
                    duration_s=round(max(0.0, t.last_wall - t.first_wall), 3), frames=t.frames,
                    best={"score": t.best_score, "box": t.best_box, "frame": t.best_frame})
        self._emit(schema.TRACK_ENDED, when, data, stream_id)

    def _end_all(self, stream_id: str, s: _Stream, reason: str) -> None:
        now = time.time()
        for t in s.tracks.values():
            self._end(stream_id, t, reason, now)
        s.tracks.clear()

    def _frame_event(self, frame: Frame, dets: Detections, failure: Failure | None) -> None:
        w, h = frame.size
        items = []
        ids = dets.track_ids
        for i in range(len(dets)):
            label = dets.labels[i]
            items.append({
                "class": label,
                "track_id": int(ids[i]) if ids is not None and ids[i] > 0 else None,
                "score": _score(dets.scores[i]),
                "coasted": bool(dets.coasted[i]) if dets.coasted is not None else False,
                "box": _box(dets.boxes[i], w, h),
                "model": self.models.get(label, {"name": "unknown", "version": "unknown"}),
            })
        self._emit(schema.FRAME_DETECTIONS, frame.wall_time,
                   {"stream_id": frame.stream_id, "frame": _frame(frame),
                    "failure": None if failure is None else failure.value, "detections": items},
                   frame.stream_id)

    # -- lifecycle ---------------------------------------------------------------------------------
    def end_tracks(self) -> None:
        """End every open track (the pipeline has stopped: no frame will end them)."""
        with self._lock:
            streams = list(self._streams.items())
        for sid, s in streams:
            with s.lock:
                self._end_all(sid, s, "stream_ended" if s.ended else "stopped")

    def close(self, timeout: float = 5.0) -> None:
        """End open tracks, then let the sink deliver for up to ``timeout`` seconds and stop it.

        Call after the pipeline has stopped; what the sink could not deliver stays in its spool."""
        if self._closed:
            return
        self._closed = True
        self.end_tracks()
        self.sink.close(timeout)
