"""Cluster mode: worker processes share the streams through a Kafka consumer group on a real broker.

Each member is a real `stream-redact run` process; what runs where is read from each member's own
`GET /api/streams`. Session timeout 6 s (Tansu's first join then takes about 3 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cluster_helpers import Member, cluster_doc, each_once
from helpers import make_clip
from kafka_broker import Broker, read_topic
from live_helpers import wait_for

from stream.config import parse_config
from stream.core.errors import UserError
from stream.live.cluster import StreamBook, partition_of

STREAMS = [f"cam-{i}" for i in range(6)]


def test_partitions_are_stable_and_spread() -> None:
    assert partition_of("gate-north", 64) == partition_of("gate-north", 64)
    spread = Counter(partition_of(f"cam-{i}", 8) for i in range(800))
    assert len(spread) == 8 and min(spread.values()) > 60


def test_cluster_mode_needs_kafka_and_one_process(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cluster\.mode kafka needs events\.kafka"):
        parse_config({"cluster": {"mode": "kafka"}})
    with pytest.raises(UserError, match=r"cluster\.session_timeout_s"):
        parse_config({"cluster": {"mode": "kafka", "session_timeout_s": 1},
                      "events": {"kafka": {"bootstrap_servers": "127.0.0.1:9"}}})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"cluster": {"mode": "kafka"},
                                   "events": {"kafka": {"bootstrap_servers": "127.0.0.1:9"}}}))
    r = subprocess.run([sys.executable, "-m", "stream.cli", "run", "--config", str(cfg), "--workers", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "one stream worker per process" in r.stderr


def test_the_book_overlays_the_topic_on_the_config() -> None:
    base = parse_config({"streams": [{"id": "a", "source": {"type": "whip"}},
                                     {"id": "b", "source": {"type": "whip"}}]}).streams
    book = StreamBook(base)
    book.apply(b"c", json.dumps({"id": "c", "source": {"type": "whip"}}).encode())
    book.apply(b"a", None)  # removed through the API, config stream or not
    book.apply(b"d", b"{not json")  # skipped, logged
    book.apply(b"e", json.dumps({"id": "other", "source": {"type": "whip"}}).encode())  # key and id differ
    assert sorted(book.current()) == ["b", "c"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(log=tmp_path / "tansu.log") as b:
        yield b


@pytest.fixture
def members(tmp_path: Path, broker: Broker) -> Iterator[list[Member]]:
    clip = make_clip(tmp_path / "cam.mp4", frames=20, width=160, height=120, fps=10).path
    doc = cluster_doc(broker, clip, STREAMS)
    ms = [Member(tmp_path, f"m{i}", doc).start() for i in range(3)]
    yield ms
    for m in ms:
        m.stop()
    for m in ms:
        m.kill()


def test_members_run_every_stream_exactly_once_and_take_over_a_killed_ones(members: list[Member]) -> None:
    wait_for(lambda: each_once(members, STREAMS), timeout=60, what="every stream on exactly one member")
    by_member = {m.name: m.streams() for m in members}
    victim = max(members, key=lambda m: len(by_member[m.name] or ()))
    assert by_member[victim.name], "the busiest member runs at least one stream"
    victim.kill()  # SIGKILL: no goodbye to the group; its session times out
    rest = [m for m in members if m is not victim]
    wait_for(lambda: each_once(rest, STREAMS), timeout=40,
             what=f"{sorted(by_member[victim.name] or ())} taken over by the other members")


def test_a_stream_added_on_one_member_runs_on_its_owner_and_a_removed_one_stops_everywhere(
        members: list[Member], broker: Broker) -> None:
    """Restarts are not tested here: the test broker's group coordinator (Tansu) stops handing out
    assignments after members leave and rejoin a few times (docs/cluster.md)."""
    wait_for(lambda: each_once(members, STREAMS), timeout=60, what="every stream on exactly one member")
    status, doc = members[0].call("POST", "/api/streams", {"id": "door", "source": {"type": "whip"}})
    assert status == 202 and doc["partition"] == partition_of("door", 16), doc
    wait_for(lambda: each_once(members, [*STREAMS, "door"]), timeout=30,
             what="the added stream on one member")

    def knows_door() -> bool:  # running there, or known to run on another member
        status, doc = members[1].call("GET", "/api/streams/door")
        return status == 200 or "another worker" in (doc or {}).get("error", "")

    wait_for(knows_door, timeout=20, what="member 1 reading the definition from the streams topic")
    assert members[1].call("POST", "/api/streams", {"id": "door", "source": {"type": "whip"}})[0] == 409
    status, doc = members[1].call("POST", "/api/streams", {
        "id": "gate", "source": {"type": "rtsp", "url": "rtsp://10.1.2.3/x?token=secret123"}})
    assert status == 400 and "credentials are never stored" in doc["error"]
    status, _ = members[2].call("DELETE", "/api/streams/cam-0")
    assert status == 202
    wait_for(lambda: each_once(members, [*STREAMS[1:], "door"]), timeout=30, what="cam-0 gone everywhere")
    # what a member starting now reads first: the definitions outlive any member
    records = read_topic(broker.bootstrap, "stream-redact.streams", until=2)
    latest = {r.key: r.value for r in records}
    assert json.loads(latest[b"door"])["id"] == "door" and latest[b"cam-0"] is None


def test_a_member_cut_off_from_the_broker_stops_its_streams(members: list[Member], broker: Broker) -> None:
    wait_for(lambda: each_once(members, STREAMS), timeout=60, what="every stream on exactly one member")
    broker.stop()
    wait_for(lambda: all(m.streams() == set() for m in members), timeout=30,
             what="every member stopping its streams once the group is out of reach")
