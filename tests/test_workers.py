"""`run --workers N`: frames cross to one detection stage process through shared memory, and no
frame reaches an output unpainted whichever process dies.

The first tests run the stage server and a worker's handle on it in this process (threads, a real
Unix socket and real shared-memory slots); the last ones start the real processes: the supervisor,
its detection stage and its workers, against real RTSP cameras and a relay.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import av
import av.error
import numpy as np
import pytest
from helpers import ROOT, make_clip
from kafka_broker import Broker
from live_helpers import NoFaces, Raises, counter, wait_for
from prometheus_client.parser import text_string_to_metric_families

from stream.config import parse_config
from stream.core.detections import Detections
from stream.core.frames import Failure, Frame, Job, JobQueue
from stream.core.metrics import Metrics
from stream.core.yuv import I420
from stream.detect.yunet import YuNet
from stream.events.spool import SUFFIX
from stream.live.frame_ring import SlotReader, SlotWriter, remove_prefix
from stream.live.pipeline import Pipeline
from stream.live.remote_stage import RemoteStage
from stream.live.shard import owner, worker_of
from stream.live.stage_process import StageServer
from stream.live.supervisor import Supervisor, worker_config
from stream.sim.server import RtspServer, gst_rtsp_available, transcode_clip

KEY = b"k" * 32


# -- frame slots ------------------------------------------------------------------------------------
def test_a_frame_crosses_through_a_slot_without_change(tmp_path: Path) -> None:
    writer, reader = SlotWriter(tmp_path, "t-w0-"), SlotReader(tmp_path)
    rng = np.random.default_rng(1)
    bgr = rng.integers(0, 255, (48, 64, 3), np.uint8)
    yuv = I420(rng.integers(0, 255, (72, 64), np.uint8))
    a, b = writer.put(bgr), writer.put(yuv)
    assert a is not None and b is not None and a.slot != b.slot
    got_bgr, got_yuv = reader.view(a), reader.view(b)
    assert isinstance(got_yuv, I420) and got_yuv.size == (64, 48)
    np.testing.assert_array_equal(got_bgr, bgr)
    np.testing.assert_array_equal(got_yuv.data, yuv.data)
    writer.close()
    reader.close()
    assert not list(tmp_path.iterdir()), "closing the writer removes its slot files"


def test_slots_are_reused_only_once_answered_and_grow_for_larger_frames(tmp_path: Path) -> None:
    writer = SlotWriter(tmp_path, "t-w0-", max_slots=2)
    small = np.zeros((8, 8, 3), np.uint8)
    a, b = writer.put(small), writer.put(small)
    assert a is not None and b is not None
    assert writer.put(small) is None, "both slots are still at the stage: no third frame"
    writer.release(a.slot)
    big = np.full((400, 400, 3), 7, np.uint8)  # larger than the slot's capacity: a new, larger file
    c = writer.put(big)
    assert c is not None and c.slot == a.slot and c.name != a.name
    assert not (tmp_path / a.name).exists(), "the outgrown slot file is removed"
    np.testing.assert_array_equal(SlotReader(tmp_path).view(c), big)
    assert writer.in_use == 2
    writer.release_all()
    assert writer.in_use == 0


def test_a_dead_workers_slot_files_are_removed_by_prefix(tmp_path: Path) -> None:
    w0, w1 = SlotWriter(tmp_path, "sr-1-w0-"), SlotWriter(tmp_path, "sr-1-w1-")
    for w in (w0, w1):
        w.put(np.zeros((4, 4, 3), np.uint8))
    assert remove_prefix(tmp_path, "sr-1-w1-") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["sr-1-w0-1"]


def test_a_slot_name_cannot_leave_the_slot_folder(tmp_path: Path) -> None:
    from stream.live.frame_ring import SlotRef

    with pytest.raises(ValueError, match="bad slot name"):
        SlotReader(tmp_path).view(SlotRef(0, "../etc/passwd", "bgr", (1, 1, 3)))


# -- placement --------------------------------------------------------------------------------------
def test_worker_placement_is_not_the_shard_placement() -> None:
    """Within one shard of four, streams still spread over both workers (an unsalted hash would put
    every stream that shard 0 won on worker 0 too)."""
    ids = [f"cam-{i}" for i in range(400)]
    shard0 = [i for i in ids if owner(i, 4) == 0]
    on = [worker_of(i, 2) for i in shard0]
    assert 0.3 < sum(on) / len(on) < 0.7
    assert all(worker_of(i, 1) == 0 for i in ids)


def test_each_worker_gets_its_streams_and_files_of_its_own(tmp_path: Path) -> None:
    ids = [f"cam-{i}" for i in range(12)]
    streams = [{"id": i, "source": {"type": "rtsp", "url": f"rtsp://cam/{i}"}} for i in ids]
    cfg = parse_config({"streams": streams,
                        "events": {"jsonl": {"path": str(tmp_path / "ev.jsonl")}},
                        "http": {"host": "0.0.0.0", "port": 9000}})
    parts = [worker_config(cfg, i, 3) for i in range(3)]
    assert sorted(s.id for p in parts for s in p.streams) == sorted(ids), "every stream runs exactly once"
    assert all(worker_of(s.id, 3) == i for i, p in enumerate(parts) for s in p.streams)
    assert {p.events.jsonl.file() for p in parts} == {tmp_path / f"ev.worker-{i}.jsonl" for i in range(3)}
    assert len({p.events.spool.folder() for p in parts}) == 3
    assert all((p.http.host, p.http.port) == ("127.0.0.1", 0) for p in parts), "workers listen on loopback"


# -- the stage behind its socket, in this process -----------------------------------------------------
@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # a Unix socket path must be short; pytest's tmp_path can exceed the limit
    with tempfile.TemporaryDirectory(prefix="sr-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("wk") / "face.mp4", frames=25, width=320, height=240).path


def file_config(clip: Path, *ids: str, **extra: object):
    return parse_config({"streams": [{"id": i, "source": {"type": "file", "path": str(clip), "loop": True}}
                                     for i in ids], **extra})


class Remote:
    """A stage server and a pipeline that uses it through a RemoteStage, as one worker would."""

    def __init__(self, cfg, detector, sock_dir: Path, key: bytes = KEY) -> None:
        self.cfg, self.detector, self.sock_dir = cfg, detector, sock_dir
        self.address = str(sock_dir / "stage.sock")
        self.server: StageServer | None = None
        self.metrics = Metrics()
        self.stage = RemoteStage(self.address, key, SlotWriter(sock_dir, "t-w0-"), self.metrics,
                                 connect_timeout_s=0.5)
        self.pipeline = Pipeline(cfg, None, metrics=self.metrics, stage=self.stage)

    def start_server(self) -> StageServer:
        self.server = StageServer(self.cfg, lambda: self.detector, self.address, KEY, self.sock_dir)
        self.server.start()
        return self.server

    def published(self, sid: str) -> float:
        return counter(self.metrics, "frames_published", stream=sid)

    def close(self) -> None:
        self.pipeline.stop(2.0)
        if self.server is not None:
            self.server.stop()


def test_frames_of_a_worker_are_detected_by_the_stage_and_published(clip: Path, sock_dir: Path) -> None:
    det = NoFaces()
    r = Remote(file_config(clip, "a", "b"), det, sock_dir)
    r.start_server()
    r.pipeline.start()
    try:
        wait_for(lambda: r.published("a") >= 20 and r.published("b") >= 20, what="frames published")
        assert sum(det.batches) >= 40, "every published frame went through the stage's detector"
        assert r.pipeline.streams["a"].blanked == 0
        assert r.pipeline.status()["detector"] == "up"
        assert r.server is not None and r.server.status()["streams"] == 2
    finally:
        r.close()
    assert not list(sock_dir.glob("t-w0-*")), "the worker's slot files are gone after it stops"


def test_a_detector_error_in_the_stage_blanks_the_workers_frames(clip: Path, sock_dir: Path) -> None:
    r = Remote(file_config(clip, "a"), Raises(), sock_dir)
    r.start_server()
    r.pipeline.start()
    try:
        wait_for(lambda: counter(r.metrics, "frames_blanked", stream="a", reason="detector_error") >= 1
                 and r.pipeline.streams["a"].blanked >= 5, what="frames blanked for the stage's error")
        assert r.published("a") == r.pipeline.streams["a"].blanked, "every published frame was black"
    finally:
        r.close()


def test_no_stage_means_black_frames_then_detection_once_it_is_up(clip: Path, sock_dir: Path) -> None:
    r = Remote(file_config(clip, "a"), NoFaces(), sock_dir)
    r.pipeline.start()  # no stage to connect to
    try:
        wait_for(lambda: r.pipeline.streams["a"].blanked >= 5, what="blanked frames without a stage")
        assert r.published("a") == r.pipeline.streams["a"].blanked
        assert not r.pipeline.ready
        r.start_server()
        wait_for(lambda: r.stage.ready, what="the worker to connect")
        black = r.pipeline.streams["a"].blanked
        wait_for(lambda: r.published("a") >= black + 10, what="redacted frames after the stage came up")
    finally:
        r.close()


def test_losing_the_stage_fails_frames_in_flight_and_reconnects(clip: Path, sock_dir: Path) -> None:
    r = Remote(file_config(clip, "a"), NoFaces(), sock_dir)
    server = r.start_server()
    r.pipeline.start()
    try:
        wait_for(lambda: r.published("a") >= 10, what="frames published")
        server.stop()
        wait_for(lambda: not r.stage.ready, what="the worker to notice")
        black = r.pipeline.streams["a"].blanked
        wait_for(lambda: r.pipeline.streams["a"].blanked > black + 3, what="frames blanked while down")
        assert r.metrics.detector_up._value.get() == 0
        r.start_server()
        wait_for(lambda: r.stage.ready, what="reconnect")
        n = r.published("a")
        wait_for(lambda: r.published("a") > n + 10, what="frames after reconnect")
        assert r.stage.connects == 2
    finally:
        r.close()


def test_a_worker_without_the_key_is_refused(clip: Path, sock_dir: Path) -> None:
    r = Remote(file_config(clip, "a"), NoFaces(), sock_dir)
    r.start_server()
    intruder = RemoteStage(r.address, b"x" * 32, SlotWriter(sock_dir, "t-w9-"), Metrics(),
                           connect_timeout_s=0.3)
    intruder.start()
    try:
        assert not intruder.ready and intruder.connects == 0
        q = JobQueue("x", 2)
        intruder.attach(q)
        img = np.zeros((16, 16, 3), np.uint8)
        job = Job(Frame("x", 1, img, 0.0, 0.0), deadline=float("inf"))
        q.put(job)
        assert job.wait(5.0) and job.failure is Failure.DETECTOR_UNAVAILABLE
    finally:
        intruder.stop(1.0)
        r.close()


def test_answers_reach_the_right_frames_when_a_stage_answers_out_of_order(sock_dir: Path) -> None:
    """Slots, not arrival order, match answers to frames: each frame gets the detections of its own
    picture (the detector reads a marker painted into each one)."""

    def by_marker(images, refs=None):
        out = []
        for im in images:
            v = float(im[0, 0, 0])
            out.append(Detections(boxes=np.array([[v, v, v + 1, v + 1]], np.float32),
                                  scores=np.ones(1, np.float32), labels=("face",)))
        return out

    cfg = parse_config({})
    address = str(sock_dir / "stage.sock")
    server = StageServer(cfg, lambda: by_marker, address, KEY, sock_dir)
    server.start()
    stage = RemoteStage(address, KEY, SlotWriter(sock_dir, "t-w0-"), Metrics(), connect_timeout_s=5)
    stage.start()
    try:
        wait_for(lambda: stage.ready, what="connect")
        queues = [JobQueue(f"s{i}", 4) for i in range(3)]
        for q in queues:
            stage.attach(q)
        jobs = []
        for n in range(12):
            img = np.full((8, 8, 3), 10 + n, np.uint8)
            job = Job(Frame(f"s{n % 3}", n // 3 + 1, img, 0.0, 0.0), deadline=float("inf"))
            jobs.append(job)
            queues[n % 3].put(job)
        for n, job in enumerate(jobs):
            assert job.wait(10.0), f"frame {n} got no answer"
            if job.detections is not None:
                assert job.detections.boxes[0, 0] == 10 + n, f"frame {n} got another frame's detections"
            else:
                assert job.dropped is not None  # newest wins in the stage's queue: dropped, never mixed up
        assert sum(j.detections is not None for j in jobs) >= 3
    finally:
        stage.stop(1.0)
        server.stop()


# -- the real processes ---------------------------------------------------------------------------
def _get(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def test_a_hung_stage_is_killed_and_rebuilt_while_streams_blank(clip: Path) -> None:
    cfg = file_config(clip, "a", "b", detection={"preset": "fast", "plates": False, "heads": False,
                                                  "providers": ["cpu"]})
    sup = Supervisor(cfg, 2, insecure_no_auth=True, hang_s=2.0)
    sup.start()
    try:
        stage = next(c for c in sup.children() if c.kind == "detector")
        ports = {c.name: c.port for c in sup.children() if c.kind == "worker"}
        assert stage.pid is not None and all(ports.values())
        os.kill(stage.pid, signal.SIGSTOP)  # hung, not dead: only its silence tells
        wait_for(lambda: sup.restarts.labels("detector", "hung")._value.get() == 1, timeout=30,
                 what="the hung stage to be killed")

        def blanked() -> int:
            docs = [json.loads(_get(f"http://127.0.0.1:{p}/readyz")[1]) for p in ports.values()]
            return sum(s["blanked"] for d in docs for s in d["streams"])

        wait_for(lambda: blanked() > 0, what="frames blanked while the stage hung")
        wait_for(lambda: next(c for c in sup.children() if c.kind == "detector").port is not None, timeout=60,
                 what="a new stage")
        wait_for(lambda: all(json.loads(_get(f"http://127.0.0.1:{p}/readyz")[1])["ready"]
                             for p in ports.values()), timeout=30, what="workers ready again")

        worker = next(c for c in sup.children() if c.name == "worker-0")
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGSTOP)  # a hung worker is replaced too
        wait_for(lambda: sup.restarts.labels("worker-0", "hung")._value.get() == 1, timeout=30,
                 what="the hung worker to be killed")
        def new_port() -> bool:
            return next(c for c in sup.children() if c.name == "worker-0").port not in (None, worker.port)

        wait_for(new_port, timeout=60, what="a new worker-0")
        assert {s.id for s in sup._streams[0]} == {i for i in ("a", "b") if worker_of(i, 2) == 0}
    finally:
        sup.stop()
    assert not list(sup.shm_dir.glob(f"{sup.prefix}*")), "no frame slot outlives the supervisor"


# -- `run --workers 2` against real cameras --------------------------------------------------------
TALKING = ROOT / ".samples" / "talking-face" / "WolfgangLanger_Pexels.mp4"
TOKEN = "workers-test-token"
FAST_RECONNECT = {"initial_s": 0.2, "max_s": 1.0, "jitter": 0.1}
needs_rtsp = pytest.mark.skipif(not gst_rtsp_available(), reason="GStreamer RTSP server not installed "
                                "(apt-get install gir1.2-gst-rtsp-server-1.0 python3-gi ...; see .ci/run)")


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not TALKING.exists():
        pytest.fail(f"{TALKING} missing: run `python -m stream.samples fetch` (deploy/setup.sh does)")
    return transcode_clip(TALKING, tmp_path_factory.mktemp("wk-rtsp") / "face25.mp4", 640, 360, 25,
                          max_seconds=4)


@pytest.fixture(scope="module")
def yunet() -> YuNet:
    return YuNet(threshold=0.6, providers=("cpu",))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Reader(threading.Thread):
    """Pulls a republished stream until stopped, reopening it when the publisher goes away."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.frames, self.stop = url, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with av.open(self.url, options={"rtsp_transport": "tcp"}, timeout=(5, 5)) as c:
                    for f in c.decode(video=0):
                        self.frames.append(f.to_ndarray(format="bgr24"))
                        if self.stop.is_set():
                            return
            except (av.error.FFmpegError, OSError):
                self.stop.wait(0.2)  # the publisher is not there (yet); try again


def stop_run(proc: subprocess.Popen, timeout: float) -> str:
    """SIGTERM a `run` started by a test, as an orchestrator would; its stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def restarts(base: str, child: str) -> float:
    fams = text_string_to_metric_families(_get(base + "/metrics")[1])
    return sum(s.value for f in fams for s in f.samples
               if s.name == "stream_redact_worker_restarts_total" and s.labels.get("worker") == child)


def is_black(frame: np.ndarray) -> bool:
    return float(frame.mean()) < 20


@needs_rtsp
def test_two_workers_redact_each_stream_once_and_no_face_shows_when_any_process_is_killed(
        face_clip: Path, yunet: YuNet, tmp_path: Path) -> None:
    a = next(f"cam-{i}" for i in range(100) if worker_of(f"cam-{i}", 2) == 0)
    b = next(f"cam-{i}" for i in range(100) if worker_of(f"cam-{i}", 2) == 1)
    port = free_port()
    with RtspServer(cameras={"/a": face_clip, "/b": face_clip}, relays=["/ra", "/rb"]) as server:
        src = {"type": "rtsp", "reconnect": FAST_RECONNECT, "open_timeout_s": 3, "read_timeout_s": 3}
        streams = [{"id": sid, "source": {**src, "url": server.url(f"/{cam}")},
                    "outputs": [{"type": "rtsp", "url": server.url(f"/r{cam}"), "reconnect": FAST_RECONNECT}]}
                   for sid, cam in ((a, "a"), (b, "b"))]
        cfg = tmp_path / "run.json"
        cfg.write_text(json.dumps({
            "streams": streams, "http": {"port": port},
            "detection": {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"]},
            "events": {"jsonl": {"path": str(tmp_path / "events.jsonl")}}}))
        env = {**os.environ, "STREAM_REDACT_TOKENS": TOKEN}
        proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "run", "--config", str(cfg),
                                 "--workers", "2"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{port}"
        out_b = Reader(server.url("/rb"))
        out_a = Reader(server.url("/ra"))
        try:
            wait_for(lambda: _get(base + "/readyz")[0] == 200, timeout=120, what="the supervisor to be ready")
            status, body = _get(base + "/api/streams", TOKEN)
            assert status == 200, body
            listed = [(s["id"], s["worker"]) for s in json.loads(body)["streams"]]
            assert sorted(listed) == sorted([(a, "worker-0"), (b, "worker-1")]), "each stream on one worker"
            assert _get(base + "/api/streams")[0] == 401, "the front does not open the API without a token"

            out_a.start()
            out_b.start()
            wait_for(lambda: len(out_b.frames) >= 15 and len(out_a.frames) >= 15, timeout=60,
                     what="redacted frames from both outputs")

            def published() -> dict[tuple[str, str], float]:
                fams = text_string_to_metric_families(_get(base + "/metrics")[1])
                return {(s.labels["stream"], s.labels["worker"]): s.value for f in fams for s in f.samples
                        if s.name == "stream_redact_frames_published_total"}

            pub = published()
            assert set(pub) == {(a, "worker-0"), (b, "worker-1")}, f"each stream redacted exactly once: {pub}"

            procs = {p["name"]: p["pid"] for p in json.loads(_get(base + "/readyz")[1])["processes"]}
            os.kill(procs["worker-1"], signal.SIGKILL)
            wait_for(lambda: restarts(base, "worker-1") >= 1, what="the killed worker to be restarted")
            before_b = len(out_b.frames)
            wait_for(lambda: _get(base + "/readyz")[0] == 200, timeout=90, what="worker-1 back")
            wait_for(lambda: len(out_b.frames) >= before_b + 15, timeout=60, what=f"{b} published again")

            before_a = len(out_a.frames)
            os.kill(procs["detector"], signal.SIGKILL)
            wait_for(lambda: any(is_black(f) for f in out_a.frames[before_a:]), timeout=30,
                     what="black frames while the stage is down")
            wait_for(lambda: _get(base + "/readyz")[0] == 200, timeout=90, what="the stage back")
            wait_for(lambda: sum(not is_black(f) for f in out_a.frames[before_a:]) >= 15
                     and not is_black(out_a.frames[-1]), timeout=60, what=f"{a} redacted again")
        finally:
            out_a.stop.set()
            out_b.stop.set()
            err = stop_run(proc, 60)
        assert proc.returncode == 0, err[-3000:]
    assert TOKEN not in err, "the token reached the log"
    seen = out_a.frames + out_b.frames
    faces = [i for i, f in enumerate(seen) if not is_black(f) and len(yunet([f])[0])]
    assert not faces, f"{len(faces)} of {len(seen)} published frames show a face (first: {faces[:5]})"
    assert sum(is_black(f) for f in out_a.frames) >= 1


def _post(url: str, doc: dict) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_stream_added_through_the_api_runs_on_its_worker_and_survives_its_restart(
        clip: Path, tmp_path: Path) -> None:
    sid = next(f"api-{i}" for i in range(100) if worker_of(f"api-{i}", 2) == 1)
    port = free_port()
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"http": {"port": port}, "api": {"allow_file_sources": True},
                               "detection": {"preset": "fast", "plates": False, "heads": False,
                                             "providers": ["cpu"]},
                               "events": {"jsonl": {"path": str(tmp_path / "events.jsonl")}}}))
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "run", "--config", str(cfg), "--workers",
                             "2", "--insecure-no-auth"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"

    def where() -> dict[str, str]:
        status, body = _get(base + "/api/streams")
        return {s["id"]: s["worker"] for s in json.loads(body)["streams"]} if status == 200 else {}

    try:
        wait_for(lambda: _get(base + "/readyz")[0] == 200, timeout=120, what="the supervisor to be ready")
        status, body = _post(base + "/api/streams", {"id": sid, "source": {"type": "file", "path": str(clip),
                                                                            "loop": True}})
        assert status == 201, body
        assert where() == {sid: "worker-1"}
        again = {"id": sid, "source": {"type": "file", "path": str(clip)}}
        status, body = _post(base + "/api/streams", again)
        assert status == 409, "the owner worker refuses the same id twice"
        procs = json.loads(_get(base + "/readyz")[1])["processes"]
        os.kill(next(p["pid"] for p in procs if p["name"] == "worker-1"), signal.SIGKILL)
        wait_for(lambda: restarts(base, "worker-1") >= 1, what="the worker to be restarted")
        wait_for(lambda: where() == {sid: "worker-1"}, timeout=90, what="the added stream back on its worker")
        status, body = _get(f"{base}/api/streams/{sid}")
        assert status == 200 and json.loads(body)["id"] == sid
    finally:
        err = stop_run(proc, 60)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.parametrize(("args", "doc", "message"), [
    (["--workers", "0"], {}, "--workers must be at least 1, got 0"),
    ([], {"workers": 0}, "workers: Input should be greater than or equal to 1"),
    ([], {"workers": "many"}, "workers: Input should be a valid integer"),
])
def test_a_bad_worker_count_is_refused_with_the_fix(tmp_path: Path, args: list[str], doc: dict,
                                                    message: str) -> None:
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(doc))
    r = subprocess.run([sys.executable, "-m", "stream.cli", "run", "--config", str(cfg), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr


@pytest.mark.parametrize(("cpu_max", "expected"), [("max 100000\n", None), ("200000 100000\n", 2),
                                                   ("150000 100000\n", 2), ("50000 100000\n", 1),
                                                   ("garbage", None)])
def test_the_default_worker_count_respects_a_container_cpu_limit(tmp_path: Path, cpu_max: str,
                                                                 expected: int | None) -> None:
    from stream.live.supervisor import usable_cores

    f = tmp_path / "cpu.max"
    f.write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(f) == (affinity if expected is None else min(affinity, expected))
    assert usable_cores(tmp_path / "missing") == affinity


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(log=tmp_path_factory.mktemp("tansu") / "tansu.log").start()
    yield b
    b.stop()


def topic_so_far(bootstrap: str, topic: str, timeout: float = 30.0) -> list[bytes]:
    """Every record the topic holds now (up to its end offsets when asked), even while more arrive."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning()
        end = consumer.end_offsets(parts)
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(p) < end[p] for p in parts):
            assert time.monotonic() < deadline, f"topic {topic} not read to its end in {timeout} s"
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(r.value for r in records)
        return out
    finally:
        consumer.close()


def test_events_of_every_worker_reach_kafka_through_one_delivery_process_that_survives_sigkill(
        clip: Path, tmp_path: Path, broker: Broker) -> None:
    ids = [next(f"ev-{i}" for i in range(100) if worker_of(f"ev-{i}", 2) == w) for w in (0, 1)]
    topic = f"wk-{os.getpid()}-{free_port()}"
    broker.create_topic(topic, partitions=3)
    port = free_port()
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({
        "streams": [{"id": i, "source": {"type": "file", "path": str(clip), "loop": True}} for i in ids],
        "http": {"port": port}, "detection": {"preset": "fast", "plates": False, "heads": False,
                                              "providers": ["cpu"]},
        "events": {"source": "/wk-test", "kafka": {"bootstrap_servers": [broker.bootstrap], "topic": topic,
                                                   "connect_timeout_s": 2},
                   "spool": {"dir": str(tmp_path / "spool")}}}))
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "run", "--config", str(cfg), "--workers",
                             "2", "--insecure-no-auth"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"

    def events() -> list[dict]:
        return [json.loads(v) for v in topic_so_far(broker.bootstrap, topic)]

    try:
        wait_for(lambda: _get(base + "/readyz")[0] == 200, timeout=120, what="the supervisor to be ready")
        wait_for(lambda: {e["subject"] for e in events()} >= set(ids), timeout=60,
                 what="events of both workers' streams in Kafka")
        procs = {p["name"]: p for p in json.loads(_get(base + "/readyz")[1])["processes"]}
        assert procs["events"]["up"], procs
        fams = list(text_string_to_metric_families(_get(base + "/metrics")[1]))
        assert any(s.labels.get("worker") == "events" for f in fams for s in f.samples), \
            "the delivery process's metrics are merged"
        os.kill(procs["events"]["pid"], signal.SIGKILL)
        wait_for(lambda: restarts(base, "events") >= 1, timeout=60, what="the delivery process restarted")
        seen = len(events())
        wait_for(lambda: len(events()) > seen + 4, timeout=60, what="events delivered after the restart")
    finally:
        err = stop_run(proc, 90)
    assert proc.returncode == 0, err[-3000:]
    by_source: dict[str, set[int]] = {}
    for e in events():
        by_source.setdefault(e["source"], set()).add(int(e["sequence"]))
    assert set(by_source) == {"/wk-test/worker-0", "/wk-test/worker-1"}, "each worker numbers its own events"
    for source, seqs in by_source.items():
        missing = set(range(1, max(seqs) + 1)) - seqs
        assert not missing, f"{source}: {len(missing)} accepted event(s) lost, e.g. {sorted(missing)[:5]}"
    left = [p for p in (tmp_path / "spool").rglob(f"*{SUFFIX}") if p.stat().st_size]
    assert not left, f"the spools were not drained at stop: {left}"


def test_an_answer_read_from_a_connection_given_up_on_never_reaches_a_newer_frame(tmp_path: Path) -> None:
    """After a reconnect, slot numbers are reused for new frames: boxes the old connection still
    delivered must not be applied to the frame now in that slot (it would be painted with another
    frame's boxes and could show a face)."""
    stage = RemoteStage(str(tmp_path / "none.sock"), KEY, SlotWriter(tmp_path, "t-w0-"), Metrics())
    old, new = object(), object()
    img = np.zeros((8, 8, 3), np.uint8)
    job = Job(Frame("s", 1, img, 0.0, 0.0), deadline=float("inf"))
    stage._conn, stage._pending = new, {0: job}  # type: ignore[assignment]
    boxes = Detections(boxes=np.array([[1, 1, 2, 2]], np.float32), scores=np.ones(1, np.float32),
                       labels=("face",))
    stage._answers(old, [(0, boxes, None, None)])  # type: ignore[arg-type]
    assert not job.done and stage._pending == {0: job}
    stage._answers(new, [(0, boxes, None, None)])  # type: ignore[arg-type]
    assert job.done and job.detections is boxes
