"""The detection stage as a process of its own: one batcher and one detector for every worker.

Stream workers (``run --workers N``) connect over a Unix socket and send, per frame, the name of
the shared-memory slot that holds it (:mod:`stream.live.frame_ring`) with its stream, number and
deadline. Each frame becomes a :class:`~stream.core.frames.Job` in its stream's queue here, so the
one :class:`~stream.live.batcher.Batcher` batches across every stream of the machine, with its
admission control, fair shedding, hang detection and detector rebuilds as in one process. Each
answer (detections, or why there are none) goes back to the worker, which frees the slot then.

The stage is a child of the supervisor, not part of it: a detector that crashes the process (or
is killed) takes only this process down; every worker blanks its streams until the supervisor
has started a new one and the workers have reconnected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from stream.config import PipelineConfig
from stream.core.detections import Detections
from stream.core.frames import Drop, Failure, Frame, Job, JobQueue
from stream.core.metrics import Metrics
from stream.live.batcher import Batcher, DetectorFactory, hang_timeout_ms
from stream.live.frame_ring import SlotReader, SlotRef

log = logging.getLogger(__name__)

MAX_UNSENT = 4096
"""answers waiting for a worker that does not read them; beyond this the worker counts as hung and
its connection is closed (it reconnects, and its frames are blanked meanwhile)"""

Answer = tuple[int, Detections | None, str | None, str | None]
"""(slot, detections, failure, dropped) of one frame, as sent back to its worker"""


@dataclass(eq=False)
class StageJob(Job):
    """A job whose outcome is sent back to the worker that sent the frame."""

    link: _Link | None = None
    slot: int = -1

    def resolve(self, detections: Detections | None = None, failure: Failure | None = None,
                dropped: Drop | None = None) -> bool:
        done = super().resolve(detections, failure, dropped)
        if done and self.link is not None:
            self.link.answer(self)
        return done


class _Link:
    """One worker's connection: frames in on a reader thread, answers out on a sender thread."""

    def __init__(self, server: StageServer, conn: Connection, number: int) -> None:
        self.server, self.conn = server, conn
        self.name = f"link-{number}"
        self.reader = SlotReader(server.shm_dir)
        self.streams: set[str] = set()
        self._out: deque[tuple[str, Any]] = deque()
        self._wake = threading.Condition()
        self.closed = False
        self._sent_ready: bool | None = None
        threading.Thread(target=self._read_loop, name=f"{self.name}-in", daemon=True).start()
        threading.Thread(target=self._send_loop, name=f"{self.name}-out", daemon=True).start()

    # -- out --------------------------------------------------------------------------------------
    def _queue(self, kind: str, item: Any) -> None:
        with self._wake:
            if self.closed:
                return
            if len(self._out) >= MAX_UNSENT:
                log.error("%s: worker does not read its answers (%d waiting); closing its connection",
                          self.name, len(self._out))
                self._close_locked()
                return
            self._out.append((kind, item))
            self._wake.notify()

    def answer(self, job: StageJob) -> None:
        self._queue("done", (job.slot, job.detections, job.failure.value if job.failure else None,
                             job.dropped.value if job.dropped else None))

    def admitted(self, slot: int) -> None:
        self._queue("admitted", slot)

    def ready(self, ready: bool) -> None:
        if ready != self._sent_ready:
            self._sent_ready = ready
            self._queue("ready", ready)

    def _send_loop(self) -> None:
        while True:
            with self._wake:
                while not self._out and not self.closed:
                    self._wake.wait()
                if self.closed:
                    return
                items = list(self._out)
                self._out.clear()
            # one message per kind and wake-up: a batch of 32 answers is one pickle and one write
            done = [it for k, it in items if k == "done"]
            admitted = [it for k, it in items if k == "admitted"]
            ready = [it for k, it in items if k == "ready"]
            try:
                if admitted:
                    self.conn.send(("admitted", admitted))
                if done:
                    self.conn.send(("done", done))
                if ready:
                    self.conn.send(("ready", ready[-1]))
            except (OSError, EOFError, ValueError):
                self.close()
                return

    # -- in ---------------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        try:
            while True:
                msg = self.conn.recv()
                kind = msg[0]
                if kind == "frame":
                    self._frame(*msg[1:])
                elif kind == "detach":
                    self.server.detach(self, msg[1])
                elif kind == "forget":
                    self.server.batcher.forget(msg[1])
                elif kind == "hello":
                    self.name = f"{msg[1]}"
                    log.info("%s connected", self.name)
        except (EOFError, OSError):
            pass
        except Exception:
            if not self.closed:  # else: the connection was closed under the read (stopping)
                log.exception("%s: bad message; closing its connection", self.name)
        self.close()

    def _frame(self, ref: SlotRef, stream_id: str, seq: int, captured_at: float, wall_time: float,
               pts: float | None, deadline: float) -> None:
        try:
            image = self.reader.view(ref)
        except (OSError, ValueError) as e:
            # the worker gets an answer whatever happens: a frame it sent is never left hanging
            log.error("%s: cannot read frame %d of %s from slot %s: %s", self.name, seq, stream_id,
                      ref.name, e)
            self._queue("done", (ref.slot, None, Failure.DETECTOR_ERROR.value, None))
            return
        job = StageJob(Frame(stream_id, seq, image, captured_at, wall_time, pts), deadline, link=self,
                       slot=ref.slot)
        self.server.enqueue(self, job)

    def close(self) -> None:
        with self._wake:
            self._close_locked()

    def _close_locked(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._wake.notify_all()
        with contextlib.suppress(OSError):
            self.conn.close()
        threading.Thread(target=self.server.drop_link, args=(self,), daemon=True).start()


class StageServer:
    """The batcher behind a Unix socket; one :class:`_Link` per connected worker."""

    def __init__(self, config: PipelineConfig, factory: DetectorFactory, address: str, authkey: bytes,
                 shm_dir: Path, metrics: Metrics | None = None) -> None:
        self.config, self.shm_dir = config, shm_dir
        self.metrics = metrics or Metrics()
        b = config.batcher
        self.batcher = Batcher(factory, self.metrics, max_batch=b.max_batch, max_wait_s=b.max_wait_ms / 1000,
                               hang_timeout_s=hang_timeout_ms(config.fail_closed) / 1000, inflight=b.inflight)
        self.batcher.on_admitted = self._admitted
        self.address, self._authkey = address, authkey
        self._listener: Listener | None = None
        self._links: list[_Link] = []
        self._queues: dict[str, tuple[_Link, JobQueue]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._count = 0

    def start(self) -> None:
        """Load the detector (raising its error if it cannot), then accept workers."""
        self.batcher.start()
        if os.path.exists(self.address):
            os.unlink(self.address)  # left by a stage that was killed
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self._authkey)
        os.chmod(self.address, 0o600)
        threading.Thread(target=self._accept_loop, name="stage-accept", daemon=True).start()
        threading.Thread(target=self._ready_loop, name="stage-ready", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        for link in list(self._links):
            link.close()
        self.batcher.stop(timeout=1.0)

    @property
    def ready(self) -> bool:
        return self.batcher.alive and self.batcher.ready

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn = self._listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            except Exception as e:  # a peer without the key (multiprocessing's AuthenticationError)
                log.warning("refused a connection to the detection stage: %s", type(e).__name__)
                continue
            with self._lock:
                self._count += 1
                link = _Link(self, conn, self._count)
                self._links.append(link)
            link.ready(self.ready)

    def _ready_loop(self) -> None:
        """Workers learn at once when the detector goes down or comes back (they blank meanwhile)."""
        while not self._stop.wait(0.1):
            ready = self.ready
            for link in list(self._links):
                link.ready(ready)

    def _admitted(self, jobs: list[Job]) -> None:
        for job in jobs:
            if isinstance(job, StageJob) and job.link is not None:
                job.link.admitted(job.slot)

    def enqueue(self, link: _Link, job: StageJob) -> None:
        sid = job.frame.stream_id
        with self._lock:
            held = self._queues.get(sid)
            if held is not None and held[0] is not link:  # the stream moved to a new connection
                self._detach_locked(sid)
                held = None
            if held is None:
                queue = JobQueue(sid, self.config.queue_size)
                self._queues[sid] = (link, queue)
                link.streams.add(sid)
                self.batcher.attach(queue)
            else:
                queue = held[1]
        queue.put(job)  # an evicted older frame is answered as dropped (queue_full) by its resolve

    def detach(self, link: _Link, stream_id: str) -> None:
        with self._lock:
            held = self._queues.get(stream_id)
            if held is not None and held[0] is link:
                self._detach_locked(stream_id)

    def _detach_locked(self, stream_id: str) -> None:
        link, _ = self._queues.pop(stream_id)
        link.streams.discard(stream_id)
        self.batcher.detach(stream_id)
        self.batcher.forget(stream_id)

    def drop_link(self, link: _Link) -> None:
        """A worker went away: its queued frames are dropped; frames in flight finish unread."""
        with self._lock:
            for sid in list(link.streams):
                held = self._queues.get(sid)
                if held is not None and held[0] is link:
                    self._detach_locked(sid)
            if link in self._links:
                self._links.remove(link)
        log.info("%s disconnected", link.name)

    def status(self) -> dict[str, Any]:
        return {"ready": self.ready, "workers": len(self._links), "streams": len(self._queues)}


def serve_metrics(metrics: Metrics) -> int:
    """Serve ``metrics`` on 127.0.0.1 for the supervisor to merge; the bound port."""
    server, _ = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    return int(server.server_port)


def stage_main(config: PipelineConfig, address: str, authkey: bytes, shm_dir: str, report: Connection,
               parent_pid: int, log_level: int = logging.INFO,
               factory: DetectorFactory | None = None) -> None:
    """Entry point of the stage process: load the detector, accept workers, beat until stopped.

    ``factory`` None builds the configured detector (a picklable one may be given: tests and the
    load test's baseline)."""
    from stream.live.procs import child_logging, die_with_parent, start_heartbeat

    die_with_parent(parent_pid)
    child_logging("detector", log_level)
    if factory is None:  # the service module pulls in the HTTP and codec side, which a stage needs not
        from stream.live.service import detector_factory_for

        factory = detector_factory_for(config)
    server = StageServer(config, factory, address, authkey, Path(shm_dir))
    try:
        server.start()
    except Exception as e:
        report.send(("failed", f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None
    port = serve_metrics(server.metrics)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # the supervisor stops the workers first
    start_heartbeat(report, lambda: {**server.status(), "port": port}, stop)
    stop.wait()
    server.stop()
