"""Glass-to-glass latency of WHIP in -> redaction -> WHEP out, with real aiortc peers over real HTTP.

An aiortc publisher sends a 25 fps clip (a face on a textured background) whose frames carry their
sequence number as a row of black/white blocks at the bottom (robust to VP8); the pipeline
redacts the stream with the configured preset; an aiortc viewer receives it over WHEP and reads
the number back. Latency = receive time - send time of the same frame, on one clock. Both peers
are aiortc, whose jitter buffer holds each frame until the next one starts (about one frame
interval per side), so a browser viewer sees less. Run: ``.venv/bin/python benchmarks/webrtc_latency.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import aiohttp  # noqa: E402
from aiortc import MediaStreamTrack, RTCSessionDescription  # noqa: E402
from aiortc.mediastreams import MediaStreamError  # noqa: E402
from av import VideoFrame  # noqa: E402
from helpers import face_sprite, textured_background  # noqa: E402

from stream.config import parse_config  # noqa: E402
from stream.live.auth import Tokens  # noqa: E402
from stream.live.http import start_http  # noqa: E402
from stream.live.pipeline import Pipeline  # noqa: E402
from stream.live.rtc import RtcGateway  # noqa: E402
from stream.live.service import detector_factory_for  # noqa: E402
from stream.live.webrtc.ice import LOOPBACK, rtc_configuration  # noqa: E402
from stream.live.webrtc.whip import WhipIngest  # noqa: E402

BITS, BLOCK = 16, 16
TOKEN = "latency-bench-token-0123456789"


def stamp(image: np.ndarray, n: int) -> None:
    h = image.shape[0]
    for b in range(BITS):
        v = 255 if (n >> b) & 1 else 0
        image[h - BLOCK:h, b * BLOCK:(b + 1) * BLOCK] = v


def read_stamp(image: np.ndarray) -> int:
    h = image.shape[0]
    n = 0
    for b in range(BITS):
        block = image[h - BLOCK + 4:h - 4, b * BLOCK + 4:(b + 1) * BLOCK - 4]
        if block.mean() > 127:
            n |= 1 << b
    return n


class StampedTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, width: int, height: int, fps: float, sent: dict[int, float]) -> None:
        super().__init__()
        self.fps, self.sent = fps, sent
        self.bg = textured_background(width, height)
        self.sprite = face_sprite(96, 106)
        self.n = 0
        self.t0: float | None = None

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        self.t0 = self.t0 or time.monotonic()
        due = self.t0 + self.n / self.fps
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        img = self.bg.copy()
        sh, sw = self.sprite.shape[:2]
        x = 40 + (self.n * 3) % (img.shape[1] - sw - 80)
        img[60:60 + sh, x:x + sw] = self.sprite
        stamp(img, self.n % (1 << BITS))
        frame = VideoFrame.from_ndarray(img, format="bgr24")
        frame.pts = round(self.n * 90_000 / self.fps)
        frame.time_base = fractions.Fraction(1, 90_000)
        self.sent[self.n % (1 << BITS)] = time.monotonic()
        self.n += 1
        return frame


async def run(args: argparse.Namespace) -> dict:
    cfg = parse_config({"streams": [{"id": "cam", "source": {"type": "whip"}}],
                        "detection": {"preset": args.preset, "plates": not args.faces_only,
                                      "heads": not args.faces_only, "providers": ["cpu"]}})
    pipeline = Pipeline(cfg, detector_factory_for(cfg))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, pipeline.start)
    gateway = RtcGateway(pipeline)
    runner, port = await start_http(pipeline, "127.0.0.1", 0, Tokens((TOKEN.encode(),)), gateway=gateway)
    base = f"http://127.0.0.1:{port}"
    sent: dict[int, float] = {}
    got: list[tuple[int, float]] = []
    hdr = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/sdp"}
    WhipIngest(LOOPBACK)  # offer 127.0.0.1 host candidates for the client peers too
    async with aiohttp.ClientSession() as http:
        pub = __import__("aiortc").RTCPeerConnection(rtc_configuration(LOOPBACK))
        pub.addTrack(StampedTrack(args.width, args.height, args.fps, sent))
        await pub.setLocalDescription(await pub.createOffer())
        async with http.post(base + "/whip/cam", data=pub.localDescription.sdp, headers=hdr) as r:
            assert r.status == 201, await r.text()
            await pub.setRemoteDescription(RTCSessionDescription(await r.text(), "answer"))
        viewer = __import__("aiortc").RTCPeerConnection(rtc_configuration(LOOPBACK))
        viewer.addTransceiver("video", direction="recvonly")
        done = asyncio.Event()

        async def consume(track: MediaStreamTrack) -> None:
            try:
                while not done.is_set():
                    frame = await track.recv()
                    got.append((read_stamp(frame.to_ndarray(format="bgr24")), time.monotonic()))
            except MediaStreamError:
                pass

        tasks = []
        viewer.on("track", lambda t: tasks.append(asyncio.ensure_future(consume(t))))
        await viewer.setLocalDescription(await viewer.createOffer())
        async with http.post(base + "/whep/cam", data=viewer.localDescription.sdp, headers=hdr) as r:
            assert r.status == 201, await r.text()
            await viewer.setRemoteDescription(RTCSessionDescription(await r.text(), "answer"))
        await asyncio.sleep(args.warmup)
        got.clear()
        t0 = time.monotonic()
        await asyncio.sleep(args.seconds)
        window = time.monotonic() - t0
        done.set()
        await viewer.close()
        await pub.close()
        for t in tasks:
            t.cancel()
    await gateway.close()
    await runner.cleanup()
    await loop.run_in_executor(None, pipeline.stop, 5.0)
    lat = sorted((t - sent[n]) * 1000 for n, t in got if n in sent and t >= sent[n])
    unique = len({n for n, _ in got})

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {"frames_received": len(got), "unique_frames": unique, "fps_received": unique / window,
            "latency_ms": {"p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "max": lat[-1] if lat else None},
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--fps", type=float, default=25)
    ap.add_argument("--preset", default="fast", choices=["fast", "accurate"])
    ap.add_argument("--faces-only", action="store_true", help="no plate or person detector")
    ap.add_argument("--warmup", type=float, default=4)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "webrtc_latency.json")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    lat = result["latency_ms"]
    print(f"| {args.width}x{args.height} {args.fps:g} fps | preset {args.preset}"
          f"{' faces only' if args.faces_only else ''} | received {result['fps_received']:.1f} fps | "
          f"glass-to-glass p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, p99 {lat['p99']:.0f} ms |")
    runs = json.loads(args.json.read_text()) if args.json.exists() else []
    runs = [r for r in runs if r["settings"] != result["settings"]] + [result]
    args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
