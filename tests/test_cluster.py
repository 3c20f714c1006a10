"""Cluster mode: worker processes share the streams through a Kafka consumer group on a real broker.

Each member is a real `stream-redact run` process; what runs where is read from each member's own
`GET /api/streams`. Session timeout 6 s (Tansu's first join then takes about 3 s).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
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
from stream.live.cluster import ClusterMember, MemberBook, StreamBook, partition_of
from stream.live.supervisor import worker_config

STREAMS = [f"cam-{i}" for i in range(6)]


def test_partitions_are_stable_and_spread() -> None:
    assert partition_of("gate-north", 64) == partition_of("gate-north", 64)
    spread = Counter(partition_of(f"cam-{i}", 8) for i in range(800))
    assert len(spread) == 8 and min(spread.values()) > 60


def test_cluster_mode_needs_kafka_and_ports_for_its_workers(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cluster\.mode kafka needs events\.kafka"):
        parse_config({"cluster": {"mode": "kafka"}})
    with pytest.raises(UserError, match=r"cluster\.session_timeout_s"):
        parse_config({"cluster": {"mode": "kafka", "session_timeout_s": 1},
                      "events": {"kafka": {"bootstrap_servers": "127.0.0.1:9"}}})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"cluster": {"mode": "kafka"}, "http": {"port": 65534},
                                   "events": {"kafka": {"bootstrap_servers": "127.0.0.1:9"}}}))
    r = subprocess.run([sys.executable, "-m", "stream.cli", "run", "--config", str(cfg), "--workers", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "http.port + 1 + i, up to 65536, past 65535" in r.stderr, r.stderr


def test_in_cluster_mode_each_worker_process_is_a_member_with_an_address_of_its_own() -> None:
    cfg = parse_config({
        "streams": [{"id": s, "source": {"type": "whip"}} for s in STREAMS],
        "http": {"host": "0.0.0.0", "port": 8080},
        "events": {"kafka": {"bootstrap_servers": "127.0.0.1:9"}},
        "cluster": {"mode": "kafka", "advertise_url": "http://10.0.0.5:8080"}})
    parts = [worker_config(cfg, i, 3) for i in range(3)]
    # the group, not the hash, places streams: every worker starts from every definition
    assert all([s.id for s in w.streams] == STREAMS for w in parts)
    assert [(w.http.host, w.http.port) for w in parts] == [("0.0.0.0", p) for p in (8081, 8082, 8083)]
    assert [w.cluster.advertise_url for w in parts] == [f"http://10.0.0.5:{p}" for p in (8081, 8082, 8083)]
    v6 = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"advertise_url": "https://[fd00::5]"})})
    assert worker_config(v6, 1, 2).cluster.advertise_url == "https://[fd00::5]:8082"
    free = cfg.model_copy(update={"http": cfg.http.model_copy(update={"port": 0})})
    # any free port: the worker advertises the address it bound
    assert (worker_config(free, 0, 2).http.port, worker_config(free, 0, 2).cluster.advertise_url) == (0, None)
    static = parse_config({"streams": [{"id": s, "source": {"type": "whip"}} for s in STREAMS]})
    assert sum(len(worker_config(static, i, 3).streams) for i in range(3)) == len(STREAMS)
    assert worker_config(static, 0, 3).http.port == 0


def test_the_book_overlays_the_topic_on_the_config() -> None:
    base = parse_config({"streams": [{"id": "a", "source": {"type": "whip"}},
                                     {"id": "b", "source": {"type": "whip"}}]}).streams
    book = StreamBook(base)
    book.apply(b"c", json.dumps({"id": "c", "source": {"type": "whip"}}).encode())
    book.apply(b"a", None)  # removed through the API, config stream or not
    book.apply(b"d", b"{not json")  # skipped, logged
    book.apply(b"e", json.dumps({"id": "other", "source": {"type": "whip"}}).encode())  # key and id differ
    assert sorted(book.current()) == ["b", "c"]


def announce(book: MemberBook, name: str, at: float, partitions: list[int], streams: list[str],
             stopped: dict[str, float] | None = None) -> None:
    doc = {"address": f"http://{name}:8080", "at": at, "partitions": partitions, "streams": streams,
           "stopped": stopped or {}}
    book.apply(name.encode(), json.dumps(doc).encode())


def test_the_member_book_knows_who_holds_a_partition_and_who_ran_a_stream_last() -> None:
    book = MemberBook()
    announce(book, "a", 100.0, [1, 2], ["cam-1"])
    announce(book, "b", 103.0, [3], ["cam-3"])
    book.apply(b"c", b"{broken")  # skipped, logged
    assert sorted(book.live(10, now=105.0)) == ["a", "b"]
    assert sorted(book.live(3, now=105.0)) == ["b"], "a is not heard from within the window"
    owner = book.owner(2, 10, now=105.0)
    assert owner is not None and owner["member"] == "a" and owner["address"] == "http://a:8080"
    assert book.owner(3, 10, now=105.0)["member"] == "b" and book.owner(9, 10, now=105.0) is None
    assert book.owner(2, 3, now=105.0) is None, "a member not heard from holds nothing"
    # a clean hand-over: a stops cam-1 at 104 and b starts it
    announce(book, "a", 104.5, [2], [], stopped={"cam-1": 104.0})
    announce(book, "b", 105.0, [1, 3], ["cam-1", "cam-3"])
    assert book.last_ran("cam-1") == ("b", 105.0)
    announce(book, "a", 104.8, [2], [], stopped={"cam-1": 104.0})  # an older word changes nothing
    assert book.last_ran("cam-1") == ("b", 105.0)
    book.apply(b"b", None)  # b left: it holds nothing any more, its last word on cam-1 stays
    assert book.owner(1, 10, now=106.0) is None and book.last_ran("cam-1") == ("b", 105.0)
    assert book.stale(50, now=200.0) == ["a"]
    # a member that died before saying it ran a stream still said it held the partition
    assert book.last_held(1) == ("b", 105.0) and book.last_held(2) == ("a", 104.8)


def test_a_stream_started_where_its_partition_already_was_did_not_move() -> None:
    cfg = parse_config({"cluster": {"mode": "kafka", "partitions": 16},
                        "events": {"kafka": {"bootstrap_servers": "127.0.0.1:9"}}})
    moved: list[tuple] = []
    me = ClusterMember(cfg, lambda c: None, lambda s: None, set, on_moved=lambda *a: moved.append(a))
    p = partition_of("door", 16)
    announce(me.members, "old-worker", 100.0, [p], [])  # held the partition long ago
    announce(me.members, me.member_id, 200.0, [p], [])  # this worker holds it since
    me._moved_here("door")  # a new stream in that partition
    assert moved == []
    announce(me.members, "old-worker", 300.0, [p], ["door"])  # it ran there later: then it moved here
    me._moved_here("door")
    assert len(moved) == 1 and moved[0][:3] == ("door", "old-worker", me.member_id) and moved[0][4] == p


@pytest.mark.parametrize(("cluster", "message"), [
    ({"advertise_url": "10.0.0.5:8080"}, "http(s) URL with a host"),
    ({"advertise_url": "http://admin:pw@10.0.0.5:8080"}, "without user info"),
    ({"advertise_url": "http://10.0.0.5:8080/api"}, "without a path"),
    ({"members_topic": "stream-redact.streams"}, "three different topics"),
])
def test_bad_cluster_settings_are_refused_with_the_fix(cluster: dict, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        parse_config({"cluster": {"mode": "kafka", **cluster},
                      "events": {"kafka": {"bootstrap_servers": "127.0.0.1:9"}}})


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
    victim_id = victim.member_id
    rest = [m for m in members if m is not victim]

    def victim_known() -> bool:  # the others have read what the victim said it runs
        listing = rest[0].call("GET", "/api/streams")[1]["cluster"]["members"]
        return any(w["worker"] == victim_id and set(w["streams"]) == by_member[victim.name] for w in listing)

    wait_for(victim_known, timeout=10, what="the victim's announcement read by the others")
    victim.kill()  # SIGKILL: no goodbye to the group; its session times out
    wait_for(lambda: each_once(rest, STREAMS), timeout=40,
             what=f"{sorted(by_member[victim.name] or ())} taken over by the other members")

    def moved() -> dict[str, dict]:  # away from the killed member (not the start's own moves, if any)
        return {e["data"]["stream_id"]: e for m in rest for e in m.emitted("stream-redact.stream.moved")
                if e["data"]["from_worker"] == victim_id}

    wait_for(lambda: set(moved()) >= set(by_member[victim.name] or ()), timeout=20,
             what="a stream.moved event for each of the killed member's streams")
    for sid in by_member[victim.name] or ():
        data = moved()[sid]["data"]
        assert data["to_worker"] in {m.member_id for m in rest}
        assert data["partition"] == partition_of(sid, 16)
        # from its last announcement (every 2 s) to the start here: the 6 s session and the rebalance
        assert 2.0 < data["gap_s"] < 40.0, data
    assert set(moved()) == set(by_member[victim.name] or ()), "streams that did not move: no event"


def test_any_member_redirects_a_request_to_the_streams_owner_and_counts_the_members(
        members: list[Member]) -> None:
    wait_for(lambda: each_once(members, STREAMS), timeout=60, what="every stream on exactly one member")
    wait_for(lambda: all(m.metric("stream_redact_cluster_members") == 3 for m in members), timeout=20,
             what="every member counting 3 members")
    owner = next(m for m in members if "cam-1" in (m.streams() or ()))
    other = next(m for m in members if m is not owner)
    # the members say what they hold every 2 s and on every change: until the owner's word is read,
    # the answer is 503 (moving), never a wrong address
    wait_for(lambda: other.raw("GET", "/api/streams/cam-1")[0] == 307, timeout=10,
             what="the owner's announcement read by the other member")
    status, headers, doc = other.raw("GET", "/api/streams/cam-1")
    assert headers["Location"] == f"http://127.0.0.1:{owner.port}/api/streams/cam-1"
    assert doc["worker"] == owner.member_id
    status, _, doc = other.raw("GET", "/api/streams/cam-1/zones")
    assert status == 307 and doc["location"].endswith(f":{owner.port}/api/streams/cam-1/zones")
    assert owner.call("GET", "/api/streams/cam-1")[1]["id"] == "cam-1"
    # who may not call the API learns nothing about where workers are
    status, headers, doc = other.raw("GET", "/api/streams/cam-1", token=None)
    assert status == 401 and "Location" not in headers and str(owner.port) not in json.dumps(doc)
    assert other.raw("GET", "/api/streams/no-such-cam")[0] == 404
    def listing() -> dict:
        return other.call("GET", "/api/streams")[1]["cluster"]

    wait_for(lambda: sorted(s for w in listing()["members"] for s in w["streams"]) == sorted(STREAMS),
             timeout=10, what="every member's streams in the cluster listing")
    assert listing()["worker"] == other.member_id
    assert {w["worker"] for w in listing()["members"]} == {m.member_id for m in members}


def test_a_stream_added_on_one_member_runs_on_its_owner_and_a_removed_one_stops_everywhere(
        members: list[Member], broker: Broker) -> None:
    """Restarts: the next test (clean restarts are not tested: docs/cluster.md, "Restarts")."""
    wait_for(lambda: each_once(members, STREAMS), timeout=60, what="every stream on exactly one member")
    status, doc = members[0].call("POST", "/api/streams", {"id": "door", "source": {"type": "whip"}})
    assert status == 202 and doc["partition"] == partition_of("door", 16), doc
    wait_for(lambda: each_once(members, [*STREAMS, "door"]), timeout=30,
             what="the added stream on one member")

    def knows_door() -> bool:  # running there, or redirected to the member it runs on
        return members[1].raw("GET", "/api/streams/door")[0] in (200, 307)

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


def test_a_stream_added_through_the_api_survives_every_member_crashing_and_starting_again(
        members: list[Member]) -> None:
    """Every worker of the cluster dies at once (a power cut, a lost node pool): the stream added
    through the API is read back from the streams topic and runs once, on its owner. The members are
    killed, not stopped: after a clean leave the test broker (Tansu) keeps naming the member that
    left as the group's leader, and the rebalance waits for it (docs/cluster.md, "Restarts")."""
    wait_for(lambda: each_once(members, STREAMS), timeout=60, what="every stream on exactly one member")
    status, _ = members[1].call("POST", "/api/streams", {"id": "door", "source": {"type": "whip"}})
    assert status == 202
    status, _ = members[2].call("DELETE", "/api/streams/cam-1")
    assert status == 202
    wanted = sorted({*STREAMS, "door"} - {"cam-1"})
    wait_for(lambda: each_once(members, wanted), timeout=30, what="the added stream on a member, cam-1 gone")
    for m in members:
        m.kill()
    assert all(m.streams() is None for m in members), "every member is down"
    for m in members:
        m.start()
    wait_for(lambda: each_once(members, wanted), timeout=90,
             what="every stream, the added one included and the removed one not, once on the new members")
    def redirected() -> bool:  # a member that does not run it sends callers to the one that does
        owner = next((m for m in members if "door" in (m.streams() or ())), None)
        if owner is None:  # moving again while the group settles
            return False
        other = next(m for m in members if m is not owner)
        return other.raw("GET", "/api/streams/door")[1].get("Location", "").endswith(
            f":{owner.port}/api/streams/door")

    # until another member has read the new owner's first word, it may still point at the killed
    # member that held the partition (its record lives 1.5 session timeouts)
    wait_for(redirected, timeout=15, what="another member redirecting to the new owner")
    assert all(m.raw("GET", "/api/streams/cam-1")[0] == 404 for m in members), "the removal outlived it"


def test_a_member_cut_off_from_the_broker_stops_its_streams(members: list[Member], broker: Broker) -> None:
    wait_for(lambda: each_once(members, STREAMS), timeout=60, what="every stream on exactly one member")
    broker.stop()
    wait_for(lambda: all(m.streams() == set() for m in members), timeout=30,
             what="every member stopping its streams once the group is out of reach")
    # and a member told to stop while the broker is gone stops cleanly, its pipeline included
    members[0].stop()
    assert members[0].proc is not None and members[0].proc.returncode == 0, members[0].log.read_text()[-2000:]


def test_a_member_of_worker_processes_runs_a_share_on_each_and_takes_over_a_killed_ones(
        tmp_path: Path, broker: Broker) -> None:
    """`run --workers 2` in cluster mode: each worker process is a member of the group of its own,
    beside a one-process member. The front answers for streams on its own workers and sends callers
    on to the other member's; a killed member's streams come to the worker processes."""
    clip = make_clip(tmp_path / "cam.mp4", frames=20, width=160, height=120, fps=10).path
    # 4 partitions over 3 members: each holds at least one, and a stream on every partition gives
    # each member (and each worker process) a stream, so nothing below can pass for want of one
    ids = [next(f"cam-{i}" for i in range(100) if partition_of(f"cam-{i}", 4) == p) for p in range(4)]
    doc = cluster_doc(broker, clip, ids)
    doc["cluster"]["partitions"] = 4
    multi = Member(tmp_path, "multi", doc, args=("--workers", "2")).start()
    single = Member(tmp_path, "single", doc).start()
    try:
        both = [multi, single]
        wait_for(lambda: each_once(both, ids), timeout=90, what="every stream once, on 3 group members")
        wait_for(lambda: single.metric("stream_redact_cluster_members") == 3, timeout=20,
                 what="the one-process member counting the two worker processes as members")
        listing = multi.call("GET", "/api/streams")[1]
        assert len(listing["cluster"]["workers"]) == 2, listing["cluster"]

        def settled() -> bool:  # the first member to join holds every partition until the rest have
            on = {s["worker"] for s in multi.call("GET", "/api/streams")[1]["streams"]}
            return each_once(both, ids) and on == {"worker-0", "worker-1"} and bool(single.streams())

        wait_for(settled, timeout=60, what="a share of the streams on each of the 3 group members")
        here = {s["id"]: s["worker"] for s in multi.call("GET", "/api/streams")[1]["streams"]}
        for sid, worker in here.items():  # the front forwards to the worker process that runs it
            assert multi.call("GET", f"/api/streams/{sid}")[1]["id"] == sid, (sid, worker)
        there = sorted(single.streams() or ())
        wait_for(lambda: multi.raw("GET", f"/api/streams/{there[0]}")[1].get("Location", "").endswith(
            f":{single.port}/api/streams/{there[0]}"), timeout=15,
            what="the front sending a caller on to the member that runs the stream")
        single.kill()
        wait_for(lambda: each_once([multi], ids), timeout=40,
                 what=f"{there} taken over by the worker processes")

        def counted() -> set[str]:  # each worker's own count, in the front's merged /metrics
            with urllib.request.urlopen(f"http://127.0.0.1:{multi.port}/metrics", timeout=5) as r:
                text = r.read().decode()
            line = r'^stream_redact_cluster_members\{worker="(worker-\d)"\} 2\.0$'
            return set(re.findall(line, text, re.M))

        wait_for(lambda: counted() == {"worker-0", "worker-1"}, timeout=30,
                 what="each worker process counting 2 members once the killed one's record is old")
        # one worker process dies: the supervisor starts it again as a new member, and its streams
        # run again, on it or on its sibling
        on = [s["worker"] for s in multi.call("GET", "/api/streams")[1]["streams"]]
        victim = max(("worker-0", "worker-1"), key=on.count)
        pid = next(p["pid"] for p in multi.raw("GET", "/readyz")[2]["processes"] if p["name"] == victim)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: victim in multi.call("GET", "/api/streams")[1]["unavailable"], timeout=15,
                 what=f"the front seeing {victim} down")

        def back() -> bool:
            return each_once([multi], ids) and multi.call("GET", "/api/streams")[1]["unavailable"] == []

        wait_for(back, timeout=60, what=f"the streams of the killed {victim} running again")
    finally:
        for m in (multi, single):
            m.stop()
            m.kill()
