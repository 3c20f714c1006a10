"""Event completeness: do the pipeline's track events account for every ground-truth object?

Why: triage dashboards are fed by track events; a face that was masked but never reported is a
gap for the operator even though nothing leaked. Each synthetic object is on screen for the whole
run, so it is one ground-truth track. A track event (started, updated or ended, from the JSON
Lines sink) is matched to an object when its box centre lies inside that object's ground-truth
box (same stream, same class) at the frame the event names; the frame is found from the event's
capture time and the cameras' send times.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from stream.loadtest.scene import Scene

TRACK_TYPES = ("track.started", "track.updated", "track.ended")


def _unix_ms(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000


def event_files(path: Path) -> list[Path]:
    """The JSON Lines files a pipeline configured with ``path`` writes: ``path`` itself, and with
    ``run --workers N`` one per worker beside it (``<stem>.worker-<i><suffix>``: two processes
    never append to one file)."""
    workers = sorted(path.parent.glob(f"{path.stem}.worker-*{path.suffix}"))
    return [f for f in (path, *workers) if f.is_file()]


def read_track_events(path: Path) -> list[dict[str, Any]]:
    """Track events of a JSON Lines file and of its workers' files (CloudEvents envelopes);
    no file: none."""
    out = []
    for f in event_files(path):
        for line in f.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and any(str(ev.get("type", "")).endswith(t) for t in TRACK_TYPES):
                out.append(ev)
    return out


@dataclass
class Completeness:
    """Ground-truth tracks found in events, and event tracks that match no object."""

    gt_tracks: int
    found: int
    event_tracks: int
    unmatched_event_tracks: int
    tracks_per_object: float

    def as_dict(self) -> dict[str, Any]:
        return {"gt_tracks": self.gt_tracks, "found": self.found,
                "completeness": round(self.found / self.gt_tracks, 4) if self.gt_tracks else None,
                "event_tracks": self.event_tracks, "unmatched_event_tracks": self.unmatched_event_tracks,
                "tracks_per_object": round(self.tracks_per_object, 2)}


def completeness(events: list[dict[str, Any]], scenes: dict[str, Scene], sent_ms: dict[str, dict[int, int]],
                 labels: set[str]) -> Completeness:
    """Match track events to the objects of `scenes` (by stream id) whose class is in `labels` (what
    the pipeline was asked to find); `sent_ms`: seq -> send time per stream."""
    gt = sum(1 for s in scenes.values() for lab in s.labels if lab in labels)
    index = {sid: sorted((ms, seq) for seq, ms in sent.items()) for sid, sent in sent_ms.items()}
    uids: set[str] = set()
    matched_uids: set[str] = set()
    per_object: dict[tuple[str, int], set[str]] = {}
    for ev in events:
        d = ev.get("data") or {}
        sid, uid = d.get("stream_id"), d.get("track_uid")
        if sid not in scenes or not uid or d.get("class") not in labels:
            continue
        uids.add(uid)
        try:
            t = _unix_ms(d["frame"]["captured_at"])
            x1, y1, x2, y2 = d["box"]["pixel"]
        except (KeyError, TypeError, ValueError):
            continue
        times = index.get(sid) or []
        i = bisect.bisect_right(times, (t, 1 << 62)) - 1
        if i < 0:
            continue
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        for seq in range(max(0, times[i][1] - 3), times[i][1] + 1):  # capture is a little after send
            hit = next((b for b in scenes[sid].truth(seq)
                        if b.label == d.get("class") and b.x1 <= cx < b.x2 and b.y1 <= cy < b.y2), None)
            if hit is not None:
                matched_uids.add(uid)
                per_object.setdefault((sid, hit.obj), set()).add(uid)
                break
    found = len(per_object)
    return Completeness(gt, found, len(uids), len(uids - matched_uids),
                        sum(len(v) for v in per_object.values()) / found if found else 0.0)
