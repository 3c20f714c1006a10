"""Obscure regions of a frame: blur, pixelate or solid fill, ellipses for faces, rectangles for plates.

The region actually painted is returned as :class:`Region` so the caller can report exactly
what was masked (the masks JSON, events). Boxes are enlarged per class before painting: detector
boxes hug the face, hair and ears do not.

A frame is a BGR array or an :class:`~stream.core.yuv.I420` picture. On I420 the same regions are
painted plane by plane: luma over the box, chroma over every sample the box touches, so the mask
never covers less than on BGR (at most a one-pixel rim more where a box starts or ends on an odd
coordinate), in the same style and, for solid fills, the same colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

import cv2
import numpy as np

from stream.core.detections import Detections
from stream.core.vehicle_plates import LABEL as VEHICLE_PLATE
from stream.core.vehicle_plates import SCALE as VEHICLE_PLATE_SCALE
from stream.core.vehicle_plates import public_label
from stream.core.yuv import I420, Picture, yuv_color


class Style(StrEnum):
    BLUR = "blur"
    PIXELATE = "pixelate"
    SOLID = "solid"


@dataclass
class RedactConfig:
    style: Style = Style.BLUR
    mask_scale: dict[str, float] = field(
        default_factory=lambda: {"face": 1.4, "plate": 1.25, VEHICLE_PLATE: VEHICLE_PLATE_SCALE})
    """enlargement of each box about its centre, per label"""
    shape: dict[str, str] = field(default_factory=lambda: {"face": "ellipse", "plate": "rect"})
    """per label; rectangles for the rest"""
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


def chroma_ellipse_mask(x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    """The 4:2:0 chroma samples of the box's chroma rectangle (see :func:`chroma_box`) to paint for
    an ellipse in luma box (x1, y1, x2, y2): each sample whose 2x2 luma pixels include one inside."""
    cx1, cy1, cx2, cy2 = chroma_box(x1, y1, x2, y2)
    grid = np.zeros((2 * (cy2 - cy1), 2 * (cx2 - cx1)), bool)
    oy, ox = y1 - 2 * cy1, x1 - 2 * cx1
    grid[oy:oy + y2 - y1, ox:ox + x2 - x1] = ellipse_mask(x2 - x1, y2 - y1)
    return grid.reshape(cy2 - cy1, 2, cx2 - cx1, 2).any(axis=(1, 3))


def chroma_box(x1: int, y1: int, x2: int, y2: int) -> tuple[int, int, int, int]:
    """The 4:2:0 chroma samples a luma box touches: halved, start rounded down and end up."""
    return x1 // 2, y1 // 2, (x2 + 1) // 2, (y2 + 1) // 2


def _blocks(h: int, w: int) -> int:
    """Pixelation blocks along the long side: at most 6, too coarse to identify anyone at any size."""
    return max(1, min(6, max(h, w) // 3))


def _obscure(roi: np.ndarray, style: Style, color: tuple[int, int, int] | int,
             blocks: int | None = None) -> np.ndarray:
    """``roi`` (H x W x 3 or one H x W plane) obscured; ``blocks`` overrides the pixelation grid
    (chroma planes use their luma's, so the blocks line up)."""
    h, w = roi.shape[:2]
    if style is Style.SOLID:
        return np.broadcast_to(np.array(color, np.uint8), roi.shape)
    if style is Style.PIXELATE:
        blocks = blocks or _blocks(h, w)
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
            s = cfg.mask_scale.get(label, cfg.mask_scale.get(public_label(label), 1.0))
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            hw = max((x2 - x1) * s, cfg.min_size) / 2
            hh = max((y2 - y1) * s, cfg.min_size) / 2
            box = (max(0, math.floor(cx - hw)), max(0, math.floor(cy - hh)),
                   min(width, math.ceil(cx + hw)), min(height, math.ceil(cy + hh)))
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            shape = cfg.shape.get(label, cfg.shape.get(public_label(label), "rect"))
            if shape == "ellipse" and (cx - hw < 0 or cy - hh < 0 or cx + hw > width or cy + hh > height):
                # the frame edge cuts the box: an ellipse inscribed in the clipped box would
                # uncover part of the face, the clipped rectangle covers all of it
                shape = "rect"
            out.append(Region(
                label=public_label(label), box=box, shape=shape, score=float(dets.scores[i]),
                track_id=int(dets.track_ids[i]) if dets.track_ids is not None else -1,
                coasted=bool(dets.coasted[i]) if dets.coasted is not None else False,
            ))
        return out

    def apply(self, frame: Picture, dets: Detections) -> list[Region]:
        """Obscure every detection in ``frame`` (BGR H x W x 3 uint8 or I420, modified in place)."""
        h, w = frame.shape[:2]
        regions = self.regions(dets, w, h)
        for r in regions:
            self.paint(frame, r)
        return regions

    def paint(self, frame: Picture, r: Region) -> None:
        x1, y1, x2, y2 = r.box
        style, ellipse = self.config.style, r.shape == "ellipse"
        if not isinstance(frame, I420):
            _fill(frame[y1:y2, x1:x2], ellipse_mask(x2 - x1, y2 - y1) if ellipse else None, style,
                  self.config.solid_color)
            return
        cx1, cy1, cx2, cy2 = chroma_box(*r.box)
        y, u, v = frame.planes
        y_color, u_color, v_color = yuv_color(tuple(self.config.solid_color))
        blocks = _blocks(y2 - y1, x2 - x1)
        _fill(y[y1:y2, x1:x2], ellipse_mask(x2 - x1, y2 - y1) if ellipse else None, style, y_color, blocks)
        cmask = chroma_ellipse_mask(*r.box) if ellipse else None
        _fill(u[cy1:cy2, cx1:cx2], cmask, style, u_color, blocks)
        _fill(v[cy1:cy2, cx1:cx2], cmask, style, v_color, blocks)


def _fill(roi: np.ndarray, mask: np.ndarray | None, style: Style, color: tuple[int, int, int] | int,
          blocks: int | None = None) -> None:
    """Obscure ``roi`` in place, only where ``mask`` is set when there is one."""
    if mask is None:
        roi[...] = _obscure(roi, style, color, blocks)
    else:
        roi[mask] = _obscure(roi, style, color, blocks)[mask]
