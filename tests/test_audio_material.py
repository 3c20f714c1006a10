"""The self-made A/V material (tests/audio_material.py): its ground truth, and the meters that later
tests use to check muted speech, kept sirens and lip-sync, tried first on material whose answer is known."""

from __future__ import annotations

import itertools
from pathlib import Path

import audio_material as am
import numpy as np
import pytest

needs_espeak = pytest.mark.skipif(not am.HAVE_ESPEAK,
                                  reason="espeak-ng is missing (apt-get install espeak-ng)")
FPS = 25


@pytest.fixture(scope="module")
def scene() -> am.Scene:
    return am.make_scene()


def gaps(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Seconds between two intervals (negative when they overlap)."""
    return max(a[0], b[0]) - min(a[1], b[1])


@needs_espeak
def test_scene_ground_truth_is_consistent(scene: am.Scene) -> None:
    assert scene.samples.dtype == np.float32 and scene.samples.ndim == 1
    assert len(scene.samples) == round(scene.duration * scene.rate)
    assert len(scene.speech) == len(scene.texts) == 3 and len(set(scene.texts)) == 3
    assert len(scene.siren) == 1 and 1.9 <= scene.siren[0][1] - scene.siren[0][0] <= 2.1
    assert all(1.0 <= end - start <= 2.5 for start, end in scene.speech), scene.speech
    events = sorted(scene.speech + scene.siren)
    assert all(0 <= start < end <= scene.duration for start, end in events)
    assert all(gaps(a, b) > 0.3 for a, b in itertools.pairwise(events)), events
    assert len(scene.markers) == len(events) + 1
    steps = np.diff(scene.markers)
    assert (steps >= 2.5 - 1e-9).all() and (steps <= 3.0).all(), steps
    for t in scene.markers:
        assert abs(t / am.MARKER_GRID_S - round(t / am.MARKER_GRID_S)) < 1e-9, t
        assert t + am.BEEP_S <= scene.duration
        assert all(gaps((t, t + am.BEEP_S), event) >= 0.2 - 1e-6 for event in events), (t, events)
    # Every event sits between two markers: a reader that skips the first marker loses no event.
    assert scene.markers[0] < events[0][0] and events[-1][1] < scene.markers[-1]


@needs_espeak
def test_scene_levels(scene: am.Scene) -> None:
    speech, siren = scene.speech, scene.siren
    noise = [(scene.markers[0] + 0.1, scene.markers[0] + 0.4)]
    levels = am.segment_energy(scene.samples, scene.rate, [*speech, *siren, *noise])
    assert all(-26 <= level <= -14 for level in levels[:len(speech)]), levels
    assert -20 <= levels[len(speech)] <= -12, levels
    assert -40 <= levels[-1] <= -30, levels  # the ambient bed alone
    assert am.segment_energy(np.zeros(100), 100, [(0, 1), (2, 3)]) == [-120.0, -120.0]


@needs_espeak
def test_speech_is_trimmed_and_resampled() -> None:
    a = am.speech("hello there", rate=16000)
    b = am.speech("hello there", rate=48000)
    assert a.dtype == b.dtype == np.float32
    assert abs(len(b) / 48000 - len(a) / 16000) < 0.01
    assert abs(a[0]) > 0.01 and abs(a[-1]) > 0.01
    assert 0.5 < len(a) / 16000 < 2.0


def test_missing_espeak_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    am._espeak.cache_clear()
    monkeypatch.setattr(am, "HAVE_ESPEAK", False)
    try:
        with pytest.raises(am.EspeakMissing, match="apt-get install espeak-ng"):
            am.speech("anything")
    finally:
        am._espeak.cache_clear()


@needs_espeak
def test_find_beeps_finds_every_marker_and_nothing_else(scene: am.Scene) -> None:
    beeps = am.find_beeps(scene.samples, scene.rate)
    assert len(beeps) == len(scene.markers), (beeps, scene.markers)
    assert all(abs(b - m) <= 0.010 for b, m in zip(beeps, scene.markers, strict=True)), beeps


def test_find_beeps_ignores_a_siren_passing_through_the_tone() -> None:
    rate = 48000
    siren = am.siren(4.0, rate)
    noise = am.ambient(4.0, rate, seed=3)
    mix = siren + noise
    mix[round(3.0 * rate):round(3.0 * rate) + round(am.BEEP_S * rate)] += am.beep(rate=rate)
    assert am.find_beeps(siren, rate) == []
    assert [round(t, 2) for t in am.find_beeps(mix, rate)] == [3.0]
    assert am.find_beeps(noise, rate) == []


def test_av_offsets_pairs_each_flash_with_the_nearest_beep() -> None:
    assert am.av_offsets([1.0, 3.52, 9.0], [0.98, 3.5, 6.0]) == pytest.approx([0.02, 0.02])
    assert am.av_offsets([1.0], []) == []
    frames = [(i / FPS, np.full((4, 4), 255 if i in (5, 6, 30) else 90, np.uint8)) for i in range(40)]
    assert am.find_flashes(frames) == [0.2, 1.2]


@needs_espeak
@pytest.mark.parametrize(("name", "codec", "rate"), [("clip.mp4", "aac", 48000),
                                                     ("clip.mkv", "libopus", 48000),
                                                     ("clip.mov", "pcm_mulaw", 8000)])
def test_clip_read_back_is_in_sync(scene: am.Scene, tmp_path: Path, name: str, codec: str, rate: int) -> None:
    path = am.write_av_clip(tmp_path / name, scene, size=(320, 180), fps=FPS, audio_codec=codec)
    capture = am.read_av(path)
    assert capture.rate == rate
    assert capture.frames[0][0] == 0 and abs(capture.audio_start) < 0.005
    assert len(capture.frames) == round(scene.duration * FPS)
    assert capture.frames[0][1].shape == (45, 80)
    assert capture.flashes() == pytest.approx(scene.markers, abs=0.5 / FPS)
    assert capture.beeps() == pytest.approx(scene.markers, abs=0.010)
    offsets = capture.offsets()
    assert len(offsets) == len(scene.markers)
    assert all(abs(o) <= 1 / FPS for o in offsets), offsets
    # After encoding the speech is still speech-loud and the siren is still there.
    levels = am.segment_energy(capture.audio, capture.rate, [*scene.speech, *scene.siren])
    assert all(level > -30 for level in levels), levels


@needs_espeak
def test_clip_without_face_and_refused_containers(scene: am.Scene, tmp_path: Path) -> None:
    path = am.write_av_clip(tmp_path / "plain.mp4", scene, size=(160, 96), fps=10, face=False)
    capture = am.read_av(path, scale=1)
    assert len(capture.frames) == round(scene.duration * 10)
    assert capture.flashes() == pytest.approx(scene.markers, abs=0.001)  # markers fall on 10 fps frames
    for bad, codec, hint in [("x.mkv", "pcm_mulaw", r"\.mov"), ("x.mp4", "libopus", r"\.mkv"),
                             ("x.avi", "aac", "container")]:
        with pytest.raises(ValueError, match=hint):
            am.write_av_clip(tmp_path / bad, scene, audio_codec=codec)
    with pytest.raises(ValueError, match="even"):
        am.write_av_clip(tmp_path / "odd.mp4", scene, size=(161, 96))
