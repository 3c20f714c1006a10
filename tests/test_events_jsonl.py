"""The JSON Lines sink (the default without Kafka) and the service wiring: a real pipeline on a clip
with a face writes schema-valid track and stream events to the file."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from helpers import Clip, make_clip

from stream.config import parse_config
from stream.core.metrics import Metrics, sample
from stream.events import schema
from stream.events.jsonl import JsonlSink, last_sequence
from stream.live.service import serve

DETECTION = {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"]}


def lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def event(i: int, sid: str = "cam1") -> dict:
    data = {"stream_id": sid, "state": "up"}
    return schema.envelope(schema.STREAM_UP, "/t", 1_764_190_800.0 + i, data, sid)


def sink_for(path: Path, metrics: Metrics | None = None, **jsonl: object) -> JsonlSink:
    cfg = parse_config({"events": {"jsonl": {"path": str(path), **jsonl}}})
    s = JsonlSink(cfg.events.jsonl, metrics or Metrics())
    s.start()
    return s


@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
def test_events_are_appended_one_a_line_with_increasing_sequence(tmp_path: Path, fsync: str) -> None:
    path = tmp_path / "e.jsonl"
    m = Metrics()
    s = sink_for(path, m, fsync=fsync)
    for i in range(250):
        assert s.submit(event(i, f"cam{i % 3}"))
    s.close(5)
    got = lines(path)
    assert [e["sequence"] for e in got] == [schema.format_sequence(n) for n in range(1, 251)]
    for e in got:
        schema.validate(e)
    assert sample(m, "stream_redact_events_delivered_total", sink="jsonl") == 250
    assert sample(m, "stream_redact_events_produced_total", type="stream.up") == 250
    assert sample(m, "stream_redact_events_delivery_seconds_count", sink="jsonl") == 250


def test_a_restart_appends_and_carries_the_sequence_on(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    s = sink_for(path)
    s.submit(event(1))
    s.submit(event(2))
    s.close(5)
    with path.open("ab") as f:
        f.write(b'{"specversion":"1.0","id":"cut-sho')  # the process died in the middle of a line
    assert last_sequence(path) == 2
    s = sink_for(path)
    s.submit(event(3))
    s.close(5)
    raw = path.read_text().splitlines()
    assert raw[2].startswith('{"specversion":"1.0","id":"cut-sho')  # left alone, on its own line
    assert json.loads(raw[3])["sequence"] == schema.format_sequence(3)


def test_submit_never_blocks_and_counts_what_does_not_fit(tmp_path: Path) -> None:
    gate = threading.Event()

    class Stalled(JsonlSink):  # storage that hangs, as a dead NFS mount would
        def _store(self, batch: list[dict]) -> None:
            gate.wait(30)
            super()._store(batch)

    cfg = parse_config({"events": {"jsonl": {"path": str(tmp_path / "e.jsonl")}}})
    m = Metrics()
    s = Stalled(cfg.events.jsonl, m, queue_size=100)
    s.start()
    results = [s.submit(event(i)) for i in range(500)]
    assert results.count(False) >= 300  # refused at once, not waited for
    assert sample(m, "stream_redact_events_dropped_total", reason="queue_full") == results.count(False)
    gate.set()
    s.close(5)
    got = lines(tmp_path / "e.jsonl")
    dropped = [e for e in got if e["type"] == schema.EVENTS_DROPPED]  # one per episode of drops
    assert dropped and sum(d["data"]["count"] for d in dropped) == results.count(False)
    for d in dropped:
        assert d["data"]["reason"] == "queue_full" and d["data"]["policy"] == "drop_newest"
        schema.validate(d)
    assert len(got) == results.count(True) + len(dropped)


def test_an_event_submitted_after_close_is_refused_and_counted(tmp_path: Path) -> None:
    cfg = parse_config({"events": {"jsonl": {"path": str(tmp_path / "e.jsonl")}}})
    m = Metrics()
    s = JsonlSink(cfg.events.jsonl, m)
    s.start()
    assert s.submit(event(1))
    s.close(5)
    assert s.submit(event(2)) is False
    assert sample(m, "stream_redact_events_dropped_total", reason="closed") == 1
    assert sample(m, "stream_redact_events_dropped_total", reason="queue_full") == 0
    assert [e["sequence"] for e in lines(tmp_path / "e.jsonl")] == [schema.format_sequence(1)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Clip:
    return make_clip(tmp_path_factory.mktemp("ev") / "face.mp4", frames=40, width=320, height=240)


async def test_run_writes_track_and_stream_events_of_a_face_clip(clip: Clip, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    cfg = parse_config({
        "streams": [{"id": "door", "source": {"type": "file", "path": str(clip.path)}}],
        "detection": DETECTION, "http": {"port": 0},
        "events": {"jsonl": {"path": str(path)}, "source": "/stream-redact/test"}})
    assert await serve(cfg, insecure_no_auth=True) == 0  # returns once the file has ended
    got = lines(path)
    for e in got:
        schema.validate(e)
        assert e["subject"] == "door" and e["source"] == "/stream-redact/test"
    types = [schema.short_type(e["type"]) for e in got]
    assert types[0] == "stream.up"
    assert "track.started" in types and "track.ended" in types
    assert types.index("track.started") < types.index("track.ended")
    down = [e["data"] for e in got if e["type"] == schema.STREAM_DOWN]
    assert down and down[0]["state"] == "ended"
    started = next(e["data"] for e in got if e["type"] == schema.TRACK_STARTED)
    ended = [e["data"] for e in got
             if e["type"] == schema.TRACK_ENDED and e["data"]["track_uid"] == started["track_uid"]]
    assert len(ended) == 1 and ended[0]["class"] == "face" and ended[0]["frames"] >= 3
    assert ended[0]["best"]["score"] >= started["score"]
    # the face moves left to right: where the track began is left of where it was last seen
    assert started["box"]["pixel"][0] < ended[0]["box"]["pixel"][0]
    assert [e["sequence"] for e in got] == sorted(e["sequence"] for e in got)


def test_an_unwritable_events_file_stops_the_start_naming_the_fix() -> None:
    from stream.core.errors import UserError
    from stream.events.sinks import build_sink

    cfg = parse_config({"events": {"jsonl": {"path": "/proc/stream-redact-events.jsonl"}}})  # even root can't
    with pytest.raises(UserError, match=r"events.jsonl.path: cannot open /proc/stream-redact-events.jsonl "
                                        r"for appending: .*; choose a writable file"):
        build_sink(cfg, Metrics())
