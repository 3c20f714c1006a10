"""The supervisor's public HTTP front for ``run --workers N``: one address for users and Prometheus.

Every stream runs on one stream-worker process (``shard.worker_of``), each with its own HTTP server on
127.0.0.1. The front forwards a request about one stream to its owner as it came (the workers
check the token, so the front holds none), fans the stream list, readiness and metrics out to
every worker and merges the answers, and serves the control-room page itself. A worker that is
down or does not answer costs its caller a 503 naming it, with ``Retry-After``, never a hang:
every call to a child has a connect and a total timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from stream.live.api import MAX_BODY, error
from stream.live.auth import FRONT_HEADER, PEER_HEADER
from stream.live.http import page, serve_app
from stream.live.shard import worker_of
from stream.live.webrtc.session import MAX_SDP_BYTES

log = logging.getLogger(__name__)

FORWARD_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=2)
"""a forwarded request: WHEP/WHIP signalling may take the worker up to its 15 s offer timeout"""
LIST_TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=2)
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2, sock_connect=2)
"""/readyz and /metrics of one child: an orchestrator's probe or a scrape must not wait on one"""
RETRY_AFTER_S = 5
BODY_CAP = max(MAX_BODY, MAX_SDP_BYTES) + 1
"""one byte over the largest body a worker takes: an oversized body still reaches the worker and
gets its own 413 (after its token check), without the front buffering more than that"""
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade"})
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect", "x-forwarded-for", "x-forwarded-proto",
                              PEER_HEADER.lower(), FRONT_HEADER.lower()}
"""a caller's own X-Stream-Redact-* headers never reach a worker: only the front says where a request
came from"""
NOT_RELAYED = HOP_BY_HOP | {"content-length"}
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
"""the worker sees the caller's headers, not ones the front's HTTP client would add"""


@dataclass(frozen=True)
class Child:
    """One process under the supervisor, as the front sees it."""

    name: str
    """``worker-0``, ``worker-1``, ..., ``detector``, ``events``"""
    kind: str
    """``worker``, ``detector`` or ``events``"""
    index: int | None
    """the worker's shard index (kind ``worker``), else None"""
    port: int | None
    """its HTTP port on 127.0.0.1; None while it is down or restarting"""
    pid: int | None = None
    """its process id while it runs (shown by ``/readyz``, for an operator's ``kill`` or ``py-spy``)"""


class Children(Protocol):
    """What the supervisor tells the front about its children, asked afresh on every request."""

    def children(self) -> list[Child]: ...

    @property
    def worker_count(self) -> int: ...

    def running(self, stream_id: str) -> int | None:
        """Cluster mode: the worker running ``stream_id`` as it last said (None: none here)."""
        ...


CHILDREN = web.AppKey("front_children", Children)
PEER_SECRET = web.AppKey("front_peer_secret", str)
CLIENT = web.AppKey("front_client", aiohttp.ClientSession)
REGISTRY = web.AppKey("front_registry", CollectorRegistry)
SCRAPE_ERRORS = web.AppKey("front_scrape_errors", Counter)

_SCRAPE_ERRORS: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def scrape_errors(registry: CollectorRegistry) -> Counter:
    """Failed scrapes of a child's /metrics, by child; one counter per registry, however many apps."""
    counter = _SCRAPE_ERRORS.get(registry)
    if counter is None:
        counter = _SCRAPE_ERRORS[registry] = Counter(
            "stream_redact_front_scrape_errors", "Scrapes of a child's /metrics that failed (it is left out)",
            ["worker"], registry=registry)
    return counter


@dataclass
class _Answer:
    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):
            return None


def _workers(children: Children) -> list[tuple[str, Child | None]]:
    """(name, child) of every worker slot in index order; child None when the supervisor lists none."""
    by_index = {c.index: c for c in children.children() if c.kind == "worker"}
    slots: list[tuple[str, Child | None]] = []
    for i in range(children.worker_count):
        child = by_index.get(i)
        slots.append((child.name if child is not None else f"worker-{i}", child))
    return slots


def _unavailable(why: str) -> web.Response:
    resp = error(503, f"{why}; retry in a few seconds")
    resp.headers["Retry-After"] = str(RETRY_AFTER_S)
    return resp


def _request_headers(request: web.Request) -> CIMultiDict[str]:
    """The caller's end-to-end headers (``Authorization`` among them), plus where the request came from."""
    named = {t.strip().lower() for v in request.headers.getall("Connection", []) for t in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in request.headers.items():
        if k.lower() not in NOT_FORWARDED and k.lower() not in named:
            out.add(k, v)
    chain = [*request.headers.getall("X-Forwarded-For", []), *([request.remote] if request.remote else [])]
    if chain:
        out["X-Forwarded-For"] = ", ".join(chain)
    out["X-Forwarded-Proto"] = request.scheme
    secret = request.app.get(PEER_SECRET)
    if secret and request.remote:  # the worker audits, and checks auth.proxy.trusted against, this address
        out[PEER_HEADER] = request.remote
        out[FRONT_HEADER] = secret
    return out


def _relay(answer: _Answer) -> web.Response:
    named = {t.strip().lower() for v in answer.headers.getall("Connection", []) for t in v.split(",")}
    headers: CIMultiDict[str] = CIMultiDict()
    for k, v in answer.headers.items():
        if k.lower() not in NOT_RELAYED and k.lower() not in named:
            headers.add(k, v)
    return web.Response(status=answer.status, reason=answer.reason, body=answer.body, headers=headers)


async def _read_body(request: web.Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < BODY_CAP:
        chunk = await request.content.read(BODY_CAP - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def _call(client: aiohttp.ClientSession, port: int, method: str, path_qs: str,
                timeout: aiohttp.ClientTimeout, headers: CIMultiDict[str] | None = None,
                body: bytes = b"") -> _Answer:
    url = URL(f"http://127.0.0.1:{port}{path_qs}", encoded=True)
    async with client.request(method, url, headers=headers, data=body or None, timeout=timeout,
                              allow_redirects=False, skip_auto_headers=SKIP_AUTO_HEADERS) as resp:
        return _Answer(resp.status, resp.reason, resp.headers, await resp.read())


async def _forward(request: web.Request, index: int, body: bytes) -> web.Response:
    """``request`` as it came to worker ``index``; its answer as it came, or a 503 naming the worker."""
    slots = _workers(request.app[CHILDREN])
    child = slots[index][1] if index < len(slots) else None
    what = _what(request)
    if child is None or child.port is None:
        return _unavailable(f"worker {index} is restarting")
    try:
        answer = await _call(request.app[CLIENT], child.port, request.method, request.raw_path,
                             FORWARD_TIMEOUT, _request_headers(request), body)
    except TimeoutError:
        log.warning("worker %d did not answer %s within %g s", index, what, FORWARD_TIMEOUT.total)
        return _unavailable(f"worker {index} did not answer within {FORWARD_TIMEOUT.total:g} s")
    except aiohttp.ClientError as e:
        log.warning("worker %d is not answering (%s on %s)", index, type(e).__name__, what)
        return _unavailable(f"worker {index} is not answering (restarting?)")
    return _relay(answer)


def _what(request: web.Request) -> str:
    """Method and route of a request, for a log line: ``POST /whep/{stream_id}`` (a path may name a
    WHEP session, which stays out of the log)."""
    resource = request.match_info.route.resource
    return f"{request.method} {resource.canonical if resource is not None else '?'}"


def _stream_id(body: bytes) -> str | None:
    """The ``id`` of a stream definition, or None when the body is not one (worker 0 says why)."""
    if len(body) >= BODY_CAP:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    sid = doc.get("id") if isinstance(doc, dict) else None
    return sid if isinstance(sid, str) else None


async def to_owner(request: web.Request) -> web.Response:
    """A request about one stream goes to the worker that runs it: the one of ``worker_of``, or in
    cluster mode the one the consumer group gave it to (a stream on no worker here goes to the one
    of ``worker_of``, which redirects to the pod that runs it, or says it is moving)."""
    body = await _read_body(request)
    children = request.app[CHILDREN]
    sid = request.match_info["stream_id"]
    here = children.running(sid)
    return await _forward(request, worker_of(sid, children.worker_count) if here is None else here, body)


async def add_stream(request: web.Request) -> web.Response:
    """A new stream goes to the worker that will own it; a body without an id to worker 0, whose
    validation answers as it would without the front."""
    body = await _read_body(request)
    sid = _stream_id(body)
    count = request.app[CHILDREN].worker_count
    return await _forward(request, 0 if sid is None else worker_of(sid, count), body)


async def to_first(request: web.Request) -> web.Response:
    """Every worker serves the same document."""
    return await _forward(request, 0, await _read_body(request))


async def _ask_all(request: web.Request, path_qs: str, timeout: aiohttp.ClientTimeout,
                   headers: CIMultiDict[str] | None) -> list[tuple[str, _Answer | None]]:
    """Each worker's answer, asked concurrently; None for one that is down or did not answer."""
    client = request.app[CLIENT]

    async def ask(name: str, child: Child | None) -> _Answer | None:
        if child is None or child.port is None:
            return None
        try:
            return await _call(client, child.port, "GET", path_qs, timeout, headers)
        except (TimeoutError, aiohttp.ClientError) as e:
            log.warning("%s did not answer GET %s (%s)", name, path_qs.split("?", 1)[0], type(e).__name__)
            return None

    slots = _workers(request.app[CHILDREN])
    answers = await asyncio.gather(*(ask(name, child) for name, child in slots))
    return [(name, a) for (name, _), a in zip(slots, answers, strict=True)]


async def list_streams(request: web.Request) -> web.Response:
    """Every worker's streams in one list, each with its ``worker``; workers that are down are listed
    under ``unavailable`` (a 503 only when none answers, so no one checked the token)."""
    answers = await _ask_all(request, request.raw_path, LIST_TIMEOUT, _request_headers(request))
    for _, a in answers:
        if a is not None and a.status in (401, 403):
            return _relay(a)
    streams: list[Any] = []
    unavailable: list[str] = []
    clusters: list[dict[str, Any]] = []
    for name, a in answers:
        doc = a.json() if a is not None and a.status == 200 else None
        if not isinstance(doc, dict) or not isinstance(doc.get("streams"), list):
            if a is not None:
                log.warning("%s answered GET /api/streams with %d and no stream list", name, a.status)
            unavailable.append(name)
            continue
        streams.extend({**s, "worker": name} if isinstance(s, dict) else s for s in doc["streams"])
        if isinstance(doc.get("cluster"), dict):  # cluster mode: every worker is a member of its own
            clusters.append(doc["cluster"])
    if len(unavailable) == len(answers):
        return _unavailable(f"no worker is answering ({', '.join(unavailable) or 'none started'})")
    body: dict[str, Any] = {"streams": streams, "unavailable": unavailable}
    if clusters:  # every worker reads the same members topic; the one that has read the most answers
        latest = max(clusters, key=lambda c: len(c.get("members") or ()))
        body["cluster"] = {"workers": [c.get("worker") for c in clusters], "members": latest.get("members")}
    return web.json_response(body)


async def audit_logs(request: web.Request) -> web.Response:
    """Every worker's audit records (admin; each worker keeps its own chain): ``{"logs": [{"worker",
    "file", "records"}], "unavailable": [...]}``. ``since`` counts in each worker's own file."""
    answers = await _ask_all(request, request.raw_path, LIST_TIMEOUT, _request_headers(request))
    for _, a in answers:
        if a is not None and a.status in (400, 401, 403):
            return _relay(a)
    logs: list[dict[str, Any]] = []
    unavailable: list[str] = []
    for name, a in answers:
        doc = a.json() if a is not None and a.status == 200 else None
        if isinstance(doc, dict) and isinstance(doc.get("records"), list):
            logs.append({"worker": name, "file": doc.get("file"), "records": doc["records"]})
        elif a is not None and a.status == 404:
            return _relay(a)  # no audit log configured: every worker says the same
        else:
            unavailable.append(name)
    if not logs:
        return _unavailable(f"no worker is answering ({', '.join(unavailable) or 'none started'})")
    return web.json_response({"logs": logs, "unavailable": unavailable})


async def healthz(request: web.Request) -> web.Response:
    """The front answers, so the supervisor runs (it restarts its children itself)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when every worker is up and ready; what the workers say, merged, and each worker's state."""
    answers = await _ask_all(request, "/readyz", PROBE_TIMEOUT, None)
    streams: list[Any] = []
    workers: list[dict[str, Any]] = []
    detectors: list[Any] = []
    events: list[dict[str, Any]] = []
    for name, a in answers:
        doc = a.json() if a is not None else None
        if not isinstance(doc, dict):
            workers.append({"name": name, "up": False, "ready": False})
            continue
        workers.append({"name": name, "up": True, "ready": doc.get("ready") is True})
        detectors.append(doc.get("detector"))
        if isinstance(doc.get("streams"), list):
            streams.extend({**s, "worker": name} if isinstance(s, dict) else s for s in doc["streams"])
        if isinstance(doc.get("events"), dict):
            events.append(doc["events"])
    ready = bool(workers) and all(w["ready"] for w in workers)
    body: dict[str, Any] = {"ready": ready,
                            "detector": "up" if detectors and all(d == "up" for d in detectors) else "down",
                            "streams": streams}
    if events:
        problems = [str(e["problem"]) for e in events if e.get("up") is not True and e.get("problem")]
        body["events"] = {"up": all(e.get("up") is True for e in events),
                          "problem": "; ".join(dict.fromkeys(problems)) or None}
    body["workers"] = workers
    body["processes"] = [{"name": c.name, "kind": c.kind, "pid": c.pid, "up": c.port is not None}
                         for c in request.app[CHILDREN].children()]
    return web.json_response(body, status=200 if ready else 503)


class MergedFamilies:
    """A prometheus collector of the families of several expositions: each child's samples get a
    ``worker`` label, and families of one name become one (one HELP and TYPE, as the format needs).

    A child's own ``worker`` label moves to ``exported_worker``, as Prometheus does on a clash."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def add(self, families: Iterable[Metric], child: str | None = None) -> None:
        for fam in families:
            samples = fam.samples if child is None else [s._replace(labels=_labelled(s.labels, child))
                                                         for s in fam.samples]
            merged = self._families.get(fam.name)
            if merged is None:
                merged = self._families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
            elif merged.type != fam.type:
                log.debug("%s: family %s is a %s here, a %s elsewhere; left out", child, fam.name, fam.type,
                          merged.type)
                continue
            merged.samples.extend(samples)

    def collect(self) -> Iterator[Metric]:
        return iter(list(self._families.values()))


def _labelled(labels: dict[str, str], child: str) -> dict[str, str]:
    out = dict(labels)
    if "worker" in out:
        out["exported_worker"] = out.pop("worker")
    out["worker"] = child
    return out


def render_metrics(scraped: Sequence[tuple[str, str | None]], registry: CollectorRegistry,
                   errors: Counter) -> bytes:
    """One exposition of every child's metrics and the front's own registry; a child whose scrape
    failed (None) or does not parse is left out and counted."""
    merged = MergedFamilies()
    for name, text in scraped:
        if text is not None:
            try:
                families = list(text_string_to_metric_families(text))
            except Exception as e:  # the parser raises ValueError, IndexError, ... on bad text
                log.warning("the metrics of %s do not parse (%s); left out", name, type(e).__name__)
            else:
                merged.add(families, name)
                continue
        errors.labels(worker=name).inc()
    merged.add(registry.collect())
    return generate_latest(merged)


async def metrics(request: web.Request) -> web.Response:
    """Every child's /metrics (worker, detector, events) and the supervisor's, in one scrape."""
    client = request.app[CLIENT]

    async def scrape(child: Child) -> str | None:
        assert child.port is not None
        try:
            a = await _call(client, child.port, "GET", "/metrics", PROBE_TIMEOUT)
        except (TimeoutError, aiohttp.ClientError) as e:
            log.warning("scraping %s failed (%s)", child.name, type(e).__name__)
            return None
        if a.status != 200:
            log.warning("scraping %s failed (HTTP %d)", child.name, a.status)
            return None
        try:
            return a.body.decode("utf-8")
        except UnicodeDecodeError:
            log.warning("the metrics of %s are not UTF-8", child.name)
            return None

    up = [c for c in request.app[CHILDREN].children() if c.port is not None]
    texts = await asyncio.gather(*(scrape(c) for c in up))
    body = await asyncio.to_thread(render_metrics, [(c.name, t) for c, t in zip(up, texts, strict=True)],
                                   request.app[REGISTRY], request.app[SCRAPE_ERRORS])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unknown paths and methods answer JSON, like every other error of the API."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return error(404, f"nothing at {request.path}; the API is /api/streams (see /openapi.json)")
    except web.HTTPMethodNotAllowed as e:
        allowed = sorted(e.allowed_methods)
        resp = error(405, f"{request.method} is not allowed on {request.path}; use {' or '.join(allowed)}")
        resp.headers["Allow"] = ",".join(allowed)
        return resp


def make_front_app(children: Children, registry: CollectorRegistry | None = None,
                   peer_secret: str | None = None) -> web.Application:
    """The public app of a multi-process run; ``registry`` holds the supervisor's own metrics.
    ``peer_secret`` goes with each forwarded request's real address, which workers believe only with it."""
    app = web.Application(middlewares=[json_errors])
    app[CHILDREN] = children
    if peer_secret:
        app[PEER_SECRET] = peer_secret
    app[REGISTRY] = registry = registry if registry is not None else CollectorRegistry()
    app[SCRAPE_ERRORS] = scrape_errors(registry)

    async def client(app: web.Application) -> AsyncIterator[None]:
        # no keep-alive: a restarted worker never meets a connection of its predecessor; no cookie
        # jar: one caller's cookies never reach another's request
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                         auto_decompress=False) as session:
            app[CLIENT] = session
            yield

    app.cleanup_ctx.append(client)
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/", page)
    r.add_get("/static/{name}", page)
    r.add_get("/openapi.json", to_first)
    r.add_get("/api/streams", list_streams)
    r.add_get("/api/audit", audit_logs)
    r.add_post("/api/streams", add_stream)
    r.add_get("/api/streams/{stream_id}", to_owner)
    r.add_delete("/api/streams/{stream_id}", to_owner)
    r.add_get("/api/streams/{stream_id}/zones", to_owner)
    r.add_put("/api/streams/{stream_id}/zones", to_owner)
    for kind in ("whip", "whep"):
        r.add_post(f"/{kind}/{{stream_id}}", to_owner)
        r.add_delete(f"/{kind}/{{stream_id}}/{{session}}", to_owner)
        r.add_patch(f"/{kind}/{{stream_id}}/{{session}}", to_owner)
    return app


async def start_front(children: Children, host: str, port: int, registry: CollectorRegistry | None = None,
                      peer_secret: str | None = None) -> tuple[web.AppRunner, int]:
    """Serve the front; returns the runner (to clean up) and the bound port (``port`` may be 0)."""
    return await serve_app(make_front_app(children, registry, peer_secret), host, port)
