"""Sink selection: build the configured sink and the emitter that feeds it, for `stream-redact run`."""

from __future__ import annotations

import logging
from typing import Protocol

from stream.config import PipelineConfig
from stream.core.metrics import Metrics
from stream.events.emitter import EventEmitter, model_info
from stream.events.sink import EventSink

log = logging.getLogger(__name__)


class Delivery(Protocol):
    """Another process delivers this pipeline's spool (``events.delivery: process``): a
    :class:`~stream.events.delivery.DeliveryProcess` or a :class:`~stream.events.delivery.DeliveryStatus`."""

    def health(self) -> tuple[bool, str | None]: ...


def build_sink(config: PipelineConfig, metrics: Metrics,
               delivery: Delivery | None = None) -> EventSink | None:
    """The sink named by ``events.sink`` (jsonl by default, kafka when configured), not started.

    With ``delivery`` (another process delivers, see :mod:`stream.events.delivery`) a Kafka sink
    only appends to the spool; without it, it also sends from a thread of this process.

    Problems on this machine (a spool folder in use, a file that cannot be opened) raise
    UserError here, before any video flows; problems with the brokers are alarms at runtime."""
    ev = config.events
    sink: EventSink
    if ev.selected == "none":
        return None
    if ev.selected == "kafka" and delivery is not None:
        from stream.events.kafka import SpoolWriterSink

        sink = SpoolWriterSink(ev, metrics, delivery.health)
    elif ev.selected == "kafka":
        from stream.events.kafka import KafkaSink

        sink = KafkaSink(ev, metrics)
    else:
        from stream.events.jsonl import JsonlSink

        sink = JsonlSink(ev.jsonl, metrics, ev.queue_size)
    sink.source = ev.source_uri
    return sink


def start_events(config: PipelineConfig, metrics: Metrics,
                 delivery: Delivery | None = None) -> EventEmitter | None:
    """Build and start the sink and return the emitter to add to ``Pipeline.observers``.

    ``delivery``: the process that delivers this pipeline's spool to Kafka, when one does
    (``events.delivery: process``); the sink then only appends to the spool, its health includes
    the delivery process's, and with a :class:`~stream.events.delivery.DeliveryProcess` the
    process's metrics are served from ``metrics`` too. None: delivery runs on a thread here.

    Call ``close()`` on the result after the pipeline has stopped."""
    sink = build_sink(config, metrics, delivery)
    if sink is None:
        return None
    elsewhere = delivery is not None and config.events.selected == "kafka"
    from stream.events.delivery import DeliveryProcess

    if elsewhere and isinstance(delivery, DeliveryProcess):
        delivery.merge_metrics_into(metrics)
    sink.start()
    where = getattr(sink, "path", None) or ",".join(config.events.kafka.bootstrap_servers
                                                    if config.events.kafka else [])
    how = " (delivered by another process)" if elsewhere else ""
    log.info("events: %s sink -> %s%s", sink.name, where, how)
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
