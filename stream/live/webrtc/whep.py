"""WHEP playback: browsers and players watch a stream's redacted frames over WebRTC.

The only input is a :class:`FrameFeed`, fed by the pipeline's ``on_redacted`` hook with painted
(or blanked) images: nothing here can reach an unredacted frame, so a viewer sees only what the
pipeline published.

Encode once, send to many. aiortc encodes per :class:`~aiortc.RTCRtpSender`, but a sender whose
track yields ``av.Packet`` instead of ``VideoFrame`` only packetizes it (``Encoder.pack``). So
with ``shared_encoding`` (the default) each stream has one :class:`SharedEncoder` per codec,
which encodes every new frame once and hands the same packets to every viewer's
:class:`EncodedTrack`. What that costs, by design:

- every viewer of a stream gets the same bitrate (``bitrate``): receiver estimates (REMB) are
  ignored, where aiortc would adapt each viewer's encoder;
- a keyframe asked for by one viewer (a new viewer, a picture-loss report) goes to all of them;
  requests are merged and rate-limited (``KEYFRAME_MIN_INTERVAL_S``);
- a viewer that falls behind skips to the next keyframe instead of getting a private one.

With ``shared_encoding=False`` each viewer has its own :class:`FeedTrack` of decoded frames and
aiortc encodes per viewer: adaptive, but CPU grows with every viewer. ``benchmarks/whep_viewers.py``
(2 cores, 640x360 at 25 fps, VP8) measured about 0.16 cores for the first viewer plus 0.007 per
further one when shared (16 viewers at 25 fps), against about 0.19 cores per viewer when not
(8 viewers already fell to 22 fps). Either way the decoded source is shared: one feed per stream.

Frames: the newest wins. A viewer (or the shared encoder) that is slower than the stream skips
frames; none queue up. When a stream stalls, the last frame is sent again every
``IDLE_REPEAT_S`` so that a viewer who joins then still gets a picture. Timestamps are 90 kHz
ticks derived from the frames' capture times (:class:`PtsClock`), strictly increasing.
Odd widths/heights lose their last column/row (4:2:0 encoders need even sizes).

Audio: a viewer whose offer receives audio (Opus) on its first audio m-line gets the stream's
*redacted* audio when the stream has some (``audio.policy`` other than ``drop``), from an
:class:`AudioFeed` fed by the audio lane's sinks. The feed cuts blocks into 20 ms stereo frames
whose timestamps (48 kHz) come from the blocks' stream-clock times, as video's come from capture
times: continuous while the audio is, with a gap where audio was lost. Until the stream has audio
a viewer's audio track sends nothing. Each viewer's Opus is encoded by aiortc for that viewer (about
0.2 ms a frame, under 1 % of a core per listener); a viewer that falls behind loses its oldest audio.

Lip sync: aiortc gives each sender a random RTP origin and stamps its RTCP sender reports with the
time a packet *left*, so a receiver lines audio up with video by when each was sent. The lane
releases a block no earlier than the video of its moment, but also no earlier than its speech
look-ahead (``audio.lookahead_ms``) allows, while the video waits for nothing: audio leaves about
the look-ahead minus the video's own pipeline delay after its picture, and that is how late a
WebRTC viewer hears it (``keep`` has no look-ahead and stays within a frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from aiortc import RTCRtpSender
from aiortc.codecs.vpx import number_of_threads
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription
from av import VideoFrame

from stream.core.h264 import H264Encoder, H264Settings, VideoEncoder, even_size, video_frame
from stream.core.yuv import Picture
from stream.live.webrtc.ice import IceConfig
from stream.live.webrtc.session import (
    CLOSE_TIMEOUT_S,
    MAX_SDP_BYTES,
    VIDEO_CODECS,
    OfferError,
    RtcSession,
    SessionHost,
    StreamGone,
    new_session_id,
    parse_offer,
    short,
)

log = logging.getLogger(__name__)

CLOCK_RATE = 90_000
TIME_BASE = fractions.Fraction(1, CLOCK_RATE)
IDLE_REPEAT_S = 1.0
"""a stalled stream's last frame is sent again this often (late joiners get a picture)"""
KEYFRAME_MIN_INTERVAL_S = 0.3
"""at most one *forced* keyframe per stream and codec this often, however many viewers ask
(periodic ones do not count: a viewer joining just after one must not wait)"""
KEYFRAME_WAIT_S = 0.1
"""a keyframe asked for while the stream is stalled is made from the last frame within this long"""
GOP_S = 2.0
"""periodic keyframe interval: the longest a viewer that lost packets stays broken without PLI"""
FRAME_RATE = 30
"""the rate the shared encoders are told (rate control and GOP length); frames carry their own times"""
VIEWER_QUEUE = 8
"""encoded frames one viewer may have unsent before it is resynchronised at the next keyframe"""
AUDIO_RATE = 48_000
AUDIO_TIME_BASE = fractions.Fraction(1, AUDIO_RATE)
AUDIO_FRAME = 960
"""samples per audio frame sent: 20 ms, the Opus frame WebRTC peers expect"""
AUDIO_VIEWER_QUEUE = 10
"""audio frames (200 ms) one viewer may have unsent; beyond that its oldest are dropped, so a slow
viewer hears the present with a gap rather than an ever later past"""


class FeedClosed(Exception):
    """The feed's stream has stopped; no more frames will come."""


class TooManyViewers(OfferError):
    """A viewer limit is reached; ``limit`` is the config key that sets it. Another viewer leaving frees a
    place, so the client may try again later."""

    http_status = 503
    retry_after_s = 10

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class FeedFrame:
    seq: int
    image: Picture
    captured_at: float


class FrameFeed:
    """The newest redacted frame of one stream, for any number of async readers.

    :meth:`push` is called from the pipeline's redaction thread: it only swaps a reference and
    schedules a wake-up on each waiting event loop, so it never blocks on a slow viewer. The
    image is kept by reference: the pusher must not modify it afterwards.
    """

    def __init__(self, stream_id: str = "") -> None:
        self.stream_id = stream_id
        self._lock = threading.Lock()
        self._latest: FeedFrame | None = None
        self._closed = False
        self._waiters: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        self.pushed = 0

    def push(self, image: Picture, captured_at: float) -> None:
        """Publish a frame (BGR HxWx3 uint8, or I420); ``captured_at``: ``time.monotonic()`` at capture."""
        with self._lock:
            if self._closed:
                return
            self.pushed += 1
            self._latest = FeedFrame(self.pushed, image, captured_at)
            waiters, self._waiters = self._waiters, {}
        self._wake(waiters)

    def close(self) -> None:
        """The stream stopped: readers get :class:`FeedClosed` (and viewers' sessions end)."""
        with self._lock:
            self._closed = True
            waiters, self._waiters = self._waiters, {}
        self._wake(waiters)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def latest(self) -> FeedFrame | None:
        return self._latest

    @property
    def waiting(self) -> int:
        """Readers blocked in :meth:`next` right now (a timed-out or cancelled one is not kept)."""
        with self._lock:
            return sum(len(f) for f in self._waiters.values())

    async def next(self, after: int = 0, timeout: float | None = None) -> FeedFrame | None:
        """The newest frame with ``seq > after``, waiting for one; None if ``timeout`` passes first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._lock:
                if self._closed:
                    raise FeedClosed(self.stream_id)
                if self._latest is not None and self._latest.seq > after:
                    return self._latest
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.setdefault(loop, []).append(fut)
            try:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return None
                # not wait_for: on Python 3.11 it swallows a cancellation that lands while ``fut``
                # completes (gh-86296), and a reader cancelled at shutdown would then wait forever
                done, _ = await asyncio.wait((fut,), timeout=remaining)
                if not done:
                    return None
            finally:
                if not fut.done() or fut.cancelled():
                    self._forget(loop, fut)

    def _forget(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
        with self._lock:
            futs = self._waiters.get(loop)
            if futs is not None and fut in futs:
                futs.remove(fut)
                if not futs:
                    del self._waiters[loop]

    @staticmethod
    def _wake(waiters: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]]) -> None:
        for loop, futs in waiters.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there any more
                loop.call_soon_threadsafe(_resolve, futs)


def _resolve(futs: list[asyncio.Future[None]]) -> None:
    for f in futs:
        if not f.done():
            f.set_result(None)


class AudioFeed:
    """A stream's redacted audio for its WHEP viewers: 20 ms stereo s16 frames, shared by all of them.

    :meth:`push` is an audio lane sink (called on the lane's thread, must not block): it cuts the
    block into frames and hands them to the viewers' tracks on ``loop``. A track takes frames only
    once its sender reads, so a viewer that joins late starts at the current audio, never a backlog.
    """

    def __init__(self, stream_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.stream_id = stream_id
        self.loop = loop
        self._lock = threading.Lock()
        self._origin: float | None = None
        self._pending = np.zeros((0, 2), np.int16)
        self._pos = 0
        """the timestamp (48 kHz ticks) of ``_pending[0]``"""
        self._tracks: set[AudioFeedTrack] = set()
        """the viewers' tracks; changed on ``loop`` only"""
        self._listening = 0
        self._closed = False
        self.frames = 0
        """frames cut so far (with or without viewers)"""

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def subscribers(self) -> int:
        return len(self._tracks)

    def push(self, samples: np.ndarray, t: float) -> None:
        """A redacted block ([n, channels] float32 at 48 kHz) whose first sample is at stream-clock ``t``."""
        with self._lock:
            if self._closed:
                return
            chunks = self._cut(samples, t)
            listening = self._listening
        if chunks and listening:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
                self.loop.call_soon_threadsafe(self._deliver, chunks)

    def _cut(self, samples: np.ndarray, t: float) -> list[tuple[np.ndarray, int]]:
        x = np.asarray(samples, np.float32)
        if x.ndim == 1:
            x = x[:, None]
        # always stereo: a sender's encoder cannot change layout mid-stream, and a source can
        x = np.repeat(x[:, :1], 2, axis=1) if x.shape[1] == 1 else x[:, :2]
        pcm = np.clip(np.rint(x * 32767.0), -32768, 32767).astype(np.int16)
        if self._origin is None:
            self._origin = t
        start = round((t - self._origin) * AUDIO_RATE)
        end = self._pos + len(self._pending)
        out: list[tuple[np.ndarray, int]] = []
        if start > end + AUDIO_FRAME:
            # audio was lost upstream: leave a gap in the timestamps (the receiver conceals it) so
            # what follows stays at its own time, next to its picture
            if len(self._pending):
                pad = np.zeros((AUDIO_FRAME - len(self._pending), 2), np.int16)
                out.append((np.concatenate([self._pending, pad]), self._pos))
            self._pending = pcm[:0]
            self._pos = start
        # else it follows on (or overlaps after a small step back of the clock): kept continuous,
        # since timestamps must not go back
        pending = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        whole = len(pending) // AUDIO_FRAME * AUDIO_FRAME
        for i in range(0, whole, AUDIO_FRAME):
            out.append((pending[i:i + AUDIO_FRAME], self._pos))
            self._pos += AUDIO_FRAME
        self._pending = pending[whole:].copy()
        self.frames += len(out)
        return out

    def subscribe(self) -> AudioFeedTrack:
        """A new viewer's track (on ``loop``)."""
        track = AudioFeedTrack(self)
        with self._lock:
            if self._closed:
                track.end()
                return track
            self._tracks.add(track)
            self._listening = len(self._tracks)
        return track

    def unsubscribe(self, track: AudioFeedTrack) -> None:
        with self._lock:
            self._tracks.discard(track)
            self._listening = len(self._tracks)

    def close(self) -> None:
        """The stream stopped (any thread): the viewers' audio tracks end."""
        with self._lock:
            self._closed = True
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._end)

    def _deliver(self, chunks: list[tuple[np.ndarray, int]]) -> None:
        for track in list(self._tracks):
            for samples, pts in chunks:
                track.deliver(samples, pts)

    def _end(self) -> None:
        for track in list(self._tracks):
            track.end()


class AudioFeedTrack(MediaStreamTrack):
    """One viewer's audio from an :class:`AudioFeed`; aiortc encodes it to Opus for this viewer."""

    kind = "audio"

    def __init__(self, feed: AudioFeed) -> None:
        super().__init__()
        self.feed = feed
        self._queue: asyncio.Queue[tuple[np.ndarray, int] | None] = asyncio.Queue()
        self._reading = False
        self.sent = 0
        self.dropped = 0
        """frames dropped because this viewer fell behind"""

    def deliver(self, samples: np.ndarray, pts: int) -> None:
        if not self._reading:
            return  # still connecting: no backlog for when it starts
        if self._queue.qsize() >= AUDIO_VIEWER_QUEUE:
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait((samples, pts))

    def end(self) -> None:
        """No more audio (the stream stopped): recv ends after what is queued."""
        self._queue.put_nowait(None)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        self._reading = True
        item = await self._queue.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        samples, pts = item
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = AUDIO_RATE
        frame.pts = pts
        frame.time_base = AUDIO_TIME_BASE
        self.sent += 1
        return frame

    def stop(self) -> None:
        super().stop()
        self.feed.unsubscribe(self)


def wants_opus(desc: SessionDescription) -> bool:
    """Whether a viewer's offer receives audio on its first audio m-line, with Opus among its codecs
    (the only audio sent; the first m-line only, as aiortc pairs our one audio track with it)."""
    media = next((m for m in desc.media if m.kind == "audio"), None)
    return (media is not None and (media.direction or "sendrecv") in ("recvonly", "sendrecv")
            and any(c.name.lower() == "opus" for c in media.rtp.codecs))


class PtsClock:
    """90 kHz timestamps from capture times: start at 0, strictly increase, survive clock jumps.

    ``stamp(captured_at)`` for a new frame; ``stamp(None)`` for a repeat of the last one, which
    advances by the real time since the previous stamp.
    """

    def __init__(self) -> None:
        self._origin: float | None = None
        self._last_pts = -1
        self._last_t = 0.0
        self._last_mono = 0.0

    def stamp(self, captured_at: float | None) -> int:
        now = time.monotonic()
        t = self._last_t + (now - self._last_mono) if captured_at is None else captured_at
        if self._origin is None:
            self._origin = t
        elif t < self._last_t:  # capture clock went back (another source): continue from here
            self._origin = t - (self._last_pts + CLOCK_RATE // 30) / CLOCK_RATE
        pts = max(round((t - self._origin) * CLOCK_RATE), self._last_pts + 1)
        self._last_pts, self._last_t, self._last_mono = pts, t, now
        return pts


class FeedTrack(MediaStreamTrack):
    """A viewer's own track of decoded frames from a feed (aiortc encodes it for this viewer alone)."""

    kind = "video"

    def __init__(self, feed: FrameFeed) -> None:
        super().__init__()
        self.feed = feed
        self._seq = 0
        self._clock = PtsClock()

    async def recv(self) -> VideoFrame:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            try:
                f = await self.feed.next(self._seq, IDLE_REPEAT_S)
            except FeedClosed:
                self.stop()
                raise MediaStreamError from None
            if f is not None:
                self._seq = f.seq
                return video_frame(f.image, self._clock.stamp(f.captured_at), TIME_BASE)
            if (last := self.feed.latest) is not None:
                return video_frame(last.image, self._clock.stamp(None), TIME_BASE)


class EncodedTrack(MediaStreamTrack):
    """A viewer's view of a :class:`SharedEncoder`: yields encoded packets, which aiortc only packetizes.

    Takes packets only once its sender reads (the connection is up), starting at a keyframe asked
    for then, so a viewer still connecting neither queues packets nor triggers keyframes. When it
    falls ``VIEWER_QUEUE`` frames behind, its backlog is dropped and it waits for the next
    keyframe (asked for at once), so it never decodes a broken reference chain.
    """

    kind = "video"

    def __init__(self, encoder: SharedEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self._queue: asyncio.Queue[av.Packet | None] = asyncio.Queue()
        self._reading = False
        self._need_keyframe = True
        self.resyncs = 0

    def deliver(self, packet: av.Packet) -> None:
        if not self._reading:
            return
        if self._need_keyframe:
            if not packet.is_keyframe:
                return
            self._need_keyframe = False
        if self._queue.qsize() >= VIEWER_QUEUE:
            while not self._queue.empty():
                self._queue.get_nowait()
            self._need_keyframe = True
            self.resyncs += 1
            self.encoder.request_keyframe()
            return
        self._queue.put_nowait(packet)

    def end(self) -> None:
        """No more packets (the feed closed): recv ends after the queued ones."""
        self._queue.put_nowait(None)

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if not self._reading:
            self._reading = True
            self.encoder.request_keyframe()
        packet = await self._queue.get()
        if packet is None:
            self.stop()
            raise MediaStreamError
        return packet

    def stop(self) -> None:
        super().stop()
        self.encoder.unsubscribe(self)


def default_bitrate(width: int, height: int) -> int:
    """~0.1 bit per pixel at 25 fps (640x360: ~580 kbit/s, 1280x720: ~2.3 Mbit/s), within 300 k..8 M."""
    return int(min(8_000_000, max(300_000, width * height * 25 * 0.1)))


class SharedEncoder:
    """Encodes a feed once for all viewers of one stream that use ``codec`` (``VP8`` or ``H264``).

    Runs while it has subscribers. Encoding happens in the loop's default executor, one frame
    at a time; frames that arrive meanwhile are skipped (the feed keeps only the newest).
    """

    def __init__(self, feed: FrameFeed, codec: str, bitrate: int | None = None,
                 on_idle: Callable[[SharedEncoder], None] | None = None) -> None:
        if codec.upper() not in VIDEO_CODECS:
            raise ValueError(f"cannot encode {codec!r}; use one of {', '.join(VIDEO_CODECS)}")
        self.feed = feed
        self.codec = codec.upper()
        self.bitrate = bitrate
        self._on_idle = on_idle
        self._subscribers: set[EncodedTrack] = set()
        self._encoder: VideoEncoder | None = None
        self._keyframe_wanted = False
        self._last_forced = -1e9
        self._clock = PtsClock()
        self._task: asyncio.Task[None] | None = None
        self.encoded = 0
        self.keyframes = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> EncodedTrack:
        track = EncodedTrack(self)
        self._subscribers.add(track)
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        return track

    def unsubscribe(self, track: EncodedTrack) -> None:
        self._subscribers.discard(track)
        if not self._subscribers and self._on_idle is not None:
            self._on_idle(self)

    def request_keyframe(self) -> None:
        """A new viewer or a picture-loss report (PLI/FIR) of any viewer: next frame is a keyframe."""
        self._keyframe_wanted = True

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            done, _ = await asyncio.wait((task,), timeout=CLOSE_TIMEOUT_S)
            if not done:
                log.warning("stream %s: %s encoder did not stop within %g s; left behind",
                            self.feed.stream_id, self.codec, CLOSE_TIMEOUT_S)
        self._encoder = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        seq = 0
        last_encode = -1e9
        try:
            while True:
                # short waits: a stalled stream still answers a keyframe request within KEYFRAME_WAIT_S
                f = await self.feed.next(seq, KEYFRAME_WAIT_S)
                now = time.monotonic()
                force = self._keyframe_wanted and now - self._last_forced >= KEYFRAME_MIN_INTERVAL_S
                if f is not None:
                    seq = f.seq
                    pts = self._clock.stamp(f.captured_at)
                elif (f := self.feed.latest) is not None and (force or now - last_encode >= IDLE_REPEAT_S):
                    pts = self._clock.stamp(None)  # stalled: the last frame again
                else:
                    continue
                if force:
                    self._keyframe_wanted, self._last_forced = False, now
                last_encode = now
                try:
                    packets = await loop.run_in_executor(None, self._encode, f.image, pts, force)
                except (av.FFmpegError, ValueError) as e:  # a bad frame must not end the stream's playback
                    log.warning("stream %s: %s encode failed: %s", self.feed.stream_id, self.codec, e)
                    self._encoder = None
                    continue
                self.encoded += 1
                for packet in packets:
                    if packet.is_keyframe:  # whoever asked gets this one (requests made meanwhile too)
                        self.keyframes += 1
                        self._keyframe_wanted = False
                    for track in list(self._subscribers):
                        track.deliver(packet)
        except FeedClosed:
            for track in list(self._subscribers):
                track.end()

    def _encode(self, image: Picture, pts: int, keyframe: bool) -> list[av.Packet]:
        size = even_size(image.shape[1], image.shape[0])
        enc = self._encoder
        if enc is None or enc.size != size:
            enc = self._encoder = self._open(*size)
            keyframe = True
        return enc.encode(image, pts, keyframe)

    def _open(self, width: int, height: int) -> VideoEncoder:
        bitrate = self.bitrate or default_bitrate(width, height)
        if self.codec == "H264":
            settings = H264Settings(tune="zerolatency", forced_idr=True, bitrate=bitrate,
                                    bufsize=bitrate // 2, profile="Baseline", gop=round(GOP_S * FRAME_RATE))
            return H264Encoder(width, height, settings, rate=fractions.Fraction(FRAME_RATE),
                               time_base=TIME_BASE)
        ctx: av.VideoCodecContext = av.CodecContext.create("libvpx", "w")  # type: ignore[assignment]
        ctx.qmin, ctx.qmax = 2, 56
        ctx.options = {"deadline": "realtime", "cpu-used": "-6", "lag-in-frames": "0",
                       "bufsize": str(bitrate), "minrate": str(bitrate), "maxrate": str(bitrate),
                       "undershoot-pct": "100", "overshoot-pct": "15", "static-thresh": "1",
                       "error-resilient": "1"}
        ctx.thread_count = number_of_threads(width * height, os.cpu_count() or 1)  # as aiortc does
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        ctx.bit_rate = bitrate
        ctx.time_base = TIME_BASE
        ctx.framerate = fractions.Fraction(FRAME_RATE)
        ctx.gop_size = round(GOP_S * FRAME_RATE)
        ctx.open()
        return VideoEncoder(ctx, TIME_BASE)


@dataclass(eq=False)
class WhepSession(RtcSession):
    """One viewer's connection."""

    codec: str
    track: MediaStreamTrack
    feed: FrameFeed | None = None
    """what the viewer watches: tells a removed stream's viewers from those of one re-added under its id"""
    audio: AudioFeedTrack | None = None
    """the viewer's audio, when it asked for audio and the stream has some"""


class WhepPlayback(SessionHost[WhepSession]):
    """Serves WHEP viewers the frames of each stream's :class:`FrameFeed`."""

    role = "viewer"
    protocol = "WHEP"

    def __init__(self, ice: IceConfig | None = None, *, codecs: Sequence[str] = VIDEO_CODECS,
                 shared_encoding: bool = True, bitrate: int | None = None,
                 max_sdp_bytes: int = MAX_SDP_BYTES, connect_timeout_s: float = 15.0,
                 max_viewers_per_stream: int | None = None, max_viewers: int | None = None) -> None:
        """``codecs``: what to send, in order of preference; the first one the viewer offers is used.

        ``max_viewers_per_stream`` and ``max_viewers`` (all streams) bound the sessions, connecting
        ones included, since each costs a peer connection, a UDP port and packetizing work; None is
        no limit. An offer beyond either gets :class:`TooManyViewers`.
        """
        bad = [c for c in codecs if c.upper() not in VIDEO_CODECS]
        if bad or not codecs:
            raise ValueError(f"WHEP codecs {list(codecs)}: choose from {', '.join(VIDEO_CODECS)}")
        super().__init__(ice, connect_timeout_s)
        self.codecs = tuple(c.upper() for c in codecs)
        self.shared_encoding = shared_encoding
        self.bitrate = bitrate
        self.max_sdp_bytes = max_sdp_bytes
        self.max_viewers_per_stream = max_viewers_per_stream
        self.max_viewers = max_viewers
        self._negotiating: dict[str, int] = {}
        """offers being answered, per stream: they count against the limits before they are sessions"""
        self._encoders: dict[tuple[int, str], SharedEncoder] = {}

    # -- queries ---------------------------------------------------------------------------------
    def viewers(self, stream_id: str) -> int:
        """Open viewer sessions of a stream (connecting or connected)."""
        return sum(1 for s in self._sessions.values() if s.stream_id == stream_id)

    def encoders(self) -> int:
        """Shared encoders running (one per watched stream and codec)."""
        return len(self._encoders)

    def stats(self) -> dict[str, Any]:
        """Viewers per stream and what each shared encoder did (for status pages and benchmarks)."""
        streams: dict[str, int] = {}
        for s in self._sessions.values():
            streams[s.stream_id] = streams.get(s.stream_id, 0) + 1
        encoders = [{"stream": e.feed.stream_id, "codec": e.codec, "viewers": e.subscribers,
                     "encoded": e.encoded, "keyframes": e.keyframes} for e in self._encoders.values()]
        listeners: dict[str, int] = {}
        for s in self._sessions.values():
            if s.audio is not None:
                listeners[s.stream_id] = listeners.get(s.stream_id, 0) + 1
        return {"viewers": streams, "encoders": encoders, "listeners": listeners}

    # -- WHEP resource ---------------------------------------------------------------------------
    async def offer(self, stream_id: str, sdp: str, feed: FrameFeed,
                    audio: AudioFeed | None = None) -> tuple[str, str]:
        """Answer a viewer's offer; returns ``(answer_sdp, session_id)``. Raises :class:`OfferError`.

        ``audio``: the stream's redacted audio (None: it has none, e.g. ``audio.policy: drop``); sent
        when the offer receives Opus on its first audio m-line, else that m-line is answered inactive.
        """
        desc = parse_offer(sdp, "recv", self.max_sdp_bytes, self.codecs)
        if feed.closed:
            raise StreamGone(f"stream {stream_id} is not running; nothing to watch")
        self._admit(stream_id)
        self._negotiating[stream_id] = self._negotiating.get(stream_id, 0) + 1
        try:
            sound = audio if audio is not None and not audio.closed and wants_opus(desc) else None
            return await self._answer(stream_id, sdp, desc, feed, sound)
        finally:
            left = self._negotiating.pop(stream_id) - 1
            if left:
                self._negotiating[stream_id] = left

    def _admit(self, stream_id: str) -> None:
        """Refuse a viewer beyond the limits; sessions and offers still being answered both count."""
        if self.max_viewers_per_stream is not None:
            n = self.viewers(stream_id) + self._negotiating.get(stream_id, 0)
            if n >= self.max_viewers_per_stream:
                raise TooManyViewers(
                    f"stream {stream_id!r} already has {n} WHEP viewers, the most "
                    f"webrtc.max_viewers_per_stream ({self.max_viewers_per_stream}) allows; try again later, "
                    "or raise webrtc.max_viewers_per_stream", "max_viewers_per_stream")
        if self.max_viewers is not None:
            n = len(self._sessions) + sum(self._negotiating.values())
            if n >= self.max_viewers:
                raise TooManyViewers(
                    f"this server already has {n} WHEP viewers, the most webrtc.max_viewers "
                    f"({self.max_viewers}) allows; try again later, or raise webrtc.max_viewers",
                    "max_viewers")

    async def _answer(self, stream_id: str, sdp: str, desc: SessionDescription,
                      feed: FrameFeed, audio: AudioFeed | None) -> tuple[str, str]:
        offered = {c.name.upper() for m in desc.media if m.kind == "video" for c in m.rtp.codecs}
        codec = next(c for c in self.codecs if c in offered)
        pc = self._connection()
        track: MediaStreamTrack
        encoder = None
        if self.shared_encoding:
            encoder = self._encoder(feed, codec)
            track = encoder.subscribe()
        else:
            track = FeedTrack(feed)
        session = WhepSession(new_session_id(), stream_id, pc, codec=codec, track=track, feed=feed)
        transceiver = pc.addTransceiver(track, direction="sendonly")
        wanted = (f"VIDEO/{codec}", "VIDEO/RTX")
        caps = RTCRtpSender.getCapabilities("video").codecs
        transceiver.setCodecPreferences([c for c in caps if c.mimeType.upper() in wanted])
        if encoder is not None:
            # picture-loss reports (PLI/FIR) go to the shared encoder, not the sender's idle own one; aiortc
            # has no public hook for them, only this method (tests/test_webrtc.py pins that it is called)
            transceiver.sender._send_keyframe = encoder.request_keyframe  # type: ignore[method-assign]
        used = [transceiver]
        if audio is not None:
            # added before the offer is applied: aiortc pairs it with the offer's first audio m-line
            session.audio = audio.subscribe()
            sound = pc.addTransceiver(session.audio, direction="sendonly")
            caps = RTCRtpSender.getCapabilities("audio").codecs
            sound.setCodecPreferences([c for c in caps if c.mimeType.lower() == "audio/opus"])
            used.append(sound)

        @track.on("ended")
        def on_ended() -> None:
            self._close_later(session, "track ended")

        self._watch_state(session)
        answer = await self._negotiate(session, sdp, lambda _: used)
        self._register(session)
        log.info("stream %s: WHEP viewer %s (%s%s, %d watching)", stream_id, short(session.id), codec,
                 " + opus" if session.audio is not None else "", self.viewers(stream_id))
        return answer, session.id

    async def close_stream(self, stream_id: str, feed: FrameFeed | None = None) -> None:
        """Close the viewers of one stream (it was removed); with ``feed``, only those watching that feed.

        A stream can be removed and added again under its id before this runs: passing the removed
        stream's feed leaves the viewers of the new one alone.
        """
        await asyncio.gather(*(self._close(s, "stream closed") for s in list(self._sessions.values())
                               if s.stream_id == stream_id and (feed is None or s.feed is feed)))

    async def close_all(self) -> None:
        await super().close_all()
        for enc in list(self._encoders.values()):
            await enc.close()
        self._encoders.clear()

    # -- internals -------------------------------------------------------------------------------
    def _encoder(self, feed: FrameFeed, codec: str) -> SharedEncoder:
        key = (id(feed), codec)
        enc = self._encoders.get(key)
        if enc is None:
            enc = self._encoders[key] = SharedEncoder(feed, codec, self.bitrate, on_idle=self._encoder_idle)
        return enc

    def _encoder_idle(self, enc: SharedEncoder) -> None:
        key = (id(enc.feed), enc.codec)
        if self._encoders.get(key) is enc:
            del self._encoders[key]
        self._background_task(enc.close())

    def _release(self, session: WhepSession) -> None:
        session.track.stop()  # a track never sent (no connection) still leaves its encoder
        if session.audio is not None:
            session.audio.stop()  # and its audio feed

    def _ended(self, session: WhepSession, reason: str | None) -> None:
        log.info("stream %s: WHEP viewer %s gone: %s (%d watching)", session.stream_id, short(session.id),
                 reason, self.viewers(session.stream_id))
