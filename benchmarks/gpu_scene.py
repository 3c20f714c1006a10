"""Synthetic 1080p CCTV-like frames with known faces and plates, for the GPU check.

Real face crops (the test fixture photo) and rendered UK-style plates on a textured background,
moving a little every frame, so each stream's frames differ and the tracker has work to do.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

FACE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "astronaut_256.jpg"
FACE_BOX = (90, 32, 135, 88)  # the face within the fixture photo (x1, y1, x2, y2), as detected
FACE_SIZES = (36, 56, 90)  # face widths in pixels
PLATE_SIZES = ((300, 68), (240, 55))


def plate_image(w: int, h: int, text: str = "AB12 CDE") -> np.ndarray:
    img = np.full((h, w, 3), (40, 200, 240), np.uint8)  # yellow rear plate (BGR)
    cv2.rectangle(img, (1, 1), (w - 2, h - 2), (20, 20, 20), 2)
    scale = h / 34
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_DUPLEX, scale, max(1, int(scale * 2)))
    cv2.putText(img, text, ((w - tw) // 2, (h + th) // 2), cv2.FONT_HERSHEY_DUPLEX, scale, (15, 15, 15),
                max(1, int(scale * 2)), cv2.LINE_AA)
    return img


class Scene:
    """Frame ``t`` of stream ``s``: the picture and its ground-truth boxes per label."""

    def __init__(self, width: int = 1920, height: int = 1080, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.w, self.h = width, height
        coarse = rng.integers(60, 190, (height // 16, width // 16, 3), dtype=np.uint8)
        base = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        self.background = cv2.GaussianBlur(base, (0, 0), 3)
        photo = cv2.imread(str(FACE))
        x1, y1, x2, y2 = FACE_BOX
        self.faces, self.face_boxes = [], []
        for s in FACE_SIZES:
            f = s / (x2 - x1)
            self.faces.append(cv2.resize(photo, (round(256 * f),) * 2, interpolation=cv2.INTER_AREA))
            self.face_boxes.append((round(x1 * f), round(y1 * f), round(x2 * f), round(y2 * f)))
        self.plates = [plate_image(w, h) for w, h in PLATE_SIZES]

    def render(self, t: int, phase: int = 0) -> tuple[np.ndarray, dict[str, list[tuple[int, int, int, int]]]]:
        img = self.background.copy()
        gt: dict[str, list[tuple[int, int, int, int]]] = {"face": [], "plate": []}
        k = t + phase * 7
        for i, (face, (bx1, by1, bx2, by2)) in enumerate(zip(self.faces, self.face_boxes, strict=True)):
            x = 150 + i * 420 + int(60 * np.sin(k / 25 + i))
            y = 120 + (i % 2) * 260 + int(30 * np.cos(k / 30 + i))
            fh, fw = face.shape[:2]
            img[y:y + fh, x:x + fw] = face
            gt["face"].append((x + bx1, y + by1, x + bx2, y + by2))
        for i, plate in enumerate(self.plates):
            ph, pw = plate.shape[:2]
            x = 300 + i * 800 + (k * 3) % 200
            y = 800 + i * 90
            img[y:y + ph, x:x + pw] = plate
            gt["plate"].append((x, y, x + pw, y + ph))
        return img, gt
