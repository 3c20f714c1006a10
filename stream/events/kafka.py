"""Kafka sink: events go to the on-disk spool first, a sender thread moves them to the brokers.

Where an event counts as *accepted*: once the sink thread has appended it to the spool (and
fsynced it, with ``spool.fsync: always``). From there it is sent with acks=all by an idempotent
producer, and the spool's cursor moves only past events the brokers acknowledged, in order. If
the brokers are unreachable, reject a write, or the process stops, the unacknowledged events
stay in the spool and are sent again, in their order, when the brokers are back or the
pipeline starts again. Delivery is therefore **at-least-once**: an event can reach the topic
twice (same ``id``, same content) when an acknowledgement was lost, and consumers drop ids they
have seen. Order per stream holds on the topic: the record key is the stream id, and at the
first failed send the producer is stopped at once (nothing later can overtake the failed
event) and sending resumes from the oldest unacknowledged event.

Nothing here ever blocks a redaction thread: they only append to the sink's in-memory queue.

A spool the disk refuses (full, quota, I/O error) drops and counts the new events it cannot write,
keeps delivering what it holds, and takes new events again as soon as writes work (see
:mod:`stream.events.sink`); ``events_sink_up`` is 0 meanwhile.

With ``events.delivery: process`` the two halves live in different processes: the pipeline's
:class:`SpoolWriterSink` only appends to the spool, and a :class:`KafkaSink` in the delivery
process (:mod:`stream.events.delivery`) sends what it reads from there. The guarantees are the
same; the pure-Python Kafka client then has an interpreter (and a core) of its own.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from stream.config.events import EventsConfig, KafkaConfig
from stream.core.backoff import Backoff
from stream.core.metrics import Metrics
from stream.events import schema
from stream.events.sink import EventSink
from stream.events.spool import Record, Spool, SpoolWriter

log = logging.getLogger(__name__)

WINDOW = 20_000
"""most events sent and not yet acknowledged"""
WINDOW_BYTES = 16 << 20
READ_BATCH = 2000
STALL_S = 5.0
"""no acknowledgement for this long while events are waiting: the brokers are in trouble (alarm); after
``request_timeout_ms`` + 5 s more the producer session is replaced (outstanding events sent again)"""
BACKOFF_MAX_S = 30.0
HEADERS = [("content-type", b"application/cloudevents+json; charset=UTF-8")]
DELIVERY_TIMEOUT_MS = 7 * 24 * 3600 * 1000
"""the producer itself never gives up on a batch: an outage is waited out, not turned into errors
(a failed batch would let later ones overtake it)"""

PENDING, OK, FAILED = 0, 1, 2
REASONS = ("unresolvable", "unreachable", "tls", "auth", "unknown_topic", "rejected", "other")


class SinkProblem(Exception):
    """Why the brokers cannot be used right now: ``reason`` (a metrics label) and a message that
    names the setting to fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def client_settings(k: KafkaConfig) -> dict[str, Any]:
    """kafka-python settings for connecting (bootstrap, TLS, SASL), shared by producer and consumer.

    The result holds the SASL password: never log it."""
    s: dict[str, Any] = {"bootstrap_servers": list(k.bootstrap_servers), "client_id": k.client_id,
                         "security_protocol": k.security_protocol, "request_timeout_ms": k.request_timeout_ms}
    if k.security_protocol.endswith("SSL"):
        s["ssl_check_hostname"] = k.ssl.check_hostname if k.ssl else True
        if k.ssl is not None:
            if k.ssl.ca_file is not None:
                s["ssl_cafile"] = str(k.ssl.ca_file)
            if k.ssl.cert_file is not None and k.ssl.key_file is not None:
                s["ssl_certfile"], s["ssl_keyfile"] = str(k.ssl.cert_file), str(k.ssl.key_file)
    if k.sasl is not None:
        s.update(sasl_mechanism=k.sasl.mechanism, sasl_plain_username=k.sasl.username,
                 sasl_plain_password=k.sasl.password())
    return s


def _split(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    return host.strip("[]"), int(port)


def preflight(k: KafkaConfig, timeout: float = 3.0,
              setting: str = "events.kafka.bootstrap_servers") -> tuple[str | None, SinkProblem | None]:
    """Retrace the first steps of a connection (DNS, TCP, TLS) with timeouts of our own.

    Returns the first server that passed them all, or the problem of the first one that did not.
    Run before every connection attempt: kafka-python reports most problems only as "unable to
    bootstrap", and can wait without end for a TLS handshake that a plaintext port never answers."""
    problems: list[SinkProblem] = []
    for server in k.bootstrap_servers:
        host, port = _split(server)
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            problems.append(SinkProblem("unresolvable", f"{setting}: cannot resolve host {host!r} "
                                                        f"({e.strerror}); fix the name or the DNS"))
            continue
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError:
            problems.append(SinkProblem("unreachable", f"the broker at {server} refused the connection; is "
                                                       f"it running, and is the port in {setting} right?"))
            continue
        except OSError as e:
            problems.append(SinkProblem("unreachable", f"the broker at {server} did not answer "
                                                       f"({e.strerror or 'timed out'}); check the address "
                                                       "and any firewall in between"))
            continue
        with sock:
            if k.security_protocol.endswith("SSL"):
                problem = _check_tls(k, sock, server, host, timeout)
                if problem is not None:
                    problems.append(problem)
                    continue
        return server, None
    return None, problems[0] if problems else SinkProblem("other", "no bootstrap server is configured")


def diagnose(k: KafkaConfig, error: BaseException | None = None, timeout: float = 3.0,
             setting: str = "events.kafka.bootstrap_servers") -> SinkProblem:
    """Why the brokers could not be used after the Kafka client failed with ``error``, in words that
    name what to fix."""
    server, problem = preflight(k, timeout, setting)
    if problem is not None:
        return problem
    # the broker is reachable (and TLS works): the Kafka conversation itself failed
    detail = f" [the Kafka client said: {error}]" if error is not None else ""
    if k.sasl is not None:
        return SinkProblem("auth", f"the broker at {server} took the connection but the SASL login of "
                                   f"user {k.sasl.username!r} ({k.sasl.mechanism}) did not succeed; check "
                                   f"the password in {k.sasl.where()}, the user name and "
                                   f"events.kafka.sasl.mechanism{detail}")
    return SinkProblem("rejected", f"the broker at {server} took the connection but the Kafka handshake "
                                   "failed; check events.kafka.security_protocol (the broker may require "
                                   f"TLS or SASL) and that this port is a Kafka listener{detail}")


def _check_tls(k: KafkaConfig, sock: socket.socket, server: str, host: str,
               timeout: float) -> SinkProblem | None:
    cafile = str(k.ssl.ca_file) if k.ssl is not None and k.ssl.ca_file is not None else None
    try:
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.check_hostname = k.ssl.check_hostname if k.ssl is not None else True
        if k.ssl is not None and k.ssl.cert_file is not None and k.ssl.key_file is not None:
            ctx.load_cert_chain(str(k.ssl.cert_file), str(k.ssl.key_file))
    except (ssl.SSLError, OSError) as e:
        return SinkProblem("tls", f"events.kafka.ssl: cannot load the TLS files ({e}); give PEM files")
    sock.settimeout(timeout)
    try:
        with ctx.wrap_socket(sock, server_hostname=host):
            return None
    except ssl.SSLCertVerificationError as e:
        return SinkProblem("tls", f"the TLS certificate of {server} was not accepted ({e.verify_message}); "
                                  "check events.kafka.ssl.ca_file (the CA that signed the brokers' "
                                  "certificates) and ssl.check_hostname")
    except (ssl.SSLError, OSError) as e:
        why = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__
        return SinkProblem("tls", f"the TLS handshake with {server} failed ({why}); is this port a TLS "
                                  "listener? check events.kafka.security_protocol and the port")


def _halt(producer: Any) -> None:
    """Stop a producer from sending anything more, now, from any thread (its own callbacks too).

    kafka-python's ``close(0)`` first flushes and raises while batches are pending, so it cannot
    do this; its sender's ``force_close`` aborts every pending batch (their futures fail) and
    sends nothing further."""
    sender = getattr(producer, "_sender", None)
    if sender is not None and hasattr(sender, "force_close"):
        sender.force_close()
    else:  # pragma: no cover - other kafka-python versions
        with contextlib.suppress(Exception):
            producer.close(0)


def _reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if "Authentication" in name or "Sasl" in name or "Authorization" in name:
        return "auth"
    if "UnknownTopic" in name:
        return "unknown_topic"
    if "Connection" in name or "NoBrokers" in name or "NodeNotReady" in name or "Timeout" in name:
        return "unreachable"
    return "rejected"


class _Entry:
    """One record sent and not yet settled. Success is read off the future (no callback per record);
    a failure also calls back at once, to stop the producer before anything later goes out."""

    __slots__ = ("error", "fut", "gen", "rec", "sink")

    def __init__(self, rec: Record, gen: int, sink: KafkaSink, fut: Any = None,
                 error: BaseException | None = None) -> None:
        self.rec, self.gen, self.sink, self.fut, self.error = rec, gen, sink, fut, error

    @property
    def state(self) -> int:
        if self.error is not None:
            return FAILED
        fut = self.fut
        if fut is None or not fut.is_done:
            return PENDING
        if fut.exception is not None:
            self.error = fut.exception
            return FAILED
        return OK

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.sink._failed_send(self)


def _event_time(event: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return time.time()


def _stamp(event: dict[str, Any], seq: int) -> bytes:
    event["sequence"] = schema.format_sequence(seq)
    return schema.encode(event)


class SpooledSink(EventSink):
    """The storing half of the Kafka sink: events into the spool (an event is accepted once there),
    the spool's overflow alarm and its ``events.dropped`` event. :class:`KafkaSink` delivers from
    the spool on a thread of its own; :class:`SpoolWriterSink` leaves that to a delivery process."""

    name = "kafka"

    def __init__(self, config: EventsConfig, metrics: Metrics, spool: Any) -> None:
        super().__init__(metrics, config.queue_size)
        self.spool = spool
        self._wake = threading.Event()
        self._overflow: dict[str, Any] | None = None

    def _storage_dir(self) -> Path:
        return self.spool.dir

    # -- sink thread: into the spool ---------------------------------------------------------------
    def _store(self, batch: list[dict[str, Any]]) -> None:
        items = [(e.get("subject"), schema.category(e["type"]), _event_time(e), e) for e in batch]
        res = self.spool.append(items, _stamp)
        self.metrics.events_spooled.inc(res.written)
        if res.error is not None:
            self._storage_failed(res.error, res.failed)
        else:
            self._storage_ok()
        if res.dropped_new or res.dropped_old:
            self._overflowed(res.dropped_new + res.dropped_old)
        elif self._overflow is not None and self.spool.bytes < 0.9 * self.spool.max_bytes:
            self._end_overflow()
        self._wake.set()

    def _overflowed(self, n: int) -> None:
        now = time.time()
        self.metrics.events_dropped.labels("spool_full").inc(n)
        if self._overflow is None:
            self._overflow = {"count": 0, "first": now}
            self.metrics.events_spool_full.set(1)
            how = ("the oldest undelivered events are deleted" if self.spool.overflow == "drop_oldest"
                   else "new events are refused")
            log.error("events: spool %s is full (%d bytes, events.spool.max_bytes); %s (overflow: %s) and "
                      "counted in stream_redact_events_dropped_total{reason=\"spool_full\"}: the brokers "
                      "have been unavailable too long (%s); fix them or raise events.spool.max_bytes",
                      self.spool.dir, self.spool.max_bytes, how, self.spool.overflow,
                      self._delivery_problem() or "slow")
        self._overflow["count"] += n
        self._overflow["last"] = now

    def _end_overflow(self) -> None:
        """The spool has room again: record what was lost, as an event of its own."""
        o, self._overflow = self._overflow, None
        if o is None:
            return
        self.metrics.events_spool_full.set(0)
        log.warning("events: spool %s has room again; %d event(s) were dropped while it was full",
                    self.spool.dir, o["count"])
        event = schema.envelope(schema.EVENTS_DROPPED, self.source, o["last"], {
            "count": o["count"], "reason": "spool_full", "policy": self.spool.overflow,
            "first_at": schema.rfc3339(o["first"]), "last_at": schema.rfc3339(o["last"])})
        res = self.spool.append([(None, "pipeline", o["last"], event)], _stamp)
        self.metrics.events_spooled.inc(res.written)
        if res.error is not None:
            self._storage_failed(res.error, res.failed)

    def _idle_tick(self) -> None:
        self.spool.tick()


class KafkaSink(SpooledSink):
    """Events to Kafka through the spool; see the module docstring for what is guaranteed.

    ``spool`` None: this sink's own :class:`Spool` (``events.spool``), written and read here. The
    delivery process passes the readers of the spools other processes write instead (a
    :class:`~stream.events.delivery.SpoolSet`); nothing is submitted to the sink then."""

    def __init__(self, config: EventsConfig, metrics: Metrics,
                 producer_factory: Callable[[dict[str, Any]], Any] | None = None, spool: Any = None) -> None:
        assert config.kafka is not None
        if spool is None:
            sp = config.spool
            spool = Spool(sp.folder(), sp.max_bytes, sp.overflow, sp.fsync, sp.fsync_interval_ms / 1000)
        super().__init__(config, metrics, spool)
        self.kafka = config.kafka
        self.idle_wait_s = 0.05
        """how long the sender sleeps when nothing is in flight (new events wake it sooner, when they are
        spooled in this process)"""
        self._producer_factory = producer_factory
        self._topics = {c: self.kafka.topic_for(c)
                        for c in ("track", "stream", "incident", "frame", "pipeline")}
        self._inflight: deque[_Entry] = deque()
        self._inflight_bytes = 0
        self._partitions: dict[tuple[str, bytes], int] = {}
        self._producer: Any = None
        self._gen = 0
        self._halted_gen = -1
        self._retry_at = 0.0
        self._backoff = Backoff(0.2, BACKOFF_MAX_S)
        self._stopping = False
        self._deliver_until = float("inf")
        self._problem: SinkProblem | None = None
        self._problem_since: float | None = None
        self._last_progress = time.monotonic()
        self._rejections: dict[int, int] = {}
        self._session_reset = False
        self._session_reset_s = self.kafka.request_timeout_ms / 1000 + 5
        self._shutdown_lock = threading.Lock()
        self._shut = False
        self.on_delivered: Callable[[list[float]], None] | None = None
        """called on the sender thread with the delivery latencies (s) of each acknowledged run"""
        self._sender = threading.Thread(target=self._send_loop, name="events-kafka-send", daemon=True)
        m = metrics
        m.events_spool_events.set_function(lambda: self.spool.pending)
        m.events_spool_bytes.set_function(lambda: self.spool.bytes)
        m.events_spool_full.set(0)
        self._update_up()
        for r in REASONS:
            m.events_failed.labels(self.name, r)
            m.events_sink_errors.labels(self.name, r)
        self._delivered = m.events_delivered.labels(self.name)
        self._latency = m.events_delivery_seconds.labels(self.name)

    def start(self) -> None:
        super().start()
        self._sender.start()

    # -- health ------------------------------------------------------------------------------------
    def _delivery_problem(self) -> str | None:
        """What keeps events from the brokers right now (None while they are delivered)."""
        return None if self._problem is None else str(self._problem)

    def _delivering(self) -> bool:
        return (super()._delivering() and self._producer is not None and self._problem is None
                and not self._shut)

    # -- sender thread: from the spool to the brokers ---------------------------------------------
    def _send_loop(self) -> None:
        while True:
            try:
                self._send_until_stopped()
                break
            except Exception:
                if self._shut:
                    break  # the spool was closed under a sender stuck in a connection attempt
                # a bug here must not lose anything: the events wait in the spool; start over
                log.exception("events: the Kafka sender failed; events stay in the spool %s", self.spool.dir)
                with contextlib.suppress(Exception):
                    self._inflight.clear()
                    self._inflight_bytes = 0
                    self.spool.rewind_to_cursor()
                    self._drop_producer()
                if self._stopping:
                    break
                self._wake.wait(1.0)
        self._shutdown()

    def _send_until_stopped(self) -> None:
        last_commit = last_forget = time.monotonic()
        while True:
            self._wake.clear()
            now = time.monotonic()
            if self._shut or (self._stopping and (self.spool.pending == 0 or now >= self._deliver_until)):
                return
            if self._producer is None:
                if now < self._retry_at:
                    self._wake.wait(min(0.25, self._retry_at - now))
                    continue
                self._connect()
                continue
            progressed = self._settle()
            if self._inflight and self._inflight[0].state == FAILED:
                self._recover()
                continue
            sent = self._fill()
            if now - last_commit >= 0.2:
                last_commit = now
                if now - last_forget >= 60:
                    last_forget = now
                    self._partitions.clear()
                idle = not self._inflight and self.spool.unread == 0
                self.spool.commit(compact=idle)
                self._check_stall(now)
            if not sent and not progressed:
                # acknowledgements are read off the futures: look again soon while some are awaited
                self._wake.wait(0.005 if self._inflight else self.idle_wait_s)

    def _connect(self) -> None:
        from kafka.errors import KafkaError

        k = self.kafka
        settings = client_settings(k)
        remaining = self._deliver_until - time.monotonic()
        settings.update(
            acks="all", enable_idempotence=True, max_in_flight_requests_per_connection=5,
            compression_type=None if k.compression == "none" else k.compression, linger_ms=k.linger_ms,
            batch_size=k.batch_bytes, delivery_timeout_ms=DELIVERY_TIMEOUT_MS,
            max_block_ms=int(k.connect_timeout_s * 1000), allow_auto_create_topics=k.auto_create_topic,
            bootstrap_timeout_ms=int(max(0.5, min(k.connect_timeout_s, remaining)) * 1000),
            reconnect_backoff_max_ms=2000, metrics_enabled=False)  # our own metrics say what matters
        producer = None
        if self._producer_factory is None:
            _, problem = preflight(k, timeout=min(3.0, k.connect_timeout_s))
            if problem is not None:
                self._give_up_connection(None, problem)
                return
        try:
            factory = self._producer_factory
            if factory is None:
                from kafka import KafkaProducer

                factory = lambda s: KafkaProducer(**s)  # noqa: E731
            producer = factory(settings)
            for topic in sorted(set(self._topics.values())):
                self._check_topic(producer, topic)
        except SinkProblem as p:
            self._give_up_connection(producer, p)
            return
        except (KafkaError, OSError, ValueError) as e:
            self._give_up_connection(producer, diagnose(k, e) if not isinstance(e, ValueError)
                                     else SinkProblem("other", self._scrub(str(e))))
            return
        if self._shut:  # stopped while connecting
            _halt(producer)
            with contextlib.suppress(Exception):
                producer.close(1)
            return
        self._gen += 1
        self._producer = producer
        self._partitions.clear()
        self._last_progress = time.monotonic()
        self._update_up()
        log.info("events: connected to Kafka at %s", ",".join(k.bootstrap_servers))

    def _check_topic(self, producer: Any, topic: str) -> None:
        from kafka.errors import KafkaError

        try:
            producer.partitions_for(topic)
        except KafkaError as e:
            connected = False
            with contextlib.suppress(Exception):
                connected = bool(producer.bootstrap_connected())
            if connected:
                raise SinkProblem("unknown_topic", f"topic {topic!r} is not on the brokers (or this user may "
                                                   "not describe it) and events.kafka.auto_create_topic is "
                                                   "off; create the topic or fix events.kafka.topic") from e
            raise

    def _give_up_connection(self, producer: Any, problem: SinkProblem) -> None:
        if producer is not None:
            _halt(producer)
            with contextlib.suppress(Exception):
                producer.close(1)
        self.metrics.events_sink_errors.labels(self.name, problem.reason).inc()
        self._trouble(problem)
        self._retry_at = time.monotonic() + self._backoff.next_delay()

    def _fill(self) -> int:
        """Send what the spool has, up to the window; returns how many were sent."""
        from kafka.errors import KafkaError

        room = min(WINDOW - len(self._inflight), READ_BATCH)
        if room <= 0 or self._inflight_bytes >= WINDOW_BYTES or self.spool.unread == 0:
            return 0
        recs = self.spool.read(room, min(4 << 20, WINDOW_BYTES - self._inflight_bytes))
        producer, gen = self._producer, self._gen
        topics, default = self._topics, self.kafka.topic
        inflight, partitions = self._inflight, self._partitions
        fut = None
        for i, rec in enumerate(recs):
            try:
                topic = topics.get(rec.category, default)
                part = partitions.get((topic, rec.key)) if rec.key is not None else None
                if part is None and rec.key is not None:
                    part = self._partition_for(topic, rec.key)
                fut = producer.send(topic, value=rec.value, key=rec.key, headers=HEADERS, partition=part)
            except (KafkaError, AssertionError, ValueError) as e:
                # nothing from here on was sent; _recover takes it up again from the oldest failure
                entry = _Entry(rec, gen, self, error=e)
                inflight.append(entry)
                self._failed_send(entry)
                return i
            entry = _Entry(rec, gen, self, fut)
            inflight.append(entry)
            self._inflight_bytes += len(rec.value)
            fut.add_errback(entry.fail)
        if fut is not None:
            fut.add_callback(self._acked)  # wakes the sender when the last of these is acknowledged
        return len(recs)

    def _partition_for(self, topic: str, key: bytes) -> int:
        """The partition Kafka's default partitioner picks for ``key`` (murmur2 over all partitions, as
        the Java client does), remembered: there are few streams, and hashing every record is a
        sizeable share of kafka-python's cost per record. Forgotten on every new connection and
        every minute, so a topic that gained partitions is followed like any other producer does."""
        from kafka.partitioner.default import murmur2

        parts = sorted(self._producer.partitions_for(topic))
        part = self._partitions[(topic, key)] = parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)]
        return part

    def _acked(self, _metadata: Any) -> None:
        if not self._wake.is_set():
            self._wake.set()

    def _failed_send(self, entry: _Entry) -> None:
        """First failure of a connection: stop the producer before anything later goes out."""
        if entry.gen == self._gen and self._halted_gen != self._gen:
            self._halted_gen = self._gen
            if self._producer is not None:
                _halt(self._producer)
        self._wake.set()

    def _settle(self) -> bool:
        """Move the spool's cursor past the acknowledged head of the window."""
        inflight = self._inflight
        done: list[float] = []
        last: dict[int, Record] = {}
        """per spool (a delivery process reads several), the last record acknowledged"""
        now = time.time()
        while inflight and inflight[0].state == OK:
            e = inflight.popleft()
            self._inflight_bytes -= len(e.rec.value)
            last[e.rec.spool] = e.rec
            done.append(now - e.rec.time)
        if not last:
            return False
        for rec in last.values():
            self.spool.ack(rec)
        self._delivered.inc(len(done))
        for lat in done:
            self._latency.observe(max(0.0, lat))
        if self.on_delivered is not None:
            self.on_delivered(done)
        self._last_progress = time.monotonic()
        self._backoff.reset()
        if self._problem is not None:
            self._recovered()
        return True

    def _recover(self) -> None:
        """The head of the window failed: wait for the rest to settle, then resend from the head."""
        if self._halted_gen != self._gen and self._producer is not None:
            self._halted_gen = self._gen
            _halt(self._producer)
        deadline = time.monotonic() + 10
        while any(e.state == PENDING for e in self._inflight) and time.monotonic() < deadline:
            self._wake.wait(0.05)
            self._wake.clear()
        head = self._inflight[0]
        assert head.error is not None
        failed = [e for e in self._inflight if e.state != OK]
        first: dict[int, Record] = {}
        for e in self._inflight:
            first.setdefault(e.rec.spool, e.rec)
        resume = {i: self.spool.rewind(rec) for i, rec in first.items()}  # each spool from its oldest
        if not self.spool.in_flight_drops_counted:
            lost = sum(1 for e in failed if e.rec.seq < resume[e.rec.spool])  # dropped from a full spool
            if lost:
                self.metrics.events_dropped.labels("spool_full").inc(lost)
        reason = "unreachable" if self._session_reset else _reason(head.error)
        self._session_reset = False
        self.metrics.events_failed.labels(self.name, reason).inc(len(failed))
        self.metrics.events_sink_errors.labels(self.name, reason).inc()
        self.metrics.events_resent.inc(sum(1 for e in self._inflight if e.rec.seq >= resume[e.rec.spool]))
        if self._rejected_too_often(head):
            return
        self._inflight.clear()
        self._inflight_bytes = 0
        self._drop_producer()
        name = type(head.error).__name__
        self._trouble(SinkProblem(reason, f"the brokers did not take events ({name}: {head.error}); "
                                          "resending from the oldest one not acknowledged"),
                      quiet=reason == "unreachable" or "UnknownProducerId" in name)
        self._retry_at = time.monotonic() + self._backoff.next_delay()

    def _rejected_too_often(self, head: _Entry) -> bool:
        """A record the brokers refuse for what it is (too large, invalid) would block every later
        one forever: after three refusals it is dropped, counted and logged."""
        from kafka import errors

        record_errors = tuple(getattr(errors, n) for n in ("MessageSizeTooLargeError", "RecordTooLargeError",
                                                          "InvalidRecordError", "CorruptRecordError",
                                                          "CorruptRecordException") if hasattr(errors, n))
        if not isinstance(head.error, record_errors):
            return False
        n = self._rejections[head.rec.seq] = self._rejections.get(head.rec.seq, 0) + 1
        if n < 3:
            return False
        self._rejections.pop(head.rec.seq, None)
        log.error("events: the brokers refused event seq %d (%s) three times (%s); it is dropped",
                  head.rec.seq, head.rec.category, type(head.error).__name__)
        self.metrics.events_dropped.labels("rejected").inc()
        self._inflight.clear()
        self._inflight_bytes = 0
        self.spool.ack(head.rec)
        self.spool.rewind(head.rec)  # resume right after it (rewind clamps to the cursor)
        self._drop_producer()
        return True

    def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        self._update_up()
        if producer is not None:
            _halt(producer)
            with contextlib.suppress(Exception):
                producer.close(2)

    def _check_stall(self, now: float) -> None:
        if (self._inflight or self.spool.unread) and now - self._last_progress >= STALL_S:
            if self._problem is None:
                self.metrics.events_sink_errors.labels(self.name, "unreachable").inc()
                self._problem_since = self._last_progress
                idle = now - self._last_progress
                where = ",".join(self.kafka.bootstrap_servers)
                self._trouble(SinkProblem("unreachable", f"the brokers have acknowledged nothing for "
                                                         f"{idle:.0f} s; check that they are up and "
                                                         f"reachable at {where}"))
            if (self._inflight and now - self._last_progress >= self._session_reset_s
                    and self._halted_gen != self._gen and self._producer is not None):
                # kafka-python can retry for ever without failing (e.g. a new, empty broker answering
                # UnknownProducerId to a producer that never had an acknowledgement): start afresh
                log.info("events: no acknowledgement for %.0f s; starting a new producer session",
                         now - self._last_progress)
                self._session_reset = True
                self._halted_gen = self._gen
                _halt(self._producer)
        elif self._producer is not None and self._problem is None:
            self._update_up()

    # -- alarms ------------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        """Mask the SASL password wherever an error message might have picked it up."""
        if self.kafka.sasl is not None:
            with contextlib.suppress(ValueError):
                pw = self.kafka.sasl.password()
                if len(pw) >= 3:
                    text = text.replace(pw, "***")
        return text

    def _trouble(self, problem: SinkProblem, quiet: bool = False) -> None:
        problem = SinkProblem(problem.reason, self._scrub(str(problem)))
        new = self._problem is None or str(self._problem) != str(problem)
        if self._problem_since is None:
            self._problem_since = time.monotonic()
        self._problem = problem
        self._update_up()
        if new:
            text = str(problem)
            stop = "" if text.endswith((".", "?")) else "."
            (log.info if quiet else log.error)(
                "events: cannot deliver to Kafka: %s%s Events are kept in the spool %s (%d waiting) and "
                "sent when this is fixed; video is not affected", text, stop, self.spool.dir,
                self.spool.pending)

    def _recovered(self) -> None:
        since = self._problem_since or time.monotonic()
        log.warning("events: delivering to Kafka again after %.0f s; %d event(s) still in the spool",
                    time.monotonic() - since, self.spool.pending)
        self._problem = self._problem_since = None
        self._update_up()

    # -- stopping ----------------------------------------------------------------------------------
    def _stop_storage(self, deadline: float) -> None:
        if self._overflow is not None:
            self._end_overflow()
        self._deliver_until = deadline
        self._stopping = True
        self._wake.set()
        if self._sender.is_alive():
            self._sender.join(max(0.0, deadline - time.monotonic()) + self.kafka.connect_timeout_s + 5)
        if self._sender.is_alive():
            log.error("events: the Kafka sender did not stop in time; closing the spool under it")
            self._shutdown()

    def _shutdown(self) -> None:
        with self._shutdown_lock:
            if self._shut:
                return
            self._shut = True
        with contextlib.suppress(Exception):
            self._drop_producer()
        left = self.spool.pending
        with contextlib.suppress(Exception):
            self.spool.commit(compact=True)
        self.spool.close()
        self._update_up()
        if left:
            log.warning("events: %d event(s) not yet delivered stay in the spool %s; they are sent when the "
                        "pipeline starts again with this spool", left, self.spool.dir)


class SpoolWriterSink(SpooledSink):
    """The Kafka sink of a pipeline whose spool another process delivers (``events.delivery:
    process``): events are accepted into the spool here, exactly as :class:`KafkaSink` accepts them,
    and go no further in this process.

    ``delivery_health`` says how delivery goes, as ``(up, problem)``: the delivery process's own
    report (:class:`~stream.events.delivery.DeliveryProcess` or its status file). Health and
    ``events_sink_up`` combine it with the state of the spool's disk."""

    def __init__(self, config: EventsConfig, metrics: Metrics,
                 delivery_health: Callable[[], tuple[bool, str | None]]) -> None:
        sp = config.spool
        super().__init__(config, metrics, SpoolWriter(sp.folder(), sp.max_bytes, sp.overflow, sp.fsync,
                                                      sp.fsync_interval_ms / 1000))
        self._health = delivery_health
        metrics.events_spool_full.set(0)
        self._update_up()

    def _delivery_problem(self) -> str | None:
        up, problem = self._health()
        return None if up else problem or "events are not being delivered"

    def _delivering(self) -> bool:
        return super()._delivering() and self._health()[0]

    def _store(self, batch: list[dict[str, Any]]) -> None:
        super()._store(batch)
        self._update_up()

    def _idle_tick(self) -> None:
        super()._idle_tick()
        self._update_up()

    def _stop_storage(self, deadline: float) -> None:
        """The queue is stored: end an overflow (its event goes into the spool) and release the spool;
        the delivery process sends what is left."""
        if self._overflow is not None:
            self._end_overflow()
        left = self.spool.pending
        self.spool.close()
        if left:
            log.info("events: %d event(s) in the spool %s wait for the delivery process", left,
                     self.spool.dir)
