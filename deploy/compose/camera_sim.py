"""Camera simulator for the compose stack: loops a clip and publishes it to a media server over RTSP.

A real camera serves H.264 over RTSP at its own frame rate, forever. This publishes each clip to
``rtsp://.../cams/<name>`` on MediaMTX in real time, without re-encoding (the packets of the file
are sent as they are, so it costs almost no CPU), loops it with timestamps that keep increasing,
and reconnects when the server is away. It runs in the stream-redact image (PyAV is there).

    python camera_sim.py rtsp://user:pass@mediamtx:8554/cams/lobby=/path/clip.mp4 [URL=CLIP ...]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import av

log = logging.getLogger("camera_sim")


def _masked(url: str) -> str:
    """The URL without its credentials, for logs."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}" if "@" in rest else url


def publish_once(url: str, clip: Path, stop: threading.Event, loops: int | None = None) -> int:
    """Publish ``clip`` to ``url`` until ``stop`` (or ``loops`` passes); returns packets sent."""
    sent = 0
    with av.open(str(clip)) as src:
        vin = src.streams.video[0]
        duration = float(src.duration / av.time_base) if src.duration else None
        out = av.open(url, "w", format="rtsp", options={"rtsp_transport": "tcp"}, timeout=(5, 10))
        try:
            vout = out.add_stream_from_template(vin)
            offset = 0.0  # seconds added to the clip's timestamps on each pass, so time only increases
            t0 = time.monotonic()
            passes = 0
            while not stop.is_set() and (loops is None or passes < loops):
                src.seek(0)
                last = 0.0
                for pkt in src.demux(vin):
                    if stop.is_set():
                        break
                    if pkt.dts is None or pkt.pts is None:
                        continue
                    tb = pkt.time_base
                    t = float(pkt.dts * tb)
                    last = max(last, float((pkt.pts + (pkt.duration or 0)) * tb))
                    delay = t0 + offset + t - time.monotonic()
                    if delay > 0 and stop.wait(delay):  # real time: a camera does not send ahead
                        break
                    shift = round(offset / tb)
                    pkt.pts += shift
                    pkt.dts += shift
                    pkt.stream = vout
                    out.mux(pkt)
                    sent += 1
                offset += duration or last
                passes += 1
        finally:
            out.close()
    return sent


def run_camera(url: str, clip: Path, stop: threading.Event) -> None:
    """Publish forever; a refused or dropped connection is retried with capped backoff."""
    wait = 0.5
    while not stop.is_set():
        try:
            log.info("publishing %s to %s", clip.name, _masked(url))
            publish_once(url, clip, stop)
            wait = 0.5
        except (av.FFmpegError, OSError) as e:
            log.warning("%s: %s; retrying in %.1f s", _masked(url), e, wait)
            stop.wait(wait)
            wait = min(wait * 2, 10.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cameras", nargs="+", metavar="URL=CLIP", help="where to publish which clip")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s camera_sim: %(message)s")
    pairs = []
    for item in args.cameras:
        url, sep, clip = item.rpartition("=")
        if not sep or not url.startswith("rtsp://") or not Path(clip).is_file():
            p.error(f"{item!r}: expected rtsp://host:port/path=/existing/clip.mp4")
        pairs.append((url, Path(clip)))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    threads = [threading.Thread(target=run_camera, args=(u, c, stop), daemon=True) for u, c in pairs]
    for t in threads:
        t.start()
    while not stop.wait(1.0):
        pass
    for t in threads:
        t.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
