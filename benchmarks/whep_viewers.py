"""WHEP fan-out: N aiortc viewers on one stream's FrameFeed, received fps per viewer and CPU per side.

The server (this process) runs :class:`stream.live.webrtc.whep.WhepPlayback` behind a minimal WHEP
HTTP endpoint on 127.0.0.1, with a thread pushing 640x360 frames (a textured background and a
moving square, so the encoder has real work) into a :class:`FrameFeed` at 25 fps, as the
pipeline's redaction thread would. For each mode and N, a separate client process opens N
aiortc viewers over real WHEP (POST offer, 201 + answer), waits until every viewer has a
picture, then counts decoded frames per viewer over a window of ``--seconds``.

Modes: ``shared`` (one encoder per stream and codec, packets fanned out) and ``per-viewer``
(aiortc encodes for each viewer). CPU is process time (user + sys) over the same window:
server, clients (aiortc decodes every frame, so the clients are the heavier side), and "other":
what anything else on the machine kept busy, from /proc/stat. When "other" is not near 0, the
machine was shared and every number is pessimistic.

Run: ``.venv/bin/python benchmarks/whep_viewers.py`` (``--help`` for options). Prints a table,
writes ``benchmarks/results/whep_viewers.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from aiohttp import ClientSession, web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.live.webrtc.ice import LOOPBACK, rtc_configuration, set_host_addresses  # noqa: E402
from stream.live.webrtc.whep import FrameFeed, WhepPlayback  # noqa: E402

STREAM = "bench"


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat), for the 'other load' column."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# -- server ----------------------------------------------------------------------------------------
def make_frames(width: int, height: int, n: int = 50) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    bg = cv2.GaussianBlur(rng.integers(60, 200, (height, width, 3), dtype=np.uint8), (0, 0), 3)
    frames = []
    for i in range(n):
        img = bg.copy()
        x = 20 + i * (width - 140) // n
        img[height // 3: height // 3 + 100, x:x + 100] = 0
        frames.append(img)
    return frames


class Pusher(threading.Thread):
    """The redaction thread's part: push a frame every 1/fps s (frame clock, drift-free)."""

    def __init__(self, feed: FrameFeed, frames: list[np.ndarray], fps: float) -> None:
        super().__init__(name="pusher", daemon=True)
        self.feed, self.frames, self.fps = feed, frames, fps
        self.stop = threading.Event()

    def run(self) -> None:
        start, i = time.monotonic(), 0
        while not self.stop.wait(max(0.0, start + i / self.fps - time.monotonic())):
            self.feed.push(self.frames[i % len(self.frames)], time.monotonic())
            i += 1


def whep_app(playback: WhepPlayback, feed: FrameFeed) -> web.Application:
    async def post(request: web.Request) -> web.Response:
        answer, sid = await playback.offer(STREAM, await request.text(), feed)
        return web.Response(status=201, text=answer, content_type="application/sdp",
                            headers={"Location": f"/whep/{STREAM}/{sid}"})

    async def delete(request: web.Request) -> web.Response:
        return web.Response(status=200 if await playback.delete(request.match_info["sid"]) else 404)

    async def mark(request: web.Request) -> web.Response:
        encoded = sum(e["encoded"] for e in playback.stats()["encoders"])
        return web.json_response({"cpu": cpu_seconds(), "encoded": encoded, "pushed": feed.pushed,
                                  "viewers": playback.viewers(STREAM)})

    app = web.Application()
    app.router.add_post(f"/whep/{STREAM}", post)
    app.router.add_delete(f"/whep/{STREAM}/{{sid}}", delete)
    app.router.add_post("/mark", mark)
    return app


async def serve_and_measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    w, h = (int(v) for v in args.size.split("x"))
    feed = FrameFeed(STREAM)
    pusher = Pusher(feed, make_frames(w, h), args.fps)
    pusher.start()
    points = []
    try:
        for mode in args.modes:
            playback = WhepPlayback(LOOPBACK, codecs=(args.codec,), shared_encoding=mode == "shared")
            runner = web.AppRunner(whep_app(playback, feed), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            try:
                for n in args.viewers:
                    p = await run_clients(args, f"http://127.0.0.1:{port}", n)
                    p.update(mode=mode, viewers=n)
                    points.append(p)
                    print(f"  {mode:10s} N={n:<3d} fps/viewer min {p['fps_min']:5.1f} "
                          f"mean {p['fps_mean']:5.1f}"
                          f"  server {p['server_cpu_cores']:.2f} cores  clients {p['client_cpu_cores']:.2f}"
                          f"  other {p['other_cores']:.2f}  first frame {p['first_frame_ms_p50']:.0f} ms",
                          flush=True)
            finally:
                await playback.close_all()
                await runner.cleanup()
    finally:
        pusher.stop.set()
        pusher.join()
    return points


async def run_clients(args: argparse.Namespace, url: str, n: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", url, "--n", str(n), "--seconds", str(args.seconds),
        "--warmup", str(args.warmup), stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"client run N={n} failed (exit {proc.returncode})")
    c = json.loads(out.decode().strip().splitlines()[-1])
    window = c["window_s"]
    server_cpu = (c["mark1"]["cpu"] - c["mark0"]["cpu"]) / window
    client_cpu = c["client_cpu_s"] / window
    busy = c["machine_busy_s"] / window
    fps = c["fps"]
    return {
        "fps_per_viewer": fps, "fps_min": min(fps), "fps_mean": statistics.fmean(fps),
        "source_fps": (c["mark1"]["pushed"] - c["mark0"]["pushed"]) / window,
        "encoded_fps": (c["mark1"]["encoded"] - c["mark0"]["encoded"]) / window,
        "server_cpu_cores": server_cpu, "client_cpu_cores": client_cpu,
        "other_cores": max(0.0, busy - server_cpu - client_cpu),
        "first_frame_ms": c["first_frame_ms"],
        "first_frame_ms_p50": statistics.median(c["first_frame_ms"]),
        "window_s": window,
    }


# -- client process ----------------------------------------------------------------------------------
async def clients(url: str, n: int, seconds: float, warmup: float) -> dict[str, Any]:
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    set_host_addresses(LOOPBACK.host_addresses)
    counts = [0] * n
    first: list[float | None] = [None] * n
    tasks: list[asyncio.Task[None]] = []
    pcs, locations = [], []

    async def consume(i: int, track: Any) -> None:
        try:
            while True:
                await track.recv()
                counts[i] += 1
                if first[i] is None:
                    first[i] = time.monotonic()
        except MediaStreamError:
            pass

    async with ClientSession() as http:
        starts = []
        for i in range(n):
            pc = RTCPeerConnection(rtc_configuration(LOOPBACK))
            pc.addTransceiver("video", direction="recvonly")
            pc.on("track", lambda track, i=i: tasks.append(asyncio.ensure_future(consume(i, track))))
            await pc.setLocalDescription(await pc.createOffer())
            starts.append(time.monotonic())
            async with http.post(f"{url}/whep/{STREAM}", data=pc.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"}) as r:
                if r.status != 201:
                    raise SystemExit(f"WHEP POST answered {r.status}: {await r.text()}")
                answer, location = await r.text(), r.headers["Location"]
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            pcs.append(pc)
            locations.append(location)
        deadline = time.monotonic() + 30
        while any(f is None for f in first):
            if time.monotonic() > deadline:
                raise SystemExit(f"{sum(f is None for f in first)} of {n} viewers got no frame in 30 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(warmup)
        async with http.post(f"{url}/mark") as r:
            mark0 = await r.json()
        c0, cpu0, busy0, t0 = list(counts), cpu_seconds(), machine_busy_seconds(), time.monotonic()
        await asyncio.sleep(seconds)  # the measurement window
        c1, cpu1, busy1, t1 = list(counts), cpu_seconds(), machine_busy_seconds(), time.monotonic()
        async with http.post(f"{url}/mark") as r:
            mark1 = await r.json()
        for loc in locations:
            async with http.delete(f"{url}{loc}"):
                pass
    for pc in pcs:
        await pc.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    window = t1 - t0
    return {"window_s": window, "fps": [(b - a) / window for a, b in zip(c0, c1, strict=True)],
            "client_cpu_s": cpu1 - cpu0, "machine_busy_s": busy1 - busy0, "mark0": mark0, "mark1": mark1,
            "first_frame_ms": [1000 * (f - s) for f, s in zip(first, starts, strict=True)]}  # type: ignore[operator]


# -- main ------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--codec", default="VP8", choices=["VP8", "H264"])
    ap.add_argument("--modes", nargs="+", default=["shared", "per-viewer"], choices=["shared", "per-viewer"])
    ap.add_argument("--viewers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--seconds", type=float, default=10.0, help="measurement window per step")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds after every viewer has a picture")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "whep_viewers.json")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(clients(args.client, args.n, args.seconds, args.warmup))))
        return 0

    print(f"WHEP fan-out: {args.size} @ {args.fps:g} fps, {args.codec}, {os.cpu_count()} CPUs", flush=True)
    points = asyncio.run(serve_and_measure(args))
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "aiortc": version("aiortc"), "av": version("av")},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("client", "n")},
        "points": points,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"\n{args.size} @ {args.fps:g} fps, {args.codec}; CPU in cores (1.0 = one core busy); "
          "clients decode every frame")
    print("| mode | viewers | fps per viewer (min / mean) | encodes/s | server CPU | server CPU per viewer | "
          "clients CPU | other load | first frame p50 (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in points:
        enc = f"{p['encoded_fps']:.1f}" if p["mode"] == "shared" else "per viewer"
        print(f"| {p['mode']} | {p['viewers']} | {p['fps_min']:.1f} / {p['fps_mean']:.1f} | {enc} | "
              f"{p['server_cpu_cores']:.2f} | {p['server_cpu_cores'] / p['viewers']:.3f} | "
              f"{p['client_cpu_cores']:.2f} | {p['other_cores']:.2f} | {p['first_frame_ms_p50']:.0f} |")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
