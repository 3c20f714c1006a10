"""`stream-redact events tail`: follow an event topic at a terminal, one readable line per event.

It reads the topic's partitions directly (no consumer group: nothing to join, nothing committed),
so several people can tail the same topic without disturbing each other or the dashboards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from stream.config.events import KafkaConfig, _host_port
from stream.core.errors import UserError
from stream.events import schema


def add_events_parser(sub: argparse._SubParsersAction, parser_class: type[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("events", help="follow the detection/stream/incident events on Kafka")
    esub = p.add_subparsers(dest="events_cmd", metavar="{tail}", required=True, parser_class=parser_class)
    t = esub.add_parser(
        "tail", help="print events from a Kafka topic as they arrive",
        description="Print the events of a topic, one line each (or the raw JSON with --json). Reads every "
                    "partition directly, without a consumer group. Connection and TLS/SASL settings can come "
                    "from a pipeline config (--config), whose events.kafka section is used.")
    t.add_argument("--bootstrap", help="host:port[,host:port...] of the brokers (default: from --config)")
    t.add_argument("--topic", help="topic to read (default: events.kafka.topic from --config, else "
                                   "stream-redact.events)")
    t.add_argument("--config", type=Path, help="pipeline config whose events.kafka section gives the "
                                               "brokers, topic and TLS/SASL settings")
    t.add_argument("--stream", action="append", default=[], metavar="ID",
                   help="only events of this stream (repeatable)")
    t.add_argument("--type", action="append", default=[], metavar="T",
                   help="only events of this type, e.g. track.ended, or a family such as track (repeatable)")
    t.add_argument("--json", action="store_true", help="print each event as one line of JSON")
    t.add_argument("--from-beginning", action="store_true", help="start at the oldest event kept, not now")
    t.add_argument("--count", type=int, default=0, metavar="N", help="exit after printing N events")
    t.add_argument("--idle-timeout", type=float, default=0, metavar="S",
                   help="exit when no event has arrived for S seconds (default: follow forever)")
    p.set_defaults(func=cmd_events)


def cmd_events(args: argparse.Namespace) -> int:
    kafka, topic = _connection(args)
    wanted_types = [t.removeprefix(schema.PREFIX) for t in args.type]
    return tail(kafka, topic, set(args.stream), wanted_types, as_json=args.json,
                from_beginning=args.from_beginning, count=args.count, idle_timeout=args.idle_timeout)


def _connection(args: argparse.Namespace) -> tuple[KafkaConfig, str]:
    """Brokers, security settings and topic from --config and/or --bootstrap/--topic."""
    kafka: KafkaConfig | None = None
    topic = args.topic
    if args.config is not None:
        from stream.config import load_config

        kafka = load_config(args.config).events.kafka
        if kafka is None:
            raise UserError(f"{args.config} has no events.kafka section; give --bootstrap instead",
                            exit_code=2)
        topic = topic or kafka.topic
    if args.bootstrap:
        try:
            servers = [_host_port(s) for s in args.bootstrap.split(",") if s.strip()]
            if not servers:
                raise ValueError("give at least one host:port")
        except ValueError as e:
            raise UserError(f"--bootstrap: {e}", exit_code=2) from None
        kafka = (kafka.model_copy(update={"bootstrap_servers": servers}) if kafka is not None
                 else KafkaConfig(bootstrap_servers=servers))
    if kafka is None:
        raise UserError("give the brokers with --bootstrap host:port (or --config with an events.kafka "
                        "section)", exit_code=2)
    return kafka, topic or kafka.topic


def tail(kafka: KafkaConfig, topic: str, streams: set[str], types: list[str], as_json: bool = False,
         from_beginning: bool = False, count: int = 0, idle_timeout: float = 0,
         out: TextIO = sys.stdout) -> int:
    """Print matching events until ``count`` were printed or ``idle_timeout`` passed without any."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    from stream.events.kafka import client_settings, diagnose, preflight

    setting = "--bootstrap"
    _, problem = preflight(kafka, setting=setting)
    if problem is not None:
        raise UserError(f"cannot read events: {problem}")
    servers = ",".join(kafka.bootstrap_servers)
    try:
        consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, bootstrap_timeout_ms=10_000,
                                 **client_settings(kafka))
    except KafkaError as e:
        raise UserError(f"cannot read events: {diagnose(kafka, e, setting=setting)}") from None
    try:
        parts = _partitions(consumer, topic, servers)
        consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        if from_beginning:
            consumer.seek_to_beginning()
        else:
            consumer.seek_to_end()
        printed = 0
        last = time.monotonic()
        while True:
            batch = consumer.poll(timeout_ms=500)
            if not batch:
                if idle_timeout and time.monotonic() - last >= idle_timeout:
                    return 0
                continue
            last = time.monotonic()
            for rec in (r for recs in batch.values() for r in recs):
                line = _render(rec.key, rec.value, streams, types, as_json)
                if line is None:
                    continue
                print(line, file=out, flush=True)
                printed += 1
                if count and printed >= count:
                    return 0
    except KeyboardInterrupt:
        return 0
    finally:
        consumer.close()


def _partitions(consumer: Any, topic: str, servers: str, timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return parts
        if time.monotonic() > deadline:
            raise UserError(f"topic {topic!r} was not found on {servers}; check --topic (the pipeline's "
                            "events.kafka.topic)")
        time.sleep(0.2)  # metadata is fetched in the background; ask again


def _render(key: bytes | None, value: bytes, streams: set[str], types: list[str],
            as_json: bool) -> str | None:
    """One line for a record, or None when it is filtered out."""
    if streams and (key is None or key.decode(errors="replace") not in streams):
        return None
    try:
        event = json.loads(value)
        etype = schema.short_type(str(event.get("type", "?")))
    except (ValueError, AttributeError):
        return None if types else f"(not an event: {value[:80]!r})"
    if types and not any(etype == t or etype.startswith(t + ".") for t in types):
        return None
    if as_json:
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return describe(event)


def _b(box: dict[str, Any] | None) -> str:
    if not box:
        return "?"
    x1, y1, x2, y2 = box.get("pixel", [0, 0, 0, 0])
    return f"({x1},{y1})-({x2},{y2})"


def describe(event: dict[str, Any]) -> str:
    """A person-readable line for one event."""
    etype = schema.short_type(str(event.get("type", "?")))
    d = event.get("data") or {}
    who = d.get("stream_id") or event.get("subject") or "-"
    head = f"{event.get('time', '?')}  {who:<16} {etype:<18}"
    if etype.startswith("track."):
        what = f"{d.get('class', '?')} #{d.get('track_id', '?')}"
        if etype == "track.ended":
            best = d.get("best") or {}
            return (f"{head} {what} ({d.get('reason')}) after {d.get('duration_s', 0):.1f} s, "
                    f"{d.get('frames')} frame(s), best {best.get('score', 0):.2f} at {_b(best.get('box'))}")
        coasted = " coasted" if d.get("coasted") else ""
        return f"{head} {what} score {d.get('score', 0):.2f} at {_b(d.get('box'))}{coasted}"
    if etype == "stream.up":
        return f"{head} up"
    if etype == "stream.down":
        error = d.get("error")
        return f"{head} {d.get('state')}" + (f": {error}" if error else "")
    if etype == "incident.started":
        verb = "blanked" if d.get("action") == "blank" else "withheld"
        return f"{head} FAIL-CLOSED ({d.get('reason')}): frames {verb} from now on"
    if etype == "incident.ended":
        verb = "blanked" if d.get("action") == "blank" else "withheld"
        return (f"{head} over: {d.get('frames')} frame(s) {verb} ({d.get('reason')}) in "
                f"{d.get('duration_s', 0):.1f} s")
    if etype == "frame.detections":
        frame = (d.get("frame") or {}).get("seq", "?")
        if d.get("failure"):
            return f"{head} frame {frame} failed closed ({d['failure']})"
        regions = ", ".join(f"{r.get('class')} {r.get('score', 0):.2f} {_b(r.get('box'))}"
                            for r in d.get("detections") or [])
        return f"{head} frame {frame}: {regions or 'nothing'}"
    if etype == "pipeline.events_dropped":
        return (f"{head} EVENTS LOST: {d.get('count')} ({d.get('reason')}, {d.get('policy')}) between "
                f"{d.get('first_at')} and {d.get('last_at')}")
    return f"{head} {json.dumps(d, separators=(',', ':'))[:200]}"
