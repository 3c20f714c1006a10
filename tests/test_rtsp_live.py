"""The live pipeline against real RTSP servers: cameras in, redacted streams pushed to a relay and read back.

Cameras are GStreamer's RTSP server serving real H.264 clips; the pipeline pushes to a relay on
a real RTSP server and a PyAV reader pulls the republished stream, as a viewer would.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import av
import av.error
import numpy as np
import pytest
from helpers import ROOT, laplacian_var
from live_helpers import Hangs, NoFaces, counter, wait_for

from stream.config import PipelineConfig, parse_config
from stream.detect.yunet import YuNet
from stream.live.pipeline import Pipeline
from stream.live.service import detector_factory_for
from stream.sim.server import RtspServer, gst_rtsp_available, transcode_clip

pytestmark = pytest.mark.skipif(not gst_rtsp_available(), reason="GStreamer RTSP server not installed "
                                "(apt-get install gir1.2-gst-rtsp-server-1.0 python3-gi ...; see .ci/run)")

TALKING = ROOT / ".samples" / "talking-face" / "WolfgangLanger_Pexels.mp4"
SECRET = "s3cr3t-pw"
FAST_RECONNECT = {"initial_s": 0.2, "max_s": 1.0, "jitter": 0.1}


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real talking face, 640x360 at 25 fps, key frame every second: the camera with a face."""
    if not TALKING.exists():
        pytest.fail(f"{TALKING} missing: run `python -m stream.samples fetch` (deploy/setup.sh does)")
    dst = tmp_path_factory.mktemp("rtsp") / "face25.mp4"
    return transcode_clip(TALKING, dst, 640, 360, 25, max_seconds=4)


@pytest.fixture(scope="module")
def yunet() -> YuNet:
    return YuNet(threshold=0.6, providers=("cpu",))


def read_frames(url: str, n: int, timeout: float = 30.0) -> list[np.ndarray]:
    """Pull ``n`` frames from an RTSP URL, retrying the open until the publisher is there."""
    frames: list[np.ndarray] = []

    def attempt() -> bool:
        try:
            with av.open(url, options={"rtsp_transport": "tcp"}, timeout=(5, 5)) as c:
                for f in c.decode(video=0):
                    frames.append(f.to_ndarray(format="bgr24"))
                    if len(frames) >= n:
                        return True
        except (av.error.FFmpegError, OSError):
            return False
        return len(frames) >= n

    wait_for(attempt, timeout=timeout, what=f"{n} frames from {url}")
    return frames


def stream_cfg(sid: str, src: str, out: str | None = None, **source: object) -> dict:
    s: dict = {"id": sid, "source": {"type": "rtsp", "url": src, "reconnect": FAST_RECONNECT,
                                     "open_timeout_s": 3, "read_timeout_s": 3, **source}}
    if out:
        s["outputs"] = [{"type": "rtsp", "url": out, "reconnect": FAST_RECONNECT}]
    return s


def pipeline_cfg(*streams: dict, **extra: object) -> PipelineConfig:
    detection = {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"]}
    return parse_config({"streams": list(streams), "detection": detection, **extra})


@pytest.fixture
def release() -> Iterator[threading.Event]:
    ev = threading.Event()
    yield ev
    ev.set()


def test_face_is_obscured_in_the_republished_stream(face_clip: Path, yunet: YuNet) -> None:
    with RtspServer(cameras={"/cam": face_clip}, relays=["/redacted"]) as server:
        source = read_frames(server.url("/cam"), 10)
        found = [yunet([f])[0] for f in source]
        assert all(len(d) for d in found), "the camera clip must show a detectable face"
        face = tuple(int(v) for v in found[0].boxes[int(np.argmax(found[0].scores))])

        cfg = pipeline_cfg(stream_cfg("cam", server.url("/cam"), server.url("/redacted")))
        p = Pipeline(cfg, detector_factory_for(cfg))
        p.start()
        try:
            got = read_frames(server.url("/redacted"), 40, timeout=60)
        finally:
            p.stop()
    assert got[0].shape == source[0].shape
    for i, frame in enumerate(got):
        faces = yunet([frame])[0]
        assert len(faces) == 0, f"received frame {i}: a face is visible at {faces.boxes.tolist()}"
        before, after = laplacian_var(source[0], face, 3), laplacian_var(frame, face, 3)
        assert after < 0.3 * before, f"received frame {i}: face region energy {before:.0f} -> {after:.0f}"
    assert counter(p.metrics, "frames_blanked", stream="cam", reason="deadline") == 0


def test_hung_detector_blanks_the_republished_stream(face_clip: Path, release: threading.Event) -> None:
    hung = Hangs(release)
    with RtspServer(cameras={"/cam": face_clip}, relays=["/redacted"]) as server:
        cfg = pipeline_cfg(stream_cfg("cam", server.url("/cam"), server.url("/redacted")),
                           fail_closed={"max_latency_ms": 300})
        p = Pipeline(cfg, lambda: hung)
        p.start()
        try:
            got = read_frames(server.url("/redacted"), 25, timeout=60)
        finally:
            p.stop()
    assert all(int(f.max()) <= 16 for f in got), "a frame with picture content left a hung pipeline"
    blanked = sum(counter(p.metrics, "frames_blanked", stream="cam", reason=r)
                  for r in ("detector_hung", "detector_unavailable", "deadline"))
    assert blanked >= len(got)


def test_camera_restart_reconnects_and_other_streams_keep_running(face_clip: Path) -> None:
    with RtspServer(cameras={"/a": face_clip}) as cam_a, \
            RtspServer(cameras={"/b": face_clip}, relays=["/out-b"]) as cam_b:
        cfg = pipeline_cfg(stream_cfg("a", cam_a.url("/a")),
                           stream_cfg("b", cam_b.url("/b"), cam_b.url("/out-b")))
        det = NoFaces()
        p = Pipeline(cfg, lambda: det)
        p.start()
        try:
            m = p.metrics
            wait_for(lambda: min(counter(m, "frames_in", stream=s) for s in "ab") > 10,
                     what="both cameras delivering")
            cam_a.stop()
            wait_for(lambda: p.streams["a"].state == "down", timeout=15, what="stream a marked down")
            b_during = counter(m, "frames_in", stream="b")
            wait_for(lambda: counter(m, "frames_in", stream="b") > b_during + 25, what="stream b going on")
            a_before = counter(m, "frames_in", stream="a")
            assert counter(m, "reconnects", stream="a", side="source") >= 1
            cam_a.start()  # same port: the pipeline finds it again at the same URL
            wait_for(lambda: counter(m, "frames_in", stream="a") > a_before + 10, timeout=30,
                     what="stream a resuming after the camera came back")
            assert p.streams["a"].state == "up"
            assert p.streams["b"].state == "up"
            assert counter(m, "frames_blanked", stream="b", reason="deadline") == 0
        finally:
            p.stop()


def test_camera_coming_back_at_another_resolution(face_clip: Path, tmp_path: Path) -> None:
    small = transcode_clip(face_clip, tmp_path / "small.mp4", 320, 180, 25)
    with RtspServer(cameras={"/cam": face_clip}, relays=["/out"]) as server:
        cfg = pipeline_cfg(stream_cfg("cam", server.url("/cam"), server.url("/out")))
        det = NoFaces()
        p = Pipeline(cfg, lambda: det)
        p.start()
        try:
            assert read_frames(server.url("/out"), 3)[0].shape == (360, 640, 3)
            server.cameras["/cam"] = small
            server.restart()  # the camera (and the relay with it) comes back, now at 320x180
            wait_for(lambda: p.streams["cam"].size == (320, 180), timeout=30, what="the new size")
            assert read_frames(server.url("/out"), 3, timeout=40)[-1].shape == (180, 320, 3)
            assert p.streams["cam"].state == "up"
        finally:
            p.stop()


@pytest.fixture
def garbage_server() -> Iterator[int]:
    """A TCP server that answers every connection with bytes that are not RTSP."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        rng = np.random.default_rng(0)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    conn.recv(4096)
                    conn.sendall(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(2)
    srv.close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never says a word (a hung camera)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv.getsockname()[1]
    srv.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_sources_get_clear_errors_and_the_good_stream_runs(
        face_clip: Path, garbage_server: int, silent_server: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="stream")
    with RtspServer(cameras={"/cam": face_clip, "/locked": face_clip}, auth=("viewer", SECRET)) as server:
        good = server.url("/cam", "viewer", SECRET)
        cfg = pipeline_cfg(
            stream_cfg("good", good),
            stream_cfg("unreachable", f"rtsp://127.0.0.1:{free_port()}/x"),
            stream_cfg("wrong-pass", server.url("/locked", "viewer", "not-the-" + SECRET)),
            stream_cfg("no-such-path", server.url("/nothing-here", "viewer", SECRET)),
            stream_cfg("garbage", f"rtsp://viewer:{SECRET}@127.0.0.1:{garbage_server}/cam"),
            stream_cfg("silent", f"rtsp://127.0.0.1:{silent_server}/cam", open_timeout_s=1),
        )
        det = NoFaces()
        p = Pipeline(cfg, lambda: det)
        p.start()
        try:
            m = p.metrics
            expected = {"unreachable": "connection refused", "wrong-pass": "refused the credentials",
                        "no-such-path": "no such stream", "garbage": "not a valid RTSP",
                        "silent": "no answer within 1 s"}
            for sid in expected:
                wait_for(lambda sid=sid: p.streams[sid].state == "down" and p.streams[sid].error,
                         timeout=30, what=f"{sid} marked down")
            wait_for(lambda: counter(m, "frames_published", stream="good") > 25, what="the good stream")
            for sid, words in expected.items():
                err = p.streams[sid].error or ""
                assert words in err, f"{sid}: {err}"
                assert SECRET not in err
            wait_for(lambda: counter(m, "reconnects", stream="unreachable", side="source") >= 2,
                     what="retries with backoff")
            assert p.streams["good"].state == "up"
            assert counter(m, "source_errors", stream="wrong-pass", kind="auth") >= 1
            metrics_text = m.render().decode()
        finally:
            p.stop()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in logged and SECRET not in metrics_text
    assert "rtsp://***@127.0.0.1" in logged
    # one log line per incident, not one per retry
    assert sum("unreachable" in r.getMessage() and "connection refused" in r.getMessage()
               for r in caplog.records) == 1


def test_output_reconnects_when_the_media_server_comes_back(face_clip: Path) -> None:
    with RtspServer(cameras={"/cam": face_clip}) as camera, RtspServer(relays=["/out"]) as media:
        cfg = pipeline_cfg(stream_cfg("cam", camera.url("/cam"), media.url("/out")))
        det = NoFaces()
        p = Pipeline(cfg, lambda: det)
        p.start()
        try:
            m = p.metrics
            read_frames(media.url("/out"), 5)
            media.stop()
            wait_for(lambda: counter(m, "frames_dropped", stream="cam", reason="output_down") > 0,
                     what="frames dropped while the media server is away")
            assert counter(m, "frames_in", stream="cam") > 0
            media.start()
            frames = read_frames(media.url("/out"), 10, timeout=40)
            assert len(frames) == 10
            assert counter(m, "reconnects", stream="cam", side="output") >= 1
        finally:
            p.stop()
