"""The audit log: its hash chain and what `audit verify` says of an edited, deleted, reordered or torn
line; what the live pipeline records (refused logins, stream and zone changes, a real WHEP viewer,
fail-closed incidents), never with a token or a camera password; its records as schema-valid events."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiortc import MediaStreamTrack, RTCSessionDescription
from helpers import make_clip
from live_helpers import NoFaces, Raises, Served, wait_for
from webrtc_helpers import Viewer, client_pc, wait_until

from stream.cli import main
from stream.config import parse_config
from stream.core.errors import UserError
from stream.events import schema
from stream.events.audit import ZERO, AuditLog, AuditObserver, line_hash, masked, verify
from stream.live import users
from stream.live.auth import Authenticator, Tokens, UserStore
from stream.live.pipeline import Pipeline
from stream.live.supervisor import worker_config

SHARED = "audit-shared-token-0123456789"


class ListSink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def submit(self, event: dict[str, Any]) -> bool:
        event["sequence"] = schema.format_sequence(len(self.events) + 1)
        self.events.append(event)
        return True


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def written(path: Path, n: int = 6) -> Path:
    """A closed log: opened, ``n`` refused logins, closed."""
    log = AuditLog(path)
    for i in range(n):
        log.record("audit.login.refused", None, address=f"192.0.2.{i}", reason="invalid token")
    log.close()
    return path


def test_records_chain_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = written(tmp_path / "audit.jsonl")
    recs = records(path)
    assert [r["seq"] for r in recs] == list(range(1, 9))
    assert recs[0]["action"] == "audit.log.opened" and recs[0]["prev"] == ZERO
    assert recs[-1]["action"] == "audit.log.closed"
    lines = path.read_bytes().splitlines()
    assert all(recs[i]["prev"] == line_hash(lines[i - 1]) for i in range(1, len(recs)))
    assert list(recs[1])[:4] == ["seq", "time", "action", "user"] and list(recs[1])[-1] == "prev"
    assert path.stat().st_mode & 0o777 == 0o600
    assert main(["audit", "verify", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: intact, 8 record(s) (seq 1-8)\n"
    # reopened, the chain goes on
    AuditLog(path).close()
    assert verify(path).intact and records(path)[-1]["seq"] == 10


def _edit(lines: list[bytes]) -> list[bytes]:
    rec = json.loads(lines[2])
    rec["address"] = "198.51.100.1"
    return [*lines[:2], json.dumps(rec, separators=(",", ":")).encode(), *lines[3:]]


@pytest.mark.parametrize(("tamper", "line", "words"), [
    (_edit, 4, "line 3 was changed after it was written"),
    (lambda ls: ls[:2] + ls[3:], 3, "seq jumps from 2 to 4 at line 3: 1 record(s) deleted after line 2"),
    (lambda ls: [*ls[:2], ls[3], ls[2], *ls[4:]], 3, "which is at line 4: lines were reordered"),
    (lambda ls: ls[1:], 1, "seq jumps from 0 to 2 at line 1: 1 record(s) deleted from the start"),
    (lambda ls: [*ls[:2], b"not json", *ls[3:]], 3, "line 3 is not an audit record"),
])
def test_verify_names_the_first_broken_link(tmp_path: Path, capsys: pytest.CaptureFixture[str], tamper: Any,
                                            line: int, words: str) -> None:
    path = written(tmp_path / "audit.jsonl")
    path.write_bytes(b"\n".join(tamper(path.read_bytes().splitlines())) + b"\n")
    v = verify(path)
    assert (v.line, v.intact) == (line, False) and words in (v.why or ""), v.why
    assert main(["audit", "verify", str(path)]) == 1
    assert f"BROKEN at line {line}" in capsys.readouterr().out


def test_verify_exit_codes_for_several_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = written(tmp_path / "a.jsonl")
    assert main(["audit", "verify", str(good), str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_torn_last_line_is_acknowledged_not_chained_over(tmp_path: Path) -> None:
    path = written(tmp_path / "audit.jsonl", 2)
    with path.open("ab") as f:
        f.write(b'{"seq":5,"time":"2025-01-01T00:0')  # what a crash mid-write leaves
    v = verify(path)
    assert not v.intact and v.line == 5 and "incomplete" in (v.why or "")
    AuditLog(path).close()
    v = verify(path)
    assert v.intact
    assert v.notes == ["line 5 was torn by a crash while it was written (acknowledged by line 6)"]
    ack = json.loads(path.read_bytes().splitlines()[5])
    assert ack["action"] == "audit.log.resumed_after_damage" and ack["seq"] == 5 and ack["damaged_line"] == 5


def test_a_file_whose_last_line_is_no_record_is_moved_aside(tmp_path: Path) -> None:
    path = written(tmp_path / "audit.jsonl", 1)
    with path.open("ab") as f:
        f.write(b"edited by hand\n")
    AuditLog(path).close()
    (aside,) = tmp_path.glob("audit.jsonl.damaged-*")
    assert not verify(aside).intact
    first = records(path)[0]
    assert first["seq"] == 1 and first["prev"] == ZERO and first["damaged_file"] == str(aside)


def test_one_writer_per_file_and_many_threads(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    with pytest.raises(UserError, match="in use by another process"):
        AuditLog(path)

    def burst(n: int) -> None:
        for i in range(50):
            log.record("audit.view.started", f"user-{n}", stream_id="cam", session=str(i))

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert verify(path).intact and len(records(path)) == 2 + 8 * 50


def test_records_go_out_as_valid_events_and_unknown_actions_are_refused(tmp_path: Path) -> None:
    sink = ListSink()
    log = AuditLog(tmp_path / "audit.jsonl", sink, "/stream-redact/test")
    log.record("audit.zones.changed", "olga", role="operator", address="192.0.2.4", stream_id="gate",
               old=[], new=[{"kind": "mask", "points": [[0, 0], [1, 0], [1, 1]]}])
    with pytest.raises(ValueError, match="unknown audit action"):
        log.record("audit.coffee.made", "olga")
    with pytest.raises(ValueError, match="set by the log itself"):
        log.record("audit.view.started", "olga", seq=7)
    log.close()
    assert [schema.short_type(e["type"]) for e in sink.events] == [
        "audit.log.opened", "audit.zones.changed", "audit.log.closed"]
    for event, rec in zip(sink.events, records(tmp_path / "audit.jsonl"), strict=True):
        schema.validate(event)
        assert event["data"] == rec and event["subject"] == "audit"


def test_masked_hides_credentials() -> None:
    doc = {"id": "x", "source": {"type": "rtsp", "url": "rtsp://cam:pw-secret@10.0.0.1/live?token=abc"},
           "sasl_password": "hunter2", "outputs": [{"url": "rtsp://u:p@host/x"}]}
    text = json.dumps(masked(doc))
    assert "pw-secret" not in text and "abc" not in text and "hunter2" not in text and "u:p@" not in text
    assert "rtsp://***@10.0.0.1/live?token=***" in text


def test_worker_processes_write_chains_of_their_own(tmp_path: Path) -> None:
    cfg = parse_config({"audit": {"path": str(tmp_path / "audit.jsonl")}})
    assert worker_config(cfg, 1, 2).audit.path == tmp_path / "audit.worker-1.jsonl"
    assert worker_config(parse_config({}), 0, 2).audit.path is None


def test_show_filters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.record("audit.view.started", "alice", stream_id="gate", session="a")
    log.record("audit.view.started", "bob", stream_id="door", session="b")
    log.close()
    assert main(["audit", "show", str(path), "--user", "alice"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "alice" in out[0] and 'stream_id="gate"' in out[0]
    assert main(["audit", "show", str(path), "--stream", "door", "--since", "2000-01-01"]) == 0
    assert "bob" in capsys.readouterr().out
    assert main(["audit", "show", str(path), "--since", "yesterday"]) == 2


def test_fail_closed_incidents_are_recorded(tmp_path: Path) -> None:
    cfg = looping_clip(tmp_path, 10)
    log = AuditLog(tmp_path / "audit.jsonl")
    p = Pipeline(cfg, Raises)
    p.observers.append(AuditObserver(log))
    p.start()
    try:
        wait_for(lambda: log.flush(1) and any(r["action"] == "audit.incident.started" for r in log.since()),
                 what="an incident in the audit log")
    finally:
        p.stop()
    log.close()
    started = next(r for r in records(tmp_path / "audit.jsonl") if r["action"] == "audit.incident.started")
    assert started["stream_id"] == "cam" and started["reason"] == "detector_error" and started["user"] is None
    assert any(r["action"] == "audit.incident.ended" for r in records(tmp_path / "audit.jsonl"))


def looping_clip(folder: Path, frames: int) -> Any:
    clip = make_clip(folder / "c.mp4", frames=frames).path
    source = {"type": "file", "path": str(clip), "loop": True}
    return parse_config({"streams": [{"id": "cam", "source": source}]})


# -- through the HTTP app ------------------------------------------------------------------------------------
@pytest.fixture
async def audited(tmp_path: Path) -> AsyncIterator[tuple[Served, AuditLog, dict[str, str]]]:
    people = tmp_path / "users.jsonl"
    tokens = {role: users.add(people, name, role)[1]
              for role, name in (("viewer", "vera"), ("operator", "otto"), ("admin", "ada"))}
    cfg = looping_clip(tmp_path, 25)
    log = AuditLog(tmp_path / "audit.jsonl")
    s = await Served().start(Authenticator(Tokens((SHARED.encode(),)), UserStore(people)), log, cfg, NoFaces)
    yield s, log, tokens
    await s.stop()
    log.close()


async def test_refused_logins_are_recorded_without_the_token(audited: tuple[Served, AuditLog, dict[str, str]]
                                                             ) -> None:
    s, log, tokens = audited
    token_id, _ = tokens["viewer"].split(".")
    wrong = f"{token_id}.{'w' * 43}"
    assert (await s.call("GET", "/api/streams", wrong))[0] == 403
    assert (await s.call("GET", "/api/streams", "not-any-token-0123456789"))[0] == 403
    assert (await s.call("GET", "/api/streams"))[0] == 401
    assert (await s.call("POST", "/api/streams", tokens["viewer"], body={"id": "x"}))[0] == 403
    await asyncio.to_thread(log.flush)
    text = log.path.read_text()
    for secret in (wrong, "w" * 43, "not-any-token-0123456789", *tokens["viewer"].split(".")[1:]):
        assert secret not in text
    refused = [r for r in records(log.path) if r["action"] == "audit.login.refused"]
    assert [(r["reason"], r["claimed_user"], r["address"], r["route"]) for r in refused] == [
        ("invalid token", "vera", "127.0.0.1", "/api/streams"),
        ("invalid token", None, "127.0.0.1", "/api/streams"),
        ("missing token", None, "127.0.0.1", "/api/streams")]
    (denied,) = [r for r in records(log.path) if r["action"] == "audit.access.refused"]
    assert (denied["user"], denied["role"], denied["reason"], denied["method"]) == (
        "vera", "viewer", "needs role operator", "POST")


async def test_stream_and_zone_changes_are_recorded_with_credentials_masked(
        audited: tuple[Served, AuditLog, dict[str, str]]) -> None:
    s, log, tokens = audited
    cam = {"id": "door-1", "source": {"type": "rtsp", "url": "rtsp://cam:pw-secret@127.0.0.1:9/x"}}
    assert (await s.call("POST", "/api/streams", tokens["operator"], body=cam))[0] == 201
    assert (await s.call("DELETE", "/api/streams/door-1", tokens["operator"]))[0] == 204
    zones = {"zones": [{"kind": "mask", "points": [[0.1, 0.1], [0.5, 0.1], [0.5, 0.5]]}]}
    status, doc, _ = await s.call("PUT", "/api/streams/cam/zones", tokens["operator"], body=zones)
    assert status == 200, doc
    await asyncio.to_thread(log.flush)
    assert "pw-secret" not in log.path.read_text()
    by = {r["action"]: r for r in records(log.path)}
    added, removed, changed = by["audit.stream.added"], by["audit.stream.removed"], by["audit.zones.changed"]
    assert (added["user"], added["role"], added["address"], added["stream_id"]) == (
        "otto", "operator", "127.0.0.1", "door-1")
    assert added["stream"]["source"]["url"] == "rtsp://***@127.0.0.1:9/x" and removed["user"] == "otto"
    assert (changed["user"], changed["stream_id"], changed["old"]) == ("otto", "cam", [])
    assert changed["new"][0]["kind"] == "mask"
    status, doc, _ = await s.call("GET", "/api/audit?since=1", SHARED)  # the shared tokens are admins
    assert status == 200 and doc["records"][0]["seq"] == 2
    assert (await s.call("GET", "/api/audit", tokens["operator"]))[0] == 403


async def test_a_whep_viewer_is_recorded_from_start_to_end(audited: tuple[Served, AuditLog, dict[str, str]]
                                                           ) -> None:
    s, log, tokens = audited
    pc = client_pc()
    viewer = Viewer(pc)
    pc.addTransceiver("video", direction="recvonly")

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        viewer.task = asyncio.ensure_future(viewer.consume(track))

    await pc.setLocalDescription(await pc.createOffer())
    status, answer, headers = await s.call("POST", "/whep/cam", tokens["viewer"], sdp=pc.localDescription.sdp)
    assert status == 201, answer
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    await wait_until(lambda: viewer.received >= 3, 30, "frames at the WHEP viewer")
    assert (await s.call("DELETE", headers["Location"], tokens["viewer"]))[0] == 200
    await viewer.close()
    await asyncio.to_thread(log.flush)
    by = {r["action"]: r for r in records(log.path)}
    started, ended = by["audit.view.started"], by["audit.view.ended"]
    for r in (started, ended):
        assert (r["user"], r["role"], r["address"], r["stream_id"]) == ("vera", "viewer", "127.0.0.1", "cam")
    assert started["session"] == ended["session"]
    assert headers["Location"].split("/")[-1] not in log.path.read_text()  # a session URL is a secret
    assert ended["connected"] is True and ended["duration_s"] > 0 and "ended" in ended["reason"]


async def test_a_whip_publisher_is_recorded_from_start_to_end(audited: tuple[Served, AuditLog, dict[str, str]]
                                                              ) -> None:
    import numpy as np
    from webrtc_helpers import ClipTrack

    s, log, tokens = audited
    status, doc, _ = await s.call("POST", "/api/streams", tokens["operator"],
                                  body={"id": "bodycam", "source": {"type": "whip"}})
    assert status == 201, doc
    # a viewer may watch but not publish: refused, and that is in the log too
    assert (await s.call("POST", "/whip/bodycam", tokens["viewer"], sdp="v=0\r\n"))[0] == 403
    pc = client_pc()
    images = [np.full((120, 160, 3), 40 * i, np.uint8) for i in range(4)]
    pc.addTrack(ClipTrack(images))
    await pc.setLocalDescription(await pc.createOffer())
    status, answer, headers = await s.call("POST", "/whip/bodycam", tokens["operator"],
                                           sdp=pc.localDescription.sdp)
    assert status == 201, answer
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    await wait_until(lambda: s.pipeline.streams["bodycam"].seq >= 5, 30, "frames from the publisher")
    assert (await s.call("DELETE", headers["Location"], tokens["operator"]))[0] == 200
    await pc.close()
    await asyncio.to_thread(log.flush)
    by = {r["action"]: r for r in records(log.path)}
    started, ended = by["audit.publish.started"], by["audit.publish.ended"]
    for r in (started, ended):
        assert (r["user"], r["role"], r["address"], r["stream_id"]) == ("otto", "operator", "127.0.0.1",
                                                                       "bodycam")
    assert started["session"] == ended["session"] and ended["connected"] is True
    assert headers["Location"].split("/")[-1] not in log.path.read_text()
    denied = [r for r in records(log.path) if r["action"] == "audit.access.refused"]
    assert [(r["user"], r["route"]) for r in denied] == [("vera", "/whip/{stream_id}")]
    assert verify(log.path).intact


def test_the_login_throttle_counts_per_address_within_its_window() -> None:
    from stream.live.throttle import LoginThrottle

    now = [1000.0]
    t = LoginThrottle(limit=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert t.wait_s("192.0.2.1") is None
        t.refused("192.0.2.1")
    assert t.wait_s("192.0.2.1") == 60 and t.wait_s("192.0.2.2") is None  # others are not affected
    assert t.first_wait("192.0.2.1") and not t.first_wait("192.0.2.1")  # one audit line per spell
    now[0] += 30
    assert t.wait_s("192.0.2.1") == 30
    now[0] += 30.5
    assert t.wait_s("192.0.2.1") is None and t.first_wait("192.0.2.1")  # the window has passed


async def test_a_token_guessing_flood_is_throttled_but_a_known_user_keeps_working(
        audited: tuple[Served, AuditLog, dict[str, str]]) -> None:
    from stream.live.throttle import LIMIT

    s, log, tokens = audited
    assert (await s.call("GET", "/api/streams", tokens["viewer"]))[0] == 200  # vera logged in before
    token_id, _ = tokens["admin"].split(".")
    for i in range(LIMIT):
        assert (await s.call("GET", "/api/streams", f"{token_id}.{'g' * 40}{i:03d}"))[0] == 403
    for _ in range(3):
        status, doc, headers = await s.call("GET", "/api/streams", "guess-0123456789abcdef")
        assert status == 429 and "too many refused logins" in doc["error"]
        assert 1 <= int(headers["Retry-After"]) <= 60
    assert (await s.call("GET", "/api/streams", tokens["viewer"]))[0] == 200  # known: still in
    assert (await s.call("GET", "/api/streams", tokens["admin"]))[0] == 429  # never verified: waits
    await asyncio.to_thread(log.flush)
    refused = [r["reason"] for r in records(log.path) if r["action"] == "audit.login.refused"]
    assert refused == ["invalid token"] * LIMIT + ["throttled"]
