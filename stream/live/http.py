"""The pipeline's HTTP side: ``/metrics``, ``/healthz``, ``/readyz`` and the control API (stream.live.api).

Liveness says the process is not wedged (the batcher thread runs); readiness says it can do its
job (a detector is loaded and healthy), so an orchestrator stops sending viewers to a worker
whose detector is being rebuilt but does not restart it for that.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from prometheus_client import CONTENT_TYPE_LATEST

from stream.events.audit import AuditLog
from stream.live.api import MAX_BODY, add_routes
from stream.live.auth import Authenticator, Tokens
from stream.live.pipeline import Pipeline
from stream.live.rtc import RtcGateway

log = logging.getLogger(__name__)

PIPELINE = web.AppKey("pipeline", Pipeline)
MAX_HEADER_BYTES = 8190
"""longest request line or header value; aiohttp's own limit, refused here without quoting it"""


async def metrics(request: web.Request) -> web.Response:
    body = request.app[PIPELINE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    p = request.app[PIPELINE]
    ok = p.started and p.batcher.alive
    return web.json_response({"status": "ok" if ok else "failing"}, status=200 if ok else 503)


async def readyz(request: web.Request) -> web.Response:
    p = request.app[PIPELINE]
    body = p.status()
    return web.json_response(body, status=200 if body["ready"] else 503)


WEB = Path(__file__).with_name("web")
PAGES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


async def page(request: web.Request) -> web.Response:
    """The control-room page and its two assets: static, no data in them, so no token needed."""
    name = request.match_info.get("name", "index.html")
    if name not in PAGES:
        raise web.HTTPNotFound(text="no such page")
    return web.Response(body=(WEB / name).read_bytes(), content_type=PAGES[name],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                                 "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                                 "Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; "
                                                            "connect-src 'self'; frame-ancestors 'none'"})


def make_app(pipeline: Pipeline, tokens: Tokens | Authenticator | None = None,
             allow_file_sources: bool = False, gateway: RtcGateway | None = None,
             audit_log: AuditLog | None = None) -> web.Application:
    """Metrics and health are open (they hold no secrets); the control API needs a token (shared
    ``Tokens`` act as admin; an :class:`Authenticator` knows users and roles too). With
    ``audit_log``, viewing, stream and zone changes and refused requests are recorded there."""
    authn = tokens if isinstance(tokens, Authenticator) else Authenticator(tokens or Tokens())
    app = web.Application(client_max_size=MAX_BODY)
    app[PIPELINE] = pipeline
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", page)
    add_routes(app, pipeline, authn, allow_file_sources, audit_log)
    if gateway is not None:
        gateway.add_routes(app)
    if audit_log is not None:
        from stream.live.webrtc.session import audit_sessions

        if gateway is not None:
            audit_sessions(gateway.whep, audit_log, "view")
            audit_sessions(gateway.whip, audit_log, "publish")
    return app


class QuietRequestHandler(web.RequestHandler):
    """A malformed request gets a plain status and reason: aiohttp's own error text quotes the first
    100 bytes of the offending line, which for an oversized ``Authorization`` header is the token."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong):
            status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            why = f"a request line or header is longer than {MAX_HEADER_BYTES} bytes; send shorter headers"
        else:
            why = "malformed HTTP request"
        log.warning("refused a malformed HTTP request from %s (%s)", request.remote, type(exc).__name__)
        resp = web.Response(status=status, text=f"{int(status)} {HTTPStatus(status).phrase}: {why}\n")
        resp.force_close()
        return resp


class QuietSite(web.BaseSite):
    """A TCP site whose connections use :class:`QuietRequestHandler`; knows the port it bound.

    It keeps its own listening socket (aiohttp has no public hook for the handler class of its
    ``TCPSite``), so it touches none of ``BaseSite``'s private state."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        super().__init__(runner)
        self.host, self.port = host, port
        self._app_runner = runner
        self._listener: asyncio.Server | None = None

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        manager = self._app_runner.server
        assert manager is not None, "runner.setup() first"

        def protocol() -> QuietRequestHandler:
            return QuietRequestHandler(manager, loop=loop, access_log=None, max_line_size=MAX_HEADER_BYTES,
                                       max_field_size=MAX_HEADER_BYTES)

        self._listener = await loop.create_server(protocol, self.host, self.port, reuse_address=True)
        self.port = self._listener.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner closes the open ones
        await super().stop()


async def start_http(pipeline: Pipeline, host: str, port: int, tokens: Tokens | Authenticator | None = None,
                     allow_file_sources: bool = False, gateway: RtcGateway | None = None,
                     audit_log: AuditLog | None = None) -> tuple[web.AppRunner, int]:
    """Serve the app; returns the runner (to clean up) and the bound port (``port`` may be 0)."""
    return await serve_app(make_app(pipeline, tokens, allow_file_sources, gateway, audit_log), host, port)


async def serve_app(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on a :class:`QuietSite`; the runner (to clean up) and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = QuietSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror}); choose another http.port") from None
    return runner, site.port
