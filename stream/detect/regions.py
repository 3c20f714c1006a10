"""Change-gated detection: on a still camera a model looks again only where the picture changed.

A fixed CCTV camera shows the same street from one detector run to the next; most of every run
finds again what the last one found. Per stream and model, :class:`RegionGate` keeps the picture
the model last saw (grey, slightly blurred) and the boxes it found. On the next due frame, cells
of 4x4 pixels are compared with it:

- no cell changed beyond camera noise: the model does not run, its last boxes stand;
- some cells changed: the model runs on crops around them only, cut from the frame as the model
  reads it (resized to its scale, on its 32 px stride grid), and its boxes there replace the old
  ones; boxes elsewhere stand. A model that reads objects by their surroundings gets more picture
  around each crop (``context``: the plate model, which on tight crops missed plates it found on
  the whole frame);
- much of the frame changed, the stream is new or restarted, ``refresh`` source frames passed
  since the last whole look, or more than ``max_gap`` since the last look (frames shed under
  overload): the model runs on the whole frame.

Why nothing new can hide: a box is kept only while every cell under it still matches, pixel by
pixel within the noise threshold, the picture the model saw when it produced it (a cell's
reference moves only when the model looks at that cell again, so slow drift adds up against it
instead of slipping past frame by frame). Anything that appears, leaves or moves changes the
cells under it, and those cells are searched again, with a margin, together with every old box
they touch, so a searched object is never cut by a crop's edge. A box found touching a crop's
inner edge (an object only partly in the crop) makes the model look at the whole frame instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from stream.core.detections import Detections

Rect = tuple[float, float, float, float]
"""x1, y1, x2, y2 in the pixels of the frame the model reads (x2/y2 exclusive)"""


def model_rect(r: Rect, shape: tuple[int, int], scale: float) -> tuple[int, int, int, int]:
    """A crop of :meth:`RegionGate.look` in the pixels of the frame resized by ``scale`` (the
    picture the model reads: :func:`stream.detect.letterbox.scaled`)."""
    h, w = shape
    mw, mh = max(1, round(w * scale)), max(1, round(h * scale))
    x1, y1, x2, y2 = (round(v * scale) for v in r)
    return x1, y1, mw if r[2] >= w else x2, mh if r[3] >= h else y2


@dataclass(frozen=True)
class GateConfig:
    """The change test and the crops' geometry (see the module docstring)."""

    cell: int = 4
    """side of a cell in the pixels of the frame the model reads"""
    levels: float = 6.0
    """a cell changed when its pixels moved by more than this many grey levels on average (a
    still CCTV picture's noise: 1-4 at the 90th percentile of cells, dev/video-cctv)"""
    margin: int = 3
    """cells searched around every changed cell"""
    refresh: int = 50
    """source frames after which the model looks at the whole frame again whatever changed"""
    max_gap: int = 12
    """source frames between two looks beyond which the model looks at the whole frame: a stream
    whose frames are shed (an overloaded stage) has moved on by then, and gating there only added
    cost and made a batch's time harder to foresee (benchmarks/README.md)"""
    max_area: float = 0.6
    """crops covering more than this share of the frame: the whole frame is cheaper and as good"""
    max_crops: int = 8
    quantum: int = 32
    """crop sides in the model's input pixels are multiples of this (the YOLO stride)"""
    shape_quantum: int = 128
    """... and of this for models whose graph is built per input shape, so they see a few shapes"""


def signature(image: np.ndarray, cell: int) -> np.ndarray:
    """The grey picture, slightly blurred, what cells of ``cell`` pixels are compared by. A frame
    whose sides are not multiples of ``cell`` is padded by repeating its last row and column, so
    the pixels at its right and bottom edges are compared too."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    h, w = grey.shape
    if h % cell or w % cell:
        grey = cv2.copyMakeBorder(grey, 0, -h % cell, 0, -w % cell, cv2.BORDER_REPLICATE)
    # a 3x3 blur: sensor and H.264 noise is mostly pixel to pixel
    return cv2.GaussianBlur(grey, (3, 3), 0)


def grey_region(image: Any, box: tuple[int, int, int, int]) -> np.ndarray:
    """The grey pixels of ``box`` of a BGR array or an I420 picture (its Y plane, no conversion)."""
    x1, y1, x2, y2 = box
    if isinstance(image, np.ndarray):
        return cv2.cvtColor(image[y1:y2, x1:x2], cv2.COLOR_BGR2GRAY)
    return image.y[y1:y2, x1:x2]


def changed_cells(sig: np.ndarray, ref: np.ndarray, cell: int, levels: float) -> np.ndarray:
    """Per cell, whether its pixels moved from ``ref`` by more than ``levels`` grey levels on
    average (mean absolute difference: an object that keeps the cell's mean and texture, a
    mirrored or inverted patch, still differs pixel by pixel)."""
    rows, cols = sig.shape[0] // cell, sig.shape[1] // cell
    if rows == 0 or cols == 0 or sig.shape != ref.shape:  # not comparable: changed
        return np.ones((max(1, rows), max(1, cols)), bool)
    diff = cv2.absdiff(sig, ref)
    return cv2.resize(diff, (cols, rows), interpolation=cv2.INTER_AREA) > levels


@dataclass
class Look:
    """What a model does on one frame: look at all of it, at ``crops`` of it, or not at all."""

    kind: str  # "full" | "crops" | "skip"
    crops: list[Rect] = field(default_factory=list)
    why: str = ""


class RegionGate:
    """One model's memory of one stream: the picture it last saw in each cell and the boxes found."""

    def __init__(self, config: GateConfig | None = None) -> None:
        self.config = config or GateConfig()
        self.ref: np.ndarray | None = None
        self.boxes = Detections()
        """everything the model reports on the stream now, in the read frame's pixels"""
        self.shape: tuple[int, int] | None = None
        self.last_seq: int | None = None
        self.last_full: int = 0
        self.counts = {"full": 0, "crops": 0, "skip": 0}

    def look(self, sig: np.ndarray, seq: int, shape: tuple[int, int], scale: float,
             per_shape: bool = False, context: int = 0) -> Look:
        """Where the model must look on the frame ``seq`` of ``shape`` (h, w), read at ``scale``
        (``per_shape``: the model builds a graph per input shape, crops come in fewer sizes;
        ``context``: pixels of the model's input added around every changed region)."""
        c = self.config
        if self.ref is None or self.shape != shape or self.ref.shape != sig.shape:
            return Look("full", why="first")
        if self.last_seq is not None and seq <= self.last_seq:
            return Look("full", why="restart")
        if seq - self.last_full >= c.refresh:
            return Look("full", why="refresh")
        if self.last_seq is not None and seq - self.last_seq > c.max_gap:
            return Look("full", why="gap")
        changed = changed_cells(sig, self.ref, c.cell, c.levels)
        if not changed.any():
            return Look("skip")
        grown = cv2.dilate(changed.astype(np.uint8), np.ones((2 * c.margin + 1,) * 2, np.uint8))
        n, _, stats, _ = cv2.connectedComponentsWithStats(grown, connectivity=8)
        h, w = shape
        k = c.cell
        rects = [(int(x) * k, int(y) * k, min(w, int(x + bw) * k), min(h, int(y + bh) * k))
                 for x, y, bw, bh, _ in stats[1:n]]
        if context:
            pad = context / scale
            rects = [(max(0, x1 - pad), max(0, y1 - pad), min(w, x2 + pad), min(h, y2 + pad))
                     for x1, y1, x2, y2 in rects]
        crops = self._settle(rects, shape, scale, c.shape_quantum if per_shape else c.quantum)
        if crops is None:
            return Look("full", why="large")
        return Look("crops", crops)

    def _settle(self, rects: list[Rect], shape: tuple[int, int], scale: float,
                quantum: int) -> list[Rect] | None:
        """Crops that hold every changed region and every old box they touch, of quantised sizes,
        not overlapping; None when they would cover most of the frame anyway."""
        c = self.config
        h, w = shape
        old = self.boxes.boxes
        for _ in range(8):
            grown = []
            for r in rects:
                x1, y1, x2, y2 = r
                for _ in range(4):  # take in every old box the crop touches, whole, with a margin
                    touch = ((old[:, 0] < x2) & (old[:, 2] > x1) & (old[:, 1] < y2) & (old[:, 3] > y1)
                             if len(old) else np.zeros(0, bool))
                    if not touch.any():
                        break
                    b = old[touch]
                    pad = c.cell
                    nx1 = min(x1, math.floor(b[:, 0].min()) - pad)
                    ny1 = min(y1, math.floor(b[:, 1].min()) - pad)
                    nx2 = max(x2, math.ceil(b[:, 2].max()) + pad)
                    ny2 = max(y2, math.ceil(b[:, 3].max()) + pad)
                    nx1, ny1, nx2, ny2 = max(0, nx1), max(0, ny1), min(w, nx2), min(h, ny2)
                    if (nx1, ny1, nx2, ny2) == (x1, y1, x2, y2):
                        break
                    x1, y1, x2, y2 = nx1, ny1, nx2, ny2
                grown.append(_quantise((x1, y1, x2, y2), shape, scale, quantum))
            merged = _merge(grown)
            if len(merged) == len(rects) and merged == rects:
                break
            rects = merged
        else:
            return None
        area = sum((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in rects)
        if len(rects) > c.max_crops or area > c.max_area * h * w:
            return None
        # one last check: the boxes the crops touch lie inside them (the loop may have run out)
        for x1, y1, x2, y2 in rects:
            if len(old):
                touch = (old[:, 0] < x2) & (old[:, 2] > x1) & (old[:, 1] < y2) & (old[:, 3] > y1)
                inside = (old[:, 0] >= x1) & (old[:, 2] <= x2) & (old[:, 1] >= y1) & (old[:, 3] <= y2)
                if (touch & ~inside).any():
                    return None
        return rects

    def commit(self, look: Look, sig: np.ndarray, seq: int, shape: tuple[int, int],
               found: Detections) -> Detections:
        """Record what the model found (``found``: the whole frame's boxes for ``full``, the crops'
        boxes in frame pixels for ``crops``, nothing for ``skip``) and return every box it reports
        on the frame now."""
        self.last_seq = seq
        self.counts[look.kind] += 1
        if look.kind == "full":
            self.ref, self.shape, self.boxes, self.last_full = sig.copy(), shape, found, seq
            return found
        if look.kind == "skip" or self.ref is None:
            return self.boxes
        c = self.config
        keep = np.ones(len(self.boxes), bool)
        for x1, y1, x2, y2 in look.crops:
            b = self.boxes.boxes
            if len(b):
                keep &= ~((b[:, 0] < x2) & (b[:, 2] > x1) & (b[:, 1] < y2) & (b[:, 3] > y1))
            # the cells wholly inside the crop were looked at now: their reference moves (at the
            # frame's edge, the cell the padding completes too)
            h, w = shape
            r1 = math.ceil(y1 / c.cell) * c.cell
            r2 = sig.shape[0] if y2 >= h else math.floor(y2 / c.cell) * c.cell
            c1 = math.ceil(x1 / c.cell) * c.cell
            c2 = sig.shape[1] if x2 >= w else math.floor(x2 / c.cell) * c.cell
            self.ref[r1:r2, c1:c2] = sig[r1:r2, c1:c2]
        self.boxes = Detections.concat([self.boxes.select(keep), found])
        return self.boxes


def _quantise(r: Rect, shape: tuple[int, int], scale: float, q: int, align: int = 32) -> Rect:
    """``r`` grown to a rectangle that, in the picture the model reads (the frame resized by
    ``scale``), starts on the ``align`` grid and has sides that are multiples of ``q`` (or reach
    the picture's edge). Cut there, a crop gives the model the very pixels, on the very stride grid,
    that the whole frame gives it. What lies beyond the crop it does not see: a model that reads an
    object by its surroundings is given more of them (``context`` of :meth:`RegionGate.look`)."""
    x1, y1, x2, y2 = r
    out = []
    for lo, hi, side in ((x1, x2, shape[1]), (y1, y2, shape[0])):
        msize = max(1, round(side * scale))
        mlo = math.floor(lo * scale / align + 1e-6) * align
        mhi = min(msize, math.ceil(hi * scale / align - 1e-6) * align)
        size = math.ceil(max(1, mhi - mlo) / q) * q
        if size >= msize:
            out.append((0.0, float(side)))
            continue
        start = min(mlo, max(0, (msize - size) // align * align))
        end = min(msize, max(start + size, mhi))
        out.append((start / scale, float(side) if end >= msize else end / scale))
    (ax1, ax2), (ay1, ay2) = out
    return ax1, ay1, ax2, ay2


def truncated(found: Detections, crop: Rect, shape: tuple[int, int], edge: float = 1.5) -> bool:
    """Whether a box found in ``crop`` touches one of its edges inside the frame: an object only
    partly in the crop, which the whole frame must be searched for."""
    if not len(found):
        return False
    x1, y1, x2, y2 = crop
    b = found.boxes
    h, w = shape
    return bool(((x1 > 0) & (b[:, 0] <= x1 + edge)).any() or ((y1 > 0) & (b[:, 1] <= y1 + edge)).any()
                or ((x2 < w) & (b[:, 2] >= x2 - edge)).any() or ((y2 < h) & (b[:, 3] >= y2 - edge)).any())


def _merge(rects: list[Rect]) -> list[Rect]:
    """Overlapping rectangles replaced by their union until none overlap (sorted, for a stable
    comparison)."""
    out = list(rects)
    merged = True
    while merged:
        merged = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                a, b = out[i], out[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    out[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    del out[j]
                    merged = True
                    break
            if merged:
                break
    return sorted(out)
