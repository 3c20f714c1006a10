"""A live output without a server: the recording file. Newest frames win its queue, every drop is counted,
what it takes is encoded in order at an even size, and nothing is taken once it is stopped."""

from __future__ import annotations

import time
from pathlib import Path

import av
import numpy as np
from live_helpers import counter

from stream.config import FileOutputConfig
from stream.core.metrics import Metrics
from stream.live.publish.file import FileOutput


def picture(width: int, height: int, k: int) -> np.ndarray:
    """Gray level ``20 * k`` (frames told apart after encoding) with a white last row and column."""
    img = np.full((height, width, 3), 20 * k, np.uint8)
    img[-1, :] = img[:, -1] = 255
    return img


def test_file_output_keeps_the_newest_frames_and_counts_the_rest(tmp_path: Path):
    m = Metrics()
    path = tmp_path / "rec.mp4"
    out = FileOutput("cam", "file", FileOutputConfig(type="file", path=path), m)
    t0 = time.monotonic()
    for k in range(10):  # not started yet: its queue (8) is all there is
        out.submit(picture(161, 121, k), t0 + k / 25)
    assert counter(m, "frames_dropped", stream="cam", reason="output_busy") == 2
    out.start()
    out.stop(timeout=30)
    assert out.frames_written == 8
    out.submit(picture(161, 121, 0), t0 + 1)
    assert counter(m, "frames_dropped", stream="cam", reason="stopping") == 1, "a frame after stop is counted"
    assert out.frames_written == 8

    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        assert (vs.codec_context.width, vs.codec_context.height) == (160, 120), "odd sides are cropped"
        levels = [round(float(f.to_ndarray(format="bgr24")[10:100, 10:140].mean())) for f in c.decode(vs)]
    assert len(levels) == 8
    assert all(abs(got - 20 * k) <= 5 for got, k in zip(levels, range(2, 10), strict=True)), (
        f"the two oldest frames were dropped, the rest kept in order: {levels}")


def test_keyframes_come_every_gop_seconds_however_few_frames_are_published(tmp_path: Path):
    """Under overload a stream publishes a frame a second or less. Keyframes counted in frames
    (gop_s x fps) would then come every 25 s at 1 fps, and a reader that joins, or loses a packet,
    would see nothing until the next one; they come every gop_s seconds of capture time instead,
    and at the full rate as before."""
    def keyframes(path: Path, times: list[float]) -> list[int]:
        out = FileOutput("cam", "file", FileOutputConfig(type="file", path=path, gop_s=2.0), Metrics())
        for k, t in enumerate(times):  # as the output's thread writes them, without its queue
            out.write(picture(64, 48, k % 10), t)
        out._close(flush=True)
        with av.open(str(path)) as c:
            return [i for i, p in enumerate(c.demux(c.streams.video[0])) if p.size and p.is_keyframe]

    t0 = time.monotonic()
    slow = keyframes(tmp_path / "slow.mp4", [t0 + k for k in range(7)])  # 1 frame a second
    assert slow == [0, 2, 4, 6], f"a keyframe every 2 s: {slow}"
    full = keyframes(tmp_path / "full.mp4", [t0 + k / 25 for k in range(120)])
    assert full == [0, 50, 100], f"at 25 fps, every 50 frames as before: {full}"
    # a camera faster than the configured 25 fps: the encoder's own keyframe (every 50 frames, 1.7 s
    # at 30 fps) counts, so a forced one does not follow 0.3 s later
    fast = keyframes(tmp_path / "fast.mp4", [t0 + k / 30 for k in range(160)])
    assert fast == [0, 50, 100, 150], f"no keyframe doubled: {fast}"
