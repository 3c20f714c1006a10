"""`stream-redact redact` under hostile conditions: a full disk, signals, links to the input, huge inputs.

Each case once ended badly: exit 0 with a video missing its index on a full disk, a 48-byte broken
file after SIGTERM, the input destroyed through a hard link, gigabytes spent decoding a 20000x20000
PNG. The contract is the one of tests/test_cli_errors.py (one `stream-redact: error:` line, non-zero
exit), plus: nothing half-written is left behind, neither at the output path nor as a temp file.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import cv2
import pytest
from helpers import ASTRONAUT, CLI, ROOT, make_clip, read_video, run_cli
from test_cli_errors import assert_one_error_line

FAST = ("--preset", "fast", "--no-heads", "--no-progress")


def listing(folder: Path) -> set[str]:
    """Everything in ``folder`` (temp files are dot files, so they count too) but the filler."""
    return {p.name for p in folder.iterdir()} - {"filler"}


# -- a full disk --------------------------------------------------------------------------------


@dataclass
class SmallFs:
    """A folder on a 64 KiB tmpfs (when this process may mount one), else a plain folder whose
    writes the CLI, run in-process, is made to fail with ENOSPC."""

    path: Path
    mounted: bool
    monkeypatch: pytest.MonkeyPatch

    def fill(self, leave: int = 0) -> None:
        """Take all free space but ``leave`` bytes (rounded to tmpfs pages)."""
        if not self.mounted:
            return
        filler = self.path / "filler"
        with filler.open("wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
            f.truncate(max(0, filler.stat().st_size - leave))

    def redact(self, *args: str | Path) -> subprocess.CompletedProcess:
        if self.mounted:
            return run_cli("redact", *args)
        return self._redact_in_process([str(a) for a in args])

    def _redact_in_process(self, argv: list[str]) -> subprocess.CompletedProcess:
        import stream.files as files
        from stream.cli import main

        def full(path: Path) -> bool:
            return self.path in Path(path).parents

        enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write, real_close = files._write_bytes, files._Encoder.close

        def write_bytes(tmp: Path, data: bytes, label: Path) -> None:
            if full(tmp):
                with tmp.open("wb") as f:
                    f.write(data[: len(data) // 2])  # the part that fitted
                raise files.write_error(enospc, label)
            real_write(tmp, data, label)

        def close(encoder: files._Encoder) -> None:
            if full(encoder.container.name):
                raise enospc
            real_close(encoder)

        self.monkeypatch.setattr(files, "_write_bytes", write_bytes)
        self.monkeypatch.setattr(files._Encoder, "close", close)
        err = io.StringIO()
        with redirect_stderr(err):
            code = main(["redact", *argv])
        return subprocess.CompletedProcess(argv, code, "", err.getvalue())


@pytest.fixture
def small_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallFs]:
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(folder)],
                             capture_output=True, text=True)
        mounted = res.returncode == 0
    try:
        yield SmallFs(folder, mounted, monkeypatch)
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


NO_SPACE = r"cannot write .*: no space left on device; free space or choose another folder"


def test_full_disk_video_fails_and_leaves_nothing(tmp_path: Path, small_fs: SmallFs) -> None:
    """Space runs out mid-video: error, exit 1, and no output without its index (nor temp file)."""
    clip = make_clip(tmp_path / "in.mp4", frames=40, width=160, height=120)
    small_fs.fill(leave=4096)  # the header fits, the frames do not (the output is ~13 KB)
    res = small_fs.redact(clip.path, "-o", small_fs.path / "out.mp4", *FAST)
    line = assert_one_error_line(res, 1, NO_SPACE)
    assert str(small_fs.path / "out.mp4") in line, "the error must name the output, not a temp file"
    assert listing(small_fs.path) == set()


def test_full_disk_image_keeps_the_previous_output(tmp_path: Path, small_fs: SmallFs) -> None:
    """An existing output stays as it was: the new one replaces it only once it is complete."""
    out = small_fs.path / "out.png"
    out.write_bytes(b"previous result")
    small_fs.fill()
    res = small_fs.redact(ASTRONAUT, "-o", out, *FAST)
    assert_one_error_line(res, 1, NO_SPACE)
    assert out.read_bytes() == b"previous result"
    assert listing(small_fs.path) == {"out.png"}


def test_full_disk_for_masks_json_writes_no_output_either(tmp_path: Path, small_fs: SmallFs) -> None:
    """All or nothing: a redacted file without the masks JSON asked for is not a finished job."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    small_fs.fill()
    res = small_fs.redact(ASTRONAUT, "-o", out_dir / "out.jpg", "--masks-json", small_fs.path / "masks.json",
                          *FAST)
    line = assert_one_error_line(res, 1, NO_SPACE)
    assert "masks.json" in line
    assert listing(out_dir) == set()
    assert listing(small_fs.path) == set()


def test_video_output_is_complete_and_no_temp_file_remains(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "in.mp4", frames=6, width=160, height=120)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = run_cli("redact", clip.path, "-o", out_dir / "out.mp4", "--masks-json", out_dir / "m.json", *FAST)
    assert res.returncode == 0, res.stderr
    assert listing(out_dir) == {"out.mp4", "m.json"}
    assert len(read_video(out_dir / "out.mp4").frames) == 6


# -- signals ------------------------------------------------------------------------------------


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # a temp file removed between listing and stat
        return 0


def _wait_for(condition, proc: subprocess.Popen, timeout: float) -> None:
    """Poll ``condition`` until it holds; fail early if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"redact ended (exit {proc.returncode}) before the condition held: "
                        f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_video_leaves_no_output(tmp_path: Path, sig: signal.Signals) -> None:
    clip = make_clip(tmp_path / "in.mp4", frames=300, width=160, height=120)  # ~15 s of work
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # the parent may run with SIGINT ignored (a background job); the child gets the default back
    proc = subprocess.Popen([*CLI, "redact", str(clip.path), "-o", str(out_dir / "out.mp4"), "--masks-json",
                             str(out_dir / "masks.json"), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def encoding() -> bool:
        # the container header is on disk (in a temp file or the output itself, whichever the
        # implementation writes): the models are loaded and frames are flowing
        return any(_size(p) > 0 for p in out_dir.iterdir())

    try:
        _wait_for(encoding, proc, timeout=120)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, stderr
    assert proc.returncode > 0, f"killed by the signal instead of handling it: {proc.returncode}"
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("stream-redact: "), stderr
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
        assert "SIGTERM" in lines[0] and "out.mp4" in lines[0], lines[0]
    assert listing(out_dir) == set(), "a partial output or temp file was left behind"


# -- the output is the input under another name -------------------------------------------------


@pytest.fixture(params=["jpg", "mp4"])
def private_input(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "jpg":
        src = tmp_path / "in.jpg"
        shutil.copyfile(ASTRONAUT, src)
        return src
    return make_clip(tmp_path / "in.mp4", frames=3, width=160, height=120).path


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_output_linked_to_input_is_refused(private_input: Path, link: str) -> None:
    out = private_input.with_name("out" + private_input.suffix)
    (os.link if link == "hard" else os.symlink)(private_input, out)
    before, ino = private_input.read_bytes(), private_input.stat().st_ino
    res = run_cli("redact", private_input, "-o", out, *FAST)
    assert_one_error_line(res, 1, r"would overwrite the input.*same file, or a link")
    assert private_input.read_bytes() == before, "the input was overwritten"
    assert private_input.stat().st_ino == ino
    assert out.exists() and os.path.samefile(out, private_input), "the link itself must stay as it was"


def test_masks_json_hard_linked_to_input_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "in.jpg"
    shutil.copyfile(ASTRONAUT, src)
    masks = tmp_path / "masks.json"
    os.link(src, masks)
    before = src.read_bytes()
    res = run_cli("redact", src, "-o", tmp_path / "out.jpg", "--masks-json", masks, *FAST)
    assert_one_error_line(res, 1, r"--masks-json.*same file as the input")
    assert src.read_bytes() == before
    assert not (tmp_path / "out.jpg").exists()


# -- the pixel limit ----------------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` and stops after its header: refusing it must
    not need the pixels (a real 20000x20000 PNG takes gigabytes to decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def test_huge_png_is_refused_from_its_header(tmp_path: Path) -> None:
    src = _png_header_only(tmp_path / "huge.png", 20000, 20000)
    t0 = time.monotonic()
    res = run_cli("redact", src, "-o", tmp_path / "out.png")
    took = time.monotonic() - t0
    line = assert_one_error_line(res, 1, r"20000x20000 \(400\.0 megapixels\), over the limit of 100\.0 "
                                         r"megapixels; downscale it first, or raise --max-pixels")
    assert "huge.png" in line
    assert took < 20, f"refusing took {took:.1f} s: models were loaded or pixels decoded"
    assert listing(tmp_path) == {"huge.png"}


@pytest.mark.parametrize(("limit", "ok"), [("65535", False), ("65536", True), ("0", True), ("0.06M", False)])
def test_max_pixels_on_a_jpeg(tmp_path: Path, limit: str, ok: bool) -> None:
    """astronaut_256.jpg has exactly 65536 pixels; 0 turns the limit off."""
    out = tmp_path / "out.jpg"
    res = run_cli("redact", ASTRONAUT, "-o", out, "--max-pixels", limit, *FAST)
    if ok:
        assert res.returncode == 0, res.stderr
        assert out.exists()
    else:
        assert_one_error_line(res, 1, r"256x256 \(65536 pixels\), over the limit")
        assert not out.exists()


def test_max_pixels_on_a_video(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "in.mp4", frames=3, width=160, height=120)
    res = run_cli("redact", clip.path, "-o", tmp_path / "out.mp4", "--max-pixels", "19199", *FAST)
    assert_one_error_line(res, 1, r"in\.mp4 is 160x120 \(19200 pixels\), over the limit of 19199 pixels")
    assert listing(tmp_path) == {"in.mp4"}


@pytest.mark.parametrize("value", ["lots", "-5", "nan"])
def test_bad_max_pixels_value(tmp_path: Path, value: str) -> None:
    res = run_cli("redact", ASTRONAUT, "-o", tmp_path / "out.jpg", f"--max-pixels={value}")
    assert_one_error_line(res, 2, r"--max-pixels")


@pytest.mark.parametrize("fmt", ["png", "jpg", "progressive-jpg"])
def test_image_size_reads_only_the_header(tmp_path: Path, fmt: str) -> None:
    from stream.files import image_size

    image = cv2.resize(cv2.imread(str(ASTRONAUT)), (301, 157))
    ext = ".png" if fmt == "png" else ".jpg"
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if fmt == "progressive-jpg" else []
    ok, data = cv2.imencode(ext, image, params)
    assert ok
    path = tmp_path / f"x{ext}"
    path.write_bytes(data.tobytes()[:1000])  # the header is all it may read
    assert image_size(path) == (301, 157)
