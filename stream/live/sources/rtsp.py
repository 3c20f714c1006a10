"""Pull an RTSP camera with PyAV: TCP by default, timeouts on open and read, reconnect forever.

Failures are sorted into kinds a person can act on (unreachable, auth, not_video, timeout,
corrupt, ended) and reported once per incident with the URL's credentials masked; the stream
then waits (capped exponential backoff with jitter) and tries again, until stopped. A new
connection may bring a new resolution or codec: frames simply carry their own size.
"""

from __future__ import annotations

import logging
import time

import av
import av.error

from stream.config import RtspSourceConfig
from stream.core.backoff import Backoff
from stream.core.urls import mask_text, mask_url
from stream.core.yuv import decoded_picture
from stream.live.sources.base import Arrivals, Source, SourceHandler
from stream.live.sources.decode import open_video

log = logging.getLogger(__name__)

MAX_BAD_PACKETS = 50
"""undecodable packets in a row before the connection is treated as broken"""


class SourceError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def classify(e: BaseException, url: str) -> SourceError:
    """Turn an FFmpeg/OS error into a kind and a message that names the fix (no credentials)."""
    text = mask_text(getattr(e, "strerror", None) or str(e), url)  # strerror: without the URL again
    where = mask_url(url)
    if isinstance(e, av.error.HTTPUnauthorizedError | av.error.HTTPForbiddenError) or "401" in text \
            or "Unauthorized" in text:
        return SourceError("auth", f"{where}: the camera refused the credentials (401/403); check the user "
                                   "and password in the URL")
    if isinstance(e, ConnectionRefusedError) or "Connection refused" in text:
        return SourceError("unreachable", f"{where}: connection refused; is the camera/server running and "
                                          "the port right?")
    if isinstance(e, (av.error.ExitError, TimeoutError)) or "timed out" in text.lower():
        return SourceError("timeout", f"{where}: no answer in time; check the host, network and firewall")
    if isinstance(e, av.error.HTTPNotFoundError) or "404" in text or "Not Found" in text:
        return SourceError("not_found", f"{where}: no such stream on the server (404); check the path")
    if isinstance(e, av.error.InvalidDataError):
        return SourceError("corrupt", f"{where}: the answer is not a valid RTSP media stream ({text})")
    if isinstance(e, OSError):
        return SourceError("unreachable", f"{where}: {text}; check the host name and network")
    return SourceError("error", f"{where}: {type(e).__name__}: {text}")


class RtspSource(Source):
    def __init__(self, stream_id: str, config: RtspSourceConfig, handler: SourceHandler) -> None:
        super().__init__(stream_id, handler)
        self.config = config
        self.backoff = Backoff.following(config.reconnect)
        self._last_kind: str | None = None

    def run(self) -> None:
        first = True
        while not self.stopping:
            if not first:
                delay = self.backoff.next_delay()
                if self._stop.wait(delay):
                    break
                self.handler.on_reconnect()
            first = False
            try:
                self._session()
            except SourceError as e:
                self._report(e)
            except (av.error.FFmpegError, OSError) as e:
                self._report(classify(e, self.config.url))

    def _audio(self, packet: av.Packet, arrived: float) -> None:
        """Decode one audio packet; a bad one is skipped (the redactor covers the gap), never fatal."""
        try:
            frames = packet.decode()
        except av.error.FFmpegError:
            return
        for frame in frames:  # one session: audio and video timestamps share the demuxer's timeline
            self.handler.on_audio(frame, arrived, float(frame.time) if frame.time is not None else None)

    def _report(self, e: SourceError) -> None:
        if self.stopping:
            return
        if e.kind != self._last_kind:  # once per incident, not once per retry
            log.error("stream %s: %s (retrying with backoff)", self.stream_id, e)
            self._last_kind = e.kind
        self.handler.on_down(e.kind, str(e))

    def _session(self) -> None:
        cfg = self.config
        options = {"rtsp_transport": cfg.transport, "timeout": str(int(cfg.read_timeout_s * 1e6))}
        t0 = time.monotonic()
        try:
            container, self.decoder = open_video(cfg.url, cfg.decode, self.stream_id, options=options,
                                                 timeout=(cfg.open_timeout_s, cfg.read_timeout_s))
        except (av.error.FFmpegError, OSError):
            if time.monotonic() - t0 >= 0.9 * cfg.open_timeout_s:
                # FFmpeg reports an interrupted open as bad data; what happened is silence
                raise SourceError("timeout", f"{mask_url(cfg.url)}: no answer within "
                                             f"{cfg.open_timeout_s:g} s; check the host, port, network "
                                             "and firewall") from None
            raise
        try:
            if not container.streams.video:
                raise SourceError("not_video", f"{mask_url(cfg.url)}: the stream has no video track; "
                                               "point the URL at a camera's video stream")
            vs = container.streams.video[0]
            audio = container.streams.audio[0] if container.streams.audio and self.handler.wants_audio \
                else None
            if audio is not None:
                self.handler.on_audio_track(audio.codec_context.layout.nb_channels)
            # frame threading holds frames back (a camera measured p50 195 ms with AUTO against 89 ms
            # with SLICE through the load test): a live source wants each frame as soon as it is whole
            vs.thread_type = "SLICE"
            announced = False
            bad = 0
            arrivals = Arrivals()
            for packet in container.demux(vs, *([audio] if audio is not None else [])):
                if self.stopping:
                    return
                if packet.stream is audio:
                    self._audio(packet, time.monotonic())
                    continue
                arrivals.packet(packet.pts, time.monotonic())
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    bad += 1
                    if bad > MAX_BAD_PACKETS:
                        raise SourceError("corrupt", f"{mask_url(cfg.url)}: {bad} undecodable packets in a "
                                                     "row; the stream is corrupt") from None
                    continue
                for frame in frames:
                    bad = 0
                    if not announced:
                        self.handler.on_up(frame.width, frame.height, vs.codec_context.name)
                        announced = True
                        self.backoff.reset()
                        if self._last_kind is not None:
                            log.warning("stream %s: source back", self.stream_id)
                            self._last_kind = None
                    self.handler.on_frame(decoded_picture(frame), frame.time,
                                          arrivals.frame(frame.pts))
            if not self.stopping:
                raise SourceError("ended", f"{mask_url(cfg.url)}: the server ended the stream")
        finally:
            container.close()
