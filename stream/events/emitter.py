"""Turns what the pipeline observes into events: tracks started/updated/ended, streams up/down (and
moved between cluster workers), fail-closed incidents, and (optionally) every frame's boxes.

The pipeline calls an observer on its redaction threads, so nothing here may block: events are
built from plain numbers and handed to the sink's bounded in-memory queue, which never waits.
A track is reported once when it starts, at most every ``track_update_interval_s`` while it
lasts, and once when the tracker lets go of it, with its duration and its best detection. The
tracker says which tracks started, went on and ended (:class:`TrackChanges`); what is kept here
per open track is only what events add: its uid, its update pace, and the tracker's last word on
it (to end it when the stream stops or changes resolution, which the tracker is not told of).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from stream.config.events import EventsConfig
from stream.core.detections import Detections
from stream.core.frames import Failure, Frame
from stream.core.observe import Observer
from stream.core.track import Seen, TrackChanges, TrackInfo
from stream.core.vehicle_plates import public_label
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
    from stream.detect.presets import face_models, text_plates_on

    specs = manifest()
    faces = face_models(detection.preset, detection.face_model)
    plates = ["plate", "text"] if text_plates_on(detection.preset, detection.text_plates, detection.plates) \
        else ["plate"]
    return {
        "face": {"name": "+".join(faces), "version": "+".join(specs[n].sha256[:12] for n in faces)},
        "plate": {"name": "+".join(plates), "version": "+".join(specs[n].sha256[:12] for n in plates)},
    }


def _clip(v: float, hi: float) -> float:
    return min(max(v, 0.0), hi) if v == v else 0.0  # NaN (a broken detector) becomes 0, not an exception


def _box(b: np.ndarray, width: int, height: int) -> dict[str, list]:
    x1, y1 = _clip(float(b[0]), width), _clip(float(b[1]), height)
    x2, y2 = _clip(float(b[2]), width), _clip(float(b[3]), height)
    return {"pixel": [round(x1), round(y1), round(x2), round(y2)],
            "normalized": [round(x1 / width, 5), round(y1 / height, 5), round(x2 / width, 5),
                           round(y2 / height, 5)]}


def _frame(f: Frame | Seen) -> dict[str, Any]:
    w, h = f.size
    return {"seq": f.seq, "pts": None if f.pts is None else round(float(f.pts), 6),
            "captured_at": schema.rfc3339(f.wall_time), "width": w, "height": h}


def _score(s: float) -> float:
    return round(_clip(float(s), 1.0), 4)


@dataclass
class _Open:
    """An open track as events know it: the tracker owns its life; events add a uid and a pace."""

    uid: str
    next_update: float
    info: TrackInfo
    """the tracker's latest report of it"""


def _stamped(info: TrackInfo, here: Seen) -> TrackInfo:
    """Sightings the tracker was not told of are taken to be the frame at hand."""
    if info.first_seen and info.last_seen and info.best_seen:
        return info
    return replace(info, first_seen=info.first_seen or here, last_seen=info.last_seen or here,
                   best_seen=info.best_seen or here)


@dataclass
class _Stream:
    lock: threading.Lock = field(default_factory=threading.Lock)
    tracks: dict[int, _Open] = field(default_factory=dict)
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
    def frame(self, frame: Frame, detections: Detections, failure: Failure | None,
              tracks: TrackChanges | None = None) -> None:
        s = self._stream(frame.stream_id)
        with s.lock:
            if self.per_frame:
                self._frame_event(frame, detections, failure)
            if s.size is not None and frame.size != s.size:  # the tracker starts afresh: so do its tracks
                self._end_all(frame.stream_id, s, "resolution_change")
            s.size = frame.size
            if tracks is not None:
                self._tracks(frame, tracks, s, updates=failure is None)

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

    def stream_moved(self, stream_id: str, from_worker: str, to_worker: str, gap_s: float | None,
                     partition: int) -> None:
        """A negative gap (the two members' clocks disagree) is sent as 0 and NaN as null (unknown), so the
        event never breaks the schema."""
        gap = None if gap_s is None or gap_s != gap_s else round(max(0.0, gap_s), 3)
        data = {"stream_id": stream_id, "from_worker": from_worker, "to_worker": to_worker, "gap_s": gap,
                "partition": partition}
        self._emit(schema.STREAM_MOVED, time.time(), data, stream_id)

    def speech(self, stream_id: str, started: float, ended: float, probability: float, policy: str) -> None:
        data = {"stream_id": stream_id, "started_at": schema.rfc3339(started),
                "ended_at": schema.rfc3339(ended),
                "duration_s": round(max(0.0, ended - started), 3), "probability": _score(probability),
                "policy": policy}
        self._emit(schema.AUDIO_SPEECH, ended, data, stream_id)

    def audio_muted(self, stream_id: str, reason: str, seconds: float) -> None:
        self._emit(schema.AUDIO_MUTED, time.time(), {"stream_id": stream_id, "reason": reason,
                                                      "seconds": round(seconds, 3)}, stream_id)

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
    def _tracks(self, frame: Frame, changes: TrackChanges, s: _Stream, updates: bool) -> None:
        """Events for what the tracker reported; ``updates`` False on a failed frame (tracks coast
        through it and may end, but there is nothing new to say of them)."""
        sid, here, now = frame.stream_id, Seen.of(frame), frame.captured_at  # updates follow stream time
        for info in changes.updated:
            o = s.tracks.get(info.track_id)
            if o is None:
                continue  # begun before this emitter saw the stream at this resolution
            o.info = info = _stamped(info, here)
            if updates and self.update_interval > 0 and now >= o.next_update:
                o.next_update = now + self.update_interval
                data = self._track_data(sid, o)
                if info.coasted:  # where the mask is now, not where the face was last seen
                    data.update(frame=_frame(frame), box=_box(info.shown, *frame.size))
                data["frames"] = info.hits
                self._emit(schema.TRACK_UPDATED, frame.wall_time, data, sid)
        for info in changes.started:
            old = s.tracks.pop(info.track_id, None)
            if old is not None:  # the id came back with a new tracker: the old track is over
                self._end(sid, old, "lost", frame.wall_time)
            o = s.tracks[info.track_id] = _Open(os.urandom(8).hex(), now + self.update_interval,
                                                _stamped(info, here))
            self._emit(schema.TRACK_STARTED, frame.wall_time, self._track_data(sid, o), sid)
        for info in changes.ended:
            o = s.tracks.pop(info.track_id, None)
            if o is not None:
                o.info = _stamped(info, here)
                self._end(sid, o, "lost", frame.wall_time)

    def _track_data(self, stream_id: str, o: _Open) -> dict[str, Any]:
        i = o.info
        assert i.last_seen is not None  # stamped when stored
        label = public_label(i.label)
        return {"stream_id": stream_id, "track_id": i.track_id, "track_uid": o.uid, "class": label,
                "frame": _frame(i.last_seen), "box": _box(i.box, *i.last_seen.size),
                "score": _score(i.score), "coasted": i.coasted,
                "model": self.models.get(label, {"name": "unknown", "version": "unknown"})}

    def _end(self, stream_id: str, o: _Open, reason: str, when: float) -> None:
        i = o.info
        assert i.first_seen is not None and i.last_seen is not None and i.best_seen is not None
        data = self._track_data(stream_id, o)
        data.update(coasted=False, reason=reason, first_seen=schema.rfc3339(i.first_seen.wall_time),
                    duration_s=round(max(0.0, i.last_seen.wall_time - i.first_seen.wall_time), 3),
                    frames=i.hits,
                    best={"score": _score(i.best_score), "box": _box(i.best_box, *i.best_seen.size),
                          "frame": _frame(i.best_seen)})
        self._emit(schema.TRACK_ENDED, when, data, stream_id)

    def _end_all(self, stream_id: str, s: _Stream, reason: str) -> None:
        now = time.time()
        for o in s.tracks.values():
            self._end(stream_id, o, reason, now)
        s.tracks.clear()

    def _frame_event(self, frame: Frame, dets: Detections, failure: Failure | None) -> None:
        w, h = frame.size
        items = []
        ids = dets.track_ids
        for i in range(len(dets)):
            label = public_label(dets.labels[i])
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
