"""One stream worker of ``run --workers N``: today's pipeline for a share of the streams, with the
detection stage in another process.

Each worker decodes, tracks, paints, encodes and publishes its streams and serves their API,
WHEP/WHIP and metrics on 127.0.0.1 (the supervisor's front forwards to it). Its frames go to the
detection stage through shared memory (:class:`~stream.live.remote_stage.RemoteStage`). It tells
the supervisor, with every heartbeat, its port and the streams it runs (those added through the
API too), so that a worker restarted after a crash gets every one of them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from stream.config import PipelineConfig, StreamConfig
from stream.core.metrics import Metrics
from stream.events.delivery import DeliveryStatus
from stream.live.frame_ring import SlotWriter
from stream.live.pipeline import Pipeline
from stream.live.remote_stage import RemoteStage
from stream.live.shard import Shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, passed once through the spawn pickle (never argv, which
    ``ps`` shows: stream URLs carry camera credentials)."""

    index: int
    count: int
    config: PipelineConfig
    """with this worker's streams only, and the http address 127.0.0.1:0"""
    stage_address: str
    authkey: bytes
    shm_dir: str
    slot_prefix: str
    insecure_no_auth: bool = False
    shard: Shard | None = None
    front_secret: str | None = None
    """the supervisor's front sends it with the address each request came from (for auth and audit)"""

    @property
    def name(self) -> str:
        return f"worker-{self.index}"


def worker_main(spec: WorkerSpec, report: Connection, parent_pid: int, log_level: int = logging.INFO) -> None:
    """Entry point of a worker process: run its streams until SIGTERM, beating to the supervisor."""
    from stream.live.procs import child_logging, die_with_parent, start_heartbeat
    from stream.live.service import serve

    die_with_parent(parent_pid)
    child_logging(spec.name, log_level)
    metrics = Metrics()
    stage = RemoteStage(spec.stage_address, spec.authkey, SlotWriter(Path(spec.shm_dir), spec.slot_prefix),
                        metrics, name=spec.name)
    state: dict[str, Any] = {"port": None, "pipeline": None}
    stop_beat = threading.Event()

    def status() -> dict[str, Any]:
        p: Pipeline | None = state["pipeline"]
        streams: list[StreamConfig] = [r.config for r in list(p.streams.values())] if p is not None else []
        return {"port": state["port"], "ready": p is not None and p.ready, "streams": streams,
                "stage": stage.ready}

    lock = threading.Lock()

    def streams_changed(_runner: object) -> None:
        # said before the API answers: a worker that dies right after still gets the stream back
        msg = ("streams", status()["streams"])
        with lock, contextlib.suppress(OSError, ValueError):  # no supervisor: the heartbeat ends us
            report.send(msg)

    def on_pipeline(p: Pipeline) -> None:
        p.worker = (spec.index, spec.count)
        state["pipeline"] = p
        p.on_stream_added.append(streams_changed)
        p.on_stream_removed.append(streams_changed)

    def on_listen(port: int) -> None:
        state["port"] = port
        start_heartbeat(report, status, stop_beat, lock)

    ev = spec.config.events
    delivery = (DeliveryStatus(ev.spool.folder()) if ev.delivery == "process" and ev.selected == "kafka"
                else None)  # the supervisor's delivery process reads this worker's spool
    try:
        asyncio.run(serve(spec.config, insecure_no_auth=spec.insecure_no_auth, shard=spec.shard, stage=stage,
                          metrics=metrics, on_pipeline=on_pipeline, on_listen=on_listen,
                          announce=False, delivery=delivery, front_secret=spec.front_secret,
                          process=spec.name))
    finally:
        stop_beat.set()
