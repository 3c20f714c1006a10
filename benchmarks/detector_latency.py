"""Per-model CPU latency at batch 1: each detector in fp32 and int8, at each input size tried, with
the ONNX Runtime thread settings tried.

Why: the cost of a redacted frame on a CPU is the sum of its detector runs, and each way of making
them cheaper (the frame's aspect ratio, a smaller input, int8 weights, thread settings) should
show its own gain. Every row is one ``FrameDetector`` with one model switched on, run on real
decoded frames of the sample clip (``python -m stream.samples fetch``), one frame per call; the
rows take turns so that a change in machine load hits all of them alike.

    .venv/bin/python benchmarks/detector_latency.py            # writes results/detector_latency.json
    .venv/bin/python benchmarks/detector_latency.py --sizes 640x360 --reps 5

Reported per row: median and best ms per frame (wall; letterboxing and decoding the output
included), CPU ms per frame (user + sys of this process: what the run takes from the other work
of the machine), the canvas the model ran on, frames with any output box, and the other load on
the machine meanwhile (from /proc/stat). A second table times the plate and person graphs alone
on a 640x640 square letterbox, the 640x384 canvas of a 16:9 frame and the 512x288 one.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from machine import busy_cpu_s, clip_args, commit, cpu_model  # noqa: E402

from stream import samples  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "detector_latency.json"


@dataclass
class Row:
    """One model, one weight file, one input size, one thread setting."""

    model: str
    int8: bool
    size: int
    threads: int
    spinning: bool = False
    ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)
    canvas: str = ""
    hits: int = 0
    weights: str = ""

    @property
    def name(self) -> str:
        spin = ", spinning" if self.spinning else ""
        return (f"{self.model} {'int8' if self.int8 else 'fp32'} @{self.size} "
                f"threads {self.threads or 'auto'}{spin}")


def parse_rows(models: list[str], sizes: dict[str, list[int]], threads: list[int],
               spinning: bool) -> list[Row]:
    rows = []
    for model in models:
        for size in sizes[model]:
            for t in threads:
                for q in ((False,) if model == "yunet" else (False, True)):
                    rows.append(Row(model, q, size, t))
                    if spinning and t != 1:
                        rows.append(Row(model, q, size, t, spinning=True))
    return rows


@contextlib.contextmanager
def spinning(on: bool) -> Iterator[None]:
    """Sessions made inside get ORT's worker spinning on (the project's sessions have it off)."""
    from stream.detect import runtime

    plain = runtime.session_options

    def spinning_options(threads: int = 0) -> Any:
        opts = plain(threads)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        return opts

    runtime.session_options = spinning_options if on else plain  # type: ignore[assignment]
    try:
        yield
    finally:
        runtime.session_options = plain  # type: ignore[assignment]


def build(row: Row, warmup: Any) -> Any:
    """A FrameDetector with only ``row``'s model on (settings of the ``fast`` preset otherwise),
    run once on ``warmup`` (session start and first-run allocations are not per-frame costs)."""
    from stream.detect.ensemble import FrameDetector
    from stream.detect.presets import detector_config

    cfg = detector_config("fast", providers=("cpu",), threads=row.threads, int8=row.int8,
                          plate_every=1, person_every=1, vehicle_plates=0)
    face = next(iter(cfg.faces.values()))
    if row.model != "yunet":
        cfg.faces = {}
    else:
        face.input_size = row.size
    if row.model == "plate":
        assert cfg.plate is not None
        cfg.plate.input_size = row.size
    else:
        cfg.plate = None
    if row.model == "person":
        assert cfg.person_heads is not None
        cfg.person_heads.input_size, cfg.person_heads.min_input = row.size, min(640, row.size)
    else:
        cfg.person_heads = None
    with spinning(row.spinning):  # the person model makes its session on first use
        det = FrameDetector(cfg)
        det(warmup)
    return det


def time_rows(rows: list[Row], frames: list[Any], reps: int) -> None:
    """Each rep runs every row once over all frames, one frame per call."""
    built = []
    for row in rows:
        det = build(row, frames[:1])
        model = det.models[0]
        row.weights = model.version
        row.canvas = "x".join(map(str, model.prepare(frames[:1])[0].canvas[::-1]))
        built.append(det)
    for _ in range(reps):
        for row, det in zip(rows, built, strict=True):
            t0, c0, b0 = time.perf_counter(), time.process_time(), busy_cpu_s()
            out = [det([f])[0] for f in frames]
            dt, cpu, b1 = time.perf_counter() - t0, time.process_time() - c0, busy_cpu_s()
            row.ms.append(1000 * dt / len(frames))
            row.cpu_ms.append(1000 * cpu / len(frames))
            if b0 is not None and b1 is not None:
                row.other.append(round(max(0.0, b1 - b0 - cpu) / dt, 2))
            row.hits = sum(1 for d in out if len(d))
        print(f"  rep done: {', '.join(f'{r.name} {r.ms[-1]:.1f}' for r in rows[:3])} ...",
              file=sys.stderr, flush=True)


CANVASES = ((640, 640), (384, 640), (288, 512))
"""square letterbox (what a fixed 640x640 export costs a 16:9 frame), 16:9 at 640, 16:9 at 512"""


def time_canvases(reps: int, n: int = 10) -> list[dict[str, Any]]:
    """The plate and person graphs alone (ONNX Runtime session, fixed input) on each canvas: what
    running a 16:9 frame at its own aspect ratio saves over the square letterbox."""
    import numpy as np
    import onnx

    from stream.detect.models import model_path
    from stream.detect.runtime import create_session
    from stream.detect.yolo import rebuild_for_shape

    rng = np.random.default_rng(0)
    rows = []
    for name in ("plate", "plate_int8", "person", "person_int8"):
        for h, w in CANVASES:
            path = model_path(name)
            model = onnx.load(str(path))
            session = create_session(rebuild_for_shape(model, h, w) if name.startswith("person") else model,
                                     ("cpu",))
            x = rng.random((1, 3, h, w), dtype=np.float32)
            feed = {session.get_inputs()[0].name: x}
            session.run(None, feed)
            rows.append({"graph": name, "canvas": f"{w}x{h}", "session": session, "feed": feed, "ms": []})
    for _ in range(reps):
        for r in rows:
            t0 = time.perf_counter()
            for _ in range(n):
                r["session"].run(None, r["feed"])
            r["ms"].append(1000 * (time.perf_counter() - t0) / n)
    return [{"graph": r["graph"], "canvas": r["canvas"], "ms_per_run": r["ms"],
             "ms_median": statistics.median(r["ms"])} for r in rows]


def table(results: dict[str, list[Row]]) -> str:
    lines = ["| frame | model | weights | input | canvas | ORT threads | ms/frame median (best) "
             "| CPU ms/frame | other load | frames with a box |", "|---|---|---|---|---|---|---|---|---|---|"]
    for size, rows in results.items():
        for r in rows:
            spin = ", spinning" if r.spinning else ""
            lines.append(
                f"| {size} | {r.model} | {'int8' if r.int8 else 'fp32'} | {r.size} | {r.canvas} "
                f"| {r.threads or 'auto'}{spin} | {statistics.median(r.ms):.1f} ({min(r.ms):.1f}) "
                f"| {statistics.median(r.cpu_ms):.1f} | {max(r.other, default=0):.2f} | {r.hits} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = clip_args(__doc__.split("\n\n")[0], 12, 3, "frames per row and rep", "reps; median and best reported")
    p.add_argument("--models", default="yunet,plate,person", help="models (default yunet,plate,person)")
    p.add_argument("--plate-sizes", default="640,512", help="plate input sizes (default 640,512)")
    p.add_argument("--person-sizes", default="640,512", help="person input sizes (default 640,512)")
    p.add_argument("--threads", default="0", help="ORT intra-op threads to try, 0: ORT's own (default 0)")
    p.add_argument("--spinning", action="store_true", help="also time each multi-thread row with "
                   "ORT's worker spinning on (off in the project's sessions)")
    p.add_argument("--no-canvases", action="store_true", help="skip the graph-alone canvas timings")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    import av
    import onnxruntime

    sizes = {"yunet": [640], "plate": [int(s) for s in args.plate_sizes.split(",")],
             "person": [int(s) for s in args.person_sizes.split(",")]}
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    clips = samples.ensure_variants(samples.DEFAULT_SAMPLE, shapes, 5.0,
                                    log=lambda m: print(m, file=sys.stderr))
    results: dict[str, list[Row]] = {}
    t_start = time.perf_counter()
    for size, clip in clips.items():
        with av.open(str(clip)) as c:
            frames = [f.to_ndarray(format="bgr24") for _, f in zip(range(args.frames), c.decode(video=0),
                                                                   strict=False)]
        rows = parse_rows(args.models.split(","), sizes, [int(t) for t in args.threads.split(",")],
                          args.spinning)
        print(f"== {size}: {len(rows)} rows", file=sys.stderr, flush=True)
        time_rows(rows, frames, args.reps)
        results[size] = rows
    canvases = time_canvases(args.reps) if not args.no_canvases else []
    md = table(results)
    if canvases:
        md += ("\n\nThe graphs alone, one run on a random input of each canvas (ms, median of "
               f"{args.reps} x 10 runs):\n\n| graph | " + " | ".join(f"{w}x{h}" for h, w in CANVASES)
               + " |\n|---|" + "---|" * len(CANVASES))
        for name in dict.fromkeys(c["graph"] for c in canvases):
            cells = [f"{c['ms_median']:.1f}" for c in canvases if c["graph"] == name]
            md += f"\n| {name} | " + " | ".join(cells) + " |"
    print(md)
    doc = {
        "benchmark": "detector_latency", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": ["benchmarks/detector_latency.py", *(argv if argv is not None else sys.argv[1:])],
        "machine": {"cpu_count": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
                    "loadavg": os.getloadavg(), "cpu_model": cpu_model(), "commit": commit()},
        "frames": args.frames, "reps": args.reps, "total_s": round(time.perf_counter() - t_start, 1),
        "rows": {size: [{"name": r.name, "model": r.model, "int8": r.int8, "input": r.size,
                         "canvas": r.canvas, "threads": r.threads, "spinning": r.spinning,
                         "weights": r.weights,
                         "ms_per_frame": r.ms, "ms_median": statistics.median(r.ms), "ms_best": min(r.ms),
                         "cpu_ms_per_frame": r.cpu_ms, "other_cores": r.other, "frames_with_box": r.hits}
                        for r in rows] for size, rows in results.items()},
        "canvases": canvases,
        "table": md,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
