"""A video file played as a live camera: paced at its own frame rate, optionally looping.

Used by the demo, tests and load tests; the rest of the pipeline cannot tell it from a camera.
"""

from __future__ import annotations

import logging
import time

import av
import av.error

from stream.config import FileSourceConfig
from stream.core.yuv import decoded_picture
from stream.live.sources.base import Source, SourceHandler
from stream.live.sources.decode import open_video

log = logging.getLogger(__name__)


class FileSource(Source):
    def __init__(self, stream_id: str, config: FileSourceConfig, handler: SourceHandler) -> None:
        super().__init__(stream_id, handler)
        self.config = config

    def run(self) -> None:
        start = time.monotonic()
        offset = 0.0  # where this pass of the file starts on the stream's clock
        while not self.stopping:
            try:
                played = self._play(start, offset)
            except (av.error.FFmpegError, OSError) as e:
                log.error("stream %s: cannot play %s: %s", self.stream_id, self.config.path, e)
                self.handler.on_down("corrupt", f"{self.config.path}: {e}; give a readable video file")
                return
            if not self.config.loop or played <= 0:
                break
            offset += played
        if not self.stopping:
            self.handler.on_end()

    def _play(self, start: float, offset: float) -> float:
        """Play the file once; return its duration in seconds (0 if it had no frames)."""
        container, self.decoder = open_video(str(self.config.path), self.config.decode, self.stream_id)
        with container:
            if not container.streams.video:
                raise av.error.InvalidDataError(0, "no video track")
            vs = container.streams.video[0]
            vs.thread_type = "AUTO"
            audio = container.streams.audio[0] if container.streams.audio and self.handler.wants_audio \
                else None
            if audio is not None:
                self.handler.on_audio_track(audio.codec_context.layout.nb_channels)
            rate = float(vs.average_rate or 25)
            first: float | None = None
            last = 0.0
            n = 0
            for packet in container.demux(vs, *([audio] if audio is not None else [])):
                if self.stopping:
                    break
                if packet.stream is audio:
                    if first is not None and self._audio(packet, start, offset - first):
                        break
                    continue
                for frame in packet.decode():
                    t = frame.time if frame.time is not None else n / rate
                    first = t if first is None else first
                    last = t - first
                    if n == 0 and offset == 0:
                        self.handler.on_up(frame.width, frame.height, vs.codec_context.name)
                    if self.config.realtime:
                        wait = start + offset + last - time.monotonic()
                        if wait > 0 and self._stop.wait(wait):
                            return last + 1 / rate
                    self.handler.on_frame(decoded_picture(frame), offset + last)
                    n += 1
            return last + 1 / rate if n else 0.0

    def _audio(self, packet: av.Packet, start: float, shift: float) -> bool:
        """Decode an audio packet and hand its frames over when their time comes; ``shift`` puts the
        file's time on the video's ``pts`` timeline (this pass's offset, from the first picture).
        True when stopped meanwhile."""
        try:
            frames = packet.decode()
        except av.error.FFmpegError:
            return False
        for frame in frames:
            media = shift + float(frame.time) if frame.time is not None else None
            if self.config.realtime and media is not None:
                wait = start + media - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return True
            self.handler.on_audio(frame, None, media)
        return False
