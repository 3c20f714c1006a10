"""JSON Lines sink: every event appended to one local file, one JSON object a line.

The embedded default when no Kafka is configured. The file is the durable store, so an event is
delivered (and accepted) once its line is written; the fsync policy decides when it also
survives a power cut. A restart appends to the same file and carries ``sequence`` on from its
last line. A line cut short by a crash is completed with a newline so the next event starts on
a line of its own (readers skip the one broken line).

A write the disk refuses (full, quota, I/O error) keeps the lines that reached the file whole and
cuts the file back to its last newline, so no event is ever glued to a torn one; the events not
written are dropped and counted, their sequence numbers are used again (no gap), and writing
carries on with whole lines once the disk takes them (see :mod:`stream.events.sink`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from stream.config.events import JsonlConfig
from stream.core.errors import UserError
from stream.core.metrics import Metrics
from stream.events import schema
from stream.events.sink import EventSink, FsyncPolicy, write_records

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
        self._torn_at: int | None = None
        """the file's size before a failed write whose torn line could not be cut off yet"""
        self._closed = False
        self._update_up()

    def _storage_dir(self) -> Path:
        return self.path.parent

    def _delivering(self) -> bool:
        return super()._delivering() and not self._closed

    def _store(self, batch: list[dict[str, Any]]) -> None:
        lines = []
        for event in batch:
            self._seq += 1
            event["sequence"] = schema.format_sequence(self._seq)
            lines.append(schema.encode(event) + b"\n")
        written, error = self._append(lines)
        if written < len(batch):
            self._seq -= len(batch) - written  # their numbers are used again: no gap in the file
        if written:
            try:
                self._fsync.after_write(self._fd)
            except OSError as e:  # the lines are in the file; the disk is in trouble
                error = error or e
        if error is not None:
            self._storage_failed(error, len(batch) - written)
        else:
            self._storage_ok()
        if not written:
            return
        now = time.time()
        self.metrics.events_delivered.labels(self.name).inc(written)
        hist = self.metrics.events_delivery_seconds.labels(self.name)
        for event in batch[:written]:
            hist.observe(max(0.0, now - _unix(event["time"])))

    def _append(self, lines: list[bytes]) -> tuple[int, OSError | None]:
        """Append whole lines; returns how many are in the file, and the error that stopped the rest.

        After a failed write the file is cut back to the end of its last whole line (the size before
        the write plus the lines that made it), so the next line never continues a torn one."""
        try:
            if self._torn_at is not None:
                os.ftruncate(self._fd, self._torn_at)
                self._torn_at = None
            before = os.fstat(self._fd).st_size
        except OSError as e:
            return 0, e
        written, whole, e = write_records(self._fd, lines)
        if e is None:
            return written, None
        try:
            if os.fstat(self._fd).st_size > before + whole:
                os.ftruncate(self._fd, before + whole)
        except OSError as cut:
            self._torn_at = before + whole
            log.error("events: cannot cut a torn line off %s (%s); trying again before the next "
                      "write", self.path, cut.strerror)
        return written, e

    def _idle_tick(self) -> None:
        self._fsync.tick(self._fd)

    def _stop_storage(self, deadline: float) -> None:
        try:
            self._fsync.sync(self._fd)
        except OSError as e:
            log.error("events: fsync of %s failed at close: %s", self.path, e.strerror)
        try:
            os.close(self._fd)
        except OSError as e:
            log.error("events: closing %s failed: %s", self.path, e.strerror)
        self._closed = True
        self._update_up()


def _unix(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
