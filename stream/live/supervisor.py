"""``stream-redact run --workers N``: one detection stage per machine, stream work on every core.

One process tops out near one core of Python whatever the machine has, while the GPU wants one
batching stage that sees every stream. So the supervisor starts:

- a **detection stage** process (:mod:`stream.live.stage_process`): the only owner of the
  detector (and of the GPU), batching frames of every stream;
- **N stream workers** (:mod:`stream.live.worker_process`): each runs today's pipeline for the
  streams :func:`~stream.live.shard.worker_of` gives it, with frames crossing to the stage
  through shared memory;

and serves the public HTTP front (:mod:`stream.live.front`) that merges their metrics and health
and forwards each stream's API and WebRTC requests to the worker that runs it.

It watches each child's heartbeat: a child that exits or stops beating (hung) is killed and
started again, with back-off. While the stage is down every worker blanks its streams; while a
worker is down its streams publish nothing; a restarted worker gets back every stream it ran,
those added through the API included. Nothing unpainted reaches an output in between: painting
happens only in the worker, only with the stage's answer for that frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, Counter, Gauge

from stream.config import ClusterConfig, HttpConfig, PipelineConfig, StreamConfig
from stream.core.errors import UserError
from stream.events.audit import process_path
from stream.events.delivery import DeliveryProcess
from stream.live.batcher import DetectorFactory
from stream.live.frame_ring import remove_prefix, shm_root
from stream.live.front import Child
from stream.live.shard import Shard, worker_of

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0
"""a child that has not said it is up by then (a model that never loads) is killed and retried"""
HANG_S = 10.0
"""a child that has not beaten for this long counts as hung: it is killed and started again"""
STABLE_S = 30.0
"""a child up this long has its back-off reset"""


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's
    CPU limit, which affinity does not show: a pod limited to 4 cores on a 64-core node sees 64)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def default_workers() -> int:
    """One worker per spare core (the supervisor and the stage share the last one); at least 1."""
    return max(1, usable_cores() - 1)


def worker_port(config: PipelineConfig, index: int) -> int:
    """Cluster mode: the port worker ``index`` serves on, beside the front's: ``http.port + 1 +
    index`` (0, any free port, when the front's is 0)."""
    return config.http.port + 1 + index if config.http.port else 0


def _worker_cluster(config: PipelineConfig, index: int) -> ClusterConfig:
    """Cluster mode: worker ``index``'s cluster settings. Each worker is a member of the group on
    its own, and other pods' workers redirect API callers to it directly: its advertised URL is the
    configured one with the worker's port (without one, the worker's own bound address)."""
    c = config.cluster
    port = worker_port(config, index)
    if c.advertise_url is None:
        return c
    if not port:
        return c.model_copy(update={"advertise_url": None})
    parts = urlsplit(c.advertise_url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return c.model_copy(update={"advertise_url": urlunsplit((parts.scheme, f"{host}:{port}", "", "", ""))})


def worker_config(config: PipelineConfig, index: int, count: int,
                  streams: list[StreamConfig] | None = None) -> PipelineConfig:
    """Worker ``index``'s config: its streams, a private loopback port, files of its own for events.

    Two processes must never append to one events file or one spool folder, so each worker
    writes ``<name>.worker-<i><suffix>`` and ``<spool>/worker-<i>``, with a CloudEvents source
    of its own (``<source>/worker-<i>``), since each numbers its events (``sequence``) itself.

    In cluster mode every worker is a member of the consumer group: it keeps every stream of the
    config (the cluster's definitions, of which the group gives it a share) and serves on the
    front's host at :func:`worker_port`, where other pods' workers redirect API callers to it."""
    clustered = config.cluster.mode == "kafka"
    if clustered:
        mine = list(config.streams)
    else:
        mine = streams if streams is not None else [s for s in config.streams
                                                    if worker_of(s.id, count) == index]
    ev = config.events
    jsonl_path = ev.jsonl.file()
    events = ev.model_copy(update={
        # CloudEvents order events by `sequence` per `source`: each worker's sink counts its own
        "source": f"{ev.source_uri}/worker-{index}",
        "jsonl": ev.jsonl.model_copy(update={"path": jsonl_path.with_name(
            f"{jsonl_path.stem}.worker-{index}{jsonl_path.suffix}")}),
        "spool": ev.spool.model_copy(update={"dir": ev.spool.folder() / f"worker-{index}"}),
    })
    audit = config.audit  # one hash chain per writing process (stream.events.audit)
    if audit.path is not None:
        audit = audit.model_copy(update={"path": process_path(audit.path, f"worker-{index}")})
    update: dict[str, Any] = {"streams": mine, "events": events, "audit": audit,
                              "http": HttpConfig(host="127.0.0.1", port=0)}
    if clustered:
        update["http"] = config.http.model_copy(update={"port": worker_port(config, index)})
        update["cluster"] = _worker_cluster(config, index)
    return config.model_copy(update=update)


@dataclass
class _Proc:
    """A supervised child: how to start it, and what its heartbeats said."""

    name: str
    kind: str
    index: int | None
    start: Callable[[Connection], multiprocessing.process.BaseProcess]
    proc: multiprocessing.process.BaseProcess | None = None
    conn: Connection | None = None
    started_at: float = 0.0
    last_beat: float | None = None
    status: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None
    failures_in_row: int = 0
    next_start: float = 0.0

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.is_alive() and self.last_beat is not None


class Supervisor:
    """Starts, watches and restarts the stage and the workers; the front asks it for ports."""

    def __init__(self, config: PipelineConfig, workers: int, insecure_no_auth: bool = False,
                 shard: Shard | None = None, hang_s: float = HANG_S,
                 registry: CollectorRegistry | None = None, log_level: int = logging.INFO,
                 detector_factory: DetectorFactory | None = None) -> None:
        """``detector_factory`` None: the stage builds the configured detector; else this one (it
        must pickle: a module-level function)."""
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}", exit_code=2)
        top = config.http.port + workers
        if config.cluster.mode == "kafka" and config.http.port and top > 65535:
            raise UserError(f"cluster.mode kafka: worker i of --workers {workers} serves on "
                            f"http.port + 1 + i, up to {top}, past 65535; lower http.port "
                            f"({config.http.port}) or --workers",
                            exit_code=2)
        self.config, self.count, self.insecure_no_auth, self.shard = config, workers, insecure_no_auth, shard
        self.hang_s, self.log_level, self.detector_factory = hang_s, log_level, detector_factory
        self.ctx = multiprocessing.get_context("spawn")
        self.run_dir = Path(tempfile.mkdtemp(prefix="stream-redact-"))
        self.shm_dir = shm_root()
        self.prefix = f"stream-redact-{os.getpid()}-"
        self.address = str(self.run_dir / "stage.sock")
        self.authkey = os.urandom(32)
        self.front_secret = secrets.token_hex(32)
        """the front sends it with each request's real address; workers believe that address only with it"""
        self.registry = registry or CollectorRegistry()
        self.worker_up = Gauge("stream_redact_worker_up", "1 while a child process of run --workers is up",
                               ["worker"], registry=self.registry)
        self.restarts = Counter("stream_redact_worker_restarts", "Child processes started again after they "
                                "exited or hung", ["worker", "reason"], registry=self.registry)
        self._procs: list[_Proc] = [_Proc("detector", "detector", None, self._start_stage)]
        self._procs += [_Proc(f"worker-{i}", "worker", i, self._worker_starter(i)) for i in range(workers)]
        self._streams: dict[int, list[StreamConfig]] = {}
        self.delivery: DeliveryProcess | None = None
        """the one events delivery process for every worker's spool (``events.delivery: process``
        with Kafka); it restarts itself when it dies"""
        self._delivery_restarts = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the front asks --------------------------------------------------------------------
    @property
    def worker_count(self) -> int:
        return self.count

    def running(self, stream_id: str) -> int | None:
        """Cluster mode: the worker that said last it runs ``stream_id`` (None: none, or not in
        cluster mode, where :func:`worker_of` places every stream)."""
        if self.config.cluster.mode != "kafka":
            return None
        for index, streams in list(self._streams.items()):
            if any(s.id == stream_id for s in streams):
                return index
        return None

    def children(self) -> list[Child]:
        with self._lock:
            procs = sorted(self._procs, key=lambda p: (p.kind != "worker", p.index or 0))
            out = [Child(p.name, p.kind, p.index, p.status.get("port") if p.up else None,
                         p.proc.pid if p.proc is not None and p.proc.is_alive() else None) for p in procs]
        d = self.delivery
        if d is not None:
            out.append(Child("events", "events", None, d.metrics_port, d.pid if d.alive else None))
        return out

    # -- starting children ----------------------------------------------------------------------
    def _start_stage(self, report: Connection) -> multiprocessing.process.BaseProcess:
        from stream.live.stage_process import stage_main

        return self.ctx.Process(target=stage_main, name="stream-redact-detector", daemon=True, kwargs={
            "config": self.config, "address": self.address, "authkey": self.authkey,
            "shm_dir": str(self.shm_dir), "report": report, "parent_pid": os.getpid(),
            "log_level": self.log_level, "factory": self.detector_factory})

    def _worker_starter(self, index: int) -> Callable[[Connection], multiprocessing.process.BaseProcess]:
        def start(report: Connection) -> multiprocessing.process.BaseProcess:
            from stream.live.worker_process import WorkerSpec, worker_main

            spec = WorkerSpec(index, self.count, worker_config(self.config, index, self.count,
                                                              self._streams.get(index)),
                              self.address, self.authkey, str(self.shm_dir), self._slot_prefix(index),
                              self.insecure_no_auth, self.shard, self.front_secret)
            return self.ctx.Process(target=worker_main, name=f"stream-redact-worker-{index}", daemon=True,
                                    args=(spec, report, os.getpid(), self.log_level))

        return start

    def _slot_prefix(self, index: int) -> str:
        return f"{self.prefix}w{index}-"

    def _launch(self, p: _Proc) -> None:
        recv, send = self.ctx.Pipe(duplex=False)
        proc = p.start(send)
        proc.start()
        send.close()  # the child holds the only write end: its death is EOF here
        with self._lock:
            p.proc, p.conn, p.started_at, p.last_beat, p.failure = proc, recv, time.monotonic(), None, None
            p.status = {}
        log.info("%s started (pid %d)", p.name, proc.pid)

    def start(self) -> None:
        """Start the stage and wait until its detector is loaded (its error if it cannot load),
        then the workers, waiting until each serves; then watch them all."""
        try:
            if self.config.events.jsonl.path is None:
                # each worker writes events.worker-<i>.jsonl beside the default file, by an explicit
                # path, so its sink does not create the state folder the default one would: here it is
                self.config.events.jsonl.file().parent.mkdir(parents=True, exist_ok=True)
            self._start_delivery()
            stage = self._procs[0]
            self._launch(stage)
            self._await_up([stage])
            for p in self._procs[1:]:
                self._launch(p)
            self._await_up(self._procs[1:])
        except BaseException:
            self.stop(2.0)
            raise
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def _start_delivery(self) -> None:
        """One delivery process for every worker's spool folder, those of an earlier, larger
        ``--workers`` included (what they hold is still delivered)."""
        ev = self.config.events
        if ev.delivery != "process" or ev.selected != "kafka":
            return
        from stream.events.delivery import start_delivery

        root = ev.spool.folder()
        dirs = {root / f"worker-{i}" for i in range(self.count)}
        dirs |= {d for d in root.glob("worker-*") if d.is_dir()} if root.is_dir() else set()
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.delivery = start_delivery(self.config, sorted(dirs), auto_restart=True)

    def _await_up(self, procs: list[_Proc]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            for p in procs:
                self._drain(p)
                if p.failure is not None:
                    raise UserError(f"{p.name} failed to start: {p.failure}")
                if p.proc is not None and not p.proc.is_alive() and p.last_beat is None:
                    raise UserError(f"{p.name} exited at start (exit code {p.proc.exitcode}); see its log "
                                    "above")
            if all(p.last_beat is not None and (p.kind != "worker" or p.status.get("port")) for p in procs):
                return
            if time.monotonic() >= deadline:
                raise UserError(f"{', '.join(p.name for p in procs if p.last_beat is None)} did not start "
                                f"within {START_TIMEOUT_S:.0f} s")
            conns = [p.conn for p in procs if p.conn is not None]
            multiprocessing.connection.wait(conns, timeout=0.2)

    def _drain(self, p: _Proc) -> None:
        """Read what ``p`` said since last time (heartbeats, or why it failed)."""
        conn = p.conn
        if conn is None:
            return
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "alive":
                    with self._lock:
                        p.last_beat, p.status = time.monotonic(), msg[1]
                    if p.kind == "worker" and p.index is not None:
                        self._streams[p.index] = list(msg[1].get("streams", []))
                elif msg[0] == "streams" and p.index is not None:
                    self._streams[p.index] = list(msg[1])
                elif msg[0] == "failed":
                    p.failure = str(msg[1])
        except (EOFError, OSError):
            pass

    # -- watching -------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            for p in self._procs:
                self._drain(p)
                self.worker_up.labels(p.name).set(1 if p.up else 0)
                if p.proc is None:
                    if now >= p.next_start:
                        self._launch(p)
                    continue
                if not p.proc.is_alive():
                    self._lost(p, "exited", f"exited (code {p.proc.exitcode})")
                elif p.last_beat is None and now - p.started_at > START_TIMEOUT_S:
                    self._kill(p)
                    self._lost(p, "hung", f"did not start within {START_TIMEOUT_S:.0f} s")
                elif p.last_beat is not None and now - p.last_beat > self.hang_s:
                    self._kill(p)
                    self._lost(p, "hung", f"stopped answering for {now - p.last_beat:.1f} s")
                elif p.last_beat is not None and now - p.started_at > STABLE_S:
                    p.failures_in_row = 0
            d = self.delivery
            if d is not None:
                self.worker_up.labels("events").set(1 if d.alive else 0)
                if d.restarts > self._delivery_restarts:
                    self.restarts.labels("events", "exited").inc(d.restarts - self._delivery_restarts)
                    self._delivery_restarts = d.restarts
            conns = [p.conn for p in self._procs if p.conn is not None]
            if conns:
                multiprocessing.connection.wait(conns, timeout=0.2)
            else:
                self._stopping.wait(0.2)

    def _lost(self, p: _Proc, reason: str, detail: str) -> None:
        if self._stopping.is_set():
            return
        p.failures_in_row += 1
        delay = 0.0 if p.failures_in_row == 1 else min(10.0, 0.5 * 2 ** (p.failures_in_row - 2))
        what = ("every stream is blanked until it is back" if p.kind == "detector"
                else "its streams are off the air until it is back")
        log.error("%s %s; starting it again%s (%s)", p.name, detail,
                  f" in {delay:.1f} s" if delay else "", what)
        self.restarts.labels(p.name, reason).inc()
        if p.proc is not None:
            p.proc.join(1.0)
        if p.conn is not None:
            p.conn.close()
        if p.kind == "worker" and p.index is not None:
            remove_prefix(self.shm_dir, self._slot_prefix(p.index))  # its frame slots die with it
        with self._lock:
            p.proc, p.conn, p.last_beat, p.status = None, None, None, {}
        p.next_start = time.monotonic() + delay

    @staticmethod
    def _kill(p: _Proc) -> None:
        if p.proc is not None and p.proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.proc.pid, signal.SIGKILL)

    # -- stopping -------------------------------------------------------------------------------
    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers first (each publishes what it accepted), then the stage."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2.0)
        deadline = time.monotonic() + timeout
        for group in ([p for p in self._procs if p.kind == "worker"], [p for p in self._procs
                                                                       if p.kind != "worker"]):
            for p in group:
                if p.proc is not None and p.proc.is_alive() and p.proc.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.proc.pid, signal.SIGTERM)
            for p in group:
                if p.proc is not None:
                    p.proc.join(max(0.1, deadline - time.monotonic()))
                    if p.proc.is_alive():
                        log.warning("%s did not stop in time; killing it", p.name)
                        self._kill(p)
                        p.proc.join(1.0)
                if p.conn is not None:
                    p.conn.close()
            if group[0].kind == "worker" and self.delivery is not None:
                # the workers' last events are in their spools: deliver them, then end
                self.delivery.stop(self.config.events.flush_timeout_s)
        remove_prefix(self.shm_dir, self.prefix)
        shutil.rmtree(self.run_dir, ignore_errors=True)


async def supervise(config: PipelineConfig, workers: int, insecure_no_auth: bool = False,
                    shard: Shard | None = None, stop: asyncio.Event | None = None,
                    on_listen: Callable[[int], None] | None = None, stop_timeout: float = 5.0,
                    hang_s: float = HANG_S, detector_factory: DetectorFactory | None = None) -> int:
    """Run the supervisor and its front until ``stop`` or SIGINT/SIGTERM; 0 on a clean stop."""
    from stream.live.auth import load_auth
    from stream.live.front import start_front

    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    # the workers check tokens; a missing tokens or users file is refused here, before anything starts
    load_auth(config.auth, insecure_no_auth)
    sup = Supervisor(config, workers, insecure_no_auth, shard, hang_s=hang_s,
                     log_level=logging.getLogger("stream").getEffectiveLevel(),
                     detector_factory=detector_factory)
    await loop.run_in_executor(None, sup.start)
    try:
        runner, port = await start_front(sup, config.http.host, config.http.port, registry=sup.registry,
                                         peer_secret=sup.front_secret)
    except OSError as e:
        await loop.run_in_executor(None, sup.stop, stop_timeout)
        raise UserError(str(e)) from None
    print(f"stream-redact: {len(config.streams)} stream(s) on {workers} worker process(es) and one detection "
          f"stage; metrics at http://{config.http.host}:{port}/metrics, health at /healthz and /readyz",
          file=sys.stderr, flush=True)
    if on_listen is not None:
        on_listen(port)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await runner.cleanup()
        await loop.run_in_executor(None, sup.stop, stop_timeout)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    print("stream-redact: stopped", file=sys.stderr, flush=True)
    return 0
