"""WHIP and WHEP over HTTP, joined to the pipeline.

WHIP (RFC 9725): a publisher POSTs an SDP offer to ``/whip/{stream_id}`` of a stream declared
with ``source: {type: whip}``; its frames enter that stream like any camera's. WHEP: a viewer
POSTs to ``/whep/{stream_id}`` and receives the stream's *redacted* frames, taken from the same
hook that feeds the outputs, after the redaction stage; there is no route to a source frame.
Both answer ``201`` with the SDP answer and a ``Location`` to DELETE; trickle ICE (PATCH) is
not supported and answers ``405``, as the specs allow.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import numpy as np
from aiohttp import web

from stream.frames import Frame
from stream.pipeline import Pipeline, StreamRunner
from stream.webrtc.ice import IceConfig
from stream.webrtc.whep import FrameFeed, WhepPlayback
from stream.webrtc.whip import MAX_SDP_BYTES, OfferError, WhipIngest

log = logging.getLogger(__name__)

GATEWAY = web.AppKey("rtc_gateway", "RtcGateway")
SDP = "application/sdp"
OFFER_TIMEOUT_S = 15.0
"""an offer not answered by then gets 503: no HTTP request waits on WebRTC forever"""


def _text(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)


class RtcGateway:
    """One per process: a frame feed per stream, the WHIP publishers and the WHEP viewers."""

    def __init__(self, pipeline: Pipeline, ice: IceConfig | None = None) -> None:
        self.pipeline = pipeline
        self.whip = WhipIngest(ice)
        self.whep = WhepPlayback(ice)
        self.feeds: dict[str, FrameFeed] = {}
        self.loop = asyncio.get_running_loop()
        pipeline.on_stream_added.append(self._attach)
        pipeline.on_stream_removed.append(self._detach)
        for runner in list(pipeline.streams.values()):
            self._attach(runner)

    def _attach(self, runner: StreamRunner) -> None:
        feed = FrameFeed(runner.id)
        self.feeds[runner.id] = feed

        def push(frame: Frame, image: np.ndarray, _dets: object) -> None:
            feed.push(image, frame.captured_at)  # the painted (or blanked) frame, nothing earlier

        runner.on_redacted.append(push)

    def _detach(self, stream_id: str) -> None:
        feed = self.feeds.pop(stream_id, None)
        if feed is not None:
            feed.close()
        asyncio.run_coroutine_threadsafe(self._close_stream(stream_id), self.loop)

    async def _close_stream(self, stream_id: str) -> None:
        await self.whep.close_stream(stream_id)
        publisher = self.whip.publisher(stream_id)
        if publisher is not None:
            log.info("stream %s removed: closing its WHIP publisher", stream_id)
            await self.whip.delete(publisher.id)

    async def close(self) -> None:
        await self.whip.close_all()
        await self.whep.close_all()

    # -- HTTP -------------------------------------------------------------------------------------
    @staticmethod
    async def _offer(request: web.Request) -> str | web.Response:
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != SDP:
            return _text(415, f"send the SDP offer with Content-Type: {SDP}")
        if request.content_length is not None and request.content_length > MAX_SDP_BYTES:
            return _text(413, f"SDP offer larger than {MAX_SDP_BYTES} bytes")
        raw = await request.content.read(MAX_SDP_BYTES + 1)
        if len(raw) > MAX_SDP_BYTES:
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
            return _text(getattr(e, "http_status", 400), str(e))
        except TimeoutError:
            log.error("%s offer for %s not answered within %g s", kind.upper(),
                      request.match_info["stream_id"], OFFER_TIMEOUT_S)
            return _text(503, f"the {kind.upper()} offer could not be answered within {OFFER_TIMEOUT_S:g} s; "
                              "try again")
        sid = request.match_info["stream_id"]
        return web.Response(status=201, text=answer, content_type=SDP,
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
        return await self._negotiate(request, "whep", lambda sdp: self.whep.offer(sid, sdp, feed))

    async def whip_delete(self, request: web.Request) -> web.Response:
        if not await self.whip.delete(request.match_info["session"]):
            return _text(404, "no such WHIP session")
        return web.Response(status=200)

    async def whep_delete(self, request: web.Request) -> web.Response:
        if not await self.whep.delete(request.match_info["session"]):
            return _text(404, "no such WHEP session")
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
