"""The part every sink shares: a bounded in-memory hand-off that never blocks the caller, and one
thread that makes the events durable.

``submit`` runs on redaction threads. It only appends to a bounded queue; when the queue is
full (the disk has stalled for a long while) the new event is dropped, counted and alarmed:
it was never accepted (the events already queued keep their order). An event is *accepted*
once the sink thread has written it to durable storage (the spool for Kafka, the file for JSON
Lines); from then on it is never lost.

When storing fails (a full disk, a quota, an I/O error) the sink thread keeps running: the events
it could not write are dropped and counted by reason, the problem is logged once per outage with
its fix, ``healthy``/``problem`` say so (for ``/readyz``), and storing resumes by itself once it
works again, found by the next write or, while no events come, by a small probe write.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from stream.core.metrics import Metrics
from stream.core.queues import BoundedQueue
from stream.events import schema

log = logging.getLogger(__name__)

BATCH = 2000
"""most events written to storage in one go"""
PROBE_S = 1.0
"""while storing fails and no events come, how often to check whether it works again"""
PROBE_ROOM = 64 << 10
"""free bytes a file system must report before a probe write is tried (a probe must never be what
takes the last free bytes from other programs)"""
STORAGE_REASONS = ("disk_full", "write_error")


def storage_reason(err: OSError) -> str:
    """The metrics label for a failed write: ``disk_full`` (no space, quota) or ``write_error``."""
    return "disk_full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "write_error"


def storage_fix(err: OSError, where: Path) -> str:
    """What an operator should do about a failed write to ``where``."""
    if err.errno == errno.ENOSPC:
        return f"free space on {where}"
    if err.errno == errno.EDQUOT:
        return f"free space on {where} or raise the disk quota of this user"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {where} writable again"
    return f"check the disk behind {where} (kernel log, file system)"


def has_room(directory: Path) -> bool:
    """Whether the file system of ``directory`` reports at least ``PROBE_ROOM`` bytes free."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= PROBE_ROOM


def probe_storage(directory: Path) -> OSError | None:
    """Whether files in ``directory`` can be written again: None if so, else the error.

    Used while no events come to find out that a full disk has room again, so health recovers
    without waiting for the next event."""
    if not has_room(directory):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    try:
        path = directory / ".stream-redact-probe"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, bytes(4096))
        finally:
            os.close(fd)
            os.unlink(path)
    except OSError as e:
        return e
    return None


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
        self._queue: BoundedQueue[dict[str, Any]] = BoundedQueue(queue_size, drop="newest")
        self._drops = threading.Lock()
        """guards the count and times of the drops not yet reported by an events.dropped event"""
        self._dropped = 0
        self._dropped_first: float | None = None
        self._dropped_last = 0.0
        self._alarmed = False
        self._thread = threading.Thread(target=self._run, name=f"events-{self.name}", daemon=True)
        self._produced: dict[str, Any] = {}
        self._up_lock = threading.Lock()
        self._storage_error: OSError | None = None
        """the last failed write while storing fails; None while it works"""
        self._storage_text: str | None = None
        self._storage_since = 0.0
        self._storage_lost = 0
        self._probe_at = 0.0
        self._crashed = False
        metrics.events_queue_depth.set_function(lambda: len(self._queue))
        for reason in STORAGE_REASONS:
            metrics.events_dropped.labels(reason)
        metrics.events_storage_failing.labels(self.name).set(0)

    def start(self) -> None:
        self._thread.start()

    # -- health ------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """False while events are not stored or not delivered (see ``problem``)."""
        return self.problem is None

    @property
    def problem(self) -> str | None:
        """What keeps events from being stored or delivered right now, in a short sentence with the fix
        (no secrets); None while all is well."""
        if self._crashed:
            return (f"the {self.name} events sink thread stopped after an internal error (see the log); "
                    "restart the pipeline")
        return self._storage_text or self._delivery_problem()

    def _delivery_problem(self) -> str | None:
        """Why stored events do not reach their destination (a subclass's: the brokers)."""
        return None

    def _delivering(self) -> bool:
        """Whether ``events_sink_up`` is 1: storing works (and, in a subclass, delivery does too)."""
        return self._storage_error is None and not self._crashed

    def _update_up(self) -> None:
        """Set ``events_sink_up`` from the current state; called after every change of it, from any
        thread, so the last call always sees the last state."""
        with self._up_lock:
            self.metrics.events_sink_up.labels(self.name).set(1 if self._delivering() else 0)

    def _storage_dir(self) -> Path:
        """The folder events are written to (probed while storing fails)."""
        raise NotImplementedError

    # -- storage failures (sink thread) ------------------------------------------------------------
    def _storage_failed(self, err: OSError, lost: int) -> None:
        """Writing failed: ``lost`` events were not stored. Counted every time, logged once per outage
        (again only if the cause changes)."""
        reason = storage_reason(err)
        if lost:
            self.metrics.events_dropped.labels(reason).inc(lost)
        where = self._storage_dir()
        prev = self._storage_error
        first = prev is None
        changed = prev is None or storage_reason(prev) != reason
        if first:
            self._storage_since = time.monotonic()
            self._storage_lost = 0
            self.metrics.events_sink_errors.labels(self.name, reason).inc()
        self._storage_lost += lost
        self._storage_error = err
        self._storage_text = (f"cannot write events to {where}: {err.strerror or err}; "
                              f"{storage_fix(err, where)}")
        self._probe_at = time.monotonic() + PROBE_S
        self.metrics.events_storage_failing.labels(self.name).set(1)
        self._update_up()
        if changed:
            log.error("events: the %s sink cannot write events to %s (%s); new events are dropped and "
                      "counted in stream_redact_events_dropped_total{reason=\"%s\"} until writing works "
                      "again, events already stored are kept; %s", self.name, where, err.strerror or err,
                      reason, storage_fix(err, where))

    def _storage_ok(self) -> None:
        """A write worked (or a probe did while no events came): the outage, if any, is over, unless
        the write only fitted in the last bytes of a disk that is still full."""
        if self._storage_error is None:
            return
        if self._storage_error.errno in (errno.ENOSPC, errno.EDQUOT) and not has_room(self._storage_dir()):
            return
        log.warning("events: the %s sink writes to %s again after %.0f s; %d event(s) were dropped "
                    "meanwhile", self.name, self._storage_dir(), time.monotonic() - self._storage_since,
                    self._storage_lost)
        self._storage_error = self._storage_text = None
        self.metrics.events_storage_failing.labels(self.name).set(0)
        self._update_up()

    def _probe(self) -> None:
        """While the disk is full and nothing is being written: check now and then whether it has room
        again. (Other errors, such as permissions or I/O, end only with a write that works.)"""
        err = self._storage_error
        if err is None or storage_reason(err) != "disk_full" or time.monotonic() < self._probe_at:
            return
        self._probe_at = time.monotonic() + PROBE_S
        if probe_storage(self._storage_dir()) is None:
            self._storage_ok()

    # -- any thread --------------------------------------------------------------------------------
    def submit(self, event: dict[str, Any]) -> bool:
        """Hand ``event`` over without blocking; False (counted as dropped) if the queue is full."""
        etype = event["type"]
        child = self._produced.get(etype)
        if child is None:
            child = self._produced[etype] = self.metrics.events_produced.labels(schema.short_type(etype))
        child.inc()
        if self._queue.put(event) is None:
            return True
        full = not self._queue.closed
        alarm = False
        if full:
            with self._drops:
                self._dropped += 1
                now = time.time()
                if self._dropped_first is None:
                    self._dropped_first = now
                self._dropped_last = now
                alarm, self._alarmed = not self._alarmed, True
        self.metrics.events_dropped.labels("queue_full" if full else "closed").inc()
        if alarm:
            log.error("events: the %s sink has fallen %d events behind (its storage is stalled?); new events "
                      "are dropped and counted in stream_redact_events_dropped_total{reason=\"queue_full\"} "
                      "until it catches up; check the disk, or raise events.queue_size", self.name,
                      self.queue_size)
        return False

    # -- sink thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._queue.wait(self._tick_s())
                batch = self._queue.take(BATCH)
                closing = self._queue.exhausted
                dropped = self._take_dropped() if not self._queue else None
                if dropped is not None:
                    batch.append(dropped)
                try:
                    if batch:
                        self._store(batch)
                    else:
                        self._idle_tick()
                        self._probe()
                except OSError as e:  # a sink that did not handle it itself: nothing of the batch is stored
                    self._storage_failed(e, len(batch))
                if closing:
                    return
        except Exception:
            log.exception("events: the %s sink thread failed; events are no longer stored", self.name)
            self._crashed = True
            self._update_up()

    def _take_dropped(self) -> dict[str, Any] | None:
        """Once the queue has drained, the alarm event about what it dropped."""
        with self._drops:
            if not self._dropped or self._dropped_first is None:
                return None
            count, first, last = self._dropped, self._dropped_first, self._dropped_last
            self._dropped, self._dropped_first, self._alarmed = 0, None, False
        event = schema.envelope(schema.EVENTS_DROPPED, self.source, last, {
            "count": count, "reason": "queue_full", "policy": "drop_newest",
            "first_at": schema.rfc3339(first), "last_at": schema.rfc3339(last)})
        if not self._queue.closed:
            log.warning("events: the %s sink caught up; %d event(s) were dropped meanwhile", self.name, count)
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
        if not self._queue.close():
            return
        if self._thread.is_alive():
            # storing is local and quick; it gets at least a few seconds even when timeout is 0
            self._thread.join(max(5.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.error("events: the %s sink did not finish storing its queue; %d event(s) not accepted",
                      self.name, len(self._queue))
        self._stop_storage(deadline)


def write_records(fd: int, records: list[bytes]) -> tuple[int, int, OSError | None]:
    """Write ``records`` at ``fd``'s position: ``(records whole in the file, their bytes, error)``.

    A failed write (a full disk) may leave part of a record behind it; the caller cuts the file back
    to the whole records' end, so stored data never holds a torn record."""
    data = memoryview(b"".join(records))
    done = 0
    try:
        while done < len(data):
            done += os.write(fd, data[done:])
    except OSError as e:
        whole = count = 0
        for record in records:
            if whole + len(record) > done:
                break
            whole += len(record)
            count += 1
        return count, whole, e
    return len(records), len(data), None
