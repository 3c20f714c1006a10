"""Record a redacted stream to a local file; one size for the whole file (later sizes are scaled)."""

from __future__ import annotations

import logging

import av
import av.error

from stream.config import FileOutputConfig
from stream.core.metrics import Metrics
from stream.core.yuv import Picture
from stream.live.publish.encoder import EncoderOutput

log = logging.getLogger(__name__)


class FileOutput(EncoderOutput):
    kind = "file"
    keep_size = True

    def __init__(self, stream_id: str, label: str, config: FileOutputConfig, metrics: Metrics,
                 fps: float = 25.0) -> None:
        super().__init__(stream_id, label, metrics, fps=fps, bitrate_kbps=config.bitrate_kbps,
                         gop_s=config.gop_s, queue_size=8)
        self.config = config
        self._broken = False

    def open_container(self) -> av.container.OutputContainer:
        return av.open(str(self.config.path), mode="w")

    def handle(self, image: Picture, captured_at: float) -> None:
        if self._broken:
            return
        try:
            self.write(image, captured_at)
        except (av.error.FFmpegError, OSError) as e:
            log.error("stream %s: recording to %s failed (%s); recording stopped, the stream goes on",
                      self.stream_id, self.config.path, e)
            self._broken = True
