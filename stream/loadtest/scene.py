"""Synthetic camera scenes with ground truth: real faces and rendered plates moving over a real background.

Why synthetic: a leak can only be counted where it is known exactly where every face and plate
is in every frame. Each stream's scene is a pure function of (stream index, sequence number),
so the sender and the checker agree on the ground truth without exchanging it.

- Background: the left part of the sample clip (a real room, no person in it), mirrored to
  fill the frame, a different clip moment per stream.
- Faces: real face crops from the sample clip (boxes found once by YuNet on the original), pasted
  with some context around them; the ground-truth box is the face itself.
- Plates: UK-style plates drawn with OpenCV (yellow rear / white front, black characters).
- Every object keeps its own vertical lane, so objects never hide each other, and moves on a
  slow bouncing path; sizes vary across objects and streams. All objects stay clear of the stamp
  strip at the top, with room for the pipeline's mask enlargement and coasting growth, so a mask
  never covers the stamp.
Heavy work (decoding the clip, detecting the faces, resizing sprites) happens once per scene;
composing a frame is a copy of the background plus a few array assignments.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from stream.loadtest import stamp

FACE_HEIGHTS = (0.16, 0.24, 0.34)
"""face box heights as fractions of the frame height (360p: 58, 86, 122 px)"""
PLATE_HEIGHTS = (0.075, 0.1)
"""plate heights as fractions of the frame height (360p: 27, 36 px)"""
PLATE_ASPECT = 4.7  # 520 x 111 mm
SIZE_BUCKETS = ((0, 32, "<32"), (32, 64, "32-64"), (64, 128, "64-128"), (128, 1 << 30, ">=128"))
SPEED = 0.12
"""object speed in frame heights per second"""
APPEARING = (50, 25)
"""frames in view and out of view of each object in an appearing scene: it vanishes and comes
back whole mid-frame, as from behind a passing bus, so a run measures an object's first frames"""


def size_bucket(height: int) -> str:
    """Size bucket name of a box `height` pixels tall."""
    for lo, hi, name in SIZE_BUCKETS:
        if lo <= height < hi:
            return name
    return SIZE_BUCKETS[-1][2]


@dataclass(frozen=True)
class Box:
    """One ground-truth object in one frame: x2/y2 exclusive, source pixels."""

    obj: int
    label: str
    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def height(self) -> int:
        return self.y2 - self.y1


@dataclass
class _Sprite:
    label: str
    image: np.ndarray  # BGR, what is pasted
    gt: tuple[int, int, int, int]  # the object inside the sprite (x1, y1, x2, y2)
    lane: tuple[int, int]  # x range the sprite may occupy
    y_range: tuple[int, int]  # y range of the sprite's top edge
    phase: tuple[float, float]
    speed: tuple[float, float]  # px per frame in x and y


@dataclass(frozen=True)
class Material:
    """Real pixels the scenes are built from: backgrounds and face crops with their face boxes."""

    backgrounds: list[np.ndarray]
    faces: list[tuple[np.ndarray, tuple[int, int, int, int]]]


def load_material(clip: Path, samples: int = 6) -> Material:
    """Backgrounds and face crops from the sample clip (a woman talking to the camera, 640x360).

    Faces are found with YuNet on a few frames spread over the clip; the crop keeps a margin of
    context around each face so it looks like a face in a picture, not a cut-out.
    """
    from stream.detect.yunet import YuNet

    frames: list[np.ndarray] = []
    with av.open(str(clip)) as c:
        v = c.streams.video[0]
        total = v.frames or 400
        step = max(1, total // samples)
        for i, f in enumerate(c.decode(v)):
            if i % step == 0:
                frames.append(f.to_ndarray(format="bgr24"))
            if len(frames) >= samples:
                break
    detector = YuNet(threshold=0.7, providers=("cpu",))
    faces: list[tuple[np.ndarray, tuple[int, int, int, int]]] = []
    backgrounds: list[np.ndarray] = []
    for img in frames:
        h, w = img.shape[:2]
        dets = detector([img])[0]
        if len(dets) != 1:
            continue
        x1, y1, x2, y2 = (round(v) for v in dets.boxes[0])
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
        m = int(0.25 * (y2 - y1))
        cx1, cy1, cx2, cy2 = max(0, x1 - m), max(0, y1 - m), min(w, x2 + m), min(h, y2 + m)
        faces.append((img[cy1:cy2, cx1:cx2].copy(), (x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1)))
        left = img[:, : max(16, min(x1 - m, w // 2) - 8)]  # the room, left of the person
        backgrounds.append(np.concatenate([left, left[:, ::-1]], axis=1))
    if not faces:
        raise RuntimeError(f"{clip}: no face found to build synthetic cameras from")
    return Material(backgrounds, faces)


def render_plate(text: str, height: int, rear: bool) -> np.ndarray:
    """A UK-style number plate, `height` px tall, drawn large and reduced so its edges look real."""
    H = 111
    W = int(H * PLATE_ASPECT)
    plate = np.full((H, W, 3), (0, 205, 255) if rear else (235, 235, 235), np.uint8)
    cv2.rectangle(plate, (2, 2), (W - 3, H - 3), (20, 20, 20), 3)
    cv2.rectangle(plate, (0, 0), (28, H), (160, 60, 0), -1)  # the blue band
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = 3.0
    (tw, th), _ = cv2.getTextSize(text, font, scale, 10)
    scale *= min((W - 60) / tw, (H * 0.72) / th)
    (tw, th), _ = cv2.getTextSize(text, font, scale, 10)
    cv2.putText(plate, text, (34 + (W - 34 - tw) // 2, (H + th) // 2), font, scale, (10, 10, 10), 10,
                cv2.LINE_AA)
    width = max(8, round(height * PLATE_ASPECT))
    return cv2.resize(plate, (width, height), interpolation=cv2.INTER_AREA)


def _plate_text(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNOPRSTUVWXYZ"
    return (rng.choice(letters) + rng.choice(letters) + f"{rng.randint(10, 99)} "
            + "".join(rng.choice(letters) for _ in range(3)))


class Scene:
    """The frames of one synthetic camera: `render(seq)` and `truth(seq)` agree by construction."""

    def __init__(self, material: Material, stream: int, width: int, height: int, fps: float,
                 faces: int = 2, plates: int = 1, appearing: bool = False) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"H.264 4:2:0 needs an even size, got {width}x{height}")
        self.stream, self.width, self.height, self.fps = stream, width, height, fps
        rng = random.Random(1000 + stream)
        bg = material.backgrounds[stream % len(material.backgrounds)]
        self.background = cv2.resize(bg, (width, height), interpolation=cv2.INTER_AREA)
        self.top = stamp.strip_height(width)
        kinds = ["face"] * faces + ["plate"] * plates
        shares = [1.0 if k == "face" else 1.7 for k in kinds]
        edges = np.concatenate([[0], np.cumsum(shares) / sum(shares)]) * width
        self.sprites: list[_Sprite] = []
        for i, kind in enumerate(kinds):
            lane = (int(edges[i]), int(edges[i + 1]))
            if kind == "face":
                crop, (fx1, fy1, fx2, fy2) = material.faces[(stream + i) % len(material.faces)]
                fh = FACE_HEIGHTS[(stream + i) % len(FACE_HEIGHTS)] * height
                s = fh / (fy2 - fy1)
                s = min(s, 0.95 * (lane[1] - lane[0]) / crop.shape[1])  # the whole crop fits its lane
                img = cv2.resize(crop, (max(2, int(crop.shape[1] * s)), max(2, int(crop.shape[0] * s))),
                                 interpolation=cv2.INTER_AREA)
                gt = (int(fx1 * s), int(fy1 * s), round(fx2 * s), round(fy2 * s))
                # mask enlargement (1.4 about the centre) plus coasting growth: keep 0.5 face above
                margin = int(0.5 * (gt[3] - gt[1])) - gt[1]
            else:
                ph = int(PLATE_HEIGHTS[(stream + i) % len(PLATE_HEIGHTS)] * height)
                ph = min(ph, int(0.95 * (lane[1] - lane[0]) / PLATE_ASPECT))
                img = render_plate(_plate_text(rng), ph, rear=bool((stream + i) % 2))
                gt = (0, 0, img.shape[1], img.shape[0])
                margin = int(0.5 * img.shape[0])
            y_lo = self.top + max(4, margin)
            y_hi = max(y_lo, height - img.shape[0])
            sh, sw = img.shape[:2]
            self.sprites.append(_Sprite(
                kind, img, gt, (lane[0], max(lane[0], lane[1] - sw)), (y_lo, y_hi),
                (rng.random(), rng.random()),
                (SPEED * height / fps * rng.uniform(0.4, 1.0), SPEED * height / fps * rng.uniform(0.5, 1.0))))
            assert sh <= height and sw <= width
        # its own generator: an appearing scene is the same scene with objects hidden at times
        cycle = random.Random(2000 + stream)
        self.appearing = appearing
        self._offsets = [cycle.randrange(sum(APPEARING)) for _ in self.sprites]

    @staticmethod
    def _bounce(lo: int, hi: int, phase: float, speed: float, seq: int) -> int:
        span = hi - lo
        if span <= 0:
            return lo
        t = (phase * 2 * span + speed * seq) % (2 * span)
        return lo + int(t if t < span else 2 * span - t)

    def _positions(self, seq: int) -> list[tuple[int, int]]:
        return [(self._bounce(*sp.lane, sp.phase[0], sp.speed[0], seq),
                 self._bounce(*sp.y_range, sp.phase[1], sp.speed[1], seq)) for sp in self.sprites]

    def visible(self, obj: int, seq: int) -> bool:
        """Whether object ``obj`` is in frame ``seq`` (always, unless the scene is appearing)."""
        return not self.appearing or (seq + self._offsets[obj]) % sum(APPEARING) < APPEARING[0]

    def truth(self, seq: int) -> list[Box]:
        """Ground truth of frame `seq`: every face and plate box in view."""
        out = []
        for i, (sp, (x, y)) in enumerate(zip(self.sprites, self._positions(seq), strict=True)):
            if not self.visible(i, seq):
                continue
            gx1, gy1, gx2, gy2 = sp.gt
            out.append(Box(i, sp.label, x + gx1, y + gy1, x + gx2, y + gy2))
        return out

    def render(self, seq: int) -> np.ndarray:
        """Frame `seq` without its stamp (BGR, a fresh array the caller may stamp and encode)."""
        img = self.background.copy()
        for i, (sp, (x, y)) in enumerate(zip(self.sprites, self._positions(seq), strict=True)):
            if not self.visible(i, seq):
                continue
            h, w = sp.image.shape[:2]
            img[y:y + h, x:x + w] = sp.image
        return img

    def reference(self, obj: int) -> np.ndarray:
        """Grey pixels of object `obj` as sent (before any encoding): what a leak would show."""
        sp = self.sprites[obj]
        x1, y1, x2, y2 = sp.gt
        return cv2.cvtColor(sp.image[y1:y2, x1:x2], cv2.COLOR_BGR2GRAY)

    @property
    def labels(self) -> list[str]:
        return [sp.label for sp in self.sprites]
