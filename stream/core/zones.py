"""Privacy zones: fixed polygons of a camera's picture that are always masked, whatever detection says.

A control room must never show what a camera should not see (a neighbour's windows and garden),
even while the detector is down. A zone is a polygon in normalised coordinates (0..1 of the
picture's width and height), so it survives a change of resolution. ``mask`` zones are painted
solid; ``only`` zones say what may be seen: everything outside all of them is painted.

The polygons are rasterised once per picture size into one boolean mask (and its half-size
version for I420 chroma); painting a frame is then one masked copy per plane, limited to the
bounding box of what is painted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from stream.core.yuv import I420, Picture, yuv_color

ZoneKind = Literal["mask", "only"]
Point = tuple[float, float]

MAX_POINTS = 64
"""corners of one polygon: enough for any outline drawn by hand"""
MAX_ZONES = 32
SHIFT = 8
"""fractional bits of the polygon corners handed to cv2 (1/256 pixel)"""
MAX_RASTERS = 4
"""picture sizes whose rasters are kept per zone set (oldest dropped first)"""
GROW = np.ones((3, 3), np.uint8)
"""a painted area grows by one pixel all round"""
FILL_BGR = (48, 48, 48)
"""dark grey, not black: a zone reads as 'masked on purpose', a black frame as 'failed closed'"""


@dataclass(frozen=True)
class Zone:
    """One polygon; ``kind`` ``mask`` hides its inside, ``only`` shows only its inside (with the
    stream's other ``only`` zones)."""

    kind: ZoneKind
    points: tuple[Point, ...]
    name: str = ""


def _cross(o: Point, a: Point, b: Point) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _on_segment(p: Point, q: Point, r: Point) -> bool:
    """``q`` (collinear with p and r) lies on the segment p-r."""
    return min(p[0], r[0]) <= q[0] <= max(p[0], r[0]) and min(p[1], r[1]) <= q[1] <= max(p[1], r[1])


def segments_cross(p1: Point, p2: Point, q1: Point, q2: Point) -> bool:
    """Whether the closed segments p1-p2 and q1-q2 share a point."""
    d1, d2 = _cross(q1, q2, p1), _cross(q1, q2, p2)
    d3, d4 = _cross(p1, p2, q1), _cross(p1, p2, q2)
    if ((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4)):
        return True
    return ((d1 == 0 and _on_segment(q1, p1, q2)) or (d2 == 0 and _on_segment(q1, p2, q2))
            or (d3 == 0 and _on_segment(p1, q1, p2)) or (d4 == 0 and _on_segment(p1, q2, p2)))


def area(points: Sequence[Point]) -> float:
    """The polygon's area (shoelace), in the units of its coordinates squared."""
    n = len(points)
    return abs(sum(points[i][0] * points[(i + 1) % n][1] - points[(i + 1) % n][0] * points[i][1]
                   for i in range(n))) / 2


def polygon_problem(points: Sequence[Sequence[float]]) -> str | None:
    """Why ``points`` is not a usable zone polygon (with the fix), or None when it is."""
    if len(points) < 3:
        return f"a zone needs at least 3 points, got {len(points)}"
    if len(points) > MAX_POINTS:
        return f"a zone has at most {MAX_POINTS} points, got {len(points)}; simplify the outline"
    pts: list[Point] = []
    for i, p in enumerate(points):
        if len(p) != 2:
            return f"point {i} is {list(p)}; give each point as [x, y]"
        x, y = float(p[0]), float(p[1])
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            return (f"point {i} [{x:g}, {y:g}] is outside the picture; coordinates are fractions of its "
                    "width and height, from 0 to 1")
        pts.append((x, y))
    n = len(pts)
    for i in range(n):
        if pts[i] == pts[(i + 1) % n]:
            return f"points {i} and {(i + 1) % n} are the same; remove one"
    for i in range(n):
        a1, a2 = pts[i], pts[(i + 1) % n]
        for j in range(i + 1, n):
            if j == i or (j + 1) % n == i or j == (i + 1) % n:
                continue  # neighbouring edges share a corner
            if segments_cross(a1, a2, pts[j], pts[(j + 1) % n]):
                return (f"the polygon crosses itself (edge {i}-{(i + 1) % n} meets edge {j}-{(j + 1) % n}); "
                        "draw its corners in order around the outline")
    if area(pts) < 1e-6:
        return "the polygon has no area; its points lie on one line"
    return None


@dataclass
class _Raster:
    full: np.ndarray
    """True where the picture is painted, (height, width)"""
    half: np.ndarray | None
    """the same at half size for I420 chroma (painted where any of its 4 pixels is)"""
    box: tuple[int, int, int, int]
    """x1, y1, x2, y2 (exclusive) of what is painted, in full-size pixels; empty when nothing is"""


@dataclass
class ZoneSet:
    """A stream's zones, ready to paint; rasterised once per picture size."""

    zones: tuple[Zone, ...] = ()
    fill_bgr: tuple[int, int, int] = FILL_BGR
    _rasters: dict[tuple[int, int, bool], _Raster] = field(default_factory=dict, repr=False)

    def __bool__(self) -> bool:
        return bool(self.zones)

    def mask(self, width: int, height: int) -> np.ndarray:
        """True where a ``width`` x ``height`` picture is painted."""
        return self._raster(width, height, False).full

    def _raster(self, width: int, height: int, chroma: bool) -> _Raster:
        key = (width, height, chroma)
        r = self._rasters.get(key)
        if r is None:
            if len(self._rasters) >= MAX_RASTERS:  # a WebRTC sender changing size often: keep memory bounded
                self._rasters.pop(next(iter(self._rasters)))
            r = self._rasters[key] = rasterise(self.zones, width, height, chroma)
        return r

    def paint(self, image: Picture) -> None:
        """Paint the zones into ``image`` in place (BGR array or I420)."""
        if not self.zones:
            return
        if isinstance(image, I420):
            r = self._raster(image.width, image.height, True)
            x1, y1, x2, y2 = r.box
            if x2 <= x1 or y2 <= y1:
                return
            yv, uv, vv = yuv_color(self.fill_bgr)
            _fill(image.y, r.full, yv, (x1, y1, x2, y2))
            assert r.half is not None
            hb = (x1 // 2, y1 // 2, (x2 + 1) // 2, (y2 + 1) // 2)
            _fill(image.u, r.half, uv, hb)
            _fill(image.v, r.half, vv, hb)
            return
        h, w = image.shape[:2]
        r = self._raster(w, h, False)
        x1, y1, x2, y2 = r.box
        if x2 > x1 and y2 > y1:
            sub = image[y1:y2, x1:x2]
            np.copyto(sub, np.array(self.fill_bgr, np.uint8), where=r.full[y1:y2, x1:x2, None])


def _fill(plane: np.ndarray, mask: np.ndarray, value: int, box: tuple[int, int, int, int]) -> None:
    x1, y1, x2, y2 = box
    np.copyto(plane[y1:y2, x1:x2], np.uint8(value), where=mask[y1:y2, x1:x2])


def rasterise(zones: Sequence[Zone], width: int, height: int, chroma: bool = False) -> _Raster:
    """The painted pixels of ``zones`` on a ``width`` x ``height`` picture.

    Edges are rounded outward: the fill is grown by one pixel all round, so every pixel the outline
    touches is painted and a zone never shows a sliver of what it hides at its border (cv2's fill
    alone leaves out some pixels whose centres lie just inside a slanted edge).
    """
    def polys(kind: str) -> list[np.ndarray]:
        # pixel i spans [i, i+1) of the picture's width, and cv2 puts pixel i's centre at i: shift by
        # half a pixel, and keep SHIFT fractional bits so a corner is not moved to a pixel centre
        scaled = [(np.array(z.points, np.float64) * [width, height] - 0.5) * (1 << SHIFT)
                  for z in zones if z.kind == kind]
        return [np.round(p).astype(np.int32) for p in scaled]

    only = polys("only")
    if only:  # inside any 'only' zone is visible; the rest is painted
        visible = np.zeros((height, width), np.uint8)
        cv2.fillPoly(visible, only, 1, shift=SHIFT)
        visible = cv2.erode(visible, GROW)  # the pixels the outline touches stay painted
        full = visible == 0
    else:
        full = np.zeros((height, width), bool)
    masked = polys("mask")
    if masked:
        m = np.zeros((height, width), np.uint8)
        cv2.fillPoly(m, masked, 1, shift=SHIFT)
        m = cv2.dilate(m, GROW)
        full |= m.astype(bool)
    ys, xs = np.nonzero(full.any(axis=1))[0], np.nonzero(full.any(axis=0))[0]
    box = (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1) if len(xs) else (0, 0, 0, 0)
    half = None
    if chroma:
        h2, w2 = height // 2, width // 2
        half = full[:h2 * 2, :w2 * 2].reshape(h2, 2, w2, 2).any(axis=(1, 3))
    return _Raster(full, half, box)
