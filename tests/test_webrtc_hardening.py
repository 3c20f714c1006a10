"""WHIP/WHEP limits and ICE exposure, through the real HTTP routes with real aiortc peers.

Viewer caps (503 + Retry-After, counted), sessions that belong to their stream, offers read whole
when chunked, a re-added stream keeping its new viewers, and ICE host candidates and UDP ports
held to what the config allows.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aioice.ice
import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import SessionDescription
from helpers import make_clip
from live_helpers import NoFaces
from webrtc_helpers import ClipTrack, Viewer, client_pc, square_frame, wait_until

import stream.live.rtc
from stream.config import parse_config
from stream.core.metrics import sample
from stream.live.auth import Tokens
from stream.live.http import start_http
from stream.live.pipeline import Pipeline
from stream.live.rtc import RtcGateway
from stream.live.webrtc.ice import set_host_addresses, set_udp_ports
from stream.live.webrtc.session import MAX_SDP_BYTES

pytestmark = pytest.mark.timeout(90)

TOKEN = "webrtc-hardening-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REFUSED = "stream_redact_whep_viewers_refused_total"


@pytest.fixture(autouse=True)
def default_ice() -> Iterator[None]:
    """ICE settings are process-wide: leave aioice as it was found for the tests that follow."""
    yield
    set_host_addresses(None)
    set_udp_ports(None)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("webrtc") / "clip.mp4", frames=25).path


def free_port_range(size: int) -> tuple[int, int]:
    """``size`` consecutive UDP ports on loopback that are free right now (taken ones are skipped anyway)."""
    for _ in range(50):
        first = random.randrange(40_000, 60_000 - size)
        socks = []
        try:
            for port in range(first, first + size):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return first, first + size - 1
    raise AssertionError("no free UDP port range found")


class Stack:
    """Pipeline + HTTP (API, WHIP, WHEP) in this event loop; the gateway as `stream-redact run` makes it."""

    async def start(self, streams: list[dict[str, Any]], webrtc: dict[str, Any] | None = None,
                    http_host: str = "127.0.0.1") -> Stack:
        self.config = parse_config({"streams": streams, "webrtc": webrtc or {},
                                    "detection": {"preset": "fast", "plates": False, "heads": False,
                                                  "providers": ["cpu"]}})
        self.pipeline = Pipeline(self.config, NoFaces)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.pipeline.start)
        self.gateway = RtcGateway(self.pipeline, self.config.webrtc, http_host)
        self.runner, port = await start_http(self.pipeline, "127.0.0.1", 0, Tokens((TOKEN.encode(),)),
                                             gateway=self.gateway)
        self.base = f"http://127.0.0.1:{port}"
        self.http = aiohttp.ClientSession()
        self.pcs: list[RTCPeerConnection] = []
        return self

    async def stop(self) -> None:
        for pc in self.pcs:
            await pc.close()
        await self.http.close()
        await self.gateway.close()
        await self.runner.cleanup()
        await asyncio.get_running_loop().run_in_executor(None, self.pipeline.stop, 5.0)

    async def post_sdp(self, path: str, body: Any) -> tuple[int, str, dict[str, str]]:
        async with self.http.post(self.base + path, data=body,
                                  headers={**AUTH, "Content-Type": "application/sdp"}) as r:
            return r.status, await r.text(), dict(r.headers)

    async def delete(self, path: str) -> int:
        async with self.http.delete(self.base + path, headers=AUTH) as r:
            return r.status

    async def viewer_offer(self) -> tuple[RTCPeerConnection, str]:
        """A WHEP client's recvonly offer (its answer need not be applied for the session to exist)."""
        pc = client_pc()
        self.pcs.append(pc)
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        return pc, pc.localDescription.sdp

    async def publisher_offer(self) -> tuple[RTCPeerConnection, str]:
        pc = client_pc()
        self.pcs.append(pc)
        pc.addTransceiver(ClipTrack([square_frame(320, 240, (40, 40, 80, 80))]), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        return pc, pc.localDescription.sdp

    async def session(self, kind: str, stream_id: str) -> str:
        """POST an offer; the session's Location."""
        _, sdp = await (self.viewer_offer() if kind == "whep" else self.publisher_offer())
        status, text, headers = await self.post_sdp(f"/{kind}/{stream_id}", sdp)
        assert status == 201, text
        return headers["Location"]


@pytest.fixture
async def stack_factory() -> AsyncIterator[Any]:
    stacks: list[Stack] = []

    async def make(*args: Any, **kwargs: Any) -> Stack:
        stacks.append(await Stack().start(*args, **kwargs))
        return stacks[-1]

    yield make
    for s in stacks:
        await s.stop()


def whip(sid: str) -> dict[str, Any]:
    return {"id": sid, "source": {"type": "whip"}}


def host_candidates(answer: str) -> list[tuple[str, int]]:
    """(address, port) of every host candidate in an SDP, over all m-lines."""
    return [(c.ip, c.port) for m in SessionDescription.parse(answer).media
            for c in m.ice_candidates if c.type == "host"]


# -- F12: viewer limits ----------------------------------------------------------------------------
async def test_whep_viewers_beyond_the_limits_get_503_with_retry_after(stack_factory) -> None:
    stack = await stack_factory([whip("cam1"), whip("cam2")],
                                {"max_viewers_per_stream": 2, "max_viewers": 3})
    # offers arriving together: the limit holds while they are still being answered
    offers = [sdp for _, sdp in [await stack.viewer_offer() for _ in range(6)]]
    results = await asyncio.gather(*(stack.post_sdp("/whep/cam1", o) for o in offers))
    accepted = [r for r in results if r[0] == 201]
    refused = [r for r in results if r[0] != 201]
    assert len(accepted) == 2 and stack.gateway.whep.viewers("cam1") == 2, [r[0] for r in results]
    for status, text, headers in refused:
        assert status == 503
        assert "webrtc.max_viewers_per_stream (2)" in text and "'cam1'" in text
        assert int(headers["Retry-After"]) > 0

    status, text, _ = await stack.post_sdp("/whep/cam2", (await stack.viewer_offer())[1])
    assert status == 201, text
    status, text, headers = await stack.post_sdp("/whep/cam2", (await stack.viewer_offer())[1])
    assert status == 503 and "webrtc.max_viewers (3)" in text and int(headers["Retry-After"]) > 0
    assert stack.gateway.whep.viewers("cam2") == 1

    metrics = stack.pipeline.metrics
    assert sample(metrics, REFUSED, limit="max_viewers_per_stream") == 4
    assert sample(metrics, REFUSED, limit="max_viewers") == 1
    async with stack.http.get(stack.base + "/metrics") as r:
        assert f'{REFUSED}{{limit="max_viewers"}} 1.0' in await r.text()

    # a viewer leaving frees its place
    assert await stack.delete(accepted[0][2]["Location"]) == 200
    status, text, _ = await stack.post_sdp("/whep/cam1", (await stack.viewer_offer())[1])
    assert status == 201, text


# -- F15: a session belongs to its stream --------------------------------------------------------
@pytest.mark.parametrize("kind", ["whep", "whip"])
async def test_session_can_only_be_deleted_under_its_own_stream(stack_factory, kind: str) -> None:
    stack = await stack_factory([whip("cam1"), whip("w1")])
    location = await stack.session(kind, "cam1")
    session_id = location.rsplit("/", 1)[1]
    assert location == f"/{kind}/cam1/{session_id}"
    side = stack.gateway.whep if kind == "whep" else stack.gateway.whip

    assert await stack.delete(f"/{kind}/w1/{session_id}") == 404
    assert await stack.delete(f"/{'whip' if kind == 'whep' else 'whep'}/cam1/{session_id}") == 404
    assert side.session(session_id) is not None, "the session outlives a DELETE under another path"
    assert await stack.delete(location) == 200
    assert side.session(session_id) is None
    assert await stack.delete(location) == 404


# -- F16: the offer is read whole ----------------------------------------------------------------
async def test_chunked_offer_is_read_whole_and_oversized_one_gets_413(stack_factory, monkeypatch) -> None:
    stack = await stack_factory([whip("cam1")])
    reading = asyncio.Event()
    real_read = stream.live.rtc.read_limited

    async def read_limited(request: Any, limit: int) -> bytes:
        reading.set()  # the handler is reading: what is sent from now on comes in later chunks
        return await real_read(request, limit)

    monkeypatch.setattr(stream.live.rtc, "read_limited", read_limited)
    _, offer = await stack.viewer_offer()
    raw = offer.encode()

    async def in_two_parts() -> AsyncIterator[bytes]:
        yield raw[: len(raw) // 2]
        await asyncio.wait_for(reading.wait(), 10)
        yield raw[len(raw) // 2:]

    status, text, headers = await stack.post_sdp("/whep/cam1", in_two_parts())
    assert status == 201, text
    assert headers["Content-Type"].startswith("application/sdp") and text.startswith("v=0")

    async def too_much() -> AsyncIterator[bytes]:
        for _ in range(MAX_SDP_BYTES // 8192 + 2):
            yield b"a" * 8192

    status, text, _ = await stack.post_sdp("/whep/cam1", too_much())
    assert status == 413 and f"larger than {MAX_SDP_BYTES} bytes" in text
    assert stack.gateway.whep.viewers("cam1") == 1


# -- a removed stream's close leaves the stream re-added under its id alone ------------------------
async def test_removing_a_stream_spares_the_viewers_and_publisher_of_its_successor(stack_factory) -> None:
    stack = await stack_factory([whip("cam")])
    old_runner, old_feed = stack.pipeline.streams["cam"], stack.gateway.feeds["cam"]
    old_viewer = (await stack.session("whep", "cam")).rsplit("/", 1)[1]
    old_publisher = (await stack.session("whip", "cam")).rsplit("/", 1)[1]

    async with stack.http.delete(stack.base + "/api/streams/cam", headers=AUTH) as r:
        assert r.status in (200, 204), await r.text()
    async with stack.http.post(stack.base + "/api/streams", json=whip("cam"), headers=AUTH) as r:
        assert r.status == 201, await r.text()
    await wait_until(lambda: stack.gateway.whep.session(old_viewer) is None
                     and stack.gateway.whip.session(old_publisher) is None, 10,
                     "the removed stream's viewer and publisher to be closed")
    new_viewer = (await stack.session("whep", "cam")).rsplit("/", 1)[1]
    new_publisher = (await stack.session("whip", "cam")).rsplit("/", 1)[1]

    # the removal's clean-up, had it reached the event loop only now, must not touch the new stream
    await stack.gateway._close_stream(old_runner, old_feed)
    await stack.gateway.whep.close_stream("cam", old_feed)
    assert stack.gateway.whep.session(new_viewer) is not None
    assert stack.gateway.whip.publisher("cam") is stack.gateway.whip.session(new_publisher) is not None


# -- ICE: host candidates and UDP ports ------------------------------------------------------------
def default_addresses() -> set[str]:
    """What aioice offers on its own: every interface address but loopback."""
    set_host_addresses(None)
    return set(aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True))


@pytest.mark.parametrize(("webrtc", "http_host", "expected"), [
    ({"host_candidates": ["127.0.0.1"]}, "0.0.0.0", {"127.0.0.1"}),  # the config's list wins
    ({}, "127.0.0.1", {"127.0.0.1"}),  # a server listening on loopback offers loopback only
    ({}, "0.0.0.0", None),  # listening everywhere: aioice's default
    ({}, "::", None),
])
async def test_answer_offers_only_the_allowed_host_candidates(stack_factory, webrtc, http_host,
                                                              expected) -> None:
    expected = default_addresses() if expected is None else expected
    stack = await stack_factory([whip("cam")], webrtc, http_host)
    for kind in ("whep", "whip"):
        _, offer = await (stack.viewer_offer() if kind == "whep" else stack.publisher_offer())
        status, answer, _ = await stack.post_sdp(f"/{kind}/cam", offer)
        if not expected:  # a host with loopback only has nothing to offer by default
            assert status == 503 and "no ICE candidate" in answer
            continue
        assert status == 201, answer
        assert {host for host, _ in host_candidates(answer)} == expected, kind


async def test_udp_ports_hold_candidates_to_the_range_and_a_viewer_still_gets_frames(
        stack_factory, clip_path: Path) -> None:
    first, last = free_port_range(8)
    taken = []
    for port in (first, first + 1):  # ports in use are skipped, not fatal
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", port))
        taken.append(s)
    try:
        stack = await stack_factory(
            [{"id": "cam", "source": {"type": "file", "path": str(clip_path), "loop": True}}],
            {"host_candidates": ["127.0.0.1"], "udp_ports": [first, last]}, "0.0.0.0")
        pc = client_pc()
        stack.pcs.append(pc)
        viewer = Viewer(pc)
        pc.addTransceiver("video", direction="recvonly")

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            viewer.task = asyncio.ensure_future(viewer.consume(track))

        await pc.setLocalDescription(await pc.createOffer())
        status, answer, _ = await stack.post_sdp("/whep/cam", pc.localDescription.sdp)
        assert status == 201, answer
        candidates = host_candidates(answer)
        assert candidates and {h for h, _ in candidates} == {"127.0.0.1"}
        assert all(first + 2 <= p <= last for _, p in candidates), (candidates, first, last)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_until(lambda: viewer.received >= 5, 20, "5 frames at the WHEP viewer")
        assert viewer.frames[-1][0].shape == (240, 320, 3)
    finally:
        for s in taken:
            s.close()


async def test_no_free_port_in_the_range_answers_503(stack_factory) -> None:
    first, last = free_port_range(1)
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", first))
    try:
        stack = await stack_factory([whip("cam")], {"host_candidates": ["127.0.0.1"],
                                                    "udp_ports": [first, last]})
        for kind in ("whep", "whip"):
            _, offer = await (stack.viewer_offer() if kind == "whep" else stack.publisher_offer())
            status, text, headers = await stack.post_sdp(f"/{kind}/cam", offer)
            assert status == 503 and "webrtc.udp_ports" in text and int(headers["Retry-After"]) > 0
        assert stack.gateway.whep.viewers("cam") == 0 and stack.gateway.whip.publisher("cam") is None
    finally:
        blocker.close()
