"""The loopback RTSP server (stream.sim): looping cameras, A/V media files, credentials, the publish/play
relay, restarts.

These run the real GStreamer server under the system Python and read it with PyAV, as the pipeline
and the load tests do.
"""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from audio_material import HAVE_ESPEAK, Scene, make_scene, read_av, segment_energy, write_av_clip
from helpers import make_clip

from stream.samples import SampleError, sample_path
from stream.sim.server import (
    APT_PACKAGES,
    SCRIPT,
    SYSTEM_PYTHON,
    RtspServer,
    gst_rtsp_available,
    transcode_clip,
)

SAMPLE = Path(__file__).resolve().parents[1] / ".samples" / "talking-face" / "talking-face_640x360_5s.mp4"
FPS = 25
CLIP_SECONDS = 2
CLIP_FRAMES = FPS * CLIP_SECONDS
TICKS_PER_FRAME = 90_000 // FPS  # RTP video clock
USER, PASSWORD = "viewer", "pa:ss w/rd"  # characters that need quoting in a URL
MEDIA_SECONDS = 9.0
MEDIA = {  # mount -> (file, PyAV encoder, codec a reader decodes, its sample rate)
    "aac": ("scene.mp4", "aac", "aac", 48000),
    "opus": ("scene.mkv", "libopus", "opus", 48000),
    "pcmu": ("scene.mov", "pcm_mulaw", "pcm_mulaw", 8000),
}
MAX_AV_OFFSET_S = 0.060
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is missing (apt-get install espeak-ng)")

pytestmark = pytest.mark.skipif(
    not gst_rtsp_available(),
    reason=f"/usr/bin/python3 cannot import GStreamer's RTSP server (apt-get install {APT_PACKAGES})",
)


def camera_source(work: Path) -> Path:
    """The talking-face cut; else the fetched original (`python -m stream.samples fetch`); else,
    so that the server is still tested, a synthetic clip."""
    if SAMPLE.is_file():
        return SAMPLE
    try:
        return sample_path("talking-face")
    except SampleError:
        return make_clip(work / "synthetic.mp4", frames=CLIP_FRAMES, width=320, height=240, fps=FPS).path


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 s at 25 fps, 320x180, a keyframe every second: 50 frames, loop after loop."""
    work = tmp_path_factory.mktemp("sim")
    return transcode_clip(camera_source(work), work / "cam.mp4", 320, 180, FPS, max_seconds=CLIP_SECONDS)


@pytest.fixture(scope="module")
def camera_server(clip: Path) -> Iterator[RtspServer]:
    with RtspServer(cameras={"/cam": clip}, auth=(USER, PASSWORD)) as server:
        yield server


@pytest.fixture(scope="module")
def relay_server() -> Iterator[RtspServer]:
    with RtspServer(relays=["/live"]) as server:
        yield server


@pytest.fixture(scope="module")
def av_scene() -> Scene:
    """9 s: two utterances and the siren between four sync markers (0.6, 3.2, 6.0, 8.6 s)."""
    return make_scene(MEDIA_SECONDS)


@pytest.fixture(scope="module")
def media_server(av_scene: Scene, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RtspServer]:
    work = tmp_path_factory.mktemp("media")
    files = {f"/{mount}": write_av_clip(work / name, av_scene, size=(320, 180), fps=FPS, audio_codec=encoder)
             for mount, (name, encoder, _codec, _rate) in MEDIA.items()}
    with RtspServer(media=files, auth=(USER, PASSWORD)) as server:
        yield server


def open_rtsp(url: str, transport: str = "tcp", deadline_s: float = 15.0) -> av.container.InputContainer:
    """Open an RTSP URL, retrying while it is not there yet (a relay path 404s until its publisher's
    first keyframe) and, for UDP, while GStreamer's server answers SETUP with 5XX (it could not set
    up the UDP transport, e.g. bind an RTP/RTCP port pair while the rest of the suite holds many UDP
    sockets; seen once in a full run, never alone)."""
    deadline = time.monotonic() + deadline_s
    transient: tuple[type[BaseException], ...] = (av.error.HTTPNotFoundError, ConnectionRefusedError)
    if transport == "udp":
        transient += (av.error.HTTPServerError,)
    while True:
        try:
            return av.open(url, options={"rtsp_transport": transport}, timeout=(10.0, 5.0))
        except transient:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def read(url: str, count: int, transport: str = "tcp") -> tuple[list[int | None], list[np.ndarray]]:
    """The pts and grey pixels of the first `count` frames a reader gets from `url`."""
    pts: list[int | None] = []
    images: list[np.ndarray] = []
    with open_rtsp(url, transport) as container:
        for frame in container.decode(video=0):
            pts.append(frame.pts)
            images.append(frame.to_ndarray(format="gray"))
            if len(pts) == count:
                break
    return pts, images


def square_x(i: int) -> int:
    return 20 + (i * 8) % 240


class Publisher(threading.Thread):
    """Publishes a white 40x40 square moving right on black, at 25 fps, until stopped.

    The square's left edge in frame i is square_x(i) and its top edge is 100, so a reader can check
    what it gets.
    """

    def __init__(self, url: str, width: int = 320, height: int = 240, max_frames: int = 500) -> None:
        super().__init__(daemon=True)
        self.url, self.width, self.height, self.max_frames = url, width, height, max_frames
        self.stop_event = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with av.open(self.url, "w", format="rtsp", options={"rtsp_transport": "tcp"}) as out:
                stream = out.add_stream("libx264", rate=FPS, options={"tune": "zerolatency",
                                                                      "preset": "ultrafast"})
                stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
                stream.codec_context.gop_size = 10  # late readers start at a keyframe
                start = time.monotonic()
                for i in range(self.max_frames):
                    image = np.zeros((self.height, self.width, 3), np.uint8)
                    image[100:140, square_x(i):square_x(i) + 40] = 255
                    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                    frame.pts, frame.time_base = i, Fraction(1, FPS)
                    out.mux(stream.encode(frame))
                    self.sent += 1
                    # Real-time pacing, as a camera; the event ends it early.
                    if self.stop_event.wait(max(0.0, start + (i + 1) / FPS - time.monotonic())):
                        break
                out.mux(stream.encode(None))
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)
        assert not self.is_alive(), "publisher did not stop"
        assert self.error is None, f"publisher failed: {self.error!r}"


def check_squares(images: list[np.ndarray]) -> None:
    """Every frame shows the 40x40 square at y=100 and at one of the published x positions, and
    consecutive frames move it one step (8 px) right."""
    lefts = []
    for image in images:
        ys, xs = np.nonzero(image > 128)
        assert len(xs), "no square in a relayed frame"
        assert abs(int(ys.min()) - 100) <= 2 and abs(int(ys.max()) - 139) <= 2
        assert abs(int(xs.max()) - int(xs.min()) - 39) <= 2
        left = int(xs.min())
        assert min(abs(left - square_x(i)) for i in range(30)) <= 2, f"square at x={left}"
        lefts.append(left)
    steps = [(b - a) % 240 for a, b in itertools.pairwise(lefts)]
    assert sum(abs(step - 8) <= 2 for step in steps) >= 0.9 * len(steps), steps


def test_transcode_clip_is_constant_rate_without_b_frames(clip: Path, tmp_path: Path) -> None:
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (320, 180)
        assert stream.average_rate == FPS
        assert stream.codec_context.profile == "Main"
        packets = [p for p in container.demux(stream) if p.size]
    assert len(packets) == CLIP_FRAMES
    assert [p.pts for p in packets] == [p.dts for p in packets] == sorted(p.pts for p in packets)
    assert [i for i, p in enumerate(packets) if p.is_keyframe] == list(range(0, CLIP_FRAMES, FPS))
    assert transcode_clip(tmp_path / "absent.mp4", clip, 64, 64, 5) == clip  # cached: not redone
    with pytest.raises(ValueError, match="even"):
        transcode_clip(clip, tmp_path / "odd.mp4", 321, 180, FPS)


def test_camera_streams_in_real_time_across_loop_points(camera_server: RtspServer) -> None:
    count = int(CLIP_FRAMES * 1.6)
    pts, images = read(camera_server.url("/cam", USER, PASSWORD), count)
    assert len(images) == count
    assert images[0].shape == (180, 320)
    # FFmpeg leaves the pts of the very first frame unset; the rest step one frame each, loop
    # points included.
    known = [p for p in pts if p is not None]
    assert len(known) >= count - 1
    steps = np.diff(known)
    assert (steps > 0).all()
    assert (steps == TICKS_PER_FRAME).mean() >= 0.95, steps
    # The file is forwarded as it is, so a frame decodes to the same pixels one loop later.
    assert np.array_equal(images[10], images[10 + CLIP_FRAMES])
    assert not np.array_equal(images[10], images[10 + CLIP_FRAMES // 2])


def test_camera_over_udp(camera_server: RtspServer) -> None:
    _, images = read(camera_server.url("/cam", USER, PASSWORD), 5, transport="udp")
    assert len(images) == 5


@pytest.mark.parametrize(("user", "password"), [(USER, "wrong"), ("nobody", PASSWORD), (None, None)])
def test_camera_refuses_wrong_credentials(camera_server: RtspServer, user: str | None,
                                          password: str | None) -> None:
    with pytest.raises(av.error.HTTPUnauthorizedError):
        av.open(camera_server.url("/cam", user, password), options={"rtsp_transport": "tcp"},
                timeout=(10.0, 5.0))


def test_relay_forwards_the_publisher_to_readers(relay_server: RtspServer) -> None:
    url = relay_server.url("/live")
    publisher = Publisher(url)
    publisher.start()
    try:
        results: dict[int, tuple[list[int | None], list[np.ndarray]]] = {}
        readers = [threading.Thread(target=lambda k=k: results.__setitem__(k, read(url, 50)))
                   for k in range(2)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=30)
    finally:
        publisher.finish()
    assert sorted(results) == [0, 1], "a reader got no frames"
    for pts, images in results.values():
        assert len(images) == 50
        assert images[0].shape == (240, 320)
        check_squares(images)
        known = [p for p in pts if p is not None]
        assert (np.diff(known) > 0).all()


READER_HOLD = """
import sys
sys.path.insert(0, sys.argv[1])
import rtsp_server as rs

MS = rs.MS
class Clock:
    now = 0
    def get_time(self):
        return self.now
class Buf:
    def __init__(self):
        self.pts = self.dts = None
    def get_size(self):
        return 1
    def copy_region(self, *args):
        return Buf()
class Src:
    def __init__(self):
        self.clock, self.pushed = Clock(), []
    def get_clock(self):
        return self.clock
    def get_base_time(self):
        return 0
    def push_buffer(self, buf):
        self.pushed.append((self.clock.now, buf.pts))
src = Src()
reader = rs.Reader(src, caps=None, live=True)
# the first keyframe (producer time 0) reaches the relay 50 ms late, the frames after it 2 ms late
for i, late in enumerate([50, 2, 2, 3, 2]):
    src.clock.now = (40 * i + late) * MS
    reader.push(rs.Unit(Buf(), None, 40 * i * MS, 40 * i * MS, i == 0))
print(" ".join(str((pts - arrived) // MS) for arrived, pts in src.pushed))
print(" ".join(str(pts // MS) for _, pts in src.pushed))
"""


def test_a_relay_holds_no_frame_for_a_late_first_keyframe() -> None:
    """A relay's reader media releases each frame at its timestamp. Those are the publisher's times
    shifted by the least delay seen so far, not by the first keyframe's: a keyframe that came 50 ms
    late (a large picture) must not hold every later frame 48 ms longer, for the whole connection
    (the load harness's relay hop measured 60 or 100 ms from one connection to the next)."""
    out = subprocess.run([SYSTEM_PYTHON, "-c", READER_HOLD, str(SCRIPT.parent)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    held, pts = ([int(v) for v in line.split()] for line in out.stdout.split("\n")[:2])
    # the frame after the keyframe waits only until just after the keyframe's time (times never go
    # back); from then on no frame waits, and they keep the publisher's spacing
    assert held == [0, 9, 0, -1, 0], f"ms each frame waited after it arrived: {held}"
    assert pts == [50, 51, 82, 122, 162]


def test_relay_publisher_reconnects_at_another_size(relay_server: RtspServer) -> None:
    url = relay_server.url("/live")
    first = Publisher(url, 320, 240)
    first.start()
    try:
        old_reader = open_rtsp(url)
        frames = old_reader.decode(video=0)
        assert next(frames).width == 320
    finally:
        first.finish()
    # A reader of a publisher that left reaches the end of its stream (RTCP BYE), not a hang.
    deadline = time.monotonic() + 10
    ended = False
    try:
        while time.monotonic() < deadline:
            next(frames)
    except (StopIteration, av.error.EOFError):
        ended = True
    finally:
        old_reader.close()
    assert ended, "the reader of the old publisher still gets frames"

    second = Publisher(url, 256, 192)
    second.start()
    try:
        _, images = read(url, 10)
    finally:
        second.finish()
    assert images[0].shape == (192, 256)
    check_squares(images)


def test_restart_serves_the_same_url(clip: Path) -> None:
    with RtspServer(cameras={"/cam": clip}) as server:
        url = server.url("/cam")
        port = server.port
        assert len(read(url, 3)[1]) == 3
        server.restart()
        assert server.port == port
        assert server.url("/cam") == url
        assert len(read(url, 3)[1]) == 3
    assert not server.running


def test_start_failure_reports_the_server_error(tmp_path: Path) -> None:
    not_mp4 = tmp_path / "not.mp4"
    not_mp4.write_bytes(b"this is not a video")
    with pytest.raises(RuntimeError, match=r"exited before READY[\s\S]*cannot play"):
        RtspServer(cameras={"/cam": not_mp4}).start()
    with pytest.raises(RuntimeError, match="apt-get install"):
        RtspServer(relays=["/live"], python="/nonexistent/python3").start()


@needs_espeak
@pytest.mark.parametrize("mount", sorted(MEDIA))
def test_media_serves_video_and_audio_in_sync(media_server: RtspServer, av_scene: Scene, mount: str) -> None:
    _name, _encoder, codec, rate = MEDIA[mount]
    capture = read_av(media_server.url(f"/{mount}", USER, PASSWORD), options={"rtsp_transport": "tcp"},
                      max_seconds=MEDIA_SECONDS + 1, timeout=(10.0, 5.0))
    assert (capture.video_codec, capture.audio_codec, capture.rate) == ("h264", codec, rate)
    # The whole file, once (FFmpeg leaves the first frame's pts unset, so that one is not kept).
    assert round(MEDIA_SECONDS * FPS) - 2 <= len(capture.frames) <= round(MEDIA_SECONDS * FPS)
    # The reader's clock starts at the file's start, so the flashes fall where the file has them.
    assert capture.flashes() == pytest.approx(av_scene.markers, abs=0.5 / FPS)
    offsets = capture.offsets()
    assert len(offsets) == len(av_scene.markers), (capture.flashes(), capture.beeps())
    assert all(abs(o) <= MAX_AV_OFFSET_S for o in offsets), offsets
    # The audio is the file's: speech and siren loud where the scene has them.
    start = capture.audio_start
    shifted = [(a - start, b - start) for a, b in av_scene.speech + av_scene.siren]
    levels = segment_energy(capture.audio, capture.rate, shifted)
    assert all(level > -30 for level in levels), levels


@needs_espeak
def test_media_gives_each_reader_the_file_from_its_start(media_server: RtspServer, av_scene: Scene) -> None:
    url = media_server.url("/aac", USER, PASSWORD)
    with open_rtsp(url) as first:
        deadline = time.monotonic() + 20
        for frame in first.decode(video=0):
            if frame.time is not None and frame.time > av_scene.markers[0] + 0.5:
                break
            assert time.monotonic() < deadline, "the first reader gets no frames"
        # A shared pipeline would give the second reader the first one's position (past the flash).
        second = read_av(url, options={"rtsp_transport": "tcp"}, max_seconds=av_scene.markers[0] + 0.5,
                         timeout=(10.0, 5.0))
    assert second.flashes() == pytest.approx(av_scene.markers[:1], abs=0.5 / FPS)
    assert second.beeps() == pytest.approx(av_scene.markers[:1], abs=MAX_AV_OFFSET_S)


@needs_espeak
def test_media_needs_the_camera_credentials(media_server: RtspServer) -> None:
    with pytest.raises(av.error.HTTPUnauthorizedError):
        av.open(media_server.url("/aac"), options={"rtsp_transport": "tcp"}, timeout=(10.0, 5.0))


def test_media_start_failure_reports_the_reason(tmp_path: Path, clip: Path) -> None:
    junk = tmp_path / "junk.mkv"
    junk.write_bytes(b"this is not a video")
    with pytest.raises(RuntimeError, match=r"exited before READY[\s\S]*cannot demux"):
        RtspServer(media={"/av": junk}).start()
    with pytest.raises(RuntimeError, match=r"exited before READY[\s\S]*\.mkv"):
        RtspServer(media={"/av": tmp_path / "clip.avi"}).start()
    # A video without audio is served as video only; the camera clip is one.
    with RtspServer(media={"/av": clip}) as server, open_rtsp(server.url("/av")) as container:
        assert [s.type for s in container.streams] == ["video"]
        assert next(container.decode(video=0)).width == 320
