"""WHIP ingest (RFC 9725): a publisher POSTs an SDP offer, gets an answer, and sends its video over WebRTC.

:class:`WhipIngest` owns the publishers' peer connections. Each received video frame is decoded
by aiortc (its own decoder thread per connection), converted to BGR off the event loop and
handed to the stream's :class:`~stream.live.sources.base.SourceHandler`, exactly as the RTSP source
does; from there the pipeline treats it like any other camera.

One publisher per stream id: a new offer for a stream that already has one *replaces* it (the
old connection is closed, the handler sees ``on_reconnect``, not ``on_down``). A bodycam that
changes network re-POSTs long before the old connection's ICE times out (~30 s); refusing it
with 409 until then would black out the stream, and the newest publisher is the one that is
really there. The price: anyone holding the WHIP URL (and its token, checked by the HTTP layer)
can take a stream over.

Audio: when the stream publishes audio (its handler's ``wants_audio``; not with ``audio.policy:
drop``) the answer also takes the publisher's first audio m-line, Opus preferred (G.722 and G.711
are decoded too); each decoded frame goes to the handler's ``on_audio`` with the moment it was
taken off the connection, where the stream's audio lane redacts it. Otherwise audio is answered
inactive, so none is sent or decoded. The video decides the session's life: the audio track
ending leaves it open.

Offers are checked and answered as WHEP's are (:mod:`stream.live.webrtc.session`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiortc import MediaStreamTrack, RTCRtpSender, RTCRtpTransceiver
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription
from av import AudioFrame, VideoFrame

from stream.core.yuv import decoded_picture
from stream.live.sources.base import SourceHandler
from stream.live.webrtc.ice import IceConfig
from stream.live.webrtc.session import (
    MAX_SDP_BYTES,
    RtcSession,
    SessionHost,
    new_session_id,
    parse_offer,
    short,
)

log = logging.getLogger(__name__)

BACKLOG_FRAMES = 2
"""Decoded frames allowed to wait for BGR conversion before older ones are skipped (newest wins)."""
AUDIO_BACKLOG_FRAMES = 25
"""Decoded audio frames (0.5 s of 20 ms Opus) allowed to wait for the event loop before the oldest are
skipped: audio that old would reach the lane after its deadline and be muted anyway"""


def video_codec_name(answer_sdp: str) -> str:
    """The first codec of the answer's video m-line, in PyAV's spelling (``vp8``, ``h264``)."""
    for m in SessionDescription.parse(answer_sdp).media:
        if m.kind == "video":
            for c in m.rtp.codecs:
                if c.name.lower() not in ("rtx", "red", "ulpfec"):
                    return c.name.lower()
    return "unknown"


@dataclass(eq=False)
class WhipSession(RtcSession):
    """One publisher's connection; counters for status pages."""

    handler: SourceHandler
    codec: str = "unknown"
    size: tuple[int, int] | None = None
    frames: int = 0
    skipped: int = 0
    """decoded frames dropped because conversion fell behind (newest wins)"""
    receiving: bool = False
    audio: RTCRtpTransceiver | None = None
    """the transceiver that takes the publisher's audio (None: the stream wants none, or none offered)"""
    audio_channels: int = 0
    """channels of the first decoded audio frame (0 before)"""
    audio_frames: int = 0
    audio_skipped: int = 0
    """decoded audio frames dropped because the event loop fell behind"""
    receiving_audio: bool = False
    """the publisher's audio track is being read (it may end while the video goes on)"""


def first_video(transceivers: list[RTCRtpTransceiver]) -> list[RTCRtpTransceiver]:
    """What a publisher's offer is answered with when the stream wants no audio: its first video only."""
    return [t for t in transceivers if t.kind == "video"][:1]


def first_video_and(audio: RTCRtpTransceiver | None) -> Callable[[list[RTCRtpTransceiver]],
                                                                 list[RTCRtpTransceiver]]:
    """Its first video and, when there is one, the ``audio`` transceiver (never a second camera or mic)."""
    return lambda transceivers: first_video(transceivers) + ([audio] if audio is not None else [])


def wants_audio(handler: SourceHandler) -> bool:
    """Whether the stream takes audio; a handler that does not say (one that predates audio) takes none."""
    return bool(getattr(handler, "wants_audio", False))


class WhipIngest(SessionHost[WhipSession]):
    """Accepts WHIP publishers and feeds each one's video to its stream's handler."""

    role = "publisher"
    protocol = "WHIP"

    def __init__(self, ice: IceConfig | None = None, *, max_sdp_bytes: int = MAX_SDP_BYTES,
                 connect_timeout_s: float = 15.0) -> None:
        super().__init__(ice, connect_timeout_s)
        self.max_sdp_bytes = max_sdp_bytes
        self._by_stream: dict[str, WhipSession] = {}

    # -- queries ---------------------------------------------------------------------------------
    def publisher(self, stream_id: str) -> WhipSession | None:
        """The stream's current publisher, if any."""
        return self._by_stream.get(stream_id)

    # -- WHIP resource ---------------------------------------------------------------------------
    async def offer(self, stream_id: str, sdp: str, handler: SourceHandler) -> tuple[str, str]:
        """Answer a publisher's offer; returns ``(answer_sdp, session_id)``. Raises :class:`OfferError`.

        The answer carries all our ICE candidates (no trickle), so the publisher can connect as
        soon as it has it.
        """
        desc = parse_offer(sdp, "send", self.max_sdp_bytes)
        pc = self._connection()
        session = WhipSession(new_session_id(), stream_id, pc, handler=handler)
        if wants_audio(handler) and any(m.kind == "audio" for m in desc.media):
            # added before the offer is applied: aiortc pairs it with the offer's first audio m-line,
            # and its preferences put Opus (48 kHz, stereo) before G.722 and G.711 whatever the offer's order
            session.audio = pc.addTransceiver("audio", direction="recvonly")
            session.audio.setCodecPreferences(RTCRtpSender.getCapabilities("audio").codecs)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video" and not session.receiving:  # the first video track only
                session.receiving = True
                self._spawn(session, self._receive(session, track))
            elif session.audio is not None and track is session.audio.receiver.track:
                self._spawn(session, self._receive_audio(session, track))

        self._watch_state(session)
        answer = await self._negotiate(session, sdp, first_video_and(session.audio))
        session.codec = video_codec_name(answer)
        self._register(session)
        old = self._by_stream.get(stream_id)
        self._by_stream[stream_id] = session
        if old is not None:
            log.info("stream %s: WHIP publisher %s replaces %s", stream_id, short(session.id), short(old.id))
            await self._close(old, None)
            handler.on_reconnect()
        else:
            log.info("stream %s: WHIP publisher %s (%s)", stream_id, short(session.id), session.codec)
        return answer, session.id

    # -- internals -------------------------------------------------------------------------------
    async def _receive(self, session: WhipSession, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        handler = session.handler
        # aiortc (1.16) has no public way to see how many decoded frames wait in a remote track, and
        # that queue is unbounded: its private _queue is read to skip a backlog (tests/test_webrtc.py)
        backlog = getattr(track, "_queue", None)
        try:
            while True:
                frame = await track.recv()
                while backlog is not None and backlog.qsize() > BACKLOG_FRAMES:
                    frame = await track.recv()
                    session.skipped += 1
                if not isinstance(frame, VideoFrame):
                    continue
                image = await loop.run_in_executor(None, decoded_picture, frame)
                if session.closed:
                    return
                size = (frame.width, frame.height)
                if size != session.size:
                    session.size = size
                    handler.on_up(frame.width, frame.height, session.codec)
                known = frame.pts is not None and frame.time_base is not None
                pts = float(frame.pts * frame.time_base) if known else None
                session.frames += 1
                handler.on_frame(image, pts)
        except MediaStreamError:
            self._close_later(session, "publisher's video track ended")
        except Exception as e:  # a handler bug ends this session, not the server
            log.exception("stream %s: WHIP session %s failed", session.stream_id, short(session.id))
            self._close_later(session, f"WHIP receive failed: {type(e).__name__}")

    async def _receive_audio(self, session: WhipSession, track: MediaStreamTrack) -> None:
        handler = session.handler
        backlog = getattr(track, "_queue", None)  # as for video: aiortc's decoded-frame queue is unbounded
        session.receiving_audio = True
        try:
            while True:
                frame = await track.recv()
                while backlog is not None and backlog.qsize() > AUDIO_BACKLOG_FRAMES:
                    frame = await track.recv()
                    session.audio_skipped += 1
                if session.closed:
                    return
                if not isinstance(frame, AudioFrame):
                    continue
                if not session.audio_channels:
                    session.audio_channels = frame.layout.nb_channels
                    handler.on_audio_track(session.audio_channels)
                session.audio_frames += 1
                handler.on_audio(frame, time.monotonic())
        except MediaStreamError:
            # a publisher may stop its microphone and go on filming: the video decides
            if not session.closed:
                log.info("stream %s: WHIP publisher %s stopped sending audio", session.stream_id,
                         short(session.id))
        except Exception as e:  # a handler bug ends this session, as a video one does
            log.exception("stream %s: WHIP session %s audio failed", session.stream_id, short(session.id))
            self._close_later(session, f"WHIP audio receive failed: {type(e).__name__}")
        finally:
            session.receiving_audio = False

    def _forget(self, session: WhipSession) -> None:
        if self._by_stream.get(session.stream_id) is session:
            del self._by_stream[session.stream_id]

    def _ended(self, session: WhipSession, reason: str | None) -> None:
        """Tell the handler ``on_down(reason)`` unless the session was replaced (``reason`` None)."""
        if reason is not None:
            log.info("stream %s: WHIP publisher %s gone: %s", session.stream_id, short(session.id), reason)
            session.handler.on_down("disconnected", reason)
