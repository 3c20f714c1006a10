"""`stream-redact run`: the live pipeline as a long-running service, until SIGINT/SIGTERM.

The asyncio loop only serves HTTP and waits for signals; decoding, detection, redaction and
encoding run on threads, so nothing here can stall a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import sys
from collections.abc import Callable

from stream.config import PipelineConfig
from stream.core.errors import UserError
from stream.core.metrics import Metrics
from stream.events.audit import AuditObserver, open_audit
from stream.events.delivery import DeliveryStatus, start_own_delivery
from stream.events.sinks import sink_health, start_events
from stream.live.auth import load_auth
from stream.live.batcher import Detect, DetectorFactory, Stage
from stream.live.cluster import ClusterMember, default_address
from stream.live.http import start_http
from stream.live.pipeline import Pipeline
from stream.live.rtc import RtcGateway
from stream.live.shard import Shard

log = logging.getLogger(__name__)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def detector_factory_for(config: PipelineConfig) -> DetectorFactory:
    """The configured detector, one per call (the batcher replaces a crashed or hung one with a new one).

    Its settings come from the one conversion ``config.detection.detector_settings``, the same
    ``redact`` uses, with the batcher's bucket sizes."""
    from stream.detect.ensemble import FrameDetector

    def factory() -> Detect:
        detector = FrameDetector(config.detection.detector_settings(config.batcher.buckets,
                                                                    config.privacy_classes()))
        if config.detection.warmup and detector.device != "cpu":
            detector.warmup(max_batch=config.batcher.batch_bound())
        return detector

    return factory


async def serve(config: PipelineConfig, detector_factory: DetectorFactory | None = None,
                stop: asyncio.Event | None = None, stop_timeout: float = 5.0,
                insecure_no_auth: bool = False, on_listen: Callable[[int], None] | None = None,
                shard: Shard | None = None, stage: Stage | None = None, metrics: Metrics | None = None,
                on_pipeline: Callable[[Pipeline], None] | None = None, announce: bool = True,
                delivery: DeliveryStatus | None = None, front_secret: str | None = None,
                process: str = "main") -> int:
    """Run until ``stop`` is set, a signal arrives, or every source has ended; 0 on a clean stop.

    ``detector_factory`` None builds detectors from ``config.detection``; a worker process of
    ``run --workers N`` passes its ``stage`` (the detection stage process) instead, and gets the
    pipeline through ``on_pipeline`` before it starts. With ``events.delivery: process`` a single
    process starts its own delivery process; a worker passes ``delivery`` (the supervisor's one
    delivers its spool), the front's ``front_secret`` (so it believes the front's word on where a
    request came from) and its ``process`` name (in its audit log's first record)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # off the main thread (tests) there are no signal handlers: stop through the event instead
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    authn = load_auth(config.auth, insecure_no_auth, front_secret)
    configured = None if stage is not None else detector_factory_for(config)
    clustered = config.cluster.mode == "kafka"
    # in cluster mode the consumer group says which streams run here: the pipeline starts with none
    pipeline = Pipeline(config.model_copy(update={"streams": []}) if clustered else config,
                        None if stage is not None else detector_factory or configured,
                        metrics=metrics, stage=stage)
    pipeline.shard = shard
    if on_pipeline is not None:
        on_pipeline(pipeline)
    own = None if delivery is not None else await loop.run_in_executor(None, start_own_delivery, config)
    try:  # before start: the first frames have events too
        events = start_events(config, pipeline.metrics, delivery if delivery is not None else own)
    except BaseException:
        if own is not None:
            own.stop(0)
        raise
    if events is not None:
        pipeline.observers.append(events)
        pipeline.events_health = functools.partial(sink_health, events)
    try:
        audit_log = open_audit(config, events.sink if events is not None else None, process)
    except BaseException:
        if events is not None:
            events.close(0)
        if own is not None:
            own.stop(0)
        raise
    if audit_log is not None:
        pipeline.observers.append(AuditObserver(audit_log))
        if authn.users is not None:
            authn.users.on_change.append(audit_log.users_changed)

    async def close_events() -> None:
        if audit_log is not None:  # first: its last records go to the event sink too
            await loop.run_in_executor(None, audit_log.close, config.events.flush_timeout_s)
        if events is not None:  # after the pipeline: what it observed last is stored, then delivered
            await loop.run_in_executor(None, events.close, config.events.flush_timeout_s)
        if own is not None:  # after the spool's last events: it delivers them, then ends
            await loop.run_in_executor(None, own.stop, config.events.flush_timeout_s)

    try:
        await loop.run_in_executor(None, pipeline.start)
    except Exception:
        await loop.run_in_executor(None, pipeline.stop, 1.0)
        await close_events()
        raise
    gateway = RtcGateway(pipeline, config.webrtc, config.http.host)
    try:
        runner, port = await start_http(pipeline, config.http.host, config.http.port, authn,
                                        config.api.allow_file_sources, gateway, audit_log)
    except OSError as e:
        await gateway.close()
        await loop.run_in_executor(None, pipeline.stop, stop_timeout)
        await close_events()
        raise UserError(str(e)) from None
    member = None
    if clustered:
        def moved(sid: str, source: str, to: str, gap: float | None, partition: int) -> None:
            for obs in list(pipeline.observers):
                try:
                    getattr(obs, "stream_moved", lambda *a: None)(sid, source, to, gap, partition)
                except Exception:
                    log.exception("stream %s: observer %s.stream_moved failed", sid, type(obs).__name__)

        wildcard = config.http.host in ("", "0.0.0.0", "::")

        member = ClusterMember(config, lambda cfg: pipeline.add_stream(cfg),
                               lambda sid: pipeline.remove_stream(sid, stop_timeout),
                               lambda: set(pipeline.streams), pipeline.metrics, process,
                               address=default_address(port) if wildcard else
                               f"http://{_bracketed(config.http.host)}:{port}",
                               on_moved=moved)
        pipeline.cluster = member
        try:
            await loop.run_in_executor(None, member.start)
        except Exception as e:
            await gateway.close()
            await loop.run_in_executor(None, pipeline.stop, stop_timeout)
            await close_events()
            await runner.cleanup()
            raise UserError(f"cluster.mode kafka: cannot reach the brokers of events.kafka "
                            f"({type(e).__name__}: {e}); check events.kafka.bootstrap_servers and that the "
                            "broker is up") from None
    if announce:  # a worker of `run --workers N` leaves this to the supervisor, whose port it is
        print(f"stream-redact: {len(pipeline.streams)} stream(s) running; metrics at "
              f"http://{config.http.host}:{port}/metrics, health at /healthz and /readyz", file=sys.stderr,
              flush=True)
    if on_listen is not None:
        on_listen(port)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                if pipeline.ended:
                    log.info("every source has ended")
                    break
    finally:
        log.info("stopping")
        if member is not None:  # its streams stop first, then it leaves the group: no stream runs twice
            await loop.run_in_executor(None, member.stop, stop_timeout)
        try:  # bounded: WebRTC sessions that will not close must not keep the pipeline running
            await asyncio.wait_for(gateway.close(), stop_timeout)
        except TimeoutError:
            log.warning("WebRTC sessions did not close within %g s; stopping streams anyway", stop_timeout)
        await loop.run_in_executor(None, pipeline.stop, stop_timeout)
        await close_events()
        await runner.cleanup()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    if announce:
        print("stream-redact: stopped", file=sys.stderr, flush=True)
    return 0
