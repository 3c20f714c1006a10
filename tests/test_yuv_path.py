"""The I420 live path: frames stay in YUV 4:2:0 from decode to encode and are masked as on BGR.

Each check runs the same frame through the BGR path and the I420 path and compares: masks cover
the same pixels, a failed frame is the same black on the wire, the detector finds the same boxes.
"""

from __future__ import annotations

import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from helpers import face_sprite, laplacian_var, make_clip, read_video, textured_background, uk_plate
from live_helpers import wait_for
from webrtc_helpers import assert_released, find_black_box, snapshot, square_frame, wait_until, watch

from stream.config import parse_config
from stream.core.detections import Detections
from stream.core.frames import Frame
from stream.core.h264 import H264Encoder, H264Settings, video_frame
from stream.core.masking import MaskingStage
from stream.core.redact import RedactConfig, Redactor, Style
from stream.core.track import Tracker
from stream.core.yuv import I420, Picture, as_bgr, blank_like, decoded_picture, yuv_color
from stream.detect.ensemble import FrameDetector, detector_input
from stream.detect.presets import detector_config
from stream.live.pipeline import Pipeline
from stream.live.service import detector_factory_for
from stream.live.webrtc.ice import LOOPBACK, set_host_addresses
from stream.live.webrtc.whep import FrameFeed, WhepPlayback

TB = Fraction(1, 90_000)


def busy_picture(width: int = 96, height: int = 64) -> I420:
    """Luma a one-pixel checkerboard, chroma a one-sample checkerboard: any blur, pixelation or fill
    changes every sample it touches, in every plane, so "changed" means "painted"."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = np.mgrid[:height // 2, :width // 2]
    odd = (cx + cy) % 2 == 1
    return I420.from_planes(np.where((xx + yy) % 2 == 1, 200, 40).astype(np.uint8),
                            np.where(odd, 170, 86).astype(np.uint8), np.where(odd, 90, 166).astype(np.uint8))


# -- the value type ------------------------------------------------------------------------------
def test_i420_planes_are_views_in_opencv_layout() -> None:
    bgr = textured_background(64, 48)
    pic = I420.from_bgr(bgr)
    assert (pic.width, pic.height, pic.size, pic.shape) == (64, 48, (64, 48), (48, 64))
    assert pic.data.shape == (72, 64)
    flat = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420).reshape(-1)
    y, u, v = pic.planes
    assert (y.shape, u.shape, v.shape) == ((48, 64), (24, 32), (24, 32))
    np.testing.assert_array_equal(np.concatenate([y.ravel(), u.ravel(), v.ravel()]), flat)
    u[0, 0] = 7  # a view: painting a plane paints the picture
    assert pic.data.reshape(-1)[64 * 48] == 7
    np.testing.assert_array_equal(pic.copy().data, pic.data)
    assert pic.copy().data is not pic.data


@pytest.mark.parametrize("data", [
    np.zeros((72, 63), np.uint8),  # odd width
    np.zeros((71, 64), np.uint8),  # not height * 3/2 rows
    np.zeros((72, 0), np.uint8),
    np.zeros((72, 64), np.float32),
    np.zeros((72, 64, 1), np.uint8),
    np.zeros((72, 128), np.uint8)[:, ::2],  # not contiguous
])
def test_i420_refuses_what_is_not_an_even_contiguous_uint8_picture(data: np.ndarray) -> None:
    with pytest.raises(ValueError, match="I420"):
        I420(data)


def test_black_is_what_opencv_makes_of_a_black_frame() -> None:
    expected = cv2.cvtColor(np.zeros((36, 64, 3), np.uint8), cv2.COLOR_BGR2YUV_I420)
    np.testing.assert_array_equal(I420.black(64, 36).data, expected)
    assert not as_bgr(I420.black(64, 36)).any()
    assert isinstance(blank_like(I420.from_bgr(textured_background(64, 36))), I420)
    assert not blank_like(np.full((5, 7, 3), 9, np.uint8)).any()


@pytest.mark.parametrize("bgr", [(0, 0, 0), (255, 255, 255), (0, 0, 255), (30, 160, 90)])
def test_yuv_color_is_opencvs_conversion(bgr: tuple[int, int, int]) -> None:
    img = np.empty((4, 6, 3), np.uint8)
    img[...] = bgr
    flat = cv2.cvtColor(img, cv2.COLOR_BGR2YUV_I420).reshape(-1)
    assert yuv_color(bgr) == (flat[0], flat[24], flat[30])
    np.testing.assert_array_equal(I420.filled(6, 4, bgr).data.reshape(-1), flat)


def test_to_bgr_shrinks_the_planes_before_converting() -> None:
    bgr = textured_background(1280, 720)
    pic = I420.from_bgr(bgr)
    small = pic.to_bgr((640, 360))
    assert small.shape == (360, 640, 3)
    y = cv2.resize(pic.y, (640, 360), interpolation=cv2.INTER_AREA)
    u = cv2.resize(pic.u, (320, 180), interpolation=cv2.INTER_AREA)
    v = cv2.resize(pic.v, (320, 180), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(small, I420.from_planes(y, u, v).to_bgr())
    # and it is the same picture as shrinking the BGR frame, within what 4:2:0 keeps
    ref = cv2.resize(pic.to_bgr(), (640, 360), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - ref).mean() < 1.5


# -- decoding ------------------------------------------------------------------------------------
def frame_of(bgr: np.ndarray, fmt: str) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format=fmt)


def test_decoded_4_2_0_frames_become_i420_without_conversion() -> None:
    bgr = textured_background(64, 48)
    f = frame_of(bgr, "yuv420p")
    pic = decoded_picture(f)
    assert isinstance(pic, I420)
    np.testing.assert_array_equal(pic.data, f.to_ndarray())
    # NVDEC hands back nv12: the same samples, chroma interleaved
    nv12 = decoded_picture(f.reformat(format="nv12"))
    assert isinstance(nv12, I420)
    np.testing.assert_array_equal(nv12.data, pic.data)


def test_full_range_frames_are_mapped_to_limited_range() -> None:
    bgr = textured_background(64, 48)
    bgr[:8], bgr[8:16] = 0, 255
    limited = decoded_picture(frame_of(bgr, "yuv420p"))
    full = frame_of(bgr, "yuvj420p")
    pic = decoded_picture(full)
    assert isinstance(pic, I420) and isinstance(limited, I420)
    assert np.abs(pic.data.astype(int) - limited.data).max() <= 1
    assert pic.y[:8].min() >= 16 and pic.y[8:16].max() <= 235
    # a yuv420p frame flagged full range is the same thing
    flagged = av.VideoFrame.from_ndarray(full.to_ndarray(), format="yuv420p")
    flagged.color_range = 2
    np.testing.assert_array_equal(decoded_picture(flagged).data, pic.data)


@pytest.mark.parametrize(("size", "fmt"), [((65, 48), "yuv444p"), ((64, 48), "rgb24"), ((64, 48), "yuv422p")])
def test_other_frames_stay_bgr(size: tuple[int, int], fmt: str) -> None:
    bgr = textured_background(*size)
    pic = decoded_picture(frame_of(bgr, fmt))
    assert isinstance(pic, np.ndarray) and pic.shape == (size[1], size[0], 3)


# -- painting ------------------------------------------------------------------------------------
BOXES = [
    (11, 7, 40, 30),  # odd start
    (50, 21, 77, 45),  # odd end
    (0, 0, 15, 13),  # top-left corner, odd end
    (85, 50, 100, 70),  # cut by the right and bottom edges
    (-3, 40, 5, 53),  # cut by the left edge, odd end
    (61, 3, 64, 6),  # grown to the minimum size
    (29, 45, 48, 60),  # overlaps another
]


def paint_both(style: Style, shape: str, boxes: list[tuple[int, int, int, int]],
               color: tuple[int, int, int] = (0, 0, 255)) -> tuple[I420, I420, np.ndarray, np.ndarray]:
    """(original, painted) I420 and (original, painted) BGR of the same picture and detections."""
    pic = busy_picture()
    bgr = pic.to_bgr()
    redactor = Redactor(RedactConfig(style=style, mask_scale={}, shape={"face": shape}, solid_color=color))
    dets = Detections(np.array(boxes, np.float32), np.ones(len(boxes), np.float32), ("face",) * len(boxes))
    painted_bgr, painted = bgr.copy(), pic.copy()
    regions_bgr = redactor.apply(painted_bgr, dets)
    regions = redactor.apply(painted, dets)
    assert regions == regions_bgr, "the same regions from the same detections and size"
    return pic, painted, bgr, painted_bgr


@pytest.mark.parametrize("shape", ["ellipse", "rect"])
@pytest.mark.parametrize("style", list(Style))
def test_masks_cover_every_pixel_the_bgr_path_paints(style: Style, shape: str) -> None:
    pic, painted, bgr, painted_bgr = paint_both(style, shape, BOXES)
    bgr_changed = (painted_bgr != bgr).any(axis=2)
    yuv_changed = (painted.to_bgr() != pic.to_bgr()).any(axis=2)
    assert bgr_changed.sum() > 1000
    missed = bgr_changed & ~yuv_changed
    assert not missed.any(), f"{missed.sum()} pixels masked on BGR left on I420: {np.argwhere(missed)[:5]}"
    rim = cv2.dilate(bgr_changed.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    beyond = yuv_changed & ~rim
    assert not beyond.any(), f"{beyond.sum()} pixels changed more than one pixel outside the BGR mask"
    # every chroma sample under a masked pixel is painted, in both chroma planes
    touched = bgr_changed.reshape(32, 2, 48, 2).any(axis=(1, 3))
    for before, after in ((pic.u, painted.u), (pic.v, painted.v)):
        assert (after != before)[touched].all()
    if shape == "ellipse":  # an ellipse leaves its box's corners alone on both paths
        assert not yuv_changed[21, 50] and not bgr_changed[21, 50]


@pytest.mark.parametrize("shape", ["ellipse", "rect"])
@pytest.mark.parametrize("color", [(0, 0, 255), (0, 0, 0), (200, 120, 30)])
def test_solid_fill_has_the_bgr_colour(shape: str, color: tuple[int, int, int]) -> None:
    _, painted, _, painted_bgr = paint_both(Style.SOLID, shape, BOXES, color)
    filled = (painted_bgr == np.array(color, np.uint8)).all(axis=2)
    assert filled.sum() > 1000
    assert np.abs(painted.to_bgr().astype(int) - painted_bgr)[filled].max() <= 3


def test_a_default_redaction_of_a_real_frame_matches() -> None:
    """The redactor as the pipeline builds it (mask enlargement, ellipse faces, blur) on a photo."""
    bgr = textured_background(320, 240)
    s = face_sprite()
    bgr[60:60 + s.shape[0], 101:101 + s.shape[1]] = s
    pic = I420.from_bgr(bgr)
    twin = pic.to_bgr()
    dets = Detections(np.array([[115.3, 73.7, 158.9, 124.2], [200.5, 201.1, 319.0, 239.6]], np.float32),
                      np.array([0.9, 0.8], np.float32), ("face", "plate"))
    painted_bgr, painted = twin.copy(), pic.copy()
    Redactor().apply(painted_bgr, dets)
    Redactor().apply(painted, dets)
    bgr_changed = (painted_bgr != twin).any(axis=2)
    yuv_changed = (painted.to_bgr() != twin).any(axis=2)
    rim = cv2.dilate(bgr_changed.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert bgr_changed.sum() > 2000 and not (yuv_changed & ~rim).any()
    # the face is gone on both paths alike
    box = (117, 76, 157, 122)
    assert laplacian_var(painted.to_bgr(), box, 3) < 0.1 * laplacian_var(twin, box, 3)
    assert laplacian_var(painted.to_bgr(), box, 3) < 2 * laplacian_var(painted_bgr, box, 3) + 1


# -- failing closed, encoding --------------------------------------------------------------------
def encode(pictures: list[Picture], width: int, height: int) -> list[bytes]:
    settings = H264Settings(tune="zerolatency", repeat_headers=True, b_frames=0, crf=23, gop=25)
    enc = H264Encoder(width, height, settings, rate=Fraction(25), time_base=TB)
    packets = [p for i, img in enumerate(pictures) for p in enc.encode(img, i * 3600)] + enc.flush()
    return [bytes(p) for p in packets]


def decode(packets: list[bytes]) -> list[av.VideoFrame]:
    dec = av.CodecContext.create("h264", "r")
    out = [f for p in packets for f in dec.decode(av.Packet(p))]
    return out + dec.decode(None)


def test_a_failed_i420_frame_is_black_on_the_wire_as_on_bgr() -> None:
    pic = I420.from_bgr(textured_background(320, 240))
    original = pic.copy()
    stage = MaskingStage(Tracker(), Redactor())
    (m,) = stage.push(1, pic, None)
    assert m.failed and isinstance(m.image, I420) and m.image.size == (320, 240)
    assert m.image is not pic and m.image.data is not pic.data
    np.testing.assert_array_equal(pic.data, original.data)
    (bgr_m,) = MaskingStage(Tracker(), Redactor()).push(1, pic.to_bgr(), None)
    yuv_packets, bgr_packets = encode([m.image] * 5, 320, 240), encode([bgr_m.image] * 5, 320, 240)
    assert yuv_packets == bgr_packets, "the same bitstream: the same black as before"
    frames = decode(yuv_packets)
    assert len(frames) == 5
    assert all(int(f.to_ndarray(format="bgr24").max()) <= 16 for f in frames)


def test_the_encoder_takes_i420_planes_as_they_are() -> None:
    pic = I420.from_bgr(textured_background(96, 64))
    frame = video_frame(pic, 7, TB)
    assert frame.format.name == "yuv420p" and (frame.width, frame.height, frame.pts) == (96, 64, 7)
    np.testing.assert_array_equal(frame.to_ndarray(), pic.data)
    # an encoder of a smaller size gets the top-left, cut on the planes: nothing scaled
    cut = video_frame(pic, 0, TB, (80, 48))
    assert (cut.width, cut.height) == (80, 48)
    np.testing.assert_array_equal(cut.to_ndarray(), pic.cropped(80, 48).data)
    np.testing.assert_array_equal(pic.cropped(80, 48).y, pic.y[:48, :80])
    np.testing.assert_array_equal(pic.cropped(80, 48).v, pic.v[:24, :40])


# -- detection -----------------------------------------------------------------------------------
def street(width: int, height: int) -> np.ndarray:
    """A face and a UK plate on a textured background, sized to the frame."""
    k = height / 360
    img = textured_background(width, height, seed=3)
    s = face_sprite(int(72 * k), int(80 * k))
    img[height // 4:height // 4 + s.shape[0], width // 5:width // 5 + s.shape[1]] = s
    p = uk_plate(int(120 * k), int(28 * k))
    y, x = int(height * 0.7), int(width * 0.6)
    img[y:y + p.shape[0], x:x + p.shape[1]] = p
    return img


@pytest.fixture(scope="module")
def accurate() -> FrameDetector:
    return FrameDetector(detector_config("accurate", providers=("cpu",)))


@pytest.mark.parametrize("size", [(640, 360), (1280, 720)])
def test_detector_finds_the_same_boxes_on_i420_and_its_bgr_twin(accurate: FrameDetector,
                                                                size: tuple[int, int]) -> None:
    pic = I420.from_bgr(street(*size))
    twin = pic.to_bgr()
    on_bgr, on_yuv = accurate.detect([twin, pic])
    assert set(on_bgr.labels) == {"face", "plate"}, "the test frame's face and plate must be found"
    assert on_yuv.labels == on_bgr.labels
    assert np.abs(on_yuv.boxes - on_bgr.boxes).max() <= 2.0, (on_bgr.boxes, on_yuv.boxes)
    assert on_yuv.observed == on_bgr.observed


def test_detector_input_is_converted_once_and_no_larger_than_the_models_need(accurate: FrameDetector) -> None:
    models = accurate.models  # CenterFace (960, from 640 up), plates (960), persons (960, from 640 up)
    small, large = I420.from_bgr(street(640, 360)), I420.from_bgr(street(1920, 1080))
    bgr = street(1280, 720)
    everything = [[True, True, True]] * len(models)
    out, scales = detector_input([small, large, bgr], models, everything)
    assert out[0].shape == (360, 640, 3) and scales[0] is None  # plates want 960: no shrinking
    assert out[1].shape == (540, 960, 3) and scales[1] == (2.0, 2.0)
    assert out[2] is bgr and scales[2] is None
    faces_only = [[True] * 3] + [[False] * 3] * (len(models) - 1)
    out, scales = detector_input([small, large, bgr], models, faces_only)
    assert out[0].shape == (360, 640, 3) and out[1].shape == (540, 960, 3)
    nothing = [[False] * 3] * len(models)
    out, _ = detector_input([large], models, nothing)
    assert out[0].size < 100, "a frame no model looks at is not converted"


# -- end to end ----------------------------------------------------------------------------------
class Published:
    def __init__(self) -> None:
        self.frames: list[tuple[Frame, Picture]] = []
        self.lock = threading.Lock()

    def __call__(self, frame: Frame, image: Picture, dets: object) -> None:
        with self.lock:
            self.frames.append((frame, image.copy()))


def test_a_live_file_stream_runs_in_i420_and_masks_the_face(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "face.mp4", frames=30, width=320, height=240)
    out = tmp_path / "out.mp4"
    cfg = parse_config({
        "streams": [{"id": "cam", "source": {"type": "file", "path": str(clip.path)},
                     "outputs": [{"type": "file", "path": str(out)}]}],
        "detection": {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"]}})
    p = Pipeline(cfg, detector_factory_for(cfg))
    p.start()
    cap = Published()
    p.streams["cam"].on_redacted.append(cap)
    try:
        wait_for(lambda: p.ended, timeout=60, what="the file source to end")
    finally:
        p.stop()
    assert len(cap.frames) >= 10, "too few frames published to judge"
    assert all(isinstance(img, I420) for _, img in cap.frames), "decoded 4:2:0 stays I420 to the outputs"
    src = read_video(clip.path).frames
    for frame, img in cap.frames:
        box = clip.face_boxes[frame.seq - 1]
        assert box is not None
        before, after = laplacian_var(src[frame.seq - 1], box, 3), laplacian_var(img.to_bgr(), box, 3)
        assert after < 0.3 * before, f"frame {frame.seq}: face energy {before:.0f} -> {after:.0f}"
    # and what was encoded from the planes shows the face masked too: each recorded frame is
    # matched to the published picture it was encoded from
    published = [(frame, img.to_bgr().astype(np.int16)) for frame, img in cap.frames]
    recorded = read_video(out).frames
    assert len(recorded) >= len(cap.frames) - 2
    for img in recorded:
        err, frame = min((float(np.abs(img - ref).mean()), f) for f, ref in published)
        assert err < 4, "a recorded frame that is none of the published ones"
        box = clip.face_boxes[frame.seq - 1]
        assert laplacian_var(img, box, 3) < 0.3 * laplacian_var(src[frame.seq - 1], box, 3)


@pytest.fixture
def loopback_only():
    yield
    set_host_addresses(None)


@pytest.mark.timeout(60)
@pytest.mark.flaky(reruns=2)
@pytest.mark.parametrize(("codec", "shared"), [("H264", True), ("VP8", False)])
async def test_whep_viewers_see_i420_frames(codec: str, shared: bool, loopback_only: None) -> None:
    before = snapshot()
    playback = WhepPlayback(LOOPBACK, shared_encoding=shared)
    feed = FrameFeed("cam")
    box = (40, 50, 80, 90)
    stop = threading.Event()

    def push() -> None:
        while not stop.is_set():
            feed.push(I420.from_bgr(square_frame(320, 240, box)), time.monotonic())
            stop.wait(1 / 15)  # the camera's frame clock, not synchronisation

    pusher = threading.Thread(target=push, name="test-pusher")
    pusher.start()
    try:
        viewer = await watch(playback, "cam", feed, codec)
        await wait_until(lambda: viewer.received >= 5, 15, "5 frames at the viewer")
        for image, _ in list(viewer.frames):
            assert image.shape == (240, 320, 3)
            found = find_black_box(image)
            assert found is not None and max(abs(a - b) for a, b in zip(found, box, strict=True)) <= 2
            assert abs(image[150:].astype(int).mean() - 128) < 6
        await viewer.close()
    finally:
        stop.set()
        pusher.join()
    await playback.close_all()
    await assert_released(before)
