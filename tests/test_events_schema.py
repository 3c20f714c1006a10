"""Event schema v1 and the emitter: examples validate, broken events are named, observer calls become
the documented track/stream/incident events (a list stands in for the sink here; the sinks have
their own tests)."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import numpy as np
import pytest

from stream.config import parse_config
from stream.core.detections import Detections
from stream.core.frames import Failure, Frame
from stream.core.masking import NOT_OBSERVED, MaskingStage
from stream.core.redact import Redactor
from stream.core.track import Seen, Tracker, TrackerConfig
from stream.events import schema
from stream.events.emitter import EventEmitter, model_info

T0 = 1_764_190_800.0
IMG = np.zeros((240, 320, 3), np.uint8)


class ListSink:
    """Collects events and stamps sequences like the real sinks do."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.closed = False

    def submit(self, event: dict[str, Any]) -> bool:
        event["sequence"] = schema.format_sequence(len(self.events) + 1)
        self.events.append(event)
        return True

    def close(self, timeout: float) -> None:
        self.closed = True

    def types(self) -> list[str]:
        return [schema.short_type(e["type"]) for e in self.events]


def emitter(**events: Any) -> tuple[EventEmitter, ListSink]:
    cfg = parse_config({"events": {"source": "/stream-redact/test", **events}})
    sink = ListSink()
    return EventEmitter(sink, cfg.events, model_info(cfg.detection)), sink


def frame(seq: int, t: float = 0.0, image: np.ndarray = IMG, sid: str = "cam1") -> Frame:
    return Frame(sid, seq, image, t, T0 + t, t)


class Camera:
    """One stream's frames through the real masking stage (tracker included) into the emitter, as the
    pipeline feeds it: the tracker decides when tracks start and end."""

    def __init__(self, em: EventEmitter, max_coast: int = 12) -> None:
        self.em = em
        self.stage = MaskingStage(Tracker(TrackerConfig(max_coast=max_coast)), Redactor())

    def see(self, f: Frame, *found: tuple[list[float], float], label: str = "face",
            failure: Failure | None = None) -> None:
        """``found``: (box, score) per detection; ``failure``: the frame got no detections."""
        dets = None if failure is not None else Detections(
            boxes=np.array([b for b, _ in found], np.float32).reshape(-1, 4),
            scores=np.array([sc for _, sc in found], np.float32), labels=(label,) * len(found))
        (m,) = self.stage.push(f.seq, f.image.copy(), dets, seen=Seen.of(f))
        self.em.frame(f, NOT_OBSERVED if m.failed else m.dets, failure, self.stage.tracker.changes)


def dets(*tracks: tuple[int, list[float], float, bool], label: str = "face") -> Detections:
    if not tracks:
        return Detections(track_ids=np.zeros(0, np.int64), coasted=np.zeros(0, bool))
    return Detections(boxes=np.array([t[1] for t in tracks], np.float32),
                      scores=np.array([t[2] for t in tracks], np.float32), labels=(label,) * len(tracks),
                      track_ids=np.array([t[0] for t in tracks]), coasted=np.array([t[3] for t in tracks]))


def test_every_type_has_a_valid_example() -> None:
    examples = schema.examples()
    assert {name.removesuffix(".json") for name in examples} == {schema.short_type(t) for t in schema.TYPES}
    for name, event in examples.items():
        schema.validate(event)
        assert schema.short_type(event["type"]) == name.removesuffix(".json")
        if event["type"].startswith(schema.PREFIX + "audit."):
            assert event["subject"] == schema.AUDIT_SUBJECT  # one chain, one partition
        elif not event["type"].endswith("events_dropped"):
            assert event["subject"] == event["data"]["stream_id"]


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    doc = schema.load_schema()
    jsonschema.Draft202012Validator.check_schema(doc)
    assert doc["$id"] == schema.DATASCHEMA
    assert set(doc["properties"]["type"]["enum"]) == set(schema.TYPES)


def _track_started() -> dict[str, Any]:
    return copy.deepcopy(schema.examples()["track.started.json"])


def _set(event: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    *parents, last = path.split(".")
    node = event
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return event


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("specversion", "0.3", "'1.0' was expected"),
    ("type", "stream-redact.track.exploded", "is not one of"),
    ("time", "yesterday", "does not match"),
    ("sequence", "12", "does not match"),
    ("id", KeyError, "'id' is a required property"),
    ("subject", KeyError, "'subject' is a required property"),
    ("data.class", "person", "is not one of"),
    ("data.score", 1.5, "greater than the maximum"),
    ("data.box.pixel", [1, 2, 3], "is too short"),
    ("data.box.normalized", [0, 0, 1.2, 1], "greater than the maximum"),
    ("data.frame.captured_at", KeyError, "'captured_at' is a required property"),
    ("data.model", {"name": "yunet"}, "'version' is a required property"),
    ("data.surprise", 1, "Additional properties are not allowed"),
    ("extra", "x", "Additional properties are not allowed"),
])
def test_broken_events_are_rejected_naming_the_field(path: str, value: Any, expected: str) -> None:
    event = _set(_track_started(), path, value)
    with pytest.raises(jsonschema.ValidationError, match=expected):
        schema.validate(event)



def test_stream_moved_carries_the_move_and_validates() -> None:
    em, sink = emitter()
    em.stream_moved("cam1", "cam-host-7-1234", "cam-host-8-5678", 10.41249, 3)
    em.stream_moved("cam2", "cam-host-7-1234", "cam-host-8-5678", None, 0)  # gap unknown
    em.stream_moved("cam3", "cam-host-7-1234", "cam-host-8-5678", -0.2, 1)  # clocks disagree: not invalid
    assert sink.types() == ["stream.moved"] * 3
    moved = sink.events[0]
    assert moved["subject"] == "cam1"  # keyed by stream id, like stream.up/down
    assert moved["data"] == {"stream_id": "cam1", "from_worker": "cam-host-7-1234",
                             "to_worker": "cam-host-8-5678", "gap_s": 10.412, "partition": 3}
    assert sink.events[1]["data"]["gap_s"] is None
    assert sink.events[2]["data"]["gap_s"] == 0
    assert schema.category(moved["type"]) == "stream"  # the stream topic, with stream.up/down
    for e in sink.events:
        schema.validate(e)


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("data.gap_s", -0.5, "less than the minimum"),
    ("data.gap_s", "10", "is not of type"),
    ("data.gap_s", KeyError, "'gap_s' is a required property"),
    ("data.partition", -1, "less than the minimum"),
    ("data.partition", 1.5, "is not of type"),
    ("data.from_worker", KeyError, "'from_worker' is a required property"),
    ("data.to_worker", "", "should be non-empty"),
    ("data.stream_id", KeyError, "'stream_id' is a required property"),
    ("data.reason", "crash", "Additional properties are not allowed"),
    ("subject", KeyError, "'subject' is a required property"),
])
def test_broken_stream_moved_events_are_rejected(path: str, value: Any, expected: str) -> None:
    event = _set(copy.deepcopy(schema.examples()["stream.moved.json"]), path, value)
    with pytest.raises(jsonschema.ValidationError, match=expected):
        schema.validate(event)

def test_track_lifecycle_started_updated_ended_with_duration_and_best() -> None:
    em, sink = emitter(track_update_interval_s=0.0001)
    cam = Camera(em, max_coast=1)
    em.state("cam1", "up", None)
    cam.see(frame(1, 0.0), ([10, 20, 50, 70], 0.6))
    cam.see(frame(2, 0.04), ([12, 20, 52, 70], 0.9))
    cam.see(frame(3, 0.08), ([14, 20, 54, 70], 0.7))
    cam.see(frame(4, 0.12))  # coasting: not a detection
    cam.see(frame(5, 0.16))  # the tracker let go
    assert sink.types()[0] == "stream.up"
    assert sink.types()[1] == "track.started"
    assert sink.types()[-1] == "track.ended"
    assert "track.updated" in sink.types()
    started, ended = sink.events[1]["data"], sink.events[-1]["data"]
    assert started["box"]["pixel"] == [10, 20, 50, 70] and started["score"] == 0.6
    assert started["box"]["normalized"] == [round(10 / 320, 5), round(20 / 240, 5), round(50 / 320, 5),
                                            round(70 / 240, 5)]
    assert started["frame"] == {"seq": 1, "pts": 0.0, "captured_at": schema.rfc3339(T0), "width": 320,
                                "height": 240}
    assert started["model"]["name"] == "yunet" and len(started["model"]["version"]) == 12
    assert ended["track_uid"] == started["track_uid"]
    assert ended["reason"] == "lost"
    assert ended["frames"] == 3  # detections only; the coasted frame does not count
    assert ended["duration_s"] == pytest.approx(0.08)
    assert ended["best"]["score"] == pytest.approx(0.9) and ended["best"]["frame"]["seq"] == 2
    assert ended["best"]["box"]["pixel"] == [12, 20, 52, 70]
    assert ended["box"]["pixel"] == [14, 20, 54, 70]  # the last detection, not the coasted box
    assert sink.events[-1]["time"] == schema.rfc3339(T0 + 0.16)
    for e in sink.events:
        schema.validate(e)


@pytest.mark.parametrize(("interval", "expected"), [(0, 0), (3600, 0), (0.0001, 9)])
def test_track_updates_are_rate_limited(interval: float, expected: int) -> None:
    em, sink = emitter(track_update_interval_s=interval)
    cam = Camera(em)
    for i in range(10):
        cam.see(frame(i + 1, i * 0.04), ([10 + i, 20, 50 + i, 70], 0.8))
    assert sink.types().count("track.started") == 1
    assert sink.types().count("track.updated") == expected


def test_failed_frames_do_not_end_tracks_but_stream_down_does() -> None:
    em, sink = emitter()
    cam = Camera(em)
    em.state("cam1", "up", None)
    cam.see(frame(1), ([10, 20, 50, 70], 0.8))
    cam.see(frame(2), failure=Failure.DETECTOR_HUNG)  # blanked: nothing looked for
    assert "track.ended" not in sink.types()
    em.incident("cam1", Failure.DETECTOR_HUNG, 1, False, "blank")
    em.incident("cam1", Failure.DETECTOR_HUNG, 12, True, "blank")
    em.state("cam1", "down", "rtsp://***@cam/x: connection refused")
    em.state("cam1", "down", "rtsp://***@cam/x: connection refused")  # a retry: no second event
    assert sink.types() == ["stream.up", "track.started", "incident.started", "incident.ended", "track.ended",
                            "stream.down"]
    inc = sink.events[3]["data"]
    assert inc["frames"] == 12 and inc["reason"] == "detector_hung" and inc["action"] == "blank"
    assert sink.events[4]["data"]["reason"] == "stream_down"
    assert sink.events[5]["data"] == {"stream_id": "cam1", "state": "down",
                                      "error": "rtsp://***@cam/x: connection refused"}
    for e in sink.events:
        schema.validate(e)


def test_tracks_still_open_at_close_end_as_stream_ended_or_stopped() -> None:
    em, sink = emitter()
    a, b = Camera(em), Camera(em)
    a.see(frame(1, sid="a"), ([10, 20, 50, 70], 0.8))
    b.see(frame(1, sid="b"), ([10, 20, 50, 70], 0.8))
    em.state("a", "ended", None)  # a file at its end: frames already decoded may still come
    a.see(frame(2, sid="a"), ([11, 20, 51, 70], 0.8))
    assert sink.types().count("track.ended") == 0
    em.close(1.0)
    ends = {e["data"]["stream_id"]: e["data"]["reason"]
            for e in sink.events if e["type"] == schema.TRACK_ENDED}
    assert ends == {"a": "stream_ended", "b": "stopped"}
    assert sink.closed


def test_resolution_change_ends_tracks() -> None:
    em, sink = emitter()
    cam = Camera(em)
    cam.see(frame(1), ([10, 20, 50, 70], 0.8))
    bigger = np.zeros((480, 640, 3), np.uint8)
    cam.see(frame(2, image=bigger), ([20, 40, 100, 140], 0.8))
    assert sink.types() == ["track.started", "track.ended", "track.started"]
    assert sink.events[1]["data"]["reason"] == "resolution_change"
    assert sink.events[2]["data"]["frame"]["width"] == 640


def test_per_frame_events_are_off_by_default_and_describe_every_frame_when_on() -> None:
    em, sink = emitter()
    em.frame(frame(1), dets((1, [10, 20, 50, 70], 0.8, False)), None)
    assert "frame.detections" not in sink.types()
    em, sink = emitter(per_frame=True)
    em.frame(frame(1), dets((1, [10, 20, 50, 70], 0.8, False), (2, [100, 20, 150, 70], 0.5, True)), None)
    em.frame(frame(2), Detections(observed=frozenset()), Failure.DEADLINE)
    frames = [e["data"] for e in sink.events if e["type"] == schema.FRAME_DETECTIONS]
    assert len(frames) == 2
    assert [d["track_id"] for d in frames[0]["detections"]] == [1, 2]
    assert frames[0]["detections"][1]["coasted"] is True
    assert frames[1] == {"stream_id": "cam1", "frame": frames[1]["frame"], "failure": "deadline",
                         "detections": []}
    for e in sink.events:
        schema.validate(e)


def test_plate_tracks_name_the_plate_model() -> None:
    em, sink = emitter()
    Camera(em).see(frame(1), ([10, 20, 50, 30], 0.8), label="plate")
    assert sink.events[0]["data"]["class"] == "plate"
    assert sink.events[0]["data"]["model"]["name"] == "plate"


def test_boxes_outside_the_frame_are_clipped() -> None:
    em, sink = emitter()
    Camera(em).see(frame(1), ([-8, -3, 330, 250], 0.8))
    box = sink.events[0]["data"]["box"]
    assert box["pixel"] == [0, 0, 320, 240] and box["normalized"] == [0, 0, 1, 1]
    schema.validate(sink.events[0])


def test_a_track_the_tracker_lets_go_during_an_outage_ends_once_with_no_updates() -> None:
    """Failed frames say nothing new about a track, but the tracker's word that it is over stands."""
    em, sink = emitter(track_update_interval_s=0.0001)
    cam = Camera(em, max_coast=1)  # an unobserved track lives 4 * max_coast updates
    cam.see(frame(1, 0.0), ([10, 20, 50, 70], 0.8))
    for i in range(2, 8):
        cam.see(frame(i, i * 0.04), failure=Failure.DEADLINE)
    assert sink.types() == ["track.started", "track.ended"]
    ended = sink.events[1]
    assert ended["data"]["reason"] == "lost" and ended["data"]["frames"] == 1
    assert ended["time"] == schema.rfc3339(T0 + 6 * 0.04)  # the update that let it go
    cam.see(frame(8, 0.32), ([10, 20, 50, 70], 0.8))
    assert sink.types()[2:] == ["track.started"]
    for e in sink.events:
        schema.validate(e)
