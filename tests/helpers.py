"""Plain helpers shared by the tests: fixture paths, hand-checked boxes, media builders, metrics."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures"
ASTRONAUT = FIXTURES / "astronaut_256.jpg"
CHELSEA = FIXTURES / "chelsea.jpg"
BUS = FIXTURES / "bus_360.jpg"
BUS_VEHICLE = (7, 77, 270, 249)
"""the bus in ``bus_360.jpg`` (left edge of its front to the right border, roof to the wheels)"""

# hand-checked in tests/fixtures/README.md (x1, y1, x2, y2; x2/y2 exclusive)
ASTRONAUT_FACE = (89, 33, 140, 90)
ASTRONAUT_PERSON = (10, 8, 182, 256)

CLI = [sys.executable, "-m", "stream.cli"]


def read_bgr(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def contains(outer: Sequence[float], inner: Sequence[float], tol: float = 0.0) -> bool:
    return (outer[0] <= inner[0] + tol and outer[1] <= inner[1] + tol
            and outer[2] >= inner[2] - tol and outer[3] >= inner[3] - tol)


def best_iou(boxes: np.ndarray, target: Sequence[float]) -> float:
    return max((iou(b, target) for b in boxes), default=0.0)


def coverage(box: Sequence[float], target: Sequence[float]) -> float:
    """Fraction of ``target``'s area inside ``box``."""
    ix = max(0.0, min(box[2], target[2]) - max(box[0], target[0]))
    iy = max(0.0, min(box[3], target[3]) - max(box[1], target[1]))
    return ix * iy / ((target[2] - target[0]) * (target[3] - target[1]))


def finds(boxes: np.ndarray, target: Sequence[float], min_iou: float = 0.45, min_cover: float = 0.9) -> bool:
    """Some box covers the target (>= 90% of it) and is localised on it (IoU >= 0.45).

    The plate model draws its box a few pixels outside a plate's border, so a 120x28 plate gets
    IoU 0.55-0.8 with a box that contains all of it; coverage is what matters for redaction.
    """
    return any(iou(b, target) >= min_iou and coverage(b, target) >= min_cover for b in boxes)


def laplacian_var(image: np.ndarray, box: Sequence[int], margin: int = 2) -> float:
    """High-frequency energy inside ``box`` (shrunk by ``margin`` so the box edge itself is ignored)."""
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    lap = cv2.Laplacian(gray.astype(np.float32), cv2.CV_32F, ksize=1)
    x1, y1, x2, y2 = (int(v) for v in box)
    inner = lap[y1 + margin:y2 - margin, x1 + margin:x2 - margin]
    assert inner.size, f"box {box} too small for margin {margin}"
    return float(inner.var())


def uk_plate(w: int = 120, h: int = 28, text: str = "AB12 CDE") -> np.ndarray:
    """A synthetic UK-style front plate: white, black border, black characters filling ~75% height."""
    plate = np.full((h, w, 3), 255, np.uint8)
    cv2.rectangle(plate, (0, 0), (w - 1, h - 1), (0, 0, 0), max(1, h // 14))
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, 2)
    scale = min(w * 0.85 / tw, h * 0.75 / th)
    thick = max(1, round(scale * 2.2))
    (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
    cv2.putText(plate, text, ((w - tw) // 2, (h + th) // 2), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return plate


def face_sprite(width: int = 72, height: int = 80) -> np.ndarray:
    """The astronaut's head (face plus hair margin) resized, for pasting into synthetic video."""
    crop = read_bgr(ASTRONAUT)[10:110, 70:160]  # 90 x 100 px around ASTRONAUT_FACE
    return cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)


def sprite_face_box(x: int, y: int, width: int = 72, height: int = 80) -> tuple[int, int, int, int]:
    """Where ASTRONAUT_FACE lands when face_sprite(width, height) is pasted at (x, y)."""
    sx, sy = width / 90, height / 100
    fx1, fy1, fx2, fy2 = ASTRONAUT_FACE
    return (round(x + (fx1 - 70) * sx), round(y + (fy1 - 10) * sy),
            round(x + (fx2 - 70) * sx), round(y + (fy2 - 10) * sy))


def textured_background(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bg = rng.integers(60, 200, (height, width, 3), dtype=np.uint8)
    return cv2.GaussianBlur(bg, (0, 0), 3)


def panned(width: int, height: int, i: int, seed: int = 0) -> np.ndarray:
    """Frame ``i`` of one shot: a textured view panned ``i`` px left, so each frame differs and no two
    consecutive ones read as a cut to another view (a new seed per frame would: stream.core.cuts)."""
    wide = textured_background(width + 64, height, seed)
    return np.ascontiguousarray(wide[:, i % 64:i % 64 + width])


@dataclass
class Clip:
    path: Path
    frames: int
    width: int
    height: int
    fps: Fraction
    face_boxes: list[tuple[int, int, int, int] | None]
    """per frame: where the pasted face is (ASTRONAUT_FACE mapped), None where there is no face"""
    audio: bool


def encode_frames(path: Path, images: Sequence[np.ndarray], fps: int = 25) -> Path:
    """An H.264 file of ``images`` (BGR, one size) as they are, one frame each."""
    h, w = images[0].shape[:2]
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"crf": "12", "preset": "ultrafast"}
        for img in images:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
    return path


def make_clip(path: Path, frames: int = 8, width: int = 320, height: int = 240,
              fps: Fraction | int = 25, audio: bool = False, faststart: bool = False,
              face_from: int = 0) -> Clip:
    """Encode a short H.264 clip: a textured background with the astronaut's head moving left to right.

    The head is absent in frames before ``face_from``. With ``audio`` a mono AAC 440 Hz tone runs
    alongside. ``faststart`` puts the mp4 index first, so a truncated file still decodes.
    """
    sprite = face_sprite()
    sh, sw = sprite.shape[:2]
    bg = textured_background(width, height)
    options = {"movflags": "faststart"} if faststart else {}
    boxes: list[tuple[int, int, int, int] | None] = []
    with av.open(str(path), "w", options=options) as c:
        vs = c.add_stream("libx264", rate=Fraction(fps))
        vs.width, vs.height = width, height
        vs.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        vs.options = {"crf": "12", "preset": "ultrafast"}
        a = None
        if audio:
            a = c.add_stream("aac", rate=16000)
            a.layout = "mono"
        samples_per_frame = round(16000 / Fraction(fps))
        apts = 0
        span = max(1, frames - face_from - 1)
        for i in range(frames):
            img = bg.copy()
            if i >= face_from:
                x = 8 + (i - face_from) * (width - sw - 16) // span
                y = (height - sh) // 2
                img[y:y + sh, x:x + sw] = sprite
                boxes.append(sprite_face_box(x, y))
            else:
                boxes.append(None)
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                c.mux(p)
            if a is not None:
                t = (np.arange(samples_per_frame) + apts) / 16000
                tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
                af = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
                af.sample_rate = 16000
                af.pts = apts
                apts += samples_per_frame
                for p in a.encode(af):
                    c.mux(p)
        for p in vs.encode(None):
            c.mux(p)
        if a is not None:
            for p in a.encode(None):
                c.mux(p)
    return Clip(path, frames, width, height, Fraction(fps), boxes, audio)


@dataclass
class VideoInfo:
    frames: list[np.ndarray]
    width: int
    height: int
    fps: Fraction
    audio_codec: str | None
    audio_packets: int


def read_video(path: Path) -> VideoInfo:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        info = VideoInfo([], v.codec_context.width, v.codec_context.height,
                         Fraction(v.average_rate or v.guessed_rate), None, 0)
        if c.streams.audio:
            info.audio_codec = c.streams.audio[0].codec_context.name
        for packet in c.demux(v):
            try:
                info.frames += [f.to_ndarray(format="bgr24") for f in packet.decode()]
            except av.error.InvalidDataError:
                continue  # a damaged packet (truncated file): count what decodes, like a player
    if info.audio_codec is not None:
        with av.open(str(path)) as c:
            info.audio_packets = sum(1 for p in c.demux(c.streams.audio[0]) if p.size)
    return info


REGION_KEYS = {"label", "box", "shape", "score"}
OPTIONAL_REGION_KEYS = {"track_id", "coasted"}


def check_masks_contract(doc: dict, width: int, height: int, frames: int, warnings: bool = False) -> None:
    """The --masks-json contract, exactly as documented for users of the file.

    ``warnings``: the input was damaged, so the document must carry a ``warnings`` list of strings
    (the same lines the CLI prints on stderr); otherwise it must not have one.
    """
    if "audio" in doc:  # only for inputs with an audio track that was redacted
        audio = doc["audio"]
        assert set(audio) == {"policy", "speech", "muted_s"}, audio
        assert all(len(seg) == 2 and 0 <= seg[0] <= seg[1] for seg in audio["speech"]), audio
        doc = {k: v for k, v in doc.items() if k != "audio"}
    if warnings:
        assert set(doc) == {"width", "height", "frames", "warnings"}, sorted(doc)
        assert isinstance(doc["warnings"], list) and doc["warnings"], doc["warnings"]
        assert all(isinstance(w, str) and w for w in doc["warnings"]), doc["warnings"]
    else:
        assert set(doc) == {"width", "height", "frames"}, doc.get("warnings")
    assert doc["width"] == width and doc["height"] == height
    assert type(doc["width"]) is int and type(doc["height"]) is int
    assert isinstance(doc["frames"], list) and len(doc["frames"]) == frames
    for i, entry in enumerate(doc["frames"]):
        assert set(entry) == {"frame", "regions"}
        assert entry["frame"] == i and type(entry["frame"]) is int
        assert isinstance(entry["regions"], list)
        for r in entry["regions"]:
            assert REGION_KEYS <= set(r) <= REGION_KEYS | OPTIONAL_REGION_KEYS, r
            assert r["label"] in {"face", "plate"}
            assert r["shape"] in {"rect", "ellipse"}
            assert type(r["score"]) is float and 0 <= r["score"] <= 1
            box = r["box"]
            assert isinstance(box, list) and len(box) == 4 and all(type(v) is int for v in box), box
            x1, y1, x2, y2 = box
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, box  # x2/y2 exclusive
            if "track_id" in r:
                assert type(r["track_id"]) is int
            if "coasted" in r:
                assert type(r["coasted"]) is bool


def run_cli(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``stream-redact`` in a fresh interpreter (the way a user does) and capture its output."""
    return subprocess.run([*CLI, *(str(a) for a in args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
