"""Audio redaction on its own: speech muted from its first syllable, everything else kept, fail closed.

The material is made here: espeak-ng speech, a siren and street-like noise mixed at known times
(tests/audio_material.py), so each assertion knows where speech is and where it is not.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from audio_material import HAVE_ESPEAK, Scene, make_scene, read_av, segment_energy, write_av_clip
from live_helpers import counter, wait_for

from stream.audio.codec import RATE
from stream.audio.redactor import AudioPolicy, AudioRedactConfig, AudioRedactor, MuteReason, SpeechSegment
from stream.audio.vad import SpeechModel, SpeechTracker, shared_model
from stream.config import parse_config
from stream.config.audio import AudioConfig
from stream.core.metrics import Metrics, sample
from stream.core.observe import Observer
from stream.live.audio_lane import ArrivalClock, AudioLane
from stream.live.pipeline import Pipeline
from stream.live.service import detector_factory_for

needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng missing: apt-get install espeak-ng")


@pytest.fixture(scope="module")
def scene() -> Scene:
    if not HAVE_ESPEAK:
        pytest.skip("espeak-ng missing: apt-get install espeak-ng")
    return make_scene(duration=12.0, rate=RATE, seed=3)


def redact(x: np.ndarray, policy: AudioPolicy = AudioPolicy.MUTE_SPEECH, block: int = 960,
           model: SpeechModel | None = None, t0: float = 50.0,
           segments: list[SpeechSegment] | None = None) -> tuple[np.ndarray, AudioRedactor, list[float]]:
    """Feed ``x`` (mono) in blocks as a live source would; returns the output, the redactor and the
    time of each released block's first sample."""
    red = AudioRedactor(RATE, 1, AudioRedactConfig(policy=policy, key=7), model=model,
                        on_segment=None if segments is None else segments.append)
    out, times = [], []
    for i in range(0, len(x), block):
        for r in red.push(x[i:i + block, None], t0 + i / RATE):
            out.append(r.samples[:, 0])
            times.append(r.t)
    for r in red.flush():
        out.append(r.samples[:, 0])
        times.append(r.t)
    return np.concatenate(out), red, times


def muted_share(y: np.ndarray, intervals: list[tuple[float, float]], floor: float = 1e-4) -> float:
    """The share of the samples inside ``intervals`` that come out silent."""
    total = silent = 0
    for a, b in intervals:
        part = np.abs(y[round(a * RATE):round(b * RATE)])
        total += len(part)
        silent += int((part < floor).sum())
    return silent / max(1, total)


@needs_espeak
def test_speech_is_muted_from_its_first_syllable_and_the_siren_is_kept(scene: Scene) -> None:
    y, red, times = redact(scene.samples)
    assert len(y) == len(scene.samples), "every sample goes out, none twice"
    assert times[0] == pytest.approx(50.0) and all(b > a for a, b in itertools.pairwise(times))
    # every speech sample silent, including the first 100 ms of each utterance (the look-ahead's job)
    assert muted_share(y, scene.speech) >= 0.99
    assert muted_share(y, [(a, a + 0.1) for a, _ in scene.speech]) == 1.0
    # the siren and the markers come through unchanged
    sirens = segment_energy(scene.samples, RATE, scene.siren)
    for got, sent in zip(segment_energy(y, RATE, scene.siren), sirens, strict=True):
        assert got == pytest.approx(sent, abs=0.5)
    quiet = _gaps(scene)
    kept = 1 - muted_share(y, quiet)
    assert kept >= 0.8, f"only {kept:.0%} of the time without speech was kept"
    assert red.totals[MuteReason.FAULT] == red.totals[MuteReason.LATE] == 0


def _gaps(scene: Scene) -> list[tuple[float, float]]:
    """Stretches at least 0.6 s from any speech (the hangover and look-ahead may mute near it)."""
    edges = sorted(scene.speech)
    out, t = [], 0.0
    for a, b in edges:
        if a - 0.6 > t:
            out.append((t, a - 0.6))
        t = b + 0.6
    if scene.duration > t:
        out.append((t, scene.duration))
    return out


@needs_espeak
def test_speech_segments_are_reported_where_the_speech_is(scene: Scene) -> None:
    segments: list[SpeechSegment] = []
    redact(scene.samples, segments=segments)
    assert len(segments) >= len(scene.speech)
    for a, b in scene.speech:
        hits = [s for s in segments if s.start - 50.0 < b and s.end - 50.0 > a]
        assert hits, f"utterance {a:.2f}-{b:.2f} s not reported"
        assert min(s.start for s in hits) - 50.0 == pytest.approx(a, abs=0.25)
        assert max(s.end for s in hits) - 50.0 == pytest.approx(b, abs=0.6)
        assert all(0.5 <= s.probability <= 1 for s in hits)


@needs_espeak
def test_block_size_does_not_change_what_is_muted(scene: Scene) -> None:
    a, _, _ = redact(scene.samples, block=441)
    b, _, _ = redact(scene.samples, block=4096)
    assert np.mean((np.abs(a) < 1e-6) != (np.abs(b) < 1e-6)) < 0.01


@needs_espeak
def test_keep_passes_audio_unchanged_and_drop_gives_none(scene: Scene) -> None:
    y, red, _ = redact(scene.samples, AudioPolicy.KEEP)
    assert np.array_equal(y, scene.samples) and red.delay_s == 0
    dropped = AudioRedactor(RATE, 1, AudioRedactConfig(policy=AudioPolicy.DROP))
    assert dropped.push(scene.samples[:960, None], 0.0) == [] and dropped.flush() == []


class FailingModel:
    """The real speech model, raising on calls ``fail_from`` to ``fail_to`` (a crashed session)."""

    def __init__(self, fail_from: int, fail_to: int) -> None:
        self.model = shared_model()
        self.calls = 0
        self.fail_from, self.fail_to = fail_from, fail_to

    def score(self, chunks: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if self.fail_from <= self.calls < self.fail_to:
            raise RuntimeError("injected detector failure")
        return self.model.score(chunks, state)


def test_a_failing_detector_mutes_what_it_covered_and_recovers() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(6 * RATE) / RATE
    x = (0.2 * np.sin(2 * np.pi * 900 * t) + rng.normal(0, 0.01, len(t))).astype(np.float32)  # no speech
    model = FailingModel(fail_from=40, fail_to=80)  # chunks of 32 ms: about 1.3-2.6 s
    y, red, _ = redact(x, model=model)  # type: ignore[arg-type]
    assert len(y) == len(x)
    silent = np.abs(y) < 1e-6
    assert silent[round(1.5 * RATE):round(2.4 * RATE)].all(), "audio the failed detector covered went out"
    assert red.faults > 0 and red.totals[MuteReason.FAULT] >= 0.8 * RATE
    assert not silent[round(4 * RATE):].any(), "the detector never came back"


def test_late_blocks_are_muted_without_being_scored() -> None:
    x = (0.2 * np.sin(2 * np.pi * 500 * np.arange(2 * RATE) / RATE)).astype(np.float32)
    red = AudioRedactor(RATE, 1, AudioRedactConfig())
    out = []
    for i in range(0, len(x), 960):
        late = RATE // 2 <= i < RATE
        out += [r.samples[:, 0] for r in red.push(x[i:i + 960, None], i / RATE, late=late)]
    out += [r.samples[:, 0] for r in red.flush()]
    y = np.concatenate(out)
    assert (np.abs(y[RATE // 2:RATE]) < 1e-6).all()
    assert red.totals[MuteReason.LATE] == RATE // 2
    assert np.abs(y[round(1.5 * RATE):]).max() > 0.1


def test_a_jump_in_the_callers_clock_moves_the_timeline_not_the_audio() -> None:
    x = np.zeros((RATE, 1), dtype=np.float32)
    red = AudioRedactor(RATE, 1, AudioRedactConfig())
    times = [r.t for i in range(0, RATE, 960) for r in red.push(x[i:i + 960], 10.0 + i / RATE)]
    times += [r.t for i in range(0, RATE, 960) for r in red.push(x[i:i + 960], 30.0 + i / RATE)]
    assert times[0] == pytest.approx(10.0)
    assert max(times) > 30.0 and max(times) < 31.0
    assert all(b > a for a, b in itertools.pairwise(times))


def test_the_tracker_counts_chunks_in_the_callers_samples() -> None:
    tracker = SpeechTracker(shared_model(), 8000)
    decisions = tracker.feed(np.zeros(8000, dtype=np.float32))
    assert [d.end for d in decisions] == [256 * k for k in range(1, len(decisions) + 1)]
    assert len(decisions) == 31 and not any(d.speaking for d in decisions)


def test_arrival_clock_takes_the_steady_offset_and_follows_a_reconnect() -> None:
    clock = ArrivalClock()
    assert clock.time(1.0, 101.05) == pytest.approx(101.05)
    assert clock.time(1.02, 101.10) == pytest.approx(101.07)  # arrived late: jitter, not time
    assert clock.time(1.04, 101.08) == pytest.approx(101.08)  # a faster arrival lowers the offset
    assert clock.time(0.0, 200.0) == pytest.approx(200.0)  # the media clock started again


def frame(samples: np.ndarray, pts: int, rate: int = RATE):
    import av

    f = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16).reshape(1, -1), format="s16",
                                   layout="mono")
    f.sample_rate, f.pts = rate, pts
    from fractions import Fraction

    f.time_base = Fraction(1, rate)
    return f


def test_the_lane_holds_audio_until_the_video_of_its_moment_is_out() -> None:
    metrics = Metrics()
    lane = AudioLane("cam", AudioConfig(), metrics, max_latency_s=10.0)
    got: list[tuple[int, float]] = []
    lock = threading.Lock()

    def sink(samples: np.ndarray, t: float) -> None:
        with lock:
            got.append((len(samples), t))

    lane.sinks.append(sink)
    lane.start()
    try:
        start = time.monotonic()
        tone = (0.1 * np.sin(2 * np.pi * 700 * np.arange(960) / RATE)).astype(np.float32)
        for k in range(50):  # one second of audio, all arrived now
            lane.on_audio(frame(tone, k * 960), arrived=start + k * 0.02)
        # no video yet: nothing is released while its video could still come
        kept = "stream_redact_audio_seconds_total"
        wait_for(lambda: sample(metrics, kept, stream="cam", result="kept") > 0.5, what="the lane to redact")
        with lock:
            assert got == []
        lane.video_published(start + 0.5)
        wait_for(lambda: bool(got), what="audio up to the published video to go out")
        with lock:
            assert all(t + n / RATE <= start + 0.5 + 0.021 for n, t in got)
    finally:
        lane.stop()
    with lock:
        total = sum(n for n, _ in got)
    assert total == 50 * 960, "stop releases the held tail"
    assert sample(metrics, "stream_redact_audio_delay_seconds", stream="cam") == pytest.approx(lane.delay_s)


class Muted(Observer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def audio_muted(self, stream_id: str, reason: str, seconds: float) -> None:
        self.calls.append((reason, seconds))


@needs_espeak
def test_a_live_stream_whose_speech_detector_fails_publishes_silence(
        scene: Scene, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = write_av_clip(tmp_path / "in.mp4", scene, size=(160, 90), face=False)

    def broken(self: SpeechModel, chunks: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError("injected speech detector failure")

    monkeypatch.setattr(SpeechModel, "score", broken)
    out = tmp_path / "out.mp4"
    cfg = parse_config({"streams": [{"id": "cam", "source": {"type": "file", "path": str(clip)},
                                     "outputs": [{"type": "file", "path": str(out)}]}],
                        "detection": {"preset": "fast", "plates": False, "heads": False,
                                      "providers": ["cpu"]}})
    p = Pipeline(cfg, detector_factory_for(cfg))
    muted = Muted()
    p.observers.append(muted)
    p.start()
    try:
        wait_for(lambda: p.ended, timeout=60, what="the file source to end")
    finally:
        p.stop()
    got = read_av(out)
    assert len(got.audio) > 0.8 * scene.duration * got.rate, "the audio track must stay (silent), not vanish"
    assert np.abs(got.audio).max() < 1e-3, "audio the failed detector covered was published"
    assert counter(p.metrics, "audio_faults", stream="cam") > 0
    assert counter(p.metrics, "audio_seconds", stream="cam", result="fault") > 0.8 * scene.duration
    assert counter(p.metrics, "audio_seconds", stream="cam", result="kept") == 0
    assert muted.calls and {r for r, _ in muted.calls} == {"fault"}
    assert counter(p.metrics, "frames_published", stream="cam") > 0, "video goes on"


def test_an_output_keeps_a_gap_as_a_gap_and_cuts_audio_reaching_back_into_written_time(
        tmp_path: Path) -> None:
    import av

    from stream.audio.codec import AudioOut

    container = av.open(str(tmp_path / "a.mp4"), "w")
    out = AudioOut(container, "aac", 1)
    block = np.full((4800, 1), 0.1, dtype=np.float32)  # 100 ms
    packets = out.encode(block, 0) + out.encode(block, 4800)
    packets += out.encode(block, RATE)  # 0.8 s later than the last block ended: a gap
    packets += out.encode(block, RATE + 2400)  # half of it lies in time already written: cut
    packets += out.flush()
    starts = sorted(p.pts for p in packets if p.pts is not None and p.pts >= 0)
    assert any(a < 9600 + 1024 and b >= RATE - 1024 for a, b in itertools.pairwise(starts)), "gap lost"
    after = [s for s in starts if s >= RATE - 1024]
    # 100 ms + the 50 ms not already written: about 7 frames of 1024, not 10
    assert 6 <= len(after) <= 8, after
    container.close()
