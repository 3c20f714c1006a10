"""The live config: good files load, every bad field is named with its fix, secrets stay masked."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ROOT, run_cli

from stream.config import load_config, parse_config
from stream.core.errors import UserError
from stream.core.urls import mask_text, mask_url

CLIP = Path(__file__).parent / "fixtures" / "astronaut_256.jpg"  # any existing file will do for `path`


def rtsp_stream(sid: str = "cam1", **source: object) -> dict:
    return {"id": sid, "source": {"type": "rtsp", "url": "rtsp://127.0.0.1:8554/cam", **source}}


def test_minimal_config_gets_safe_defaults() -> None:
    cfg = parse_config({"streams": [rtsp_stream()]})
    s = cfg.streams[0]
    assert s.source.transport == "tcp"
    assert cfg.fail_closed.action == "blank"
    assert cfg.fail_closed.max_latency_ms == 1000
    assert cfg.redaction.coast >= 3
    assert cfg.http.host == "127.0.0.1"


def test_env_vars_expand_in_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAM_PASS", "hunter2")
    cfg = parse_config({"streams": [rtsp_stream(url="rtsp://admin:${CAM_PASS}@10.0.0.5/ch1")]})
    assert cfg.streams[0].source.url == "rtsp://admin:hunter2@10.0.0.5/ch1"


def test_unset_env_var_in_url_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAM_PASS", raising=False)
    with pytest.raises(UserError, match="environment variable CAM_PASS is not set"):
        parse_config({"streams": [rtsp_stream(url="rtsp://admin:${CAM_PASS}@10.0.0.5/ch1")]})


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAM_USER", "viewer")
    monkeypatch.setenv("CAM_PASS", "pw")
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "deploy" / "config.example.yaml")
    assert [s.id for s in cfg.streams] == ["gate-north", "lobby-demo"]


@pytest.mark.parametrize(("doc", "expected"), [
    ({"streams": [rtsp_stream(url="http://cam/x")]},
     "streams[0].source.url: 'http://cam/x' is not an RTSP URL"),
    ({"streams": [rtsp_stream(url="rtsp:///x")]}, "streams[0].source.url: 'rtsp:///x' has no host"),
    ({"streams": [rtsp_stream(url="rtsp://h:99999/x")]}, "has a bad port"),
    ({"streams": [rtsp_stream(transport="quic")]},
     "streams[0].source.transport: Input should be 'tcp' or 'udp'"),
    ({"streams": [rtsp_stream(open_timeout_s=0)]}, "streams[0].source.open_timeout_s"),
    ({"streams": [rtsp_stream(reconect={})]}, "streams[0].source.reconect: unknown key"),
    ({"streams": [rtsp_stream(reconnect={"initial_s": 5, "max_s": 1})]}, "max_s must be >= initial_s"),
    ({"streams": [{"id": "a", "source": {"type": "webcam"}}]}, "streams[0].source: unknown type"),
    ({"streams": [{"id": "a", "source": {"url": "rtsp://h/x"}}]}, "missing 'type'"),
    ({"streams": [rtsp_stream("bad id!")]}, "streams[0].id: 'bad id!' is not a valid stream id"),
    ({"streams": [rtsp_stream(), rtsp_stream()]}, "stream id 'cam1' is used twice"),
    ({"streams": [{"id": "f", "source": {"type": "file", "path": "/nope.mp4"}}]},
     "streams[0].source.path: /nope.mp4 does not exist"),
    ({"streams": [{**rtsp_stream(), "outputs": [{"type": "file", "path": "/no/such/dir/x.mp4"}]}]},
     "streams[0].outputs[0].path: folder /no/such/dir does not exist"),
    ({"streams": [{**rtsp_stream(), "outputs": [{"type": "file", "path": "/tmp/x.avi"}]}]},
     "use a .mp4, .mkv, .mov or .ts file name"),
    ({"streams": [{**rtsp_stream(), "outputs": [{"type": "rtsp", "url": "udp://h/x"}]}]},
     "streams[0].outputs[0].url"),
    ({"batcher": {"max_batch": 0}}, "batcher.max_batch: Input should be greater than or equal to 1"),
    ({"batcher": {"max_wait_ms": -1}}, "batcher.max_wait_ms"),
    ({"fail_closed": {"action": "pass"}}, "fail_closed.action: Input should be 'blank' or 'withhold'"),
    ({"fail_closed": {"max_latency_ms": 10}}, "fail_closed.max_latency_ms"),
    ({"detection": {"preset": "fast", "plate_every": 20}, "redaction": {"coast": 5}},
     "redaction.coast (5) is shorter than the detector gap (20 frames)"),
    ({"detection": {"providers": ["gpu"]}}, "detection.providers[0]"),
    ({"max_latency_ms": 100}, "max_latency_ms: unknown key"),
    ({"http": {"port": 70000}}, "http.port"),
    (["streams"], "the top level must be a mapping"),
])
def test_bad_config_names_the_field(doc: object, expected: str) -> None:
    with pytest.raises(UserError) as e:
        parse_config(doc)
    assert expected in str(e.value)
    assert e.value.exit_code == 2


def test_credentials_never_in_config_errors() -> None:
    with pytest.raises(UserError) as e:
        parse_config({"streams": [rtsp_stream(url="http://admin:hunter2@cam/x")]})
    assert "hunter2" not in str(e.value)
    assert "***@cam" in str(e.value)


@pytest.mark.parametrize(("url", "masked"), [
    ("rtsp://admin:hunter2@10.0.0.5:554/ch1", "rtsp://***@10.0.0.5:554/ch1"),
    ("rtsp://admin@10.0.0.5/ch1", "rtsp://***@10.0.0.5/ch1"),
    ("rtsp://10.0.0.5/ch1?token=abc&x=1", "rtsp://10.0.0.5/ch1?token=***&x=***"),
    ("rtsp://10.0.0.5/ch1", "rtsp://10.0.0.5/ch1"),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_mask_text_removes_password_anywhere() -> None:
    url = "rtsp://admin:hunter2@cam/x"
    text = mask_text(f"could not open {url}: server said hunter2 is wrong", url)
    assert "hunter2" not in text
    assert "rtsp://***@cam/x" in text


def test_load_config_yaml_errors(tmp_path: Path) -> None:
    missing = tmp_path / "none.yaml"
    with pytest.raises(UserError, match="not found; pass an existing YAML file"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("streams:\n  - id: a\n   source: [\n")
    with pytest.raises(UserError, match=r"is not valid YAML at line \d+"):
        load_config(bad)


def test_run_check_reports_every_bad_field(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("streams:\n  - id: cam1\n    source: {type: rtsp, url: 'rtsp://u:pw123@h/x', "
                   "transprot: tcp}\nbatcher: {max_batch: 0}\n")
    r = run_cli("run", "--config", cfg, "--check", timeout=60)
    assert r.returncode == 2
    assert "streams[0].source.transprot: unknown key" in r.stderr
    assert "batcher.max_batch" in r.stderr
    assert "pw123" not in r.stderr
    assert "Traceback" not in r.stderr


def test_run_check_accepts_a_good_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"streams:\n  - id: cam1\n    source: {{type: file, path: '{CLIP}'}}\n")
    r = run_cli("run", "--config", cfg, "--check", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "1 stream(s)" in r.stderr
