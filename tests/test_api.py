"""The control API over real HTTP: auth, the add/list/get/remove round trip, bad requests, fuzzing.

The server runs on a thread of its own (as in production it runs beside the pipeline threads),
so plain blocking HTTP clients, and schemathesis, can talk to it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import make_clip
from live_helpers import NoFaces, counter, wait_for

from stream.config import parse_config
from stream.core.errors import UserError
from stream.live.api import openapi_document
from stream.live.auth import Tokens, load_tokens
from stream.live.http import start_http
from stream.live.pipeline import Pipeline
from stream.live.service import detector_factory_for

TOKEN = "test-token-0123456789abcdef"


class Server:
    """The pipeline's HTTP app on a private event loop thread."""

    def __init__(self, pipeline: Pipeline, tokens: Tokens, allow_files: bool = False) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0

        async def start() -> None:
            self.runner, self.port = await start_http(pipeline, "127.0.0.1", 0, tokens, allow_files)
            self.ready.set()

        self.thread = threading.Thread(target=self._run, args=(start,), daemon=True)
        self.thread.start()
        assert self.ready.wait(20), "HTTP server did not start"
        self.base = f"http://127.0.0.1:{self.port}"

    def _run(self, start) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def call(method: str, url: str, body: bytes | dict | None = None, token: str | None = TOKEN,
         headers: dict | None = None) -> tuple[int, dict | None, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            raw, status, hdrs = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, dict(e.headers)
    try:
        doc = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        doc = {"text": raw.decode(errors="replace")}
    return status, doc, hdrs


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("api") / "face.mp4", frames=25, width=320, height=240).path


@pytest.fixture
def running(clip_path: Path) -> Iterator[tuple[Pipeline, Server]]:
    cfg = parse_config({"streams": [{"id": "steady", "source": {"type": "file", "path": str(clip_path),
                                                                  "loop": True}}]})
    det = NoFaces()
    p = Pipeline(cfg, lambda: det)
    p.start()
    server = Server(p, Tokens((TOKEN.encode(),)), allow_files=False)
    wait_for(lambda: counter(p.metrics, "frames_published", stream="steady") > 3)
    yield p, server
    server.close()
    p.stop()


def rtsp_stream(sid: str, port: int = 9) -> dict:
    return {"id": sid, "source": {"type": "rtsp", "url": f"rtsp://cam:pw-secret@127.0.0.1:{port}/x",
                                  "reconnect": {"initial_s": 0.2, "max_s": 1}}}


def test_auth_is_required_and_checked(running: tuple[Pipeline, Server]) -> None:
    _, s = running
    status, body, headers = call("GET", s.base + "/api/streams", token=None)
    assert status == 401 and "Bearer" in body["error"] and "Bearer" in headers["WWW-Authenticate"]
    status, body, _ = call("GET", s.base + "/api/streams", token="wrong-token-0123456789")
    assert status == 403 and body["error"] == "invalid token"
    status, body, _ = call("GET", s.base + "/api/streams", headers={"Authorization": "Basic abc"}, token=None)
    assert status == 401 and "malformed" in body["error"]
    assert call("GET", s.base + "/api/streams")[0] == 200
    # metrics and health stay open for probes and Prometheus; they carry no secrets
    assert call("GET", s.base + "/healthz", token=None)[0] == 200


def test_no_token_configured_disables_the_api(clip_path: Path) -> None:
    p = Pipeline(parse_config({}), NoFaces)
    p.start()
    server = Server(p, Tokens())
    try:
        status, body, _ = call("GET", server.base + "/api/streams")
        assert status == 401 and "no token is configured" in body["error"]
    finally:
        server.close()
        p.stop()


def test_add_list_get_remove_round_trip(running: tuple[Pipeline, Server]) -> None:
    p, s = running
    status, body, headers = call("POST", s.base + "/api/streams", rtsp_stream("door-1"))
    assert status == 201, body
    assert headers["Location"] == "/api/streams/door-1" and body["id"] == "door-1"
    status, body, _ = call("GET", s.base + "/api/streams")
    assert sorted(x["id"] for x in body["streams"]) == ["door-1", "steady"]
    wait_for(lambda: call("GET", s.base + "/api/streams/door-1")[1]["state"] == "down",
             what="the unreachable camera marked down")
    status, body, _ = call("GET", s.base + "/api/streams/door-1")
    assert "pw-secret" not in json.dumps(body) and "connection refused" in body["error"]
    before = counter(p.metrics, "frames_published", stream="steady")
    assert call("DELETE", s.base + "/api/streams/door-1")[0] == 204
    assert call("GET", s.base + "/api/streams/door-1")[0] == 404
    assert "door-1" not in p.streams
    wait_for(lambda: counter(p.metrics, "frames_published", stream="steady") > before + 10,
             what="the running stream carrying on")


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"", 400, "must be a JSON object"),
    ({"id": "x"}, 400, "source: Field required"),
    ({"id": "x", "source": {"type": "rtsp", "url": "http://h/x"}}, 400,
     "source.url: 'http://h/x' is not an RTSP"),
    ({"id": "bad id", "source": {"type": "rtsp", "url": "rtsp://h/x"}}, 400, "is not a valid stream id"),
    ({"id": "x", "source": {"type": "rtsp", "url": "rtsp://h/x"}, "extra": 1}, 400, "extra: unknown key"),
    ({"id": "x", "source": {"type": "file", "path": __file__}}, 403, "file sources cannot be added"),
    ({"id": "steady", "source": {"type": "rtsp", "url": "rtsp://h/x"}}, 409, "already exists"),
])
def test_bad_requests_get_4xx_and_running_streams_carry_on(running: tuple[Pipeline, Server], body: object,
                                                            status: int, words: str) -> None:
    p, s = running
    before = counter(p.metrics, "frames_published", stream="steady")
    got, answer, _ = call("POST", s.base + "/api/streams", body)  # type: ignore[arg-type]
    assert got == status, answer
    assert words in answer["error"] + " ".join(answer.get("details", []))
    assert list(p.streams) == ["steady"]
    wait_for(lambda: counter(p.metrics, "frames_published", stream="steady") > before + 2)


def test_oversized_body_and_unknown_stream(running: tuple[Pipeline, Server]) -> None:
    _, s = running
    status, body, _ = call("POST", s.base + "/api/streams", b"{" + b" " * (300 * 1024) + b"}")
    assert status == 413
    assert call("GET", s.base + "/api/streams/nope")[0] == 404
    status, body, _ = call("DELETE", s.base + "/api/streams/nope")
    assert status == 404 and "no stream 'nope'" in body["error"]


def test_openapi_document(running: tuple[Pipeline, Server]) -> None:
    _, s = running
    status, doc, _ = call("GET", s.base + "/openapi.json", token=None)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/api/streams", "/api/streams/{stream_id}"} <= set(doc["paths"])
    assert "StreamConfig" in doc["components"]["schemas"]


def test_tokens_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_TOKENS", "aaaaaaaaaaaaaaaaaaaa, bbbbbbbbbbbbbbbbbbbb")
    f = tmp_path / "tokens"
    f.write_text("# operators\ncccccccccccccccccccc\n")
    t = load_tokens("MY_TOKENS", f)
    assert t.check("Bearer cccccccccccccccccccc") is None
    assert t.check("Bearer aaaaaaaaaaaaaaaaaaaa") is None
    assert t.check("Bearer dddddddddddddddddddd") == "invalid token"
    with pytest.raises(UserError, match="shorter than 16"):
        monkeypatch.setenv("MY_TOKENS", "short")
        load_tokens("MY_TOKENS")
    with pytest.raises(UserError, match=r"auth\.tokens_file"):
        load_tokens("UNSET_VAR_X", tmp_path / "missing")
    assert "aaaa" not in repr(t)


def test_fuzz_the_api_from_its_openapi_document(running: tuple[Pipeline, Server]) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    p, s = running
    schema = schemathesis.openapi.from_url(s.base + "/openapi.json")
    failures: list[str] = []

    def fuzz(strategy: object) -> None:
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case: object) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}
            response = case.call(base_url=s.base, timeout=20)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} "
                                f"{response.text[:200]}")

        check()

    operations = [op.ok() for op in schema.get_all_operations()]
    documented = openapi_document()["paths"]
    assert len(operations) == sum(len(set(ops) - {"parameters"}) for ops in documented.values())
    for operation in operations:
        fuzz(operation.as_strategy())
    assert not failures, failures
    assert "steady" in p.streams and p.streams["steady"].state == "up"
    for sid in [x for x in p.streams if x != "steady"]:
        p.remove_stream(sid)


def test_control_room_page_is_served_without_external_resources(running: tuple[Pipeline, Server]) -> None:
    _, s = running
    pages = (("/", "text/html"), ("/static/app.js", "text/javascript"), ("/static/style.css", "text/css"))
    for path, kind in pages:
        req = urllib.request.Request(s.base + path)
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read().decode()
            assert r.headers["Content-Type"].startswith(kind)
        assert "http://" not in body and "https://" not in body  # offline control rooms: nothing from a CDN
    assert call("GET", s.base + "/static/secret.txt", token=None)[0] == 404
    assert call("GET", s.base + "/static/..%2Fapi.py", token=None)[0] == 404


def test_status_lists_new_tracks_and_latency(clip_path: Path) -> None:
    detection = {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"]}
    cfg = parse_config({"streams": [{"id": "cam", "source": {"type": "file", "path": str(clip_path)}}],
                        "detection": detection})
    p = Pipeline(cfg, detector_factory_for(cfg))
    p.start()
    try:
        wait_for(lambda: p.ended, timeout=60, what="the clip to end")
    finally:
        p.stop()
    st = p.streams["cam"].status()
    assert st["latency_ms"] is not None and st["latency_ms"] > 0
    assert st["recent"] and st["recent"][0]["label"] == "face" and st["recent"][0]["track_id"] >= 1
