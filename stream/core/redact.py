"""Obscure regions of a frame: blur, pixelate or solid fill, ellipses for faces, rectangles for plates.

The region actually painted is returned as :class:`Region` so the caller can report exactly
what was masked (the masks JSON, events). Boxes are enlarged per class before painting: detector
boxes hug the face, hair and ears do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

import cv2
import numpy as np

from stream.core.detections import Detections


class Style(StrEnum):
    BLUR = "blur"
    PIXELATE = "pixelate"
    SOLID = "solid"


@dataclass
class RedactConfig:
    style: Style = Style.BLUR
    mask_scale: dict[str, float] = field(default_factory=lambda: {"face": 1.4, "plate": 1.25})
    """enlargement of each box about its centre, per label"""
    shape: dict[str, str] = field(default_factory=lambda: {"face": "ellipse", "plate": "rect"})
    min_size: int = 6
    """boxes are grown to at least this many pixels on each side"""
    solid_color: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class Region:
    label: str
    box: tuple[int, int, int, int]
    shape: str
    score: float
    track_id: int = -1
    coasted: bool = False

    def as_json(self) -> dict:
        return {"label": self.label, "box": list(self.box), "shape": self.shape,
                "score": round(float(self.score), 4), "track_id": int(self.track_id),
                "coasted": bool(self.coasted)}


def ellipse_mask(w: int, h: int) -> np.ndarray:
    """Pixels whose centres lie inside the ellipse inscribed in a w x h box."""
    ys = (np.arange(h, dtype=np.float32) + 0.5 - h / 2) / (h / 2)
    xs = (np.arange(w, dtype=np.float32) + 0.5 - w / 2) / (w / 2)
    return (ys[:, None] ** 2 + xs[None, :] ** 2) <= 1.0


def _obscure(roi: np.ndarray, style: Style, color: tuple[int, int, int]) -> np.ndarray:
    h, w = roi.shape[:2]
    if style is Style.SOLID:
        return np.broadcast_to(np.array(color, np.uint8), roi.shape)
    if style is Style.PIXELATE:
        # at most 6 blocks along the long side: too coarse to identify anyone, at any size
        blocks = max(1, min(6, max(h, w) // 3))
        sw, sh = max(1, round(w * blocks / max(h, w))), max(1, round(h * blocks / max(h, w)))
        small = cv2.resize(roi, (sw, sh), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    # blur: shrink to at most 8 px, smooth, and enlarge again; this removes every feature at
    # any face size in constant time (a Gaussian with sigma ~ size would cost O(size^2))
    k = max(h, w) / 8
    if k > 1:
        small = cv2.resize(roi, (max(1, round(w / k)), max(1, round(h / k))), interpolation=cv2.INTER_AREA)
    else:
        small = roi
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=1.2, borderType=cv2.BORDER_REPLICATE)
    # bilinear enlargement of an 8-sample image is smooth already; a full-size Gaussian here
    # would cost O(size^2) per pixel for nothing
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


class Redactor:
    """Paints detections onto a frame in place and reports the painted regions."""

    def __init__(self, config: RedactConfig | None = None) -> None:
        self.config = config or RedactConfig()

    def regions(self, dets: Detections, width: int, height: int) -> list[Region]:
        """Integer boxes (x2/y2 exclusive, clipped to the frame) that will be painted."""
        cfg = self.config
        out: list[Region] = []
        for i, label in enumerate(dets.labels):
            x1, y1, x2, y2 = (float(v) for v in dets.boxes[i])
            s = cfg.mask_scale.get(label, 1.0)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            hw = max((x2 - x1) * s, cfg.min_size) / 2
            hh = max((y2 - y1) * s, cfg.min_size) / 2
            box = (max(0, math.floor(cx - hw)), max(0, math.floor(cy - hh)),
                   min(width, math.ceil(cx + hw)), min(height, math.ceil(cy + hh)))
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            shape = cfg.shape.get(label, "rect")
            if shape == "ellipse" and (cx - hw < 0 or cy - hh < 0 or cx + hw > width or cy + hh > height):
                # the frame edge cuts the box: an ellipse inscribed in the clipped box would
                # uncover part of the face, the clipped rectangle covers all of it
                shape = "rect"
            out.append(Region(
                label=label, box=box, shape=shape, score=float(dets.scores[i]),
                track_id=int(dets.track_ids[i]) if dets.track_ids is not None else -1,
                coasted=bool(dets.coasted[i]) if dets.coasted is not None else False,
            ))
        return out

    def apply(self, frame: np.ndarray, dets: Detections) -> list[Region]:
        """Obscure every detection in ``frame`` (H x W x 3 uint8, modified in place)."""
        h, w = frame.shape[:2]
        regions = self.regions(dets, w, h)
        for r in regions:
            self.paint(frame, r)
        return regions

    def paint(self, frame: np.ndarray, r: Region) -> None:
        x1, y1, x2, y2 = r.box
        roi = frame[y1:y2, x1:x2]
        if r.shape == "ellipse":
            fill = _obscure(roi, self.config.style, self.config.solid_color)
            mask = ellipse_mask(x2 - x1, y2 - y1)
            roi[mask] = fill[mask]
        else:
            roi[...] = _obscure(roi, self.config.style, self.config.solid_color)

