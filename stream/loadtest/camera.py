"""Synthetic live cameras: compose, stamp with the real send time, encode (libx264) and push over RTSP.

Why live and not a pre-encoded loop: glass-to-glass latency needs the time a frame left the
camera, so the stamp is drawn with the clock just before the frame is encoded and sent. The
cameras publish (RTSP ANNOUNCE/RECORD) to a relay from which the pipeline pulls, as it would
pull a real camera through a media server. Each camera is one thread; composing is cheap (see
scene.py), so a camera's cost is mostly libx264 at `preset=ultrafast, tune=zerolatency`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction

import av
import av.error

from stream.loadtest import stamp
from stream.loadtest.scene import Scene

log = logging.getLogger(__name__)


@dataclass
class CameraStats:
    """What a camera sent: every frame's send time (ms since the epoch) by sequence number."""

    sent_ms: dict[int, int] = field(default_factory=dict)
    late: int = 0  # frames composed more than one frame interval after their slot
    reconnects: int = 0
    error: str | None = None


class SyntheticCamera:
    """One synthetic camera publishing `scene` to `url` at the scene's frame rate until stopped."""

    def __init__(self, scene: Scene, url: str, bitrate_kbps: int = 1500, gop_s: float = 1.0) -> None:
        self.scene = scene
        self.url = url
        self.bitrate_kbps = bitrate_kbps
        self.gop = max(1, round(gop_s * scene.fps))
        self.stats = CameraStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"camera-{scene.stream}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # never started: nothing to wait for
            self._thread.join(timeout)

    def _open(self) -> tuple[av.container.OutputContainer, av.VideoStream]:
        out = av.open(self.url, "w", format="rtsp", options={"rtsp_transport": "tcp"}, timeout=(5, 5))
        s = out.add_stream("libx264", rate=round(self.scene.fps), options={
            "preset": "ultrafast", "tune": "zerolatency",
            "x264-params": f"keyint={self.gop}:min-keyint={self.gop}:scenecut=0:bframes=0",
        })
        s.width, s.height, s.pix_fmt = self.scene.width, self.scene.height, "yuv420p"
        s.bit_rate = self.bitrate_kbps * 1000
        s.codec_context.time_base = Fraction(1, round(self.scene.fps))
        s.codec_context.thread_count = 1  # one core per camera at most; the pipeline needs the rest
        return out, s

    def _run(self) -> None:
        period = 1.0 / self.scene.fps
        seq = 0
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                out, vs = self._open()
            except (av.error.FFmpegError, OSError) as e:
                self.stats.error = f"cannot publish to the relay: {e}"
                self.stats.reconnects += 1
                if self._stop.wait(0.5):
                    return
                continue
            self.stats.error = None
            try:
                while not self._stop.is_set():
                    slot = t0 + seq * period
                    now = time.monotonic()
                    if slot > now:
                        if self._stop.wait(slot - now):
                            break
                    elif now - slot > period:
                        self.stats.late += 1
                    img = self.scene.render(seq)
                    sent = int(time.time() * 1000)
                    stamp.draw(img, stamp.Stamp(self.scene.stream, seq, sent))
                    frame = av.VideoFrame.from_ndarray(img, format="bgr24").reformat(format="yuv420p")
                    frame.pts, frame.time_base = seq, Fraction(1, round(self.scene.fps))
                    self.stats.sent_ms[seq] = sent
                    out.mux(vs.encode(frame))
                    seq += 1
            except (av.error.FFmpegError, OSError) as e:
                self.stats.error = f"relay connection lost: {e}"
                self.stats.reconnects += 1
            finally:
                with contextlib.suppress(av.error.FFmpegError, OSError, ValueError):
                    out.close()

