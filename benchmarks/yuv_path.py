"""Per-frame cost of each step of the live path on BGR frames and on I420 frames, step by step.

Why: a live frame used to be converted to BGR after decoding and back to 4:2:0 before encoding,
and the detector shrank the full-size BGR frame to its input. The I420 path keeps the decoder's
planes, paints masks on them, hands them to the encoder as they are, and converts to BGR only for
the detector, shrunk on the planes first. This times each step both ways on real decoded frames
of the sample clip (``python -m stream.samples fetch``), one frame at a time:

- decode to ndarray: a decoded ``av.VideoFrame`` to what the pipeline carries (``to_ndarray("bgr24")``,
  an swscale conversion, against :func:`stream.core.yuv.decoded_picture`, a copy of the planes);
- detector input: the frame to the model's letterboxed canvas at ``--input`` (the ``fast``
  preset's 640): BGR letterboxed as it is, against :func:`stream.detect.ensemble.detector_input`
  (planes shrunk, converted once) then letterboxed;
- painting: ``--masks`` masks (faces as blurred ellipses, plates as blurred rectangles) by the
  default redactor;
- encoder input: the painted picture to the ``av.VideoFrame`` libx264 takes (BGR: OpenCV's
  BGR2YUV_I420 conversion; I420: the planes copied in);
- the sum (decoding the H.264 itself and encoding it are the same on both paths and not counted).

    .venv/bin/python benchmarks/yuv_path.py            # writes results/yuv_path.json
    .venv/bin/python benchmarks/yuv_path.py --sizes 640x360 --reps 5

Reported: median ms per frame of each step over reps x frames, and the other load on the machine
meanwhile (busy cores besides this process, from /proc/stat).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import busy_cpu_s, clip_args, commit, cpu_model  # noqa: E402

from stream import samples  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "yuv_path.json"
STEPS = ("decode to ndarray", "detector input", "painting", "encoder input")


class Model:
    """Just what :func:`detector_input` asks of a model: the long side it letterboxes a frame to."""

    def __init__(self, input_size: int, min_input: int | None) -> None:
        self.input_size, self.min_input = input_size, min_input

    def target_side(self, size: int) -> int:
        from stream.detect.letterbox import target_side

        return target_side(size, self.input_size, self.min_input)


def masks(width: int, height: int, n: int) -> Any:
    """``n`` detections spread over the frame: faces a fifth of the frame tall, every third a plate."""
    import numpy as np

    from stream.core.detections import Detections

    boxes, labels = [], []
    for i in range(n):
        plate = i % 3 == 2
        bh = height * (0.07 if plate else 0.2)
        bw = bh * (4.7 if plate else 0.8)
        x = (i + 0.5) * width / n - bw / 2
        y = height * (0.6 if plate else 0.25) + (i % 2) * height * 0.1
        boxes.append([x, y, x + bw, y + bh])
        labels.append("plate" if plate else "face")
    return Detections(np.array(boxes, np.float32), np.full(n, 0.9, np.float32), tuple(labels))


def settle_allocator() -> None:
    """Free one large array first, as a long-running pipeline has (its detector canvases).

    glibc serves allocations above its mmap threshold with fresh pages (a page fault per 4 KiB on
    first touch) and raises that threshold to the size of the largest mapped block freed. Until
    then every frame-sized array costs its page faults anew: ~0.8 ms per 640x360 BGR array here,
    more than the steps being compared, and only in a process that is new.
    """
    import numpy as np

    big = np.ones(24 << 20, np.uint8)
    del big


def time_size(frames: list[Any], input_size: int, n_masks: int, reps: int) -> dict[str, Any]:
    """Each rep runs every step of both paths once per frame; a step's samples are its per-frame ms."""
    from stream.core.h264 import video_frame
    from stream.core.redact import Redactor
    from stream.core.yuv import decoded_picture
    from stream.detect.ensemble import detector_input
    from stream.detect.letterbox import letterbox_batch

    width, height = frames[0].width, frames[0].height
    models = [Model(input_size, min(640, input_size))]
    due = [[True]]
    redactor = Redactor()
    dets = masks(width, height, n_masks)
    tb = Fraction(1, 90_000)

    def bgr_path(f: Any) -> list[Callable[[], Any]]:
        state: dict[str, Any] = {}

        def decode() -> None:
            state["img"] = f.to_ndarray(format="bgr24")

        return [decode,
                lambda: letterbox_batch([state["img"]], input_size, min_side=models[0].min_input),
                lambda: redactor.apply(state["img"], dets),
                lambda: video_frame(state["img"], 0, tb)]

    def yuv_path(f: Any) -> list[Callable[[], Any]]:
        state: dict[str, Any] = {}

        def decode() -> None:
            state["img"] = decoded_picture(f)

        def detector() -> None:
            bgr, _ = detector_input([state["img"]], models, due)  # type: ignore[arg-type]
            letterbox_batch(bgr, input_size, min_side=models[0].min_input)

        return [decode, detector, lambda: redactor.apply(state["img"], dets),
                lambda: video_frame(state["img"], 0, tb)]

    ms: dict[str, dict[str, list[float]]] = {p: {s: [] for s in STEPS} for p in ("bgr", "yuv")}
    other: list[float] = []
    for f in frames[:2]:  # first calls (allocations, OpenCV's thread pool) are not per-frame costs
        for steps in (bgr_path(f), yuv_path(f)):
            for step in steps:
                step()
    for _ in range(reps):
        t0, c0, b0 = time.perf_counter(), time.process_time(), busy_cpu_s()
        for f in frames:
            for path, steps in (("bgr", bgr_path(f)), ("yuv", yuv_path(f))):
                for name, step in zip(STEPS, steps, strict=True):
                    s = time.perf_counter()
                    step()
                    ms[path][name].append(1000 * (time.perf_counter() - s))
        dt, cpu, b1 = time.perf_counter() - t0, time.process_time() - c0, busy_cpu_s()
        if b0 is not None and b1 is not None:
            other.append(round(max(0.0, b1 - b0 - cpu) / dt, 2))
    medians = {p: {s: statistics.median(v) for s, v in steps.items()} for p, steps in ms.items()}
    for p in medians:
        medians[p]["sum"] = sum(medians[p][s] for s in STEPS)
    return {"width": width, "height": height, "format": frames[0].format.name, "samples": len(frames) * reps,
            "ms_median": medians, "other_cores": other}


def table(results: dict[str, dict[str, Any]], input_size: int, n_masks: int) -> str:
    lines = [f"| frame | step (detector input {input_size}, {n_masks} masks) | BGR path ms | I420 path ms "
             "| saved |", "|---|---|---|---|---|"]
    for size, r in results.items():
        for step in (*STEPS, "sum"):
            b, y = r["ms_median"]["bgr"][step], r["ms_median"]["yuv"][step]
            name = f"**{step}**" if step == "sum" else step
            lines.append(f"| {size} | {name} | {b:.2f} | {y:.2f} | {b - y:+.2f} ({(b - y) / b:+.0%}) |"
                         if b > 0 else f"| {size} | {name} | {b:.2f} | {y:.2f} | |")
    other = max((v for r in results.values() for v in r["other_cores"]), default=0)
    lines.append(f"\nother load on the machine meanwhile: up to {other:.2f} busy cores")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = clip_args(__doc__.split("\n\n")[0], 20, 15, "decoded frames per size", "reps over the frames")
    p.add_argument("--input", type=int, default=640, help="detector input size (default 640: fast preset)")
    p.add_argument("--masks", type=int, default=4, help="masks painted per frame (default 4)")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    import av
    import cv2

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    clips = samples.ensure_variants(samples.DEFAULT_SAMPLE, shapes, 5.0,
                                    log=lambda m: print(m, file=sys.stderr))
    settle_allocator()
    t_start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for size, clip in clips.items():
        with av.open(str(clip)) as c:
            frames = [f for _, f in zip(range(args.frames), c.decode(video=0), strict=False)]
        print(f"== {size}: {len(frames)} {frames[0].format.name} frames x {args.reps} reps", file=sys.stderr,
              flush=True)
        results[size] = time_size(frames, args.input, args.masks, args.reps)
    md = table(results, args.input, args.masks)
    print(md)
    doc = {
        "benchmark": "yuv_path", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": ["benchmarks/yuv_path.py", *(argv if argv is not None else sys.argv[1:])],
        "machine": {"cpu_count": os.cpu_count(), "opencv": cv2.__version__,
                    "opencv_threads": cv2.getNumThreads(), "pyav": av.__version__, "loadavg": os.getloadavg(),
                    "cpu_model": cpu_model(), "commit": commit()},
        "input": args.input, "masks": args.masks, "frames": args.frames, "reps": args.reps,
        "total_s": round(time.perf_counter() - t_start, 1), "results": results, "table": md,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
