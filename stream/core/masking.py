"""Per-stream masking stage: tracker, optional look-back, and the redactor, in that order.

Detections of frame t decide the masks of frame t; a tracker keeps masks alive through missed
detections; with ``lookback`` > 0 the stage holds that many frames back so a face first found
in frame t is also masked in the frames just before it (a detector usually fires a frame or
two after a face enters). Look-back costs ``lookback`` frames of latency, so live streams
default to 0 and files to a few frames.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream.core.detections import Detections
from stream.core.nms import scale_boxes
from stream.core.redact import Redactor, Region
from stream.core.track import Tracker


@dataclass
class Masked:
    """A frame ready to publish: already painted, with the regions that were painted."""

    index: int
    image: np.ndarray
    regions: list[Region]
    meta: Any = None


@dataclass
class _Pending:
    index: int
    image: np.ndarray
    dets: Detections
    meta: Any
    extra: list[Detections] = field(default_factory=list)


class MaskingStage:
    """Feed detections frame by frame; get painted frames out, ``lookback`` frames later."""

    def __init__(self, tracker: Tracker, redactor: Redactor, lookback: int = 0) -> None:
        self.tracker = tracker
        self.redactor = redactor
        self.lookback = max(0, lookback)
        self._pending: deque[_Pending] = deque()
        self._last_id = 0  # track ids only grow: a larger id is a track born in this frame

    def push(self, index: int, image: np.ndarray, dets: Detections, meta: Any = None) -> Iterator[Masked]:
        tracked = self.tracker.update(dets)
        if self.lookback and tracked.track_ids is not None:
            new = tracked.track_ids > self._last_id
            if new.any():
                born = tracked.select(new)
                growth = self.tracker.config.coast_growth
                for back, p in enumerate(reversed(self._pending), start=1):
                    p.extra.append(Detections(
                        boxes=scale_boxes(born.boxes, 1 + growth * back), scores=born.scores,
                        labels=born.labels, track_ids=born.track_ids, coasted=np.ones(len(born), bool),
                    ))
        if tracked.track_ids is not None and len(tracked.track_ids):
            self._last_id = max(self._last_id, int(tracked.track_ids.max()))
        self._pending.append(_Pending(index, image, tracked, meta))
        while len(self._pending) > self.lookback:
            yield self._emit(self._pending.popleft())

    def flush(self) -> Iterator[Masked]:
        while self._pending:
            yield self._emit(self._pending.popleft())

    def _emit(self, p: _Pending) -> Masked:
        dets = Detections.concat([p.dets, *p.extra]) if p.extra else p.dets
        regions = self.redactor.apply(p.image, dets)
        return Masked(p.index, p.image, regions, p.meta)
