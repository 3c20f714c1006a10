"""The load-test stamp and leak check survive real H.264 (libx264 through PyAV, as the cameras send).

No RTSP here: the codec is what could damage the stamp, so frames go through an encoder and a
decoder in memory at several bitrates, and come back in the decoder's grey (luma) plane.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from helpers import ROOT

from stream.core.detections import Detections
from stream.core.redact import RedactConfig, Redactor, Style
from stream.loadtest import leak, stamp
from stream.loadtest.scene import Material, Scene, load_material

CLIP = ROOT / ".samples" / "talking-face" / "WolfgangLanger_Pexels.mp4"
SENT_MS = 1_790_000_000_123  # a fixed epoch time: the test must not depend on the clock


@pytest.fixture(scope="module")
def material() -> Material:
    if not CLIP.exists():
        pytest.fail(f"{CLIP} missing: run `python -m stream.samples fetch` (deploy/setup.sh does)")
    return load_material(CLIP)


def h264_roundtrip(frames: list[np.ndarray], kbps: int) -> list[np.ndarray]:
    h, w = frames[0].shape[:2]
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = w, h, "yuv420p"
    enc.time_base, enc.bit_rate = Fraction(1, 25), kbps * 1000
    enc.options = {"preset": "ultrafast", "tune": "zerolatency"}
    dec = av.CodecContext.create("h264", "r")
    out: list[np.ndarray] = []
    for i, img in enumerate([*frames, None]):
        vf = None
        if img is not None:
            vf = av.VideoFrame.from_ndarray(img, format="bgr24").reformat(format="yuv420p")
            vf.pts = i
        for packet in enc.encode(vf):
            out += [d.to_ndarray(format="gray") for d in dec.decode(packet)]
    return out


def test_stamp_roundtrip_without_codec() -> None:
    img = np.full((360, 640, 3), 90, np.uint8)
    s = stamp.Stamp(stream=255, seq=stamp.SEQ_MOD - 1, sent_ms=SENT_MS)
    stamp.draw(img, s)
    assert stamp.read(img) == s
    assert stamp.read(np.zeros_like(img)) is None, "a blanked frame must not read as a stamp"
    img[5, :] = 255 - img[5, :]  # flip one row of pixels: blocks are still read by their centres
    assert stamp.read(img) == s


@pytest.mark.parametrize("size", [(320, 240), (640, 360), (1280, 720)])
@pytest.mark.parametrize("kbps", [150, 500, 3000])
def test_stamp_survives_h264(material: Material, size: tuple[int, int], kbps: int) -> None:
    w, h = size
    scene = Scene(material, stream=3, width=w, height=h, fps=25)
    frames = []
    for seq in range(20):
        img = scene.render(seq)
        stamp.draw(img, stamp.Stamp(3, seq + 70_000, SENT_MS + 40 * seq))
        frames.append(img)
    got = [stamp.read(g) for g in h264_roundtrip(frames, kbps * w // 640)]
    assert got == [stamp.Stamp(3, seq + 70_000, SENT_MS + 40 * seq) for seq in range(20)]


@pytest.mark.parametrize("style", [None, Style.BLUR, Style.PIXELATE, Style.SOLID])
def test_leak_check_tells_clean_from_redacted(material: Material, style: Style | None) -> None:
    """Clean objects read as visible after H.264, redacted ones (any style, exact boxes) as obscured."""
    scene = Scene(material, stream=1, width=640, height=360, fps=25)
    refs = [leak.Reference(scene.reference(i)) for i in range(len(scene.sprites))]
    frames = []
    for seq in range(10):
        img = scene.render(seq)
        if style is not None:
            gt = scene.truth(seq)
            boxes = np.array([[b.x1, b.y1, b.x2, b.y2] for b in gt], np.float32)
            Redactor(RedactConfig(style=style)).apply(
                img, Detections(boxes, np.ones(len(gt), np.float32), tuple(b.label for b in gt)))
        stamp.draw(img, stamp.Stamp(1, seq, SENT_MS))
        frames.append(img)
    visible = [refs[b.obj].check(g[b.y1:b.y2, b.x1:b.x2]).visible
               for seq, g in enumerate(h264_roundtrip(frames, 400)) for b in scene.truth(seq)]
    assert len(visible) == 30
    assert all(visible) if style is None else not any(visible)


def test_blank_frame_is_blank_not_a_leak() -> None:
    black = np.zeros((360, 640), np.uint8) + 3
    assert leak.is_blank(black) and stamp.read(black) is None
    assert not leak.is_blank(np.full((360, 640), 90, np.uint8))


def test_an_appearing_scene_hides_objects_for_a_third_of_the_time_and_only_then(material: Material) -> None:
    """Objects of an appearing scene are out of view 25 frames in 75, each at its own time, and
    in view exactly where and as the plain scene shows them; hidden ones are not in the truth."""
    from stream.loadtest.scene import APPEARING

    plain = Scene(material, stream=1, width=640, height=360, fps=25)
    appearing = Scene(material, stream=1, width=640, height=360, fps=25, appearing=True)
    cycle = sum(APPEARING)
    shown = {i: [appearing.visible(i, seq) for seq in range(cycle)] for i in range(len(plain.sprites))}
    assert all(sum(v) == APPEARING[0] for v in shown.values())
    assert len({v.index(False) if False in v else -1 for v in shown.values()}) > 1, "not all at once"
    assert all(plain.visible(i, seq) for i in shown for seq in range(cycle))
    for seq in range(cycle):
        truth = appearing.truth(seq)
        assert [b.obj for b in truth] == [i for i in shown if shown[i][seq]]
        assert truth == [b for b in plain.truth(seq) if shown[b.obj][seq]]
        differs = np.any(appearing.render(seq) != plain.render(seq), axis=2)
        hidden = [b for b in plain.truth(seq) if not shown[b.obj][seq]]
        if hidden:  # the hidden object's pixels are the room's; nothing else changed
            assert differs[[b.y1 for b in hidden], [b.x1 + 2 for b in hidden]].all()
        else:
            assert not differs.any()
