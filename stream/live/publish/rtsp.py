"""Push a redacted stream to a media server (RTSP ANNOUNCE/RECORD), reconnecting when it goes away.

While the server is unreachable, frames are dropped (counted as ``output_down``) rather than
queued: a live viewer wants now, not a backlog. Each reconnect starts a new RTSP session whose
timestamps continue where the last one stopped.
"""

from __future__ import annotations

import logging
import time

import av
import av.error

from stream.config import RtspOutputConfig
from stream.core.backoff import Backoff
from stream.core.frames import Drop
from stream.core.metrics import Metrics
from stream.core.urls import mask_text, mask_url
from stream.core.yuv import Picture
from stream.live.publish.encoder import EncoderOutput

log = logging.getLogger(__name__)


class RtspOutput(EncoderOutput):
    kind = "rtsp"

    def __init__(self, stream_id: str, label: str, config: RtspOutputConfig, metrics: Metrics,
                 fps: float = 25.0) -> None:
        super().__init__(stream_id, label, metrics, fps=fps, bitrate_kbps=config.bitrate_kbps,
                         gop_s=config.gop_s)
        self.config = config
        self.backoff = Backoff.following(config.reconnect)
        self._retry_at = 0.0
        self._failing = False

    def open_container(self) -> av.container.OutputContainer:
        return av.open(self.config.url, mode="w", format="rtsp",
                       options={"rtsp_transport": self.config.transport}, timeout=(5.0, 5.0))

    def handle(self, image: Picture, captured_at: float) -> None:
        if time.monotonic() < self._retry_at:
            self.metrics.frames_dropped.labels(self.stream_id, Drop.OUTPUT_DOWN.value).inc()
            return
        try:
            self.write(image, captured_at)
        except (av.error.FFmpegError, OSError) as e:
            self._close(flush=False)
            self.metrics.frames_dropped.labels(self.stream_id, Drop.OUTPUT_DOWN.value).inc()
            delay = self.backoff.next_delay()
            self._retry_at = time.monotonic() + delay
            self.metrics.reconnects.labels(self.stream_id, "output").inc()
            if not self._failing:
                log.error("stream %s: cannot publish to %s (%s); retrying with backoff", self.stream_id,
                          mask_url(self.config.url), mask_text(str(e), self.config.url))
                self._failing = True
            return
        if self._failing:
            log.warning("stream %s: publishing to %s again", self.stream_id, mask_url(self.config.url))
            self._failing = False
        self.backoff.reset()
