"""The running service probed as an attacker or an unlucky operator would: each case once failed.

Everything goes through real HTTP to `serve()` (what `stream-redact run` runs), with the WebRTC
gateway in place; sources are RTSP URLs on closed loopback ports, so no camera is needed.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT
from live_helpers import NoFaces, ServiceThread, wait_for
from test_api import call

from stream.config import PipelineConfig, parse_config
from stream.core.errors import UserError
from stream.core.urls import mask_text, mask_url, origin, origins_only

TOKEN = "hardening-token-0123456789abcdef"
ENV = "HARDENING_TEST_TOKENS"


class Service(ServiceThread):
    """`serve()` on a thread with its own event loop, detection replaced by a no-face detector."""

    def __init__(self, config: PipelineConfig) -> None:
        super().__init__(config, NoFaces)


def config(tmp_path: Path, **extra: Any) -> PipelineConfig:
    doc: dict[str, Any] = {"auth": {"tokens_env": ENV}, "http": {"port": 0}, "events": {"sink": "none"},
                           "detection": {"providers": ["cpu"]}}
    doc.update(extra)
    return parse_config(doc)


@pytest.fixture
def tokens_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, TOKEN)


@pytest.fixture
def service(tmp_path: Path, tokens_env: None) -> Iterator[Service]:
    svc = Service(config(tmp_path))
    yield svc
    svc.stop()


def closed_port() -> int:
    """A loopback port nobody listens on (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rtsp(sid: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"id": sid, "source": {"type": "rtsp", "url": url, "reconnect": {"initial_s": 0.2, "max_s": 1}},
            **extra}


def api(svc: Service, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any, dict]:
    return call(method, svc.base + path, body, token=TOKEN, **kw)


# -- F1: ${VAR} in API bodies, URL paths on /readyz ------------------------------------------------
def test_env_references_in_api_bodies_are_refused_and_never_expanded(service: Service) -> None:
    for url in (f"rtsp://127.0.0.1:{closed_port()}/${{{ENV}}}", f"rtsp://u:${{{ENV}}}@127.0.0.1:1/x",
                "rtsp://127.0.0.1:1/${NO_SUCH_VARIABLE_HERE}"):
        status, body, _ = api(service, "POST", "/api/streams", rtsp("env1", url))
        assert status == 400, body
        assert "config file" in body["error"] and TOKEN not in json.dumps(body)
        assert "NO_SUCH_VARIABLE_HERE" not in body["error"]  # no hint which variables exist
    assert api(service, "GET", "/api/streams/env1")[0] == 404


def test_env_references_still_expand_in_the_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAM_PASS_X", "hunter22")
    cfg = parse_config({"streams": [rtsp("a", "rtsp://admin:${CAM_PASS_X}@10.0.0.5/ch1")]})
    assert cfg.streams[0].source.url == "rtsp://admin:hunter22@10.0.0.5/ch1"
    with pytest.raises(UserError, match=r"streams\[0\].source.url: environment variable NOPE_NOT_SET"):
        parse_config({"streams": [rtsp("a", "rtsp://10.0.0.5/${NOPE_NOT_SET}")]})


def test_readyz_and_the_stream_list_show_no_url_path_or_query(service: Service) -> None:
    port = closed_port()
    url = f"rtsp://viewer:At@Secret77@127.0.0.1:{port}/private-path/cam?token=query-secret"
    assert api(service, "POST", "/api/streams", rtsp("pathy", url))[0] == 201
    wait_for(lambda: api(service, "GET", "/api/streams/pathy")[1]["state"] == "down", what="source down")
    ready = call("GET", service.base + "/readyz", token=None)[1]
    listed = api(service, "GET", "/api/streams")[1]
    for doc in (ready, listed):
        text = json.dumps(doc)
        assert f"127.0.0.1:{port}" in text  # which server failed is still said
        for secret in ("private-path", "query-secret", "Secret77", "viewer", "At@"):
            assert secret not in text, (secret, text)


# -- F2: file outputs through the API --------------------------------------------------------------
def test_api_file_outputs_are_off_by_default(service: Service, tmp_path: Path) -> None:
    victim = tmp_path / "victim.mp4"
    victim.write_bytes(b"precious")
    body = rtsp("rec", f"rtsp://127.0.0.1:{closed_port()}/x", outputs=[{"type": "file", "path": str(victim)}])
    status, doc, _ = api(service, "POST", "/api/streams", body)
    assert status == 403 and "allow_file_outputs" in doc["error"]
    assert victim.read_bytes() == b"precious"


def test_api_file_outputs_only_new_files_in_the_one_folder(tmp_path: Path, tokens_env: None) -> None:
    out = tmp_path / "recordings"
    out.mkdir()
    (out / "escape").symlink_to(tmp_path)
    victim = tmp_path / "victim.mp4"
    victim.write_bytes(b"precious")
    existing = out / "old.mp4"
    existing.write_bytes(b"evidence")
    port = closed_port()
    svc = Service(config(tmp_path, api={"allow_file_outputs": True, "file_output_dir": str(out)},
                         streams=[rtsp("cfg", f"rtsp://127.0.0.1:{port}/x",
                                       outputs=[{"type": "file", "path": str(out / "cfg.mp4")}])]))
    try:
        def add(sid: str, path: str) -> tuple[int, Any]:
            got = api(svc, "POST", "/api/streams",
                      rtsp(sid, f"rtsp://127.0.0.1:{port}/x", outputs=[{"type": "file", "path": path}]))
            return got[0], got[1]

        assert add("a", str(victim))[0] == 403
        assert add("b", "/etc/cron.d/x.mp4")[0] == 403
        assert add("c", "escape/victim2.mp4")[0] == 403  # a symlink out of the folder
        assert add("d", "../victim3.mp4")[0] == 403
        status, doc = add("e", str(existing))
        assert status == 409 and "exists already" in doc["error"]
        status, doc = add("f", "cfg.mp4")  # the config stream's recording
        assert status == 409 and "'cfg'" in doc["error"]
        status, doc = add("g", "new.mp4")
        assert status == 201, doc
        status, doc = add("h", str(out / "new.mp4"))  # the API stream's recording, by absolute path
        assert status == 409 and "'g'" in doc["error"]
        assert victim.read_bytes() == b"precious" and existing.read_bytes() == b"evidence"
        assert not (tmp_path / "victim2.mp4").exists() and not (tmp_path / "victim3.mp4").exists()
    finally:
        svc.stop()


def test_config_streams_may_not_share_a_recording(tmp_path: Path) -> None:
    outs = [{"type": "file", "path": str(tmp_path / "same.mp4")}]
    with pytest.raises(UserError, match="both record to"):
        parse_config({"streams": [rtsp("a", "rtsp://h:554/x", outputs=outs),
                                  rtsp("b", "rtsp://h:554/y", outputs=outs)]})


def test_file_outputs_need_their_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="file_output_dir"):
        parse_config({"api": {"allow_file_outputs": True}})
    with pytest.raises(UserError, match="is not a folder"):
        parse_config({"api": {"allow_file_outputs": True, "file_output_dir": str(tmp_path / "none")}})


# -- F8: credentials holding / # @ -----------------------------------------------------------------
@pytest.mark.parametrize("url, secrets", [
    ("rtsp://camuser:Sl/ashSecret99@host/x", ["ashSecret99", "camuser"]),
    ("rtsp://u:At@Secret77@host:554/x", ["Secret77", "At@"]),
    ("rtsp://u:se#cret99@host/x", ["cret99"]),
    ("rtsp://u:pa?ss99x@host/x", ["ss99x"]),
    ("rtsp://host/x?token=abcdef", ["abcdef"]),
])
def test_masking_cuts_user_info_at_the_last_at(url: str, secrets: list[str]) -> None:
    masked = mask_url(url)
    text = mask_text(f"could not open {url}: refused", url)
    for s in secrets:
        assert s not in masked and s not in text and s not in origin(url)
    assert "host" in masked and origin(url).startswith("rtsp://host")


def test_credentials_with_slash_never_come_back_in_errors(service: Service, tmp_path: Path) -> None:
    status, doc, _ = api(service, "POST", "/api/streams", rtsp("slash", "rtsp://camuser:Sl/ashSecret99@host/x"))
    assert status == 400 and "ashSecret99" not in json.dumps(doc) and "percent-encoded" in json.dumps(doc)
    path = tmp_path / "c.yaml"
    path.write_text("streams:\n  - id: a\n    source: {type: rtsp, url: 'rtsp://u:se/cret99@h:554/x'}\n")
    r = subprocess.run([sys.executable, "-m", "stream.cli", "run", "--config", str(path), "--check"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "cret99" not in r.stderr + r.stdout and "percent-encoded" in r.stderr


def test_at_in_a_password_is_masked_in_logs_and_events(tmp_path: Path, tokens_env: None,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    events = tmp_path / "events.jsonl"
    url = f"rtsp://user7:At@Secret77@127.0.0.1:{closed_port()}/x"
    jsonl = {"path": str(events), "fsync": "always"}
    svc = Service(config(tmp_path, events={"sink": "jsonl", "jsonl": jsonl}))
    try:
        assert api(svc, "POST", "/api/streams", rtsp("at", url))[0] == 201
        wait_for(lambda: events.exists() and '"down"' in events.read_text(), what="the stream's down event")
    finally:
        svc.stop()
    text = events.read_text() + caplog.text
    assert "127.0.0.1" in events.read_text()
    assert "Secret77" not in text and "user7" not in text and "At@" not in text


# -- F9: ids with a trailing newline ---------------------------------------------------------------
def test_ids_must_match_whole(service: Service) -> None:
    status, doc, _ = api(service, "POST", "/api/streams", rtsp("abc\n", f"rtsp://127.0.0.1:{closed_port()}/x"))
    assert status == 400 and "not a valid stream id" in json.dumps(doc)
    assert api(service, "GET", "/api/streams")[1]["streams"] == []
    with pytest.raises(UserError, match="not a valid stream id"):
        parse_config({"streams": [rtsp("cam1\n", "rtsp://h:554/x")]})


# -- F10: deep nesting -----------------------------------------------------------------------------
def test_deeply_nested_bodies_get_400_not_a_traceback(service: Service,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    deep = b"[" * 100_000 + b"]" * 100_000
    status, doc, _ = api(service, "POST", "/api/streams", deep)
    assert status == 400 and "nests deeper" in doc["error"]
    inside = b'{"id": "x", "source": ' + b'{"a": ' * 40 + b"1" + b"}" * 41
    assert api(service, "POST", "/api/streams", inside)[0] == 400
    tricky = json.dumps({"id": "ok1", "source": {"type": "rtsp", "url": "rtsp://127.0.0.1:1/" + "[" * 40},
                         "outputs": []}).encode()
    assert api(service, "POST", "/api/streams", tricky)[0] == 201  # brackets inside strings don't count
    assert "RecursionError" not in caplog.text and "Traceback" not in caplog.text


def test_deeply_nested_yaml_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("streams: " + "[" * 5000 + "]" * 5000 + "\n")
    r = subprocess.run([sys.executable, "-m", "stream.cli", "run", "--config", str(path), "--check"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nest" in r.stderr, r.stderr


# -- F11: delete / re-add race ---------------------------------------------------------------------
def test_delete_and_re_add_of_one_id_leave_a_whole_stream(service: Service) -> None:
    port = closed_port()
    body = rtsp("rx", f"rtsp://127.0.0.1:{port}/x")
    assert api(service, "POST", "/api/streams", body)[0] == 201
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(15):
            calls = [pool.submit(api, service, "DELETE", "/api/streams/rx")]
            calls += [pool.submit(api, service, "POST", "/api/streams", body) for _ in range(7)]
            codes = sorted(c.result()[0] for c in calls)
            assert set(codes) <= {201, 204, 404, 409}, codes
            if api(service, "GET", "/api/streams/rx")[0] != 200:
                assert api(service, "POST", "/api/streams", body)[0] == 201
            # the stream the API lists is whole: its viewers' feed and its metric series exist
            status, _, _ = call("POST", service.base + "/whep/rx", b"v=0\r\n", token=TOKEN,
                                headers={"Content-Type": "application/sdp"})
            assert status != 404
            metrics = call("GET", service.base + "/metrics", token=None)[1]["text"]
            assert metrics.count('stream="rx"') >= 10, "the re-added stream lost metric series"


# -- F12: a cap on streams -------------------------------------------------------------------------
def test_streams_are_capped(tmp_path: Path, tokens_env: None) -> None:
    port = closed_port()
    svc = Service(config(tmp_path, api={"max_streams": 2}, streams=[rtsp("one", f"rtsp://127.0.0.1:{port}/x")]))
    try:
        assert api(svc, "POST", "/api/streams", rtsp("two", f"rtsp://127.0.0.1:{port}/x"))[0] == 201
        status, doc, headers = api(svc, "POST", "/api/streams", rtsp("three", f"rtsp://127.0.0.1:{port}/x"))
        assert status == 429 and "api.max_streams" in doc["error"] and headers.get("Retry-After")
        assert api(svc, "DELETE", "/api/streams/two")[0] == 204
        assert api(svc, "POST", "/api/streams", rtsp("three", f"rtsp://127.0.0.1:{port}/x"))[0] == 201
    finally:
        svc.stop()
    with pytest.raises(UserError, match="max_streams"):
        parse_config({"api": {"max_streams": 1}, "streams": [rtsp("a", "rtsp://h:554/x"),
                                                             rtsp("b", "rtsp://h:554/y")]})


# -- F13: oversized headers are never echoed -------------------------------------------------------
def test_an_oversized_authorization_header_is_not_echoed(service: Service,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s:
        s.sendall(b"GET /api/streams HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                  + b"X" * 9000 + b"\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 431") or reply.startswith(b"HTTP/1.0 431"), reply[:80]
    assert TOKEN.encode() not in reply and b"XXXX" not in reply
    assert TOKEN not in caplog.text and "XXXX" not in caplog.text


# -- F14: the page ---------------------------------------------------------------------------------
def test_the_page_cannot_be_framed(service: Service) -> None:
    status, _, headers = call("GET", service.base + "/", token=None)
    assert status == 200
    assert headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    script = (Path(__file__).parents[1] / "stream" / "live" / "web" / "app.js").read_text()
    assert "history.replaceState" in script  # the token leaves the address bar (tests/test_browser.py)


# -- F16: chunked bodies ---------------------------------------------------------------------------
def test_a_large_chunked_body_gets_413(service: Service) -> None:
    with socket.create_connection(("127.0.0.1", service.port), timeout=20) as s:
        s.sendall(b"POST /api/streams HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                  + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b'{"id": "' + b"a" * 65536
        chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        try:
            for _ in range(160):  # 10 MB, never terminated: the server must answer before the end
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = s.recv(65536)
    assert b" 413 " in reply.split(b"\r\n", 1)[0], reply[:200]


# -- F17: --check finds what run refuses -----------------------------------------------------------
@pytest.mark.parametrize("yaml_text, words", [
    ("auth: {tokens_file: /no/such/tokens}\n", "tokens_file"),
    ("http: {host: 'not a host!!'}\n", "http.host"),
    ("streams:\n  - id: a\n    source: {type: whip}\n    outputs: [{type: rtsp, url: 'rtsp://127.0.0.1:0/x'}]\n",
     "bad port"),
    ("webrtc: {udp_ports: [5000, 4000]}\n", "webrtc.udp_ports"),
])
def test_check_finds_what_run_refuses(tmp_path: Path, yaml_text: str, words: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    env = {**os.environ, "STREAM_REDACT_TOKENS": TOKEN}
    r = subprocess.run([sys.executable, "-m", "stream.cli", "run", "--config", str(path), "--check"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- outbound connections chosen by API clients ----------------------------------------------------
def test_api_sources_only_reach_allowed_networks(tmp_path: Path, tokens_env: None) -> None:
    port = closed_port()
    svc = Service(config(tmp_path, api={"allowed_source_networks": ["10.0.0.0/8", "localhost"]}))
    try:
        status, doc, _ = api(svc, "POST", "/api/streams", rtsp("out", "rtsp://192.0.2.7:554/x"))
        assert status == 403 and "allowed_source_networks" in doc["error"]
        status, doc, _ = api(svc, "POST", "/api/streams", rtsp("lo", f"rtsp://127.0.0.1:{port}/x"))
        assert status == 403
        body = rtsp("out2", f"rtsp://127.0.0.1:{port}/x",
                    outputs=[{"type": "rtsp", "url": "rtsp://192.0.2.9:8554/relay"}])
        assert api(svc, "POST", "/api/streams", body)[0] == 403  # outputs connect out too
        assert api(svc, "POST", "/api/streams", rtsp("named", f"rtsp://localhost:{port}/x"))[0] == 201
        status, doc, _ = api(svc, "POST", "/api/streams", rtsp("nx", "rtsp://no-such-host.invalid/x"))
        assert status == 403 and "does not resolve" in doc["error"]
    finally:
        svc.stop()


def test_default_allows_private_networks_only(service: Service) -> None:
    status, doc, _ = api(service, "POST", "/api/streams", rtsp("pub", "rtsp://192.0.2.7:554/x"))
    assert status == 403 and "allowed_source_networks" in doc["error"]
    assert api(service, "POST", "/api/streams", rtsp("lan", "rtsp://10.255.255.1:554/x"))[0] == 201
    shown = origins_only("open rtsp://***@10.0.0.1:554/a/b?c=d: refused")
    assert shown == "open rtsp://10.0.0.1:554: refused"


# -- events health on /readyz ------------------------------------------------------------------------
def test_readyz_reports_events_that_cannot_be_delivered_without_taking_video_off_air(
        tmp_path: Path, tokens_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("READYZ_SASL_PW", "sasl-Secret-991")
    port = closed_port()
    svc = Service(config(tmp_path, events={
        "kafka": {"bootstrap_servers": [f"127.0.0.1:{port}"], "topic": "t", "connect_timeout_s": 1,
                  "security_protocol": "SASL_PLAINTEXT",
                  "sasl": {"mechanism": "SCRAM-SHA-256", "username": "u", "password_env": "READYZ_SASL_PW"}},
        "spool": {"dir": str(tmp_path / "spool")}}))
    try:
        seen: dict[str, Any] = {}

        def events_down() -> bool:
            seen.update(json.loads(urllib.request.urlopen(svc.base + "/readyz", timeout=5).read()))
            return seen.get("events", {}).get("up") is False

        wait_for(events_down, timeout=30, what="/readyz to report the unreachable brokers")
        body = seen
        assert body["ready"] is True and body["detector"] == "up"  # readiness is the detector's
        assert body["events"]["problem"] and "sasl-Secret-991" not in json.dumps(body)
    finally:
        svc.stop()


def test_readyz_shows_events_up_and_none_when_events_are_off(tmp_path: Path, service: Service) -> None:
    body = json.loads(urllib.request.urlopen(service.base + "/readyz", timeout=5).read())
    assert "events" not in body  # events: {sink: none}
    svc = Service(config(tmp_path, events={"sink": "jsonl", "jsonl": {"path": str(tmp_path / "e.jsonl")}}))
    try:
        body = json.loads(urllib.request.urlopen(svc.base + "/readyz", timeout=5).read())
        assert body["events"] == {"up": True, "problem": None}
    finally:
        svc.stop()
