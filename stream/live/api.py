"""The control API: list, add, inspect and remove streams at run time (REST + JSON, OpenAPI at /openapi.json).

Every request body is validated with the same pydantic models as the config file, so an API
error reads like a config error (``source.url: ... is not an RTSP URL``). Adding or removing a
stream starts or stops only that stream's threads; the others never notice. Bodies are JSON
objects of at most ``MAX_BODY`` bytes; every failure is a 4xx with ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from aiohttp import web
from pydantic import ValidationError

from stream import __version__
from stream.config import (
    MAX_DEPTH,
    ApiConfig,
    FileOutputConfig,
    RecordOutputConfig,
    RtspOutputConfig,
    RtspSourceConfig,
    StreamConfig,
    format_errors,
)
from stream.core.urls import mask_url
from stream.events.audit import AuditLog, masked
from stream.live import shard as sharding
from stream.live.auth import FRONT_HEADER, PEER_HEADER, Authenticator, Refusal, required_role
from stream.live.httpbody import BodyTooLarge, read_limited
from stream.live.pipeline import Pipeline, StreamLimit
from stream.live.throttle import LoginThrottle
from stream.live.users import User
from stream.live.webrtc.session import REQUESTER, Requester

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
PROTECTED = ("/api/", "/whip/", "/whep/")
AUTH = web.AppKey("auth", Authenticator)
AUDIT = web.AppKey("audit", AuditLog)
THROTTLE = web.AppKey("login_throttle", LoginThrottle)
_KEY = getattr(web, "RequestKey", None)  # aiohttp >= 3.12 types request storage; older ones take names
USER: Any = _KEY("user", User) if _KEY is not None else "user"
"""``request[USER]``: who made an authenticated request (a :class:`User`)"""
PEER: Any = _KEY("peer", str) if _KEY is not None else "peer"
"""``request[PEER]``: the address it came from (behind ``run --workers N``'s front, the front's word)"""
PIPE = web.AppKey("api_pipeline", Pipeline)
ALLOW_FILES = web.AppKey("allow_file_sources", bool)
ADDING = web.AppKey("adding", asyncio.Lock)


def error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def audit(request: web.Request, action: str, **fields: Any) -> None:
    """Record ``action`` in the audit log (when there is one) as done by the request's user, from
    its address: ``audit(request, "audit.zones.changed", stream_id=..., old=..., new=...)``."""
    log_ = request.app.get(AUDIT)
    if log_ is None:
        return
    user: User | None = request.get(USER)
    who = {"role": user.role} if user is not None else {}
    log_.record(action, user.name if user is not None else None, **who,
                address=request.get(PEER, request.remote), **fields)


def _refused(request: web.Request, refusal: Refusal, action: str) -> web.Response:
    route = required_role(request.method, request.path)[1]
    if action == "audit.login.refused":
        audit(request, action, reason=refusal.reason, claimed_user=refusal.claimed, method=request.method,
              route=route)
    else:
        audit(request, action, reason=refusal.reason, method=request.method, route=route)
    resp = error(refusal.status, refusal.message)
    if refusal.status == 401:
        invalid = ', error="invalid_token"' if refusal.reason == "expired token" else ""
        resp.headers["WWW-Authenticate"] = f'Bearer realm="stream-redact"{invalid}'
    return resp


def protect(*prefixes: str) -> Any:
    """Middleware: who is calling (401 unknown, 403 wrong token), and whether their role may call
    this route (403 naming the role needed); every refusal is audited, never with the token.

    The user goes on the request (``request[USER]``, the address it came from on ``request[PEER]``)
    and, for WebRTC sessions, into :data:`REQUESTER`."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "OPTIONS" or not request.path.startswith(prefixes):
            return await handler(request)
        authn = request.app[AUTH]
        peer = authn.peer(request.remote, request.headers.get(PEER_HEADER), request.headers.get(FRONT_HEADER))
        request[PEER] = peer
        throttle = request.app[THROTTLE]
        wait = throttle.wait_s(peer)
        # a throttled address still gets in with a token already verified (an operator at work behind
        # the same NAT), but costs no hashing and no audit line per guess
        who = await authn.authenticate(request.headers, peer, cached_only=wait is not None)
        if isinstance(who, Refusal) and wait is not None:
            if throttle.first_wait(peer):
                audit(request, "audit.login.refused", reason="throttled", claimed_user=None,
                      method=request.method, route=required_role(request.method, request.path)[1])
            resp = error(429, f"too many refused logins from {peer} in the last {throttle.window_s:.0f} s; "
                              f"retry in {wait:.0f} s with a valid token")
            resp.headers["Retry-After"] = str(round(wait))
            return resp
        if isinstance(who, Refusal):
            throttle.refused(peer)
            return _refused(request, who, "audit.login.refused")
        request[USER] = who
        denied = authn.authorize(who, request.method, request.path)
        if denied is not None:
            return _refused(request, denied, "audit.access.refused")
        token = REQUESTER.set(Requester(who.name, who.role, peer))
        try:
            return await handler(request)
        finally:
            REQUESTER.reset(token)

    return middleware


def json_depth(raw: bytes) -> int:
    """How deep the brackets of a JSON text nest (strings skipped), without parsing it: a deep
    ``[[[...`` would exhaust the parser's recursion before any size check could help."""
    if not raw:
        return 0
    unescaped = re.sub(rb"\\.", b"", raw, flags=re.DOTALL)  # \" and \\ never open or close a string
    b = np.frombuffer(unescaped, dtype=np.uint8)
    quote = b == ord('"')
    inside = (np.cumsum(quote) - quote) % 2 == 1
    step = np.where(inside, 0, np.isin(b, (ord("["), ord("{"))).astype(np.int64)
                    - np.isin(b, (ord("]"), ord("}"))).astype(np.int64))
    return int(np.cumsum(step).max(initial=0))


async def _json_body(request: web.Request,
                     expected: str = "the stream: {\"id\": ..., \"source\": {...}}") -> dict[str, Any]:
    """The request's JSON object, size- and depth-checked; ``expected`` says what it should hold."""
    try:
        raw = await read_limited(request, MAX_BODY)
    except BodyTooLarge:
        raise _Bad(413, f"body larger than {MAX_BODY} bytes; a stream definition is a few hundred") from None
    if b"${" in raw:
        raise _Bad(400, "'${' is not allowed in API requests: environment variables are expanded only in the "
                        "config file; write the value itself")
    if json_depth(raw) > MAX_DEPTH:
        raise _Bad(400, f"body nests deeper than {MAX_DEPTH} levels; a stream definition needs about 4")
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8" if isinstance(
            e, UnicodeDecodeError) else "nested too deeply"
        raise _Bad(400, f"body is not valid JSON ({why}); send a JSON object") from None
    if not isinstance(body, dict):
        raise _Bad(400, f"body must be a JSON object describing {expected}")
    return body


class _Bad(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def list_streams(request: web.Request) -> web.Response:
    p = request.app[PIPE]
    doc: dict[str, Any] = {"streams": [r.status() for r in list(p.streams.values())]}
    if p.cluster is not None:  # where the rest of the cluster's streams run, as each worker says
        members = p.cluster.members.live(p.cluster.live_window_s)
        doc["cluster"] = {"worker": p.cluster.member_id, "members": [
            {"worker": n, "address": m["address"], "streams": m["streams"],
             "partitions": len(m["partitions"])} for n, m in sorted(members.items())]}
    return web.json_response(doc)


def cluster_redirect() -> Any:
    """Middleware (cluster mode): a request naming a stream that runs on another worker is
    redirected there with 307 (method and body kept), after this worker checked who is calling;
    while the stream has no owner (it is moving) the answer is 503 with Retry-After. Removing a
    stream (``DELETE /api/streams/{id}``) is the cluster's business and answered here."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        p = request.app[PIPE]
        member = p.cluster
        sid = request.match_info.get("stream_id")
        if member is None or not sid or sid in p.streams or sid not in member.book.current():
            return await handler(request)
        if request.method == "DELETE" and request.path.rstrip("/") == f"/api/streams/{sid}":
            return await handler(request)
        owner = member.locate(sid)
        partition = member.owner_partition(sid)
        if owner is None or owner["member"] == member.member_id:
            resp = error(503, f"stream {sid!r} is moving between workers of the cluster (assignments "
                              f"partition {partition} has no running owner yet); retry in a few seconds",
                         partition=partition)
            resp.headers["Retry-After"] = "2"
            return resp
        location = owner["address"] + request.path_qs
        return web.json_response(
            {"error": f"stream {sid!r} runs on worker {owner['member']}; repeat the request there",
             "worker": owner["member"], "location": location, "partition": partition},
            status=307, headers={"Location": location})

    return middleware


async def get_stream(request: web.Request) -> web.Response:
    sid = request.match_info["stream_id"]
    p = request.app[PIPE]
    runner = p.streams.get(sid)  # in cluster mode one that runs elsewhere was redirected (cluster_redirect)
    if runner is None:
        return error(404, f"no stream {sid!r}; GET /api/streams lists them")
    return web.json_response(runner.status())


def _in_output_dir(body: dict[str, Any], api: ApiConfig) -> dict[str, Any]:
    """Relative file-output paths (and record-output dirs) of an API body, taken relative to
    ``api.file_output_dir``."""
    outputs = body.get("outputs")
    if api.file_output_dir is None or not isinstance(outputs, list):
        return body
    fixed = []
    for o in outputs:
        kind = o.get("type") if isinstance(o, dict) else None
        key = {"file": "path", "record": "dir"}.get(kind) if isinstance(kind, str) else None
        if key is not None and isinstance(o.get(key), str) and not os.path.isabs(o[key]):
            o = {**o, key: str(api.file_output_dir / o[key])}
        fixed.append(o)
    return {**body, "outputs": fixed}


def _file_output_problem(cfg: StreamConfig, api: ApiConfig, p: Pipeline) -> tuple[int, str] | None:
    """Why an API stream may not write its file outputs, or None: only under the one configured
    folder, never over an existing file, never where another stream (config ones too) records.
    Record outputs too go only under that folder (each stream in its own DIR/STREAM_ID)."""
    records = [o for o in cfg.outputs if isinstance(o, RecordOutputConfig)]
    if records and (not api.allow_file_outputs or api.file_output_dir is None):
        return 403, ("record outputs cannot be added through the API (api.allow_file_outputs is off); add "
                     "the recording in the config, or set api.allow_file_outputs and api.file_output_dir")
    for o in records:
        assert api.file_output_dir is not None
        root, folder = Path(os.path.realpath(api.file_output_dir)), Path(os.path.realpath(o.dir))
        if folder != root and root not in folder.parents:
            return 403, (f"record output dir {o.dir.name!r} is outside api.file_output_dir; give a folder "
                         "name (it is made there) or leave dir as api.file_output_dir itself")
    outputs = [o for o in cfg.outputs if isinstance(o, FileOutputConfig)]
    if not outputs:
        return None
    if not api.allow_file_outputs or api.file_output_dir is None:
        return 403, ("file outputs cannot be added through the API (api.allow_file_outputs is off); add "
                     "an rtsp output, or the recording in the config")
    root = Path(os.path.realpath(api.file_output_dir))
    mine = cfg.file_paths()
    if len(set(mine)) < len(mine):
        return 409, "two file outputs of this stream name the same file; give each its own path"
    taken = {path: s.id for s in [*p.config.streams, *(r.config for r in list(p.streams.values()))]
             for path in s.file_paths()}
    for o, path in zip(outputs, mine, strict=True):
        if path.parent != root and root not in path.parents:
            return 403, (f"file output {o.path.name!r} is outside api.file_output_dir; give a file name "
                         "(it is written there)")
        if os.path.lexists(o.path) or os.path.lexists(path):
            return 409, f"file output {path.name!r} exists already; API recordings never overwrite a file"
        if path in taken:
            return 409, (f"file output {path.name!r} is stream {taken[path]!r}'s recording; choose another "
                         "name")
    return None


def _allowed(addr: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in networks)


async def _host_problem(cfg: StreamConfig, api: ApiConfig) -> str | None:
    """Why this worker may not connect where an API stream says (api.allowed_source_networks)."""
    urls = [x.url for x in (cfg.source, *cfg.outputs) if isinstance(x, RtspSourceConfig | RtspOutputConfig)]
    if not urls:
        return None
    names = {e.lower().rstrip(".") for e in api.allowed_source_networks if "/" not in e and not _is_ip(e)}
    networks = [ipaddress.ip_network(e, strict=False) for e in api.allowed_source_networks
                if "/" in e or _is_ip(e)]
    loop = asyncio.get_running_loop()
    for url in urls:
        host = (urlsplit(url).hostname or "").rstrip(".")
        if host.lower() in names:
            continue
        if _is_ip(host):
            addrs = [host]
        else:
            try:
                infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), 5)
            except (OSError, TimeoutError):
                return f"host {host!r} does not resolve; check the name or use an IP address"
            addrs = sorted({str(info[4][0]) for info in infos})
        refused = [a for a in addrs if not _allowed(a, networks)]
        if refused:
            return (f"{host} ({', '.join(refused)}) is outside api.allowed_source_networks; API streams may "
                    "only reach the networks listed there (add the camera's network or name to it)")
    return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


async def add_stream(request: web.Request) -> web.Response:
    p = request.app[PIPE]
    api = p.config.api
    try:
        body = await _json_body(request)
    except _Bad as e:
        return error(e.status, str(e))
    try:
        cfg = StreamConfig.model_validate(_in_output_dir(body, api))
    except ValidationError as e:
        return error(400, "invalid stream", details=format_errors(e).split("\n  "))
    except RecursionError:
        return error(400, f"body nests deeper than {MAX_DEPTH} levels")
    if cfg.source.type == "file" and not request.app[ALLOW_FILES]:
        return error(403, "file sources cannot be added through the API (api.allow_file_sources is off); "
                          "add an rtsp source, or the file in the config")
    shard = p.shard
    if shard is not None and not shard.owns(cfg.id):  # every stream runs on exactly one worker
        return error(421, f"stream {cfg.id!r} belongs to {shard.owner_name(cfg.id)}, not to this worker "
                          f"(shard {shard.index} of {shard.count}); add it there",
                     shard=sharding.owner(cfg.id, shard.count), shard_count=shard.count)
    # (in cluster mode the consumer group places streams on the worker processes, not this hash)
    if (p.worker is not None and p.config.cluster.mode != "kafka"
            and sharding.worker_of(cfg.id, p.worker[1]) != p.worker[0]):
        index, count = p.worker
        other = sharding.worker_of(cfg.id, count)
        return error(421, f"stream {cfg.id!r} runs on worker {other}, not on this "
                          f"worker process ({index} of {count}); send it to the supervisor's address",
                     worker=other, workers=count)
    if cfg.id in p.streams or (p.cluster is not None and cfg.id in p.cluster.book.current()):
        return error(409, f"stream {cfg.id!r} already exists; DELETE /api/streams/{cfg.id} first or use "
                          "another id")
    why_host = await _host_problem(cfg, api)
    if why_host is not None:
        return error(403, why_host)
    loop = asyncio.get_running_loop()
    async with request.app[ADDING]:  # the output-path check and the add are one step
        why_file = _file_output_problem(cfg, api, p)
        if why_file is not None:
            return error(*why_file)
        if p.cluster is not None:
            return await _cluster_add(request, cfg)
        try:
            runner = await loop.run_in_executor(None, lambda: p.add_stream(cfg, limit=api.max_streams))
        except StreamLimit as e:
            resp = error(429, str(e))
            resp.headers["Retry-After"] = "10"
            return resp
        except ValueError as e:
            return error(409, str(e))
    log.info("stream %s added through the API", cfg.id)
    audit(request, "audit.stream.added", stream_id=cfg.id, stream=masked(cfg.model_dump(mode="json")))
    resp = web.json_response(runner.status(), status=201)
    resp.headers["Location"] = f"/api/streams/{cfg.id}"
    return resp


def _credentials(cfg: StreamConfig) -> bool:
    """A URL of the stream holds something the logs would mask (user info, query values)."""
    urls = [getattr(cfg.source, "url", None), *(getattr(o, "url", None) for o in cfg.outputs)]
    return any(u and mask_url(u) != u for u in urls)


async def _cluster_add(request: web.Request, cfg: StreamConfig) -> web.Response:
    """Cluster mode: the stream is defined for the whole cluster (the streams topic); its owner
    starts it, whichever worker that is."""
    member = request.app[PIPE].cluster
    if _credentials(cfg):
        return error(400, "in cluster mode a stream added through the API is stored in the cluster's streams "
                          "topic, and credentials are never stored there: give the camera a URL without "
                          "user:password or query values (e.g. credentials by network policy), or add it to "
                          "the config file with ${VARS}")
    try:
        await asyncio.to_thread(member.publish, cfg.id, cfg)
    except Exception as e:
        return error(503, f"the cluster's streams topic cannot be written ({type(e).__name__}); nothing was "
                          "added; retry when the brokers are reachable", retry_after=5)
    log.info("stream %s defined for the cluster through the API", cfg.id)
    audit(request, "audit.stream.added", stream_id=cfg.id, stream=masked(cfg.model_dump(mode="json")))
    partition = member.owner_partition(cfg.id)
    resp = web.json_response({"id": cfg.id, "state": "defined", "partition": partition,
                              "here": partition in member.owned}, status=202)
    resp.headers["Location"] = f"/api/streams/{cfg.id}"
    return resp


async def remove_stream(request: web.Request) -> web.Response:
    sid = request.match_info["stream_id"]
    p = request.app[PIPE]
    if p.cluster is not None:
        if sid not in p.cluster.book.current():
            return error(404, f"no stream {sid!r} in the cluster; GET /api/streams on each worker lists them")
        try:
            await asyncio.to_thread(p.cluster.publish, sid, None)
        except Exception as e:
            return error(503, f"the cluster's streams topic cannot be written ({type(e).__name__}); nothing "
                              "was removed; retry when the brokers are reachable")
        log.info("stream %s removed from the cluster through the API", sid)
        await asyncio.to_thread(p.zone_store.forget, sid)
        audit(request, "audit.stream.removed", stream_id=sid)
        return web.json_response({"id": sid, "state": "removed"}, status=202)
    runner = p.streams.get(sid)
    if runner is None:
        return error(404, f"no stream {sid!r}; GET /api/streams lists them")
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, p.remove_stream, sid)
    except KeyError:
        return error(404, f"no stream {sid!r}")
    log.info("stream %s removed through the API", sid)
    await asyncio.to_thread(p.zone_store.forget, sid)  # removed on purpose: its saved zones go too
    audit(request, "audit.stream.removed", stream_id=sid,
          stream=masked(runner.config.model_dump(mode="json")))
    return web.Response(status=204)


async def audit_records(request: web.Request) -> web.Response:
    """The audit records this process wrote lately (admin): ``?since=SEQ`` those after a seq."""
    log_ = request.app.get(AUDIT)
    if log_ is None:
        return error(404, "no audit log is configured; set audit.path in the config")
    try:
        since = int(request.query.get("since", "0"))
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        return error(400, "since and limit must be whole numbers (since: the last seq you have)")
    if since < 0 or not 1 <= limit <= 1000:
        return error(400, "since must be >= 0 and limit between 1 and 1000")
    await asyncio.get_running_loop().run_in_executor(None, log_.flush, 2.0)
    return web.json_response({"file": log_.path.name, "records": log_.since(since, limit)})


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
    zones = {"type": "object", "required": ["zones"], "additionalProperties": False,
             "properties": {"zones": {"type": "array", "items": {"$ref": "#/components/schemas/ZoneConfig"}}}}
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
                             "421": err, "429": err}},
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
            "/api/audit": {
                "get": {"summary": "Recent audit records of this process (role admin)",
                        "operationId": "getAudit",
                        "parameters": [
                            {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                            {"name": "limit", "in": "query",
                             "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
                        "responses": {"200": {"description": "records", "content": {"application/json": {
                            "schema": {"type": "object", "properties": {
                                "file": {"type": "string"},
                                "records": {"type": "array", "items": {"type": "object"}}}}}}},
                            "400": err, "401": err, "403": err, "404": err}},
            },
            "/api/streams/{stream_id}/zones": {
                "parameters": [sid_param],
                "get": {"summary": "A stream's privacy zones", "operationId": "getZones",
                        "responses": {"200": {"description": "zones", "content": {"application/json": {
                            "schema": zones}}}, "401": err, "403": err, "404": err}},
                "put": {"summary": "Replace a stream's privacy zones (painted from the next frame on)",
                        "operationId": "putZones",
                        "requestBody": {"required": True, "content": {"application/json": {"schema": zones}}},
                        "responses": {"200": {"description": "the zones now painted", "content": {
                            "application/json": {"schema": zones}}},
                            "400": err, "401": err, "403": err, "404": err, "413": err, "507": err}},
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


def add_routes(app: web.Application, pipeline: Pipeline, authn: Authenticator, allow_file_sources: bool,
               audit_log: AuditLog | None = None) -> None:
    app[PIPE] = pipeline
    app[AUTH] = authn
    app[THROTTLE] = LoginThrottle()
    if audit_log is not None:
        app[AUDIT] = audit_log
    app[ALLOW_FILES] = allow_file_sources
    app[ADDING] = asyncio.Lock()
    app.middlewares.append(protect(*PROTECTED))
    app.middlewares.append(cluster_redirect())  # inside protect: only callers it let in learn addresses
    app.router.add_get("/api/streams", list_streams)
    app.router.add_post("/api/streams", add_stream)
    app.router.add_get("/api/streams/{stream_id}", get_stream)
    app.router.add_delete("/api/streams/{stream_id}", remove_stream)
    app.router.add_get("/api/audit", audit_records)
    app.router.add_get("/openapi.json", openapi)
    from stream.live.zones_api import add_zone_routes  # it builds on this module's helpers

    add_zone_routes(app)
