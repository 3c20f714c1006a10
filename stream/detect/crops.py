"""A second look for plates: the plate model run again on a crop around each vehicle, enlarged.

A plate is a fixed fraction of its vehicle (a UK plate is 520 mm on a car 1.7-1.9 m wide: a
quarter of the width seen from behind or in front, less from three-quarters), so scaling each
vehicle's crop to one size puts its plate near the size the plate model finds best, whatever the
distance: a car 60 px wide, whose 4 px plate no full-frame pass sees, becomes 384 px wide with a
plate of about 20 px. The person/vehicle model that already runs for head masks says where the
vehicles are; the crops of a whole batch (every stream of the stage) go through the plate model
as one batch, and the boxes found are mapped back to their frames here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from stream.core.detections import Detections
from stream.core.yuv import I420, Picture


@dataclass
class CropConfig:
    sizes: tuple[int, ...] = (256,)
    """long side each crop is scaled to (up or down) before the plate model sees it; with several,
    each crop is searched at each and what any finds is kept (the plate model's hits on tiny,
    blurred plates change with the scale)"""
    margin: float = 0.1
    """each vehicle box grows by this share of its width and height on every side (a plate on a
    bumper or a box cut short by the detector)"""
    min_vehicle_px: float = 12.0
    """vehicles shorter than this are not cropped: their plate is 1-2 px, nothing to find"""
    max_per_frame: int = 16
    """at most this many vehicles per frame (the most certain first): a car park cannot make one
    frame cost a hundred plate runs. Vehicles beyond it keep the middle masks of the first round"""
    threshold: float = 0.3
    """plate score threshold on the crops: enlarged grilles, badges and lettering score 0.2-0.3; at
    0.3 the development sets lost no plate found at 0.2 and street video was masked less (0.45 lost
    plates)"""


@dataclass(frozen=True)
class Crop:
    """One vehicle's crop: the frame it is cut from (index in the batch), the vehicle (index in that
    frame's vehicle detections) and the box cut (even integer source pixels, x2/y2 exclusive)."""

    frame: int
    vehicle: int
    box: tuple[int, int, int, int]


def crop_box(vehicle: np.ndarray, width: int, height: int, margin: float) -> tuple[int, int, int, int] | None:
    """``vehicle`` (x1, y1, x2, y2) grown by ``margin`` on every side, clipped to the frame and
    rounded outwards to even pixels (so an I420 frame is cut without resampling its chroma);
    None when nothing of it is in the frame."""
    x1, y1, x2, y2 = (float(v) for v in vehicle)
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    bx1 = max(0, int(np.floor((x1 - mx) / 2)) * 2)
    by1 = max(0, int(np.floor((y1 - my) / 2)) * 2)
    bx2 = min(width - width % 2, int(np.ceil((x2 + mx) / 2)) * 2)
    by2 = min(height - height % 2, int(np.ceil((y2 + my) / 2)) * 2)
    if bx2 - bx1 < 2 or by2 - by1 < 2:
        return None
    return bx1, by1, bx2, by2


def plan_crops(vehicles: list[Detections | None], shapes: list[tuple[int, int]],
               cfg: CropConfig) -> list[Crop]:
    """The crops to search in a batch: per frame (``None``: the vehicle model did not run on it),
    the vehicles at least ``min_vehicle_px`` tall, most certain first, up to ``max_per_frame``."""
    out: list[Crop] = []
    for i, (found, (h, w)) in enumerate(zip(vehicles, shapes, strict=True)):
        if found is None or not len(found):
            continue
        tall = (found.boxes[:, 3] - found.boxes[:, 1]) >= cfg.min_vehicle_px
        order = [int(j) for j in np.argsort(-found.scores, kind="stable") if tall[j]][:cfg.max_per_frame]
        for j in order:
            box = crop_box(found.boxes[j], w, h, cfg.margin)
            if box is not None:
                out.append(Crop(i, j, box))
    return out


def cut(image: Picture, box: tuple[int, int, int, int]) -> np.ndarray:
    """The BGR pixels of ``box`` (even coordinates) of a BGR or I420 frame (a copy)."""
    x1, y1, x2, y2 = box
    if isinstance(image, I420):
        return image.region(x1, y1, x2, y2).to_bgr()
    return np.ascontiguousarray(image[y1:y2, x1:x2])


def to_frame(found: Detections, box: tuple[int, int, int, int]) -> Detections:
    """Boxes found on a crop, in the pixels of the frame it was cut from."""
    if not len(found):
        return found
    shift = np.array([box[0], box[1], box[0], box[1]], np.float32)
    return dataclasses.replace(found, boxes=found.boxes + shift)
