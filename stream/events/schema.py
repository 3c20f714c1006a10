"""Event schema v1: a CloudEvents 1.0 envelope (structured JSON) around stream-redact's data.

The JSON Schema in ``schemas/events-v1.json`` is the contract; ``schemas/examples/`` holds one
checked example per type. Consumers de-duplicate on ``id`` (delivery is at-least-once) and may
order on ``sequence`` (the sink's acceptance order, which keeps every stream's events in the
order they happened).
"""

from __future__ import annotations

import json
import os
import time as _time
from functools import cache
from importlib import resources
from typing import Any

try:  # ten times faster than the standard library, which matters at thousands of events a second
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency; the standard library still works
    orjson = None

SPECVERSION = "1.0"
SCHEMA_VERSION = 1
DATASCHEMA = "urn:stream-redact:schema:events:v1"
PREFIX = "stream-redact."

TRACK_STARTED = PREFIX + "track.started"
TRACK_UPDATED = PREFIX + "track.updated"
TRACK_ENDED = PREFIX + "track.ended"
STREAM_UP = PREFIX + "stream.up"
STREAM_DOWN = PREFIX + "stream.down"
STREAM_MOVED = PREFIX + "stream.moved"
INCIDENT_STARTED = PREFIX + "incident.started"
INCIDENT_ENDED = PREFIX + "incident.ended"
FRAME_DETECTIONS = PREFIX + "frame.detections"
EVENTS_DROPPED = PREFIX + "pipeline.events_dropped"
AUDIO_SPEECH = PREFIX + "audio.speech"
AUDIO_MUTED = PREFIX + "audio.muted"

AUDIT_ACTIONS = (
    "audit.log.opened", "audit.log.closed", "audit.log.resumed_after_damage", "audit.log.records_lost",
    "audit.login.refused", "audit.access.refused", "audit.users.changed",
    "audit.view.started", "audit.view.ended", "audit.publish.started", "audit.publish.ended",
    "audit.stream.added", "audit.stream.removed", "audit.zones.changed",
    "audit.incident.started", "audit.incident.ended",
    "audit.recording.segment", "audit.recording.deleted",
)
"""every audit record's action (:mod:`stream.events.audit`); each is sent as ``stream-redact.<action>``"""
AUDIT_SUBJECT = "audit"
"""the subject (Kafka key) of audit events: one process's chain stays in one partition, in order"""

TYPES = (TRACK_STARTED, TRACK_UPDATED, TRACK_ENDED, STREAM_UP, STREAM_DOWN, STREAM_MOVED,
         INCIDENT_STARTED, INCIDENT_ENDED, FRAME_DETECTIONS, AUDIO_SPEECH, AUDIO_MUTED, EVENTS_DROPPED,
         *(PREFIX + a for a in AUDIT_ACTIONS))
"""every event type of schema v1"""


def category(event_type: str) -> str:
    """``stream-redact.track.started`` -> ``track`` (per-category topics, metrics labels)."""
    return event_type.removeprefix(PREFIX).split(".", 1)[0]


def short_type(event_type: str) -> str:
    return event_type.removeprefix(PREFIX)


def rfc3339(unix: float) -> str:
    """Unix seconds as RFC 3339 UTC with milliseconds, e.g. 2025-01-31T12:00:00.123Z."""
    ms = round(unix * 1000)
    return _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def envelope(event_type: str, source: str, time: float, data: dict[str, Any],
             subject: str | None = None) -> dict[str, Any]:
    """A new event. ``sequence`` is added by the sink when it accepts the event."""
    event: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": os.urandom(16).hex(),  # 128 random bits
        "source": source,
        "type": event_type,
        "time": rfc3339(time),
        "datacontenttype": "application/json",
        "dataschema": DATASCHEMA,
    }
    if subject is not None:
        event["subject"] = subject
    event["data"] = data
    return event


def encode(event: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, one line (JSON escapes every newline inside strings)."""
    if orjson is not None:
        return orjson.dumps(event)
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def format_sequence(seq: int) -> str:
    """Zero-padded so that string order (CloudEvents ``sequence`` is a string) is numeric order."""
    return f"{seq:020d}"


def schema_files() -> resources.abc.Traversable:
    return resources.files("stream.events") / "schemas"


@cache
def load_schema() -> dict[str, Any]:
    """The JSON Schema of v1 events as shipped with the package."""
    return json.loads((schema_files() / "events-v1.json").read_text())


def examples() -> dict[str, dict[str, Any]]:
    """The checked-in example of every type, by file name."""
    folder = schema_files() / "examples"
    return {f.name: json.loads(f.read_text()) for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".json")}


@cache
def _validator() -> Any:
    import jsonschema

    schema = load_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def validate(event: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` (naming the first bad field) if ``event`` breaks v1."""
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator().iter_errors(event))
    if error is not None:
        raise error
