"""Events to a real Kafka-protocol broker (Tansu, started by the fixture): what the pipeline saw reaches
the topic keyed by stream, schema-valid and in order; a broker outage and a restart lose nothing;
bad settings are reported clearly while video keeps flowing; secrets never show.

Delivery is at-least-once, and these tests check exactly that: every event accepted (spooled) is
on the topic one or more times, any repeat is an identical copy (same id, same bytes), and per
stream the first copies are in the order the events were accepted (``sequence``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, Clip, make_clip
from kafka_broker import Broker, free_port, read_topic
from live_helpers import NoFaces, wait_for

from stream.config import PipelineConfig, parse_config
from stream.core.metrics import Metrics, sample
from stream.events import schema
from stream.events.emitter import EventEmitter
from stream.events.kafka import KafkaSink
from stream.events.sinks import build_sink, start_events
from stream.live.pipeline import Pipeline
from stream.live.service import detector_factory_for

DETECTION = {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"]}
SECRET = "s3cret-Broker-Pw-4471"
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(log=tmp_path_factory.mktemp("tansu") / "tansu.log").start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Clip:
    return make_clip(tmp_path_factory.mktemp("evk") / "face.mp4", frames=40, width=320, height=240)


def new_topic(broker: Broker) -> str:
    name = f"ev-{uuid.uuid4().hex[:8]}"
    broker.create_topic(name, partitions=3)
    return name


def config(clip: Clip, spool: Path, bootstrap: str, topic: str, n: int = 1, loop: bool = False,
           **events: Any) -> PipelineConfig:
    kafka = {"bootstrap_servers": [bootstrap], "topic": topic, "connect_timeout_s": 2,
             **events.pop("kafka", {})}
    return parse_config({
        "streams": [{"id": f"cam{i}", "source": {"type": "file", "path": str(clip.path), "loop": loop}}
                    for i in range(n)],
        "detection": DETECTION,
        "events": {"kafka": kafka, "spool": {"dir": str(spool)}, "source": "/stream-redact/test", **events}})


def up_event(sid: str = "a") -> dict[str, Any]:
    return schema.envelope(schema.STREAM_UP, "/t", 1_764_190_800.0, {"stream_id": sid, "state": "up"}, sid)


def metric(m: Metrics, name: str, **labels: str) -> float:
    return sample(m, f"stream_redact_{name}", **labels)


def start(cfg: PipelineConfig, factory: Any = None) -> tuple[Pipeline, EventEmitter, KafkaSink]:
    p = Pipeline(cfg, factory or detector_factory_for(cfg))  # None: the configured detector
    em = start_events(cfg, p.metrics)
    assert em is not None and isinstance(em.sink, KafkaSink)
    p.observers.append(em)
    p.start()
    return p, em, em.sink


def decode(records: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
    return [(r, json.loads(r.value)) for r in records]


def check_at_least_once_in_order(records: list[Any]) -> dict[str, dict[str, Any]]:
    """Repeats are identical copies; per key (= stream, one partition) first copies follow ``sequence``.
    Returns the distinct events by id."""
    first: dict[str, Any] = {}
    last_seq: dict[bytes | None, str] = {}
    partition: dict[bytes | None, int] = {}
    for r, e in decode(records):
        if e["id"] in first:
            assert r.value == first[e["id"]].value, "a repeated event differs from its first copy"
            continue
        first[e["id"]] = r
        assert partition.setdefault(r.key, r.partition) == r.partition, "a stream in two partitions"
        assert e["sequence"] > last_seq.get(r.key, ""), f"out of order for key {r.key!r}"
        last_seq[r.key] = e["sequence"]
    return {i: json.loads(r.value) for i, r in first.items()}


def test_track_events_of_a_face_clip_reach_the_topic_valid_keyed_and_in_order(broker: Broker, clip: Clip,
                                                                               tmp_path: Path) -> None:
    topic = new_topic(broker)
    p, em, _ = start(config(clip, tmp_path / "spool", broker.bootstrap, topic, n=2))
    try:
        wait_for(lambda: p.ended, timeout=60, what="both file sources to end")
    finally:
        p.stop()
        em.close(15)
    m = p.metrics
    spooled = metric(m, "events_spooled_total")
    assert spooled > 0
    assert metric(m, "events_delivered_total", sink="kafka") == spooled
    assert metric(m, "events_delivery_seconds_count", sink="kafka") == spooled
    records = read_topic(broker.bootstrap, topic, until=int(spooled))
    assert len(records) == spooled  # no failure happened, so no repeat either
    events = check_at_least_once_in_order(records)
    for r, e in decode(records):
        schema.validate(e)
        assert r.key == e["subject"].encode() == e["data"]["stream_id"].encode()
        assert ("content-type", b"application/cloudevents+json; charset=UTF-8") in r.headers
    for sid in ("cam0", "cam1"):
        mine = sorted((e for e in events.values() if e["subject"] == sid), key=lambda e: e["sequence"])
        types = [schema.short_type(e["type"]) for e in mine]
        assert types[0] == "stream.up" and "stream.down" in types
        assert "track.started" in types and "track.ended" in types, types
        uid = next(e["data"]["track_uid"] for e in mine if e["type"] == schema.TRACK_STARTED)
        lifecycle = [schema.short_type(e["type"]) for e in mine if e["data"].get("track_uid") == uid]
        assert lifecycle[0] == "track.started" and lifecycle[-1] == "track.ended"
    assert not list((tmp_path / "spool").glob("*.seg")), "the spool is drained and empty"


def test_a_broker_outage_loses_nothing_and_keeps_each_streams_order(
        broker: Broker, clip: Clip, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="stream.events")
    topic = new_topic(broker)
    cfg = config(clip, tmp_path / "spool", broker.bootstrap, topic, n=2, loop=True, per_frame=True,
                 track_update_interval_s=0.2)
    p, em, sink = start(cfg)
    m = p.metrics
    during: list[dict[str, Any]] = []
    outage = threading.Event()
    submit = sink.submit

    def recording_submit(event: dict[str, Any]) -> bool:
        accepted = submit(event)
        if outage.is_set() and accepted:
            during.append(event)
        return accepted

    sink.submit = recording_submit  # type: ignore[method-assign]
    try:
        wait_for(lambda: metric(m, "events_delivered_total", sink="kafka") >= 50, timeout=60,
                 what="events delivered before the outage")
        published = {s: metric(m, "frames_published_total", stream=s) for s in ("cam0", "cam1")}
        broker.stop()
        outage.set()
        wait_for(lambda: metric(m, "events_sink_up", sink="kafka") == 0 and len(during) >= 200, timeout=60,
                 what="the outage to be noticed while events pile up")
        assert "cannot deliver to Kafka" in caplog.text and "video is not affected" in caplog.text
        for s in ("cam0", "cam1"):  # video kept flowing all along
            assert metric(m, "frames_published_total", stream=s) >= published[s] + 25
        assert sink.spool.pending >= 200
        outage.clear()
        broker.start()
        broker.create_topic(topic, partitions=3)
        last = max(int(e["sequence"]) for e in during)
        wait_for(lambda: sink.spool.cursor[0] > last, timeout=90,
                 what="the spool to deliver the outage's events")
        # the first producer session after the outage may be replaced once more before the sink
        # reports itself up (a halted producer fails its last sends); up it must come
        wait_for(lambda: metric(m, "events_sink_up", sink="kafka") == 1, timeout=60,
                 what="the sink to report itself up again")
        assert "delivering to Kafka again" in caplog.text
    finally:
        p.stop()
        em.close(20)
    assert metric(m, "events_dropped_total", reason="spool_full") == 0
    assert not list((tmp_path / "spool").glob("*.seg")), "the spool drained to empty"
    records = read_topic(broker.bootstrap, topic)  # the new broker: everything from the outage on
    events = check_at_least_once_in_order(records)
    missing = [e["id"] for e in during if e["id"] not in events]
    assert not missing, f"{len(missing)} of {len(during)} events of the outage never arrived"
    for e in during:
        assert events[e["id"]] == e  # the very event that was accepted, sequence included
        schema.validate(e)
    repeats = len(records) - len(events)
    print(f"outage: {len(during)} events accepted while the broker was down, all delivered; "
          f"{repeats} repeat(s) on the topic")


def test_a_new_broker_is_reached_even_by_a_producer_that_never_had_an_ack_there(
        broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A producer with an id but no acknowledgement on a partition gets UnknownProducerId from a new,
    empty broker, which kafka-python retries for ever; the sink replaces the producer session."""
    caplog.set_level(logging.INFO, logger="stream.events")
    warm, main = new_topic(broker), new_topic(broker)
    doc = {"events": {"kafka": {"bootstrap_servers": [broker.bootstrap], "topic": main,
                                "topics": {"stream": warm}, "request_timeout_ms": 1000},
                      "spool": {"dir": str(tmp_path / "spool")}}}
    m = Metrics()
    sink = build_sink(parse_config(doc), m)
    assert isinstance(sink, KafkaSink)
    sink.start()
    try:
        sink.submit(up_event())
        wait_for(lambda: metric(m, "events_delivered_total", sink="kafka") == 1, timeout=30,
                 what="the first ack")
        broker.stop()  # the producer has its id now, and no acknowledgement at all on `main`
        ids = []
        for e in schema.examples().values():
            if e["type"].startswith("stream-redact.track."):
                for _ in range(50):
                    e = dict(e, id=uuid.uuid4().hex)
                    e.pop("sequence", None)
                    ids.append(e["id"])
                    sink.submit(e)
        wait_for(lambda: sink.spool.pending == len(ids), timeout=30, what="the events to be spooled")
        broker.start()
        broker.create_topic(main, partitions=3)
        broker.create_topic(warm, partitions=3)
        wait_for(lambda: sink.spool.pending == 0, timeout=90, what="the spool to drain into the new broker")
    finally:
        sink.close(5)
    assert set(check_at_least_once_in_order(read_topic(broker.bootstrap, main, until=len(ids)))) == set(ids)


def _spool_and_stop(cfg: PipelineConfig, n: int) -> list[str]:
    m = Metrics()
    sink = build_sink(cfg, m)
    assert isinstance(sink, KafkaSink)
    sink.start()
    ids = []
    for i in range(n):
        e = schema.envelope(schema.STREAM_UP, "/t", 1_764_190_800.0 + i, {"stream_id": f"cam{i % 3}",
                                                                          "state": "up"}, f"cam{i % 3}")
        ids.append(e["id"])
        assert sink.submit(e)
    sink.close(0.5)
    return ids


def test_a_restart_delivers_what_the_spool_held(broker: Broker, tmp_path: Path) -> None:
    topic = new_topic(broker)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: every event stays in the spool
    spool = tmp_path / "spool"
    doc = {"events": {"kafka": {"bootstrap_servers": [dead], "topic": topic, "connect_timeout_s": 1},
                      "spool": {"dir": str(spool)}, "flush_timeout_s": 0.5}}
    ids = _spool_and_stop(parse_config(doc), 300)
    assert list(spool.glob("*.seg"))
    doc["events"]["kafka"]["bootstrap_servers"] = [broker.bootstrap]
    m = Metrics()
    sink = build_sink(parse_config(doc), m)
    assert isinstance(sink, KafkaSink)
    assert sink.spool.pending == 300
    sink.start()
    wait_for(lambda: metric(m, "events_delivered_total", sink="kafka") >= 300, timeout=60, what="the spool")
    sink.close(5)
    events = check_at_least_once_in_order(read_topic(broker.bootstrap, topic, until=300))
    assert set(events) == set(ids)
    assert not list(spool.glob("*.seg"))


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_a_full_spool_is_an_alarm_and_an_event_and_the_policy_is_kept(
        broker: Broker, tmp_path: Path, policy: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="stream.events")
    topic = new_topic(broker)
    doc = {"events": {"kafka": {"bootstrap_servers": [f"127.0.0.1:{free_port()}"], "topic": topic,
                                "connect_timeout_s": 1},
                      "spool": {"dir": str(tmp_path / "spool"), "max_bytes": 1 << 20, "overflow": policy}}}
    m = Metrics()
    sink = build_sink(parse_config(doc), m)
    assert isinstance(sink, KafkaSink)
    sink.start()
    ids = []
    for i in range(4000):  # about 2.5 MB of events into a 1 MiB spool, the broker away
        e = schema.examples()["track.updated.json"]
        e = dict(e, id=f"{i:032x}")
        e.pop("sequence", None)
        ids.append(e["id"])
        assert sink.submit(e)  # the in-memory queue (10,000) takes them all; the spool decides
    wait_for(lambda: metric(m, "events_spooled_total")
             + metric(m, "events_dropped_total", reason="spool_full") >= 4000,
             timeout=30, what="every event to be spooled or dropped")
    dropped = metric(m, "events_dropped_total", reason="spool_full")
    assert dropped > 1000 and metric(m, "events_spool_full") == 1
    assert sink.spool.bytes <= 1 << 20
    assert "is full (1048576 bytes, events.spool.max_bytes)" in caplog.text
    sink.close(0)  # the alarm event goes into the spool as the sink stops
    doc["events"]["kafka"]["bootstrap_servers"] = [broker.bootstrap]
    m2 = Metrics()
    sink = build_sink(parse_config(doc), m2)
    assert sink is not None
    sink.start()
    wait_for(lambda: sink.spool.pending == 0, timeout=60, what="the spool to drain")  # type: ignore[attr-defined]
    sink.close(5)
    events = check_at_least_once_in_order(read_topic(broker.bootstrap, topic))
    alarms = [e for e in events.values() if e["type"] == schema.EVENTS_DROPPED]
    assert len(alarms) == 1 and alarms[0]["data"]["count"] == dropped
    assert alarms[0]["data"]["reason"] == "spool_full" and alarms[0]["data"]["policy"] == policy
    kept = [i for i in ids if i in events]
    assert len(kept) + dropped == len(ids)
    if policy == "drop_newest":
        assert kept == ids[:len(kept)]  # the first ones were kept
    else:
        assert kept == ids[-len(kept):]  # the last ones were kept


CRASHER = """
import json, sys, time
from stream.config import parse_config
from stream.events import schema
from stream.events.sinks import build_sink
from stream.core.metrics import Metrics
sink = build_sink(parse_config(json.loads(sys.argv[1])), Metrics())
sink.start()
ids = []
for i in range(int(sys.argv[2])):
    e = schema.envelope(schema.STREAM_UP, "/t", time.time(), {"stream_id": "cam1", "state": "up"}, "cam1")
    ids.append(e["id"])
    sink.submit(e)
deadline = time.monotonic() + 30
while sink.spool.written_seq <= len(ids) and time.monotonic() < deadline:
    time.sleep(0.01)
print(json.dumps(ids), flush=True)
time.sleep(120)  # killed here, with every event accepted and none delivered
"""


def test_events_accepted_before_a_crash_are_delivered_after_it(broker: Broker, tmp_path: Path) -> None:
    topic = new_topic(broker)
    doc = {"events": {"kafka": {"bootstrap_servers": [f"127.0.0.1:{free_port()}"], "topic": topic,
                                "connect_timeout_s": 1},
                      "spool": {"dir": str(tmp_path / "spool"), "fsync": "never"}}}
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, json.dumps(doc), "500"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        ids = json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    doc["events"]["kafka"]["bootstrap_servers"] = [broker.bootstrap]
    m = Metrics()
    sink = build_sink(parse_config(doc), m)  # the lock of the killed process is gone with it
    assert isinstance(sink, KafkaSink)
    sink.start()
    wait_for(lambda: metric(m, "events_delivered_total", sink="kafka") >= 500, timeout=60, what="the spool")
    sink.close(5)
    assert set(check_at_least_once_in_order(read_topic(broker.bootstrap, topic, until=500))) == set(ids)


# -- bad settings: a clear alarm at runtime, video keeps flowing, no secret anywhere -------------------

@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker that requires a SASL login (no user is known to it: every login fails)."""
    b = Broker(log=tmp_path / "tansu-auth.log", authentication=True).start()
    yield b
    b.stop()


def _pem_pair(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (cryptography comes with aiortc)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def cert(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            b = b.add_extension(san, critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert(f"{name}-ca", ca_key, f"{name}-ca", ca_key, True)
    srv_cert = cert("127.0.0.1", key, f"{name}-ca", ca_key, False)
    ca, crt, key_path = folder / f"{name}-ca.pem", folder / f"{name}-srv.pem", folder / f"{name}-srv.key"
    ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    crt.write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca, crt, key_path


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A TLS listener whose certificate comes from a CA the client is not told about; yields its
    address and the CA file the client gets instead."""
    _, crt, key = _pem_pair(tmp_path, "server")
    other_ca, _, _ = _pem_pair(tmp_path, "other")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate: that is the point

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.getsockname()[1]}", other_ca
    stop.set()
    srv.close()
    t.join(5)


@pytest.mark.parametrize("case", ["unresolvable", "wrong_sasl_password", "tls_to_plaintext",
                                  "untrusted_cert"])
def test_bad_broker_settings_raise_a_clear_alarm_while_video_flows(case: str, request: pytest.FixtureRequest,
                                                                   clip: Clip, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)  # kafka-python's own debug output included: the secret must not be there
    monkeypatch.setenv("EV_TEST_PW", SECRET)
    kafka: dict[str, Any] = {}
    if case == "unresolvable":
        bootstrap = "no-such-host.invalid:9092"
        expected = "events.kafka.bootstrap_servers: cannot resolve host 'no-such-host.invalid'"
    elif case == "wrong_sasl_password":
        bootstrap = request.getfixturevalue("auth_broker").bootstrap
        kafka = {"security_protocol": "SASL_PLAINTEXT",
                 "sasl": {"mechanism": "SCRAM-SHA-256", "username": "alice", "password_env": "EV_TEST_PW"}}
        expected = ("SASL login of user 'alice' (SCRAM-SHA-256) did not succeed; check the password in "
                    "$EV_TEST_PW")
    elif case == "tls_to_plaintext":
        broker = request.getfixturevalue("broker")
        bootstrap = broker.bootstrap
        ca, _, _ = _pem_pair(tmp_path, "ca")
        kafka = {"security_protocol": "SSL", "ssl": {"ca_file": str(ca)}}
        expected = f"the TLS handshake with {bootstrap} failed"
    else:
        bootstrap, other_ca = request.getfixturevalue("tls_server")
        kafka = {"security_protocol": "SSL", "ssl": {"ca_file": str(other_ca)}}
        expected = f"the TLS certificate of {bootstrap} was not accepted"
    cfg = config(clip, tmp_path / "spool", bootstrap, "ev-bad", loop=True, per_frame=True, kafka=kafka)
    det = NoFaces()
    p, em, sink = start(cfg, lambda: det)
    m = p.metrics
    try:
        wait_for(lambda: expected in caplog.text, timeout=60, what=f"the alarm {expected!r}")
        published = metric(m, "frames_published_total", stream="cam0")
        wait_for(lambda: metric(m, "frames_published_total", stream="cam0") >= published + 25, timeout=30,
                 what="video to keep flowing")
        assert metric(m, "events_sink_up", sink="kafka") == 0
        # nothing is lost meanwhile: it waits in the spool (written by the sink's own thread, so a
        # moment after the frames that made it)
        wait_for(lambda: metric(m, "events_spooled_total") > 25, timeout=30, what="events in the spool")
        assert sink.problem is not None and expected in sink.problem
        rendered = m.render().decode()
    finally:
        p.stop()
        em.close(1)
    assert "stream_redact_events_sink_errors_total" in rendered
    spooled = b"".join(f.read_bytes() for f in (tmp_path / "spool").glob("*"))
    texts = (("logs", caplog.text), ("metrics", rendered), ("spool", spooled.decode(errors="replace")),
             ("alarm", sink.problem))
    for where, text in texts:
        assert SECRET not in text, f"the SASL password leaked into the {where}"


def test_a_missing_topic_with_auto_create_off_is_named_with_a_fake_producer(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Tansu creates any topic it is asked about, so a missing topic cannot be staged with it; a fake
    producer answers like a Kafka broker with auto-create off (connected, no such topic)."""
    from kafka.errors import KafkaTimeoutError

    class NoSuchTopic:
        def partitions_for(self, topic: str) -> set[int]:
            raise KafkaTimeoutError("Failed to update metadata after 2.0 secs.")

        def bootstrap_connected(self) -> bool:
            return True

        def close(self, timeout: float | None = None) -> None:
            pass

    caplog.set_level(logging.ERROR, logger="stream.events")
    cfg = parse_config({"events": {"kafka": {"bootstrap_servers": ["127.0.0.1:9092"], "topic": "detections"},
                                   "spool": {"dir": str(tmp_path / "spool")}}})
    m = Metrics()
    sink = KafkaSink(cfg.events, m, producer_factory=lambda settings: NoSuchTopic())
    sink.start()
    try:
        expected = ("topic 'detections' is not on the brokers (or this user may not describe it) and "
                    "events.kafka.auto_create_topic is off; create the topic or fix events.kafka.topic")
        wait_for(lambda: expected in caplog.text, timeout=20, what="the missing-topic alarm")
        assert metric(m, "events_sink_errors_total", sink="kafka", reason="unknown_topic") >= 1
    finally:
        sink.close(0)


# -- `stream-redact events tail` --------------------------------------------------------------------

def test_events_tail_prints_readable_lines_and_filters(broker: Broker, tmp_path: Path) -> None:
    topic = new_topic(broker)
    doc = {"events": {"kafka": {"bootstrap_servers": [broker.bootstrap], "topic": topic},
                      "spool": {"dir": str(tmp_path / "spool")}}}
    m = Metrics()
    sink = build_sink(parse_config(doc), m)
    assert sink is not None
    sink.start()
    examples = schema.examples()
    for name in ("stream.up.json", "track.started.json", "track.ended.json", "incident.started.json"):
        for sid in ("gate-north", "lobby"):
            e = json.loads(json.dumps(examples[name]).replace("gate-north", sid))
            e["id"] = uuid.uuid4().hex
            del e["sequence"]
            sink.submit(e)
    wait_for(lambda: metric(m, "events_delivered_total", sink="kafka") >= 8, timeout=30, what="delivery")
    sink.close(5)
    base = [sys.executable, "-m", "stream.cli", "events", "tail", "--bootstrap", broker.bootstrap,
            "--topic", topic, "--from-beginning", "--idle-timeout", "5"]

    def tail(*extra: str) -> list[str]:
        r = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        return r.stdout.splitlines()

    out = tail("--count", "8")
    assert len(out) == 8
    assert any("lobby" in ln and "track.started" in ln and "face #3 score 0.87 at (612,188)-(672,262)" in ln
               for ln in out), out
    assert any("track.ended" in ln and "(lost) after" in ln and "best 0.91" in ln for ln in out), out
    assert any("FAIL-CLOSED (detector_hung): frames blanked" in ln for ln in out), out
    only = tail("--stream", "lobby", "--type", "track", "--count", "2")
    assert len(only) == 2 and all("lobby" in ln and "track." in ln for ln in only), only
    raw = tail("--json", "--type", "incident.started", "--count", "2")
    for ln in raw:
        schema.validate(json.loads(ln))


def test_events_tail_names_an_unreachable_broker() -> None:
    r = subprocess.run([sys.executable, "-m", "stream.cli", "events", "tail", "--bootstrap",
                        f"127.0.0.1:{free_port()}", "--idle-timeout", "1"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1
    assert "refused the connection; is it running, and is the port in --bootstrap right?" in r.stderr
    assert "Traceback" not in r.stderr


def test_event_metrics_are_exported(broker: Broker, tmp_path: Path) -> None:
    doc = {"events": {"kafka": {"bootstrap_servers": [broker.bootstrap], "topic": new_topic(broker)},
                      "spool": {"dir": str(tmp_path / "spool")}}}
    m = Metrics()
    sink = build_sink(parse_config(doc), m)
    assert sink is not None
    sink.start()
    sink.submit(up_event())
    wait_for(lambda: metric(m, "events_delivered_total", sink="kafka") == 1, timeout=30, what="delivery")
    text = m.render().decode()
    sink.close(5)
    for name in ('events_produced_total{type="stream.up"} 1.0', "events_spooled_total 1.0",
                 'events_delivered_total{sink="kafka"} 1.0',
                 'events_failed_total{reason="auth",sink="kafka"} 0.0',
                 "events_spool_events", "events_spool_bytes", "events_spool_full 0.0",
                 'events_sink_up{sink="kafka"} 1.0',
                 'events_delivery_seconds_bucket{le="+Inf",sink="kafka"} 1.0',
                 'events_dropped_total', "events_queue_depth", "events_resent_total"):
        assert f"stream_redact_{name}" in text, name
    assert os.environ.get("EV_TEST_PW") is None or SECRET not in text
