"""The control API: list, add, inspect and remove streams at run time (REST + JSON, OpenAPI at /openapi.json).

Every request body is validated with the same pydantic models as the config file, so an API
error reads like a config error (``source.url: ... is not an RTSP URL``). Adding or removing a
stream starts or stops only that stream's threads; the others never notice. Bodies are JSON
objects of at most ``MAX_BODY`` bytes; every failure is a 4xx with ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from stream import __version__
from stream import shard as sharding
from stream.auth import Tokens
from stream.config import StreamConfig, format_errors
from stream.pipeline import Pipeline

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
PROTECTED = ("/api/", "/whip/", "/whep/")
TOKENS = web.AppKey("tokens", Tokens)
PIPE = web.AppKey("api_pipeline", Pipeline)
ALLOW_FILES = web.AppKey("allow_file_sources", bool)


def error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def protect(*prefixes: str) -> Any:
    """Middleware: bearer token required on paths under ``prefixes`` (401 missing, 403 wrong)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "OPTIONS" and request.path.startswith(prefixes):
            why = request.app[TOKENS].check(request.headers.get("Authorization"))
            if why is not None:
                status = 403 if why == "invalid token" else 401
                resp = error(status, why)
                if status == 401:
                    resp.headers["WWW-Authenticate"] = 'Bearer realm="stream-redact"'
                return resp
        return await handler(request)

    return middleware


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=len(raw))
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise _Bad(400, f"body is not valid JSON ({why}); send a JSON object") from None
    if not isinstance(body, dict):
        raise _Bad(400, "body must be a JSON object describing the stream: {\"id\": ..., \"source\": {...}}")
    return body


class _Bad(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def list_streams(request: web.Request) -> web.Response:
    p = request.app[PIPE]
    return web.json_response({"streams": [r.status() for r in list(p.streams.values())]})


async def get_stream(request: web.Request) -> web.Response:
    sid = request.match_info["stream_id"]
    runner = request.app[PIPE].streams.get(sid)
    if runner is None:
        return error(404, f"no stream {sid!r}; GET /api/streams lists them")
    return web.json_response(runner.status())


async def add_stream(request: web.Request) -> web.Response:
    try:
        body = await _json_body(request)
    except _Bad as e:
        return error(e.status, str(e))
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"body larger than {MAX_BODY} bytes")
    try:
        cfg = StreamConfig.model_validate(body)
    except ValidationError as e:
        return error(400, "invalid stream", details=format_errors(e).split("\n  "))
    if cfg.source.type == "file" and not request.app[ALLOW_FILES]:
        return error(403, "file sources cannot be added through the API (api.allow_file_sources is off); "
                          "add an rtsp source, or the file in the config")
    p = request.app[PIPE]
    shard = p.shard
    if shard is not None and not shard.owns(cfg.id):  # every stream runs on exactly one worker
        return error(421, f"stream {cfg.id!r} belongs to {shard.owner_name(cfg.id)}, not to this worker "
                          f"(shard {shard.index} of {shard.count}); add it there",
                     shard=sharding.owner(cfg.id, shard.count), shard_count=shard.count)
    if cfg.id in p.streams:
        return error(409, f"stream {cfg.id!r} already exists; DELETE /api/streams/{cfg.id} first or use "
                          "another id")
    loop = asyncio.get_running_loop()
    try:
        runner = await loop.run_in_executor(None, p.add_stream, cfg)
    except ValueError as e:
        return error(409, str(e))
    log.info("stream %s added through the API", cfg.id)
    resp = web.json_response(runner.status(), status=201)
    resp.headers["Location"] = f"/api/streams/{cfg.id}"
    return resp


async def remove_stream(request: web.Request) -> web.Response:
    sid = request.match_info["stream_id"]
    p = request.app[PIPE]
    if sid not in p.streams:
        return error(404, f"no stream {sid!r}; GET /api/streams lists them")
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, p.remove_stream, sid)
    except KeyError:
        return error(404, f"no stream {sid!r}")
    log.info("stream %s removed through the API", sid)
    return web.Response(status=204)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for the control API; the stream schema is the config model's own."""
    stream_schema = StreamConfig.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = stream_schema.pop("$defs", {})
    err = {"description": "error",
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    status = {"type": "object", "additionalProperties": True,
              "properties": {"id": {"type": "string"}, "state": {"type": "string"}}}
    sid_param = {"name": "stream_id", "in": "path", "required": True,
                 "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "stream-redact control API", "version": __version__,
                 "description": "Live streams of a stream-redact worker. Bearer token required."},
        "security": [{"bearer": []}],
        "paths": {
            "/api/streams": {
                "get": {"summary": "List streams", "operationId": "listStreams",
                        "responses": {"200": {"description": "streams", "content": {"application/json": {
                            "schema": {"type": "object", "properties": {
                                "streams": {"type": "array", "items": status}}}}}},
                            "401": err, "403": err}},
                "post": {"summary": "Add a stream", "operationId": "addStream",
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": {"$ref": "#/components/schemas/StreamConfig"}}}},
                         "responses": {"201": {"description": "added", "content": {"application/json": {
                             "schema": status}}},
                             "400": err, "401": err, "403": err, "409": err, "413": err,
                             "421": err}},
            },
            "/api/streams/{stream_id}": {
                "parameters": [sid_param],
                "get": {"summary": "A stream's status", "operationId": "getStream",
                        "responses": {"200": {"description": "status", "content": {"application/json": {
                            "schema": status}}}, "401": err, "403": err, "404": err}},
                "delete": {"summary": "Remove a stream", "operationId": "removeStream",
                           "responses": {"204": {"description": "removed"}, "401": err, "403": err,
                                         "404": err}},
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                **defs,
                "StreamConfig": stream_schema,
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"},
                                         "details": {"type": "array", "items": {"type": "string"}}}},
            },
        },
    }


def add_routes(app: web.Application, pipeline: Pipeline, tokens: Tokens, allow_file_sources: bool) -> None:
    app[PIPE] = pipeline
    app[TOKENS] = tokens
    app[ALLOW_FILES] = allow_file_sources
    app.middlewares.append(protect(*PROTECTED))
    app.router.add_get("/api/streams", list_streams)
    app.router.add_post("/api/streams", add_stream)
    app.router.add_get("/api/streams/{stream_id}", get_stream)
    app.router.add_delete("/api/streams/{stream_id}", remove_stream)
    app.router.add_get("/openapi.json", openapi)
