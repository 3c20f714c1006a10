"""`stream-redact redact` on short videos built here with PyAV: frames, rate, size, audio, masks, formats."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from helpers import Clip, check_masks_contract, contains, laplacian_var, make_clip, read_video, run_cli

pytestmark = pytest.mark.slow

FAST = ("--no-heads", "--input-size", "320", "--no-progress")


def warning_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("stream-redact: warning:")]


def assert_faces_obscured(clip: Clip, src_frames: list[np.ndarray], out_frames: list[np.ndarray],
                          doc: dict) -> None:
    for i, box in enumerate(clip.face_boxes):
        if box is None:
            continue
        before = laplacian_var(src_frames[i], box, 3)
        after = laplacian_var(out_frames[i], box, 3)
        assert after < 0.3 * before, f"frame {i}: face energy {before:.0f} -> {after:.0f}"
        faces = [r["box"] for r in doc["frames"][i]["regions"] if r["label"] == "face"]
        assert any(contains(b, box, tol=2) for b in faces), f"frame {i}: no region covers {box}: {faces}"


@pytest.fixture(scope="module")
def redacted_face_clip(face_clip: Clip, tmp_path_factory: pytest.TempPathFactory):
    out_dir = tmp_path_factory.mktemp("face_clip_out")
    out, masks = out_dir / "out.mp4", out_dir / "masks.json"
    res = run_cli("redact", face_clip.path, "-o", out, "--masks-json", masks, "--no-progress")
    return res, out, masks


def test_video_keeps_frame_count_rate_and_odd_size(face_clip: Clip, redacted_face_clip) -> None:
    res, out, _ = redacted_face_clip
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert warning_lines(res.stderr) == [], res.stderr
    info = read_video(out)
    assert len(info.frames) == face_clip.frames == 20
    assert (info.width, info.height) == (321, 241)
    assert info.fps == Fraction(25)
    assert info.audio_codec is None


def test_video_masks_json_has_every_frame_in_order(face_clip: Clip, redacted_face_clip) -> None:
    res, _, masks = redacted_face_clip
    assert res.returncode == 0, res.stderr
    doc = json.loads(masks.read_text())
    check_masks_contract(doc, 321, 241, frames=20)
    # no face in frames 0-5; look-back (4 frames) may reach back to frame 2 at most
    for i in range(2):
        assert doc["frames"][i]["regions"] == [], f"frame {i}: {doc['frames'][i]}"


def test_video_face_obscured_in_every_frame(face_clip: Clip, redacted_face_clip) -> None:
    res, out, masks = redacted_face_clip
    assert res.returncode == 0, res.stderr
    src, dst = read_video(face_clip.path).frames, read_video(out).frames
    doc = json.loads(masks.read_text())
    assert_faces_obscured(face_clip, src, dst, doc)
    # frames without any region are passed through (up to re-encoding)
    for i, entry in enumerate(doc["frames"]):
        if not entry["regions"]:
            assert np.abs(dst[i].astype(int) - src[i].astype(int)).mean() < 3, f"frame {i} altered"


@pytest.mark.parametrize("preset", ["fast", "accurate"])
def test_skip_unchanged_still_obscures_every_face(face_clip: Clip, tmp_path: Path, preset: str) -> None:
    """Change-gated detection on a still camera (the clip's background does not move; the face
    enters at frame 6): every face frame is masked, as without it."""
    out, masks = tmp_path / "out.mp4", tmp_path / "masks.json"
    res = run_cli("redact", face_clip.path, "-o", out, "--masks-json", masks, "--no-progress",
                  "--preset", preset, "--skip-unchanged")
    assert res.returncode == 0, res.stderr
    assert warning_lines(res.stderr) == [], res.stderr
    doc = json.loads(masks.read_text())
    check_masks_contract(doc, 321, 241, frames=20)
    assert_faces_obscured(face_clip, read_video(face_clip.path).frames, read_video(out).frames, doc)


def test_fast_preset_batches_and_lanes_mask_what_one_frame_at_a_time_masks(face_clip: Clip,
                                                                           tmp_path: Path) -> None:
    """`fast` batches 4 frames by default on a CPU and splits them between the lanes: the masks are
    those of one frame at a time on one lane."""
    docs = []
    for name, extra in (("default", []), ("one", ["--batch", "1", "--lanes", "1"])):
        out, masks = tmp_path / f"{name}.mp4", tmp_path / f"{name}.json"
        res = run_cli("redact", face_clip.path, "-o", out, "--masks-json", masks, "--no-progress",
                      "--preset", "fast", *extra)
        assert res.returncode == 0, res.stderr
        docs.append(json.loads(masks.read_text()))
    batched, single = docs
    assert sum(len(f["regions"]) for f in single["frames"]) > 0
    def regions(frame: dict) -> list:
        return [(r["label"], r["box"]) for r in frame["regions"]]

    for a, b in zip(batched["frames"], single["frames"], strict=True):
        assert regions(a) == regions(b), (a, b)
    src, dst = read_video(face_clip.path).frames, read_video(tmp_path / "default.mp4").frames
    assert_faces_obscured(face_clip, src, dst, batched)


@pytest.mark.parametrize("audio", [["--keep-audio"], ["--audio", "drop"], []],
                         ids=["keep-audio", "drop-audio", "redacted-audio"])
@pytest.mark.parametrize("fmt", ["mp4", "mkv", "avi", "mov"])
def test_formats_and_audio(tmp_path: Path, fmt: str, audio: list[str]) -> None:
    clip = make_clip(tmp_path / f"in.{fmt}", frames=8, fps=Fraction(30000, 1001), audio=True)
    src = read_video(clip.path)
    assert src.audio_codec == "aac" and src.audio_packets > 0
    out, masks = tmp_path / f"out.{fmt}", tmp_path / "masks.json"
    res = run_cli("redact", clip.path, "-o", out, "--masks-json", masks, *FAST, *audio)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert warning_lines(res.stderr) == [], "a complete file reported as damaged: " + res.stderr
    info = read_video(out)
    assert len(info.frames) == 8
    assert (info.width, info.height) == (320, 240)
    assert info.fps == Fraction(30000, 1001)
    doc = json.loads(masks.read_text())
    if audio == ["--keep-audio"]:
        assert info.audio_codec == src.audio_codec
        assert info.audio_packets == src.audio_packets
    elif audio:
        assert info.audio_codec is None
    else:  # the default: re-encoded after redaction, and said so in the masks document
        assert info.audio_codec == "aac" and info.audio_packets > 0
        assert doc["audio"]["policy"] == "mute_speech"
    check_masks_contract(doc, 320, 240, frames=8)
    assert_faces_obscured(clip, src.frames, info.frames, doc)


def test_keep_audio_without_audio_track_still_works(face_clip: Clip, tmp_path: Path) -> None:
    out = tmp_path / "out.mkv"
    res = run_cli("redact", face_clip.path, "-o", out, "--keep-audio", "--no-plates", *FAST)
    assert res.returncode == 0, res.stderr
    info = read_video(out)
    assert len(info.frames) == 20 and info.audio_codec is None


def _truncate(clip: Clip, dst: Path) -> Path:
    data = clip.path.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_truncated_video_redacts_what_decodes(full_mp4_faststart: Clip, tmp_path: Path) -> None:
    src = _truncate(full_mp4_faststart, tmp_path / "half.mp4")
    decodable = len(read_video(src).frames)
    assert 0 < decodable < full_mp4_faststart.frames
    out, masks = tmp_path / "out.mp4", tmp_path / "masks.json"
    res = run_cli("redact", src, "-o", out, "--masks-json", masks, *FAST)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    info = read_video(out)
    assert len(info.frames) == decodable
    doc = json.loads(masks.read_text())
    check_masks_contract(doc, 320, 240, frames=decodable, warnings=True)
    assert any("truncat" in w for w in doc["warnings"]), doc["warnings"]


def test_truncated_video_warns_on_stderr(full_mp4_faststart: Clip, tmp_path: Path) -> None:
    src = _truncate(full_mp4_faststart, tmp_path / "half.mp4")
    res = run_cli("redact", src, "-o", tmp_path / "out.mp4", *FAST)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    warnings = warning_lines(res.stderr)
    assert any("truncated" in ln for ln in warnings), res.stderr
    assert any(re.search(r"\b24\b", ln) for ln in warnings), f"declared frame count not named: {warnings}"


def test_detector_failure_mid_video_leaves_no_output(tmp_path: Path) -> None:
    """Fail closed: a detector that raises at frame 5 ends the job with an error and no output file."""
    from stream.core.errors import UserError
    from stream.core.redact import Redactor
    from stream.core.track import Tracker
    from stream.files import JobOptions, run_job

    clip = make_clip(tmp_path / "in.mp4", frames=12)
    calls = []

    def detect(images, refs):
        from stream.core.detections import Detections

        calls.extend(r.seq for r in refs)
        if max(r.seq for r in refs) >= 5:
            raise RuntimeError("session lost")
        return [Detections() for _ in images]

    out = tmp_path / "out.mp4"
    with pytest.raises(UserError, match=r"detection failed after \d+ frames .*session lost.*removed"):
        run_job(clip.path, out, None, detect, Tracker(), Redactor(), JobOptions(batch=1, progress=False))
    assert 5 in calls
    assert not out.exists()
