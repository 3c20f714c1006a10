"""The one H.264 encoder behind recorded files, RTSP pushes and WebRTC viewers."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from stream.core.h264 import H264Encoder, H264Settings, even_size, video_frame

TB = Fraction(1, 90_000)


def picture(width: int, height: int, k: int = 0) -> np.ndarray:
    """A BGR test picture: a gradient that moves with ``k``, and a white last column and row."""
    x = np.arange(width, dtype=np.uint16)[None, :] + 3 * k
    y = np.arange(height, dtype=np.uint16)[:, None]
    planes = [(x + y) % 256, (2 * x + 0 * y) % 256, (3 * y + 0 * x) % 256]
    img = np.stack(planes, axis=-1).astype(np.uint8)
    img[-1, :] = img[:, -1] = 255
    return img


@pytest.mark.parametrize(("settings", "options"), [
    (H264Settings(preset="veryfast", crf=18), {"preset": "veryfast", "crf": "18"}),
    (H264Settings(tune="zerolatency", repeat_headers=True, crf=23),
     {"preset": "ultrafast", "tune": "zerolatency", "repeat-headers": "1", "crf": "23"}),
    (H264Settings(tune="zerolatency", repeat_headers=True, bitrate=800_000, crf=23),
     {"preset": "ultrafast", "tune": "zerolatency", "repeat-headers": "1"}),
    (H264Settings(tune="zerolatency", forced_idr=True, bitrate=600_000, bufsize=300_000),
     {"preset": "ultrafast", "tune": "zerolatency", "forced-idr": "1", "maxrate": "600000",
      "bufsize": "300000"}),
])
def test_settings_make_the_libx264_options_each_use_needs(settings, options):
    assert settings.options() == options


@pytest.mark.parametrize(("size", "odd", "expected"), [
    ((321, 241), "crop", (320, 240)),
    ((320, 240), "crop", (320, 240)),
    ((321, 241), "yuv444p", (321, 241)),
])
def test_frame_size_crops_odd_sides_or_keeps_them(size, odd, expected):
    assert H264Settings(odd_size=odd).frame_size(*size) == expected


def test_bgr_frame_drops_only_the_last_odd_column_and_row():
    img = picture(65, 49)
    frame = video_frame(img, 7, TB)
    assert (frame.width, frame.height, frame.pts, frame.time_base) == (64, 48, 7, TB)
    assert frame.format.name == "yuv420p"  # what the encoders take: no second conversion there
    # the same picture as FFmpeg's own conversion of the cropped image makes (within one level of
    # luma): nothing scaled, and the white last row and column are gone, not squeezed in
    ref = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[:48, :64]), format="bgr24")
    luma = frame.to_ndarray()[:48].astype(int)
    assert np.abs(luma - ref.reformat(format="yuv420p").to_ndarray()[:48].astype(int)).max() <= 1
    assert even_size(65, 49) == (64, 48)


def test_bgr_frame_keeps_odd_sizes_in_bgr_for_4_4_4():
    img = picture(65, 49)
    frame = video_frame(img, 0, TB, (65, 49))
    assert frame.format.name == "bgr24" and np.array_equal(frame.to_ndarray(format="bgr24"), img)


def decode(packets: list[av.Packet]) -> list[av.VideoFrame]:
    dec = av.CodecContext.create("h264", "r")
    frames = []
    for p in packets:
        frames.extend(dec.decode(p))
    frames.extend(dec.decode(None))
    return frames


def test_standalone_encoder_makes_a_keyframe_when_asked():
    """WebRTC: a viewer's picture-loss report must get a keyframe now, not at the next periodic one."""
    settings = H264Settings(tune="zerolatency", forced_idr=True, bitrate=500_000, bufsize=250_000,
                            profile="Baseline", gop=600)
    enc = H264Encoder(161, 121, settings, rate=Fraction(30), time_base=TB)
    assert enc.size == (160, 120)
    packets = []
    keys = []
    for k in range(12):
        out = enc.encode(picture(161, 121, k), k * 3000, keyframe=k == 8)
        keys.extend(p.is_keyframe for p in out)
        packets.extend(out)
    packets.extend(enc.flush())
    assert keys[0] and keys[8], "the first frame and the one asked for are keyframes"
    assert not any(keys[1:8]), "no keyframe was asked for in between (the GOP is long)"
    assert all(p.time_base == TB for p in packets), "a packetizer reads the time base off each packet"
    frames = decode(packets)
    assert len(frames) == 12 and (frames[0].width, frames[0].height) == (160, 120)


def test_odd_sized_video_keeps_its_size_in_444_when_muxed(tmp_path: Path):
    """Files: an odd-sized input is written at its exact size; frames keep their order and count."""
    path = tmp_path / "odd.mp4"
    with av.open(str(path), mode="w") as container:
        enc = H264Encoder(65, 49, H264Settings(preset="ultrafast", crf=18, odd_size="yuv444p"),
                          rate=Fraction(25), container=container)
        for k in range(10):
            for p in enc.encode(picture(65, 49, k), k):
                container.mux(p)
        for p in enc.flush():
            container.mux(p)
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        assert (vs.codec_context.width, vs.codec_context.height) == (65, 49)
        assert vs.codec_context.pix_fmt == "yuv444p"
        frames = list(c.decode(vs))
    assert len(frames) == 10
    got = frames[3].to_ndarray(format="bgr24").astype(int)
    assert np.abs(got - picture(65, 49, 3)).mean() < 4, "the picture survives (crf 18)"
    assert got[-1].mean() > 240 and got[:, -1].mean() > 240, "the last odd row and column are kept"
