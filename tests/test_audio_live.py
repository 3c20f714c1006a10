"""Audio through the live pipeline: an RTSP camera with sound in, a redacted RTSP stream with sound out.

The camera is GStreamer's RTSP server playing a clip made here (espeak-ng speech, a siren, street
noise, a face, and a flash with a beep every few seconds); the pipeline publishes to FFmpeg's own
RTSP server in listen mode (the receiving end of an ANNOUNCE/RECORD, as a media server is), and
the test decodes what arrived: speech must be silent, the siren audible, and each flash must come
with its beep (lip-sync) within 100 ms.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from audio_material import HAVE_ESPEAK, Capture, Scene, make_scene, read_av, segment_energy, write_av_clip
from kafka_broker import free_port
from live_helpers import counter, wait_for

from stream.config import parse_config
from stream.core.observe import Observer
from stream.live.pipeline import Pipeline
from stream.live.service import detector_factory_for
from stream.sim.server import RtspServer, gst_rtsp_available

pytestmark = [
    pytest.mark.skipif(not gst_rtsp_available(), reason="GStreamer RTSP server missing (deploy/setup.sh)"),
    pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng missing: apt-get install espeak-ng"),
]

SECONDS = 9.0


@pytest.fixture(scope="module")
def scene() -> Scene:
    return make_scene(SECONDS, seed=5)


MOUNTS = {"/cam": ("scene.mp4", "aac"), "/pcmu": ("scene.mov", "pcm_mulaw"),
          "/opus": ("scene.mkv", "libopus")}
"""a camera per audio codec cameras send: AAC, G.711 mu-law (8 kHz), Opus"""


@pytest.fixture(scope="module")
def camera(scene: Scene, tmp_path_factory: pytest.TempPathFactory) -> RtspServer:
    work = tmp_path_factory.mktemp("audio-live")
    media = {mount: write_av_clip(work / name, scene, size=(320, 180), audio_codec=codec)
             for mount, (name, codec) in MOUNTS.items()}
    with RtspServer(media=media) as server:
        yield server


class Listener:
    """FFmpeg's RTSP server in listen mode on a free port: takes one publisher and decodes it."""

    def __init__(self, seconds: float) -> None:
        self.url = f"rtsp://127.0.0.1:{free_port()}/out"
        self.capture: Capture | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(seconds,), daemon=True)

    def start(self) -> Listener:
        self._thread.start()
        return self

    def _run(self, seconds: float) -> None:
        try:
            self.capture = read_av(self.url, options={"rtsp_flags": "listen", "listen_timeout": "30"},
                                   max_seconds=seconds)
        except BaseException as e:  # reported by the test
            self.error = e

    def join(self, timeout: float) -> Capture:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the listener never got the whole stream"
        if self.error is not None:
            raise self.error
        assert self.capture is not None
        return self.capture


class Speech(Observer):
    """The speech segments a stream reports (what becomes ``audio.speech`` events)."""

    def __init__(self) -> None:
        self.segments: list[tuple[float, float, float, str]] = []

    def speech(self, stream_id: str, started: float, ended: float, probability: float, policy: str) -> None:
        self.segments.append((started, ended, probability, policy))


def run_stream(camera: RtspServer, out_url: str, audio: dict, observer: Observer | None = None,
               mount: str = "/cam") -> Pipeline:
    cfg = parse_config({
        "streams": [{"id": "cam", "source": {"type": "rtsp", "url": camera.url(mount)},
                     "outputs": [{"type": "rtsp", "url": out_url}], "audio": audio}],
        "detection": {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"]},
    })
    p = Pipeline(cfg, detector_factory_for(cfg))
    if observer is not None:
        p.observers.append(observer)
    p.start()
    return p


def scene_to_audio(capture: Capture, scene: Scene) -> Callable[[float], float]:
    """Maps a time of the scene to a time in ``capture.audio``.

    The output starts wherever the pipeline's first frame did (the camera plays from its start as
    soon as it is asked), so the two are lined up by cross-correlating the sound: the ambient noise,
    the siren and the beeps that came through unchanged make one sharp peak.
    """
    a, b = capture.audio.astype(np.float64), scene.samples.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    corr = np.fft.irfft(np.fft.rfft(a, n) * np.conj(np.fft.rfft(b, n)), n)
    lag = int(np.argmax(corr))
    lag = lag - n if lag > n // 2 else lag  # capture index = scene index + lag
    return lambda t: t + lag / capture.rate


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("mount", "out_codec"), [("/cam", "aac"), ("/pcmu", "aac"), ("/opus", "opus")],
                         ids=["aac-in-aac-out", "g711-in-aac-out", "opus-in-opus-out"])
def test_rtsp_camera_audio_comes_out_with_speech_muted_siren_kept_and_in_sync(
        camera: RtspServer, scene: Scene, mount: str, out_codec: str) -> None:
    listener = Listener(SECONDS - 1.0).start()
    reported = Speech()
    p = run_stream(camera, listener.url, {"policy": "mute_speech", "codec": out_codec}, reported, mount)
    try:
        capture = listener.join(60)
    finally:
        p.stop()
    assert capture.audio_codec == out_codec and len(capture.audio) > capture.rate * 4
    # lip-sync: every flash that went out came with its beep
    offsets = capture.offsets()
    assert offsets, "no flash/beep pair in the output"
    assert max(abs(o) for o in offsets) <= 0.1, f"A/V offsets {offsets}"
    audio, rate, to_audio = capture.audio, capture.rate, scene_to_audio(capture, scene)
    # what was received of each utterance and of the siren (a little trimmed: the mapping is good
    # to a frame or two)
    speech = [(a, b) for a, b in scene.speech if to_audio(a) >= 0 and to_audio(b) * rate <= len(audio)]
    assert speech, "no whole utterance inside the received window"
    got = segment_energy(audio, rate, [(to_audio(a) + 0.06, to_audio(b) - 0.06) for a, b in speech])
    assert all(e < -60 for e in got), got
    siren = [(a + 0.1, b - 0.1) for a, b in scene.siren if to_audio(b) * rate <= len(audio)]
    assert siren, "the siren is not inside the received window"
    sent = segment_energy(scene.samples, scene.rate, siren)
    got = segment_energy(audio, rate, [(to_audio(a), to_audio(b)) for a, b in siren])
    assert all(abs(g - s) < 3 for g, s in zip(got, sent, strict=True)), (got, sent)
    assert counter(p.metrics, "audio_seconds", stream="cam", result="speech") > 1.0
    assert counter(p.metrics, "audio_speech_segments", stream="cam") >= 1
    assert reported.segments and all(b > a and prob >= 0.5 and policy == "mute_speech"
                                     for a, b, prob, policy in reported.segments)


@pytest.mark.timeout(120)
def test_keep_passes_the_speech_and_drop_publishes_no_audio(camera: RtspServer, scene: Scene,
                                                             tmp_path: Path) -> None:
    listener = Listener(4.0).start()
    p = run_stream(camera, listener.url, {"policy": "keep"})
    try:
        capture = listener.join(60)
    finally:
        p.stop()
    to_audio = scene_to_audio(capture, scene)
    a, b = scene.speech[0]
    assert to_audio(b) * capture.rate <= len(capture.audio), "the first utterance was not received"
    assert segment_energy(capture.audio, capture.rate, [(to_audio(a) + 0.1, to_audio(b) - 0.1)])[0] > -30
    listener = Listener(2.0)
    p = run_stream(camera, listener.url, {"policy": "drop"})
    listener.start()
    try:
        with pytest.raises(ValueError, match="one video and one audio"):
            listener.join(60)
        wait_for(lambda: counter(p.metrics, "frames_published", stream="cam") > 0, what="video published")
    finally:
        p.stop()
