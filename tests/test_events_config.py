"""The `events` config section: defaults, relative paths, every bad value named with its fix, secrets
read from the environment or a file and never shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_cli

from stream.config import load_config, parse_config
from stream.core.errors import UserError
from stream.events.kafka import client_settings

SECRET = "Pw-0f-the-broker-7731"


def kafka(**extra: object) -> dict:
    return {"events": {"kafka": {"bootstrap_servers": ["127.0.0.1:9092"], **extra}}}


@pytest.mark.parametrize(("env", "where"), [
    ({"STATE_DIRECTORY": "{tmp}/systemd:{tmp}/other"}, "{tmp}/systemd"),
    ({"XDG_STATE_HOME": "{tmp}/xdg"}, "{tmp}/xdg/stream-redact"),
    ({"HOME": "{tmp}/home"}, "{tmp}/home/.local/state/stream-redact"),
])
def test_default_is_a_jsonl_file_in_the_state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        env: dict, where: str) -> None:
    for name in ("STATE_DIRECTORY", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("streams: []\n")
    ev = load_config(cfg_file).events
    assert ev.selected == "jsonl"
    assert ev.jsonl.file() == Path(where.format(tmp=tmp_path)) / "events.jsonl"
    assert ev.spool.folder() == Path(where.format(tmp=tmp_path)) / "spool"
    assert ev.per_frame is False and ev.track_update_interval_s == 1.0
    assert ev.source_uri.startswith("/stream-redact/")
    from stream.core.metrics import Metrics
    from stream.events.sinks import build_sink

    sink = build_sink(load_config(cfg_file), Metrics())  # creates the state directory
    assert sink is not None
    sink.start()
    sink.close(1)
    assert ev.jsonl.file().exists()


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("events:\n  jsonl: {path: ev.jsonl}\n  spool: {dir: sp}\n")
    ev = load_config(cfg_file).events
    assert ev.jsonl.file() == tmp_path / "ev.jsonl" and ev.spool.folder() == tmp_path / "sp"


def test_kafka_section_selects_kafka_with_safe_defaults(tmp_path: Path) -> None:
    doc = {"events": {"kafka": {"bootstrap_servers": "k1:9092, k2:9093"}}}
    ev = parse_config(doc, base_dir=tmp_path).events
    assert ev.selected == "kafka"
    assert ev.kafka is not None
    assert ev.kafka.bootstrap_servers == ["k1:9092", "k2:9093"]
    assert ev.kafka.topic == "stream-redact.events"
    assert ev.kafka.topic_for("track") == "stream-redact.events"
    assert ev.kafka.auto_create_topic is False and ev.kafka.compression == "gzip"
    assert ev.spool.overflow == "drop_oldest" and ev.spool.fsync == "interval"
    split = parse_config(kafka(topics={"incident": "alarms"})).events.kafka
    assert split is not None and split.topic_for("incident") == "alarms"
    assert split.topic_for("track") == split.topic


@pytest.mark.parametrize(("doc", "expected"), [
    (kafka(bootstrap_servers=["kafka"]),
     "events.kafka.bootstrap_servers: 'kafka' has no port; write host:port"),
    (kafka(bootstrap_servers=["kafka:0"]), "'kafka:0' has a bad port"),
    (kafka(bootstrap_servers=[]), "events.kafka.bootstrap_servers"),
    (kafka(topic="bad topic!"), "events.kafka.topic: 'bad topic!' is not a valid Kafka topic name"),
    (kafka(topics={"track": "a/b"}), "events.kafka.topics.track"),
    (kafka(security_protocol="SASL_SSL"), "security_protocol SASL_SSL needs a sasl section"),
    (kafka(sasl={"mechanism": "PLAIN", "username": "u", "password_env": "EV_PW"}),
     "sasl is set but security_protocol is PLAINTEXT; use SASL_SSL"),
    (kafka(security_protocol="SASL_PLAINTEXT",
           sasl={"mechanism": "PLAIN", "username": "u", "password_env": "EV_PW"}),
     "SASL PLAIN over SASL_PLAINTEXT sends the password in clear text"),
    (kafka(security_protocol="SSL", ssl={"ca_file": "/nope/ca.pem"}),
     "events.kafka.ssl.ca_file: /nope/ca.pem does not exist or is not a file; give the path of the CA "
     "bundle"),
    (kafka(ssl={}), "ssl is set but security_protocol is PLAINTEXT"),
    (kafka(security_protocol="SASL_SSL", sasl={"mechanism": "SCRAM-SHA-512", "username": "u"}),
     "give exactly one of password_env"),
    (kafka(security_protocol="SASL_SSL", sasl={"mechanism": "SCRAM-SHA-512", "username": "u",
                                               "password_env": "EV_UNSET_PW"}),
     "events.kafka.sasl.password_env: environment variable EV_UNSET_PW is not set or empty"),
    (kafka(security_protocol="SASL_SSL", sasl={"mechanism": "SCRAM-SHA-512", "username": "u",
                                               "password_env": "hunter2 hunter2"}),
     "is not an environment variable name; give the variable's name, not the password"),
    (kafka(security_protocol="SASL_SSL", sasl={"mechanism": "SCRAM-SHA-512", "username": "u",
                                               "password_file": "/nope/pw"}),
     "events.kafka.sasl.password_file: /nope/pw does not exist"),
    (kafka(security_protocol="SASL_SSL", sasl={"mechanism": "GSSAPI", "username": "u", "password_env": "X"}),
     "events.kafka.sasl.mechanism"),
    (kafka(compression="brotli"), "events.kafka.compression"),
    (kafka(linger_ms=-1), "events.kafka.linger_ms"),
    (kafka(bootstrap="k:1"), "events.kafka.bootstrap: unknown key"),
    ({"events": {"sink": "kafka"}}, "events: sink is kafka but there is no kafka section"),
    ({"events": {"sink": "mqtt"}}, "events.sink"),
    ({"events": {"spool": {"max_bytes": 10}}}, "events.spool.max_bytes"),
    ({"events": {"spool": {"overflow": "block"}}}, "events.spool.overflow"),
    ({"events": {"jsonl": {"path": "/no/such/dir/e.jsonl"}}},
     "events.jsonl.path: folder /no/such/dir does not exist"),
    ({"events": {"track_update_interval_s": -1}}, "events.track_update_interval_s"),
    ({"events": {"per_frames": True}}, "events.per_frames: unknown key"),
])
def test_bad_events_config_names_the_field(doc: dict, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EV_UNSET_PW", raising=False)
    monkeypatch.setenv("EV_PW", SECRET)
    with pytest.raises(UserError) as e:
        parse_config(doc)
    assert expected in str(e.value)
    assert e.value.exit_code == 2
    assert SECRET not in str(e.value)


def test_compression_without_its_package_says_what_to_install() -> None:
    from kafka import codec

    if codec.has_lz4():
        pytest.skip("lz4 is installed here")
    with pytest.raises(UserError, match=r"compression lz4 needs the lz4 package; `pip install lz4` or use "
                                        r"gzip"):
        parse_config(kafka(compression="lz4"))


def test_sasl_password_comes_from_env_or_file_and_is_never_shown(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EV_PW", SECRET)
    cfg = parse_config(kafka(security_protocol="SASL_SSL",
                             sasl={"mechanism": "SCRAM-SHA-256", "username": "alice",
                                   "password_env": "EV_PW"}))
    assert cfg.events.kafka is not None and cfg.events.kafka.sasl is not None
    assert SECRET not in repr(cfg) and SECRET not in cfg.model_dump_json()
    assert client_settings(cfg.events.kafka)["sasl_plain_password"] == SECRET
    assert cfg.events.kafka.sasl.where() == "$EV_PW"
    pw = tmp_path / "pw"
    pw.write_text(SECRET + "\n")
    cfg = parse_config(kafka(security_protocol="SASL_SSL",
                             sasl={"mechanism": "SCRAM-SHA-512", "username": "alice",
                                   "password_file": str(pw)}))
    assert cfg.events.kafka is not None and cfg.events.kafka.sasl is not None
    assert cfg.events.kafka.sasl.password() == SECRET  # one trailing newline dropped
    assert SECRET not in repr(cfg)
    # a bad value elsewhere in the same section never echoes the secret
    with pytest.raises(UserError) as e:
        parse_config(kafka(security_protocol="SASL_SSL", linger_ms="x",
                           sasl={"mechanism": "SCRAM-SHA-512", "username": "alice", "password_env": "EV_PW"}))
    assert SECRET not in str(e.value)


def test_run_check_validates_the_events_section(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("streams: []\nevents:\n  kafka:\n    bootstrap_servers: [kafka:9092]\n"
                   "    security_protocol: SSL\n    ssl: {ca_file: missing-ca.pem}\n")
    r = run_cli("run", "--config", cfg, "--check", timeout=60)
    assert r.returncode == 2
    assert f"events.kafka.ssl.ca_file: {tmp_path / 'missing-ca.pem'} does not exist" in r.stderr
    assert "Traceback" not in r.stderr
