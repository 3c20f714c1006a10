"""Streams shared by the live workers of a deployment through a Kafka consumer group (cluster mode kafka).

Every stream id hashes to one partition of the assignments topic; the group gives each worker a
set of partitions, and a worker runs exactly the streams whose partitions it holds. Kafka's group
protocol does the membership: heartbeats, session timeouts, rebalances. With the cooperative
sticky assignor a rebalance moves only the partitions that must move, and a moving partition is
revoked from its old owner (whose streams stop here, before the callback returns) before the new
owner is given it: a stream runs nowhere for a moment, never twice. A worker that cannot reach
the group for a whole session timeout stops every stream at once, since the group has given
them to others by then.

What runs where is decided over the cluster's stream definitions: the config file's streams, plus
streams added and removed through the API, kept in a compacted topic keyed by stream id (a
tombstone on removal) that every worker reads from the start. A stream added on any worker so
starts on its owner and outlives every restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from stream.config import PipelineConfig, StreamConfig, format_errors
from stream.core.metrics import Metrics
from stream.events.kafka import client_settings

log = logging.getLogger(__name__)

POLL_S = 0.25
STALL_SESSIONS = 3
"""a member that joined and got no assignment within this many session timeouts joins again"""
CATCH_UP_S = 30.0
"""how long a starting worker waits to have read the streams topic to its end before joining"""


def partition_of(stream_id: str, partitions: int) -> int:
    """The assignments partition of ``stream_id``: the same in every process, on every host."""
    digest = hashlib.sha256(f"stream\x00{stream_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % partitions


class StreamBook:
    """The cluster's streams: the config file's, overlaid by the streams topic's latest word per id."""

    def __init__(self, base: list[StreamConfig]) -> None:
        self._base = {s.id: s for s in base}
        self._topic: dict[str, StreamConfig | None] = {}
        self._lock = threading.Lock()
        self.version = 0

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """One record of the streams topic: a stream definition, or a tombstone (None)."""
        if not key:
            return
        sid = key.decode("utf-8", "replace")
        cfg: StreamConfig | None = None
        if value is not None:
            try:
                cfg = StreamConfig.model_validate(json.loads(value))
            except (ValueError, ValidationError) as e:
                why = format_errors(e) if isinstance(e, ValidationError) else str(e)
                log.error("streams topic: the definition of %r is not valid and is skipped: %s", sid, why)
                return
            if cfg.id != sid:
                log.error("streams topic: a record keyed %r defines stream %r; skipped", sid, cfg.id)
                return
        with self._lock:
            self._topic[sid] = cfg
            self.version += 1

    def current(self) -> dict[str, StreamConfig]:
        with self._lock:
            merged = dict(self._base)
            for sid, cfg in self._topic.items():
                if cfg is None:
                    merged.pop(sid, None)
                else:
                    merged[sid] = cfg
            return merged


class ClusterMember:
    """This worker's membership: reads the streams topic, joins the group, runs its share.

    ``start(cfg)`` and ``stop(sid)`` add and remove a stream of the pipeline, ``running()`` names
    the streams it runs."""

    def __init__(self, config: PipelineConfig, start: Callable[[StreamConfig], None],
                 stop: Callable[[str], None], running: Callable[[], set[str]],
                 metrics: Metrics | None = None, name: str = "worker") -> None:
        assert config.events.kafka is not None, "cluster mode needs events.kafka (checked with the config)"
        self.config, self.cluster, self.kafka = config, config.cluster, config.events.kafka
        self._start, self._stop_stream, self._running = start, stop, running
        self.metrics = metrics
        self.name = name
        self.book = StreamBook(list(config.streams))
        self.owned: set[int] = set()
        self.rebalances = 0
        self.session_lost = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._threads: list[threading.Thread] = []
        self._producer: Any = None
        self._seen_version = -1
        self._reachable_at = time.monotonic()
        self._assigned = False
        self._started: dict[str, StreamConfig] = {}
        """the definition each stream here was started from (its zones may have changed since)"""

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Create the topics if missing, then read definitions and join the group (threads)."""
        self._ensure_topics()
        jobs = ((self._read_definitions, "cluster-streams"), (self._membership, "cluster-group"))
        for target, name in jobs:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop this worker's streams, then leave the group (its partitions move at once)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        with self._lock:
            self._set_owned(set())
        if self._producer is not None:
            self._producer.close(timeout=2)

    # -- the API's side ---------------------------------------------------------------------------
    def publish(self, stream_id: str, cfg: StreamConfig | None, timeout: float = 10.0) -> None:
        """Write a stream's definition (None: remove it) for the whole cluster; raises on failure."""
        from kafka import KafkaProducer

        with self._lock:
            if self._producer is None:
                self._producer = KafkaProducer(acks="all", **client_settings(self.kafka))
            producer = self._producer
        value = None if cfg is None else json.dumps(cfg.model_dump(mode="json")).encode()
        producer.send(self.cluster.streams_topic, key=stream_id.encode(), value=value).get(timeout=timeout)
        self.book.apply(stream_id.encode(), value)  # this worker knows at once; the others when they read it
        self._reconcile()

    def owner_partition(self, stream_id: str) -> int:
        return partition_of(stream_id, self.cluster.partitions)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"mode": "kafka", "group_id": self.cluster.group_id, "partitions_held": len(self.owned),
                    "partitions": self.cluster.partitions, "rebalances": self.rebalances,
                    "session_lost": self.session_lost, "streams_defined": len(self.book.current())}

    # -- topics -------------------------------------------------------------------------------------
    def _ensure_topics(self) -> None:
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(**client_settings(self.kafka))
        try:
            have = set(admin.list_topics())
            new = []
            if self.cluster.assignments_topic not in have:
                new.append(NewTopic(self.cluster.assignments_topic, self.cluster.partitions, 1))
            if self.cluster.streams_topic not in have:
                new.append(NewTopic(self.cluster.streams_topic, 1, 1,
                                    topic_configs={"cleanup.policy": "compact"}))
            if new:
                try:
                    admin.create_topics(new)
                    log.info("created %s", ", ".join(t.name for t in new))
                except TopicAlreadyExistsError:
                    pass  # another worker was quicker
        finally:
            admin.close()

    # -- the streams topic --------------------------------------------------------------------------
    def _read_definitions(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        consumer = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = KafkaConsumer(enable_auto_commit=False, **client_settings(self.kafka))
                    topic = self.cluster.streams_topic
                    numbers = sorted(consumer.partitions_for_topic(topic) or [0])
                    parts = [TopicPartition(topic, p) for p in numbers]
                    consumer.assign(parts)
                    consumer.seek_to_beginning(*parts)
                    ends = consumer.end_offsets(parts)
                for records in consumer.poll(timeout_ms=int(POLL_S * 1000)).values():
                    for r in records:
                        self.book.apply(r.key, r.value)
                if not self._caught_up.is_set() and all(consumer.position(p) >= ends[p] for p in ends):
                    log.info("streams topic read: %d stream(s) defined in the cluster",
                             len(self.book.current()))
                    self._caught_up.set()
            except Exception as e:  # the broker went away: read again from where we were, later
                log.warning("streams topic: %s: %s; retrying", type(e).__name__, e)
                if consumer is not None:
                    consumer.close()
                consumer = None
                self._stop.wait(2.0)
        if consumer is not None:
            consumer.close()

    # -- the group ------------------------------------------------------------------------------------
    def _membership(self) -> None:
        from kafka import ConsumerRebalanceListener, KafkaConsumer
        from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor

        if not self._caught_up.wait(CATCH_UP_S):
            log.warning("the streams topic was not read to its end within %.0f s; joining with what was read",
                        CATCH_UP_S)
        member = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Any) -> None:
                with member._lock:
                    member._set_owned(member.owned - {tp.partition for tp in revoked})
                    if revoked:
                        log.info("consumer group %s: %d partition(s) revoked, %d held",
                                 member.cluster.group_id, len(revoked), len(member.owned))

            def on_partitions_assigned(self, assigned: Any) -> None:
                with member._lock:
                    member._assigned = True
                    member.rebalances += 1
                    member.session_lost = False
                    if member.metrics is not None:
                        member.metrics.cluster_rebalances.inc()
                    member._set_owned(member.owned | {tp.partition for tp in assigned})
                    log.info("consumer group %s: %d partition(s) given, %d held, %d stream(s) here",
                             member.cluster.group_id, len(assigned), len(member.owned), len(member._mine()))

            def on_partitions_lost(self, lost: Any) -> None:
                self.on_partitions_revoked(lost)

        session_ms = int(self.cluster.session_timeout_s * 1000)
        consumer = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = KafkaConsumer(
                        group_id=self.cluster.group_id, enable_auto_commit=False,
                        session_timeout_ms=session_ms, heartbeat_interval_ms=max(100, session_ms // 12),
                        # also how long a rebalance waits for members that did not rejoin: this loop
                        # polls every POLL_S, so a short one costs nothing and restarts settle fast
                        max_poll_interval_ms=2 * session_ms,
                        partition_assignment_strategy=(CooperativeStickyAssignor,),
                        **client_settings(self.kafka))
                    consumer.subscribe([self.cluster.assignments_topic], listener=Listener())
                    joined_at, self._assigned = time.monotonic(), False
                consumer.poll(timeout_ms=int(POLL_S * 1000))  # no records: this drives the group protocol
                self._check_session(consumer)
                self._reconcile()
                waited = time.monotonic() - joined_at
                if not self._assigned and waited > STALL_SESSIONS * self.cluster.session_timeout_s:
                    # a group whose leader vanished mid-rebalance can wait for it for good on some
                    # brokers: a member with a new id makes the group start over
                    log.warning("consumer group %s: no assignment after %.0f s; joining again as a new "
                                "member", self.cluster.group_id, waited)
                    consumer.close(autocommit=False)
                    consumer = None
            except Exception as e:
                log.warning("consumer group %s: %s: %s; joining again", self.cluster.group_id,
                            type(e).__name__, e)
                with self._lock:
                    self._set_owned(set())
                if consumer is not None:
                    consumer.close(autocommit=False)
                consumer = None
                self._stop.wait(2.0)
        if consumer is not None:
            with self._lock:
                self._set_owned(set())  # stop first, then leave: the next owner starts after us
            consumer.close(autocommit=False)

    def _check_session(self, consumer: Any) -> None:
        """Cut off from the group for a session timeout: the group has given our partitions away.

        Cut off means no group coordinator reachable: a member the group expelled while reachable
        is told so on its next heartbeat, and loses its partitions through the listener. Heartbeats
        alone are no measure: none go out while a rebalance is under way, which may well take a
        session timeout (the group waits for a dead member to expire)."""
        coordinator = getattr(consumer, "_coordinator", None)
        now = time.monotonic()
        if coordinator is None or not coordinator.coordinator_unknown():
            self._reachable_at = now
            return
        last = self._reachable_at
        if self.owned and now - last > self.cluster.session_timeout_s:
            with self._lock:
                if self.owned:
                    log.error("consumer group %s unreachable for %.0f s: stopping this worker's %d stream(s) "
                              "(the group gives them to others)", self.cluster.group_id,
                              time.monotonic() - last, len(self._mine()))
                    self.session_lost = True
                    self._set_owned(set())

    # -- what runs here -------------------------------------------------------------------------------
    def _mine(self) -> dict[str, StreamConfig]:
        n = self.cluster.partitions
        return {sid: cfg for sid, cfg in self.book.current().items() if partition_of(sid, n) in self.owned}

    def _set_owned(self, owned: set[int]) -> None:
        self.owned = owned
        self._reconcile(force=True)
        if self.metrics is not None:
            self.metrics.cluster_partitions.set(len(owned))

    def _reconcile(self, force: bool = False) -> None:
        """Start what is ours and not running, stop what runs and is not ours (or changed)."""
        with self._lock:
            if not force and self.book.version == self._seen_version:
                return
            self._seen_version = self.book.version
            wanted = self._mine()
            for sid in self._running():
                if sid not in wanted or self._started.get(sid) != wanted[sid]:
                    try:
                        self._stop_stream(sid)
                    except Exception:
                        log.exception("stream %s: could not be stopped", sid)
                    self._started.pop(sid, None)
            running = self._running()
            for sid, cfg in wanted.items():
                if sid not in running:
                    try:
                        self._start(cfg)
                    except Exception as e:
                        log.error("stream %s: could not be started here (%s)", sid, e)
                    else:
                        self._started[sid] = cfg
            if self.metrics is not None:
                self.metrics.cluster_streams.set(len(self._running()))
