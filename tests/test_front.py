"""The supervisor's public front (stream.live.front) over real HTTP, in front of real aiohttp servers
standing in for the children: routing by owner, the forwarded request and relayed answer, the
merged stream list, readiness and metrics, and what a caller gets while a worker is down.

The stand-ins record what reaches them and answer canned JSON, SDP and real prometheus_client
expositions; no detector or pipeline runs, since the front only speaks HTTP to its children.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stream.core.metrics import Metrics
from stream.live import front
from stream.live.front import Child, start_front
from stream.live.http import WEB
from stream.live.shard import worker_of

TOKEN = "front-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CANDIDATES = [f"cam-{i}" for i in range(32)]
ON_0 = next(i for i in CANDIDATES if worker_of(i, 2) == 0)
ON_1 = next(i for i in CANDIDATES if worker_of(i, 2) == 1)


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass
class FakeChild:
    """An aiohttp server standing in for one child: records every request, answers canned ones."""

    name: str
    streams: list[dict[str, Any]] = field(default_factory=list)
    readyz: dict[str, Any] = field(default_factory=lambda: {"ready": True, "detector": "up", "streams": []})
    metrics: str = ""
    hang: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    async def start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        return runner

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.path_qs, request.headers, await request.read()))
        path = request.path
        if path == "/readyz":
            return web.json_response(self.readyz, status=200 if self.readyz["ready"] else 503)
        if path == "/metrics":
            return web.Response(body=self.metrics.encode(),
                                headers={"Content-Type": "text/plain; version=0.0.4"})
        if path == "/openapi.json":
            return web.json_response({"openapi": "3.1.0", "from": self.name})
        auth = request.headers.get("Authorization")
        if auth is None:
            return web.json_response({"error": "missing bearer token"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="stream-redact"'})
        if auth != f"Bearer {TOKEN}":
            return web.json_response({"error": "invalid token"}, status=403)
        if self.hang:
            await self.release.wait()  # set at teardown only: the front must give up first
        headers = {"X-Worker": self.name}
        if request.method == "GET" and path == "/api/streams":
            return web.json_response({"streams": self.streams}, headers=headers)
        if request.method == "GET" and path == "/api/audit":
            if self.name == "worker-1" and request.query.get("fail") == "400":
                return web.json_response({"error": "since must be >= 0"}, status=400, headers=headers)
            record = {"seq": 1, "action": "audit.log.opened", "since": request.query.get("since")}
            return web.json_response({"file": f"audit.{self.name}.jsonl", "records": [record]},
                                     headers=headers)
        if request.method == "POST" and path == "/api/streams":
            try:
                doc = json.loads(self.seen[-1].body)
            except ValueError:
                return web.json_response({"error": "body is not valid JSON"}, status=400, headers=headers)
            if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
                return web.json_response({"error": "invalid stream"}, status=400, headers=headers)
            return web.json_response({"id": doc["id"], "state": "starting"}, status=201,
                                     headers={**headers, "Location": f"/api/streams/{doc['id']}"})
        if request.method == "POST" and path.startswith(("/whep/", "/whip/")):
            kind, sid = path.split("/")[1:3]
            return web.Response(status=201, body=b"v=0 answer\r\n",
                                headers={**headers, "Content-Type": "application/sdp",
                                         "Location": f"/{kind}/{sid}/sess-1"})
        return web.json_response({"from": self.name, "method": request.method, "path": path}, headers=headers)


class FakeChildren:
    """The supervisor's view of its children; a test takes one down or moves it."""

    def __init__(self, fakes: list[FakeChild]) -> None:
        self.items = [Child(f.name, "worker" if f.name.startswith("worker-") else f.name,
                            int(f.name.split("-")[1]) if f.name.startswith("worker-") else None, f.port)
                      for f in fakes]

    def children(self) -> list[Child]:
        return list(self.items)

    @property
    def worker_count(self) -> int:
        return 2

    def running(self, stream_id: str) -> int | None:
        return None

    def set_port(self, name: str, port: int | None) -> None:
        self.items = [dataclasses.replace(c, port=port) if c.name == name else c for c in self.items]


def closed_port() -> int:
    """A loopback port that nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exposition(stream: str, frames: int) -> str:
    """A worker's real /metrics text, with a child-side ``worker`` label on one extra family."""
    m = Metrics()
    m.frames_in.labels(stream=stream).inc(frames)
    m.latency.labels(stream=stream, output="rtsp").observe(0.05)
    m.detector_up.set(1)
    extra = Gauge("stream_redact_shard_info", "This worker's shard", ["worker"], registry=m.registry)
    extra.labels(worker="pod-a").set(1)
    return m.render().decode() + "# a plain sample without HELP or TYPE\nlegacy_untyped 3\n"


def detector_exposition() -> str:
    """The detector process's: one family of the same name as one of every worker's."""
    r = CollectorRegistry()
    Gauge("stream_redact_detector_up", "1 while a detector is loaded and healthy", registry=r).set(1)
    return generate_latest(r).decode()


def events_exposition() -> str:
    r = CollectorRegistry()
    delivered = Counter("stream_redact_events_delivered", "Events acknowledged by the brokers", ["sink"],
                        registry=r)
    delivered.labels(sink="kafka").inc(4)
    return generate_latest(r).decode()


@dataclass
class Cluster:
    workers: list[FakeChild]
    detector: FakeChild
    events: FakeChild
    children: FakeChildren
    registry: CollectorRegistry
    client: aiohttp.ClientSession
    base: str

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any, CIMultiDictProxy[str]]:
        async with self.client.request(method, self.base + path, allow_redirects=False, **kw) as r:
            raw = await r.read()
            try:
                doc: Any = json.loads(raw) if raw else None
            except ValueError:
                doc = raw
            return r.status, doc, r.headers


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    workers = [
        FakeChild("worker-0", streams=[{"id": ON_0, "state": "running"}], metrics=exposition(ON_0, 5),
                  readyz={"ready": True, "detector": "up", "streams": [{"id": ON_0, "state": "running"}],
                          "events": {"up": True, "problem": None}}),
        FakeChild("worker-1", streams=[{"id": ON_1, "state": "running"}], metrics=exposition(ON_1, 7),
                  readyz={"ready": True, "detector": "up", "streams": [{"id": ON_1, "state": "running"}],
                          "events": {"up": True, "problem": None}}),
    ]
    detector = FakeChild("detector", metrics=detector_exposition())
    events = FakeChild("events", metrics=events_exposition())
    runners = [await f.start() for f in (*workers, detector, events)]
    children = FakeChildren([*workers, detector, events])
    registry = CollectorRegistry()
    up = Gauge("stream_redact_worker_up", "1 while the worker process runs", ["worker"], registry=registry)
    up.labels(worker="worker-0").set(1)
    runner, port = await start_front(children, "127.0.0.1", 0, registry)
    try:
        async with aiohttp.ClientSession() as client:
            yield Cluster(workers, detector, events, children, registry, client, f"http://127.0.0.1:{port}")
    finally:
        for f in (*workers, detector, events):
            f.release.set()
        await runner.cleanup()
        for r in runners:
            await r.cleanup()


def paths(child: FakeChild) -> list[tuple[str, str]]:
    return [(s.method, s.path_qs) for s in child.seen if s.path_qs not in ("/readyz", "/metrics")]


ROUTED = [("GET", "/api/streams/{id}"), ("DELETE", "/api/streams/{id}"), ("POST", "/whep/{id}"),
          ("POST", "/whip/{id}"), ("DELETE", "/whep/{id}/sess-9"), ("PATCH", "/whip/{id}/sess-9"),
          ("GET", "/api/streams/{id}/zones"), ("PUT", "/api/streams/{id}/zones")]


@pytest.mark.parametrize(("method", "template"), ROUTED)
async def test_a_request_about_a_stream_goes_to_the_worker_that_owns_it(cluster: Cluster, method: str,
                                                                         template: str) -> None:
    for sid, mine, other in ((ON_0, 0, 1), (ON_1, 1, 0)):
        path = template.format(id=sid)
        status, _, headers = await cluster.call(method, path, headers=AUTH)
        assert status in (200, 201)
        assert headers["X-Worker"] == f"worker-{mine}"
        assert paths(cluster.workers[mine])[-1] == (method, path)
        assert (method, path) not in paths(cluster.workers[other])


async def test_a_new_stream_goes_to_the_owner_of_its_id_with_body_query_and_headers(cluster: Cluster) -> None:
    body = json.dumps({"id": ON_1, "source": {"type": "rtsp", "url": "rtsp://cam/1"}}).encode()
    status, doc, headers = await cluster.call(
        "POST", "/api/streams?note=a%20b", data=body,
        headers={**AUTH, "Content-Type": "application/json", "X-Forwarded-For": "203.0.113.9",
                 "Connection": "keep-alive, X-Hop", "X-Hop": "only for the next hop", "X-Trace": "t-1"})
    assert (status, doc) == (201, {"id": ON_1, "state": "starting"})
    assert headers["Location"] == f"/api/streams/{ON_1}"
    assert headers["X-Worker"] == "worker-1"
    assert paths(cluster.workers[0]) == []
    seen = cluster.workers[1].seen[-1]
    assert (seen.method, seen.path_qs, seen.body) == ("POST", "/api/streams?note=a%20b", body)
    h = seen.headers
    assert h["Authorization"] == f"Bearer {TOKEN}"
    assert h["Content-Type"] == "application/json"
    assert h["X-Trace"] == "t-1"
    assert h["Host"] == f"127.0.0.1:{cluster.workers[1].port}"
    assert h["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert h["X-Forwarded-Proto"] == "http"
    assert "X-Hop" not in h
    assert "keep-alive" not in h.get("Connection", "").lower()


@pytest.mark.parametrize("body", [b"not json {", b'{"source": {"type": "rtsp"}}', b'{"id": 5}', b'["x"]',
                                  b""])
async def test_a_new_stream_without_an_id_goes_to_worker_0_which_says_why(cluster: Cluster,
                                                                          body: bytes) -> None:
    status, doc, _ = await cluster.call("POST", "/api/streams", data=body,
                                        headers={**AUTH, "Content-Type": "application/json"})
    assert status == 400 and "error" in doc
    assert cluster.workers[0].seen[-1].body == body
    assert paths(cluster.workers[1]) == []


async def test_the_workers_refusal_of_a_token_reaches_the_caller(cluster: Cluster) -> None:
    status, doc, headers = await cluster.call("GET", f"/api/streams/{ON_1}")
    assert (status, doc) == (401, {"error": "missing bearer token"})
    assert headers["WWW-Authenticate"] == 'Bearer realm="stream-redact"'
    assert "Authorization" not in cluster.workers[1].seen[-1].headers
    status, doc, _ = await cluster.call("GET", "/api/streams", headers={"Authorization": "Bearer wrong"})
    assert (status, doc) == (403, {"error": "invalid token"})
    status, doc, headers = await cluster.call("GET", "/api/streams")
    assert status == 401 and headers["WWW-Authenticate"]


async def test_a_whep_answer_comes_back_with_its_location(cluster: Cluster) -> None:
    status, doc, headers = await cluster.call(
        "POST", f"/whep/{ON_0}", data=b"v=0 offer\r\n", headers={**AUTH, "Content-Type": "application/sdp"})
    assert (status, doc) == (201, b"v=0 answer\r\n")
    assert headers["Content-Type"] == "application/sdp"
    assert headers["Location"] == f"/whep/{ON_0}/sess-1"
    seen = cluster.workers[0].seen[-1]
    assert (seen.body, seen.headers["Content-Type"]) == (b"v=0 offer\r\n", "application/sdp")
    status, _, _ = await cluster.call("DELETE", headers["Location"], headers=AUTH)
    assert status == 200
    assert paths(cluster.workers[0])[-1] == ("DELETE", f"/whep/{ON_0}/sess-1")


async def test_the_stream_list_holds_every_workers_streams(cluster: Cluster) -> None:
    status, doc, _ = await cluster.call("GET", "/api/streams?x=1", headers=AUTH)
    assert status == 200
    assert doc == {"streams": [{"id": ON_0, "state": "running", "worker": "worker-0"},
                               {"id": ON_1, "state": "running", "worker": "worker-1"}],
                   "unavailable": []}
    assert all(paths(w) == [("GET", "/api/streams?x=1")] for w in cluster.workers)
    assert all(w.seen[-1].headers["Authorization"] == f"Bearer {TOKEN}" for w in cluster.workers)


async def test_the_audit_export_holds_every_workers_log(cluster: Cluster) -> None:
    status, doc, _ = await cluster.call("GET", "/api/audit?since=7", headers=AUTH)
    assert status == 200, doc
    assert [(log["worker"], log["file"], log["records"][0]["since"]) for log in doc["logs"]] == [
        ("worker-0", "audit.worker-0.jsonl", "7"), ("worker-1", "audit.worker-1.jsonl", "7")]
    assert (await cluster.call("GET", "/api/audit"))[0] == 401  # the workers check the token
    status, doc, _ = await cluster.call("GET", "/api/audit?fail=400", headers=AUTH)
    assert status == 400 and "since" in doc["error"]
    cluster.children.set_port("worker-1", None)
    status, doc, _ = await cluster.call("GET", "/api/audit", headers=AUTH)
    assert status == 200 and doc["unavailable"] == ["worker-1"] and len(doc["logs"]) == 1


@pytest.mark.parametrize("how", ["restarting", "refused"])
async def test_a_worker_that_is_down_costs_only_its_own_streams(cluster: Cluster, how: str) -> None:
    cluster.children.set_port("worker-1", None if how == "restarting" else closed_port())
    status, doc, headers = await cluster.call("GET", f"/api/streams/{ON_1}", headers=AUTH)
    assert status == 503
    assert "worker 1" in doc["error"] and "retry" in doc["error"]
    assert int(headers["Retry-After"]) > 0
    status, _, _ = await cluster.call("GET", f"/api/streams/{ON_0}", headers=AUTH)
    assert status == 200

    status, doc, _ = await cluster.call("GET", "/api/streams", headers=AUTH)
    assert status == 200
    assert doc == {"streams": [{"id": ON_0, "state": "running", "worker": "worker-0"}],
                   "unavailable": ["worker-1"]}

    status, doc, _ = await cluster.call("GET", "/readyz")
    assert status == 503 and doc["ready"] is False
    assert doc["workers"] == [{"name": "worker-0", "up": True, "ready": True},
                              {"name": "worker-1", "up": False, "ready": False}]
    assert [s["id"] for s in doc["streams"]] == [ON_0]


async def test_a_worker_that_hangs_gets_a_503_not_a_wait(cluster: Cluster,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front, "FORWARD_TIMEOUT", aiohttp.ClientTimeout(total=0.5, sock_connect=0.5))
    cluster.workers[1].hang = True
    status, doc, headers = await cluster.call("POST", f"/whep/{ON_1}", data=b"v=0\r\n",
                                              headers={**AUTH, "Content-Type": "application/sdp"})
    assert status == 503 and "worker 1" in doc["error"]
    assert "Retry-After" in headers


async def test_with_every_worker_down_the_list_is_a_503(cluster: Cluster) -> None:
    cluster.children.set_port("worker-0", None)
    cluster.children.set_port("worker-1", closed_port())
    status, doc, headers = await cluster.call("GET", "/api/streams", headers=AUTH)
    assert status == 503 and "worker-0" in doc["error"] and "worker-1" in doc["error"]
    assert "Retry-After" in headers
    status, doc, _ = await cluster.call("GET", "/healthz")
    assert (status, doc) == (200, {"status": "ok"})


async def test_readiness_merges_the_workers(cluster: Cluster) -> None:
    status, doc, _ = await cluster.call("GET", "/readyz")
    assert status == 200
    processes = doc.pop("processes")
    assert [(p["name"], p["kind"], p["up"]) for p in processes][:2] == [("worker-0", "worker", True),
                                                                         ("worker-1", "worker", True)]
    assert doc == {"ready": True, "detector": "up",
                   "streams": [{"id": ON_0, "state": "running", "worker": "worker-0"},
                               {"id": ON_1, "state": "running", "worker": "worker-1"}],
                   "events": {"up": True, "problem": None},
                   "workers": [{"name": "worker-0", "up": True, "ready": True},
                               {"name": "worker-1", "up": True, "ready": True}]}

    cluster.workers[1].readyz = {"ready": False, "detector": "down", "streams": [],
                                 "events": {"up": False, "problem": "kafka unreachable"}}
    status, doc, _ = await cluster.call("GET", "/readyz")
    assert status == 503
    assert (doc["ready"], doc["detector"]) == (False, "down")
    assert doc["events"] == {"up": False, "problem": "kafka unreachable"}
    assert doc["workers"][1] == {"name": "worker-1", "up": True, "ready": False}


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def values(fam: Any, sample: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in fam.samples if s.name == sample}


async def test_metrics_of_every_child_in_one_exposition(cluster: Cluster) -> None:
    async with cluster.client.get(cluster.base + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await r.text()
    fams = families(text)
    type_lines = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    help_lines = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(type_lines) == len(set(type_lines)) and len(help_lines) == len(set(help_lines))

    assert "# TYPE stream_redact_frames_in_total counter" in text.splitlines()
    frames = fams["stream_redact_frames_in"]
    assert frames.type == "counter"
    assert values(frames, "stream_redact_frames_in_total") == {
        (("stream", ON_0), ("worker", "worker-0")): 5.0, (("stream", ON_1), ("worker", "worker-1")): 7.0}

    assert fams["stream_redact_latency_seconds"].type == "histogram"
    assert values(fams["stream_redact_latency_seconds"], "stream_redact_latency_seconds_count") == {
        (("output", "rtsp"), ("stream", ON_0), ("worker", "worker-0")): 1.0,
        (("output", "rtsp"), ("stream", ON_1), ("worker", "worker-1")): 1.0}

    up = values(fams["stream_redact_detector_up"], "stream_redact_detector_up")
    assert up == {(("worker", "worker-0"),): 1.0, (("worker", "worker-1"),): 1.0,
                  (("worker", "detector"),): 1.0}
    assert values(fams["stream_redact_events_delivered"], "stream_redact_events_delivered_total") == {
        (("sink", "kafka"), ("worker", "events")): 4.0}
    assert values(fams["stream_redact_shard_info"], "stream_redact_shard_info") == {
        (("exported_worker", "pod-a"), ("worker", "worker-0")): 1.0,
        (("exported_worker", "pod-a"), ("worker", "worker-1")): 1.0}
    assert values(fams["legacy_untyped"], "legacy_untyped") == {
        (("worker", "worker-0"),): 3.0, (("worker", "worker-1"),): 3.0}
    assert values(fams["stream_redact_worker_up"], "stream_redact_worker_up") == {
        (("worker", "worker-0"),): 1.0}
    assert "stream_redact_front_scrape_errors" in fams
    assert values(fams["stream_redact_front_scrape_errors"], "stream_redact_front_scrape_errors_total") == {}


@pytest.mark.parametrize("how", ["refused", "garbage", "restarting"])
async def test_a_child_whose_scrape_fails_is_left_out_and_counted(cluster: Cluster, how: str) -> None:
    if how == "refused":
        cluster.children.set_port("events", closed_port())
    elif how == "garbage":
        cluster.events.metrics = "# TYPE broken counter\nbroken{unterminated=\"x 1\n"
    else:
        cluster.children.set_port("events", None)
    for scrape in (1, 2):
        async with cluster.client.get(cluster.base + "/metrics") as r:
            assert r.status == 200
            fams = families(await r.text())
        workers = {s.labels.get("worker") for f in fams.values() for s in f.samples
                   if f.name != "stream_redact_front_scrape_errors"}
        assert "events" not in workers
        assert {"worker-0", "worker-1", "detector"} <= workers
        errors = values(fams["stream_redact_front_scrape_errors"], "stream_redact_front_scrape_errors_total")
        # a child that is down is not scraped at all: stream_redact_worker_up says so
        assert errors == ({} if how == "restarting" else {(("worker", "events"),): float(scrape)})


@pytest.mark.parametrize(("path", "name", "kind"), [("/", "index.html", "text/html"),
                                                     ("/static/app.js", "app.js", "text/javascript"),
                                                     ("/static/style.css", "style.css", "text/css")])
async def test_the_page_is_served_by_the_front(cluster: Cluster, path: str, name: str, kind: str) -> None:
    cluster.children.set_port("worker-0", None)
    cluster.children.set_port("worker-1", None)
    async with cluster.client.get(cluster.base + path) as r:
        assert r.status == 200
        assert r.content_type == kind
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert await r.read() == (WEB / name).read_bytes()
    status, doc, _ = await cluster.call("GET", "/static/secrets.txt")
    assert status == 404 and "error" in doc


async def test_openapi_comes_from_worker_0_and_unknown_paths_are_json(cluster: Cluster) -> None:
    status, doc, _ = await cluster.call("GET", "/openapi.json")
    assert (status, doc) == (200, {"openapi": "3.1.0", "from": "worker-0"})
    status, doc, _ = await cluster.call("GET", "/api/nothing", headers=AUTH)
    assert status == 404 and "error" in doc
    status, doc, headers = await cluster.call("PUT", "/api/streams", headers=AUTH)
    assert status == 405 and "error" in doc
    assert set(headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}
    assert all(paths(w) == [("GET", "/openapi.json")] if w.name == "worker-0" else paths(w) == []
               for w in cluster.workers)


async def test_tokens_and_bodies_stay_out_of_the_log(cluster: Cluster, caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(front, "FORWARD_TIMEOUT", aiohttp.ClientTimeout(total=0.5, sock_connect=0.5))
    body = json.dumps({"id": ON_1, "source": {"type": "rtsp", "url": "rtsp://user:body-secret@cam/1"}})
    cluster.workers[1].hang = True
    status, _, _ = await cluster.call("POST", "/api/streams", data=body, headers=AUTH)
    assert status == 503
    cluster.workers[1].hang = False
    cluster.children.set_port("worker-1", closed_port())
    for method, path in [("POST", "/api/streams"), ("POST", f"/whep/{ON_1}"), ("GET", "/api/streams"),
                         ("DELETE", f"/whep/{ON_1}/session-secret")]:
        status, _, _ = await cluster.call(method, path, data=body, headers=AUTH)
        assert status in (200, 503)
    assert "worker 1" in caplog.text  # the failures were logged ...
    for secret in (TOKEN, "body-secret", "session-secret"):
        assert secret not in caplog.text  # ... without what the caller sent


async def test_a_port_in_use_names_the_setting_to_change() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=r"http\.port"):
            await start_front(FakeChildren([]), "127.0.0.1", port)
