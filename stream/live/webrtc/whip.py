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

The offer is checked before any connection is made (:func:`parse_offer`); every refusal is an
:class:`OfferError` (a ``ValueError``) whose ``http_status`` is what the HTTP layer should answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription
from av import VideoFrame

from stream.live.sources.base import SourceHandler
from stream.live.webrtc.ice import IceConfig, apply

log = logging.getLogger(__name__)

MAX_SDP_BYTES = 64 * 1024
"""Browsers' offers are 3-10 KiB; anything near this is not an honest offer."""
SDP_CONTENT_TYPE = "application/sdp"
VIDEO_CODECS = ("VP8", "H264")
"""What aiortc can decode and encode (mime subtypes as SDP writes them)."""
BACKLOG_FRAMES = 2
"""Decoded frames allowed to wait for BGR conversion before older ones are skipped (newest wins)."""


class OfferError(ValueError):
    """An SDP offer refused before or while negotiating; the message says what is wrong and what to send."""

    http_status = 400
    retry_after_s: int | None = None
    """set where trying again later can succeed (a full server): the HTTP layer sends ``Retry-After``"""


class OfferTooLarge(OfferError):
    http_status = 413


class NotSdp(OfferError):
    """The request body is not ``application/sdp``."""

    http_status = 415


class StreamGone(OfferError):
    """The stream to watch is not running (its frame feed is closed)."""

    http_status = 404


class NoCandidates(OfferError):
    """This end gathered no ICE candidate: an answer without one could never connect."""

    http_status = 503
    retry_after_s = 10

    def __init__(self) -> None:
        super().__init__("this server has no ICE candidate to offer: no free UDP port in webrtc.udp_ports "
                         "(try again later, or widen the range), or no usable host address (check "
                         "webrtc.host_candidates and http.host)")


def require_sdp_content_type(content_type: str | None) -> None:
    """WHIP and WHEP bodies are ``application/sdp`` (RFC 9725 §4.2); anything else is 415."""
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime != SDP_CONTENT_TYPE:
        raise NotSdp(f"the offer must be sent as Content-Type: {SDP_CONTENT_TYPE} (got {mime or 'none'})")


def parse_offer(sdp: object, want: Literal["send", "recv"], max_bytes: int = MAX_SDP_BYTES,
                codecs: Iterable[str] = VIDEO_CODECS) -> SessionDescription:
    """Check that ``sdp`` is an SDP offer with a usable video m-line, before any connection is made.

    ``want`` is what the *offerer* does with video: a WHIP publisher sends it, a WHEP viewer
    receives it. ``codecs`` are the video codecs this end accepts; one of them must be offered.
    """
    if not isinstance(sdp, str):
        raise OfferError(f"the SDP offer must be text, got {type(sdp).__name__}")
    if len(sdp) > max_bytes or len(sdp.encode("utf-8", "surrogatepass")) > max_bytes:
        raise OfferTooLarge(f"the SDP offer is larger than {max_bytes // 1024} KiB; send the browser's "
                            "or encoder's own offer, not a padded one")
    if not sdp.lstrip().startswith("v=0"):
        raise OfferError("the body is not an SDP offer: it must start with 'v=0' (RFC 8866)")
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as e:  # the parser asserts and indexes: any failure means a malformed line
        detail = f": {e}" if str(e) else ""
        raise OfferError(f"the SDP offer is malformed ({type(e).__name__}{detail}); "
                         "send an unmodified offer from a WebRTC stack") from None
    videos = [m for m in desc.media if m.kind == "video"]
    if not videos:
        kinds = ", ".join(m.kind for m in desc.media) or "no m-lines"
        raise OfferError(f"the SDP offer has no video m-line ({kinds}); add a video track or transceiver")
    ok_dirs = ("sendonly", "sendrecv") if want == "send" else ("recvonly", "sendrecv")
    usable = [m for m in videos if (m.direction or "sendrecv") in ok_dirs]
    if not usable:
        role = "a WHIP publisher must send video" if want == "send" else "a WHEP viewer must receive video"
        raise OfferError(f"the offer's video is {videos[0].direction}; {role} ({' or '.join(ok_dirs)})")
    media = usable[0]
    if not (media.ice and media.ice.usernameFragment and media.ice.password):
        raise OfferError("the offer has no ICE credentials (a=ice-ufrag and a=ice-pwd); "
                         "send the offer as the WebRTC stack made it")
    if not (media.dtls and media.dtls.fingerprints):
        raise OfferError("the offer has no DTLS fingerprint (a=fingerprint); WebRTC media must be encrypted")
    wanted = {c.upper() for c in codecs}
    offered = [c.name for c in media.rtp.codecs if c.name.lower() not in ("rtx", "red", "ulpfec")]
    if not wanted.intersection(n.upper() for n in offered):
        raise OfferError(f"the offer's video codecs ({', '.join(offered) or 'none'}) include none of "
                         f"{', '.join(sorted(wanted))}; enable VP8 or H.264 in the client")
    return desc


def new_session_id() -> str:
    """Unguessable: the session URL is what lets a client DELETE its session."""
    return secrets.token_urlsafe(16)


def short(session_id: str) -> str:
    """Enough of a session id to tell sessions apart in logs, not enough to act on one."""
    return session_id[:6] + "…"


def has_candidates(sdp: str) -> bool:
    """Whether ``sdp`` names at least one ICE candidate (host, server-reflexive or relayed)."""
    return any(line.startswith("a=candidate:") for line in sdp.splitlines())


def video_codec_name(answer_sdp: str) -> str:
    """The first codec of the answer's video m-line, in PyAV's spelling (``vp8``, ``h264``)."""
    for m in SessionDescription.parse(answer_sdp).media:
        if m.kind == "video":
            for c in m.rtp.codecs:
                if c.name.lower() not in ("rtx", "red", "ulpfec"):
                    return c.name.lower()
    return "unknown"


@dataclass(eq=False)
class WhipSession:
    """One publisher's connection; counters for status pages."""

    id: str
    stream_id: str
    handler: SourceHandler
    pc: RTCPeerConnection
    codec: str = "unknown"
    size: tuple[int, int] | None = None
    frames: int = 0
    skipped: int = 0
    """decoded frames dropped because conversion fell behind (newest wins)"""
    created_at: float = field(default_factory=time.monotonic)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    receiving: bool = False
    closed: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class WhipIngest:
    """Accepts WHIP publishers and feeds each one's video to its stream's handler."""

    def __init__(self, ice: IceConfig | None = None, *, max_sdp_bytes: int = MAX_SDP_BYTES,
                 connect_timeout_s: float = 15.0) -> None:
        self._rtc_config = apply(ice or IceConfig())
        self.max_sdp_bytes = max_sdp_bytes
        self.connect_timeout_s = connect_timeout_s
        self._sessions: dict[str, WhipSession] = {}
        self._by_stream: dict[str, WhipSession] = {}
        self._closing: set[asyncio.Task[None]] = set()

    # -- queries ---------------------------------------------------------------------------------
    def session(self, session_id: str) -> WhipSession | None:
        return self._sessions.get(session_id)

    def publisher(self, stream_id: str) -> WhipSession | None:
        """The stream's current publisher, if any."""
        return self._by_stream.get(stream_id)

    # -- WHIP resource ---------------------------------------------------------------------------
    async def offer(self, stream_id: str, sdp: str, handler: SourceHandler) -> tuple[str, str]:
        """Answer a publisher's offer; returns ``(answer_sdp, session_id)``. Raises :class:`OfferError`.

        The answer carries all our ICE candidates (no trickle), so the publisher can connect as
        soon as it has it.
        """
        parse_offer(sdp, "send", self.max_sdp_bytes)
        pc = RTCPeerConnection(self._rtc_config)
        session = WhipSession(new_session_id(), stream_id, handler, pc)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video" and not session.receiving:  # the first video track only
                session.receiving = True
                self._spawn(session, self._receive(session, track))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected":
                session.connected.set()
            elif pc.connectionState in ("failed", "closed"):
                self._close_later(session, f"WebRTC connection {pc.connectionState}")

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            video_seen = False
            for t in pc.getTransceivers():  # receive the first video only; say no to audio and the rest
                if t.kind == "video" and not video_seen:
                    video_seen = True
                else:
                    t.direction = "inactive"
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:
            await self._discard(session)
            raise OfferError(f"the SDP offer could not be negotiated ({type(e).__name__}: {e})") from None
        if not has_candidates(pc.localDescription.sdp):
            await self._discard(session)
            raise NoCandidates
        session.codec = video_codec_name(pc.localDescription.sdp)
        self._sessions[session.id] = session
        old = self._by_stream.get(stream_id)
        self._by_stream[stream_id] = session
        self._spawn(session, self._watch_connect(session))
        if old is not None:
            log.info("stream %s: WHIP publisher %s replaces %s", stream_id, short(session.id), short(old.id))
            await self._close(old, None)
            handler.on_reconnect()
        else:
            log.info("stream %s: WHIP publisher %s (%s)", stream_id, short(session.id), session.codec)
        return pc.localDescription.sdp, session.id

    async def delete(self, session_id: str, stream_id: str | None = None) -> bool:
        """End a publisher's session (WHIP DELETE); False when there is no such session.

        With ``stream_id`` the session must also be that stream's: a session URL is only valid
        under the stream it was created for, not under any path that happens to end in its id.
        """
        session = self._sessions.get(session_id)
        if session is None or (stream_id is not None and session.stream_id != stream_id):
            return False
        await self._close(session, "publisher ended the WHIP session")
        return True

    async def close_all(self) -> None:
        """Close every session (shutdown); handlers see ``on_down``."""
        sessions = list(self._sessions.values())
        await asyncio.gather(*(self._close(s, "server shutting down") for s in sessions))
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    # -- internals -------------------------------------------------------------------------------
    def _spawn(self, session: WhipSession, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        session.tasks.add(task)
        task.add_done_callback(session.tasks.discard)

    def _close_later(self, session: WhipSession, reason: str) -> None:
        """Close from a synchronous event callback; the task is kept so close_all can await it."""
        if session.closed:
            return
        task = asyncio.create_task(self._close(session, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _watch_connect(self, session: WhipSession) -> None:
        try:
            await asyncio.wait_for(session.connected.wait(), self.connect_timeout_s)
        except TimeoutError:
            self._close_later(session, f"publisher did not connect within {self.connect_timeout_s:g} s "
                                       "(ICE: check that its host can reach this server's UDP ports)")

    async def _receive(self, session: WhipSession, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        to_bgr = functools.partial(VideoFrame.to_ndarray, format="bgr24")
        handler = session.handler
        backlog = getattr(track, "_queue", None)  # aiortc's decoded-frame queue is unbounded
        try:
            while True:
                frame = await track.recv()
                while backlog is not None and backlog.qsize() > BACKLOG_FRAMES:
                    frame = await track.recv()
                    session.skipped += 1
                if not isinstance(frame, VideoFrame):
                    continue
                image: np.ndarray = await loop.run_in_executor(None, to_bgr, frame)
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

    async def _close(self, session: WhipSession, reason: str | None) -> None:
        """Close once; tell the handler ``on_down(reason)`` unless ``reason`` is None (replaced)."""
        if session.closed:
            return
        session.closed = True
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
        if self._by_stream.get(session.stream_id) is session:
            del self._by_stream[session.stream_id]
        try:
            await self._discard(session)
        finally:
            if reason is not None:
                log.info("stream %s: WHIP publisher %s gone: %s", session.stream_id, short(session.id),
                         reason)
                session.handler.on_down("disconnected", reason)

    @staticmethod
    async def _discard(session: WhipSession) -> None:
        me = asyncio.current_task()
        tasks = [t for t in session.tasks if t is not me]
        for t in tasks:
            t.cancel()
        try:
            await session.pc.close()
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
