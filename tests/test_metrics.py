"""The pipeline's metrics: a removed stream's series go, every other stream's stay."""

from __future__ import annotations

from stream.core.metrics import Metrics, sample


def test_forgetting_a_stream_removes_only_its_series() -> None:
    m = Metrics()
    for sid in ("gate", "gate-2"):
        m.frames_in.labels(sid).inc()
        m.frames_sent.labels(sid, "rtsp-0").inc(3)
        m.frames_dropped.labels(sid, "queue").inc()
        m.latency.labels(sid, "rtsp-0").observe(0.05)
        m.output_up.labels(sid, "rtsp-0").set(1)
        m.source_errors.labels(sid, "timeout").inc()
    m.batch_size.observe(2)
    m.forget_stream("gate")
    text = m.render().decode()
    assert 'stream="gate"' not in text
    assert sample(m, "stream_redact_output_frames_total", stream="gate-2", output="rtsp-0") == 3
    assert sample(m, "stream_redact_latency_seconds_count", stream="gate-2", output="rtsp-0") == 1
    assert sample(m, "stream_redact_source_errors_total", stream="gate-2", kind="timeout") == 1
    assert sample(m, "stream_redact_batch_size_count") == 1
    m.forget_stream("gate")  # twice, or a stream that never had a series: nothing to do
    m.forget_stream("never-seen")
    assert 'stream="gate-2"' in m.render().decode()
