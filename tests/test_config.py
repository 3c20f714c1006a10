"""The live config: good files load, every bad field is named with its fix, secrets stay masked."""

from __future__ import annotations

import typing
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


@pytest.mark.parametrize("value", [True, False])
def test_faces_cannot_be_switched_off(value: bool) -> None:
    """Faces are always redacted: a config that tries to say otherwise is refused, not ignored."""
    with pytest.raises(UserError) as e:
        parse_config({"detection": {"faces": value}})
    assert "detection.faces: unknown key: faces are always detected and redacted" in str(e.value)
    assert "remove the key" in str(e.value) and e.value.exit_code == 2


def test_every_config_model_is_a_config_model_named_config() -> None:
    """One base (unknown keys refused, values frozen) and one naming rule for every section."""
    from pydantic import BaseModel

    from stream.config import PipelineConfig
    from stream.config.base import ConfigModel

    seen: set[type] = set()
    todo: list[type] = [PipelineConfig]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        assert issubclass(model, ConfigModel), model
        assert model.__name__.endswith("Config"), model
        assert model.model_config["extra"] == "forbid" and model.model_config["frozen"]
        types = [field.annotation for field in model.model_fields.values()]
        while types:  # unwrap Optional, list[...], unions and Annotated down to the classes
            t = types.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                todo.append(t)
            types.extend(typing.get_args(t))
    assert len(seen) > 15  # the walk reached the nested sections (sources, outputs, events, kafka ...)


def test_relative_paths_in_a_config_file_are_relative_to_its_folder(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """File sources and outputs, events, tokens, models and the API recordings folder: never the cwd."""
    conf = tmp_path / "conf"
    (conf / "media").mkdir(parents=True)
    (conf / "rec").mkdir()
    (conf / "api-rec").mkdir()
    (conf / "media" / "cam.mp4").write_bytes(CLIP.read_bytes())
    (conf / "tokens").write_text("t" * 32 + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # none of these exist relative to the working directory
    cfg_file = conf / "c.yaml"
    cfg_file.write_text(
        "streams:\n"
        "  - id: cam\n"
        "    source: {type: file, path: media/cam.mp4}\n"
        "    outputs: [{type: file, path: rec/out.mp4}]\n"
        "auth: {tokens_file: tokens}\n"
        "api: {allow_file_outputs: true, file_output_dir: api-rec}\n"
        "events: {jsonl: {path: ev.jsonl}, spool: {dir: spool}}\n"
        "detection: {model_dir: models, engine_cache_dir: trt}\n")
    cfg = load_config(cfg_file)
    s = cfg.streams[0]
    assert s.source.path == conf / "media" / "cam.mp4"
    assert s.outputs[0].path == conf / "rec" / "out.mp4"
    assert s.file_paths() == [conf.resolve() / "rec" / "out.mp4"]
    assert cfg.auth.tokens_file == conf / "tokens"
    assert cfg.api.file_output_dir == conf / "api-rec"
    assert cfg.events.jsonl.file() == conf / "ev.jsonl" and cfg.events.spool.folder() == conf / "spool"
    assert cfg.detection.model_dir == conf / "models" and cfg.detection.engine_cache_dir == conf / "trt"
    # the same file read from its own folder resolves to the same places
    monkeypatch.chdir(conf)
    assert load_config(Path("c.yaml")).streams[0].source.path == conf / "media" / "cam.mp4"


def test_a_relative_path_that_only_exists_under_the_cwd_is_refused(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cam.mp4").write_bytes(CLIP.read_bytes())  # next to the cwd, not the config
    (conf / "c.yaml").write_text("streams:\n  - id: cam\n    source: {type: file, path: cam.mp4}\n")
    with pytest.raises(UserError, match=rf"streams\[0\].source.path: {conf / 'cam.mp4'} does not exist"):
        load_config(conf / "c.yaml")


def test_api_bodies_are_taken_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same models validate API bodies without the config file's context: no ${VAR}, no base folder."""
    from stream.config import StreamConfig

    monkeypatch.setenv("CAM_PASS", "hunter2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cam.mp4").write_bytes(CLIP.read_bytes())
    body = {"id": "a", "source": {"type": "file", "path": "cam.mp4"},
            "outputs": [{"type": "rtsp", "url": "rtsp://u:${CAM_PASS}@10.0.0.5/x"}]}
    cfg = StreamConfig.model_validate(body)
    assert cfg.source.path == Path("cam.mp4")
    assert cfg.outputs[0].url == "rtsp://u:${CAM_PASS}@10.0.0.5/x"


@pytest.mark.parametrize(("events", "expected"), [
    ({"kafka": {"bootstrap_servers": ["${EV_HOST}:9092"], "security_protocol": "SASL_SSL",
                "sasl": {"mechanism": "SCRAM-SHA-512", "username": "${EV_USER}", "password_env": "EV_PW"}}},
     None),
    ({"kafka": {"bootstrap_servers": ["k:9092"], "security_protocol": "SASL_SSL",
                "sasl": {"mechanism": "SCRAM-SHA-512", "username": "${EV_NOT_SET}",
                         "password_env": "EV_PW"}}},
     "events.kafka.sasl.username: environment variable EV_NOT_SET is not set; export it or write the value"),
    ({"kafka": {"bootstrap_servers": ["${EV_NOT_SET}:9092"]}},
     "events.kafka.bootstrap_servers: environment variable EV_NOT_SET is not set"),
    ({"jsonl": {"path": "${EV_NOT_SET}/e.jsonl"}},
     "events.jsonl.path: environment variable EV_NOT_SET is not set"),
])
def test_environment_variables_in_events_follow_the_same_rule(monkeypatch: pytest.MonkeyPatch, events: dict,
                                                              expected: str | None) -> None:
    monkeypatch.setenv("EV_HOST", "broker-1")
    monkeypatch.setenv("EV_USER", "alice")
    monkeypatch.setenv("EV_PW", "pw-of-alice")
    monkeypatch.delenv("EV_NOT_SET", raising=False)
    if expected is None:
        kafka = parse_config({"events": events}).events.kafka
        assert kafka is not None and kafka.sasl is not None
        assert kafka.bootstrap_servers == ["broker-1:9092"] and kafka.sasl.username == "alice"
        return
    with pytest.raises(UserError) as e:
        parse_config({"events": events})
    assert expected in str(e.value)
