"""Sink selection: build the configured sink and the emitter that feeds it, for `stream-redact run`."""

from __future__ import annotations

import logging

from stream.config import PipelineConfig
from stream.core.metrics import Metrics
from stream.events.emitter import EventEmitter, model_info
from stream.events.sink import EventSink

log = logging.getLogger(__name__)


def build_sink(config: PipelineConfig, metrics: Metrics) -> EventSink | None:
    """The sink named by ``events.sink`` (jsonl by default, kafka when configured), not started.

    Problems on this machine (a spool folder in use, a file that cannot be opened) raise
    UserError here, before any video flows; problems with the brokers are alarms at runtime."""
    ev = config.events
    sink: EventSink
    if ev.selected == "none":
        return None
    if ev.selected == "kafka":
        from stream.events.kafka import KafkaSink

        sink = KafkaSink(ev, metrics)
    else:
        from stream.events.jsonl import JsonlSink

        sink = JsonlSink(ev.jsonl, metrics, ev.queue_size)
    sink.source = ev.source_uri
    return sink


def start_events(config: PipelineConfig, metrics: Metrics) -> EventEmitter | None:
    """Build and start the sink and return the emitter to add to ``Pipeline.observers``.

    Call ``close()`` on the result after the pipeline has stopped."""
    sink = build_sink(config, metrics)
    if sink is None:
        return None
    sink.start()
    where = getattr(sink, "path", None) or ",".join(config.events.kafka.bootstrap_servers
                                                    if config.events.kafka else [])
    log.info("events: %s sink -> %s", sink.name, where)
    return EventEmitter(sink, config.events, model_info(config.detection))


def sink_health(emitter: EventEmitter | None) -> tuple[bool, str | None]:
    """``(healthy, problem)`` of the sink behind ``emitter``, for ``/readyz`` and status pages.

    Events switched off (no emitter) count as healthy. ``problem`` is a short sentence with the
    fix and no secrets (e.g. a full disk under the spool, brokers that cannot be reached)."""
    if emitter is None:
        return True, None
    sink = emitter.sink
    if not isinstance(sink, EventSink):
        return True, None
    problem = sink.problem
    return problem is None, problem
