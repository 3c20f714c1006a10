"""The value type that leaves the detection layer: boxes, scores and labels for one frame."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

LABELS = ("face", "plate")


@dataclass(frozen=True)
class Detections:
    """Boxes of one frame in source pixel coordinates, x1,y1,x2,y2 (x2/y2 exclusive).

    ``labels`` are strings from :data:`LABELS`; ``track_ids`` is filled by the tracker
    (-1 for untracked) and ``coasted`` marks boxes kept alive without a fresh detection.
    ``observed`` names the labels that were looked for in this frame (None: all of them); a
    detector that skips frames for speed says so here, so the tracker does not read a skipped
    frame as "the face has gone".
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    labels: tuple[str, ...] = ()
    track_ids: np.ndarray | None = None
    coasted: np.ndarray | None = None
    observed: frozenset[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if self.boxes.shape != (n, 4) or len(self.scores) != n or len(self.labels) != n:
            raise ValueError(
                f"Detections fields disagree: {self.boxes.shape} boxes, {len(self.scores)} scores, "
                f"{len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def concat(cls, parts: list[Detections]) -> Detections:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls()
        tid = None
        if any(p.track_ids is not None for p in parts):
            tid = np.concatenate(
                [p.track_ids if p.track_ids is not None else np.full(len(p), -1) for p in parts]
            )
        coasted = None
        if any(p.coasted is not None for p in parts):
            coasted = np.concatenate(
                [p.coasted if p.coasted is not None else np.zeros(len(p), bool) for p in parts]
            )
        return cls(
            boxes=np.concatenate([p.boxes for p in parts]).astype(np.float32),
            scores=np.concatenate([p.scores for p in parts]).astype(np.float32),
            labels=tuple(lbl for p in parts for lbl in p.labels),
            track_ids=tid,
            coasted=coasted,
        )

    def select(self, mask: np.ndarray) -> Detections:
        idx = np.flatnonzero(mask)
        return Detections(
            boxes=self.boxes[idx],
            scores=self.scores[idx],
            labels=tuple(self.labels[i] for i in idx),
            track_ids=None if self.track_ids is None else self.track_ids[idx],
            coasted=None if self.coasted is None else self.coasted[idx],
        )

    def with_label(self, label: str) -> Detections:
        return self.select(np.array([lbl == label for lbl in self.labels], dtype=bool))


class FrameRef(NamedTuple):
    """Where a frame comes from: its stream and its number there, dropped frames counted.

    Per-model cadences go by it: a model that runs every n-th frame runs on a stream once n source
    frames have passed since it last ran there, however many of them were dropped on the way."""

    stream: str
    seq: int


Detect = Callable[[list[np.ndarray], Sequence[FrameRef] | None], list[Detections]]
"""A detector as the live batcher and the file redactor call it: BGR images and where each comes from
in, one :class:`Detections` per image out. ``None`` instead of the references runs every model on
every image."""
