"""Real aiortc peers for the WebRTC tests and benchmark: a paced clip publisher, a WHEP viewer, a handler
that records what a source reports, and leak checks for tasks and threads."""

from __future__ import annotations

import asyncio
import fractions
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from stream.core.yuv import Picture, as_bgr
from stream.live.webrtc.ice import LOOPBACK, rtc_configuration
from stream.live.webrtc.whep import FrameFeed, WhepPlayback
from stream.live.webrtc.whip import WhipIngest

EXECUTOR_PREFIX = "asyncio_"
"""the event loop's default executor: a pool shared by aiortc's encoders and frame conversion"""


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` on the event loop until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


def client_pc() -> RTCPeerConnection:
    """A peer on loopback with no STUN server, like the servers under test."""
    return RTCPeerConnection(rtc_configuration(LOOPBACK))


def prefer(pc: RTCPeerConnection, transceiver_kind: str, codec: str | None) -> None:
    """Offer only ``codec`` (VP8 / H264) on the pc's transceiver of that kind (None: aiortc's default)."""
    if codec is None:
        return
    caps = RTCRtpSender.getCapabilities(transceiver_kind).codecs
    t = next(t for t in pc.getTransceivers() if t.kind == transceiver_kind)
    t.setCodecPreferences([c for c in caps if c.mimeType.upper() in (f"VIDEO/{codec}", "VIDEO/RTX")])


# -- what a publisher sends ----------------------------------------------------------------------
@dataclass
class Clip:
    images: list[np.ndarray]
    boxes: list[tuple[int, int, int, int]]
    """per image: where the moving patch is (x1, y1, x2, y2)"""
    patch: np.ndarray


def sprite_clip(sprite: np.ndarray, background: np.ndarray, frames: int, step: int = 6,
                y: int = 60) -> Clip:
    """``sprite`` pasted on ``background``, moving right by ``step`` px a frame."""
    h, w = sprite.shape[:2]
    images, boxes = [], []
    for i in range(frames):
        x = 10 + i * step
        img = background.copy()
        img[y:y + h, x:x + w] = sprite
        images.append(img)
        boxes.append((x, y, x + w, y + h))
    return Clip(images, boxes, sprite)


def square_frame(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Mid-gray with a black square: trivially located after lossy coding."""
    img = np.full((height, width, 3), 128, np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 0
    return img


def find_patch(image: np.ndarray, patch: np.ndarray) -> tuple[int, int, float]:
    """Where ``patch`` best matches in ``image``: (x, y, normalised score, 1 = identical)."""
    res = cv2.matchTemplate(image, patch, cv2.TM_CCOEFF_NORMED)
    _, score, _, (x, y) = cv2.minMaxLoc(res)
    return x, y, score


def find_black_box(image: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(image.max(axis=2) < 50)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


class ClipTrack(MediaStreamTrack):
    """Plays ``images`` in a loop at ``fps`` on a media clock (pts = index / fps), like a camera."""

    kind = "video"

    def __init__(self, images: Sequence[np.ndarray], fps: float = 15.0) -> None:
        super().__init__()
        self.images = images
        self.fps = fps
        self.sent = 0
        self._start: float | None = None

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self.sent / self.fps
        await asyncio.sleep(max(0.0, due - time.monotonic()))  # the clip's own frame clock
        i = self.sent
        self.sent += 1
        frame = VideoFrame.from_ndarray(self.images[i % len(self.images)], format="bgr24")
        frame.pts = round(i * 90_000 / self.fps)
        frame.time_base = fractions.Fraction(1, 90_000)
        return frame


# -- what a source handler is told ---------------------------------------------------------------
@dataclass
class RecordingHandler:
    """A SourceHandler that keeps what it is told (the pipeline's StreamRunner in miniature); frames
    are kept in BGR (an I420 picture is converted) and the kind each came as in ``kinds``."""

    frames: list[tuple[np.ndarray, float | None]] = field(default_factory=list)
    kinds: list[type] = field(default_factory=list)
    ups: list[tuple[int, int, str]] = field(default_factory=list)
    downs: list[tuple[str, str]] = field(default_factory=list)
    reconnects: int = 0
    ends: int = 0
    threads: set[str] = field(default_factory=set)

    def on_frame(self, image: Picture, pts: float | None) -> None:
        self.threads.add(threading.current_thread().name)
        self.kinds.append(type(image))
        self.frames.append((as_bgr(image), pts))

    def on_up(self, width: int, height: int, codec: str) -> None:
        self.ups.append((width, height, codec))

    def on_down(self, kind: str, message: str) -> None:
        self.downs.append((kind, message))

    def on_reconnect(self) -> None:
        self.reconnects += 1

    def on_end(self) -> None:
        self.ends += 1


# -- peers ---------------------------------------------------------------------------------------
@dataclass
class Publisher:
    pc: RTCPeerConnection
    track: ClipTrack
    session_id: str
    answer: str


async def publish(ingest: WhipIngest, stream_id: str, handler: RecordingHandler, track: ClipTrack,
                  codec: str | None = None) -> Publisher:
    """A WHIP client: offer ``track``, hand the offer to ``ingest`` as the HTTP layer would, connect."""
    pc = client_pc()
    pc.addTransceiver(track, direction="sendonly")
    prefer(pc, "video", codec)
    await pc.setLocalDescription(await pc.createOffer())
    answer, session_id = await ingest.offer(stream_id, pc.localDescription.sdp, handler)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return Publisher(pc, track, session_id, answer)


@dataclass
class Viewer:
    """A WHEP client that decodes what it receives and keeps the last frames (and a count)."""

    pc: RTCPeerConnection
    session_id: str = ""
    answer: str = ""
    frames: list[tuple[np.ndarray, int]] = field(default_factory=list)
    received: int = 0
    first_frame_at: float | None = None
    keep: int = 30
    task: asyncio.Task[None] | None = None
    decode: bool = True

    async def consume(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                assert isinstance(frame, VideoFrame)
                self.received += 1
                if self.first_frame_at is None:
                    self.first_frame_at = time.monotonic()
                if self.decode:
                    self.frames.append((frame.to_ndarray(format="bgr24"), int(frame.pts or 0)))
                    del self.frames[:-self.keep]
        except MediaStreamError:
            pass

    async def close(self) -> None:
        await self.pc.close()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


async def watch(playback: WhepPlayback, stream_id: str, feed: FrameFeed, codec: str | None = None,
                decode: bool = True) -> Viewer:
    """A WHEP client: a recvonly video offer, answered by ``playback``."""
    pc = client_pc()
    viewer = Viewer(pc, decode=decode)
    pc.addTransceiver("video", direction="recvonly")
    prefer(pc, "video", codec)

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        viewer.task = asyncio.ensure_future(viewer.consume(track))

    await pc.setLocalDescription(await pc.createOffer())
    viewer.answer, viewer.session_id = await playback.offer(stream_id, pc.localDescription.sdp, feed)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=viewer.answer, type="answer"))
    return viewer


# -- leak checks ---------------------------------------------------------------------------------
@dataclass
class Snapshot:
    tasks: set[asyncio.Task[object]]
    threads: set[threading.Thread]


def snapshot() -> Snapshot:
    return Snapshot(set(asyncio.all_tasks()), set(threading.enumerate()))


def new_tasks(before: Snapshot) -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() - before.tasks if t is not asyncio.current_task() and not t.done()}


def new_threads(before: Snapshot) -> set[threading.Thread]:
    """Threads started since ``before``, except the loop's default-executor pool (bounded, reused)."""
    return {t for t in set(threading.enumerate()) - before.threads
            if t.is_alive() and not t.name.startswith(EXECUTOR_PREFIX)}


async def assert_released(before: Snapshot, timeout: float = 10.0) -> None:
    """Every task and thread started since ``before`` ends within ``timeout`` seconds."""
    try:
        await wait_until(lambda: not new_tasks(before) and not new_threads(before), timeout,
                         "WebRTC tasks and threads to end")
    except AssertionError:
        tasks = sorted(repr(t.get_coro()) for t in new_tasks(before))
        threads = sorted(t.name for t in new_threads(before))
        raise AssertionError(f"leaked after {timeout:g} s: tasks {tasks}, threads {threads}") from None
