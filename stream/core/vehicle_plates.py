"""Plate masks over the middle of small vehicles, the last resort for plates no model can find.

A car 60-200 px tall carries a plate of 5-15 px, which no plate model here detects reliably.
Where it sits depends on the view (front, rear, three-quarter): on the development footage its
centre was at 20-60% of the vehicle's width and 26-70% of its height. The mask (a rectangle,
enlarged by the plate mask scale) is drawn on the middle of the vehicle, 15-85% across and
25-80% down, which covered every such plate.

These masks carry their own label, :data:`LABEL`, so that the tracker follows them as what they
are: the stand-in for a plate not found yet. Such a track ends as soon as a plate track sits on
its vehicle (:func:`covered`), instead of coasting and growing beside the plate that replaced it,
and two of them never continue each other's tracks with a real plate's box.
"""

from __future__ import annotations

import numpy as np

from stream.core.detections import Detections

LABEL = "vehicle_plate"
"""a mask over the middle of a vehicle on which no plate was found"""

TEXT_LABEL = "plate_text"
"""a text line found where the plate model found no plate (stream.detect.text)"""

TEXT_COAST = 3
"""looks a text-only plate track outlives its last detection"""


def public_label(label: str) -> str:
    """The label masks and events report: a vehicle's middle mask hides a plate, so it is a plate
    there (the masks JSON and event formats know faces and plates only)."""
    return "plate" if label in (LABEL, TEXT_LABEL) else label


SCALE = 1.25
"""mask enlargement about the centre (the plate mask's default)"""

ZONE = (0.15, 0.25, 0.85, 0.8)
"""the masked part of a vehicle box: x1, y1, x2, y2 as fractions of its width and height"""

STAND_IN_COAST = 3
"""looks (runs of the vehicle model) a stand-in outlives its vehicle's last detection, at its last
place moved on by its velocity, without growing: the middle of a vehicle box is already a generous
zone, and a vehicle the model keeps finding renews it (a plate track coasts for ``redaction.coast``
looks and grows, since a plate box is tight)"""

PLATE_FRESH_FRAMES = 2
"""a plate track detected within this many source frames ends the stand-ins on its vehicle: a
plate missed for a frame or two is still on the plate, one coasting longer may have drifted off
it on moving footage, and the stand-in is then its backup"""


def zones_of(vehicles: np.ndarray) -> np.ndarray:
    """The masked middle of each vehicle box (N x 4, x1 y1 x2 y2)."""
    b = np.asarray(vehicles, np.float32).reshape(-1, 4)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    fx1, fy1, fx2, fy2 = ZONE
    return np.stack([b[:, 0] + fx1 * w, b[:, 1] + fy1 * h, b[:, 0] + fx2 * w, b[:, 1] + fy2 * h],
                    1).astype(np.float32)


def vehicles_of(zones: np.ndarray) -> np.ndarray:
    """The vehicle boxes that :func:`zones_of` made ``zones`` from (its exact inverse)."""
    z = np.asarray(zones, np.float32).reshape(-1, 4)
    fx1, fy1, fx2, fy2 = ZONE
    w, h = (z[:, 2] - z[:, 0]) / (fx2 - fx1), (z[:, 3] - z[:, 1]) / (fy2 - fy1)
    x1, y1 = z[:, 0] - fx1 * w, z[:, 1] - fy1 * h
    return np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float32)


def inside(vehicles: np.ndarray, plates: np.ndarray) -> np.ndarray:
    """Per vehicle box: whether any plate box's centre lies on it."""
    b = np.asarray(vehicles, np.float32).reshape(-1, 4)
    p = np.asarray(plates, np.float32).reshape(-1, 4)
    if not len(b) or not len(p):
        return np.zeros(len(b), bool)
    pc = (p[:, :2] + p[:, 2:]) / 2
    hit = ((pc[None, :, 0] >= b[:, None, 0]) & (pc[None, :, 0] <= b[:, None, 2])
           & (pc[None, :, 1] >= b[:, None, 1]) & (pc[None, :, 1] <= b[:, None, 3]))
    return hit.any(axis=1)


def covered(zones: np.ndarray, plates: np.ndarray) -> np.ndarray:
    """Per zone box: whether a plate sits on the vehicle it was made from (its mask is not needed)."""
    return inside(vehicles_of(zones), plates)


def plates_from_vehicles(vehicles: Detections, plates: Detections, max_height: float) -> Detections:
    """:data:`LABEL` masks on the vehicles up to ``max_height`` px tall on which no plate was found."""
    if not len(vehicles):
        return Detections()
    b = vehicles.boxes
    keep = ((b[:, 3] - b[:, 1]) <= max_height) & ~inside(b, plates.boxes)
    return Detections(boxes=zones_of(b[keep]), scores=vehicles.scores[keep].astype(np.float32),
                      labels=(LABEL,) * int(keep.sum()))
