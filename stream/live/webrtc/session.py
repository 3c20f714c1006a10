"""What WHIP ingest and WHEP playback share: checking an offer, answering it, and a session's life.

The offer is checked before any connection is made (:func:`parse_offer`); every refusal is an
:class:`OfferError` (a ``ValueError``) whose ``http_status`` is what the HTTP layer should answer.
:class:`SessionHost` answers an offer on a new peer connection (all our ICE candidates in the
answer, no trickle), closes a session that does not connect in time or whose connection fails,
and closes each session once, however many events ask for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from aiortc import RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.sdp import SessionDescription

from stream.events.audit import AuditLog
from stream.live.webrtc.ice import IceConfig, apply

log = logging.getLogger(__name__)

MAX_SDP_BYTES = 64 * 1024
"""Browsers' offers are 3-10 KiB; anything near this is not an honest offer."""
SDP_CONTENT_TYPE = "application/sdp"
CLOSE_TIMEOUT_S = 5.0
"""How long closing a peer connection or a task may take before it is left behind (shutdown goes on)."""
VIDEO_CODECS = ("VP8", "H264")
"""What aiortc can decode and encode (mime subtypes as SDP writes them)."""


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


@dataclass(frozen=True)
class Requester:
    """Who asked for a session (the audit log records it): user name, role, and address."""

    user: str
    role: str
    address: str | None


REQUESTER: contextvars.ContextVar[Requester | None] = contextvars.ContextVar("requester", default=None)
"""set by the HTTP layer around each authenticated request, so a session answered for it knows who
asked without the WebRTC code taking HTTP requests"""


def new_session_id() -> str:
    """Unguessable: the session URL is what lets a client DELETE its session."""
    return secrets.token_urlsafe(16)


def short(session_id: str) -> str:
    """Enough of a session id to tell sessions apart in logs, not enough to act on one."""
    return session_id[:6] + "…"


def has_candidates(sdp: str) -> bool:
    """Whether ``sdp`` names at least one ICE candidate (host, server-reflexive or relayed)."""
    return any(line.startswith("a=candidate:") for line in sdp.splitlines())


@dataclass(eq=False)
class RtcSession:
    """One peer connection answered to an offer; subclasses add what their side keeps."""

    id: str
    stream_id: str
    pc: RTCPeerConnection
    created_at: float = field(default_factory=time.monotonic, kw_only=True)
    connected: asyncio.Event = field(default_factory=asyncio.Event, kw_only=True)
    closed: bool = field(default=False, kw_only=True)
    tasks: set[asyncio.Task[None]] = field(default_factory=set, kw_only=True)
    requester: Requester | None = field(default_factory=REQUESTER.get, kw_only=True)
    """who asked for it (None outside an authenticated request, e.g. in tests of this layer)"""


S = TypeVar("S", bound=RtcSession)


class SessionHost(Generic[S]):
    """The sessions of one side (WHIP publishers or WHEP viewers): answer, watch, close once.

    Subclasses make the session and its connection's tracks, then call :meth:`_negotiate` and
    :meth:`_register`; they say what closing means for them in :meth:`_forget`, :meth:`_release`
    and :meth:`_ended`.
    """

    role = "peer"
    """who is at the other end, for logs and messages (``publisher``, ``viewer``)"""
    protocol = "WebRTC"
    """``WHIP`` or ``WHEP``, for messages"""

    def __init__(self, ice: IceConfig | None, connect_timeout_s: float) -> None:
        self._rtc_config = apply(ice or IceConfig())
        self.connect_timeout_s = connect_timeout_s
        self._sessions: dict[str, S] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.on_opened: list[Callable[[S], None]] = []
        """told of each session once its offer is answered (the audit log)"""
        self.on_closed: list[Callable[[S, str | None], None]] = []
        """told of each opened session when it closes, with why"""

    def session(self, session_id: str) -> S | None:
        return self._sessions.get(session_id)

    # -- answering ---------------------------------------------------------------------------------
    def _connection(self) -> RTCPeerConnection:
        """A new peer connection with this host's ICE settings."""
        return RTCPeerConnection(self._rtc_config)

    def _watch_state(self, session: S) -> None:
        """Mark the session connected when it is; close it when its connection fails or closes."""
        pc = session.pc

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected":
                session.connected.set()
            elif pc.connectionState in ("failed", "closed"):
                self._close_later(session, f"WebRTC connection {pc.connectionState}")

    async def _negotiate(self, session: S, sdp: str,
                         use: Callable[[list[RTCRtpTransceiver]], Sequence[RTCRtpTransceiver]]) -> str:
        """Answer ``sdp`` on the session's connection; returns the answer SDP.

        ``use`` picks the transceivers that carry media; every other one is answered inactive (no
        audio, no second video). On failure the connection is released (the session was never
        open) and :class:`OfferError` or :class:`NoCandidates` is raised.
        """
        pc = session.pc
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            used = use(pc.getTransceivers())
            for t in pc.getTransceivers():
                if t not in used:
                    t.direction = "inactive"
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:
            await self._abandon(session)
            raise OfferError(f"the SDP offer could not be negotiated ({type(e).__name__}: {e})") from None
        if not has_candidates(pc.localDescription.sdp):
            await self._abandon(session)
            raise NoCandidates
        return pc.localDescription.sdp

    def _register(self, session: S) -> None:
        """The offer is answered: the session is open, and closed unless it connects in time."""
        self._sessions[session.id] = session
        self._spawn(session, self._watch_connect(session))
        self._tell(self.on_opened, session)

    async def _abandon(self, session: S) -> None:
        """Release a session whose offer failed; it was never open, so nobody is told it ended."""
        session.closed = True
        await self._discard(session)

    # -- ending ------------------------------------------------------------------------------------
    async def delete(self, session_id: str, stream_id: str | None = None) -> bool:
        """End a session (WHIP/WHEP DELETE); False when there is no such session.

        With ``stream_id`` the session must also be that stream's: a session URL is only valid
        under the stream it was created for, not under any path that happens to end in its id.
        """
        session = self._sessions.get(session_id)
        if session is None or (stream_id is not None and session.stream_id != stream_id):
            return False
        await self._close(session, f"{self.role} ended the {self.protocol} session")
        return True

    async def close_all(self) -> None:
        """Close every session (shutdown) and wait for closes already under way."""
        await asyncio.gather(*(self._close(s, "server shutting down") for s in list(self._sessions.values())))
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def _close(self, session: S, reason: str | None) -> None:
        """Close once: forget the session, release its connection, then :meth:`_ended`."""
        if session.closed:
            return
        session.closed = True
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
        self._forget(session)
        try:
            await self._discard(session)
        finally:
            self._ended(session, reason)
            self._tell(self.on_closed, session, reason)

    def _tell(self, hooks: Sequence[Callable[..., None]], *args: Any) -> None:
        for hook in hooks:
            try:
                hook(*args)
            except Exception:  # a failing listener must not keep a session open or closed
                log.exception("%s session %s: a session listener failed", self.role, short(args[0].id))

    def _forget(self, session: S) -> None:
        """Drop a closing session from a subclass's own indexes."""

    def _release(self, session: S) -> None:
        """After the connection is closed: release what a subclass attached to it."""

    def _ended(self, session: S, reason: str | None) -> None:
        """A session is closed (``reason`` None: replaced, nobody needs telling)."""

    # -- tasks -------------------------------------------------------------------------------------
    def _spawn(self, session: S, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` for the session's life: it is cancelled when the session closes."""
        task = asyncio.create_task(coro)
        session.tasks.add(task)
        task.add_done_callback(session.tasks.discard)

    def _background_task(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` detached, kept so that :meth:`close_all` can wait for it."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _close_later(self, session: S, reason: str) -> None:
        """Close from a synchronous event callback."""
        if not session.closed:
            self._background_task(self._close(session, reason))

    async def _watch_connect(self, session: S) -> None:
        try:
            await asyncio.wait_for(session.connected.wait(), self.connect_timeout_s)
        except TimeoutError:
            self._close_later(session, f"{self.role} did not connect within {self.connect_timeout_s:g} s "
                                       "(ICE: check that its host can reach this server's UDP ports)")

    async def _discard(self, session: S) -> None:
        me = asyncio.current_task()
        tasks = [t for t in session.tasks if t is not me]
        for t in tasks:
            t.cancel()
        try:
            # bounded: one connection that never finishes closing must not hold up shutdown
            await asyncio.wait_for(session.pc.close(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("%s session %s: connection did not close within %g s; left behind",
                        self.role, short(session.id), CLOSE_TIMEOUT_S)
        finally:
            self._release(session)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)


def audit_sessions(host: SessionHost[Any], audit: AuditLog, kind: str) -> None:
    """Record in ``audit`` who opened a session of ``host`` (``kind`` ``view``: WHEP viewers,
    ``publish``: WHIP publishers), on which stream, from where, and for how long."""
    opened: dict[str, float] = {}

    def who(session: RtcSession) -> dict[str, Any]:
        r = session.requester
        return {"role": r.role if r else None, "address": r.address if r else None,
                "stream_id": session.stream_id, "session": short(session.id)}

    def started(session: RtcSession) -> None:
        opened[session.id] = time.monotonic()
        audit.record(f"audit.{kind}.started", session.requester.user if session.requester else None,
                     **who(session), codec=getattr(session, "codec", "unknown"))

    def ended(session: RtcSession, reason: str | None) -> None:
        start = opened.pop(session.id, None)
        if start is None:
            return  # never answered: nothing was watched or sent
        audit.record(f"audit.{kind}.ended", session.requester.user if session.requester else None,
                     **who(session), duration_s=round(time.monotonic() - start, 3),
                     connected=session.connected.is_set(), reason=reason)

    host.on_opened.append(started)
    host.on_closed.append(ended)
