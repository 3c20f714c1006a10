"""What every source shares: a thread that decodes frames and reports them, and how it fails.

A source knows nothing of queues, detectors or metrics. It calls its :class:`SourceHandler`
for each decoded picture and for each change of state; the pipeline decides the rest.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import av

from stream.core.yuv import Picture

log = logging.getLogger(__name__)


class SourceHandler(Protocol):
    def on_frame(self, image: Picture, pts: float | None, arrived: float | None = None) -> None:
        """A decoded picture (I420 where the decoder made 4:2:0, else BGR: see
        :func:`~stream.core.yuv.decoded_picture`); ``arrived`` (``time.monotonic()``) is when its data
        reached this process, where the source knows it: the frame's deadline counts from then."""

    def on_audio(self, frame: av.AudioFrame, arrived: float | None = None,
                 media: float | None = None) -> None:
        """A decoded audio frame (any codec, rate and layout), with when its data arrived and, where
        the source has one, its time on the same timeline as the ``pts`` of :meth:`on_frame`."""

    def on_audio_track(self, channels: int) -> None:
        """The source has an audio track of ``channels`` channels: outputs open with an audio track
        from the first frame instead of restarting when the first audio arrives."""

    @property
    def wants_audio(self) -> bool:
        """False: the stream publishes no audio, so sources need not demux or decode it."""
        ...

    def on_up(self, width: int, height: int, codec: str) -> None: ...

    def on_down(self, kind: str, message: str) -> None: ...

    def on_reconnect(self) -> None: ...

    def on_end(self) -> None: ...


class Arrivals:
    """When each packet was read, so a decoded frame's age counts from its data's arrival.

    Decoding takes time and a decoder may hold frames back (reordering), so the moment a frame
    comes out of the decoder is later than when the camera's data for it arrived. Packets are
    keyed by their presentation timestamp, which the decoded frame carries; a frame whose packet
    is unknown gets the newest packet's time. Arrival times handed out never go backwards (a
    reordered frame cannot leave before the frames shown before it).
    """

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._by_pts: dict[int, float] = {}
        self._newest: float | None = None
        self._last_out = float("-inf")

    def packet(self, pts: int | None, now: float) -> None:
        self._newest = now
        if pts is None:
            return
        self._by_pts[pts] = now
        if len(self._by_pts) > self.keep:  # a decoder never holds this many; stale keys go
            del self._by_pts[next(iter(self._by_pts))]

    def frame(self, pts: int | None) -> float | None:
        """When the data of the frame with ``pts`` arrived (None before any packet)."""
        at = self._by_pts.pop(pts, None) if pts is not None else None
        at = at if at is not None else self._newest
        if at is None:
            return None
        at = max(at, self._last_out)
        self._last_out = at
        return at


class Source:
    """Runs :meth:`run` on its own thread; :meth:`stop` asks it to finish."""

    def __init__(self, stream_id: str, handler: SourceHandler) -> None:
        self.stream_id = stream_id
        self.decoder = "cpu"  # or "nvdec" once a session opened with it
        self.handler = handler
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._guarded, name=f"source-{self.stream_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _guarded(self) -> None:
        try:
            self.run()
        except Exception as e:  # a bug in one source must not take the process down
            log.exception("stream %s: source stopped on an unexpected error", self.stream_id)
            self.handler.on_down("internal", f"source stopped: {type(e).__name__}")

    def run(self) -> None:
        raise NotImplementedError


class PushedSource(Source):
    """A source whose frames are pushed in from elsewhere (a WHIP session): no thread of its own.

    The WebRTC side calls the stream's handler directly; this object only gives the stream the
    same start/stop life as any other source.
    """

    def start(self) -> None:
        self.handler.on_down("waiting", "waiting for a publisher (WHIP POST to /whip/{id})".replace(
            "{id}", self.stream_id))

    def run(self) -> None:  # pragma: no cover - never started as a thread
        pass
