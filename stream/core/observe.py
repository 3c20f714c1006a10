"""What the pipeline tells the rest of the system (events, viewers): a small observer interface.

Observers are called on a stream's redaction thread, in frame order, after the frame went to
the outputs. They must be quick and must not block; an observer that raises is logged and
skipped, never allowed to stop a stream.
"""

from __future__ import annotations

from typing import Any

from stream.core.detections import Detections
from stream.core.frames import Failure, Frame
from stream.core.track import TrackChanges


class Observer:
    """No-op base: override what you need."""

    def frame(self, frame: Frame, detections: Detections, failure: Failure | None,
              tracks: TrackChanges | None = None) -> None:
        """Every frame that left detection: ``detections`` are the tracked boxes that were masked
        (with track ids), or empty with ``failure`` set when the frame was blanked or withheld.
        ``tracks`` is what the frame did to the stream's tracks (started, went on, ended; tracks
        coasting through a failed frame can end too)."""

    def state(self, stream_id: str, state: str, error: str | None) -> None:
        """A stream went ``up``, ``down`` (``error`` says why, credentials masked), ``ended`` or
        ``stopped``."""

    def stream_moved(self, stream_id: str, from_worker: str, to_worker: str, gap_s: float | None,
                     partition: int) -> None:
        """Cluster mode: this worker (``to_worker``) started a stream that ``from_worker`` ran before,
        ``gap_s`` seconds after it was last known to run there (None: unknown); called once per move,
        so that consumers see where a stream went and how long it was dark."""

    def recording(self, stream_id: str, action: str, fields: dict[str, Any]) -> None:
        """A ``record`` output finished (``audit.recording.segment``) or deleted
        (``audit.recording.deleted``) a segment; called on that output's thread."""

    def speech(self, stream_id: str, started: float, ended: float, probability: float, policy: str) -> None:
        """A stretch of speech (Unix seconds) was muted or disguised in the stream's audio."""

    def audio_muted(self, stream_id: str, reason: str, seconds: float) -> None:
        """Audio was published silent because its redactor failed (``fault``) or fell behind (``late``)."""

    def incident(self, stream_id: str, reason: Failure, frames: int, ended: bool, action: str) -> None:
        """Fail-closed incident: called when frames start being blanked/withheld (``ended`` False,
        ``frames`` 1) and when detection is back or the stream stops (``ended`` True, total)."""
