"""Bad inputs to the CLI: non-zero exit, one `stream-redact: error:` line on stderr, never a traceback."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from helpers import ASTRONAUT, make_clip, run_cli

from stream.detect.models import manifest


def assert_one_error_line(res, code: int | None = None, pattern: str = "") -> str:
    assert res.returncode != 0, f"exit 0 for a bad input; stderr: {res.stderr}"
    if code is not None:
        assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{res.stderr}"
    assert lines[0].startswith("stream-redact: error: "), lines[0]
    assert re.search(pattern, lines[0], re.IGNORECASE), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_inputs")
    rng_bytes = bytes(range(256)) * 64
    files = {
        "image": d / "in.jpg",
        "dir": d / "adir",
        "gif": d / "anim.gif",
        "txt": d / "notes.txt",
        "noext": d / "noext",
        "corrupt_jpg": d / "corrupt.jpg",
        "corrupt_png": d / "corrupt.png",
        "empty_jpg": d / "empty.jpg",
        "corrupt_mp4": d / "corrupt.mp4",
        "empty_mp4": d / "empty.mp4",
        "a_file": d / "a_file",
        "audio_only": d / "audio.mp4",
    }
    shutil.copyfile(ASTRONAUT, files["image"])
    files["dir"].mkdir()
    files["gif"].write_bytes(b"GIF89a" + rng_bytes[:500])
    files["txt"].write_text("hello\n")
    files["noext"].write_bytes(ASTRONAUT.read_bytes())
    files["corrupt_jpg"].write_bytes(bytes(reversed(rng_bytes)))
    files["corrupt_png"].write_bytes(b"\x89PNG\r\n\x1a\n" + rng_bytes[:3000])
    files["empty_jpg"].write_bytes(b"")
    files["corrupt_mp4"].write_bytes(rng_bytes * 4)
    files["empty_mp4"].write_bytes(b"")
    files["a_file"].write_text("not a directory")
    _audio_only(files["audio_only"])
    # a moov-at-end mp4 cut in half: the index is gone, nothing can be decoded
    clip = make_clip(d / "full_moov_at_end.mp4", frames=12)
    data = clip.path.read_bytes()
    files["half_moov_at_end"] = d / "half.mp4"
    files["half_moov_at_end"].write_bytes(data[: len(data) // 2])
    return files


def _audio_only(path: Path) -> None:
    import av
    import numpy as np

    with av.open(str(path), "w") as c:
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
        for i in range(5):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            for p in a.encode(f):
                c.mux(p)
        for p in a.encode(None):
            c.mux(p)


# (id, argv with {name} placeholders for the files above and {tmp} for a fresh directory,
#  expected exit code (None: any non-zero), regex the error line must match)
CASES = [
    ("missing-input", ["{tmp}/nope.jpg", "-o", "{tmp}/o.jpg"], 1, r"not found.*nope\.jpg"),
    ("directory-input", ["{dir}", "-o", "{tmp}/o.jpg"], 1, r"directory"),
    ("gif-input", ["{gif}", "-o", "{tmp}/o.gif"], 2, r"unsupported file type '\.gif'"),
    ("txt-input", ["{txt}", "-o", "{tmp}/o.txt"], 2, r"unsupported file type '\.txt'"),
    ("no-extension", ["{noext}", "-o", "{tmp}/o.jpg"], 2, r"unsupported file type"),
    ("corrupt-jpg", ["{corrupt_jpg}", "-o", "{tmp}/o.jpg"], 1, r"cannot decode image.*corrupt"),
    ("empty-jpg", ["{empty_jpg}", "-o", "{tmp}/o.jpg"], 1, r"cannot decode image"),
    ("corrupt-mp4", ["{corrupt_mp4}", "-o", "{tmp}/o.mp4"], 1, r"cannot open video.*corrupt"),
    ("empty-mp4", ["{empty_mp4}", "-o", "{tmp}/o.mp4"], 1, r"video"),
    ("truncated-mp4-without-index", ["{half_moov_at_end}", "-o", "{tmp}/o.mp4"], 1, r"corrupt|truncat"),
    ("audio-only-mp4", ["{audio_only}", "-o", "{tmp}/o.mp4"], 1, r"no video stream"),
    ("output-dir-missing", ["{image}", "-o", "{tmp}/no/such/dir/o.jpg"], 1,
     r"output directory does not exist"),
    ("output-parent-is-a-file", ["{image}", "-o", "{a_file}/o.jpg"], 1, r"a_file"),
    ("masks-dir-missing", ["{image}", "-o", "{tmp}/o.jpg", "--masks-json", "{tmp}/no/m.json"], 1,
     r"output directory does not exist"),
    ("output-unwritable-image", ["{image}", "-o", "/proc/stream-redact-test.jpg"], 1, r"cannot write"),
    ("output-same-as-input", ["{image}", "-o", "{image}"], 1, r"overwrite the input"),
    ("image-to-video", ["{image}", "-o", "{tmp}/o.mp4"], 1, r"same kind"),
    ("unknown-option", ["{image}", "-o", "{tmp}/o.jpg", "--frobnicate"], 2,
     r"unrecognized arguments: --frobnicate"),
    ("negative-coast", ["{image}", "-o", "{tmp}/o.jpg", "--coast", "-1"], 2, r"--coast"),
    ("negative-lookback", ["{image}", "-o", "{tmp}/o.jpg", "--lookback", "-2"], 2, r"--lookback"),
    ("unknown-provider", ["{image}", "-o", "{tmp}/o.jpg", "--providers", "gpu"], 2, r"provider.*gpu"),
    ("empty-provider-list", ["{image}", "-o", "{tmp}/o.jpg", "--providers", ","], 2, r"provider"),
    ("bogus-provider", ["{image}", "-o", "{tmp}/o.jpg", "--providers", "bogus"], 2,
     r"--providers: unknown execution provider bogus"),
    ("one-bogus-provider-in-list", ["{image}", "-o", "{tmp}/o.jpg", "--providers", "cpu,bogus"], 2,
     r"--providers: unknown execution provider bogus\b"),
    ("plate-every-0", ["{image}", "-o", "{tmp}/o.jpg", "--plate-every", "0"], 2,
     r"redact: argument --plate-every: must be >= 1, got 0"),
    ("plate-every-not-a-number", ["{image}", "-o", "{tmp}/o.jpg", "--plate-every", "x"], 2,
     r"argument --plate-every: expected a whole number, got 'x'"),
    ("person-every-0", ["{image}", "-o", "{tmp}/o.jpg", "--person-every", "0"], 2,
     r"argument --person-every: must be >= 1"),
    ("lanes-negative", ["{image}", "-o", "{tmp}/o.jpg", "--lanes", "-1"], 2,
     r"argument --lanes: must be 0 \(one per core\) or 1 to 16, got -1"),
    ("lanes-too-many", ["{image}", "-o", "{tmp}/o.jpg", "--lanes", "17"], 2,
     r"argument --lanes: must be 0 \(one per core\) or 1 to 16, got 17"),
    ("empty-model-dir", ["{image}", "-o", "{tmp}/o.jpg", "--model-dir", "{tmp}"], 1,
     r"missing.*stream-redact models fetch"),
]

# regressions: each of these once printed a traceback, a second stderr line or a wrong prefix,
# or (--masks-json on the input/output) silently replaced a file
OUT = ["-o", "{tmp}/o.jpg"]
REGRESSION_CASES = [
    pytest.param(["{corrupt_png}", "-o", "{tmp}/o.png"], 1, r"cannot decode image", id="corrupt-png"),
    pytest.param(["{image}"], 2, r"-o/--output", id="missing-output-option"),
    pytest.param(["{image}", *OUT, "--face-threshold", "2"], 2, r"--face-threshold.*between 0 and 1",
                 id="face-threshold-2"),
    pytest.param(["{image}", *OUT, "--batch", "0"], 2, r"--batch", id="batch-0"),
    pytest.param(["{image}", *OUT, "--style", "smudge"], 2, r"--style", id="bad-style"),
    pytest.param(["{image}", *OUT, "--masks-json", "/proc/stream-redact-test.json"], 1, r"cannot write",
                 id="masks-json-unwritable"),
    pytest.param(["{image}", *OUT, "--masks-json", "{image}"], 1, r"--masks-json.*same file as the input",
                 id="masks-json-is-input"),
    pytest.param(["{image}", *OUT, "--masks-json", "{tmp}/o.jpg"], 1,
                 r"--masks-json.*same file as the input or output", id="masks-json-is-output"),
]


def _argv(template: list[str], inputs: dict[str, Path], tmp: Path) -> list[str]:
    return [a.format(tmp=tmp, **inputs) for a in template]


@pytest.mark.parametrize(("argv", "code", "pattern"),
                         [pytest.param(*c[1:], id=c[0]) for c in CASES] + REGRESSION_CASES)
def test_bad_redact_input(inputs: dict[str, Path], tmp_path: Path, argv: list[str], code: int | None,
                          pattern: str) -> None:
    image = tmp_path / "in.jpg"  # a private copy: a buggy run may overwrite it
    shutil.copyfile(inputs["image"], image)
    before = image.read_bytes()
    res = run_cli("redact", *_argv(argv, {**inputs, "image": image}, tmp_path))
    assert image.read_bytes() == before, "the input file was modified"
    assert_one_error_line(res, code, pattern)
    assert not (tmp_path / "o.jpg").exists() and not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_unwritable_video_output(tmp_path: Path, ext: str) -> None:
    clip = make_clip(tmp_path / f"in.{ext}", frames=3)
    res = run_cli("redact", clip.path, "-o", f"/proc/stream-redact-test.{ext}", "--no-heads", "--no-plates",
                  "--input-size", "160")
    assert_one_error_line(res, 1, r"cannot write")


def test_corrupt_model_file_names_sha256(inputs: dict[str, Path], tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    from stream.detect.models import DEFAULT_MODEL_DIR

    for spec in manifest().values():
        shutil.copyfile(DEFAULT_MODEL_DIR / spec.file, models / spec.file)
    bad = models / manifest()["centerface"].file
    bad.write_bytes(bad.read_bytes()[:-1000] + b"\0" * 1000)
    res = run_cli("redact", inputs["image"], "-o", tmp_path / "o.jpg", "--model-dir", models)
    line = assert_one_error_line(res, 1, r"sha256")
    assert "centerface" in line and "stream-redact models fetch" in line
    assert not (tmp_path / "o.jpg").exists()


@pytest.mark.parametrize("missing", sorted(manifest()))
def test_each_missing_model_is_named(inputs: dict[str, Path], tmp_path: Path, missing: str) -> None:
    models = tmp_path / "models"
    models.mkdir()
    from stream.detect.models import DEFAULT_MODEL_DIR

    for name, spec in manifest().items():
        if name != missing:
            shutil.copyfile(DEFAULT_MODEL_DIR / spec.file, models / spec.file)
    # the int8 variants run on the CPU at the fast preset's sizes (the default runs plates at 960)
    preset = ["--preset", "fast"] if missing.endswith("_int8") else []
    src, out = inputs["image"], tmp_path / "o.jpg"
    if manifest()[missing].task == "speech":  # needed only for a video with sound
        src, out = make_clip(tmp_path / "talk.mp4", frames=4, audio=True).path, tmp_path / "o.mp4"
    res = run_cli("redact", src, "-o", out, "--model-dir", models, "--face-model", "both", *preset)
    line = assert_one_error_line(res, 1, re.escape(repr(missing)))
    assert "missing" in line
    hint = "git checkout" if manifest()[missing].source["kind"] == "export" else "stream-redact models fetch"
    assert hint in line


@pytest.mark.parametrize(
    ("argv", "code", "pattern"),
    [
        ([], 2, r"required: command"),
        (["frobnicate"], 2, r"invalid choice: 'frobnicate'"),
        (["--frobnicate"], 2, r"unrecognized arguments|required"),
        pytest.param(["models"], 2, r"models_cmd|required"),
    ],
    ids=["no-command", "unknown-command", "unknown-global-option", "models-without-subcommand"],
)
def test_bad_top_level_usage(argv: list[str], code: int, pattern: str) -> None:
    assert_one_error_line(run_cli(*argv), code, pattern)
