"""Per-stream masking stage: tracker, optional look-back, and the redactor, in that order.

Detections of frame t decide the masks of frame t; a tracker keeps masks alive through missed
detections; with ``lookback`` > 0 the stage holds that many frames back so a face first found
in frame t is also masked in the frames just before it (a detector usually fires a frame or
two after a face enters). Look-back costs ``lookback`` frames of latency, so live streams
use 0 and files a few frames. Files and live streams both mask through this stage, and paint
their privacy zones here. At a shot cut (:mod:`stream.core.cuts`) the tracks of the old view end
and look-back stops at the cut: neither view gets the other's masks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream.core.cuts import ShotCuts
from stream.core.detections import Detections
from stream.core.nms import scale_boxes
from stream.core.redact import Redactor, Region
from stream.core.track import Seen, Tracker
from stream.core.yuv import Picture, blank_like
from stream.core.zones import ZoneSet

NOT_OBSERVED = Detections(observed=frozenset())
"""what the tracker is told about a frame that got no detections: nothing was looked for"""


@dataclass
class Masked:
    """A frame ready to publish: already painted, with the regions that were painted."""

    index: int
    image: Picture
    regions: list[Region]
    meta: Any = None
    dets: Detections = field(default_factory=Detections)
    """the boxes that were masked: tracked ones plus look-back copies (empty for a failed frame)"""
    failed: bool = False
    """the frame got no detections: ``image`` is black (of the frame's kind: BGR zeros or I420
    black), none of the frame's pixels are in it"""


@dataclass
class _Pending:
    index: int
    image: Picture
    dets: Detections
    meta: Any
    failed: bool
    shot: int = 0
    extra: list[Detections] = field(default_factory=list)


class MaskingStage:
    """Feed detections frame by frame; get painted frames out, ``lookback`` frames later."""

    def __init__(self, tracker: Tracker, redactor: Redactor, lookback: int = 0,
                 zones: ZoneSet | None = None) -> None:
        self.tracker = tracker
        self.redactor = redactor
        self.lookback = max(0, lookback)
        self.zones = zones or ZoneSet()
        """privacy zones painted over every frame after its masks; replace the whole object to change
        them (a frame reads it once)"""
        self._pending: deque[_Pending] = deque()
        self._size: tuple[int, ...] | None = None
        self.cuts = ShotCuts(tracker.config.cut_threshold)
        self.shots = 0
        """shot cuts seen so far"""
        self.cut = False
        """the last frame pushed started a new shot"""

    def push(self, index: int, image: Picture, dets: Detections | None, meta: Any = None, *,
             elapsed: int = 1, seen: Seen | None = None) -> Iterator[Masked]:
        """Mask ``image`` with ``dets`` and what the tracker carries; yield the frames now due.

        ``dets`` None fails closed: the frame got no detections, so it comes out black (tracks
        coast on: nothing was looked for). A frame of another size starts tracking afresh, since
        boxes of another resolution mean nothing there. ``elapsed`` and ``seen`` go to the
        tracker (source frames since the last push; the frame's identity for track reports).
        """
        if self._size is not None and image.shape[:2] != self._size:
            yield from self.flush()
            self.tracker = Tracker(self.tracker.config)
            self.cuts.reset()
        self._size = image.shape[:2]
        self.cut = self.cuts(image, elapsed)
        self.shots += self.cut
        tracked = self.tracker.update(NOT_OBSERVED if dets is None else dets, elapsed, seen, cut=self.cut)
        started = self.tracker.changes.started
        if self.lookback and started and tracked.track_ids is not None:
            born = tracked.select(np.isin(tracked.track_ids, [t.track_id for t in started]))
            growth = self.tracker.config.coast_growth
            for back, p in enumerate(reversed(self._pending), start=1):
                if p.shot != self.shots:  # the view before a cut is not where these boxes are
                    break
                p.extra.append(Detections(
                    boxes=scale_boxes(born.boxes, 1 + growth * back), scores=born.scores,
                    labels=born.labels, track_ids=born.track_ids, coasted=np.ones(len(born), bool),
                ))
        self._pending.append(_Pending(index, image, tracked, meta, failed=dets is None, shot=self.shots))
        while len(self._pending) > self.lookback:
            yield self._emit(self._pending.popleft())

    def flush(self) -> Iterator[Masked]:
        while self._pending:
            yield self._emit(self._pending.popleft())

    def _emit(self, p: _Pending) -> Masked:
        if p.failed:
            return Masked(p.index, blank_like(p.image), [], p.meta, NOT_OBSERVED, failed=True)
        dets = Detections.concat([p.dets, *p.extra]) if p.extra else p.dets
        regions = self.redactor.apply(p.image, dets)
        self.zones.paint(p.image)
        return Masked(p.index, p.image, regions, p.meta, dets)
