"""JSON Lines sink: every event appended to one local file, one JSON object a line.

The embedded default when no Kafka is configured. The file is the durable store, so an event is
delivered (and accepted) once its line is written; the fsync policy decides when it also
survives a power cut. A restart appends to the same file and carries ``sequence`` on from its
last line. A line cut short by a crash is completed with a newline so the next event starts on
a line of its own (readers skip the one broken line).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from stream.errors import UserError
from stream.events import schema
from stream.events.config import JsonlConfig
from stream.events.sink import EventSink, FsyncPolicy
from stream.metrics import Metrics

log = logging.getLogger(__name__)


def last_sequence(path: Path) -> int:
    """The ``sequence`` of the last complete event in ``path`` (0 for a new or empty file)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            pos = size
            tail = b""
            while pos > 0:
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                tail = f.read(step) + tail
                lines = tail.split(b"\n")
                for line in reversed(lines[1:] if pos > 0 else lines):
                    try:
                        return int(json.loads(line)["sequence"])
                    except (ValueError, KeyError, TypeError):
                        continue
                tail = lines[0]
    except FileNotFoundError:
        pass
    return 0


class JsonlSink(EventSink):
    name = "jsonl"

    def __init__(self, config: JsonlConfig, metrics: Metrics, queue_size: int = 10_000) -> None:
        super().__init__(metrics, queue_size)
        self.path = config.file()
        self._fsync = FsyncPolicy(config.fsync, config.fsync_interval_ms / 1000)
        try:
            if config.path is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._seq = last_sequence(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            size = os.fstat(self._fd).st_size
            if size:
                with self.path.open("rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        os.write(self._fd, b"\n")  # a line cut short by a crash stays on its own
        except OSError as e:
            raise UserError(f"events.jsonl.path: cannot open {self.path} for appending: {e.strerror}; "
                            "choose a writable file") from None
        self._failing = False
        metrics.events_sink_up.labels(self.name).set(1)

    def _store(self, batch: list[dict[str, Any]]) -> None:
        lines = []
        for event in batch:
            self._seq += 1
            event["sequence"] = schema.format_sequence(self._seq)
            lines.append(schema.encode(event))
        data = b"\n".join(lines) + b"\n"
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            self._fsync.after_write(self._fd)
        except OSError as e:
            self._seq -= len(batch)
            self.metrics.events_failed.labels(self.name, "write_error").inc(len(batch))
            self.metrics.events_dropped.labels("write_error").inc(len(batch))
            self.metrics.events_sink_up.labels(self.name).set(0)
            if not self._failing:
                log.error("events: cannot write to %s (%s); events are dropped until it works again: free "
                          "disk space or fix the file's permissions", self.path, e.strerror)
            self._failing = True
            return
        if self._failing:
            log.warning("events: writing to %s again", self.path)
            self._failing = False
            self.metrics.events_sink_up.labels(self.name).set(1)
        now = time.time()
        self.metrics.events_delivered.labels(self.name).inc(len(batch))
        hist = self.metrics.events_delivery_seconds.labels(self.name)
        for event in batch:
            hist.observe(max(0.0, now - _unix(event["time"])))

    def _idle_tick(self) -> None:
        self._fsync.tick(self._fd)

    def _stop_storage(self, deadline: float) -> None:
        try:
            self._fsync.sync(self._fd)
            os.close(self._fd)
        except OSError as e:
            log.error("events: closing %s failed: %s", self.path, e.strerror)
        self.metrics.events_sink_up.labels(self.name).set(0)


def _unix(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
