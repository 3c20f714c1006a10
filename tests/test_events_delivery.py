"""Event delivery in a process of its own (``events.delivery: process``): the pipeline appends to the
spool, a delivery process reads it and sends to a real Kafka-protocol broker (Tansu).

What must hold is what holds in the thread mode: every event accepted (its record whole in the
spool: the writer's ``written_seq``) reaches the topic at least once, whichever of the two
processes is killed and when; per stream in order; a full spool drops by its policy and counts
exactly; a broker outage is reported and loses nothing. The spool's two halves are tested on
their own first (no broker), then with real processes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, Clip, make_clip
from kafka_broker import Broker, free_port, read_topic
from live_helpers import NoFaces, ServiceThread, wait_for

from stream.config import PipelineConfig, parse_config
from stream.core.errors import UserError
from stream.core.metrics import Metrics, sample
from stream.events import schema
from stream.events.delivery import DeliveryProcess, DeliveryStatus, start_delivery, start_own_delivery
from stream.events.kafka import KafkaSink, SpoolWriterSink
from stream.events.sinks import build_sink, start_events
from stream.events.spool import SUFFIX, Spool, SpoolReader, SpoolWriter, encode_record, read_cursor

pytestmark = pytest.mark.timeout(240)
SECRET = "s3cret-Delivery-Pw-8812"


# -- the spool's two halves, without a broker ---------------------------------------------------------

def enc(payload: bytes, seq: int) -> bytes:
    return b'{"n":%s,"seq":%d}' % (payload, seq)


def put(w: SpoolWriter, *ns: int) -> None:
    res = w.append([("cam1", "track", 1.0, str(n).encode()) for n in ns], enc)
    assert res.written == len(ns)


def values(recs: list[Any]) -> list[int]:
    return [int(r.value.split(b",")[0][5:]) for r in recs]


def segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("*" + SUFFIX))


def test_the_reader_reads_in_order_what_the_writer_wrote_and_deletes_what_it_delivered(
        tmp_path: Path) -> None:
    with SpoolWriter(tmp_path, 1 << 20, segment_bytes=200) as w, SpoolReader(tmp_path) as r:
        assert r.read(100) == [] and r.unread == 0 and r.pending == 0
        put(w, *range(30))
        assert r.unread == 30 and w.written_seq == 31
        recs = r.read(1000)
        assert values(recs) == list(range(30)) and [x.seq for x in recs] == list(range(1, 31))
        assert len(segments(tmp_path)) > 3
        r.ack(recs[20])
        r.commit()
        assert all(int(p.name[:-len(SUFFIX)]) >= recs[20].segment for p in segments(tmp_path))
        assert w.pending == 9 and r.pending == 9
        assert w.bytes == sum(p.stat().st_size for p in segments(tmp_path))  # the writer sees the deletions
        put(w, 30)
        assert values(r.read(10)) == [30]


def test_a_restarted_reader_resends_from_its_cursor_and_a_drained_spool_is_emptied(tmp_path: Path) -> None:
    w = SpoolWriter(tmp_path, 1 << 20, segment_bytes=200)
    put(w, *range(10))
    with SpoolReader(tmp_path) as r:
        r.ack(r.read(100)[3])  # 0-3 delivered; the reader then dies
    with SpoolReader(tmp_path) as r:
        recs = r.read(100)
        assert values(recs) == [4, 5, 6, 7, 8, 9]
        r.ack(recs[-1])
    assert segments(tmp_path), "the writer still runs: its segment stays"
    w.close()
    with SpoolReader(tmp_path):
        pass
    assert not segments(tmp_path), "delivered and no writer: the spool is emptied"
    with SpoolWriter(tmp_path, 1 << 20) as w, SpoolReader(tmp_path) as r:
        put(w, 10)
        assert [x.seq for x in r.read(10)] == [11]  # numbering goes on


def test_a_record_still_being_written_or_torn_by_a_crash_is_not_read(tmp_path: Path) -> None:
    with SpoolReader(tmp_path) as r:
        with SpoolWriter(tmp_path, 1 << 20) as w:
            put(w, 1, 2, 3)
        assert values(r.read(10)) == [1, 2, 3]
        with segments(tmp_path)[-1].open("ab") as f:
            f.write(b'4 cam1 track 1.000 deadbeef {"n":4')  # no newline: being written, or torn
        assert r.read(10) == [] and r.unread == 0 and r.pending == 3
        with segments(tmp_path)[-1].open("ab") as f:
            f.write(b',"seq":4}')
        assert r.read(10) == [] and r.corrupt == 0  # still no newline: still waiting
        with SpoolWriter(tmp_path, 1 << 20) as w:  # a writer that starts cuts the torn record off
            put(w, 5)
            recs = r.read(10)
        assert values(recs) == [5] and recs[0].seq == 4 and r.corrupt == 0


def test_a_torn_record_with_a_later_segment_after_it_is_skipped(tmp_path: Path) -> None:
    with SpoolWriter(tmp_path, 1 << 20) as w:
        put(w, 1, 2)
    with segments(tmp_path)[-1].open("ab") as f:
        f.write(b"3 cam1 track 1.000 dead")
    (tmp_path / f"{4:020d}{SUFFIX}").write_bytes(encode_record(4, "cam1", "track", 1.0, enc(b"4", 4)))
    with SpoolReader(tmp_path) as r:
        assert values(r.read(10)) == [1, 2, 4] and r.corrupt == 0


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_a_full_spool_drops_by_policy_and_counts_exactly_with_the_reader_apart(tmp_path: Path,
                                                                               policy: str) -> None:
    with SpoolWriter(tmp_path, 4000, policy, segment_bytes=500) as w, SpoolReader(tmp_path) as r:
        dropped = 0
        for n in range(200):
            res = w.append([("cam1", "track", 1.0, str(n).encode())], enc)
            dropped += res.dropped_new + res.dropped_old
        assert w.bytes <= 4000
        kept = values(r.read(1000))
        assert len(kept) + dropped == 200
        first = 0 if policy == "drop_newest" else 200 - len(kept)  # the first or the last ones stayed
        assert kept == list(range(first, first + len(kept)))


def test_records_in_flight_when_their_segment_is_dropped_are_counted_by_the_writer(tmp_path: Path) -> None:
    with SpoolWriter(tmp_path, 4000, "drop_oldest", segment_bytes=500) as w, SpoolReader(tmp_path) as r:
        put(w, *range(10))
        in_flight = r.read(5)  # sent, not acknowledged
        lost = 0
        for n in range(10, 200):
            lost += w.append([("cam1", "track", 1.0, str(n).encode())], enc).dropped_old
        rest = r.read(1000)  # the reader notices its segment is gone and goes on with the next one
        assert lost + len(rest) == 200  # the five in flight are among the lost: nothing acknowledged them
        assert values(rest) == list(range(200 - len(rest), 200))
        assert r.rewind(in_flight[0]) > in_flight[-1].seq  # gone: resending starts after it


def test_a_spool_folder_has_one_writer_and_one_reader(tmp_path: Path) -> None:
    with SpoolWriter(tmp_path, 1 << 20), SpoolReader(tmp_path):
        with pytest.raises(UserError, match=r"is in use by pid \d+; give each pipeline"):
            SpoolWriter(tmp_path, 1 << 20)
        with pytest.raises(UserError, match=r"is already read by pid \d+ \(an events delivery process\); "
                                            r"run one delivery process per spool folder"):
            SpoolReader(tmp_path)
    with SpoolReader(tmp_path), pytest.raises(UserError, match="is already read by"):
        Spool(tmp_path, 1 << 20)  # the thread mode reads too
    Spool(tmp_path, 1 << 20).close()


class FlakyProducer:
    """Stands in for kafka-python's producer: sends are answered in order, in sweeps of at least
    ``SWEEP`` (or whatever waits once sending pauses), so that batches of both spools are in flight
    together; the first send of the events named in ``fail_once`` fails (a broker timing out), and
    once closed (the sink halts it at a failure) nothing more goes out: what still waits fails."""

    SWEEP = 2500

    def __init__(self, sent: list[tuple[bytes | None, bytes]], fail_once: set[str]) -> None:
        self.sent, self.fail_once = sent, fail_once
        self.closed = False
        self._pending: list[tuple[Any, bytes | None, bytes, str]] = []
        self._last_send = time.monotonic()
        self._lock = threading.Lock()
        threading.Thread(target=self._answer, daemon=True).start()

    def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def bootstrap_connected(self) -> bool:
        return True

    def send(self, topic: str, value: bytes, key: bytes | None, headers: Any, partition: Any) -> Any:
        from kafka.errors import KafkaTimeoutError
        from kafka.future import Future

        fut = Future()
        with self._lock:
            if self.closed:
                return fut.failure(KafkaTimeoutError("closed"))
            self._pending.append((fut, key, value, json.loads(value)["id"]))
            self._last_send = time.monotonic()
        return fut

    def _answer(self) -> None:
        from kafka.errors import KafkaTimeoutError

        pause = threading.Event()
        while not pause.wait(0.005):  # the broker's answers, looked for every 5 ms
            with self._lock:
                due = len(self._pending) >= self.SWEEP or self.closed or (
                    self._pending and time.monotonic() - self._last_send > 0.05)
                sweep, self._pending = (self._pending, []) if due else ([], self._pending)
                last = self.closed and not sweep
            for fut, key, value, eid in sweep:
                if self.closed:
                    fut.failure(KafkaTimeoutError("closed"))
                elif eid in self.fail_once:
                    self.fail_once.discard(eid)
                    fut.failure(KafkaTimeoutError("injected"))  # the sink halts (closes) us right here
                else:
                    self.sent.append((key, value))
                    fut.success(None)
            if last:
                return

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


def test_a_failed_send_rewinds_each_spool_it_had_records_in_flight_from(tmp_path: Path) -> None:
    """One sender over two spools (as a delivery process over two workers' folders): after a failure
    each spool is read again from its own oldest record in flight; nothing is skipped, per stream
    in order, and each spool's cursor reaches its own end."""
    from stream.events.delivery import SpoolSet
    from stream.events.kafka import _stamp

    folders = [tmp_path / "w0", tmp_path / "w1"]
    writers = [SpoolWriter(f, 1 << 24) for f in folders]
    ids: list[str] = []
    for i in range(3000):
        e = event(i, f"cam{i % 4}")
        ids.append(e["id"])
        writers[i % 2].append([(e["subject"], "stream", 1.0, e)], _stamp)
    sent: list[tuple[bytes | None, bytes]] = []
    fail_once = {ids[700], ids[1301], ids[2400]}
    cfg = events_config(tmp_path / "unused", "127.0.0.1:9", "t")
    readers = SpoolSet([SpoolReader(f, i) for i, f in enumerate(folders)])
    m = Metrics()
    sink = KafkaSink(cfg.events, m, producer_factory=lambda _: FlakyProducer(sent, fail_once), spool=readers)
    sink.start()
    try:
        wait_for(lambda: all(r.cursor[0] >= w.written_seq
                             for r, w in zip(readers.readers, writers, strict=True)),
                 timeout=60, what="both spools delivered")
    finally:
        sink.close(1)
        for w in writers:
            w.close()
    assert not fail_once, "every injected failure happened"
    assert sample(m, "stream_redact_events_resent_total") > 0
    first: dict[str, bytes] = {}
    last: dict[bytes | None, str] = {}
    for key, value in sent:
        e = json.loads(value)
        if e["id"] not in first:
            first[e["id"]] = value
            assert e["sequence"] > last.get(key, ""), f"out of order for {key!r}"
            last[key] = e["sequence"]
    assert set(first) == set(ids)


def test_delivery_is_a_process_by_default_and_can_be_a_thread() -> None:
    assert parse_config({}).events.delivery == "process"
    assert parse_config({"events": {"delivery": "thread"}}).events.delivery == "thread"
    with pytest.raises(Exception, match=r"events\.delivery"):
        parse_config({"events": {"delivery": "fork"}})


# -- with a broker and real processes ------------------------------------------------------------------

@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(log=tmp_path_factory.mktemp("tansu") / "tansu.log").start()
    yield b
    b.stop()


def new_topic(broker: Broker) -> str:
    name = f"ev-{uuid.uuid4().hex[:8]}"
    broker.create_topic(name, partitions=3)
    return name


def events_config(folder: Path, bootstrap: str, topic: str, **events: Any) -> PipelineConfig:
    kafka = {"bootstrap_servers": [bootstrap], "topic": topic, "connect_timeout_s": 2,
             **events.pop("kafka", {})}
    return parse_config({"events": {"kafka": kafka, "spool": {"dir": str(folder), **events.pop("spool", {})},
                                    "source": "/stream-redact/test", **events}})


def event(i: int, stream: str = "cam1") -> dict[str, Any]:
    e = schema.envelope(schema.STREAM_UP, "/t", 1_764_190_800.0 + i, {"stream_id": stream, "state": "up"},
                        stream)
    e["id"] = f"{i:032x}"
    return e


def delivered_ids(bootstrap: str, topic: str, until: int | None = None,
                  timeout: float = 60) -> dict[str, int]:
    """Id -> copies on the topic; checks that per key the first copies follow ``sequence``.

    ``until`` counts distinct ids, not records: after a kill some events are on the topic twice,
    so stopping at ``until`` records would leave the last ones unread."""
    deadline = time.monotonic() + timeout
    while True:
        seen: dict[str, int] = {}
        last: dict[bytes | None, str] = {}
        for r in read_topic(bootstrap, topic, timeout=max(5.0, deadline - time.monotonic())):
            e = json.loads(r.value)
            if e["id"] not in seen:
                assert e["sequence"] > last.get(r.key, ""), f"out of order for key {r.key!r}"
                last[r.key] = e["sequence"]
            seen[e["id"]] = seen.get(e["id"], 0) + 1
        if until is None or len(seen) >= until or time.monotonic() >= deadline:
            return seen


def delivered_through(spool: Path) -> int:
    """The first seq the delivery process has not recorded as acknowledged (its cursor on disk)."""
    return read_cursor(spool)[0]


def reported(d: DeliveryProcess, name: str, **labels: str) -> float:
    """A value from the delivery process's last metrics report."""
    total = 0.0
    for _, _, _, samples in d.metrics():
        for sname, slabels, value in samples:
            if sname == name and all(slabels.get(k) == v for k, v in labels.items()):
                total += value
    return total


@pytest.fixture
def deliveries() -> Iterator[list[DeliveryProcess]]:
    """Delivery processes a test started, stopped at its end whatever happened."""
    started: list[DeliveryProcess] = []
    yield started
    for d in started:
        d.stop(0)


@dataclass
class Delivering:
    """One pipeline-side emitter whose spool a delivery process delivers to a fresh topic."""

    topic: str
    spool: Path
    delivery: DeliveryProcess
    metrics: Metrics
    emitter: Any


def delivering(broker: Broker, tmp_path: Path, deliveries: list[DeliveryProcess]) -> Delivering:
    topic = new_topic(broker)
    spool = tmp_path / "spool"
    cfg = events_config(spool, broker.bootstrap, topic)
    d = start_delivery(cfg, [spool])
    deliveries.append(d)
    m = Metrics()
    return Delivering(topic, spool, d, m, start_events(cfg, m, delivery=d))


def test_events_written_here_are_delivered_by_the_delivery_process(broker: Broker, tmp_path: Path,
                                                                   deliveries: list[DeliveryProcess]) -> None:
    run = delivering(broker, tmp_path, deliveries)
    topic, spool, d, m, em = run.topic, run.spool, run.delivery, run.metrics, run.emitter
    assert d.alive and d.pid != os.getpid() and d.metrics_port
    assert d.health() == (True, None)
    assert em is not None and isinstance(em.sink, SpoolWriterSink)
    ids = []
    for i in range(600):
        e = event(i, f"cam{i % 3}")
        ids.append(e["id"])
        assert em.sink.submit(e)
    wait_for(lambda: sample(m, "stream_redact_events_delivered_total", sink="kafka") >= 600, timeout=60,
             what="the delivery process's count in the pipeline's own metrics")
    assert sample(m, "stream_redact_events_spooled_total") == 600
    assert sample(m, "stream_redact_events_sink_up", sink="kafka") == 1 and em.sink.problem is None
    rendered = m.render().decode()
    assert rendered.count("# TYPE stream_redact_events_delivered_total counter") == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10) as resp:
        own = resp.read().decode()
    assert 'stream_redact_events_delivered_total{sink="kafka"} 600.0' in own
    assert "stream_redact_frames_in" not in own, "the delivery process exports events series only"
    em.close(5)
    d.stop(10)
    assert not d.alive
    seen = delivered_ids(broker.bootstrap, topic, until=600)
    assert set(seen) == set(ids)
    assert not segments(spool), "delivered, both halves stopped: the spool is empty"


def test_health_names_a_killed_child_before_its_watch_has_recorded_it(tmp_path: Path) -> None:
    """Between the kill and the watch thread reading the child's end, health said 'starting'."""
    d = DeliveryProcess(PipelineConfig().events, [tmp_path])
    suicide = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    child = subprocess.Popen([sys.executable, "-c", suicide])
    child.wait(10)
    d._proc = child  # as the watch thread sees it before it records the end
    d._port = 1
    assert not d.alive
    up, problem = d.health()
    assert not up and problem is not None
    assert f"pid {child.pid}, killed by signal 9" in problem and "starting" not in problem


def test_a_killed_delivery_process_loses_nothing_accepted(broker: Broker, tmp_path: Path,
                                                          deliveries: list[DeliveryProcess]) -> None:
    run = delivering(broker, tmp_path, deliveries)
    topic, spool, d, em = run.topic, run.spool, run.delivery, run.emitter
    assert em is not None and isinstance(em.sink, SpoolWriterSink)
    sink = em.sink
    accepted: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            for _ in range(20):
                e = event(i, f"cam{i % 4}")
                if sink.submit(e):
                    accepted.append(e["id"])
                i += 1
            stop.wait(0.005)  # a steady flow of events, about 4,000/s

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        wait_for(lambda: delivered_through(spool) > 2000, timeout=60, what="events delivered before the kill")
        old = d.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: not d.alive, timeout=10, what="the delivery process to be gone")
        up, problem = d.health()
        assert not up and problem is not None and "not running" in problem and "killed by signal 9" in problem
        wait_for(lambda: em.sink.problem is not None, timeout=10, what="the pipeline to see it")
        written = sink.spool.written_seq
        wait_for(lambda: sink.spool.written_seq > written + 1000, timeout=30,
                 what="events accepted while nobody delivers")
        d.restart()
        assert d.alive and d.pid != old
        wait_for(lambda: delivered_through(spool) > sink.spool.written_seq - 1000, timeout=60,
                 what="delivery to go on")
    finally:
        stop.set()
        t.join(10)
    em.close(5)
    written = sink.spool.written_seq
    assert written - 1 == len(accepted)  # every event submitted was accepted (the queue never filled)
    wait_for(lambda: delivered_through(spool) >= written, timeout=60, what="the rest to be delivered")
    seen = delivered_ids(broker.bootstrap, topic, until=len(accepted), timeout=90)
    missing = [i for i in accepted if i not in seen]
    assert not missing, f"{len(missing)} of {len(accepted)} accepted events never arrived"
    repeats = sum(seen.values()) - len(seen)
    print(f"delivery killed: {len(accepted)} accepted, all delivered, {repeats} repeats")


WRITER = """
import sys, time
from pathlib import Path
from stream.events import schema
from stream.events.kafka import _stamp
from stream.events.spool import SpoolWriter
spool = SpoolWriter(Path(sys.argv[1]), 1 << 30, fsync="never", segment_bytes=64 << 10)
i = 0
while True:
    batch = []
    for _ in range(50):
        e = schema.envelope(schema.STREAM_UP, "/t", time.time(), {"stream_id": "cam1", "state": "up"}, "cam1")
        e["id"] = f"{i:032x}"
        batch.append(("cam1", "stream", time.time(), e))
        i += 1
    spool.append(batch, _stamp)
    print(spool.written_seq, flush=True)  # accepted: every event numbered below this
"""


def test_a_writer_killed_mid_write_loses_nothing_it_had_accepted(broker: Broker, tmp_path: Path,
                                                                  deliveries: list[DeliveryProcess]) -> None:
    topic = new_topic(broker)
    spool = tmp_path / "spool"
    cfg = events_config(spool, broker.bootstrap, topic)
    d = start_delivery(cfg, [spool])
    deliveries.append(d)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(spool)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        accepted = 1
        while accepted < 20_000:  # writing flat out, several segments, while the reader reads along
            accepted = int(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with segments(spool)[-1].open("ab") as f:  # whether or not the kill tore one, a torn record
        f.write(b'99999999 cam1 stream 1.000 0badc0de {"specversion"')
    wait_for(lambda: delivered_through(spool) >= accepted, timeout=90, what="every accepted event")
    # nothing is seen as waiting behind the torn record (no stall alarm, drained at stop)
    wait_for(lambda: reported(d, "stream_redact_events_spool_events") == 0 and
             reported(d, "stream_redact_events_delivered_total") >= accepted - 1, timeout=30,
             what="the delivery process to report an empty backlog")
    assert d.health() == (True, None)
    # a new writer cuts the torn record off and goes on; the reader follows
    m = Metrics()
    em = start_events(cfg, m, delivery=d)
    assert em is not None
    later = [event(10_000_000 + i) for i in range(100)]
    for e in later:
        assert em.sink.submit(e)
    em.close(5)
    written = em.sink.spool.written_seq  # type: ignore[attr-defined]
    wait_for(lambda: delivered_through(spool) >= written, timeout=60, what="the new writer's events")
    seen = delivered_ids(broker.bootstrap, topic, until=written - 1, timeout=90)
    missing = [i for i in range(accepted - 1) if f"{i:032x}" not in seen]
    assert not missing, f"{len(missing)} of {accepted - 1} accepted events never arrived"
    assert all(e["id"] in seen for e in later)


def test_a_full_spool_drops_the_oldest_with_the_writer_and_reader_in_two_processes(
        broker: Broker, tmp_path: Path, deliveries: list[DeliveryProcess]) -> None:
    topic = new_topic(broker)
    spool = tmp_path / "spool"
    away = events_config(spool, f"127.0.0.1:{free_port()}", topic, spool={"max_bytes": 1 << 20},
                         kafka={"connect_timeout_s": 1})
    d = start_delivery(away, [spool])  # nothing listens there: everything stays in the spool
    deliveries.append(d)
    m = Metrics()
    em = start_events(away, m, delivery=d)
    assert em is not None
    ids = []
    for i in range(4000):  # about 2.5 MB of events into a 1 MiB spool
        e = dict(schema.examples()["track.updated.json"], id=f"{i:032x}")
        e.pop("sequence", None)
        ids.append(e["id"])
        assert em.sink.submit(e)
    wait_for(lambda: sample(m, "stream_redact_events_spooled_total")
             + sample(m, "stream_redact_events_dropped_total", reason="spool_full") >= 4000,
             timeout=30, what="every event to be spooled or dropped")
    dropped = sample(m, "stream_redact_events_dropped_total", reason="spool_full")
    assert dropped > 1000 and sample(m, "stream_redact_events_spool_full") == 1
    assert sum(p.stat().st_size for p in segments(spool)) <= 1 << 20
    wait_for(lambda: em.sink.problem is not None and "refused the connection" in em.sink.problem,
             timeout=30, what="the outage in the pipeline's health")
    em.close(0)  # the alarm event goes into the spool as the sink stops
    d.stop(0)
    d = start_delivery(events_config(spool, broker.bootstrap, topic), [spool])
    deliveries.append(d)
    wait_for(lambda: reported(d, "stream_redact_events_delivered_total") > 0
             and reported(d, "stream_redact_events_spool_events") == 0, timeout=60, what="the spool to drain")
    d.stop(5)
    seen = delivered_ids(broker.bootstrap, topic)
    events = {}
    for r in read_topic(broker.bootstrap, topic):
        e = json.loads(r.value)
        events[e["id"]] = e
    alarms = [e for e in events.values() if e["type"] == schema.EVENTS_DROPPED]
    assert len(alarms) == 1 and alarms[0]["data"]["count"] == dropped
    assert alarms[0]["data"]["reason"] == "spool_full" and alarms[0]["data"]["policy"] == "drop_oldest"
    kept = [i for i in ids if i in seen]
    assert len(kept) + dropped == len(ids)
    assert kept == ids[-len(kept):]  # the last ones were kept


def test_the_delivery_process_of_a_single_process_run_is_started_again_when_it_dies(
        broker: Broker, tmp_path: Path, deliveries: list[DeliveryProcess]) -> None:
    spool = tmp_path / "spool"
    cfg = events_config(spool, broker.bootstrap, new_topic(broker))
    assert start_own_delivery(events_config(spool, broker.bootstrap, "t", delivery="thread")) is None
    d = start_own_delivery(cfg)
    assert d is not None
    deliveries.append(d)
    old = d.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: d.alive and d.pid != old, timeout=30, what="a new delivery process")
    assert d.health() == (True, None)


PARENT = """
import sys
from pathlib import Path
from stream.config import parse_config
from stream.events.delivery import start_delivery
cfg = parse_config({"events": {"kafka": {"bootstrap_servers": [sys.argv[1]], "topic": "t"},
                               "spool": {"dir": sys.argv[2]}}})
d = start_delivery(cfg, [Path(sys.argv[2])])
print(d.pid, flush=True)
sys.stdin.read()  # killed here
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def test_the_delivery_process_ends_when_its_parent_dies(broker: Broker, tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, broker.bootstrap, str(tmp_path / "spool")],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not _gone(child)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    wait_for(lambda: _gone(child), timeout=30, what="the orphaned delivery process to exit")
    SpoolReader(tmp_path / "spool").close()  # and it let go of the spool


def test_a_broker_outage_is_reported_by_health_and_loses_nothing(broker: Broker, tmp_path: Path,
                                                                 deliveries: list[DeliveryProcess]) -> None:
    run = delivering(broker, tmp_path, deliveries)
    topic, spool, d, m, em = run.topic, run.spool, run.delivery, run.metrics, run.emitter
    assert em is not None
    status = DeliveryStatus(spool, grace_s=0)
    ids = []
    for i in range(100):
        ids.append(event(i)["id"])
        em.sink.submit(event(i))
    wait_for(lambda: delivered_through(spool) > 100, timeout=30, what="delivery before the outage")
    broker.stop()
    try:
        for i in range(100, 400):
            ids.append(event(i)["id"])
            em.sink.submit(event(i))
        wait_for(lambda: not d.health()[0], timeout=60, what="the outage in the delivery process's health")
        problem = d.health()[1]
        assert problem is not None and "broker" in problem
        wait_for(lambda: em.sink.problem is not None, timeout=10, what="the pipeline's health to say so")
        wait_for(lambda: sample(m, "stream_redact_events_sink_up", sink="kafka") == 0, timeout=10,
                 what="the pipeline's events_sink_up to say so")
        wait_for(lambda: not status.health()[0] and status.health()[1] is not None, timeout=10,
                 what="the status file to say so to other processes")
    finally:
        broker.start()
    broker.create_topic(topic, partitions=3)
    em.close(5)
    written = em.sink.spool.written_seq  # type: ignore[attr-defined]
    wait_for(lambda: delivered_through(spool) >= written, timeout=90, what="the outage's events")
    wait_for(lambda: d.health() == (True, None), timeout=60, what="health to recover")
    seen = delivered_ids(broker.bootstrap, topic)  # the new broker: what was not acknowledged before
    missing = [i for i in ids[100:] if i not in seen]
    assert not missing, f"{len(missing)} events of the outage never arrived"


def test_one_delivery_process_delivers_the_spools_of_several_writers_through_an_outage(
        broker: Broker, tmp_path: Path, deliveries: list[DeliveryProcess]) -> None:
    """As for ``run --workers 2``: each worker writes a spool folder of its own, one process delivers
    them all; a failed send rewinds every spool that had records in flight."""
    topic = new_topic(broker)
    folders = [tmp_path / "spool" / f"worker-{i}" for i in range(2)]
    cfgs = [events_config(f, broker.bootstrap, topic) for f in folders]
    d = start_delivery(cfgs[0], folders)
    deliveries.append(d)
    emitters = [start_events(c, Metrics(), delivery=DeliveryStatus(f)) for c, f in zip(cfgs, folders,
                                                                                        strict=True)]
    ids: list[str] = []

    def write(first: int, n: int) -> None:
        for i in range(first, first + n):
            e = event(i, f"cam{i % 4}")  # cam0 and cam2 are worker 0's streams, cam1 and cam3 worker 1's
            ids.append(e["id"])
            em = emitters[i % 2]
            assert em is not None and em.sink.submit(e)

    write(0, 400)
    wait_for(lambda: all(delivered_through(f) > 150 for f in folders), timeout=60,
             what="both spools delivered from")
    broker.stop()
    try:
        write(400, 1600)
        wait_for(lambda: not d.health()[0], timeout=60, what="the outage in the delivery process's health")
    finally:
        broker.start()
    broker.create_topic(topic, partitions=3)
    write(2000, 400)
    written = []
    for em in emitters:
        assert em is not None
        em.close(5)
        written.append(em.sink.spool.written_seq)  # type: ignore[attr-defined]
    wait_for(lambda: all(delivered_through(f) >= w for f, w in zip(folders, written, strict=True)),
             timeout=90, what="both spools to drain")
    seen = delivered_ids(broker.bootstrap, topic)  # the new broker: what was not acknowledged before
    missing = [i for i in ids[400:] if i not in seen]
    assert not missing, f"{len(missing)} of {len(ids) - 400} events after the outage began never arrived"


def test_a_status_file_that_stops_changing_is_a_problem_for_the_writers(
        broker: Broker, tmp_path: Path, deliveries: list[DeliveryProcess]) -> None:
    spool = tmp_path / "spool"
    d = start_delivery(events_config(spool, broker.bootstrap, new_topic(broker)), [spool])
    deliveries.append(d)
    status = DeliveryStatus(spool, grace_s=0, stale_s=1.5)
    wait_for(lambda: status.health() == (True, None), timeout=10, what="a fresh status")
    assert d.pid is not None
    os.kill(d.pid, signal.SIGKILL)
    wait_for(lambda: not status.health()[0], timeout=15, what="the status to go stale")
    problem = status.health()[1]
    assert problem is not None and "has not reported for" in problem and str(spool) in problem
    assert DeliveryStatus(tmp_path / "never", grace_s=0).health()[1] == (
        f"no events delivery process reports on the spool {tmp_path / 'never'}; events wait there until one "
        "runs (the supervisor of stream-redact run starts it: see its log)")


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(log=tmp_path / "tansu-auth.log", authentication=True).start()
    yield b
    b.stop()


def test_the_sasl_password_stays_out_of_argv_logs_metrics_and_health(
        auth_broker: Broker, tmp_path: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, deliveries: list[DeliveryProcess]) -> None:
    monkeypatch.setenv("EV_DELIVERY_PW", SECRET)
    spool = tmp_path / "spool"
    cfg = events_config(spool, auth_broker.bootstrap, "ev-auth", kafka={
        "security_protocol": "SASL_PLAINTEXT",
        "sasl": {"mechanism": "SCRAM-SHA-256", "username": "alice", "password_env": "EV_DELIVERY_PW"}})
    logging.getLogger("kafka").setLevel(logging.DEBUG)  # the child logs kafka-python's debug output too
    try:
        d = start_delivery(cfg, [spool])
    finally:
        logging.getLogger("kafka").setLevel(logging.NOTSET)
    deliveries.append(d)
    expected = ("SASL login of user 'alice' (SCRAM-SHA-256) did not succeed; check the password in "
                "$EV_DELIVERY_PW")
    wait_for(lambda: expected in (d.health()[1] or ""), timeout=60, what="the login failure in health")
    assert d.pid is not None
    with open(f"/proc/{d.pid}/cmdline", "rb") as f:
        argv = f.read().decode()
    with urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    d.stop(0)
    out, err = capfd.readouterr()
    status = (spool / "delivery.status").read_text()
    assert expected in err  # the child's log reached the parent's stderr
    for where, text in (("argv", argv), ("logs", out + err), ("metrics", metrics), ("health", expected),
                        ("status file", status)):
        assert SECRET not in text, f"the SASL password leaked into the {where}"


def test_thread_mode_is_unchanged_without_a_delivery_process(tmp_path: Path) -> None:
    cfg = events_config(tmp_path / "spool", f"127.0.0.1:{free_port()}", "t", delivery="thread")
    sink = build_sink(cfg, Metrics())
    assert isinstance(sink, KafkaSink)
    sink.start()
    sink.close(0)
    # events.delivery says where delivery runs for `run`; the caller decides, so a sink alone delivers
    sink = build_sink(events_config(tmp_path / "spool", f"127.0.0.1:{free_port()}", "t"), Metrics())
    assert isinstance(sink, KafkaSink)
    sink.start()
    sink.close(0)


# -- stream-redact run, one process --------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Clip:
    return make_clip(tmp_path_factory.mktemp("evd") / "face.mp4", frames=40, width=320, height=240)


def test_run_starts_and_stops_its_delivery_process(broker: Broker, clip: Clip, tmp_path: Path) -> None:
    topic = new_topic(broker)
    spool = tmp_path / "spool"
    cfg = parse_config({
        "streams": [{"id": "cam0", "source": {"type": "file", "path": str(clip.path), "loop": True}}],
        "detection": {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"]},
        "http": {"host": "127.0.0.1", "port": 0},
        "events": {"kafka": {"bootstrap_servers": [broker.bootstrap], "topic": topic},
                   "spool": {"dir": str(spool)}, "per_frame": True}})
    svc = ServiceThread(cfg, NoFaces)
    try:
        def scraped() -> float:
            with urllib.request.urlopen(f"{svc.base}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            line = next((ln for ln in text.splitlines()
                         if ln.startswith('stream_redact_events_delivered_total{sink="kafka"}')), "x 0")
            return float(line.split()[-1])

        wait_for(lambda: scraped() >= 20, timeout=60, what="delivered events in the service's /metrics")
        status = json.loads(urllib.request.urlopen(f"{svc.base}/readyz", timeout=10).read())
        assert status["events"] == {"up": True, "problem": None}
        reader = (spool / "reader.lock").read_text().split()[1]
        assert int(reader) != os.getpid(), "a process of its own reads the spool"
    finally:
        svc.stop()
    assert _gone(int(reader))
    seen = {json.loads(r.value)["type"]: json.loads(r.value) for r in read_topic(broker.bootstrap, topic)}
    assert schema.STREAM_DOWN in seen, "the events of the stop were delivered after the pipeline stopped"
    assert not segments(spool)

