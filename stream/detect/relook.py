"""A second look at plates just lost: the plate model again, on an enlarged crop around where a
plate was last seen, on frames where the full-frame pass did not find it there.

The plate model's hits on one plate flicker: in the load test's harness a 170 px plate was found
on half of the frames at 640 px and, while it bounced, on none of 36 in a row, so its track ran
out of coasting and the plate showed for 11 frames. Read 1.5x larger it was found on every frame
(docs/redaction-quality.md, "Plates just lost"). A whole frame read larger costs 2.25x; a crop
around each plate seen in the last ``window`` frames costs one small run, and only where the full
pass missed it. The stage remembers per stream where it found plates (it sees every stream's
results), so this needs nothing from the trackers downstream.

What it finds only adds masks: a plate not seen again within ``window`` frames is forgotten, and
a crop that finds nothing leaves the tracker to coast the plate as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stream.core.detections import Detections


@dataclass
class RelookConfig:
    window: int = 50
    """source frames after a plate's last sighting during which it is looked for again: 2 s at
    25 fps, beyond the tracker's coasting (12 missed looks at every 3rd frame is 36 frames)"""
    zoom: float = 1.5
    """the crop is read this much larger than the full-frame pass read the frame (the harness's
    170 px plate: found on 399 of 400 frames at 1.5x, on 344 at 1x)"""
    min_plate_px: float = 48.0
    """and at least so large that the plate is this wide in the model's input (a plate the full
    pass saw at 20 px is read at 48)"""
    side: int = 384
    """the model's input, a square: one shape, so GPU graphs and int8 CPU sessions never change"""
    fit: float = 0.9
    """the plate's last box and where it is predicted to be fill at most this share of the input"""
    max_per_frame: int = 4
    """at most this many lost plates a frame are looked for (the most recently seen first)"""
    max_remembered: int = 32
    """at most this many plates are remembered per stream (the most recently seen): a street of
    flickering detections cannot grow the memory without bound"""
    threshold: float = 0.3
    """plate score threshold on the crops, as for vehicle crops (enlarged lettering scores 0.2-0.3)"""


@dataclass
class _Seen:
    box: np.ndarray
    """x1, y1, x2, y2 where it was last found (frame pixels)"""
    seq: int
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2, np.float32))
    """centre motion in pixels per source frame, from its last two sightings"""

    def expected(self, seq: int) -> np.ndarray:
        """Where it may be at ``seq``: its last box and the box moved on by its velocity, spanned."""
        moved = self.box + np.tile(self.velocity, 2) * float(seq - self.seq)
        return np.concatenate([np.minimum(self.box[:2], moved[:2]), np.maximum(self.box[2:], moved[2:])])


MAX_SPEED = 0.05
"""velocities are clipped to this share of the frame's long side per frame: one bad match must not
send the crop across the frame"""


def _overlaps(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    return ((boxes[:, 0] < box[2]) & (boxes[:, 2] > box[0]) & (boxes[:, 1] < box[3]) & (boxes[:, 3] > box[1]))


def square_crop(span: np.ndarray, scale: float, side: int, width: int,
                height: int) -> tuple[int, int, int, int]:
    """The square (``side / scale`` source pixels) centred on ``span``, moved inside the frame and
    clipped where the frame is smaller, in even pixels (an I420 frame is cut without resampling)."""
    size = side / scale
    cx, cy = (span[0] + span[2]) / 2, (span[1] + span[3]) / 2
    x1 = min(max(0.0, cx - size / 2), max(0.0, width - size))
    y1 = min(max(0.0, cy - size / 2), max(0.0, height - size))
    bx1, by1 = int(x1 // 2) * 2, int(y1 // 2) * 2
    bx2 = min(width - width % 2, bx1 + int(np.ceil(size / 2)) * 2)
    by2 = min(height - height % 2, by1 + int(np.ceil(size / 2)) * 2)
    return bx1, by1, bx2, by2


class LostPlates:
    """Per stream, the plates found in the last ``window`` frames, and the crops that look for the
    ones a frame's full-frame pass did not find again."""

    def __init__(self, cfg: RelookConfig) -> None:
        self.cfg = cfg
        self._seen: dict[str, list[_Seen]] = {}

    def streams(self) -> list[str]:
        return list(self._seen)

    def forget(self, stream: str) -> None:
        """Drop a stream's plates (its view changed, it restarted, or it is gone)."""
        self._seen.pop(stream, None)

    def crops(self, stream: str, seq: int, found: Detections, shape: tuple[int, int],
              read_scale: float) -> list[tuple[int, int, int, int]]:
        """The crops to search on frame ``seq``: one per plate seen in the last ``window`` frames that
        no plate of ``found`` (this frame's) overlaps where it is expected. ``read_scale`` is the
        scale the full pass read the frame at."""
        height, width = shape
        seen = [s for s in self._seen.get(stream, []) if 0 < seq - s.seq <= self.cfg.window]
        out = []
        for s in sorted(seen, key=lambda s: -s.seq)[:self.cfg.max_per_frame]:
            span = s.expected(seq)
            if len(found) and _overlaps(found.boxes, span).any():
                continue
            plate_w = float(s.box[2] - s.box[0])
            scale = max(self.cfg.zoom * read_scale, self.cfg.min_plate_px / max(plate_w, 1.0))
            reach = float(max(span[2] - span[0], span[3] - span[1]))
            scale = min(scale, self.cfg.fit * self.cfg.side / max(reach, 1.0))
            box = square_crop(span, scale, self.cfg.side, width, height)
            if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
                out.append(box)
        return out

    def remember(self, stream: str, seq: int, plates: Detections, shape: tuple[int, int]) -> None:
        """Record this frame's plates: each follows on from the remembered plate whose expected place
        it overlaps (its velocity from the two sightings), or is a new one. Plates not seen for
        ``window`` frames, or seen at a later frame (the stream restarted), are dropped."""
        known = [s for s in self._seen.get(stream, []) if 0 <= seq - s.seq <= self.cfg.window]
        limit = MAX_SPEED * max(shape)
        taken: set[int] = set()
        for box in plates.boxes.astype(np.float32):
            match = None
            for j, s in enumerate(known):
                if j not in taken and s.seq < seq and _overlaps(s.expected(seq)[None], box)[0]:
                    match = j
                    break
            if match is None:
                known.append(_Seen(box.copy(), seq))
                taken.add(len(known) - 1)
                continue
            s = known[match]
            step = ((box[:2] + box[2:]) - (s.box[:2] + s.box[2:])) / 2 / float(seq - s.seq)
            s.velocity = np.clip(step, -limit, limit).astype(np.float32)
            s.box, s.seq = box.copy(), seq
            taken.add(match)
        if known:
            self._seen[stream] = sorted(known, key=lambda s: -s.seq)[:self.cfg.max_remembered]
        else:
            self._seen.pop(stream, None)
