"""Event storage on a full disk: the Kafka sink's spool and the JSON Lines file.

A full disk must neither stop the sink thread nor leave a torn record behind. The events that
cannot be written are dropped and counted (``events_dropped_total{reason="disk_full"}``), the
problem is logged once with its fix, ``healthy``/``problem`` report it, and once space returns
new events are stored (and, for Kafka, delivered) again without a restart.

Each test runs twice: on a real 256 KiB tmpfs (skipped where this process may not mount one;
CI runs as root on a Linux VM and may), and on a folder whose ``os.write`` fails with ENOSPC past
the same capacity, which runs everywhere.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_helpers import wait_for

from stream.config import parse_config
from stream.core.metrics import Metrics, sample
from stream.events import schema
from stream.events.emitter import EventEmitter
from stream.events.jsonl import JsonlSink
from stream.events.sinks import sink_health
from stream.events.spool import SUFFIX, Spool, decode_record

pytestmark = pytest.mark.timeout(60)

CAPACITY = 256 << 10
SLACK = 1000
"""bytes the injected disk leaves free when filled: like the rest of a file's last page on tmpfs,
room for a few records and then a write cut short"""
BIG = 6000
"""payload bytes of an event that cannot fit in any slack, so its write is always cut short"""


class Disk:
    """A tiny file system at ``path`` that tests fill and free again."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch, real: bool) -> None:
        self.path = path
        path.mkdir()
        self.filler = path / "filler"
        self.real = real
        if not real:
            self._inject(monkeypatch)
        elif not _mount_tmpfs(path):
            pytest.skip("cannot mount a tmpfs here (needs root); the injected-ENOSPC variant covers this")

    def fill(self) -> None:
        """Take every free byte (on the injected disk: all but ``SLACK``)."""
        if not self.real:
            with self.filler.open("ab") as f:
                f.write(bytes(max(0, CAPACITY - SLACK - self.used())))
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                os.write(fd, bytes(4096))
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()

    def used(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def _inject(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_write, real_statvfs = os.write, os.statvfs
        root = str(self.path) + os.sep

        def write(fd: int, data: Any) -> int:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if not target.startswith(root):
                return real_write(fd, data)
            room = CAPACITY - self.used()
            if room <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data if len(data) <= room else bytes(data[:room]))

        def statvfs(path: Any) -> os.statvfs_result:
            st = real_statvfs(path)
            if not (str(path) + os.sep).startswith(root):
                return st
            free = max(0, CAPACITY - self.used())
            return os.statvfs_result((4096, 1, CAPACITY, free, free, st.f_files, st.f_ffree, st.f_favail,
                                      st.f_flag, st.f_namemax))

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "statvfs", statvfs)

    def close(self) -> None:
        if self.real and subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)  # still busy: detach


def _mount_tmpfs(path: Path) -> bool:
    """Mount a CAPACITY-sized tmpfs on ``path``; False where this process may not."""
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={CAPACITY},mode=0700", "tmpfs",
                               str(path)], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture(params=["tmpfs", "injected"])
def disk(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    d = Disk(tmp_path / "disk", monkeypatch, real=request.param == "tmpfs")
    try:
        yield d
    finally:
        d.close()


def event(i: int, pad: int = 0) -> dict[str, Any]:
    data: dict[str, Any] = {"stream_id": "cam1", "state": "up"}
    if pad:
        data["pad"] = "x" * pad  # not a valid event: only its size matters here
    return schema.envelope(schema.STREAM_UP, "/t", 1_764_190_800.0 + i, data, "cam1")


def metric(m: Metrics, name: str, **labels: str) -> float:
    return sample(m, f"stream_redact_{name}", **labels)


def alarms(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and "cannot write events to" in r.getMessage()]


# -- the spool ---------------------------------------------------------------------------------------


def enc(payload: bytes, seq: int) -> bytes:
    return b'{"n":%s,"seq":%d}' % (payload, seq)


def check_segments(folder: Path) -> list[int]:
    """Every segment ends with a whole record and every record is intact; returns their seqs."""
    seqs = []
    for seg in sorted(folder.glob("*" + SUFFIX)):
        data = seg.read_bytes()
        assert not data or data.endswith(b"\n"), f"{seg.name} ends in a torn record"
        for line in data.split(b"\n")[:-1]:
            rec = decode_record(line)
            assert rec is not None, f"{seg.name} holds a damaged record: {line[:60]!r}"
            seqs.append(rec[0])
    return seqs


def test_a_full_disk_cuts_the_torn_record_and_the_spool_carries_on_when_space_returns(disk: Disk) -> None:
    spool = Spool(disk.path / "spool", max_bytes=1 << 20, fsync="always")
    try:
        accepted = spool.append([("cam1", "track", 1.0, b"%d" % n) for n in range(5)], enc)
        assert accepted.written == 5 and accepted.error is None
        seg = next((disk.path / "spool").glob("*" + SUFFIX))
        before = seg.stat().st_size
        disk.fill()
        room = seg.stat().st_blocks * 512 - before if disk.real else SLACK
        assert 0 < room < BIG, "the segment's last page has room for part of a record"

        big = spool.append([("cam1", "track", 2.0, b'"%s"' % (b"x" * BIG))], enc)
        assert big.written == 0 and big.failed == 1
        assert big.error is not None and big.error.errno == errno.ENOSPC
        assert seg.stat().st_size == before, "the part of the record that was written is cut off"
        assert spool.next_seq == spool.written_seq == 6, "the number of a record not stored is used again"

        small = spool.append([("cam1", "track", 3.0, b'%d,"pad":"%s"' % (n, b"x" * 200))
                              for n in range(100, 160)], enc)
        assert small.failed > 0 and small.written + small.failed == 60  # a few fit in what was left
        assert check_segments(disk.path / "spool") == list(range(1, 6 + small.written))

        disk.free()
        after = spool.append([("cam1", "track", 4.0, b"%d" % n) for n in range(200, 210)], enc)
        assert after.written == 10 and after.error is None
        recs = spool.read(1000)
        stored = list(range(5)) + list(range(100, 100 + small.written)) + list(range(200, 210))
        assert [int(r.value.split(b",")[0][5:]) for r in recs] == stored  # nothing accepted was lost
        assert [r.seq for r in recs] == list(range(1, len(stored) + 1))  # and no gap in the numbering
        assert spool.corrupt == 0
    finally:
        spool.close()
    with Spool(disk.path / "spool", max_bytes=1 << 20) as again:  # and so it reads after a restart
        assert [r.seq for r in again.read(1000)] == list(range(1, len(stored) + 1))
        assert again.corrupt == 0


# -- JSON Lines --------------------------------------------------------------------------------------


def jsonl_sink(path: Path, m: Metrics) -> JsonlSink:
    cfg = parse_config({"events": {"jsonl": {"path": str(path), "fsync": "always"}}})
    sink = JsonlSink(cfg.events.jsonl, m)
    sink.start()
    return sink


def check_lines(path: Path) -> list[int]:
    """Every line is a whole event and ``sequence`` runs 1, 2, 3 ... without a gap."""
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), "the file ends in a torn line"
    seqs = []
    for line in raw.split(b"\n")[:-1]:
        try:
            seqs.append(int(json.loads(line)["sequence"]))
        except ValueError:
            raise AssertionError(f"a corrupt line: {line[:80]!r}...") from None
    assert seqs == list(range(1, len(seqs) + 1)), "a gap or a repeat in sequence"
    return seqs


def test_jsonl_on_a_full_disk_drops_and_counts_whole_events_and_recovers_by_itself(
        disk: Disk, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="stream.events")
    path = disk.path / "events.jsonl"
    m = Metrics()
    sink = jsonl_sink(path, m)
    emitter = EventEmitter(sink, parse_config({}).events, {})
    delivered = lambda: metric(m, "events_delivered_total", sink="jsonl")  # noqa: E731
    dropped = lambda: metric(m, "events_dropped_total", reason="disk_full")  # noqa: E731
    try:
        for i in range(5):
            sink.submit(event(i))
        wait_for(lambda: delivered() == 5, timeout=10, what="the first events to be written")
        assert sink_health(emitter) == (True, None)
        disk.fill()

        sink.submit(event(10, pad=BIG))  # a write that is cut short, whatever room is left
        wait_for(lambda: dropped() == 1, timeout=10, what="the event that did not fit to be counted")
        for i in range(40):
            sink.submit(event(20 + i))
        wait_for(lambda: delivered() + dropped() == 46, timeout=10, what="every event to be handled")
        assert dropped() > 1

        assert sink._thread.is_alive(), "the sink thread must outlive a full disk"
        healthy, problem = sink_health(emitter)
        assert not healthy and not sink.healthy
        assert problem == sink.problem and problem is not None
        assert f"free space on {disk.path}" in problem and "No space left" in problem
        assert metric(m, "events_sink_up", sink="jsonl") == 0
        assert metric(m, "events_storage_failing", sink="jsonl") == 1
        assert len(alarms(caplog)) == 1, "one alarm per outage, not one per event"
        assert f"free space on {disk.path}" in alarms(caplog)[0]
        assert len(check_lines(path)) == delivered()

        disk.free()
        # with no events coming, a probe finds out that the disk has room again
        wait_for(lambda: sink.healthy, timeout=10, what="the sink to notice the free space")
        assert metric(m, "events_sink_up", sink="jsonl") == 1
        assert metric(m, "events_storage_failing", sink="jsonl") == 0
        before = delivered()
        for i in range(10):
            sink.submit(event(100 + i))
        wait_for(lambda: delivered() == before + 10, timeout=10, what="events to be written again")
        assert "writes to" in caplog.text and "again after" in caplog.text
    finally:
        emitter.close(5)
    seqs = check_lines(path)
    assert len(seqs) == delivered() == 46 - dropped() + 10
    assert len(alarms(caplog)) == 1


def test_jsonl_io_errors_count_as_write_errors_and_end_with_a_write_that_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    m = Metrics()
    sink = jsonl_sink(path, m)
    broken = threading.Event()
    broken.set()
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        if broken.is_set() and os.readlink(f"/proc/self/fd/{fd}") == str(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    try:
        for i in range(3):
            sink.submit(event(i))
        wait_for(lambda: metric(m, "events_dropped_total", reason="write_error") == 3, timeout=10,
                 what="the events that could not be written to be counted")
        assert metric(m, "events_dropped_total", reason="disk_full") == 0
        assert sink._thread.is_alive() and not sink.healthy
        assert sink.problem is not None and f"check the disk behind {tmp_path}" in sink.problem
        broken.clear()
        sink.submit(event(9))
        wait_for(lambda: metric(m, "events_delivered_total", sink="jsonl") == 1, timeout=10,
                 what="the next event to be written")
        assert sink.healthy and metric(m, "events_sink_up", sink="jsonl") == 1
    finally:
        sink.close(5)
    assert check_lines(path) == [1]


# -- Kafka, against the real broker the other Kafka tests use ------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from kafka_broker import Broker

    try:
        b = Broker(log=tmp_path_factory.mktemp("tansu") / "tansu.log").start()
    except RuntimeError as e:
        pytest.skip(f"no Kafka-protocol broker here: {e}")
    yield b
    b.stop()


def test_kafka_sink_survives_a_full_spool_disk_and_delivers_again_when_space_returns(
        disk: Disk, broker: Any, caplog: pytest.LogCaptureFixture) -> None:
    from kafka_broker import read_topic

    from stream.events.kafka import KafkaSink

    caplog.set_level(logging.INFO, logger="stream.events")
    topic = f"ev-{uuid.uuid4().hex[:8]}"
    broker.create_topic(topic, partitions=1)
    spool_dir = disk.path / "spool"
    cfg = parse_config({"events": {"kafka": {"bootstrap_servers": [broker.bootstrap], "topic": topic,
                                             "connect_timeout_s": 2},
                                   "spool": {"dir": str(spool_dir), "fsync": "always"}, "source": "/t"}})
    m = Metrics()
    sink = KafkaSink(cfg.events, m)
    sink.start()
    spooled = lambda: metric(m, "events_spooled_total")  # noqa: E731
    delivered = lambda: metric(m, "events_delivered_total", sink="kafka")  # noqa: E731
    dropped = lambda: metric(m, "events_dropped_total", reason="disk_full")  # noqa: E731
    late: list[dict[str, Any]] = []
    try:
        for i in range(5):
            sink.submit(event(i))
        wait_for(lambda: delivered() == 5 and metric(m, "events_sink_up", sink="kafka") == 1, timeout=15,
                 what="the first events to be delivered")
        assert sink.healthy
        disk.fill()

        sink.submit(event(10, pad=BIG))
        for i in range(40):
            sink.submit(event(20 + i))
        wait_for(lambda: spooled() + dropped() == 46, timeout=10, what="every event to be handled")
        assert dropped() >= 1
        assert sink._thread.is_alive(), "the sink thread must outlive a full disk"
        assert not sink.healthy and sink.problem is not None
        assert f"free space on {spool_dir}" in sink.problem
        assert metric(m, "events_sink_up", sink="kafka") == 0
        assert len(alarms(caplog)) == 1 and f"free space on {spool_dir}" in alarms(caplog)[0]
        # what did fit is still delivered, though the spool's cursor cannot be written
        wait_for(lambda: delivered() == spooled(), timeout=15, what="spooled events to be delivered")
        check_segments(spool_dir)

        disk.free()
        for i in range(10):
            e = event(200 + i)
            late.append(e)
            sink.submit(e)
        wait_for(lambda: spooled() + dropped() == 56 and delivered() == spooled(), timeout=15,
                 what="events to be stored and delivered again")
        wait_for(lambda: metric(m, "events_sink_up", sink="kafka") == 1, timeout=10,
                 what="the sink to report itself up again")
        assert sink.healthy and sink.problem is None
        assert metric(m, "events_storage_failing", sink="kafka") == 0
        check_segments(spool_dir)
    finally:
        sink.close(10)
    total = int(spooled())
    records = read_topic(broker.bootstrap, topic, until=total, timeout=20)
    events = {json.loads(r.value)["id"]: json.loads(r.value) for r in records}
    assert sorted(int(e["sequence"]) for e in events.values()) == list(range(1, total + 1))
    assert all(e["id"] in events for e in late), "events after the outage reached the topic"
    assert len(alarms(caplog)) == 1
    assert not list(spool_dir.glob("*" + SUFFIX)), "the spool drained"
