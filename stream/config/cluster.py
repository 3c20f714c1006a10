"""The ``cluster`` section: how the workers of a deployment share the streams.

``static`` (the default) is the fixed split of ``--shard-index/--shard-count``. ``kafka`` lets a
Kafka consumer group decide: each stream id maps to one partition of the assignments topic, and a
worker runs the streams of the partitions the group gives it, so a dead worker's streams move to
the others within a session timeout and workers come and go without a restart of the rest. The
brokers are the ones of ``events.kafka`` (one Kafka connection to configure and secure).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from stream.config.base import ConfigModel, expand_env
from stream.config.events import _topic


class ClusterConfig(ConfigModel):
    mode: Literal["static", "kafka"] = Field(
        "static", description="static: --shard-index/--shard-count split the config's streams; kafka: a "
        "consumer group assigns streams to the live workers (needs events.kafka)")
    group_id: str = Field("stream-redact", min_length=1, max_length=200,
                          description="the consumer group of the workers that share the streams")
    assignments_topic: str = Field("stream-redact.assignments", description=(
        "topic whose partitions the group assigns; a stream runs on the worker holding the partition its id "
        "hashes to (created with `partitions` partitions if missing)"))
    streams_topic: str = Field("stream-redact.streams", description=(
        "compacted topic of streams added or removed through the API (keyed by stream id, a tombstone on "
        "removal): every worker reads it, so a stream added on one survives restarts and runs on its owner"))
    members_topic: str = Field("stream-redact.members", description=(
        "compacted topic where each worker says where its API answers and what it runs (every few "
        "seconds): how a worker finds a stream's owner (API requests redirected with 307) and who ran a "
        "stream before it moved (stream.moved events)"))
    advertise_url: str | None = Field(None, description=(
        "the base URL other workers and API callers reach this worker's API at, e.g. "
        "http://${POD_IP}:8080 (default: http://<this host's address>:<http.port>)"))
    partitions: int = Field(64, ge=1, le=1024, description=(
        "partitions of the assignments topic: the most workers that can share the streams; fixed once the "
        "topic exists"))
    session_timeout_s: float = Field(
        10.0, ge=6, le=300, description="a worker silent this long leaves the group and its streams move; "
        "a worker that cannot reach the group for this long stops its streams")

    @field_validator("assignments_topic", "streams_topic", "members_topic")
    @classmethod
    def _topics(cls, v: str) -> str:
        return _topic(v)

    @model_validator(mode="after")
    def _distinct_topics(self) -> ClusterConfig:
        names = [self.assignments_topic, self.streams_topic, self.members_topic]
        if len(set(names)) != len(names):
            raise ValueError(f"assignments_topic, streams_topic and members_topic must be three different "
                             f"topics, got {names}")
        return self

    @field_validator("advertise_url")
    @classmethod
    def _advertise(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        v = expand_env(v, info)
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"advertise_url must be an http(s) URL with a host, e.g. http://10.0.0.5:8080, "
                             f"got {v!r}")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("advertise_url is handed to API callers in redirects: give it without user "
                             "info, query or fragment")
        if parts.path not in ("", "/"):
            raise ValueError(f"advertise_url is the API's base URL, without a path (got path {parts.path!r})")
        return v.rstrip("/")
