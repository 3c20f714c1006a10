"""`stream-redact redact` on files with sound: speech muted or disguised, the rest kept, in sync."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from audio_material import HAVE_ESPEAK, Scene, make_scene, read_av, segment_energy, write_av_clip
from helpers import run_cli
from live_helpers import counter, wait_for

from stream.config import parse_config
from stream.live.pipeline import Pipeline
from stream.live.publish import custody
from stream.live.service import detector_factory_for

pytestmark = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng missing: apt-get install espeak-ng")

FAST = ["--preset", "fast", "--no-plates", "--no-heads", "--no-progress"]


@pytest.fixture(scope="module")
def scene() -> Scene:
    return make_scene(9.0, seed=11)


@pytest.fixture(scope="module")
def clip(scene: Scene, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_av_clip(tmp_path_factory.mktemp("audio-files") / "scene.mp4", scene, size=(320, 180))


def trimmed(intervals: list[tuple[float, float]], by: float) -> list[tuple[float, float]]:
    return [(a + by, b - by) for a, b in intervals]


def test_default_mutes_speech_keeps_the_siren_and_stays_in_sync(clip: Path, scene: Scene,
                                                                  tmp_path: Path) -> None:
    out, masks = tmp_path / "out.mp4", tmp_path / "masks.json"
    res = run_cli("redact", clip, "-o", out, "--masks-json", masks, *FAST)
    assert res.returncode == 0, res.stderr
    got = read_av(out)
    assert got.audio_codec == "aac" and abs(got.audio_start) < 0.05
    audio = got.audio[max(0, round(-got.audio_start * got.rate)):]
    assert len(audio) >= (scene.duration - 0.1) * got.rate
    assert all(e < -60 for e in segment_energy(audio, got.rate, scene.speech)), \
        segment_energy(audio, got.rate, scene.speech)
    sent = segment_energy(scene.samples, scene.rate, trimmed(scene.siren, 0.05))
    kept = segment_energy(audio, got.rate, trimmed(scene.siren, 0.05))
    assert all(abs(a - b) < 1.5 for a, b in zip(sent, kept, strict=True)), (sent, kept)
    offsets = got.offsets()
    assert len(offsets) >= 2 and max(abs(o) for o in offsets) <= 0.04, offsets  # within one frame
    doc = json.loads(masks.read_text())["audio"]
    assert doc["policy"] == "mute_speech" and doc["muted_s"]["fault"] == 0
    found = doc["speech"]
    for a, b in scene.speech:
        assert any(s <= a + 0.1 and e >= b - 0.1 for s, e in found), (a, b, found)
    # muted: the segments plus a look-ahead before each
    assert doc["muted_s"]["speech"] == pytest.approx(sum(e - s for s, e in found),
                                                     abs=0.5 + 0.35 * len(found))


def test_disguise_keeps_the_words_but_not_the_waveform(clip: Path, scene: Scene, tmp_path: Path) -> None:
    out = tmp_path / "out.mkv"
    res = run_cli("redact", clip, "-o", out, "--audio", "disguise", *FAST)
    assert res.returncode == 0, res.stderr
    got = read_av(out)
    audio = got.audio[max(0, round(-got.audio_start * got.rate)):]
    for (a, b), sent, heard in zip(scene.speech, segment_energy(scene.samples, scene.rate, scene.speech),
                                   segment_energy(audio, got.rate, scene.speech), strict=True):
        assert abs(sent - heard) < 6, "disguised speech must stay audible"
        x = scene.samples[round(a * scene.rate):round(b * scene.rate)]
        y = audio[round(a * got.rate):round(b * got.rate)][:len(x)]
        corr = float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-9))
        assert abs(corr) < 0.3, f"the voice came through nearly unchanged (correlation {corr:.2f})"
    sent = segment_energy(scene.samples, scene.rate, trimmed(scene.siren, 0.1))
    kept = segment_energy(audio, got.rate, trimmed(scene.siren, 0.1))
    assert all(abs(a - b) < 1.5 for a, b in zip(sent, kept, strict=True)), (sent, kept)


def test_opus_in_matroska_is_redacted_too(scene: Scene, tmp_path: Path) -> None:
    src = write_av_clip(tmp_path / "in.mkv", scene, size=(160, 90), audio_codec="libopus", face=False)
    out = tmp_path / "out.mp4"
    res = run_cli("redact", src, "-o", out, *FAST)
    assert res.returncode == 0, res.stderr
    got = read_av(out)
    audio = got.audio[max(0, round(-got.audio_start * got.rate)):]
    assert all(e < -60 for e in segment_energy(audio, got.rate, scene.speech))


def test_drop_writes_no_audio_and_contradicting_options_are_refused(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    res = run_cli("redact", clip, "-o", out, "--audio", "drop", *FAST)
    assert res.returncode == 0, res.stderr
    with pytest.raises(ValueError, match="one video and one audio"):
        read_av(out)
    res = run_cli("redact", clip, "-o", tmp_path / "x.mp4", "--keep-audio", "--audio", "mute_speech", *FAST)
    assert res.returncode == 2
    assert "--keep-audio and --audio mute_speech contradict" in res.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_recordings_carry_the_redacted_audio_and_still_verify(clip: Path, scene: Scene,
                                                              tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    rec.mkdir()
    cfg = parse_config({"streams": [{"id": "cam", "source": {"type": "file", "path": str(clip)},
                                     "outputs": [{"type": "record", "dir": str(rec), "segment_s": 2}]}],
                        "detection": {"preset": "fast", "plates": False, "heads": False,
                                      "providers": ["cpu"]}})
    p = Pipeline(cfg, detector_factory_for(cfg))
    p.start()
    try:
        wait_for(lambda: p.ended, timeout=60, what="the file source to end")
    finally:
        p.stop()
    report = custody.verify_stream(rec / "cam")
    assert report.ok, report.problems
    assert len(report.links) >= 3
    heard = []
    for link in report.links:
        got = read_av(link.segment)
        assert got.audio_codec == "aac"
        heard.append(len(got.audio) / got.rate)
    # every second of sound is in some segment: none is lost where one segment ends and the next begins
    assert sum(heard) > scene.duration - 0.5, heard
    assert counter(p.metrics, "audio_seconds", stream="cam", result="speech") > 1.0
    # an export of the middle carries the same stretch of sound, and still verifies
    chain = report.links
    start, end = chain[1].start + 0.2, chain[2].start + 1.0
    export = tmp_path / "export.mp4"
    res = run_cli("export", "cam", "--dir", rec, "--from", custody.iso(start), "--to", f"{end:.3f}",
                  "-o", export)
    assert res.returncode == 0, res.stderr
    got = read_av(export)
    assert got.audio_codec == "aac"
    video_s = got.frames[-1][0] - got.frames[0][0]
    assert abs(len(got.audio) / got.rate - video_s) < 0.2, (len(got.audio) / got.rate, video_s)
    assert abs(got.audio_start - got.frames[0][0]) < 0.1
    res = run_cli("verify-export", export)
    assert res.returncode == 0 and "verified" in res.stdout, res.stderr
