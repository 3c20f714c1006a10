"""What crossing to the detection stage process costs a frame (`run --workers N`).

A worker's handle on the stage (RemoteStage) sends frames of one size through shared-memory slots
to a stage server (StageServer, in a child process as in the product) whose detector does nothing,
as fast as the answers come back, a window of frames in flight. Per frame size it reports frames/s
and the CPU time per frame of the worker side and of the stage side (from /proc of each process):
the overhead the multi-process mode adds to every frame, to weigh against the cores it frees.

Run: ``python benchmarks/stage_transport.py [--seconds 4] [--out benchmarks/results]``; prints a
table and writes ``stage_transport.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from machine import commit, cpu_model  # noqa: E402

from stream.config import parse_config  # noqa: E402
from stream.core.detections import Detections, FrameRef  # noqa: E402
from stream.core.frames import Frame, Job, JobQueue  # noqa: E402
from stream.core.metrics import Metrics  # noqa: E402
from stream.core.yuv import I420  # noqa: E402
from stream.live.frame_ring import SlotWriter, remove_prefix, shm_root  # noqa: E402
from stream.live.remote_stage import RemoteStage  # noqa: E402

KEY = b"t" * 32
SIZES = ((640, 360), (1280, 720), (1920, 1080))


def looks_at_nothing() -> Any:
    """The stage's detector: answers at once, so only the crossing is measured."""

    def detect(images: list[np.ndarray], refs: Sequence[FrameRef] | None = None) -> list[Detections]:
        return [Detections(observed=frozenset()) for _ in images]

    return detect


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(stage_pid: int, address: str, size: tuple[int, int], seconds: float,
            window: int) -> dict[str, Any]:
    w, h = size
    stage = RemoteStage(address, KEY, SlotWriter(shm_root(), f"transport-{os.getpid()}-"), Metrics(),
                        connect_timeout_s=30)
    stage.start()
    streams = [JobQueue(f"s{i}", 4) for i in range(window)]
    for q in streams:
        stage.attach(q)
    image = I420(np.full((h * 3 // 2, w), 128, np.uint8))
    seq = 0
    pending: list[Job] = []
    done = 0
    try:
        while not stage.ready:
            time.sleep(0.05)  # the stage process accepts the connection; polled once at start
        t0, w0, s0 = time.perf_counter(), cpu_seconds(os.getpid()), cpu_seconds(stage_pid)
        while time.perf_counter() - t0 < seconds:
            while len(pending) < window:
                seq += 1
                job = Job(Frame(f"s{seq % window}", seq, image, time.monotonic(), time.time()),
                          deadline=time.monotonic() + 5)
                pending.append(job)
                streams[seq % window].put(job)
            head = pending.pop(0)
            head.wait(5)
            done += head.detections is not None
        elapsed = time.perf_counter() - t0
        worker_cpu, stage_cpu = cpu_seconds(os.getpid()) - w0, cpu_seconds(stage_pid) - s0
    finally:
        stage.stop(1.0)
    return {"size": f"{w}x{h}", "frame_bytes": image.data.nbytes, "frames": done,
            "frames_per_s": round(done / elapsed, 1),
            "worker_cpu_ms_per_frame": round(1000 * worker_cpu / max(1, done), 3),
            "stage_cpu_ms_per_frame": round(1000 * stage_cpu / max(1, done), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--window", type=int, default=8, help="frames in flight (one per stream)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    from stream.live.stage_process import stage_main

    ctx = mp.get_context("spawn")
    run_dir = Path(tempfile.mkdtemp(prefix="transport-"))
    address = str(run_dir / "stage.sock")
    recv, send = ctx.Pipe(duplex=False)
    cfg = parse_config({"batcher": {"max_batch": 8, "max_wait_ms": 0}, "queue_size": 4})
    proc = ctx.Process(target=stage_main, daemon=True, kwargs={
        "config": cfg, "address": address, "authkey": KEY, "shm_dir": str(shm_root()), "report": send,
        "parent_pid": os.getpid(), "factory": looks_at_nothing})
    proc.start()
    rows = []
    try:
        recv.recv()  # the first heartbeat: the stage is listening
        for size in SIZES:
            rows.append(measure(proc.pid, address, size, args.seconds, args.window))
            print(rows[-1], flush=True)
    finally:
        proc.kill()
        remove_prefix(shm_root(), f"transport-{os.getpid()}-")
        shutil.rmtree(run_dir, ignore_errors=True)
    doc = {"benchmark": "stage_transport", "cpu": cpu_model(), "cores": os.cpu_count(), "commit": commit(),
           "seconds": args.seconds, "window": args.window, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stage_transport.json").write_text(json.dumps(doc, indent=2) + "\n")
    print("\n| frame | bytes | frames/s | worker CPU ms/frame | stage CPU ms/frame |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['frame_bytes']:,} | {r['frames_per_s']} | "
              f"{r['worker_cpu_ms_per_frame']} | {r['stage_cpu_ms_per_frame']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
