"""Recordings with a chain of custody: segments and manifests written by the live pipeline verify,
their masks are the painted ones, exports verify and tampering of any kind is named; retention, a
quota and a full disk delete the oldest segments and leave a chain that still verifies, without
costing the live outputs a frame; a SIGKILL leaves every finished segment whole.

Streams are file sources played in real time through the real pipeline; tampering is done to the
files on disk, as someone with access to them would.
"""

from __future__ import annotations

import errno
import itertools
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from helpers import CLI, REGION_KEYS, ROOT, Clip, make_clip, run_cli
from live_helpers import NoFaces, counter, wait_for
from test_api import call
from test_hardening_api import ENV, TOKEN, Service, closed_port, rtsp
from test_hardening_api import config as api_config

from stream.cli import main
from stream.config import RecordOutputConfig, parse_config
from stream.core.errors import UserError
from stream.core.frames import Frame
from stream.core.metrics import Metrics
from stream.core.redact import Region
from stream.live.pipeline import Pipeline, StreamRunner
from stream.live.publish import custody, record
from stream.live.publish.encoder import Painted
from stream.live.publish.record import RecordOutput
from stream.live.service import detector_factory_for

DETECTION = {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"]}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Clip:
    """4 s at 25 fps: four or five 1 s segments."""
    return make_clip(tmp_path_factory.mktemp("rec") / "face.mp4", frames=100, width=320, height=240)


def stream_doc(clip: Clip, rec: Path, **record_opts: Any) -> dict[str, Any]:
    return {"id": "cam", "source": {"type": "file", "path": str(clip.path)},
            "outputs": [{"type": "record", "dir": str(rec), "segment_s": 1, **record_opts}]}


class Seen:
    """What the stream published, by capture time (the hook runs after painting)."""

    def __init__(self, runner: StreamRunner) -> None:
        self.runner = runner
        self.frames: dict[float, tuple[Frame, list[dict]]] = {}

    def __call__(self, frame: Frame, image: Any, dets: Any) -> None:
        h, w = image.shape[:2]
        regions = [r.as_json() for r in self.runner.stage.redactor.regions(dets, w, h)]
        self.frames[round(frame.wall_time, 3)] = (frame, regions)


def play(cfg_doc: dict[str, Any], factory: Any = None,
         added: Any = None) -> tuple[Pipeline, dict[str, Seen]]:
    """Run the config's file streams to their end through the pipeline, then stop it."""
    cfg = parse_config(cfg_doc)
    p = Pipeline(cfg, factory or detector_factory_for(cfg))
    seen: dict[str, Seen] = {}

    def hook(runner: StreamRunner) -> None:
        seen[runner.id] = Seen(runner)
        runner.on_redacted.append(seen[runner.id])
        if added is not None:
            added(runner)

    p.on_stream_added.append(hook)
    p.start()
    try:
        wait_for(lambda: p.ended, timeout=60, what="the file sources to end")
    finally:
        p.stop(timeout=20)
    return p, seen


@pytest.fixture(scope="module")
def recorded(clip: Clip, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Pipeline, Seen]:
    """One real stream (real face detector) recorded into 1 s segments."""
    rec = tmp_path_factory.mktemp("recorded")
    p, seen = play({"streams": [stream_doc(clip, rec)], "detection": DETECTION})
    return rec / "cam", p, seen["cam"]


@pytest.fixture
def copy(recorded: tuple[Path, Pipeline, Seen], tmp_path: Path) -> Path:
    """The recording, copied for a test to tamper with."""
    dst = tmp_path / "cam"
    shutil.copytree(recorded[0], dst)
    return dst


class Cli:
    """``stream-redact`` in this process (its output captured): the same code as the command, without
    an interpreter start per call."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *args: object) -> subprocess.CompletedProcess:
        self.capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            rc = int(e.code or 0)
        got = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, got.out, got.err)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def links(folder: Path) -> list[custody.Link]:
    return custody.verify_stream(folder, segments=False).links


# -- recording -----------------------------------------------------------------------------------
def test_the_pipeline_records_segments_whose_manifests_verify(recorded: tuple[Path, Pipeline, Seen],
                                                              clip: Clip) -> None:
    folder, p, _ = recorded
    report = custody.verify_stream(folder)
    assert report.ok, report.problems
    chain = report.links
    assert len(chain) >= 3, [link.segment.name for link in chain]
    assert [link.index for link in chain] == list(range(len(chain)))
    assert chain[0].doc["previous_manifest_sha256"] == custody.GENESIS
    for before, link in itertools.pairwise(chain):
        assert link.doc["previous_manifest_sha256"] == before.sha256
        assert link.start > before.end
    for link in chain:
        doc = link.doc
        day = time.strftime("%Y%m%d", time.gmtime(doc["start"]["epoch"]))
        assert link.segment.parent == folder / day and link.segment.name.startswith("cam-")
        assert doc["start"]["utc"].endswith("Z") and doc["end"]["epoch"] >= doc["start"]["epoch"]
        assert doc["models"]["models"]["yunet"] == doc["models"]["models"]["yunet"].lower()
        # exactly the models this stream's detector runs: the fast preset's YuNet, no plates, no persons
        assert set(doc["models"]["models"]) == {"yunet"}
        assert len(doc["models"]["manifest_sha256"]) == 64 and len(doc["config_sha256"]) == 64
        with av.open(str(link.segment)) as c:  # fragmented MP4, H.264, one packet per manifest frame
            assert c.streams.video[0].codec_context.name == "h264"
            packets = [pk for pk in c.demux(c.streams.video[0]) if pk.size]
            assert packets[0].is_keyframe, "every segment starts with a keyframe"
        with av.open(str(link.segment)) as c:
            assert sum(1 for _ in c.decode(video=0)) == doc["frames"] == len(doc["masks"]["frames"])
        assert len(packets) == doc["frames"]
        head = link.segment.read_bytes()[:64]
        assert b"moof" in link.segment.read_bytes() and b"ftyp" in head
        assert doc["end"]["epoch"] - doc["start"]["epoch"] < 1.2
    frames = sum(link.doc["frames"] for link in chain)
    assert frames == counter(p.metrics, "output_frames", stream="cam", output="record")
    assert counter(p.metrics, "recording_segments", stream="cam") == len(chain)
    assert not list(folder.glob("*/.*")), "no temporary file is left after a clean stop"


def test_the_manifests_hold_the_masks_painted_on_each_frame(recorded: tuple[Path, Pipeline, Seen],
                                                            clip: Clip) -> None:
    folder, _, seen = recorded
    entries = [e for link in links(folder) for e in link.doc["masks"]["frames"]]
    assert len(entries) == len(seen.frames), "every published frame is recorded, nothing else"
    covered = shown = 0
    for link in links(folder):
        masks = link.doc["masks"]
        assert (masks["width"], masks["height"]) == (clip.width, clip.height)
        for i, e in enumerate(masks["frames"]):
            assert e["frame"] == i and set(e) <= {"frame", "regions", "time", "blanked"}
            frame, painted = seen.frames[e["time"]]
            assert e["regions"] == painted, f"frame {frame.seq}: the manifest says what was painted"
            for r in e["regions"]:
                assert set(r) >= REGION_KEYS and r["label"] == "face"
            face = clip.face_boxes[frame.seq - 1]
            shown += face is not None and not e.get("blanked")
            if face is not None and any(r["box"][0] <= face[0] and r["box"][1] <= face[1] and
                                        r["box"][2] >= face[2] and r["box"][3] >= face[3]
                                        for r in e["regions"]):
                covered += 1
    assert shown and covered >= 0.8 * shown, f"the face's mask is recorded on {covered}/{shown} frames"


def test_blanked_frames_are_recorded_as_such(tmp_path: Path) -> None:
    cfg = RecordOutputConfig(type="record", dir=tmp_path, segment_s=1)
    feed(RecordOutput("cam", "record", cfg, Metrics()), [time.time()] * 10, blank={3, 4})
    (link,) = links(tmp_path / "cam")
    frames = link.doc["masks"]["frames"]
    assert [bool(f.get("blanked")) for f in frames] == [i in (3, 4) for i in range(10)]
    assert link.doc["blanked_frames"] == 2 and frames[1]["regions"][0]["box"] == [10, 10, 50, 60]


# -- export and tampering ------------------------------------------------------------------------
def test_an_export_verifies_and_a_flipped_byte_does_not(copy: Path, tmp_path: Path, cli: Cli) -> None:
    chain = links(copy)
    start = chain[1].start + 0.5
    end = chain[2].start + 0.3
    out = tmp_path / "export.mp4"
    r = run_cli("export", "cam", "--dir", copy.parent, "--from", custody.iso(start), "--to", f"{end:.3f}",
                "-o", out, timeout=60)
    assert r.returncode == 0, r.stderr
    bundle = json.loads(custody.bundle_path(out).read_text())
    assert [s["segment"] for s in bundle["segments"]] == [chain[1].segment.name, chain[2].segment.name]
    assert bundle["segments"][0]["manifest"] == chain[1].doc and bundle["chain"]["ok"]
    first, last = bundle["segments"][0]["frames"][0], bundle["segments"][-1]["frames"][1]
    assert first == 0, "the export starts at the keyframe at or before --from (the segment's first)"
    assert custody.frame_time(chain[2], last) <= end < custody.frame_time(chain[2], last + 1)
    with av.open(str(out)) as c:
        decoded = sum(1 for _ in c.decode(video=0))
    assert decoded == bundle["export"]["frames"] == chain[1].doc["frames"] + last + 1
    r = run_cli("verify-export", out, timeout=60)
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr

    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0x01
    out.write_bytes(bytes(data))
    r = cli("verify-export", out)
    assert r.returncode == 1 and "export.mp4 was changed after export" in r.stderr, r.stderr
    # the bundle's hash made to match the changed file: the frame itself still gives it away
    doc = json.loads(custody.bundle_path(out).read_text())
    doc["export"]["sha256"] = custody.sha256_bytes(bytes(data))
    custody.bundle_path(out).write_bytes(custody.canonical(doc))
    _, problems = custody.verify_export(out)
    assert problems and all("changed after export" not in p for p in problems), problems
    assert any("as recorded" in p or "cannot be read" in p or "frames" in p for p in problems), problems


def test_an_edited_manifest_in_an_export_bundle_is_named(copy: Path, tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "all.mp4"
    custody.export(copy, 0, time.time() + 60, out)
    path = custody.bundle_path(out)
    doc = json.loads(path.read_text())
    doc["segments"][0]["manifest"]["masks"]["frames"][5]["regions"] = []  # a mask made to disappear
    path.write_bytes(custody.canonical(doc))
    _, problems = custody.verify_export(out)
    assert any(f"manifest of {doc['segments'][0]['segment']} in the bundle was edited" in p
               for p in problems), problems
    path.unlink()
    r = cli("verify-export", out)
    assert r.returncode == 2 and "cannot read" in r.stderr and "all.mp4.custody.json" in r.stderr


def test_an_edited_manifest_is_named(copy: Path, cli: Cli) -> None:
    chain = links(copy)
    r = cli("verify-recordings", copy)
    assert r.returncode == 0 and f"verified: {len(chain)} segment(s) of cam" in r.stdout, r.stderr
    original = chain[0].path.read_bytes()
    doc = json.loads(original)
    doc["masks"]["frames"][3]["regions"] = []  # a mask made to disappear, still valid canonical JSON
    chain[0].path.write_bytes(custody.canonical(doc))
    r = cli("verify-recordings", copy)
    assert r.returncode == 1 and f"manifest {chain[0].path.name} was edited" in r.stderr, r.stderr
    chain[0].path.write_bytes(original)
    assert custody.verify_stream(copy).ok
    chain[1].path.write_text("{")
    r = cli("verify-recordings", copy)
    assert r.returncode == 1 and f"manifest {chain[1].path.name} is not valid JSON" in r.stderr, r.stderr
    assert cli("verify-recordings", copy / "nope").returncode == 2


def test_a_changed_segment_and_a_deleted_middle_segment_break_the_chain(copy: Path) -> None:
    chain = links(copy)
    data = bytearray(chain[0].segment.read_bytes())
    data[-10] ^= 0xFF
    chain[0].segment.write_bytes(bytes(data))
    report = custody.verify_stream(copy)
    assert [p for p in report.problems if "was changed after recording" in p], report.problems
    chain[1].segment.unlink()
    chain[1].path.unlink()
    report = custody.verify_stream(copy)
    assert any(f"1 segment(s) between {chain[0].segment.name} and {chain[2].segment.name} are missing" in p
               for p in report.problems), report.problems
    with pytest.raises(custody.CustodyError, match="missing"):  # an export across the gap is refused
        custody.export(copy, chain[0].start, chain[2].end, copy.parent / "x.mp4")
    assert not (copy.parent / "x.mp4").exists()


def test_export_errors_name_the_problem(copy: Path, tmp_path: Path, cli: Cli) -> None:
    r = cli("export", "nosuch", "--dir", copy.parent, "--from", "0", "--to", "1",
                "-o", tmp_path / "a.mp4")
    assert r.returncode == 2 and "no recordings of stream 'nosuch'" in r.stderr
    r = cli("export", "cam", "--dir", copy.parent, "--from", "2001-01-01T00:00:00Z", "--to", "2001-01-02",
                "-o", tmp_path / "a.mp4")
    assert r.returncode == 1 and "no recording of cam between 2001-01-01T00:00:00.000Z" in r.stderr
    r = cli("export", "cam", "--dir", copy.parent, "--from", "yesterday", "--to", "1", "-o", "a.mp4")
    assert r.returncode == 2 and "'yesterday' is not a time" in r.stderr
    assert not (tmp_path / "a.mp4").exists()


# -- retention, quota, full disk -----------------------------------------------------------------
def feed(out: RecordOutput, walls: list[float], blank: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    """Frames at 25 fps with the given wall-clock times (faked to be old where a test needs it)."""
    t0 = time.monotonic()
    face = (Region("face", (10, 10, 50, 60), "ellipse", 0.9, 1, False),)
    out.start()
    for i, wall in enumerate(walls):
        img = np.full((120, 160, 3), (i * 7) % 255, np.uint8)
        out.submit(img, t0 + i / 25, Painted(i, wall, None if i in blank else face if i % 2 else ()))
        wait_for(lambda: len(out._queue) < 4, 20, "the recorder to take frames")
    out.stop(30)


def test_retention_deletes_old_segments_and_the_rest_still_verifies(tmp_path: Path) -> None:
    audit: list[tuple[str, dict]] = []
    m = Metrics()
    cfg = RecordOutputConfig(type="record", dir=tmp_path, segment_s=1, retention_days=30)
    old = time.time() - 40 * 86400
    out = RecordOutput("cam", "record", cfg, m, audit=lambda action, fields: audit.append((action, fields)))
    feed(out, [old + i / 25 for i in range(50)] + [time.time() + i / 25 for i in range(60)])
    folder = tmp_path / "cam"
    assert [why for _, why in out.deleted] == ["retention", "retention"]
    assert counter(m, "recording_deleted", stream="cam", reason="retention") == 2
    deleted = [f for a, f in audit if a == "audit.recording.deleted"]
    assert len(deleted) == 2 and deleted[0]["stream_id"] == "cam"
    assert deleted[0]["reason"] == "retention" and deleted[0]["segment"] == out.deleted[0][0]
    # every finished segment's manifest hash went to the audit log: the chain's anchor outside the folder
    anchors = [f for a, f in audit if a == "audit.recording.segment"]
    assert [f["index"] for f in anchors] == list(range(out.segments_written))
    assert [f["manifest_sha256"] for f in anchors[:2]] == [e["manifest_sha256"] for e in deleted]
    assert not any(folder.glob(f"{custody.day_folder(old)}*")), "the emptied day folder went too"
    pruned = custody.read_pruned(folder)
    assert [e["index"] for e in pruned] == [0, 1] and pruned[0]["reason"] == "retention"
    report = custody.verify_stream(folder)
    assert report.ok and report.links[0].index == 2, report.problems
    # a restart continues the chain after the newest manifest on disk
    out2 = RecordOutput("cam", "record", cfg, m)
    feed(out2, [time.time() + 5 + i / 25 for i in range(10)])
    report = custody.verify_stream(folder)
    assert report.ok and [link.index for link in report.links][-2:] == [report.links[-2].index,
                                                                        report.links[-2].index + 1]
    # without the pruned record, the missing start is a broken chain
    (folder / custody.PRUNED_NAME).unlink()
    problems = custody.verify_stream(folder).problems
    assert problems and "not recorded as deleted" in problems[0], problems


def test_a_second_recorder_on_the_same_folder_records_nothing(tmp_path: Path) -> None:
    cfg = RecordOutputConfig(type="record", dir=tmp_path, segment_s=1)
    m = Metrics()
    first = RecordOutput("cam", "record", cfg, m)
    first.start()
    wait_for(lambda: first._usable, 10, "the first recorder to start")
    second = RecordOutput("cam", "record2", cfg, m)
    feed(second, [time.time()] * 5)
    first.stop()
    assert second.segments_written == 0
    assert counter(m, "recording_errors", stream="cam", reason="locked") == 1


def test_a_quota_and_an_injected_full_disk_delete_the_oldest_while_the_stream_goes_on(
        clip: Clip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec, live = tmp_path / "rec", tmp_path / "live.mp4"
    doc = stream_doc(clip, rec, max_bytes=50_000)
    doc["outputs"].append({"type": "file", "path": str(live)})
    audit: list[tuple[str, dict]] = []
    real_write = record._Writer.write
    state = {"fired": False}

    def write(self: record._Writer, data: bytes) -> int:
        outs = [o for o in recorder if o.segments_written >= 3]
        if outs and not state["fired"] and self.bytes > 2000:
            state["fired"] = True
            self.error = OSError(errno.ENOSPC, "No space left on device")
            raise self.error
        return real_write(self, data)

    recorder: list[RecordOutput] = []

    def added(runner: StreamRunner) -> None:
        for out in runner.outputs:
            if isinstance(out, RecordOutput):
                out.audit = lambda action, fields: audit.append((action, fields))
                recorder.append(out)

    monkeypatch.setattr(record._Writer, "write", write)
    p, seen = play({"streams": [doc], "detection": DETECTION}, factory=NoFaces, added=added)
    m, out = p.metrics, recorder[0]
    assert state["fired"], "the full disk was injected"
    assert counter(m, "recording_errors", stream="cam", reason="disk_full") == 1
    deleted = [f for a, f in audit if a == "audit.recording.deleted"]
    triggers = [f["trigger"] for f in deleted]
    assert "ENOSPC" in triggers and "max_bytes" in triggers, triggers
    assert all(f["reason"] == "disk_full" for f in deleted)
    assert counter(m, "recording_deleted", stream="cam", reason="disk_full") == len(deleted)
    report = custody.verify_stream(rec / "cam")
    assert report.ok and report.links, report.problems
    on_disk = sum(f.stat().st_size for f in (rec / "cam").glob("*/*") if f.is_file())
    assert on_disk <= 50_000
    assert sample_gauge(m, "stream_redact_recording_bytes", stream="cam") == on_disk
    # the live side lost nothing: every published frame went to the file output too
    published = counter(m, "frames_published", stream="cam")
    assert published == len(seen["cam"].frames) > 0
    assert counter(m, "output_frames", stream="cam", output="file") == published
    assert out.segments_written > len(report.links)


def sample_gauge(m: Metrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- crashes -------------------------------------------------------------------------------------
def test_a_segment_stopped_between_its_last_steps_is_completed_at_start(tmp_path: Path) -> None:
    cfg = RecordOutputConfig(type="record", dir=tmp_path, segment_s=1)
    feed(RecordOutput("cam", "record", cfg, Metrics()), [time.time() + i / 25 for i in range(60)])
    folder = tmp_path / "cam"
    *_, before, newest = links(folder)

    def temporary(path: Path) -> None:
        path.rename(path.with_name(f".{path.name}{custody.PARTIAL_SUFFIX}"))

    temporary(before.path)  # stopped after the segment's rename, before its manifest's
    temporary(newest.path)  # stopped before either rename
    temporary(newest.segment)
    (folder / newest.segment.parent.name / f".cam-x.mp4{custody.PARTIAL_SUFFIX}").write_bytes(b"\0" * 100)
    assert any("has no manifest" in p for p in custody.verify_stream(folder).problems)
    out = RecordOutput("cam", "record", cfg, Metrics())
    feed(out, [time.time() + 10 + i / 25 for i in range(5)])
    report = custody.verify_stream(folder)
    assert report.ok, report.problems
    assert [link.sha256 for link in report.links[-3:-1]] == [before.sha256, newest.sha256]
    assert report.links[-1].index == newest.index + 1
    assert not list(folder.glob(f"*/*{custody.PARTIAL_SUFFIX}")), "the unfinished segment was removed"


def test_sigkill_while_recording_leaves_every_finished_segment_whole(clip: Clip, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    doc = stream_doc(clip, rec)
    doc["source"]["loop"] = True
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"streams": [doc], "detection": DETECTION, "workers": 1,
                               "http": {"port": 0}, "events": {"sink": "none"}}))
    log = tmp_path / "run.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([*CLI, "run", "--config", str(cfg), "--insecure-no-auth"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        manifests = lambda: list(rec.glob(f"cam/*/*{custody.MANIFEST_SUFFIX}"))  # noqa: E731
        wait_for(lambda: len(manifests()) >= 3 or proc.poll() is not None, 90, "three finished segments")
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    folder = rec / "cam"
    report = custody.verify_stream(folder)
    assert report.ok and len(report.links) >= 3, report.problems
    assert len(list(folder.glob(f"*/*{custody.PARTIAL_SUFFIX}"))) <= 1, "at most the segment being written"
    last = report.links[-1]
    out = RecordOutput("cam", "record", RecordOutputConfig(type="record", dir=rec, segment_s=1), Metrics())
    feed(out, [time.time() + 5 + i / 25 for i in range(5)])
    report = custody.verify_stream(folder)
    assert report.ok, report.problems
    assert report.links[-1].doc["previous_manifest_sha256"] == last.sha256
    assert not list(folder.glob(f"*/*{custody.PARTIAL_SUFFIX}")), "the unfinished segment was removed"


# -- configuration and API -----------------------------------------------------------------------
def test_record_output_config_errors_name_the_field(tmp_path: Path) -> None:
    base = {"id": "cam", "source": {"type": "whip"}}
    cases = [({"type": "record", "dir": str(tmp_path / "no" / "such")}, "folder .* does not exist"),
             ({"type": "record", "dir": str(tmp_path), "segment_s": 0.1}, r"outputs\[0\].segment_s"),
             ({"type": "record", "dir": str(tmp_path), "max_bytes": 10}, r"outputs\[0\].max_bytes"),
             ({"type": "record", "dir": str(tmp_path), "retention": 3}, r"outputs\[0\].retention: unknown")]
    for output, match in cases:
        with pytest.raises(UserError, match=match):
            parse_config({"streams": [{**base, "outputs": [output]}]})
    cfg = parse_config({"streams": [{**base, "outputs": [{"type": "record", "dir": str(tmp_path / "new")}]}]})
    out = cfg.streams[0].outputs[0]
    assert isinstance(out, RecordOutputConfig) and (out.segment_s, out.retention_days) == (60, 30)


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, TOKEN)


def test_api_record_outputs_go_only_under_the_output_folder(tmp_path: Path, tokens: None) -> None:
    out = tmp_path / "recordings"
    out.mkdir()
    port = closed_port()

    def add(svc: Service, sid: str, folder: str) -> tuple[int, Any]:
        got = call("POST", svc.base + "/api/streams",
                   rtsp(sid, f"rtsp://127.0.0.1:{port}/x", outputs=[{"type": "record", "dir": folder}]),
                   token=TOKEN)
        return got[0], got[1]

    svc = Service(api_config(tmp_path))
    try:
        status, doc = add(svc, "a", str(out))
        assert status == 403 and "api.allow_file_outputs" in doc["error"]
    finally:
        svc.stop()
    svc = Service(api_config(tmp_path, api={"allow_file_outputs": True, "file_output_dir": str(out)}))
    try:
        status, doc = add(svc, "b", str(tmp_path))
        assert status == 403 and "outside api.file_output_dir" in doc["error"]
        assert add(svc, "c", "../elsewhere")[0] in (400, 403)
        status, doc = add(svc, "d", "cams")  # relative: under the output folder
        assert status == 201, doc
        wait_for(lambda: (out / "cams" / "d").is_dir(), 10, "the recorder to make its folder")
    finally:
        svc.stop()


def test_the_config_digest_never_holds_a_secret() -> None:
    a = {"id": "cam", "source": {"type": "rtsp", "url": "rtsp://u:Secret99@h/x"}}
    b = {"id": "cam", "source": {"type": "rtsp", "url": "rtsp://u:Other11@h/x"}}
    assert custody.config_digest(a) == custody.config_digest(b), "only the masked URL is hashed"


def test_each_finished_segment_is_anchored_in_the_audit_log(clip: Clip, tmp_path: Path) -> None:
    """The manifest hashes leave the recording's folder: a chain rewritten there no longer matches."""
    from stream.events.audit import AuditLog, AuditObserver, verify

    rec, path = tmp_path / "rec", tmp_path / "audit.jsonl"
    audit_log = AuditLog(path)
    cfg = parse_config({"streams": [stream_doc(clip, rec)], "detection": DETECTION})
    p = Pipeline(cfg, NoFaces)
    p.observers.append(AuditObserver(audit_log))
    p.start()
    try:
        wait_for(lambda: p.ended, timeout=60, what="the file source to end")
    finally:
        p.stop(timeout=20)
        audit_log.close(5)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    anchors = [r for r in records if r["action"] == "audit.recording.segment"]
    report = custody.verify_stream(rec / "cam")
    assert report.ok and len(anchors) == len(report.links) >= 2
    for r, link in zip(anchors, report.links, strict=True):
        assert r["stream_id"] == "cam" and r["index"] == link.index
        assert r["manifest_sha256"] == link.sha256 == custody.sha256_bytes(link.path.read_bytes())
    assert verify(path).intact
