"""WHIP in, WHEP out, through the real pipeline and its HTTP routes, with real aiortc peers.

A bodycam-like aiortc publisher sends a clip with a face over WHIP to a stream declared with
``source: {type: whip}``; an aiortc viewer pulls the stream over WHEP; the face must be obscured
in what the viewer receives, and tearing either side down must free its resources.
"""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCSessionDescription
from helpers import face_sprite, laplacian_var, sprite_face_box, textured_background
from live_helpers import counter
from webrtc_helpers import ClipTrack, Viewer, client_pc, wait_until

from stream.config import parse_config
from stream.detect.yunet import YuNet
from stream.live.auth import Tokens
from stream.live.http import start_http
from stream.live.pipeline import Pipeline
from stream.live.rtc import RtcGateway
from stream.live.service import detector_factory_for

TOKEN = "whip-whep-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
W, H = 320, 240


def face_frames(n: int = 30) -> tuple[list[np.ndarray], list[tuple[int, int, int, int]]]:
    sprite, bg = face_sprite(), textured_background(W, H)
    sh, sw = sprite.shape[:2]
    images, boxes = [], []
    for i in range(n):
        x = 20 + (i * 4) % (W - sw - 40)
        y = (H - sh) // 2
        img = bg.copy()
        img[y:y + sh, x:x + sw] = sprite
        images.append(img)
        boxes.append(sprite_face_box(x, y))
    return images, boxes


class Stack:
    """Pipeline + HTTP (API, WHIP, WHEP) in this event loop, as `stream-redact run` assembles them."""

    async def start(self, detector_factory=None) -> Stack:
        cfg = parse_config({"streams": [{"id": "bodycam", "source": {"type": "whip"}}],
                            "detection": {"preset": "fast", "plates": False, "heads": False,
                                          "providers": ["cpu"]}})
        self.pipeline = Pipeline(cfg, detector_factory or detector_factory_for(cfg))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.pipeline.start)
        self.gateway = RtcGateway(self.pipeline)
        self.runner, port = await start_http(self.pipeline, "127.0.0.1", 0, Tokens((TOKEN.encode(),)),
                                             gateway=self.gateway)
        self.base = f"http://127.0.0.1:{port}"
        self.http = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        await self.http.close()
        await self.gateway.close()
        await self.runner.cleanup()
        await asyncio.get_running_loop().run_in_executor(None, self.pipeline.stop, 5.0)

    async def post_sdp(self, path: str, sdp: str, headers: dict | None = None) -> tuple[int, str, str | None]:
        h = {**AUTH, "Content-Type": "application/sdp", **(headers or {})}
        async with self.http.post(self.base + path, data=sdp.encode(), headers=h) as r:
            return r.status, await r.text(), r.headers.get("Location")


async def publish(stack: Stack, images: list[np.ndarray]) -> tuple[object, str]:
    pc = client_pc()
    pc.addTrack(ClipTrack(images, fps=15))
    await pc.setLocalDescription(await pc.createOffer())
    status, answer, location = await stack.post_sdp("/whip/bodycam", pc.localDescription.sdp)
    assert status == 201, answer
    assert location and location.startswith("/whip/bodycam/")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return pc, location


async def view(stack: Stack) -> tuple[Viewer, str]:
    pc = client_pc()
    viewer = Viewer(pc, keep=60)
    pc.addTransceiver("video", direction="recvonly")

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        viewer.task = asyncio.ensure_future(viewer.consume(track))

    await pc.setLocalDescription(await pc.createOffer())
    status, answer, location = await stack.post_sdp("/whep/bodycam", pc.localDescription.sdp)
    assert status == 201, answer
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return viewer, location


async def test_whip_publisher_to_whep_viewer_face_obscured() -> None:
    images, boxes = face_frames()
    yunet = YuNet(threshold=0.6, providers=("cpu",))
    assert all(len(yunet([img])[0]) for img in images[:3]), "the test face must be detectable"
    stack = await Stack().start()
    try:
        publisher, whip_location = await publish(stack, images)
        await wait_until(lambda: stack.pipeline.streams["bodycam"].state == "up", 20, "the WHIP stream up")
        viewer, whep_location = await view(stack)
        await wait_until(lambda: len(viewer.frames) >= 20, 30, "20 redacted frames at the WHEP viewer")
        assert stack.gateway.whep.viewers("bodycam") == 1
        for frame, _ in viewer.frames[-20:]:
            assert frame.shape == (H, W, 3)
            assert len(yunet([frame])[0]) == 0, "a face is visible in a WHEP frame"
        # compare face-sized regions: the received frames must have no sharp face anywhere on the path
        energy_src = min(laplacian_var(images[i], boxes[i], 3) for i in range(len(images)))
        for frame, _ in viewer.frames[-20:]:
            energies = [laplacian_var(frame, b, 3) for b in boxes]
            assert min(energies) < 0.3 * energy_src
        assert counter(stack.pipeline.metrics, "frames_in", stream="bodycam") > 0

        # the viewer leaves: its session is freed, the publisher goes on
        async with stack.http.delete(stack.base + whep_location, headers=AUTH) as r:
            assert r.status == 200
        await viewer.close()
        await wait_until(lambda: stack.gateway.whep.viewers("bodycam") == 0, 10, "viewer session freed")

        # the publisher leaves: the stream is marked down, frames stop
        async with stack.http.delete(stack.base + whip_location, headers=AUTH) as r:
            assert r.status == 200
        await publisher.close()
        await wait_until(lambda: stack.pipeline.streams["bodycam"].state == "down", 10, "stream marked down")
        assert stack.gateway.whip.publisher("bodycam") is None  # no session left to deliver frames
    finally:
        await stack.stop()


@pytest.mark.parametrize(("path", "body", "headers", "status", "words"), [
    ("/whip/bodycam", "v=0", {"Authorization": ""}, 401, "token"),
    ("/whip/bodycam", "v=0", {"Authorization": "Bearer wrong-token-123456789"}, 403, "invalid token"),
    ("/whip/nope", "v=0", {}, 404, "no stream 'nope'"),
    ("/whip/bodycam", "v=0", {"Content-Type": "text/plain"}, 415, "application/sdp"),
    ("/whip/bodycam", "x" * (70 * 1024), {}, 413, "larger than"),
    ("/whip/bodycam", "this is not an sdp offer", {}, 400, ""),
    ("/whep/nope", "v=0", {}, 404, "no stream 'nope'"),
    ("/whep/bodycam", "garbage\r\n\x00\x01", {}, 400, ""),
])
async def test_bad_whip_whep_requests(path: str, body: str, headers: dict, status: int, words: str) -> None:
    stack = await Stack().start(detector_factory=lambda: (lambda imgs, seqs=None: []))
    try:
        got, text, _ = await stack.post_sdp(path, body, headers)
        assert got == status, text
        assert words in text
        async with stack.http.patch(stack.base + "/whip/bodycam/x", headers=AUTH) as r:
            assert r.status == 405
        assert stack.pipeline.streams["bodycam"].state == "down"  # still waiting, unharmed
    finally:
        await stack.stop()
