"""The part every sink shares: a bounded in-memory hand-off that never blocks the caller, and one
thread that makes the events durable.

``submit`` runs on redaction threads. It only appends to a deque under a lock; when the queue is
full (the disk has stalled for a long while) the new event is dropped, counted and alarmed:
it was never accepted. An event is *accepted* once the sink thread has written it to durable
storage (the spool for Kafka, the file for JSON Lines); from then on it is never lost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

from stream.events import schema
from stream.metrics import Metrics

log = logging.getLogger(__name__)

BATCH = 2000
"""most events written to storage in one go"""


class FsyncPolicy:
    """When to fsync a file being appended to: ``always`` (every write), ``interval``, ``never``."""

    def __init__(self, mode: str, interval_s: float) -> None:
        self.mode = mode
        self.interval_s = interval_s
        self._last = time.monotonic()
        self.dirty = False

    def after_write(self, fd: int) -> None:
        self.dirty = True
        due = self.mode == "interval" and time.monotonic() - self._last >= self.interval_s
        if self.mode == "always" or due:
            self.sync(fd)

    def tick(self, fd: int) -> None:
        """Called when idle: an interval policy must not leave a quiet file unsynced for long."""
        if self.dirty and self.mode == "interval" and time.monotonic() - self._last >= self.interval_s:
            self.sync(fd)

    def sync(self, fd: int) -> None:
        if self.dirty and self.mode != "never":
            os.fsync(fd)
        self.dirty = False
        self._last = time.monotonic()


class EventSink:
    """Base class: ``submit`` from any thread, ``_store`` (a subclass's) on the sink thread."""

    name = "sink"
    source = "/stream-redact"
    """CloudEvents source of the sink's own alarm events (set by the builder)"""

    def __init__(self, metrics: Metrics, queue_size: int = 10_000) -> None:
        self.metrics = metrics
        self.queue_size = queue_size
        self._queue: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closing = False
        self._idle = True
        self._dropped = 0
        self._dropped_first: float | None = None
        self._dropped_last = 0.0
        self._alarmed = False
        self._thread = threading.Thread(target=self._run, name=f"events-{self.name}", daemon=True)
        self._produced: dict[str, Any] = {}
        metrics.events_queue_depth.set_function(lambda: len(self._queue))

    def start(self) -> None:
        self._thread.start()

    # -- any thread --------------------------------------------------------------------------------
    def submit(self, event: dict[str, Any]) -> bool:
        """Hand ``event`` over without blocking; False (counted as dropped) if the queue is full."""
        etype = event["type"]
        child = self._produced.get(etype)
        if child is None:
            child = self._produced[etype] = self.metrics.events_produced.labels(schema.short_type(etype))
        child.inc()
        with self._cond:
            full = not self._closing
            if full and len(self._queue) >= self.queue_size:
                self._dropped += 1
                now = time.time()
                if self._dropped_first is None:
                    self._dropped_first = now
                self._dropped_last = now
            elif full:
                self._queue.append(event)
                if self._idle:
                    self._cond.notify()
                return True
        self.metrics.events_dropped.labels("queue_full" if full else "closed").inc()
        if full and not self._alarmed:
            self._alarmed = True
            log.error("events: the %s sink has fallen %d events behind (its storage is stalled?); new events "
                      "are dropped and counted in stream_redact_events_dropped_total{reason=\"queue_full\"} "
                      "until it catches up; check the disk, or raise events.queue_size", self.name,
                      self.queue_size)
        return False

    # -- sink thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._queue and not self._closing:
                        self._idle = True
                        self._cond.wait(self._tick_s())
                        self._idle = False
                    batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                    closing = self._closing and not self._queue
                    dropped = self._take_dropped() if not self._queue else None
                if dropped is not None:
                    batch.append(dropped)
                if batch:
                    self._store(batch)
                else:
                    self._idle_tick()
                if closing:
                    return
        except Exception:
            log.exception("events: the %s sink thread failed; events are no longer stored", self.name)
            self.metrics.events_sink_up.labels(self.name).set(0)

    def _take_dropped(self) -> dict[str, Any] | None:
        """Once the queue has drained, the alarm event about what it dropped (caller holds the lock)."""
        if not self._dropped or self._dropped_first is None:
            return None
        event = schema.envelope(schema.EVENTS_DROPPED, self.source, self._dropped_last, {
            "count": self._dropped, "reason": "queue_full", "policy": "drop_newest",
            "first_at": schema.rfc3339(self._dropped_first), "last_at": schema.rfc3339(self._dropped_last)})
        if not self._closing:
            log.warning("events: the %s sink caught up; %d event(s) were dropped meanwhile", self.name,
                        self._dropped)
        self._dropped, self._dropped_first, self._alarmed = 0, None, False
        return event

    def _tick_s(self) -> float:
        return 0.25

    def _store(self, batch: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def _idle_tick(self) -> None:
        """Called when no events came for a while (fsync an interval policy's file)."""

    def _stop_storage(self, deadline: float) -> None:
        """After the queue is stored: deliver until ``deadline`` and release the storage."""

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Store every event submitted so far, deliver for up to ``timeout`` seconds, then stop."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            # storing is local and quick; it gets at least a few seconds even when timeout is 0
            self._thread.join(max(5.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.error("events: the %s sink did not finish storing its queue; %d event(s) not accepted",
                      self.name, len(self._queue))
        self._stop_storage(deadline)
