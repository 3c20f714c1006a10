"""Audio through WHIP in and WHEP out: real aiortc peers, the real pipeline with its audio lane, HTTP.

A bodycam-like publisher sends a picture and a scene (espeak-ng speech, a siren, sync beeps, street
noise: tests/audio_material.py) over WHIP; a viewer asks for audio and video over WHEP and records
the audio it decodes. With ``mute_speech`` the speech must arrive silent and the siren as loud as it
was sent; with ``keep`` the speech stays; with ``drop`` neither answer carries audio. The received
timeline is placed by its RTP timestamps and lined up with the scene by cross-correlating the siren
(the beeps that came through must agree).

The feed that cuts the lane's blocks into 20 ms frames, WHIP's audio hand-over and backlog bound,
and which WHEP offers get audio are also tested without the pipeline.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpreceiver import RemoteStreamTrack
from aiortc.sdp import SessionDescription
from audio_material import HAVE_ESPEAK, Scene, find_beeps, make_scene, segment_energy
from av import AudioFrame, VideoFrame
from live_helpers import NoFaces, Served
from webrtc_helpers import ClipTrack, RecordingHandler, client_pc, prefer, square_frame, wait_until

from stream.config import parse_config
from stream.live.auth import Tokens
from stream.live.webrtc.ice import LOOPBACK
from stream.live.webrtc.whep import (
    AUDIO_FRAME,
    AUDIO_RATE,
    AUDIO_VIEWER_QUEUE,
    AudioFeed,
    FrameFeed,
    WhepPlayback,
)
from stream.live.webrtc.whip import AUDIO_BACKLOG_FRAMES, WhipIngest, WhipSession

TOKEN = "whip-whep-audio-token-0123456789"
W, H, FPS = 160, 120, 15
RATE = AUDIO_RATE
SCENE_S = 9.0
"""two utterances, the siren and four beeps (make_scene's layout), short enough for a live test"""
EDGE_S = 0.15
"""trimmed from each end of an interval: the look-ahead and the hangover may reach past it"""
PRE_ROLL_FRAMES = 25
"""20 ms frames of silence the viewer must have received before the scene plays: the path is up"""

needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng missing: apt-get install espeak-ng")
# the live WHIP/WHEP tests run on the suite's default timeout; these are longer (a 9 s scene, twice)
pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def scene() -> Scene:
    if not HAVE_ESPEAK:
        pytest.skip("espeak-ng missing: apt-get install espeak-ng")
    return make_scene(duration=SCENE_S, rate=RATE, seed=5)


# -- the peers ---------------------------------------------------------------------------------------
class SceneTrack(MediaStreamTrack):
    """A microphone: 20 ms s16 frames at 48 kHz, paced in real time; silence until :meth:`play`, then
    the scene once, then silence again. Stereo (the scene on both channels): aiortc's encoder would
    upmix mono at -3 dB per channel (FFmpeg's centre mix level), which is no part of what is tested."""

    kind = "audio"

    def __init__(self, samples: np.ndarray) -> None:
        super().__init__()
        self.pcm = np.clip(np.rint(samples * 32767.0), -32768, 32767).astype(np.int16)
        self.sent = 0
        self.play_at: int | None = None
        self._start: float | None = None

    def play(self) -> None:
        self.play_at = self.sent

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self.sent * AUDIO_FRAME / RATE
        await asyncio.sleep(max(0.0, due - time.monotonic()))  # the microphone's own sample clock
        i = self.sent
        self.sent += 1
        chunk = np.zeros((AUDIO_FRAME, 2), np.int16)
        if self.play_at is not None and (k := (i - self.play_at) * AUDIO_FRAME) < len(self.pcm):
            part = self.pcm[k:k + AUDIO_FRAME]
            chunk[:len(part)] = part[:, None]
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = RATE
        frame.pts = i * AUDIO_FRAME
        frame.time_base = fractions.Fraction(1, RATE)
        return frame


@dataclass
class Listener:
    """A WHEP client that counts video frames and keeps every decoded audio frame (RTP time, mono)."""

    pc: RTCPeerConnection
    answer: str = ""
    video_frames: int = 0
    audio: list[tuple[int, np.ndarray]] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def consume(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                if isinstance(frame, VideoFrame):
                    self.video_frames += 1
                elif isinstance(frame, AudioFrame):
                    self.audio.append((int(frame.pts or 0), mono(frame)))
        except MediaStreamError:
            pass

    def span_s(self, since: int = 0) -> float:
        """Seconds of RTP time from the ``since``-th audio frame to the end of the last one."""
        if len(self.audio) <= since:
            return 0.0
        return (((self.audio[-1][0] - self.audio[since][0]) % 2**32) + len(self.audio[-1][1])) / RATE

    def timeline(self, since: int = 0) -> np.ndarray:
        """The audio from the ``since``-th frame on, each frame at its RTP time (gaps stay silent)."""
        first = self.audio[since][0]
        placed = [((pts - first) % 2**32, x) for pts, x in self.audio[since:]]
        out = np.zeros(max(i + len(x) for i, x in placed), np.float32)
        for i, x in placed:
            out[i:i + len(x)] = x
        return out

    async def close(self) -> None:
        await self.pc.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def mono(frame: AudioFrame) -> np.ndarray:
    a = frame.to_ndarray()
    channels = frame.layout.nb_channels
    a = a if frame.format.is_planar else a.reshape(-1, channels).T
    return (a.astype(np.float32) / 32768.0).mean(axis=0)


class Stack:
    """Pipeline + HTTP (WHIP, WHEP) with one WHIP stream of the given audio policy; no detector work."""

    async def start(self, policy: str) -> Stack:
        cfg = parse_config({"streams": [{"id": "bodycam", "source": {"type": "whip"},
                                         "audio": {"policy": policy}}]})
        self.served = await Served().start(Tokens((TOKEN.encode(),)), config=cfg, detector_factory=NoFaces)
        self.pipeline = self.served.pipeline
        self.gateway = self.served.gateway
        self.peers: list[RTCPeerConnection | Listener] = []
        return self

    async def stop(self) -> None:
        for peer in self.peers:
            await peer.close()
        await self.served.stop()

    async def post(self, path: str, sdp: str) -> str:
        status, answer, headers = await self.served.call("POST", path, TOKEN, sdp=sdp)
        assert status == 201, answer
        assert headers.get("Location", "").startswith(path + "/")
        return str(answer)

    async def publish(self, mic: SceneTrack) -> str:
        pc = client_pc()
        self.peers.append(pc)
        pc.addTransceiver(ClipTrack([square_frame(W, H, (20, 20, 60, 60))], FPS), direction="sendonly")
        pc.addTransceiver(mic, direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        answer = await self.post("/whip/bodycam", pc.localDescription.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        return answer

    async def view(self) -> Listener:
        pc = client_pc()
        listener = Listener(pc)
        self.peers.append(listener)
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")  # as browsers ask: the control room listens too

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            listener.tasks.append(asyncio.ensure_future(listener.consume(track)))

        await pc.setLocalDescription(await pc.createOffer())
        listener.answer = await self.post("/whep/bodycam", pc.localDescription.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=listener.answer, type="answer"))
        return listener


def directions(answer: str) -> dict[str, str | None]:
    return {m.kind: m.direction for m in SessionDescription.parse(answer).media}


def align(received: np.ndarray, scene: Scene) -> float:
    """Where the scene starts in ``received`` (s), from the siren: every policy passes it, and a swept
    tone over noise correlates at one lag only. The beeps that came through must agree with it."""
    a, b = scene.siren[0]
    ref = scene.samples[round(a * RATE):round(b * RATE)].astype(np.float64)
    x = received.astype(np.float64)
    assert len(x) > len(ref), "less audio received than the siren lasts"
    n = 1 << int(np.ceil(np.log2(len(x) + len(ref))))
    corr = np.fft.irfft(np.fft.rfft(x, n) * np.conj(np.fft.rfft(ref, n)), n)[:len(x) - len(ref) + 1]
    lag = int(np.argmax(corr))
    match = corr[lag] / np.sqrt(np.sum(ref ** 2) * np.sum(x[lag:lag + len(ref)] ** 2) + 1e-12)
    assert match > 0.8, f"the siren did not come through as itself (best match {match:.2f})"
    shift = lag / RATE - a
    beeps = find_beeps(received, RATE)
    assert beeps, "no sync beep came through"
    for t in beeps:
        assert min(abs(t - shift - m) for m in scene.markers) < 0.02, \
            f"a beep at {t - shift:.3f} s of the scene, where there is no marker ({scene.markers})"
    return shift


def trimmed(intervals: list[tuple[float, float]], shift: float) -> list[tuple[float, float]]:
    return [(a + shift + EDGE_S, b + shift - EDGE_S) for a, b in intervals]


async def play_through(stack: Stack, scene: Scene) -> np.ndarray:
    """Publish, watch, play the scene once; returns what the viewer heard from the moment it played."""
    mic = SceneTrack(scene.samples)
    whip_answer = await stack.publish(mic)
    assert directions(whip_answer) == {"video": "recvonly", "audio": "recvonly"}
    await wait_until(lambda: stack.pipeline.streams["bodycam"].state == "up", 20, "the WHIP stream up")
    listener = await stack.view()
    assert directions(listener.answer) == {"video": "sendonly", "audio": "sendonly"}
    assert "opus/48000" in listener.answer.lower()
    await wait_until(lambda: len(listener.audio) >= PRE_ROLL_FRAMES, 30, "audio at the WHEP viewer")
    since = len(listener.audio)
    mic.play()
    await wait_until(lambda: listener.span_s(since) >= scene.duration + 0.5, scene.duration + 30,
                     "the whole scene at the WHEP viewer")
    assert listener.video_frames > 0
    publisher = stack.gateway.whip.publisher("bodycam")
    assert publisher is not None and publisher.audio_channels == 2  # aiortc decodes Opus to stereo
    assert stack.pipeline.streams["bodycam"].audio.channels == 2
    return listener.timeline(since)


@dataclass
class Lag:
    """How long after its capture each video frame and audio block was handed to the WHEP senders."""

    video: list[float] = field(default_factory=list)
    audio: list[float] = field(default_factory=list)


def watch_lip_sync(stack: Stack) -> Lag:
    lag = Lag()
    feed = stack.gateway.feeds["bodycam"]
    push = feed.push

    def video(image: object, captured_at: float) -> None:
        lag.video.append(time.monotonic() - captured_at)
        push(image, captured_at)

    feed.push = video  # type: ignore[method-assign]
    lane = stack.pipeline.streams["bodycam"].audio
    assert lane is not None
    lane.sinks.append(lambda samples, t: lag.audio.append(time.monotonic() - t))
    return lag


# -- end to end --------------------------------------------------------------------------------------
@needs_espeak
async def test_mute_speech_silences_speech_and_keeps_the_siren_at_the_whep_viewer(scene: Scene) -> None:
    stack = await Stack().start("mute_speech")
    try:
        lag = watch_lip_sync(stack)
        heard = await play_through(stack, scene)
        # viewers line sound and picture up by when each was sent: each must leave as long after its
        # capture as the other (the picture waits for the audio's look-ahead)
        assert len(lag.video) > 50 and len(lag.audio) > 50
        offset = float(np.median(lag.audio[-50:]) - np.median(lag.video[-50:]))
        assert abs(offset) <= 0.1, f"audio leaves {offset * 1000:.0f} ms after the picture of its moment"
        shift = align(heard, scene)
        for (a, b), level in zip(scene.speech, segment_energy(heard, RATE, trimmed(scene.speech, shift)),
                                 strict=True):
            assert level < -50, f"speech at {a:.2f}-{b:.2f} s reached the viewer at {level:.1f} dBFS"
        sent = segment_energy(scene.samples, RATE, trimmed(scene.siren, 0.0))
        got = segment_energy(heard, RATE, trimmed(scene.siren, shift))
        for s, g in zip(sent, got, strict=True):
            assert abs(g - s) <= 3.0, f"siren sent at {s:.1f} dBFS, heard at {g:.1f} dBFS"
    finally:
        await stack.stop()


@needs_espeak
async def test_keep_lets_speech_through_to_the_whep_viewer(scene: Scene) -> None:
    stack = await Stack().start("keep")
    try:
        heard = await play_through(stack, scene)
        shift = align(heard, scene)
        sent = segment_energy(scene.samples, RATE, trimmed(scene.speech, 0.0))
        got = segment_energy(heard, RATE, trimmed(scene.speech, shift))
        for s, g in zip(sent, got, strict=True):
            assert abs(g - s) <= 3.0, f"speech sent at {s:.1f} dBFS, heard at {g:.1f} dBFS"
    finally:
        await stack.stop()


async def test_drop_answers_audio_inactive_on_both_sides() -> None:
    stack = await Stack().start("drop")
    try:
        mic = SceneTrack(np.zeros(RATE, np.float32))
        whip_answer = await stack.publish(mic)
        assert directions(whip_answer) == {"video": "recvonly", "audio": "inactive"}
        await wait_until(lambda: stack.pipeline.streams["bodycam"].state == "up", 20, "the WHIP stream up")
        listener = await stack.view()
        assert directions(listener.answer) == {"video": "sendonly", "audio": "inactive"}
        await wait_until(lambda: listener.video_frames >= 5, 30, "video at the WHEP viewer")
        assert listener.audio == []
        publisher = stack.gateway.whip.publisher("bodycam")
        assert publisher is not None and publisher.audio_frames == 0
        assert "bodycam" not in stack.gateway.audio_feeds
    finally:
        await stack.stop()


# -- the feed on its own -----------------------------------------------------------------------------
async def read_frames(track: MediaStreamTrack, n: int) -> list[AudioFrame]:
    frames = []
    for _ in range(n):
        frame = await asyncio.wait_for(track.recv(), 5)
        assert isinstance(frame, AudioFrame)
        frames.append(frame)
    return frames


async def test_audio_feed_cuts_20ms_frames_with_timestamps_from_the_stream_clock() -> None:
    feed = AudioFeed("cam", asyncio.get_running_loop())
    track = feed.subscribe()
    reading = asyncio.ensure_future(read_frames(track, 5))
    await wait_until(lambda: track._reading, 5, "the viewer to start reading")
    t0 = 100.0
    ramp = (np.arange(3000, dtype=np.float32) / 3000)[:, None] * 0.5
    feed.push(ramp[:700], t0)  # odd block sizes: the frames still come out whole and continuous
    feed.push(ramp[700:], t0 + 700 / RATE)
    # 2 s later (audio lost upstream): the timestamps jump with it, the partial frame goes out padded
    feed.push(np.full((AUDIO_FRAME, 1), 0.25, np.float32), t0 + 2.0)
    frames = await reading
    assert [f.pts for f in frames] == [0, 960, 1920, 2880, 2 * RATE]
    assert all(f.samples == AUDIO_FRAME and f.format.name == "s16" and f.layout.name == "stereo"
               and f.sample_rate == RATE for f in frames)
    pcm = np.concatenate([f.to_ndarray().reshape(-1, 2) for f in frames]) / 32767
    assert np.array_equal(pcm[:, 0], pcm[:, 1]), "mono goes out on both channels"
    np.testing.assert_allclose(pcm[:3000, 0], ramp[:, 0], atol=1e-4)
    assert not pcm[3000:4 * AUDIO_FRAME].any(), "the padding is silence"
    np.testing.assert_allclose(pcm[4 * AUDIO_FRAME:, 0], 0.25, atol=1e-4)
    track.stop()
    assert feed.subscribers == 0


async def test_audio_feed_gives_late_and_slow_viewers_the_present_not_a_backlog() -> None:
    feed = AudioFeed("cam", asyncio.get_running_loop())
    block = np.zeros((AUDIO_FRAME, 2), np.float32)
    connecting = feed.subscribe()
    for i in range(5):  # before its sender reads: nothing is kept for it
        feed.push(block, 10.0 + i * 0.02)
    first = asyncio.ensure_future(read_frames(connecting, 1))
    await wait_until(lambda: connecting._reading, 5, "the viewer to start reading")
    feed.push(block, 10.0 + 5 * 0.02)
    assert [f.pts for f in await first] == [5 * AUDIO_FRAME]

    # it stops reading for a while: at most AUDIO_VIEWER_QUEUE frames wait, the newest ones
    for i in range(6, 6 + 3 * AUDIO_VIEWER_QUEUE):
        feed.push(block, 10.0 + i * 0.02)
    await wait_until(lambda: connecting.dropped == 2 * AUDIO_VIEWER_QUEUE, 5, "old frames dropped")
    later = await read_frames(connecting, AUDIO_VIEWER_QUEUE)
    last = 6 + 3 * AUDIO_VIEWER_QUEUE - 1
    assert [f.pts // AUDIO_FRAME for f in later] == list(range(last - AUDIO_VIEWER_QUEUE + 1, last + 1))

    # the stream goes away: the track ends, and a viewer arriving now gets an ended track
    feed.close()
    with pytest.raises(MediaStreamError):
        await asyncio.wait_for(connecting.recv(), 5)
    late = feed.subscribe()
    with pytest.raises(MediaStreamError):
        await asyncio.wait_for(late.recv(), 5)
    assert feed.subscribers == 0


# -- WHIP and WHEP on their own ----------------------------------------------------------------------
@dataclass
class AudioHandler(RecordingHandler):
    """A SourceHandler of a stream that wants audio: keeps what the audio side is told."""

    tracks: list[int] = field(default_factory=list)
    audio: list[tuple[AudioFrame, float | None]] = field(default_factory=list)
    wants_audio: bool = True

    def on_audio_track(self, channels: int) -> None:
        self.tracks.append(channels)

    def on_audio(self, frame: AudioFrame, arrived: float | None = None) -> None:
        self.audio.append((frame, arrived))


async def test_whip_publishers_audio_reaches_the_handler_and_its_end_leaves_the_video_going() -> None:
    ingest = WhipIngest(LOOPBACK)
    handler = AudioHandler()
    pc = client_pc()
    try:
        pc.addTransceiver(ClipTrack([square_frame(W, H, (20, 20, 60, 60))], FPS), direction="sendonly")
        mic = pc.addTransceiver(SceneTrack(np.zeros(RATE, np.float32)), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        answer, session_id = await ingest.offer("cam", pc.localDescription.sdp, handler)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        assert directions(answer) == {"video": "recvonly", "audio": "recvonly"}
        assert "opus/48000" in answer.lower()
        await wait_until(lambda: len(handler.audio) >= 10 and len(handler.frames) >= 3, 15, "audio and video")
        assert handler.tracks == [2], "told once, with the first frame's channels"
        frame, arrived = handler.audio[-1]
        assert frame.sample_rate == RATE and arrived is not None and arrived <= time.monotonic()
        session = ingest.session(session_id)
        assert session is not None and session.receiving_audio

        await mic.sender.stop()  # the microphone goes (RTCP BYE); the camera films on
        await wait_until(lambda: not session.receiving_audio, 10, "the audio track to end")
        seen = len(handler.frames)
        await wait_until(lambda: len(handler.frames) >= seen + 5, 10, "video after the audio ended")
        assert ingest.session(session_id) is session and not session.closed and handler.downs == []
        assert handler.tracks == [2]
    finally:
        await pc.close()
        await ingest.close_all()


async def test_whip_audio_backlog_is_skipped_down_to_a_bound() -> None:
    """If the loop fell behind, the oldest decoded audio is skipped (counted), as for video."""
    handler = AudioHandler()
    ingest = WhipIngest(LOOPBACK)
    pc = client_pc()
    session = WhipSession("s", "cam", pc, handler=handler)
    track = RemoteStreamTrack(kind="audio")
    backlog = AUDIO_BACKLOG_FRAMES + 15
    for i in range(backlog):
        frame = AudioFrame.from_ndarray(np.zeros((1, 2 * AUDIO_FRAME), np.int16), format="s16",
                                        layout="stereo")
        frame.sample_rate, frame.pts = RATE, i * AUDIO_FRAME
        track._queue.put_nowait(frame)
    track._queue.put_nowait(None)  # then the track ends
    await ingest._receive_audio(session, track)
    assert session.audio_skipped + session.audio_frames == backlog
    assert 0 < session.audio_frames <= AUDIO_BACKLOG_FRAMES + 1
    kept = range(session.audio_skipped, backlog)
    assert [f.pts for f, _ in handler.audio] == [i * AUDIO_FRAME for i in kept], "the newest are kept"
    assert handler.tracks == [2] and not session.receiving_audio and not session.closed
    await pc.close()


@pytest.mark.parametrize(("codec", "has_audio", "sent"), [
    ("opus", True, True), ("PCMU", True, False), ("opus", False, False)])
async def test_whep_sends_opus_audio_only_to_viewers_that_can_take_it(codec: str, has_audio: bool,
                                                                      sent: bool) -> None:
    playback = WhepPlayback(LOOPBACK)
    loop = asyncio.get_running_loop()
    feed, audio = FrameFeed("cam"), AudioFeed("cam", loop)
    feed.push(square_frame(W, H, (20, 20, 60, 60)), time.monotonic())
    pc = client_pc()
    try:
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        prefer(pc, "video", "VP8")
        caps = [c for c in RTCRtpSender.getCapabilities("audio").codecs
                if c.mimeType.lower() == f"audio/{codec.lower()}"]
        next(t for t in pc.getTransceivers() if t.kind == "audio").setCodecPreferences(caps)
        await pc.setLocalDescription(await pc.createOffer())
        answer, session_id = await playback.offer("cam", pc.localDescription.sdp, feed,
                                                  audio if has_audio else None)
        assert directions(answer) == {"video": "sendonly", "audio": "sendonly" if sent else "inactive"}
        assert audio.subscribers == (1 if sent else 0)
        assert playback.stats()["listeners"] == ({"cam": 1} if sent else {})
        await playback.delete(session_id)
        assert audio.subscribers == 0, "a viewer that leaves leaves the audio feed"
    finally:
        await pc.close()
        await playback.close_all()
