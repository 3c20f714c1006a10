"""The live pipeline end to end on file sources: redaction, fail-closed, backpressure, stop.

Files played in real time are cameras as far as the pipeline can tell; the RTSP tests do the
same over a real RTSP server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import BUS, CHELSEA, Clip, encode_frames, laplacian_var, make_clip, read_bgr, read_video
from live_helpers import Hangs, NoFaces, Raises, Slow, counter, wait_for

from stream.config import PipelineConfig, parse_config
from stream.core.detections import Detections
from stream.core.frames import Failure, Frame
from stream.core.metrics import sample
from stream.core.observe import Observer
from stream.core.track import TrackChanges
from stream.core.yuv import Picture, as_bgr
from stream.live.pipeline import Pipeline
from stream.live.service import detector_factory_for
from stream.live.sources.base import Arrivals


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Clip:
    return make_clip(tmp_path_factory.mktemp("live") / "face.mp4", frames=40, width=320, height=240)


def config(clip: Clip, out: Path | None = None, n: int = 1, **extra: object) -> PipelineConfig:
    streams = []
    for i in range(n):
        s: dict = {"id": f"cam{i}", "source": {"type": "file", "path": str(clip.path)}}
        if out is not None:
            s["outputs"] = [{"type": "file", "path": str(out.with_name(f"{out.stem}{i}{out.suffix}"))}]
        streams.append(s)
    doc = {"streams": streams, "detection": {"preset": "fast", "plates": False, "heads": False,
                                             "providers": ["cpu"]}, **extra}
    return parse_config(doc)


class Captured:
    """Every frame a stream published, as published (the hook runs after redaction), in BGR: an I420
    picture is converted (and its kind kept in ``kinds``)."""

    def __init__(self) -> None:
        self.frames: list[tuple[Frame, np.ndarray, float]] = []
        self.kinds: list[type] = []
        self.lock = threading.Lock()

    def __call__(self, frame: Frame, image: Picture, dets: object) -> None:
        latency = time.monotonic() - frame.captured_at
        with self.lock:
            self.kinds.append(type(image))
            self.frames.append((frame, as_bgr(image), latency))


def run(cfg: PipelineConfig, factory=None, timeout: float = 60) -> tuple[Pipeline, dict[str, Captured]]:
    p = Pipeline(cfg, factory or detector_factory_for(cfg))  # None: the configured detector
    p.start()
    caps = {}
    for sid, r in p.streams.items():
        caps[sid] = Captured()
        r.on_redacted.append(caps[sid])
    try:
        wait_for(lambda: p.ended, timeout=timeout, what="every file source to end")
    finally:
        p.stop()
    return p, caps


@pytest.fixture
def release() -> Iterator[threading.Event]:
    ev = threading.Event()
    yield ev
    ev.set()


def test_faces_are_obscured_in_every_published_frame(clip: Clip, tmp_path: Path) -> None:
    p, caps = run(config(clip, tmp_path / "out.mp4"))
    got = caps["cam0"].frames
    assert len(got) >= len(clip.face_boxes) // 3, "too few frames published to judge"
    src = read_video(clip.path).frames
    for frame, image, _ in got:
        box = clip.face_boxes[frame.seq - 1]
        assert box is not None
        before = laplacian_var(src[frame.seq - 1], box, 3)
        after = laplacian_var(image, box, 3)
        assert after < 0.3 * before, f"frame {frame.seq}: face energy {before:.0f} -> {after:.0f}"
    m = p.metrics
    n_in = counter(m, "frames_in", stream="cam0")
    assert n_in == len(clip.face_boxes)
    dropped = sum(counter(m, "frames_dropped", stream="cam0", reason=r)
                  for r in ("queue_full", "backlog", "stopping"))
    assert counter(m, "frames_published", stream="cam0") == len(got) == n_in - dropped
    assert counter(m, "detections", stream="cam0", label="face") >= len(got)
    # the recording holds the published frames, redacted
    out = read_video(tmp_path / "out0.mp4")
    assert len(out.frames) == counter(m, "output_frames", stream="cam0", output="file")
    assert len(out.frames) >= len(got) - 2


@pytest.mark.parametrize("action", ["blank", "withhold"])
def test_raising_detector_never_lets_a_frame_through(clip: Clip, tmp_path: Path, action: str) -> None:
    cfg = config(clip, tmp_path / "out.mkv", fail_closed={"action": action})
    p, caps = run(cfg, factory=Raises)
    m = p.metrics
    n_in = counter(m, "frames_in", stream="cam0")
    assert n_in == len(clip.face_boxes)
    name = "frames_blanked" if action == "blank" else "frames_withheld"
    failed = sum(counter(m, name, stream="cam0", reason=r)
                 for r in ("detector_error", "detector_unavailable", "deadline", "detector_hung"))
    assert failed > 0
    published = caps["cam0"].frames
    if action == "blank":
        assert len(published) == failed
        assert all(int(img.max()) == 0 for _, img, _ in published)
        out = read_video(tmp_path / "out0.mkv")
        assert out.frames and all(int(f.max()) <= 16 for f in out.frames)  # black after H.264
    else:
        assert published == []
        assert counter(m, "frames_published", stream="cam0") == 0
    assert counter(m, "detector_restarts", reason="error") >= 1


def test_hung_detector_blanks_frames_and_stream_stays_live(clip: Clip, tmp_path: Path,
                                                           release: threading.Event) -> None:
    cfg = config(clip, tmp_path / "out.mkv", fail_closed={"max_latency_ms": 300})
    hung = Hangs(release)
    p, caps = run(cfg, factory=lambda: hung)
    published = caps["cam0"].frames
    assert hung.entered.is_set()
    assert published, "a hung detector must leave the stream live (blank), not frozen"
    assert all(int(img.max()) == 0 for _, img, _ in published)
    blanked = sum(counter(p.metrics, "frames_blanked", stream="cam0", reason=r)
                  for r in ("detector_hung", "detector_unavailable", "deadline"))
    assert blanked == len(published)


def test_slow_detector_drops_old_frames_and_latency_stays_bounded(clip: Clip) -> None:
    # detection at 4 frames/s against a 25 fps camera: most frames must be dropped, none pile up
    cfg = config(clip, n=2, queue_size=2, batcher={"max_batch": 1, "max_wait_ms": 0},
                 fail_closed={"max_latency_ms": 2000})
    slow = Slow(0.25)
    p = Pipeline(cfg, lambda: slow)
    p.start()
    caps = {sid: Captured() for sid in p.streams}
    for sid, r in p.streams.items():
        r.on_redacted.append(caps[sid])
    depths: list[float] = []
    try:
        def sampled_until_end() -> bool:
            depths.extend(sample(p.metrics, "stream_redact_queue_depth", stream=s) for s in p.streams)
            return p.ended
        wait_for(sampled_until_end, timeout=60, what="the sources to end")
    finally:
        p.stop()
    m = p.metrics
    for sid in p.streams:
        assert counter(m, "frames_dropped", stream=sid, reason="queue_full") > 0
        published = caps[sid].frames
        assert published
        assert all(lat <= 2.0 + 0.1 for _, _, lat in published)  # detected in time or blanked, never later
        assert counter(m, "frames_in", stream=sid) == len(clip.face_boxes)
    assert max(depths) <= 2


def test_an_overloaded_stage_sheds_frames_instead_of_blanking_them(clip: Clip) -> None:
    """Detection at 10 frames/s against a 25 fps camera, with room to queue 32 frames: without
    admission control the queued frames would wait past their deadline and go out black. They are
    shed before detection instead, and every frame that goes out is redacted and on time."""
    cfg = config(clip, queue_size=32, batcher={"max_batch": 1, "max_wait_ms": 0},
                 fail_closed={"max_latency_ms": 1500})
    slow = Slow(0.1)
    p = Pipeline(cfg, lambda: slow)
    cap = Captured()
    p.start()
    p.streams["cam0"].on_redacted.append(cap)
    try:
        wait_for(lambda: p.ended, timeout=60, what="the source to end")
    finally:
        p.stop()
    m = p.metrics
    assert counter(m, "frames_dropped", stream="cam0", reason="overload") > 0
    blanked = sum(counter(m, "frames_blanked", stream="cam0", reason=f.value) for f in Failure)
    assert blanked == 0, "an overloaded but working detector must not black out frames"
    assert len(cap.frames) >= 5 and all(lat <= 1.5 + 0.1 for _, _, lat in cap.frames)


def test_a_stream_starved_for_its_whole_deadline_goes_black(clip: Clip) -> None:
    """A detector so slow that no frame can be served within max_latency_ms: frames are shed, and
    once a whole deadline passes with nothing out the stream fails closed with a black frame
    instead of freezing silently."""
    cfg = config(clip, queue_size=32, batcher={"max_batch": 1, "max_wait_ms": 0},
                 fail_closed={"max_latency_ms": 300})
    slow = Slow(0.5)
    p = Pipeline(cfg, lambda: slow)
    p.start()
    try:
        wait_for(lambda: p.ended, timeout=60, what="the source to end")
    finally:
        p.stop()
    m = p.metrics
    assert counter(m, "frames_dropped", stream="cam0", reason="overload") > 0
    assert counter(m, "frames_blanked", stream="cam0", reason="deadline") > 0


def test_streams_are_independent_of_a_failing_one(clip: Clip, tmp_path: Path) -> None:
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(b"\x00\x00\x01 not a video at all " * 200)
    doc = config(clip, n=1).model_dump(mode="json")
    doc["streams"].append({"id": "broken", "source": {"type": "file", "path": str(bad)}})
    cfg = parse_config(doc)
    det = NoFaces()
    p = Pipeline(cfg, lambda: det)
    p.start()
    try:
        wait_for(lambda: p.streams["cam0"].state == "ended", timeout=30, what="the good stream to finish")
        broken = p.streams["broken"]
        assert broken.state == "down"
        assert broken.error and str(bad) in broken.error
        assert counter(p.metrics, "frames_in", stream="cam0") == len(clip.face_boxes)
    finally:
        p.stop()


def test_stop_returns_quickly_with_looping_sources(clip: Clip) -> None:
    cfg = parse_config({"streams": [{"id": f"c{i}", "source": {"type": "file", "path": str(clip.path),
                                                                 "loop": True}} for i in range(3)]})
    det = NoFaces()
    p = Pipeline(cfg, lambda: det)
    p.start()
    wait_for(lambda: all(counter(p.metrics, "frames_published", stream=s) > 5 for s in p.streams))
    t0 = time.monotonic()
    p.stop(timeout=3)
    assert time.monotonic() - t0 < 6
    assert not any(t.name.startswith(("source-", "redact-", "file-")) and t.is_alive()
                   for t in threading.enumerate())


class Recorder(Observer):
    def __init__(self) -> None:
        self.frames: list[tuple[int, int, object]] = []
        self.states: list[tuple[str, str]] = []
        self.incidents: list[tuple[str, int, bool]] = []
        self.tracks: list[tuple[int, TrackChanges]] = []

    def frame(self, frame: Frame, detections: Detections, failure: Failure | None,
              tracks: TrackChanges | None = None) -> None:
        ids = detections.track_ids.tolist() if detections.track_ids is not None else []
        self.frames.append((frame.seq, len(ids), failure))
        if tracks is not None:
            self.tracks.append((frame.seq, tracks))

    def state(self, stream_id: str, state: str, error: str | None) -> None:
        self.states.append((stream_id, state))

    def incident(self, stream_id: str, reason: Failure, frames: int, ended: bool, action: str) -> None:
        self.incidents.append((reason.value, frames, ended))


def run_to_end(p: Pipeline) -> Recorder:
    """Run ``p`` with a :class:`Recorder` watching until its file sources end."""
    rec = Recorder()
    p.observers.append(rec)
    p.start()
    try:
        wait_for(lambda: p.ended, timeout=60, what="the source to end")
    finally:
        p.stop()
    return rec


def test_observers_see_frames_states_and_incidents(clip: Clip) -> None:
    rec = run_to_end(Pipeline(config(clip), Raises))
    assert rec.states[0] == ("cam0", "up") and ("cam0", "ended") in rec.states
    failed = [f for f in rec.frames if f[2] is not None]
    assert failed and len(failed) == len(rec.frames)
    assert rec.incidents[0][1:] == (1, False)
    assert rec.incidents[-1] == (rec.incidents[0][0], len(failed), True)
    seqs = [f[0] for f in rec.frames]
    assert seqs == sorted(seqs)


def test_observers_get_tracked_detections(clip: Clip) -> None:
    rec = Recorder()
    cfg = config(clip)
    p = Pipeline(cfg, detector_factory_for(cfg))
    p.observers.append(rec)
    p.start()
    try:
        wait_for(lambda: p.ended, timeout=60, what="the source to end")
    finally:
        p.stop()
    assert rec.frames and all(f[2] is None for f in rec.frames)
    assert sum(f[1] > 0 for f in rec.frames) >= len(rec.frames) - 2  # face tracked in (nearly) every frame
    assert rec.incidents == []


class FaceForAWhile:
    """Finds one face (its score rising, then falling) in the first ``frames`` frames, then nothing."""

    def __init__(self, frames: int) -> None:
        self.frames, self.seen = frames, 0
        self.lock = threading.Lock()

    def __call__(self, images: list[np.ndarray], seqs: object = None) -> list[Detections]:
        out = []
        for _ in images:
            with self.lock:
                self.seen += 1
                n = self.seen
            if n > self.frames:
                out.append(Detections())
                continue
            score = 0.5 + 0.4 * (1 - abs(n - self.frames / 2) / (self.frames / 2))
            out.append(Detections(boxes=np.array([[100, 60, 160, 130]], np.float32),
                                  scores=np.array([score], np.float32), labels=("face",)))
        return out


def test_live_frames_report_track_life_from_the_masking_stage(clip: Clip) -> None:
    """The stream's tracker (in the same masking stage files use) says when a track starts and ends,
    with its best detection; observers and the control-room list get it from there."""
    cfg = config(clip, fail_closed={"max_latency_ms": 20_000})  # a loaded machine blanks no frame here
    det = FaceForAWhile(10)
    p = Pipeline(cfg, lambda: det)
    rec = run_to_end(p)
    started = [(seq, t) for seq, ch in rec.tracks for t in ch.started]
    ended = [(seq, t) for seq, ch in rec.tracks for t in ch.ended]
    assert len(started) == 1 and len(ended) == 1, (started, ended)
    (first_seq, first), (end_seq, last) = started[0], ended[0]
    assert first.track_id == last.track_id and first.first_seen is not None
    assert first.first_seen.seq == first_seq and first.first_seen.size == (320, 240)
    assert last.first_seen == first.first_seen and last.hits == 10
    assert last.last_seen is not None and last.best_seen is not None
    assert first_seq <= last.best_seen.seq <= last.last_seen.seq < end_seq
    assert last.best_score == pytest.approx(0.9)
    assert [r["track_id"] for r in p.streams["cam0"].status()["recent"]] == [first.track_id]


def switched_clip(path: Path, frames: int = 32) -> Path:
    """A camera switch half-way: a dim view of a cat, then a bus in daylight (an H.264 file)."""
    first = (cv2.resize(read_bgr(CHELSEA), (320, 240), interpolation=cv2.INTER_AREA) * 0.6).astype(np.uint8)
    second = cv2.resize(read_bgr(BUS), (320, 240), interpolation=cv2.INTER_AREA)
    return encode_frames(path, [first] * (frames // 2) + [second] * (frames - frames // 2))


def test_a_cut_to_another_view_ends_the_old_views_masks(tmp_path: Path) -> None:
    """A VMS or a PTZ tour switches the camera's view: the face track of the first view ends at the
    switch instead of coasting 12 frames over the second one, and the stream counts the cut."""
    clip = Clip(switched_clip(tmp_path / "switch.mp4"), 32, 320, 240, Fraction(25), [None] * 32, False)
    p = Pipeline(config(clip, fail_closed={"max_latency_ms": 20_000}), lambda: FaceForAWhile(10))
    rec = run_to_end(p)
    ended = [(seq, t) for seq, ch in rec.tracks for t in ch.ended]
    assert len(ended) == 1, ended
    end_seq, track = ended[0]
    # frame numbers start at 1 and the view switches after 16 frames: the first second-view frame tracked
    first_of_second_view = min(seq for seq, _, _ in rec.frames if seq >= 17)
    assert track.last_seen is not None and track.last_seen.seq <= 16
    assert end_seq == first_of_second_view, "ended at the switch"
    assert end_seq < track.last_seen.seq + 12, "before its 12 frames of coasting ran out"
    assert all(n == 0 for seq, n, _ in rec.frames if seq >= end_seq), "a mask of the first view after the cut"
    assert any(n == 1 for seq, n, _ in rec.frames if 10 < seq < end_seq), "within the first view it coasted"
    assert sample(p.metrics, "stream_redact_shot_cuts_total", stream="cam0") == 1


def test_a_frames_deadline_counts_from_when_its_data_arrived(clip: Clip) -> None:
    """A frame whose packet arrived longer ago than max_latency_ms is never detected nor published,
    however fresh it is out of the decoder; one that arrived just now is."""
    cfg = parse_config({"streams": [{"id": "cam", "source": {"type": "whip"}}],
                        "detection": {"providers": ["cpu"]}, "fail_closed": {"max_latency_ms": 500}})
    det = NoFaces()
    p = Pipeline(cfg, lambda: det)
    cap = Captured()
    p.start()
    try:
        runner = p.streams["cam"]
        runner.on_redacted.append(cap)
        image = np.zeros((48, 64, 3), np.uint8)
        runner.on_frame(image.copy(), None, arrived=time.monotonic() - 2.0)
        runner.on_frame(image.copy(), None, arrived=time.monotonic())
        wait_for(lambda: len(cap.frames) == 1, what="the fresh frame to be published")
        assert counter(p.metrics, "frames_dropped", stream="cam", reason="overload") == 1
        assert cap.frames[0][0].seq == 2 and det.batches == [1]
    finally:
        p.stop()


def test_arrivals_follow_packets_through_a_reordering_decoder() -> None:
    a = Arrivals()
    assert a.frame(0) is None  # nothing arrived yet
    for pts, t in [(0, 10.0), (3, 10.1), (1, 10.2), (2, 10.3)]:  # I P B B in decode order
        a.packet(pts, t)
    # frames come out in display order 0, 1, 2, 3; frame 3's data came early, but it cannot be
    # older than frame 2 shown before it
    assert [a.frame(p) for p in (0, 1, 2, 3)] == [10.0, 10.2, 10.3, 10.3]
    a.packet(None, 11.0)
    assert a.frame(None) == 11.0 and a.frame(99) == 11.0  # unknown: the newest packet's time
