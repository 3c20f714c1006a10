"""Prometheus metrics of the live pipeline, on a registry of its own (one per pipeline).

Labels are stream ids and fixed reason/class names only: never URLs, which may carry
credentials, and nothing unbounded.
"""

from __future__ import annotations

import contextlib

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # the *_created series double the output and no dashboard uses them

LATENCY_BUCKETS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
                   0.75, 1.0, 1.5, 2.0, 5.0)
INFERENCE_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
FILL_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class Metrics:
    """Every series the pipeline exports; stages get this object, never the registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        p = "stream_redact_"
        self.frames_in = Counter(p + "frames_in", "Frames decoded from a source", ["stream"], registry=r)
        self.frames_published = Counter(p + "frames_published", "Redacted frames handed to outputs",
                                        ["stream"], registry=r)
        self.frames_sent = Counter(p + "output_frames", "Frames encoded and written by an output",
                                   ["stream", "output"], registry=r)
        self.frames_dropped = Counter(p + "frames_dropped", "Frames not published (load, output down)",
                                      ["stream", "reason"], registry=r)
        self.frames_blanked = Counter(p + "frames_blanked", "Frames published black: no detections in time",
                                      ["stream", "reason"], registry=r)
        self.frames_withheld = Counter(p + "frames_withheld", "Frames withheld: detection failed or late",
                                       ["stream", "reason"], registry=r)
        self.detections = Counter(p + "detections", "Regions masked, by class", ["stream", "label"],
                                  registry=r)
        self.shot_cuts = Counter(p + "shot_cuts", "Cuts to another view, where the old view's masks ended",
                                 ["stream"], registry=r)
        self.batch_size = Histogram(p + "batch_size", "Frames per detector run", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.inference_seconds = Histogram(p + "inference_seconds", "Detector run time per batch",
                                           buckets=INFERENCE_BUCKETS, registry=r)
        self.latency = Histogram(p + "latency_seconds", "Capture to publish (frame written by the output)",
                                 ["stream", "output"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Frames waiting for detection", ["stream"], registry=r)
        self.reconnects = Counter(p + "reconnects", "Reconnect attempts after a failure",
                                  ["stream", "side"], registry=r)
        self.stream_up = Gauge(p + "stream_up", "1 while the source delivers frames", ["stream"], registry=r)
        self.output_up = Gauge(p + "output_up", "1 while the output is connected", ["stream", "output"],
                               registry=r)
        self.source_errors = Counter(p + "source_errors", "Source failures by kind", ["stream", "kind"],
                                     registry=r)
        self.detector_restarts = Counter(p + "detector_restarts", "Detector recreated after an error or hang",
                                         ["reason"], registry=r)
        self.detector_up = Gauge(p + "detector_up", "1 while a detector is loaded and healthy", registry=r)
        # events (stream/events): labels are event types, sink names and fixed reasons only
        self.events_produced = Counter(p + "events_produced", "Events created by the pipeline, by type",
                                       ["type"], registry=r)
        self.events_spooled = Counter(p + "events_spooled",
                                      "Events written to the Kafka sink's spool (accepted)", registry=r)
        self.events_delivered = Counter(p + "events_delivered",
                                        "Events acknowledged by the brokers (kafka) or written (jsonl)",
                                        ["sink"], registry=r)
        self.events_failed = Counter(p + "events_failed", "Event sends that failed and will be retried",
                                     ["sink", "reason"], registry=r)
        self.events_resent = Counter(p + "events_resent", "Events sent again after a failure (at-least-once)",
                                     registry=r)
        self.events_dropped = Counter(p + "events_dropped", "Events lost before delivery, by reason",
                                      ["reason"], registry=r)
        self.events_sink_errors = Counter(p + "events_sink_errors",
                                          "Problems reaching the sink (connect, send), by reason",
                                          ["sink", "reason"], registry=r)
        self.events_sink_up = Gauge(p + "events_sink_up", "1 while the event sink delivers", ["sink"],
                                    registry=r)
        self.events_storage_failing = Gauge(p + "events_storage_failing",
                                            "1 while the sink cannot write events to its local storage "
                                            "(disk full, quota, I/O error); they are dropped meanwhile",
                                            ["sink"], registry=r)
        self.events_queue_depth = Gauge(p + "events_queue_depth",
                                        "Events waiting in memory for the sink thread", registry=r)
        self.events_spool_events = Gauge(p + "events_spool_events", "Events in the spool not yet delivered",
                                         registry=r)
        self.events_spool_bytes = Gauge(p + "events_spool_bytes", "Bytes of spool files on disk", registry=r)
        self.events_spool_full = Gauge(p + "events_spool_full",
                                       "1 while the spool is full and events are dropped", registry=r)
        self.events_delivery_seconds = Histogram(p + "events_delivery_seconds",
                                                 "Event time (e.g. frame capture) to delivery", ["sink"],
                                                 buckets=DELIVERY_BUCKETS, registry=r)
        # GPU stage: NVML samples (only where a GPU and nvidia-ml-py are present), batch fill and
        # host<->device traffic of the inference backends
        self.gpu_utilization = Gauge(p + "gpu_utilization_ratio", "GPU busy share over the last sample",
                                     ["device"], registry=r)
        self.gpu_memory_used = Gauge(p + "gpu_memory_used_bytes", "GPU memory in use", ["device"], registry=r)
        self.gpu_memory_total = Gauge(p + "gpu_memory_total_bytes", "GPU memory size", ["device"], registry=r)
        self.batch_fill = Histogram(p + "batch_fill_ratio", "Frames per detector run over max_batch",
                                    buckets=FILL_BUCKETS, registry=r)
        self.transfer_bytes = Counter(p + "transfer_bytes", "Bytes copied between host and GPU",
                                      ["direction"], registry=r)
        self.model_looks = Counter(p + "model_looks", "Change-gated model runs (detection.skip_unchanged) by "
                                   "what the model looked at: full, crops or skip", ["look"], registry=r)
        # cluster mode (stream/live/cluster.py): this worker's share of the consumer group's partitions
        self.cluster_partitions = Gauge(p + "cluster_partitions", "Assignment partitions this worker holds",
                                        registry=r)
        self.cluster_streams = Gauge(p + "cluster_streams", "Streams the cluster gave this worker that run "
                                     "here", registry=r)
        self.cluster_rebalances = Counter(p + "cluster_rebalances", "Assignments received from the consumer "
                                          "group", registry=r)
        self.cluster_members = Gauge(p + "cluster_members", "Workers of the cluster heard from within 1.5 "
                                     "session timeouts (this one included), from the members topic",
                                     registry=r)
        # recordings (stream/live/publish/record.py): reasons are fixed names (retention, disk_full, io)
        self.recording_segments = Counter(p + "recording_segments", "Recording segments finished with a "
                                          "manifest", ["stream"], registry=r)
        self.recording_bytes = Gauge(p + "recording_bytes", "Bytes of finished segments and manifests on "
                                     "disk", ["stream"], registry=r)
        self.recording_deleted = Counter(p + "recording_deleted", "Recording segments deleted, by reason "
                                         "(retention, disk_full)", ["stream", "reason"], registry=r)
        self.recording_errors = Counter(p + "recording_errors", "Recording write failures, by reason "
                                        "(disk_full, io, locked); the segment being written is lost",
                                        ["stream", "reason"], registry=r)
        self.recording_failing = Gauge(p + "recording_failing", "1 while a recording cannot be written "
                                       "(alarm on it)", ["stream"], registry=r)
        # audio (stream/live/audio_lane.py): how each second of sound left, and the redactor's health
        self.audio_seconds = Counter(p + "audio_seconds", "Seconds of audio published, by what happened to "
                                     "them: kept, speech (muted or disguised), fault or late (muted because "
                                     "the redactor failed or fell behind)", ["stream", "result"], registry=r)
        self.audio_speech_segments = Counter(p + "audio_speech_segments", "Stretches of speech found",
                                             ["stream"], registry=r)
        self.audio_faults = Counter(p + "audio_faults", "Audio redactor failures (the audio they cover is "
                                    "muted)", ["stream"], registry=r)
        self.audio_delay = Gauge(p + "audio_delay_seconds", "How long the audio is held back for the speech "
                                 "detector's look-ahead", ["stream"], registry=r)

    def forget_stream(self, stream_id: str) -> None:
        """Remove a removed stream's series so dashboards do not show it forever."""
        for metric in (self.frames_in, self.frames_published, self.queue_depth, self.stream_up,
                       self.shot_cuts, self.recording_segments, self.recording_bytes, self.recording_failing,
                       self.audio_speech_segments, self.audio_faults, self.audio_delay):
            with contextlib.suppress(KeyError):
                metric.remove(stream_id)
        for metric in (self.frames_sent, self.frames_dropped, self.frames_blanked, self.frames_withheld,
                       self.detections, self.latency, self.reconnects, self.output_up, self.source_errors,
                       self.recording_deleted, self.recording_errors, self.audio_seconds):
            for labels in _series(metric, stream_id):
                with contextlib.suppress(KeyError):  # removed meanwhile
                    metric.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _series(metric: Counter | Gauge | Histogram, stream_id: str) -> set[tuple[str, ...]]:
    """The label values of each of ``metric``'s series for one stream, read from its samples (a
    sample's labels are the metric's label names in order, then ``le`` for a histogram bucket)."""
    return {tuple(v for k, v in s.labels.items() if k != "le")
            for family in metric.collect() for s in family.samples if s.labels.get("stream") == stream_id}


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """Current value of one series (0 when absent): for status pages and tests."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
