"""The pipeline's HTTP side: ``/metrics``, ``/healthz``, ``/readyz`` and the control API (stream.api).

Liveness says the process is not wedged (the batcher thread runs); readiness says it can do its
job (a detector is loaded and healthy), so an orchestrator stops sending viewers to a worker
whose detector is being rebuilt but does not restart it for that.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from stream.api import MAX_BODY, add_routes
from stream.auth import Tokens
from stream.pipeline import Pipeline
from stream.rtc import RtcGateway

PIPELINE = web.AppKey("pipeline", Pipeline)


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
                                 "Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; "
                                                            "connect-src 'self'"})


def make_app(pipeline: Pipeline, tokens: Tokens | None = None, allow_file_sources: bool = False,
             gateway: RtcGateway | None = None) -> web.Application:
    """Metrics and health are open (they hold no secrets); the control API needs a token."""
    app = web.Application(client_max_size=MAX_BODY)
    app[PIPELINE] = pipeline
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", page)
    add_routes(app, pipeline, tokens or Tokens(), allow_file_sources)
    if gateway is not None:
        gateway.add_routes(app)
    return app


async def start_http(pipeline: Pipeline, host: str, port: int, tokens: Tokens | None = None,
                     allow_file_sources: bool = False,
                     gateway: RtcGateway | None = None) -> tuple[web.AppRunner, int]:
    """Serve the app; returns the runner (to clean up) and the bound port (``port`` may be 0)."""
    runner = web.AppRunner(make_app(pipeline, tokens, allow_file_sources, gateway), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror}); choose another http.port") from None
    server = site._server
    bound = server.sockets[0].getsockname()[1] if server is not None and server.sockets else port
    return runner, bound
