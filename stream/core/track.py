"""Temporal persistence: keep every face and plate masked through missed detections.

A detector that finds a face in frame 10 and misses it in frame 11 must not expose it in frame
11. Each track remembers its last box and velocity; when a detection is missed the track
*coasts*: its box is predicted forward and grown a little each frame (motion is uncertain) for up
to ``max_coast`` frames. New tracks mask from their first detection (no confirmation delay: a
false positive costs a blurred patch, a missed face costs someone's privacy).

The tracker owns track life: every update also says which tracks started, went on and ended
(:class:`TrackChanges`), each with its best detection, so events need no tracking of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stream.core.cuts import THRESHOLD
from stream.core.detections import Detections
from stream.core.frames import Frame
from stream.core.nms import iou_matrix, scale_boxes
from stream.core.vehicle_plates import LABEL as VEHICLE_PLATE
from stream.core.vehicle_plates import PLATE_FRESH_FRAMES, STAND_IN_COAST, TEXT_COAST, TEXT_LABEL, covered


def predict(box: np.ndarray, velocity: np.ndarray, frames: int) -> np.ndarray:
    """``box`` moved ``frames`` on: its centre at the tracked velocity, its size only ever growing.

    Detected boxes of one object vary in size from frame to frame by several pixels, and more
    when it is partly occluded for a moment. Extrapolated, that noise reads as shrinking and,
    over the frames a box coasts, pulls its edges inside the object or turns the box inside out.
    An object that really moves away gets a slightly larger mask than needed, never a smaller one.
    """
    v = velocity
    centre = (box[:2] + box[2:]) / 2 + (v[:2] + v[2:]) / 2 * frames
    half = (box[2:] - box[:2]) / 2 + np.maximum(v[2:] - v[:2], 0) / 2 * frames
    return np.concatenate([centre - half, centre + half]).astype(np.float32)


BACKTRACK_LABELS = frozenset({"plate", TEXT_LABEL})
"""labels whose coasting mask reaches back to where the object was last detected, not only to where
its velocity predicts it: a plate is painted as a rectangle, so the box spanning both places covers
everything between them. The prediction bets that the object kept its velocity; a car that braked
or turned, or a plate at a frame's edge on the load harness, is behind it. There the plate model
missed a large plate on 7 runs in a row (a third of a second at its cadence) while it bounced off
the frame's corner, and the predicted box moved on without it (benchmarks/README.md,
``tracker_replay.py``; docs/redaction-quality.md, "Coasting plates").
Faces are painted as ellipses, which a long box would not fill at its ends; and the face model runs
on every frame, so a face coasts only a frame or two."""


@dataclass(frozen=True)
class Seen:
    """The frame an update was for, without its pixels: tracks outlive many frames, and holding
    their images would hold that memory."""

    seq: int
    wall_time: float
    pts: float | None
    size: tuple[int, int]
    """width, height"""

    @classmethod
    def of(cls, frame: Frame) -> Seen:
        return cls(frame.seq, frame.wall_time, frame.pts, frame.size)


@dataclass(frozen=True)
class TrackInfo:
    """One track as an update left it (a copy: later updates do not change it)."""

    track_id: int
    label: str
    box: np.ndarray
    """the last detected box"""
    score: float
    """the last detection's score"""
    shown: np.ndarray
    """the box masked in this update: as detected, or grown while coasting"""
    coasted: bool
    """not detected in this update"""
    best_box: np.ndarray
    best_score: float
    hits: int
    """updates it was detected in"""
    first_seen: Seen | None
    last_seen: Seen | None
    """of the last detection"""
    best_seen: Seen | None


@dataclass(frozen=True)
class TrackChanges:
    """What one update did to the tracks: in the order they are masked, plus those it let go."""

    started: tuple[TrackInfo, ...] = ()
    updated: tuple[TrackInfo, ...] = ()
    """tracks that go on, detected again or coasting"""
    ended: tuple[TrackInfo, ...] = ()


@dataclass
class TrackerConfig:
    max_coast: int = 12
    """frames a box stays masked after its last detection"""
    iou_match: float = 0.2
    """minimum IoU to continue a track; small boxes also match by centre distance"""
    centre_match: float = 1.0
    """max centre distance, in box diagonals, for a match when IoU is too small"""
    coast_growth: float = 0.06
    """relative growth of a coasting box per frame, to cover unpredicted motion"""
    velocity_smoothing: float = 0.5
    cut_threshold: float = THRESHOLD
    """consecutive frames correlating below this (and with differing histograms) are a shot cut,
    which ends every track (:mod:`stream.core.cuts`; read by the masking stage); 0: never"""


@dataclass
class Track:
    track_id: int
    label: str
    box: np.ndarray
    score: float
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4, np.float32))
    last_detected: np.ndarray | None = None
    missed: int = 0
    since: int = 0
    """updates since the last detection"""
    coast_frames: int = 0
    """source frames since the last detection (more than ``since`` when frames were dropped)"""
    hits: int = 1
    frames: int = 1
    best_score: float = 0.0
    best_box: np.ndarray | None = None
    first_seen: Seen | None = None
    last_seen: Seen | None = None
    best_seen: Seen | None = None

    def shown(self, growth: float, max_frames: int = 48) -> np.ndarray:
        """The box to mask: as detected, or grown about its centre while coasting.

        Growth follows the source frames that passed (capped), not the updates: under overload an
        update can come a second after the previous one, and the object has moved that far.
        """
        if not self.since or self.label == VEHICLE_PLATE:  # a stand-in does not grow (STAND_IN_COAST)
            return self.box
        k = 1 + growth * min(self.coast_frames, max_frames)
        ahead, behind = scale_boxes(np.stack([self.box, self.box if self.last_detected is None
                                              else self.last_detected]), k)
        if self.label not in BACKTRACK_LABELS:
            return ahead
        # a plate that stopped, turned or bounced back is between its predicted box and its last
        # sighting: mask the whole stretch (see BACKTRACK_LABELS)
        return np.concatenate([np.minimum(ahead[:2], behind[:2]), np.maximum(ahead[2:], behind[2:])])

    def info(self, growth: float) -> TrackInfo:
        """This track as it stands (its arrays are replaced on update, never written in place)."""
        box = self.last_detected if self.last_detected is not None else self.box
        return TrackInfo(self.track_id, self.label, box, self.score, self.shown(growth), self.since > 0,
                         self.best_box if self.best_box is not None else box, self.best_score, self.hits,
                         self.first_seen, self.last_seen, self.best_seen)


class Tracker:
    """Greedy IoU/centre-distance tracker with coasting, one instance per stream."""

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self.tracks: list[Track] = []
        self.changes = TrackChanges()
        """what the last update started, went on with and ended"""
        self._next_id = 1

    def update(self, dets: Detections, elapsed: int = 1, seen: Seen | None = None, *,
               cut: bool = False) -> Detections:
        """Match ``dets`` to the live tracks; return detected plus coasted boxes for this frame.

        ``elapsed`` is the number of source frames since the previous update (more than 1 when
        frames were dropped): tracks are predicted, and coasting boxes grown, that many frames on.
        ``seen`` names the frame, kept as a track's first, last and best sighting. ``cut``: the
        frame starts a new shot, so every track of the old one ends here and ``dets`` start new
        ones. What changed is left in :attr:`changes`.
        """
        cfg = self.config
        elapsed = max(1, int(elapsed))
        cut_off = self.tracks if cut else []
        if cut:
            self.tracks = []
        for t in self.tracks:  # predict every track to this frame
            t.box = predict(t.box, t.velocity, elapsed)
            t.frames += elapsed
            t.coast_frames += elapsed
        matched_t: set[int] = set()
        matched_d: set[int] = set()
        for label in sorted(set(dets.labels)):
            ti_all = [i for i, t in enumerate(self.tracks) if t.label == label]
            di_all = [i for i, lbl in enumerate(dets.labels) if lbl == label]
            if not ti_all:
                continue
            pred = np.stack([self.tracks[i].box for i in ti_all])
            boxes = dets.boxes[di_all]
            iou = iou_matrix(pred, boxes)
            pc = (pred[:, None, :2] + pred[:, None, 2:]) / 2
            dc = (boxes[None, :, :2] + boxes[None, :, 2:]) / 2
            diag = np.linalg.norm(pred[:, 2:] - pred[:, :2], axis=1)[:, None] + 1e-6
            dist = np.linalg.norm(pc - dc, axis=2) / diag
            score = np.where(iou >= cfg.iou_match, 1 + iou, np.where(dist <= cfg.centre_match, 1 - dist, 0))
            for flat in np.argsort(-score, axis=None):
                a, b = np.unravel_index(flat, score.shape)
                if score[a, b] <= 0:
                    break
                ti, di = ti_all[a], di_all[b]
                if ti in matched_t or di in matched_d:
                    continue
                matched_t.add(ti)
                matched_d.add(di)
                self._refresh(self.tracks[ti], dets.boxes[di], float(dets.scores[di]), seen)
        alive: list[Track] = []
        ended: list[Track] = list(cut_off)
        for i, t in enumerate(self.tracks):
            if i not in matched_t:
                t.since += 1
                if dets.observed is None or t.label in dets.observed:
                    t.missed += 1  # looked for and not found; unobserved frames do not count
            coast = (min(cfg.max_coast, STAND_IN_COAST) if t.label == VEHICLE_PLATE
                     else min(cfg.max_coast, TEXT_COAST) if t.label == TEXT_LABEL else cfg.max_coast)
            expired = t.missed > coast or t.since > 4 * coast
            (ended if expired else alive).append(t)
        going_on = len(alive)
        for i, label in enumerate(dets.labels):
            if i not in matched_d:
                box = dets.boxes[i].astype(np.float32)
                s = float(dets.scores[i])
                alive.append(Track(self._next_id, label, box, s, last_detected=box, best_score=s,
                                   best_box=box, first_seen=seen, last_seen=seen, best_seen=seen))
                self._next_id += 1
        # a vehicle's middle mask stands in for a plate not found on it: when a plate was detected
        # on that vehicle in the last PLATE_FRESH_FRAMES source frames, the stand-in ends (it would
        # otherwise coast and grow beside the real plate, hiding street). A plate track coasting
        # longer does not end it: a coasting box drifts off a plate on moving footage, and the
        # stand-in is its backup (docs/redaction-quality.md, "Stand-ins")
        plates = [t.box for t in alive if t.label == "plate" and t.coast_frames <= PLATE_FRESH_FRAMES]
        stand_ins = [i for i, t in enumerate(alive) if t.label == VEHICLE_PLATE]
        if plates and stand_ins:
            done = covered(np.stack([alive[i].box for i in stand_ins]), np.stack(plates))
            gone = {stand_ins[k] for k in np.flatnonzero(done)}
            ended += [t for i, t in enumerate(alive[:going_on]) if i in gone]
            kept = [t for i, t in enumerate(alive[:going_on]) if i not in gone]
            alive = kept + [t for i, t in enumerate(alive) if i >= going_on and i not in gone]
            going_on = len(kept)
        self.tracks = alive
        g = cfg.coast_growth
        self.changes = TrackChanges(started=tuple(t.info(g) for t in alive[going_on:]),
                                    updated=tuple(t.info(g) for t in alive[:going_on]),
                                    ended=tuple(t.info(g) for t in ended))
        return self.current()

    def _refresh(self, t: Track, box: np.ndarray, score: float, seen: Seen | None) -> None:
        a = self.config.velocity_smoothing
        if t.last_detected is not None:
            step = (box - t.last_detected) / max(1, t.coast_frames)  # per source frame
            # the first step is the only estimate there is; smoothing it with zero would halve it
            t.velocity = (step if t.hits == 1 else a * step + (1 - a) * t.velocity).astype(np.float32)
        t.box = t.last_detected = box.astype(np.float32)
        t.score = score
        t.last_seen = seen
        if score > t.best_score or t.best_score != t.best_score:  # a NaN best (broken detector) is no best
            t.best_score, t.best_box, t.best_seen = score, t.box, seen
        t.missed = 0
        t.since = 0
        t.coast_frames = 0
        t.hits += 1

    def current(self) -> Detections:
        """Boxes to mask in the frame just updated: fresh ones as detected, coasting ones grown."""
        g = self.config.coast_growth
        return Detections(
            boxes=np.stack([t.shown(g) for t in self.tracks]).astype(np.float32)
            if self.tracks else np.zeros((0, 4), np.float32),
            scores=np.array([t.score for t in self.tracks], np.float32),
            labels=tuple(t.label for t in self.tracks),
            track_ids=np.array([t.track_id for t in self.tracks], np.int64),
            coasted=np.array([t.since > 0 for t in self.tracks], bool),
        )
