"""WHIP and WHEP over HTTP, joined to the pipeline.

WHIP (RFC 9725): a publisher POSTs an SDP offer to ``/whip/{stream_id}`` of a stream declared
with ``source: {type: whip}``; its frames (and its audio, unless ``audio.policy: drop``) enter that
stream like any camera's. WHEP: a viewer POSTs to ``/whep/{stream_id}`` and receives the stream's
*redacted* frames, taken from the same hook that feeds the outputs, after the redaction stage, and,
if its offer asks for audio, the *redacted* audio from the audio lane's sinks; there is no route to
a source frame or to unredacted sound.
Both answer ``201`` with the SDP answer and a ``Location`` to DELETE; a session can be deleted
only under the stream it belongs to. Trickle ICE (PATCH) is not supported and answers ``405``,
as the specs allow.

Limits (``webrtc:`` in the config): at most ``max_viewers_per_stream`` WHEP viewers of one stream
and ``max_viewers`` in all; an offer beyond them gets ``503`` with ``Retry-After``, counted in
``stream_redact_whep_viewers_refused_total``. ICE host candidates are ``webrtc.host_candidates``,
else ``http.host`` when that is one address (a server bound to 127.0.0.1 offers media on loopback
only), else every interface but loopback; ``webrtc.udp_ports`` holds their UDP ports to a range.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from stream.config import WebRtcConfig
from stream.core.frames import Frame
from stream.core.yuv import Picture
from stream.live.httpbody import BodyTooLarge, read_limited
from stream.live.pipeline import Pipeline, StreamRunner
from stream.live.webrtc.ice import IceConfig, host_addresses_for
from stream.live.webrtc.session import MAX_SDP_BYTES, SDP_CONTENT_TYPE, OfferError, require_sdp_content_type
from stream.live.webrtc.whep import AudioFeed, FrameFeed, TooManyViewers, WhepPlayback
from stream.live.webrtc.whip import WhipIngest

log = logging.getLogger(__name__)

GATEWAY = web.AppKey("rtc_gateway", "RtcGateway")
OFFER_TIMEOUT_S = 15.0
"""an offer not answered by then gets 503: no HTTP request waits on WebRTC forever"""


def _text(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)


_REFUSED: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def viewers_refused(registry: CollectorRegistry) -> Counter:
    """WHEP offers refused at a viewer limit, by the config key of the limit (on the pipeline's registry).

    One counter per registry, however many gateways a pipeline gets (a registry refuses a name twice).
    """
    counter = _REFUSED.get(registry)
    if counter is None:
        counter = _REFUSED[registry] = Counter(
            "stream_redact_whep_viewers_refused", "WHEP viewers refused at a limit (webrtc.<limit>)",
            ["limit"], registry=registry)
        for limit in ("max_viewers_per_stream", "max_viewers"):
            counter.labels(limit=limit)  # present at 0, so a dashboard can rate() it from the start
    return counter


def ice_for(webrtc: WebRtcConfig, http_host: str | None, ice: IceConfig | None = None) -> IceConfig:
    """The ICE settings a gateway uses: ``ice``'s servers, with host addresses and ports from the config.

    Host addresses: ``webrtc.host_candidates``, else ``ice.host_addresses``, else ``http_host`` when it
    is one address (a server listening only on loopback must not offer media on other interfaces),
    else aioice's default. Ports: ``webrtc.udp_ports``, else ``ice.udp_ports``.
    """
    base = ice or IceConfig()
    hosts = (tuple(webrtc.host_candidates) if webrtc.host_candidates
             else base.host_addresses if base.host_addresses is not None
             else host_addresses_for(http_host))
    ports = webrtc.udp_ports if webrtc.udp_ports is not None else base.udp_ports
    return dataclasses.replace(base, host_addresses=hosts, udp_ports=ports)


class RtcGateway:
    """One per process: a frame feed (and an audio feed) per stream, the WHIP publishers, the WHEP
    viewers.

    ``webrtc`` (default: the config's defaults) sets the viewer limits, host candidates and UDP
    ports; ``http_host`` is the HTTP listen address, used for the host candidates when
    ``webrtc.host_candidates`` is not set; ``ice`` adds STUN/TURN servers. Create it on the event
    loop that serves HTTP. ICE settings are process-wide (see :mod:`stream.live.webrtc.ice`).
    """

    def __init__(self, pipeline: Pipeline, webrtc: WebRtcConfig | None = None, http_host: str | None = None,
                 ice: IceConfig | None = None) -> None:
        self.pipeline = pipeline
        self.webrtc = webrtc = webrtc or WebRtcConfig()
        self.ice = ice_for(webrtc, http_host, ice)
        self.whip = WhipIngest(self.ice)
        self.whep = WhepPlayback(self.ice, max_viewers_per_stream=webrtc.max_viewers_per_stream,
                                 max_viewers=webrtc.max_viewers)
        self.refused = viewers_refused(pipeline.metrics.registry)
        self.feeds: dict[str, FrameFeed] = {}
        self._runner_feeds: dict[StreamRunner, FrameFeed] = {}
        self.audio_feeds: dict[str, AudioFeed] = {}
        """per stream that has an audio lane (not with ``audio.policy: drop``)"""
        self._runner_audio: dict[StreamRunner, AudioFeed] = {}
        self.loop = asyncio.get_running_loop()
        pipeline.on_stream_added.append(self._attach)
        pipeline.on_stream_removed.append(self._detach)
        for runner in list(pipeline.streams.values()):
            self._attach(runner)

    def _attach(self, runner: StreamRunner) -> None:
        feed = FrameFeed(runner.id)
        self.feeds[runner.id] = feed
        self._runner_feeds[runner] = feed

        lane = runner.audio if runner.config.audio.lip_sync_webrtc else None
        loop = self.loop

        def push(frame: Frame, image: Picture, _dets: object) -> None:
            # the painted (or blanked) frame, nothing earlier. Viewers time audio and video by when
            # each was sent, so where the stream's audio is held back for its speech look-ahead the
            # picture waits as long: both leave at the same moment's time
            delay = lane.delay_s if lane is not None and lane.channels else 0.0
            due = frame.captured_at + delay
            if delay <= 0 or due <= time.monotonic():
                feed.push(image, frame.captured_at)
            else:
                loop.call_soon_threadsafe(loop.call_at, due, feed.push, image, frame.captured_at)

        runner.on_redacted.append(push)
        if runner.audio is not None:
            audio = AudioFeed(runner.id, self.loop)
            self.audio_feeds[runner.id] = self._runner_audio[runner] = audio
            runner.audio.sinks.append(audio.push)  # redacted blocks, released with their video

    def _detach(self, runner: StreamRunner) -> None:
        stream_id = runner.id
        audio = self._runner_audio.pop(runner, None)
        if audio is not None:  # this runner's own, whoever holds the id now
            if self.audio_feeds.get(stream_id) is audio:
                del self.audio_feeds[stream_id]
            if runner.audio is not None and audio.push in runner.audio.sinks:
                runner.audio.sinks.remove(audio.push)
            audio.close()
        feed = self.feeds.get(stream_id)
        if feed is None or feed is not self._runner_feeds.pop(runner, None):
            return  # the id is already another runner's: leave its feed and viewers alone
        del self.feeds[stream_id]
        feed.close()
        asyncio.run_coroutine_threadsafe(self._close_stream(runner, feed), self.loop)

    async def _close_stream(self, runner: StreamRunner, feed: FrameFeed) -> None:
        """End the removed runner's viewers and publisher only: by the time this runs on the loop, a
        stream of the same id may be back with viewers and a publisher of its own."""
        await self.whep.close_stream(runner.id, feed)
        publisher = self.whip.publisher(runner.id)
        if publisher is not None and publisher.handler is runner:
            log.info("stream %s removed: closing its WHIP publisher", runner.id)
            await self.whip.delete(publisher.id)

    async def close(self) -> None:
        await self.whip.close_all()
        await self.whep.close_all()

    # -- HTTP -------------------------------------------------------------------------------------
    @staticmethod
    async def _offer(request: web.Request) -> str | web.Response:
        try:
            require_sdp_content_type(request.headers.get("Content-Type"))
        except OfferError as e:
            return _text(e.http_status, str(e))
        try:
            raw = await read_limited(request, MAX_SDP_BYTES)  # whole, even when it comes chunked
        except BodyTooLarge:
            return _text(413, f"SDP offer larger than {MAX_SDP_BYTES} bytes")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return _text(400, "the SDP offer is not UTF-8 text")

    async def _negotiate(self, request: web.Request, kind: str,
                         answer_for: Callable[[str], Awaitable[tuple[str, str]]]) -> web.Response:
        """Read the offer, get the answer, reply 201 with the session's resource URL."""
        offer = await self._offer(request)
        if isinstance(offer, web.Response):
            return offer
        try:
            answer, session = await asyncio.wait_for(answer_for(offer), OFFER_TIMEOUT_S)
        except OfferError as e:
            if isinstance(e, TooManyViewers):
                self.refused.labels(limit=e.limit).inc()
                log.info("WHEP viewer for %s refused: %s", request.match_info["stream_id"], e)
            retry = {} if e.retry_after_s is None else {"Retry-After": str(e.retry_after_s)}
            return _text(e.http_status, str(e), **retry)
        except TimeoutError:
            log.error("%s offer for %s not answered within %g s", kind.upper(),
                      request.match_info["stream_id"], OFFER_TIMEOUT_S)
            return _text(503, f"the {kind.upper()} offer could not be answered within {OFFER_TIMEOUT_S:g} s; "
                              "try again")
        sid = request.match_info["stream_id"]
        return web.Response(status=201, text=answer, content_type=SDP_CONTENT_TYPE,
                            headers={"Location": f"/{kind}/{sid}/{session}"})

    async def whip_post(self, request: web.Request) -> web.Response:
        sid = request.match_info["stream_id"]
        runner = self.pipeline.streams.get(sid)
        if runner is None:
            return _text(404, f"no stream {sid!r}; declare it with source {{type: whip}} in the config or "
                              "POST /api/streams first")
        if runner.config.source.type != "whip":
            return _text(409, f"stream {sid!r} takes its video from a {runner.config.source.type} source, "
                              "not WHIP; use a stream declared with source {type: whip}")
        return await self._negotiate(request, "whip", lambda sdp: self.whip.offer(sid, sdp, runner))

    async def whep_post(self, request: web.Request) -> web.Response:
        sid = request.match_info["stream_id"]
        feed = self.feeds.get(sid)
        if feed is None or sid not in self.pipeline.streams:
            return _text(404, f"no stream {sid!r}; GET /api/streams lists them")
        audio = self.audio_feeds.get(sid)
        return await self._negotiate(request, "whep", lambda sdp: self.whep.offer(sid, sdp, feed, audio))

    async def whip_delete(self, request: web.Request) -> web.Response:
        if not await self.whip.delete(request.match_info["session"], request.match_info["stream_id"]):
            return _text(404, "no such WHIP session for this stream")
        return web.Response(status=200)

    async def whep_delete(self, request: web.Request) -> web.Response:
        if not await self.whep.delete(request.match_info["session"], request.match_info["stream_id"]):
            return _text(404, "no such WHEP session for this stream")
        return web.Response(status=200)

    @staticmethod
    async def no_trickle(request: web.Request) -> web.Response:
        return _text(405, "trickle ICE (PATCH) is not supported: send all candidates in the offer",
                     Allow="DELETE")

    def add_routes(self, app: web.Application) -> None:
        app[GATEWAY] = self
        r = app.router
        r.add_post("/whip/{stream_id}", self.whip_post)
        r.add_post("/whep/{stream_id}", self.whep_post)
        r.add_delete("/whip/{stream_id}/{session}", self.whip_delete)
        r.add_delete("/whep/{stream_id}/{session}", self.whep_delete)
        r.add_patch("/whip/{stream_id}/{session}", self.no_trickle)
        r.add_patch("/whep/{stream_id}/{session}", self.no_trickle)
