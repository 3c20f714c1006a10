"""The ``events`` section of the pipeline config: which sink, where, how durable, how to reach Kafka.

Secrets never sit in the config file: a SASL password is named by the environment variable or
the file that holds it, checked to exist when the config is loaded, and read only when a
connection is made. Relative paths resolve against the folder of the config file. Without a
path, the events file and the spool live in the service's state directory (``$STATE_DIRECTORY``
as systemd sets it, else ``$XDG_STATE_HOME/stream-redact``, else ``~/.local/state/stream-redact``),
never in whatever directory the process happened to be started from.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from stream.config.base import ConfigModel, config_path, env_name, expand_env

_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

Fsync = Literal["always", "interval", "never"]
MiB = 1 << 20


def state_dir() -> Path:
    """Where events go when no path is configured (created when the sink starts)."""
    systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd)
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "stream-redact"


def _existing_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file; give the path of {what}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path} is not readable by this user; fix its permissions")
    return path


def _topic(value: str) -> str:
    if not _TOPIC.match(value) or value in (".", ".."):
        raise ValueError(f"{value!r} is not a valid Kafka topic name; use 1-249 letters, digits, '.', '_', "
                         "'-'")
    return value


class JsonlConfig(ConfigModel):
    """Events appended to a local JSON Lines file: the embedded default when no Kafka is configured."""

    path: Path | None = Field(None, description="file the events are appended to (one JSON object a line); "
                                                "relative to the config file's folder; default: "
                                                "events.jsonl in the state directory")
    fsync: Fsync = Field("interval", description="always: fsync after every batch written; interval: at "
                                                 "most every fsync_interval_ms; never: leave it to the OS")
    fsync_interval_ms: int = Field(1000, ge=10, le=60_000, description="fsync period for fsync: interval")

    @field_validator("path")
    @classmethod
    def _path(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None:
            return v
        v = config_path(v, info)
        if v.is_dir():
            raise ValueError(f"{v} is a folder; give a file name such as {v / 'events.jsonl'}")
        if not v.parent.is_dir():
            raise ValueError(f"folder {v.parent} does not exist; create it or choose another path")
        return v

    def file(self) -> Path:
        return self.path if self.path is not None else state_dir() / "events.jsonl"


class SpoolConfig(ConfigModel):
    """The on-disk queue in front of Kafka: every event is written here before it is sent."""

    dir: Path | None = Field(None, description="folder for the spool files (created if missing), one per "
                                               "pipeline; relative to the config file's folder; default: "
                                               "spool/ in the state directory")
    max_bytes: int = Field(1024 * MiB, ge=1 * MiB, le=1 << 40,
                           description="most bytes the spool may hold on disk; beyond it `overflow` applies")
    overflow: Literal["drop_oldest", "drop_newest"] = Field(
        "drop_oldest", description="when the spool is full: drop the oldest undelivered events (the newest "
                                   "matter most to a live dashboard) or refuse new ones; either is counted "
                                   "and alarmed")
    fsync: Fsync = Field("interval", description="always: an event counts as accepted only once fsynced; "
                                                 "interval: fsync at most every fsync_interval_ms; never: "
                                                 "leave it to the OS (survives a process crash, not a "
                                                 "power cut)")
    fsync_interval_ms: int = Field(1000, ge=10, le=60_000, description="fsync period for fsync: interval")

    @field_validator("dir")
    @classmethod
    def _dir(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None:
            return v
        v = config_path(v, info)
        if v.exists() and not v.is_dir():
            raise ValueError(f"{v} exists and is not a folder; choose a folder for the spool")
        parent = next((p for p in (v, *v.parents) if p.exists()), None)
        if parent is None or not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"{v} cannot be created or written by this user; choose a writable folder")
        return v

    def folder(self) -> Path:
        return self.dir if self.dir is not None else state_dir() / "spool"


class SslConfig(ConfigModel):
    """TLS towards the brokers (security_protocol SSL or SASL_SSL)."""

    ca_file: Path | None = Field(None, description="PEM bundle of the CA that signed the brokers' "
                                                   "certificates; default: the system's CAs")
    cert_file: Path | None = Field(None, description="client certificate (PEM) for mutual TLS")
    key_file: Path | None = Field(None, description="client private key (PEM) for mutual TLS")
    check_hostname: bool = Field(True, description="check that the broker's certificate names its host")

    @field_validator("ca_file")
    @classmethod
    def _ca(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        what = "the CA bundle (PEM) that signed the brokers' certificates"
        return None if v is None else _existing_file(config_path(v, info), what)

    @field_validator("cert_file", "key_file")
    @classmethod
    def _client(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else _existing_file(config_path(v, info), "a PEM file")

    @model_validator(mode="after")
    def _pair(self) -> SslConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together; give both for mutual TLS, or neither")
        return self


class SaslConfig(ConfigModel):
    """SASL login (security_protocol SASL_SSL or SASL_PLAINTEXT); the password comes from the
    environment or a file, never from the config itself."""

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        description="PLAIN (only over SSL) or SCRAM-SHA-256/512")
    username: str = Field(min_length=1, description="user name; may name environment variables as ${VAR}")
    password_env: str | None = Field(None, description="name of the environment variable holding the "
                                                       "password")
    password_file: Path | None = Field(None, description="file holding the password (e.g. a mounted secret); "
                                                         "one trailing newline is ignored")

    @field_validator("username")
    @classmethod
    def _user(cls, v: str, info: ValidationInfo) -> str:
        return expand_env(v, info)

    @field_validator("password_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not env_name(v):
            raise ValueError(f"{v!r} is not an environment variable name; give the variable's name, "
                             "not the password")
        if not os.environ.get(v):
            raise ValueError(f"environment variable {v} is not set or empty; export it with the password")
        return v

    @field_validator("password_file")
    @classmethod
    def _file(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None:
            return v
        v = _existing_file(config_path(v, info), "the file that holds the password")
        if v.stat().st_size == 0:
            raise ValueError(f"{v} is empty; write the password into it")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> SaslConfig:
        if (self.password_env is None) == (self.password_file is None):
            raise ValueError("give exactly one of password_env (an environment variable's name) or "
                             "password_file (a file holding the password)")
        return self

    def password(self) -> str:
        """Read the secret now (it may have been rotated since the config was loaded)."""
        if self.password_env is not None:
            value = os.environ.get(self.password_env, "")
            if not value:
                raise ValueError(f"events.kafka.sasl.password_env: environment variable {self.password_env} "
                                 "is no longer set")
            return value
        assert self.password_file is not None
        try:
            text = self.password_file.read_text()
        except OSError as e:
            raise ValueError(f"events.kafka.sasl.password_file: cannot read {self.password_file}: "
                             f"{e.strerror}") from None
        return text[:-1] if text.endswith("\n") else text

    def where(self) -> str:
        """Where the password came from, for error messages (never the password itself)."""
        return f"${self.password_env}" if self.password_env else str(self.password_file)


class TopicsConfig(ConfigModel):
    """Per-category topics; each falls back to ``kafka.topic``."""

    track: str | None = Field(None, description="track started/updated/ended")
    stream: str | None = Field(None, description="stream up/down, stream moved (cluster)")
    incident: str | None = Field(None, description="fail-closed incidents")
    frame: str | None = Field(None, description="per-frame detections (when events.per_frame)")
    audio: str | None = Field(None, description="speech found in the audio, audio muted on a fault")
    pipeline: str | None = Field(None, description="the pipeline's own alarms (events dropped)")

    @field_validator("*")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else _topic(v)


def _host_port(value: str) -> str:
    value = value.strip()
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} has no port; write host:port, e.g. kafka:9092")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} has a bad port; use 1-65535")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"{value!r}: write IPv6 addresses in brackets, e.g. [::1]:9092")
    if "/" in host or "@" in host:
        raise ValueError(f"{value!r} is not host:port; give the broker's address without scheme or user")
    return value


class KafkaConfig(ConfigModel):
    """Where events go when the sink is Kafka. Producer settings that make delivery safe (acks=all,
    idempotence, retries) are fixed, not configurable."""

    bootstrap_servers: list[str] = Field(min_length=1, description="host:port of one or more brokers; a "
                                                                   "comma-separated string also works; "
                                                                   "may use ${VAR}")
    topic: str = Field("stream-redact.events", description="topic for every event (see `topics` to split)")
    topics: TopicsConfig = TopicsConfig()
    client_id: str = Field("stream-redact", min_length=1, max_length=200, description="client id the "
                                                                                        "brokers see")
    auto_create_topic: bool = Field(False, description="let the broker create a missing topic (if it allows "
                                                       "that); off: a missing topic is an alarm")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="SSL or SASL_SSL for TLS (see ssl), SASL_* to log in (see sasl)")
    ssl: SslConfig | None = Field(None, description="TLS settings (for SSL and SASL_SSL)")
    sasl: SaslConfig | None = Field(None, description="SASL login (for SASL_PLAINTEXT and SASL_SSL)")
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "gzip", description="batch compression; snappy/lz4/zstd need their Python packages installed")
    linger_ms: int = Field(20, ge=0, le=5000, description="wait this long to fill a batch")
    batch_bytes: int = Field(256 * 1024, ge=1024, le=16 * MiB, description="largest batch per partition")
    request_timeout_ms: int = Field(15_000, ge=1000, le=300_000, description="one request's timeout")
    connect_timeout_s: float = Field(10.0, gt=0, le=300, description="give up one connection attempt after "
                                                                    "this long (then retry with backoff)")

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        return [s for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return [_host_port(expand_env(s, info)) for s in v]

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        return _topic(v)

    @model_validator(mode="after")
    def _security(self) -> KafkaConfig:
        proto = self.security_protocol
        if proto.startswith("SASL") and self.sasl is None:
            raise ValueError(f"security_protocol {proto} needs a sasl section (mechanism, username, "
                             "password_env or password_file)")
        if not proto.startswith("SASL") and self.sasl is not None:
            raise ValueError(f"sasl is set but security_protocol is {proto}; use SASL_SSL (or "
                             "SASL_PLAINTEXT on a trusted network)")
        if self.ssl is not None and not proto.endswith("SSL"):
            raise ValueError(f"ssl is set but security_protocol is {proto}; use SSL or SASL_SSL")
        if proto == "SASL_PLAINTEXT" and self.sasl is not None and self.sasl.mechanism == "PLAIN":
            raise ValueError("SASL PLAIN over SASL_PLAINTEXT sends the password in clear text; use SASL_SSL")
        if self.compression not in ("none", "gzip"):
            from kafka import codec

            checks = {"snappy": codec.has_snappy, "lz4": codec.has_lz4, "zstd": codec.has_zstd}
            have = checks[self.compression]
            if not have():
                package = {"snappy": "python-snappy", "lz4": "lz4", "zstd": "zstandard"}[self.compression]
                raise ValueError(f"compression {self.compression} needs the {package} package; "
                                 f"`pip install {package}` or use gzip")
        return self

    def topic_for(self, category: str) -> str:
        return getattr(self.topics, category, None) or self.topic


class EventsConfig(ConfigModel):
    """Detection, stream and incident events: what is emitted and where it goes."""

    sink: Literal["jsonl", "kafka", "none"] | None = Field(
        None, description="jsonl, kafka or none; default: kafka when a kafka section is given, else jsonl")
    source: str | None = Field(None, min_length=1, max_length=500,
                               description="CloudEvents `source` of every event; default "
                                           "/stream-redact/<hostname>")
    per_frame: bool = Field(False, description="also emit one event per frame with every box (busy: "
                                               "frames/s events per stream)")
    track_update_interval_s: float = Field(
        1.0, ge=0, le=3600, description="at most one track.updated per track this often; 0: none")
    queue_size: int = Field(10_000, ge=100, le=1_000_000,
                            description="events waiting in memory for the sink thread; beyond it new "
                                        "events are dropped and counted")
    delivery: Literal["thread", "process"] = Field(
        "process", description="where events are sent to Kafka from: process: a process of its own that "
                               "reads the spool (the pipeline only appends to it), so creating events and "
                               "the Kafka client do not share one core (the faster on two cores or more); "
                               "thread: a thread of the pipeline process. The same guarantees either way; "
                               "no effect on jsonl, which the pipeline writes itself")
    flush_timeout_s: float = Field(5.0, ge=0, le=300,
                                   description="at stop, keep delivering this long; what is left stays in "
                                               "the spool for the next start")
    jsonl: JsonlConfig = JsonlConfig()
    kafka: KafkaConfig | None = None
    spool: SpoolConfig = SpoolConfig()

    @model_validator(mode="after")
    def _sink(self) -> EventsConfig:
        if self.sink == "kafka" and self.kafka is None:
            raise ValueError("sink is kafka but there is no kafka section; add kafka.bootstrap_servers")
        return self

    @property
    def selected(self) -> str:
        """The sink in use: the explicit ``sink``, else kafka when configured, else jsonl."""
        return self.sink or ("kafka" if self.kafka is not None else "jsonl")

    @property
    def source_uri(self) -> str:
        return self.source or f"/stream-redact/{socket.gethostname()}"
