"""WHIP ingest and WHEP playback between real aiortc peers in one process, over loopback ICE."""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
from itertools import pairwise

import aioice.ice
import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from aiortc.rtp import RTCP_PSFB_FIR, RTCP_PSFB_PLI, RtcpPsfbPacket
from aiortc.sdp import SessionDescription
from helpers import face_sprite, textured_background
from webrtc_helpers import (
    ClipTrack,
    RecordingHandler,
    Viewer,
    assert_released,
    client_pc,
    find_black_box,
    find_patch,
    publish,
    snapshot,
    sprite_clip,
    square_frame,
    wait_until,
    watch,
)

from stream.core.yuv import I420
from stream.live.webrtc import session as session_module
from stream.live.webrtc.ice import LOOPBACK, IceConfig, IceServer, rtc_configuration, set_host_addresses
from stream.live.webrtc.session import (
    MAX_SDP_BYTES,
    NotSdp,
    OfferError,
    OfferTooLarge,
    StreamGone,
    parse_offer,
    require_sdp_content_type,
)
from stream.live.webrtc.whep import VIEWER_QUEUE, FeedClosed, FrameFeed, PtsClock, SharedEncoder, WhepPlayback
from stream.live.webrtc.whip import WhipIngest

W, H, FPS = 320, 240, 15
CLIP_FRAMES, STEP, SPRITE_Y = 30, 6, 60


# One of these tests hung once in a full-suite run (in test_whep_viewer_sees_feed_frames, after
# ~420 other tests) and never in 60+ runs of this module alone; the cause is not found yet. A hang
# fails the test after 60 s instead of 300, and the test is retried.
pytestmark = [pytest.mark.timeout(60), pytest.mark.flaky(reruns=2)]


@pytest.fixture(autouse=True)
async def stack_dump_if_stuck():
    """A watchdog, not a wait: if a test is still running after 45 s, print where every task is
    waiting, so the rare hang above can be diagnosed from the test report."""

    async def watchdog() -> None:
        await asyncio.sleep(45)
        print("\n--- test still running after 45 s; asyncio tasks:", file=sys.stderr)
        for task in asyncio.all_tasks():
            task.print_stack(file=sys.stderr)

    dog = asyncio.create_task(watchdog())
    yield
    dog.cancel()


@pytest.fixture(autouse=True)
def default_host_addresses():
    """Each test pins loopback itself; leave aioice as it was found."""
    yield
    set_host_addresses(None)


@pytest.fixture(scope="module")
def clip():
    return sprite_clip(face_sprite(), textured_background(W, H), CLIP_FRAMES, STEP, SPRITE_Y)


def clip_index(image: np.ndarray, patch: np.ndarray) -> int:
    """Which clip frame ``image`` shows, from where the face sprite is; fails if it is not there."""
    x, y, score = find_patch(image, patch)
    assert score > 0.9, f"face sprite not found (best match {score:.2f})"
    assert abs(y - SPRITE_Y) <= 2
    k = round((x - 10) / STEP)
    assert 0 <= k < CLIP_FRAMES and abs(x - (10 + k * STEP)) <= 2, f"sprite at x={x}, not on the clip's path"
    return k


class Pusher:
    """The pipeline's redaction thread in miniature: pushes gray frames with a moving black square."""

    def __init__(self, feed: FrameFeed, fps: float = FPS, size: tuple[int, int] = (W, H)) -> None:
        self.feed, self.fps, self.size = feed, fps, size
        self.boxes = [(20 + 4 * i, 50, 60 + 4 * i, 90) for i in range(50)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-pusher")

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            self.feed.push(square_frame(*self.size, self.boxes[i % len(self.boxes)]), time.monotonic())
            i += 1
            self._stop.wait(1 / self.fps)  # the camera's frame clock, not synchronisation

    def __enter__(self) -> Pusher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def assert_shows_pushed_square(image: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> None:
    box = find_black_box(image)
    assert box is not None, "no black square in the received frame"
    assert any(max(abs(a - b) for a, b in zip(box, want, strict=True)) <= 2 for want in boxes), box
    outside = image[150:, :].astype(int)  # below the square's path: plain gray
    assert abs(outside.mean() - 128) < 6


# -- WHIP ingest ---------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["VP8", "H264"])
async def test_whip_publisher_frames_reach_handler(codec, clip):
    before = snapshot()
    ingest = WhipIngest(LOOPBACK)
    handler = RecordingHandler()
    pub = await publish(ingest, "bodycam-1", handler, ClipTrack(clip.images, FPS), codec)
    assert ingest.publisher("bodycam-1") is ingest.session(pub.session_id) is not None
    await wait_until(lambda: len(handler.frames) >= 12, 15, "12 frames at the handler")

    assert handler.ups[0] == (W, H, codec.lower())
    assert len(handler.ups) == 1
    assert handler.threads == {threading.current_thread().name}, "on_frame is called from the event loop"
    frames = handler.frames[:12]
    assert set(handler.kinds) == {I420}, "aiortc decodes to 4:2:0: frames reach the handler as I420"
    assert all(img.shape == (H, W, 3) and img.dtype == np.uint8 for img, _ in frames)
    pts = [p for _, p in frames]
    assert pts[0] == 0.0 and all(b > a for a, b in pairwise(pts))
    # content and timing agree: the sprite moved as many clip frames as the pts says time passed
    ks = [clip_index(img, clip.patch) for img, _ in frames]
    for (k0, p0), (k1, p1) in pairwise(zip(ks, pts, strict=True)):
        assert (k1 - k0) % CLIP_FRAMES == round((p1 - p0) * FPS) % CLIP_FRAMES

    assert await ingest.delete(pub.session_id)
    assert handler.downs == [("disconnected", "publisher ended the WHIP session")]
    assert ingest.session(pub.session_id) is None and ingest.publisher("bodycam-1") is None
    assert not await ingest.delete(pub.session_id)
    await wait_until(lambda: pub.pc.connectionState == "closed", 10, "the publisher to see the close")
    await pub.pc.close()
    await ingest.close_all()
    await assert_released(before)


async def test_whip_publisher_leaving_marks_stream_down(clip):
    before = snapshot()
    ingest = WhipIngest(LOOPBACK)
    handler = RecordingHandler()
    pub = await publish(ingest, "cam", handler, ClipTrack(clip.images, FPS))
    await wait_until(lambda: len(handler.frames) >= 3, 15, "first frames")
    await pub.pc.close()
    await wait_until(lambda: len(handler.downs) == 1, 10, "on_down after the publisher left")
    assert handler.downs[0][0] == "disconnected"
    assert ingest.session(pub.session_id) is None
    await ingest.close_all()
    assert len(handler.downs) == 1, "a closed session is not reported twice"
    await assert_released(before)


async def test_whip_new_publisher_replaces_old(clip):
    before = snapshot()
    ingest = WhipIngest(LOOPBACK)
    handler = RecordingHandler()
    first = await publish(ingest, "cam", handler, ClipTrack(clip.images, FPS))
    await wait_until(lambda: len(handler.frames) >= 3, 15, "the first publisher's frames")
    second_clip = sprite_clip(face_sprite(), textured_background(W, H, seed=7), CLIP_FRAMES, STEP, SPRITE_Y)
    second = await publish(ingest, "cam", handler, ClipTrack(second_clip.images, FPS))

    assert ingest.session(first.session_id) is None
    assert ingest.publisher("cam") is ingest.session(second.session_id)
    assert handler.downs == [], "a replaced publisher is a reconnect, not an outage"
    assert handler.reconnects == 1
    n = len(handler.frames)
    await wait_until(lambda: len(handler.frames) >= n + 3, 15, "the new publisher's frames")
    newest = handler.frames[-1][0]
    assert np.abs(newest[200:].astype(int) - second_clip.images[0][200:]).mean() < 8, "from the new publisher"
    await wait_until(lambda: first.pc.connectionState == "closed", 10, "the old publisher to be closed")

    await ingest.close_all()
    assert handler.downs == [("disconnected", "server shutting down")]
    for pub in (first, second):
        await pub.pc.close()
    await assert_released(before)


async def test_whip_publisher_that_never_connects_times_out(clip):
    before = snapshot()
    ingest = WhipIngest(LOOPBACK, connect_timeout_s=1.0)
    handler = RecordingHandler()
    pc = client_pc()
    pc.addTransceiver(ClipTrack(clip.images), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    _, session_id = await ingest.offer("cam", pc.localDescription.sdp, handler)  # answer never applied
    await wait_until(lambda: handler.downs != [], 10, "the connect timeout")
    assert "did not connect within 1 s" in handler.downs[0][1]
    assert ingest.session(session_id) is None
    await pc.close()
    await assert_released(before)


async def test_whip_publisher_audio_is_declined(clip):
    """Bodycams and OBS send audio too: the answer declines it, so no audio is sent or decoded."""
    before = snapshot()
    ingest = WhipIngest(LOOPBACK)
    handler = RecordingHandler()
    pc = client_pc()
    pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    pc.addTransceiver(ClipTrack(clip.images, FPS), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    answer, _ = await ingest.offer("cam", pc.localDescription.sdp, handler)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    audio, video = SessionDescription.parse(answer).media
    assert (audio.kind, audio.direction) == ("audio", "inactive")
    assert (video.kind, video.direction) == ("video", "recvonly")
    await wait_until(lambda: len(handler.frames) >= 3, 15, "video frames")
    await pc.close()
    await ingest.close_all()
    await assert_released(before)


# -- WHEP playback -------------------------------------------------------------------------------
@pytest.mark.parametrize(("codec", "shared"), [("VP8", True), ("H264", True), ("VP8", False)])
async def test_whep_viewer_sees_feed_frames(codec, shared):
    before = snapshot()
    playback = WhepPlayback(LOOPBACK, shared_encoding=shared)
    feed = FrameFeed("cam")
    with Pusher(feed) as pusher:
        viewer = await watch(playback, "cam", feed, codec)
        assert playback.viewers("cam") == 1
        assert f"{codec}/90000" in viewer.answer
        await wait_until(lambda: viewer.received >= 10, 15, "10 frames at the viewer")
        frames = list(viewer.frames)
        for image, _ in frames:
            assert image.shape == (H, W, 3)
            assert_shows_pushed_square(image, pusher.boxes)
        pts = [p for _, p in frames]
        assert all(b > a for a, b in pairwise(pts))
        assert playback.encoders() == (1 if shared else 0)

        await viewer.close()
        await wait_until(lambda: playback.viewers("cam") == 0, 10, "the server to free the session")
        await wait_until(lambda: playback.encoders() == 0, 10, "the shared encoder to stop")
    assert not await playback.delete(viewer.session_id)
    await playback.close_all()
    await assert_released(before)


async def test_whep_viewer_offering_audio_gets_video_only():
    """Browsers' WHEP offers usually ask for audio and video; there is no audio to send."""
    before = snapshot()
    playback = WhepPlayback(LOOPBACK)
    feed = FrameFeed("cam")
    with Pusher(feed) as pusher:
        pc = client_pc()
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        viewer = Viewer(pc)

        @pc.on("track")
        def on_track(track):
            if track.kind == "video":
                viewer.task = asyncio.ensure_future(viewer.consume(track))

        await pc.setLocalDescription(await pc.createOffer())
        answer, _ = await playback.offer("cam", pc.localDescription.sdp, feed)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        audio, video = SessionDescription.parse(answer).media
        assert (audio.direction, video.direction) == ("inactive", "sendonly")
        await wait_until(lambda: viewer.received >= 3, 15, "video frames")
        assert_shows_pushed_square(viewer.frames[-1][0], pusher.boxes)
        await viewer.close()
    await playback.close_all()
    await assert_released(before)


async def test_whep_shared_encoder_serves_late_joiner():
    before = snapshot()
    playback = WhepPlayback(LOOPBACK)
    feed = FrameFeed("cam")
    with Pusher(feed) as pusher:
        first = await watch(playback, "cam", feed, decode=False)
        await wait_until(lambda: first.received >= 5, 15, "the first viewer's frames")
        late = await watch(playback, "cam", feed)
        await wait_until(lambda: late.received >= 5, 15, "the late viewer's frames (needs a keyframe)")
        assert playback.viewers("cam") == 2 and playback.encoders() == 1, "one encoder for both viewers"
        assert_shows_pushed_square(late.frames[-1][0], pusher.boxes)

        # a picture-loss report from one viewer reaches the shared encoder, through aiortc's own dispatch
        keyframes = playback.stats()["encoders"][0]["keyframes"]
        sender = playback.session(late.session_id).pc.getTransceivers()[0].sender
        await sender._handle_rtcp_packet(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=sender._ssrc))
        await wait_until(lambda: playback.stats()["encoders"][0]["keyframes"] > keyframes, 10, "a keyframe")

        assert await playback.delete(first.session_id)
        assert playback.viewers("cam") == 1
        n = late.received
        await wait_until(lambda: late.received >= n + 5, 15, "the remaining viewer to keep receiving")
        await late.close()
        await wait_until(lambda: playback.viewers("cam") == 0 and playback.encoders() == 0, 10, "cleanup")
    await first.close()
    await playback.close_all()
    await assert_released(before)


@pytest.mark.parametrize("fmt", [RTCP_PSFB_PLI, RTCP_PSFB_FIR])
async def test_pinned_aiortc_hands_picture_loss_to_send_keyframe(fmt):
    """WhepPlayback points ``RTCRtpSender._send_keyframe`` at its shared encoder, since aiortc has no public
    hook for picture-loss reports: this fails if the pinned aiortc stops calling that method for them."""
    pc = RTCPeerConnection()
    sender = pc.addTransceiver("video", direction="sendonly").sender
    asked: list[bool] = []
    sender._send_keyframe = lambda: asked.append(True)
    await sender._handle_rtcp_packet(RtcpPsfbPacket(fmt=fmt, ssrc=1, media_ssrc=sender._ssrc))
    assert asked == [True]
    await pc.close()


async def test_whep_stalled_feed_still_shows_its_last_frame():
    """One frame, then nothing (a stalled camera): a new viewer still gets it; odd sizes are cropped."""
    before = snapshot()
    playback = WhepPlayback(LOOPBACK)
    feed = FrameFeed("cam")
    box = (100, 60, 140, 100)
    feed.push(square_frame(W + 1, H + 1, box), time.monotonic())
    viewer = await watch(playback, "cam", feed)
    await wait_until(lambda: viewer.received >= 1, 15, "the repeated last frame")
    image = viewer.frames[0][0]
    assert image.shape == (H, W, 3)
    assert_shows_pushed_square(image, [box])
    await viewer.close()
    await playback.close_all()
    await assert_released(before)


async def test_whep_feed_closing_ends_its_viewers():
    before = snapshot()
    playback = WhepPlayback(LOOPBACK)
    feed = FrameFeed("cam")
    with Pusher(feed):
        viewer = await watch(playback, "cam", feed)
        await wait_until(lambda: viewer.received >= 2, 15, "first frames")
        feed.close()
        await wait_until(lambda: playback.viewers("cam") == 0, 10, "viewers of a closed feed to be closed")
    with pytest.raises(StreamGone, match="not running") as e:
        await watch(playback, "cam", feed)
    assert e.value.http_status == 404
    await viewer.close()
    await playback.close_all()
    await assert_released(before)


# -- bad input -----------------------------------------------------------------------------------
def sdp(kind: str = "video", direction: str = "sendonly", codec: str = "VP8") -> str:
    """A minimal but complete offer (ICE credentials, DTLS fingerprint), one m-line."""
    return "\r\n".join([
        "v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0", "a=group:BUNDLE 0",
        f"m={kind} 9 UDP/TLS/RTP/SAVPF 96", "c=IN IP4 0.0.0.0", f"a={direction}", "a=mid:0", "a=rtcp-mux",
        f"a=rtpmap:96 {codec}/{48000 if kind == 'audio' else 90000}", "a=ice-ufrag:abcd",
        "a=ice-pwd:abcdefghijklmnopqrstuvwx",
        "a=fingerprint:sha-256 " + ":".join(["AB"] * 32), "a=setup:actpass", "",
    ])


def strip(offer: str, prefix: str) -> str:
    return "\r\n".join(line for line in offer.split("\r\n") if not line.startswith(prefix))


BAD_OFFERS = [
    # (offer, what the offerer wants, error class, http status, words the message must have)
    (None, "send", OfferError, 400, "must be text, got NoneType"),
    (b"v=0\r\n", "send", OfferError, 400, "must be text, got bytes"),
    ("v=0\r\n" + "a=x\r\n" * (MAX_SDP_BYTES // 5), "send", OfferTooLarge, 413, "larger than 64 KiB"),
    ("hello", "send", OfferError, 400, "must start with 'v=0'"),
    ("", "recv", OfferError, 400, "must start with 'v=0'"),
    ("v=0\r\nm=video x y z\r\n", "send", OfferError, 400, "malformed"),
    (sdp("audio", codec="opus"), "send", OfferError, 400, "no video m-line (audio)"),
    ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "recv", OfferError, 400,
     "no video m-line (no m-lines)"),
    (sdp(direction="recvonly"), "send", OfferError, 400, "a WHIP publisher must send video"),
    (sdp(direction="sendonly"), "recv", OfferError, 400, "a WHEP viewer must receive video"),
    (sdp(codec="VP9"), "send", OfferError, 400, "codecs (VP9) include none of H264, VP8"),
    (strip(sdp(), "a=ice-"), "send", OfferError, 400, "no ICE credentials (a=ice-ufrag and a=ice-pwd)"),
    (strip(sdp(), "a=fingerprint"), "send", OfferError, 400, "no DTLS fingerprint (a=fingerprint)"),
]


@pytest.mark.parametrize(("offer", "want", "error", "status", "words"), BAD_OFFERS)
def test_bad_offers_are_refused_with_a_clear_error(offer, want, error, status, words):
    with pytest.raises(error) as e:
        parse_offer(offer, want)
    assert isinstance(e.value, ValueError)
    assert words in str(e.value)
    assert e.value.http_status == status


@pytest.mark.parametrize(("offer", "want", "error", "status", "words"),
                         [*BAD_OFFERS[:3], BAD_OFFERS[6]])
async def test_whip_and_whep_refuse_bad_offers_before_connecting(offer, want, error, status, words):
    before = snapshot()
    ingest, playback = WhipIngest(LOOPBACK), WhepPlayback(LOOPBACK)
    handler = RecordingHandler()
    with pytest.raises(error, match=re.escape(words)):
        await ingest.offer("cam", offer, handler)
    with pytest.raises(OfferError):
        await playback.offer("cam", offer, FrameFeed("cam"))
    assert ingest.publisher("cam") is None and playback.viewers("cam") == 0
    assert handler.downs == [] and handler.ups == []
    await assert_released(before)


async def test_offer_that_cannot_be_negotiated_leaves_nothing_behind():
    """H.264 in packetization-mode 0 only: it passes the checks, aiortc refuses it; nothing is left open."""
    before = snapshot()
    ingest, playback = WhipIngest(LOOPBACK), WhepPlayback(LOOPBACK)
    mode0 = sdp(codec="H264").replace("a=ice-ufrag", "a=fmtp:96 packetization-mode=0;profile-level-id=42e01f"
                                      "\r\na=ice-ufrag")
    handler = RecordingHandler()
    with pytest.raises(OfferError, match="could not be negotiated"):
        await ingest.offer("cam", mode0, handler)
    with pytest.raises(OfferError, match="could not be negotiated"):
        await playback.offer("cam", mode0.replace("a=sendonly", "a=recvonly"), FrameFeed("cam"))
    assert ingest.publisher("cam") is None and playback.viewers("cam") == 0 and playback.encoders() == 0
    await assert_released(before)
    assert handler.downs == [], "a refused offer never was a session: its stream is not marked down"


@pytest.mark.parametrize(("content_type", "ok"), [
    ("application/sdp", True), ("Application/SDP; charset=utf-8", True),
    ("text/plain", False), ("application/json", False), (None, False), ("", False),
])
def test_offers_must_be_application_sdp(content_type, ok):
    if ok:
        require_sdp_content_type(content_type)
    else:
        with pytest.raises(NotSdp, match="Content-Type: application/sdp") as e:
            require_sdp_content_type(content_type)
        assert e.value.http_status == 415


# -- the feed, the clock, ICE settings -------------------------------------------------------------
async def test_feed_wakes_a_waiter_from_another_thread_and_keeps_only_the_newest():
    feed = FrameFeed("cam")
    images = [np.full((4, 4, 3), i, np.uint8) for i in range(3)]
    waiter = asyncio.ensure_future(feed.next(0))
    await wait_until(lambda: feed.waiting == 1, 5, "the reader to wait")
    pusher = threading.Thread(target=lambda: [feed.push(img, float(i)) for i, img in enumerate(images)])
    pusher.start()
    pusher.join()
    first = await asyncio.wait_for(waiter, 5)
    assert first is not None and first.seq >= 1
    newest = await feed.next(0)
    assert newest is not None and newest.seq == 3 and newest.image is images[2] and newest.captured_at == 2.0
    assert await feed.next(3, timeout=0.05) is None
    assert feed.waiting == 0, "a timed-out reader leaves nothing behind"
    waiter = asyncio.ensure_future(feed.next(3))
    await wait_until(lambda: feed.waiting == 1, 5, "the reader to wait")
    feed.close()
    with pytest.raises(FeedClosed):
        await asyncio.wait_for(waiter, 5)
    feed.push(images[0], 9.0)  # after close: ignored, never raises into the pipeline
    assert feed.latest is not None and feed.latest.seq == 3


async def test_feed_reader_cancelled_as_a_frame_arrives_ends_cancelled():
    """Shutdown cancels readers while frames keep coming: a cancel that lands in the same loop turn as
    a frame must still end the reader (Python 3.11's wait_for returned the frame instead, and the
    shared encoder's loop then ran forever, holding up the service's stop)."""
    feed = FrameFeed("cam")
    reader = asyncio.ensure_future(feed.next(0, timeout=30))
    await wait_until(lambda: feed.waiting == 1, 5, "the reader to wait")
    pusher = threading.Thread(target=feed.push, args=(np.zeros((4, 4, 3), np.uint8), 0.0))
    pusher.start()
    pusher.join()  # the wake-up is scheduled on this loop, not run yet
    reader.cancel()  # and the cancel arrives in the same turn
    done, _ = await asyncio.wait((reader,), timeout=5)
    assert done, "the cancelled reader must end"
    assert reader.cancelled(), f"the cancel was swallowed: the reader returned {reader.result()!r}"
    assert feed.waiting == 0


async def test_a_connection_that_never_closes_does_not_hold_up_shutdown(monkeypatch, caplog):
    monkeypatch.setattr(session_module, "CLOSE_TIMEOUT_S", 0.5)
    before = snapshot()
    playback = WhepPlayback(LOOPBACK)
    feed = FrameFeed("cam")
    with Pusher(feed):
        viewer = await watch(playback, "cam", feed, decode=False)
        await wait_until(lambda: viewer.received >= 2, 15, "first frames")
        stuck = playback.session(viewer.session_id).pc
        really_close = stuck.close

        async def never_closes() -> None:
            await asyncio.Event().wait()

        stuck.close = never_closes
        await asyncio.wait_for(playback.close_all(), 10)  # TimeoutError: it waited for the stuck one
    assert playback.viewers("cam") == 0
    assert "did not close within 0.5 s" in caplog.text
    await really_close()
    await viewer.close()
    await assert_released(before)


async def test_shared_viewer_that_falls_behind_resyncs_at_a_keyframe():
    encoder = SharedEncoder(FrameFeed("cam"), "VP8")
    track = encoder.subscribe()

    def packet(key: bool) -> av.Packet:
        p = av.Packet(b"x")
        p.is_keyframe = key
        return p

    track.deliver(packet(True))
    assert track._queue.empty(), "nothing is queued before the sender reads (connection not up)"
    reader = asyncio.ensure_future(track.recv())
    await wait_until(lambda: encoder._keyframe_wanted, 5, "the first read to ask for a keyframe")
    encoder._keyframe_wanted = False
    track.deliver(packet(False))
    assert track._queue.empty(), "a viewer starts at a keyframe"
    first = packet(True)
    track.deliver(first)
    assert await asyncio.wait_for(reader, 5) is first
    for _ in range(VIEWER_QUEUE):
        track.deliver(packet(False))
    assert track._queue.qsize() == VIEWER_QUEUE and track.resyncs == 0
    track.deliver(packet(False))  # one too many: drop the backlog, wait for the next keyframe
    assert track._queue.empty() and track.resyncs == 1 and encoder._keyframe_wanted
    track.deliver(packet(False))
    assert track._queue.empty()
    track.deliver(packet(True))
    assert track._queue.qsize() == 1
    track.stop()
    assert encoder.subscribers == 0
    await encoder.close()


def test_pts_clock_follows_capture_times_and_only_increases():
    clock = PtsClock()
    assert [clock.stamp(100.0 + i / 25) for i in range(4)] == [0, 3600, 7200, 10800]
    repeat = clock.stamp(None)
    assert repeat > 10800
    assert clock.stamp(100.0 + 3 / 25) > repeat, "an old capture time still moves forward"
    after_jump = clock.stamp(50.0)  # the capture clock went back (a new source)
    later = clock.stamp(50.04)
    assert repeat < after_jump < later and later - after_jump == 3600


def test_ice_defaults_use_no_outside_server_and_pin_loopback():
    assert rtc_configuration(IceConfig()).iceServers == []
    set_host_addresses(LOOPBACK.host_addresses)
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1"]
    assert aioice.ice.get_host_addresses(use_ipv4=False, use_ipv6=True) == []
    set_host_addresses(None)
    assert "127.0.0.1" not in aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)


def test_ice_server_settings_keep_the_credential_secret():
    server = IceServer(("turn:turn.example.org:3478",), username="u", credential="s3cret")
    assert "s3cret" not in repr(server) and "s3cret" not in repr(IceConfig(servers=(server,)))
    conf = rtc_configuration(IceConfig(servers=(server,)))
    assert conf.iceServers[0].credential == "s3cret"
    with pytest.raises(ValueError, match="is not stun:, turn: or turns:") as e:
        IceServer(("http://user:pw@turn.example.org",))
    assert "pw" not in str(e.value)
    with pytest.raises(ValueError, match="'eth0' is not an IP address"):
        IceConfig(host_addresses=("eth0",))


async def test_pinned_aiortc_keeps_a_remote_tracks_frames_in_a_queue() -> None:
    """WHIP skips a publisher's backlog by reading the remote track's frame queue (no public API):
    this fails if the pinned aiortc renames or replaces it, where the skip would silently stop."""
    from aiortc.rtcrtpreceiver import RemoteStreamTrack

    track = RemoteStreamTrack(kind="video")
    assert isinstance(track._queue, asyncio.Queue)
    track._queue.put_nowait(None)
    assert track._queue.qsize() == 1
