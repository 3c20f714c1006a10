"""Event delivery in a process of its own (``events.delivery: process``), fed through the spool.

Creating events (JSON, the spool's appends) happens in the pipeline processes; sending them with
the pure-Python Kafka client takes most of a core by itself. In one interpreter the two share one
core through the GIL, so delivery runs in a process of its own: each pipeline process appends to
its own spool folder through a :class:`~stream.events.spool.SpoolWriter`, and one delivery
process reads every folder (a :class:`~stream.events.spool.SpoolReader` each, see
:mod:`stream.events.spool` for how the two halves share the files) and sends with the same
:class:`~stream.events.kafka.KafkaSink` code as the thread mode, with the same guarantees:
at-least-once, in order per stream (a stream's events are all in one folder), nothing the writer
accepted is lost when either process is killed (the reader's cursor is on disk; what was sent
after it is sent again).

The parent talks to the child through its standard input (the settings, pickled: never on the
command line, which ``ps`` shows; a SASL password is read by the child from its environment or
file, as in the thread mode) and standard output (JSON lines: the metrics port, health, a
metrics snapshot); the child logs to the parent's stderr. The child exits soon after its parent
is gone (its stdin closes, its parent pid changes). It also writes its health into each spool
folder (``delivery.status``), where the pipeline processes of ``run --workers N`` read it.

Parent side: :func:`start_delivery` -> :class:`DeliveryProcess`; pipeline side:
:func:`stream.events.sinks.start_events` with ``delivery`` (a :class:`DeliveryProcess` or a
:class:`DeliveryStatus`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from stream.config import PipelineConfig
from stream.config.events import EventsConfig
from stream.core.errors import UserError
from stream.core.metrics import Metrics
from stream.events.spool import Record, SpoolReader

log = logging.getLogger(__name__)

STATUS = "delivery.status"
"""file in each spool folder: the delivery process's health, for the processes writing there"""
REPORT_S = 0.5
"""how often the child reports health (and, every other time, its metrics)"""
STALE_S = 10.0
"""a status older than this: the delivery process is gone or hung"""
START_TIMEOUT_S = 60.0
RESTART_MAX_S = 30.0
STABLE_S = 60.0
"""a child that ran this long has its restart back-off reset"""


# -- the delivery process's side ---------------------------------------------------------------------

class SpoolSet:
    """The spools one delivery process reads, as one spool for :class:`~stream.events.kafka.KafkaSink`:
    reads go round the spools (one batch from one spool at a time), acknowledgements and rewinds go
    to the spool a record came from (``Record.spool``)."""

    in_flight_drops_counted = True

    def __init__(self, readers: list[SpoolReader]) -> None:
        self.readers = readers
        dirs = [str(r.dir) for r in readers]
        self.dir = readers[0].dir if len(readers) == 1 else Path(os.path.commonpath(dirs))
        self._next = 0

    def read(self, max_records: int, max_bytes: int = 1 << 20) -> list[Record]:
        n = len(self.readers)
        for k in range(n):
            i = (self._next + k) % n
            recs = self.readers[i].read(max_records, max_bytes)
            if recs:
                self._next = (i + 1) % n
                return recs
        return []

    def ack(self, rec: Record) -> None:
        self.readers[rec.spool].ack(rec)

    def rewind(self, rec: Record) -> int:
        return self.readers[rec.spool].rewind(rec)

    def rewind_to_cursor(self) -> None:
        for r in self.readers:
            r.rewind_to_cursor()

    def commit(self, compact: bool = False) -> None:
        for r in self.readers:
            r.commit(compact)

    @property
    def unread(self) -> int:
        return sum(r.unread for r in self.readers)

    @property
    def pending(self) -> int:
        return sum(r.pending for r in self.readers)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.readers)

    @property
    def corrupt(self) -> int:
        return sum(r.corrupt for r in self.readers)

    def tick(self) -> None:
        """Nothing to sync: readers write only their cursors."""

    def close(self) -> None:
        for r in self.readers:
            with contextlib.suppress(Exception):
                r.close()


def events_metrics() -> Metrics:
    """A registry with the ``stream_redact_events_*`` series only (the delivery process has no video)."""
    m = Metrics()
    for name, metric in vars(m).items():
        if name != "registry" and not name.startswith("events_") and hasattr(metric, "collect"):
            m.registry.unregister(metric)
    return m


def snapshot(families: Iterable[Any]) -> list[list[Any]]:
    """Metric families as plain lists (JSON): ``[name, type, help, [[sample, labels, value], ...]]``."""
    return [[f.name, f.type, f.documentation, [[s.name, s.labels, s.value] for s in f.samples]]
            for f in families]


def write_status(folder: Path, up: bool, problem: str | None) -> None:
    """Tell the processes writing to ``folder`` how delivery goes (read by :class:`DeliveryStatus`)."""
    tmp = folder / (STATUS + ".tmp")
    with contextlib.suppress(OSError):  # a full disk: the writers see a stale status and say so
        tmp.write_text(json.dumps({"pid": os.getpid(), "time": time.time(), "up": up, "problem": problem}))
        os.replace(tmp, folder / STATUS)


def _child_logging(level: int, kafka_level: int) -> None:
    """Log lines carry the process's name, so the parent's merged stderr says who spoke."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [events-delivery] %(name)s: %(message)s")
    logging.getLogger("stream").setLevel(level)
    logging.getLogger("kafka").setLevel(kafka_level)


class _Child:
    """The delivery process: one KafkaSink over every spool, a metrics port, reports to the parent."""

    def __init__(self, spec: dict[str, Any], report: IO[bytes]) -> None:
        self.events: EventsConfig = spec["events"]
        self.dirs = [Path(d) for d in spec["dirs"]]
        self.parent = spec["parent"]
        self._report = report
        self._report_lock = threading.Lock()
        self._stop = threading.Event()
        self._stop_timeout = 0.0
        self._signalled: float | None = None

    def send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg).encode() + b"\n"
        with self._report_lock:
            try:
                self._report.write(data)
                self._report.flush()
            except (OSError, ValueError):
                self.stop(0.0)  # the parent is gone

    def stop(self, timeout: float) -> None:
        if not self._stop.is_set():
            self._stop_timeout = timeout
            self._stop.set()

    def _control(self, stdin: IO[bytes]) -> None:
        """The parent's orders: ``stop <seconds>``; the end of stdin means the parent is gone."""
        for line in stdin:
            parts = line.split()
            if parts[:1] == [b"stop"]:
                self.stop(float(parts[1]) if len(parts) > 1 else self.events.flush_timeout_s)
        self.stop(0.0)

    def _watch_parent(self) -> None:
        while not self._stop.wait(0.5):  # a poll of the parent pid: nothing else would wake us
            if os.getppid() != self.parent:
                log.warning("the process that started events delivery is gone; stopping")
                self.stop(0.0)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        """SIGTERM/SIGINT reach the whole group at once (systemd, Ctrl-C): keep delivering what the
        pipeline writes while it stops, until the parent says stop, for a bounded time."""
        if self._signalled is None:
            self._signalled = time.monotonic()

    def run(self, stdin: IO[bytes]) -> int:
        from prometheus_client import start_http_server

        from stream.events.kafka import KafkaSink

        try:
            readers: list[SpoolReader] = []
            for i, d in enumerate(self.dirs):
                readers.append(SpoolReader(d, i))
        except UserError as e:
            for r in readers:
                r.close()
            self.send({"error": str(e)})
            return 2
        metrics = events_metrics()
        sink = KafkaSink(self.events, metrics, spool=SpoolSet(readers))
        sink.idle_wait_s = 0.01  # nobody in this process wakes the sender for new events: look often
        sink.source = self.events.source_uri
        sink.start()
        server, _ = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        threading.Thread(target=self._control, args=(stdin,), name="control", daemon=True).start()
        threading.Thread(target=self._watch_parent, name="parent-watch", daemon=True).start()
        self.send({"ready": {"port": server.server_port, "pid": os.getpid()}})
        log.info("delivering events from %s", ", ".join(str(d) for d in self.dirs))
        grace = self.events.flush_timeout_s + 15
        n = 0
        while not self._stop.wait(REPORT_S):
            problem = sink.problem
            self.send({"health": [problem is None, problem]})
            if n % 2 == 0:
                self.send({"metrics": snapshot(metrics.registry.collect())})
                for d in self.dirs:
                    write_status(d, problem is None, problem)
            n += 1
            if self._signalled is not None and time.monotonic() - self._signalled > grace:
                self.stop(0.0)
        sink.close(self._stop_timeout)
        self.send({"metrics": snapshot(metrics.registry.collect())})
        server.shutdown()
        return 0


def main() -> int:
    """Entry point of ``python -m stream.events.delivery`` (started by :class:`DeliveryProcess`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it tells us to stop)
    report = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints must not mix into the reports
    sys.stdout = sys.stderr
    stdin = sys.stdin.buffer
    size = struct.unpack(">I", stdin.read(4))[0]
    spec = pickle.loads(stdin.read(size))
    _child_logging(spec["log_level"], spec["kafka_log_level"])
    if os.getppid() != spec["parent"]:
        return 1
    try:
        return _Child(spec, report).run(stdin)
    except Exception:
        log.exception("events delivery failed")
        return 1


# -- the parent's side -------------------------------------------------------------------------------

def _ended(proc: subprocess.Popen[bytes]) -> str:
    """How a child that has ended ended, for health and the log."""
    code = proc.returncode
    return f"pid {proc.pid}, " + (f"killed by signal {-code}" if code < 0 else f"exit status {code}")


class DeliveryProcess:
    """A running delivery process and what it last reported; see :func:`start_delivery`."""

    def __init__(self, events: EventsConfig, spool_dirs: list[Path], auto_restart: bool = False,
                 log_level: int | None = None) -> None:
        if not spool_dirs:
            raise ValueError("no spool folder to deliver from")
        self.events = events
        self.spool_dirs = [Path(d) for d in spool_dirs]
        self.auto_restart = auto_restart
        self.log_level = logging.getLogger("stream").getEffectiveLevel() if log_level is None else log_level
        self._lock = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._error: str | None = None
        self._health: tuple[bool, str | None] = (True, None)
        self._metrics: list[list[Any]] = []
        self._exit: str | None = None
        """why the last child ended (while none runs)"""
        self._stopping = False
        self.restarts = 0
        """children started after the first (restart or auto_restart)"""
        self._started_at = 0.0
        self._wake = threading.Event()
        self._spawning = threading.Lock()
        """held while a child is being started (by ``restart`` or the auto_restart watch)"""

    # -- state -------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    @property
    def alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None and self._port is not None

    @property
    def metrics_port(self) -> int | None:
        """The child's Prometheus metrics on 127.0.0.1 (the ``stream_redact_events_*`` series)."""
        return self._port if self.alive else None

    def health(self) -> tuple[bool, str | None]:
        """``(up, problem)`` as :func:`stream.events.sinks.sink_health` gives it: delivery works, or a
        short sentence with the fix (no secrets); a child that is not running is a problem too."""
        with self._lock:
            if self.alive:
                return self._health
            if self._stopping:
                return True, None
            where = ", ".join(str(d) for d in self.spool_dirs)
            again = ("; it is being started again" if self.auto_restart
                     else "; restart it (stream-redact run does)")
            proc = self._proc
            ended = self._exit
            if ended is None and proc is not None and proc.poll() is not None:
                # ended, and the watch thread has not recorded it yet: say how, not "starting"
                ended = _ended(proc)
            return False, (f"the events delivery process is not running ({ended or 'starting'}){again}; "
                           f"events wait in the spool {where} meanwhile")

    def metrics(self) -> list[list[Any]]:
        """The child's metric families as last reported (see :func:`snapshot`)."""
        return self._metrics

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_S) -> DeliveryProcess:
        """Start the child and wait until it delivers; UserError if it cannot (a spool folder already
        read by another delivery process, a folder that cannot be used)."""
        self._stopping = False
        with self._spawning:
            self._spawn(timeout)
        if self.auto_restart:
            threading.Thread(target=self._keep_alive, name="events-delivery-watch", daemon=True).start()
        return self

    def _spawn(self, timeout: float) -> None:
        spec = pickle.dumps({"events": self.events, "dirs": [str(d) for d in self.spool_dirs],
                             "log_level": self.log_level, "parent": os.getpid(),
                             "kafka_log_level": logging.getLogger("kafka").getEffectiveLevel()})
        proc = subprocess.Popen([sys.executable, "-m", "stream.events.delivery"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, close_fds=True)
        assert proc.stdin is not None and proc.stdout is not None
        with self._lock:
            self._proc, self._port, self._error, self._health = proc, None, None, (True, None)
        try:
            proc.stdin.write(struct.pack(">I", len(spec)) + spec)
            proc.stdin.flush()
        except OSError:
            pass  # it died at once: the reader below says why
        threading.Thread(target=self._read, args=(proc,), name="events-delivery-reports", daemon=True).start()
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._port is None and self._error is None and proc.poll() is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(min(left, 0.5))
            if self._port is not None:
                self._started_at = time.monotonic()
                log.info("events: delivery process %d started (metrics on 127.0.0.1:%d)", proc.pid,
                         self._port)
                return
            error = self._error
        self._end(proc, 0.0)
        if error is not None:
            raise UserError(error)
        raise UserError(f"the events delivery process did not start within {timeout:.0f} s "
                        f"(exit status {proc.returncode}); see the log above")

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if "ready" in msg:
                    self._port = msg["ready"]["port"]
                elif "error" in msg:
                    self._error = msg["error"]
                elif "health" in msg:
                    up, problem = msg["health"]
                    self._health = (bool(up), problem)
                elif "metrics" in msg:
                    self._metrics = msg["metrics"]
                self._lock.notify_all()
        proc.wait()
        with self._lock:
            if proc is self._proc:
                self._exit = _ended(proc)
                self._port = None
                if not self._stopping:
                    log.error("events: the delivery process ended (%s)", self._exit)
            self._lock.notify_all()
        self._wake.set()

    def _keep_alive(self) -> None:
        """Start the child again when it ends (auto_restart), with back-off."""
        delay = 1.0
        while not self._stopping:
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stopping or self.alive:
                continue
            if time.monotonic() - self._started_at > STABLE_S:
                delay = 1.0
            self._wake.wait(delay)
            if self._stopping:
                return
            delay = min(RESTART_MAX_S, delay * 2)
            with self._spawning:
                if self._stopping or self.alive:
                    continue
                try:
                    with self._lock:
                        proc = self._proc
                    if proc is not None:
                        proc.wait()
                    self.restarts += 1
                    self._spawn(START_TIMEOUT_S)
                except UserError as e:
                    log.error("events: cannot start the delivery process again: %s", e)

    def restart(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start a new child (the old one, if it still runs, is killed: what it had sent and not yet
        recorded as acknowledged is sent again)."""
        with self._spawning:
            with self._lock:
                proc = self._proc
            if proc is not None:
                self._end(proc, 0.0)
            self.restarts += 1
            self._stopping = False
            self._spawn(timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Deliver what is spooled for up to ``timeout`` seconds (default ``events.flush_timeout_s``),
        then end the child; what is left stays in the spools for the next start."""
        self._stopping = True
        self._wake.set()
        with self._lock:
            proc = self._proc
        if proc is not None:
            self._end(proc, self.events.flush_timeout_s if timeout is None else timeout)

    def _end(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        if proc.poll() is None and proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.write(b"stop %f\n" % timeout)
                proc.stdin.flush()
        if proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()
        connect = self.events.kafka.connect_timeout_s if self.events.kafka is not None else 10.0
        try:
            proc.wait(timeout + connect + 15)
        except subprocess.TimeoutExpired:
            log.error("events: the delivery process %d did not stop in time; killing it", proc.pid)
            proc.kill()
            proc.wait(10)

    # -- metrics in the pipeline's own registry ----------------------------------------------------
    def merge_metrics_into(self, metrics: Metrics) -> None:
        """Serve the child's ``stream_redact_events_*`` series from ``metrics`` too, summed with the
        pipeline's own (a single-process run has one ``/metrics``; dashboards and alerts keep theirs)."""
        if getattr(metrics, "_merged_events", None) is not None:
            return  # once per registry
        local = [m for name, m in vars(metrics).items() if name.startswith("events_")]
        for m in local:
            metrics.registry.unregister(m)
        merged = _MergedEvents(local, self.metrics)
        metrics.registry.register(merged)
        metrics._merged_events = merged  # type: ignore[attr-defined]


class _MergedEvents:
    """A collector: the pipeline's own events series and the delivery process's, merged by name and
    labels (counters and histograms add up; gauges: the lower ``*_up``, else the higher value)."""

    def __init__(self, local: list[Any], remote: Callable[[], list[list[Any]]]) -> None:
        self.local = local
        self.remote = remote

    def collect(self) -> Iterator[Any]:
        from prometheus_client.metrics_core import Metric

        fams: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}

        def add(name: str, typ: str, doc: str, samples: Iterable[tuple[str, dict[str, str], float]]) -> None:
            _, _, values = fams.setdefault(name, (typ, doc, {}))
            for sname, labels, value in samples:
                key = (sname, tuple(sorted(labels.items())))
                if key not in values:
                    values[key] = value
                elif typ == "gauge":
                    values[key] = min(values[key], value) if name.endswith("_up") else max(values[key], value)
                else:
                    values[key] += value

        for m in self.local:
            for f in m.collect():
                add(f.name, f.type, f.documentation, ((s.name, s.labels, s.value) for s in f.samples))
        for name, typ, doc, samples in self.remote():
            add(name, typ, doc, samples)
        for name, (typ, doc, values) in fams.items():
            fam = Metric(name, doc, typ)
            for (sname, labels), value in values.items():
                fam.add_sample(sname, dict(labels), value)
            yield fam


def start_delivery(config: PipelineConfig, spool_dirs: list[Path],
                   auto_restart: bool = False) -> DeliveryProcess:
    """Start the process that delivers the events in ``spool_dirs`` (one folder per process writing
    events) to Kafka, and return its handle once it runs.

    ``auto_restart``: the handle starts the child again when it ends (with back-off); without it,
    whoever holds the handle watches ``alive`` and calls ``restart()``. Raises UserError when the
    events do not go to Kafka or a folder cannot be read (already read by another delivery process)."""
    if config.events.selected != "kafka" or config.events.kafka is None:
        raise UserError("events.delivery: process delivers to Kafka only; configure events.kafka")
    return DeliveryProcess(config.events, spool_dirs, auto_restart=auto_restart).start()


def start_own_delivery(config: PipelineConfig) -> DeliveryProcess | None:
    """For a single-process ``stream-redact run``: the delivery process of this pipeline's spool when
    ``events.delivery`` is ``process`` and events go to Kafka (restarted when it ends); else None."""
    ev = config.events
    if ev.delivery != "process" or ev.selected != "kafka":
        return None
    return start_delivery(config, [ev.spool.folder()], auto_restart=True)


class DeliveryStatus:
    """Delivery health as a pipeline process of ``run --workers N`` sees it: from the status file the
    delivery process keeps in the spool folder (pass to :func:`~stream.events.sinks.start_events`)."""

    def __init__(self, folder: Path, grace_s: float = 30.0, stale_s: float = STALE_S) -> None:
        self.folder = Path(folder)
        self.grace_s = grace_s
        """no (fresh) status for this long after start is not yet a problem: the delivery process starts"""
        self.stale_s = stale_s
        self._since = time.monotonic()
        self._cached: tuple[float, tuple[bool, str | None]] | None = None

    def health(self) -> tuple[bool, str | None]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < REPORT_S:
            return self._cached[1]
        try:
            doc: dict[str, Any] | None = json.loads((self.folder / STATUS).read_text())
        except (OSError, ValueError):
            doc = None
        age = time.time() - float(doc.get("time", 0)) if doc else None
        if doc is not None and age is not None and age <= self.stale_s:
            result: tuple[bool, str | None] = (bool(doc.get("up")), doc.get("problem"))
        elif now - self._since < self.grace_s:
            result = (True, None)
        elif doc is None:
            result = (False, f"no events delivery process reports on the spool {self.folder}; events "
                             "wait there until one runs (the supervisor of stream-redact run starts it: see "
                             "its log)")
        else:
            result = (False, f"the events delivery process (pid {doc.get('pid')}) has not reported for "
                             f"{age:.0f} s (stopped or hung); events wait in the spool {self.folder} until "
                             "it runs again")
        self._cached = (now, result)
        return result


if __name__ == "__main__":
    sys.exit(main())
