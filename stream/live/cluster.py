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

Each worker also says, every few seconds and on every change, where its API answers and which
partitions and streams it has, on a compacted members topic that every worker reads: that is how
a worker finds a stream's owner (API requests are redirected there), how many members are alive,
and who ran a stream before it moved here (a ``stream.moved`` event with the gap).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
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
ANNOUNCE_SHARE = 1 / 3
"""a worker announces itself every this share of the session timeout"""
LIVE_SESSIONS = 1.5
"""a member not heard from for this many session timeouts is taken as gone"""
FORGET_S = 3600.0
"""a member record this old (a worker killed long ago) is removed from the members topic"""


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


class MemberBook:
    """The cluster's members as they announce themselves: address, partitions, streams, when.

    Also remembers, per stream, the member that last said it ran it and when (a record listing
    the stream, or a record saying when it stopped it): who a moved stream came from."""

    def __init__(self) -> None:
        self._members: dict[str, dict[str, Any]] = {}
        self._last_ran: dict[str, tuple[str, float]] = {}
        self._last_held: dict[int, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """One record of the members topic: a member's announcement, or a tombstone (it left)."""
        if not key:
            return
        name = key.decode("utf-8", "replace")
        if value is None:
            with self._lock:
                self._members.pop(name, None)
            return
        try:
            doc = json.loads(value)
            at = float(doc["at"])
            record = {"member": name, "address": str(doc["address"]), "at": at,
                      "partitions": [int(p) for p in doc.get("partitions", ())],
                      "streams": [str(s) for s in doc.get("streams", ())]}
            stopped = {str(k): float(v) for k, v in (doc.get("stopped") or {}).items()}
        except (ValueError, KeyError, TypeError) as e:
            log.warning("members topic: the record of %r is not valid (%s); skipped", name, e)
            return
        with self._lock:
            self._members[name] = record
            for sid, when in [*((s, at) for s in record["streams"]), *stopped.items()]:
                seen = self._last_ran.get(sid)
                if seen is None or seen[1] <= when:
                    self._last_ran[sid] = (name, when)
            for p in record["partitions"]:
                held = self._last_held.get(p)
                if held is None or held[1] <= at:
                    self._last_held[p] = (name, at)

    def live(self, window_s: float, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Members heard from within ``window_s`` (wall clock, as announced)."""
        now = time.time() if now is None else now
        with self._lock:
            return {n: dict(r) for n, r in self._members.items() if now - r["at"] <= window_s}

    def stale(self, older_s: float, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        with self._lock:
            return [n for n, r in self._members.items() if now - r["at"] > older_s]

    def owner(self, partition: int, window_s: float, now: float | None = None) -> dict[str, Any] | None:
        """The live member holding ``partition`` (the latest to say so), or None."""
        holders = [r for r in self.live(window_s, now).values() if partition in r["partitions"]]
        return max(holders, key=lambda r: r["at"]) if holders else None

    def last_ran(self, stream_id: str) -> tuple[str, float] | None:
        """(member, wall time) of the last word that ``stream_id`` ran on that member."""
        with self._lock:
            return self._last_ran.get(stream_id)

    def last_held(self, partition: int) -> tuple[str, float] | None:
        """(member, wall time) of the last word that a member held ``partition``: who ran a stream
        that member started but died before it said so."""
        with self._lock:
            return self._last_held.get(partition)


def default_address(port: int) -> str:
    """This host's address as other hosts would reach it (the pod IP in Kubernetes)."""
    try:
        host = socket.gethostbyname(socket.gethostname())
    except OSError:
        host = "127.0.0.1"
    return f"http://{host}:{port}"


class ClusterMember:
    """This worker's membership: reads the streams topic, joins the group, runs its share.

    ``start(cfg)`` and ``stop(sid)`` add and remove a stream of the pipeline, ``running()`` names
    the streams it runs."""

    def __init__(self, config: PipelineConfig, start: Callable[[StreamConfig], None],
                 stop: Callable[[str], None], running: Callable[[], set[str]],
                 metrics: Metrics | None = None, name: str = "worker", address: str | None = None,
                 on_moved: Callable[[str, str, str, float | None, int], None] | None = None) -> None:
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
        self.member_id = f"{socket.gethostname()}-{os.getpid()}"
        """this worker's name in the members topic and in stream.moved events"""
        self.address = self.cluster.advertise_url or address or default_address(config.http.port)
        self.members = MemberBook()
        self._on_moved = on_moved
        self._announced_at = 0.0
        self._announced_streams: set[str] = set()
        self._stopped_at: dict[str, float] = {}
        """streams stopped here since the last announcement, and when: the next one says so"""

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
        self._announce(leaving=True)
        if self._producer is not None:
            try:
                self._producer.close(timeout=2)
            except Exception as e:  # a lost broker: the worker still stops, and its pipeline after it
                log.warning("cluster producer did not close cleanly (%s: %s); the members topic may keep "
                            "this worker's last record until it is %.0f s old", type(e).__name__, e,
                            LIVE_SESSIONS * self.cluster.session_timeout_s)

    # -- the API's side ---------------------------------------------------------------------------
    def publish(self, stream_id: str, cfg: StreamConfig | None, timeout: float = 10.0) -> None:
        """Write a stream's definition (None: remove it) for the whole cluster; raises on failure."""
        producer = self._producer_now()
        value = None if cfg is None else json.dumps(cfg.model_dump(mode="json")).encode()
        producer.send(self.cluster.streams_topic, key=stream_id.encode(), value=value).get(timeout=timeout)
        self.book.apply(stream_id.encode(), value)  # this worker knows at once; the others when they read it
        self._reconcile()

    def _producer_now(self) -> Any:
        from kafka import KafkaProducer

        with self._lock:
            if self._producer is None:
                # a send waits for topic metadata at most this long: announcements are made from
                # the group's callbacks, which must not stall the group protocol behind a lost broker
                self._producer = KafkaProducer(acks="all", max_block_ms=5000, **client_settings(self.kafka))
            return self._producer

    def owner_partition(self, stream_id: str) -> int:
        return partition_of(stream_id, self.cluster.partitions)

    @property
    def live_window_s(self) -> float:
        return LIVE_SESSIONS * self.cluster.session_timeout_s

    def locate(self, stream_id: str) -> dict[str, Any] | None:
        """The live member that holds ``stream_id``'s partition, as it announced itself (its
        ``member`` name and ``address``), or None while no member holds it (it is moving)."""
        return self.members.owner(self.owner_partition(stream_id), self.live_window_s)

    # -- the members topic ------------------------------------------------------------------------
    def _announce(self, leaving: bool = False) -> None:
        """Tell the cluster where this worker's API is and what it holds; ``leaving``: it holds
        nothing any more and its record is removed (after one last word on what it stopped)."""
        with self._lock:
            stopped, self._stopped_at = self._stopped_at, {}
            doc = {"address": self.address, "at": time.time(), "partitions": sorted(self.owned),
                   "streams": sorted(self._running()), "stopped": stopped}
            self._announced_at = time.monotonic()
        key = self.member_id.encode()
        try:
            producer = self._producer_now()
            producer.send(self.cluster.members_topic, key=key, value=json.dumps(doc).encode())
            if leaving:
                producer.send(self.cluster.members_topic, key=key, value=None)
                producer.flush(timeout=5)
        except Exception as e:  # the next announcement tries again; nothing here depends on it
            log.warning("members topic: could not announce this worker (%s: %s)", type(e).__name__, e)
            with self._lock:
                self._stopped_at = {**stopped, **self._stopped_at}
            return
        self.members.apply(key, json.dumps(doc).encode())
        if leaving:
            self.members.apply(key, None)

    def _keep_announcing(self) -> None:
        """Every few seconds: announce, count the live members, forget long-dead ones."""
        if time.monotonic() - self._announced_at < ANNOUNCE_SHARE * self.cluster.session_timeout_s:
            return
        self._announce()
        if self.metrics is not None:
            self.metrics.cluster_members.set(len(self.members.live(self.live_window_s)))
        gone = [n for n in self.members.stale(FORGET_S) if n != self.member_id]
        if gone:
            try:
                producer = self._producer_now()
                for n in gone:
                    producer.send(self.cluster.members_topic, key=n.encode(), value=None)
                    self.members.apply(n.encode(), None)
            except Exception as e:
                log.warning("members topic: could not remove old records (%s)", e)

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
            for topic in (self.cluster.streams_topic, self.cluster.members_topic):
                if topic not in have:
                    new.append(NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"}))
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
                    parts = [TopicPartition(topic, p)
                             for topic in (self.cluster.streams_topic, self.cluster.members_topic)
                             for p in sorted(consumer.partitions_for_topic(topic) or [0])]
                    consumer.assign(parts)
                    consumer.seek_to_beginning(*parts)
                    ends = consumer.end_offsets(parts)
                for tp, records in consumer.poll(timeout_ms=int(POLL_S * 1000)).items():
                    book = self.members if tp.topic == self.cluster.members_topic else self.book
                    for r in records:
                        book.apply(r.key, r.value)
                if not self._caught_up.is_set() and all(consumer.position(p) >= ends[p] for p in ends):
                    log.info("streams topic read: %d stream(s) defined in the cluster, %d member(s) alive",
                             len(self.book.current()), len(self.members.live(self.live_window_s)))
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
                self._keep_announcing()
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

    def _moved_here(self, sid: str) -> None:
        """A stream started here that another member ran before: say so (``stream.moved``)."""
        partition = self.owner_partition(sid)
        # the latest word on the stream or its partition, this worker's own included: a stream
        # added to a partition this worker already held did not move, whoever held it before
        words = [w for w in (self.members.last_ran(sid), self.members.last_held(partition)) if w is not None]
        if not words:
            return
        before = max(words, key=lambda w: w[1])
        if before[0] == self.member_id:
            return
        gap = max(0.0, time.time() - before[1])
        log.info("stream %s moved here from %s (%.1f s since it was last known to run there)",
                 sid, before[0], gap)
        if self._on_moved is not None:
            try:
                self._on_moved(sid, before[0], self.member_id, gap, partition)
            except Exception:
                log.exception("stream %s: the stream.moved observer failed", sid)

    # -- what runs here -------------------------------------------------------------------------------
    def _mine(self) -> dict[str, StreamConfig]:
        n = self.cluster.partitions
        return {sid: cfg for sid, cfg in self.book.current().items() if partition_of(sid, n) in self.owned}

    def _set_owned(self, owned: set[int]) -> None:
        changed = owned != self.owned
        self.owned = owned
        self._reconcile(force=True)
        if self.metrics is not None:
            self.metrics.cluster_partitions.set(len(owned))
        if changed and not self._stop.is_set():
            # at once, not on the next loop: a member that dies right after taking partitions is
            # then still known to have held them (who its streams moved from)
            self._announce()

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
                    self._stopped_at[sid] = time.time()
            running = self._running()
            for sid, cfg in wanted.items():
                if sid not in running:
                    try:
                        self._start(cfg)
                    except Exception as e:
                        log.error("stream %s: could not be started here (%s)", sid, e)
                    else:
                        self._started[sid] = cfg
                        self._moved_here(sid)
            now_running = self._running()
            if self.metrics is not None:
                self.metrics.cluster_streams.set(len(now_running))
            if now_running != self._announced_streams and not self._stop.is_set():
                self._announced_streams = now_running
                self._announced_at = 0.0  # what runs here changed: the next loop announces it
