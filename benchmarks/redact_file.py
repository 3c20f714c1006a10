"""File-redaction throughput: `stream-redact redact` next to `deface` on the same real clip and CPU.

Why: "real-time" is a claim about frames per second on the hardware people have, and the tool
people use today for the same job is deface (CenterFace, one model, no tracking). This runs both
as subprocesses on the sample clip (see ``stream/samples.py``) at each size, wall-clock timed
over a few repetitions (median reported), counts in how many frames each one masked a face, and
times each stream-redact detector alone on decoded frames so the total can be explained.

    .venv/bin/python benchmarks/redact_file.py --deface /tmp/deface-venv/bin/deface \\
        --variant default= --variant "faces-only=--no-plates --no-heads"

Writes benchmarks/results/redact_file.json and prints markdown tables. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from machine import busy_cpu_s, commit  # noqa: E402

from stream import samples  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "redact_file.json"
DEFAULT_SECONDS = 5.0
"""120 frames: stream-redact runs at about 1 frame/s on 2 cores today, so 10 s cuts, two sizes and two
reps would take over 15 minutes; pass --seconds 10 for the full sample cuts."""

# Runs `deface` exactly as its console script does, but counts per frame what CenterFace found
# (deface masks every detection of the frame, nothing else), so deface gets a "frames with a face
# masked" figure like stream-redact's masks JSON. The wrapper costs one Python call per frame.
DEFACE_COUNTING_WRAPPER = r"""
import json, sys
from deface.centerface import CenterFace
from deface.deface import main
counts = {"frames": 0, "face_frames": 0, "faces": 0}
_call = CenterFace.__call__
def _counted(self, *a, **k):
    dets, lms = _call(self, *a, **k)
    counts["frames"] += 1
    counts["faces"] += len(dets)
    counts["face_frames"] += int(len(dets) > 0)
    return dets, lms
CenterFace.__call__ = _counted
out, sys.argv = sys.argv[1], ["deface", *sys.argv[2:]]
try:
    rc = main()
finally:
    with open(out, "w") as f:
        json.dump(counts, f)
sys.exit(rc)
"""


@dataclass
class Run:
    """One tool configuration on one clip size; ``walls`` has one entry per repetition."""

    tool: str
    variant: str
    size: str
    args: list[str]
    frames: int = 0
    walls: list[float] = field(default_factory=list)
    reported_fps: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # CPU seconds the tool used (user + sys)
    other_cores: list[float] = field(default_factory=list)  # mean cores busy with anything else meanwhile
    face_frames: int | None = None
    face_regions: int | None = None
    plate_regions: int | None = None
    error: str | None = None
    note: str = ""

    @property
    def wall(self) -> float | None:
        return statistics.median(self.walls) if self.walls else None

    @property
    def fps(self) -> float | None:
        return self.frames / self.wall if self.wall else None

    @property
    def best_fps(self) -> float | None:
        """From the fastest rep: other load only ever adds time, so this is the least disturbed."""
        return self.frames / min(self.walls) if self.walls else None

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["wall_median_s"] = self.wall
        d["fps_wall"] = self.fps
        d["wall_min_s"] = min(self.walls) if self.walls else None
        d["fps_wall_best"] = self.best_fps
        d["reported_fps_median"] = statistics.median(self.reported_fps) if self.reported_fps else None
        return d


def cli_default(option: str, fallback: Any) -> Any:
    """The default `stream-redact redact` gives ``option`` today, so the timings follow the CLI."""
    try:
        from stream.cli import build_parser

        return getattr(build_parser().parse_args(["redact", "in.mp4", "-o", "out.mp4"]), option, fallback)
    except (ImportError, SystemExit):
        return fallback


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        w, _, h = part.strip().lower().partition("x")
        if not (w.isdigit() and h.isdigit()):
            raise SystemExit(f"bad --sizes entry {part!r}: use WxH[,WxH...], e.g. 640x360,1280x720")
        out.append((int(w), int(h)))
    return out


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name=args`` (args may be empty); a bare arg string is its own name."""
    name, sep, rest = text.partition("=")
    if sep and name and " " not in name and not name.startswith("-"):
        return name, shlex.split(rest)
    return (text or "default"), shlex.split(text)


def count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def interpreter_of(exe: Path) -> str | None:
    """The Python that runs a console script (its shebang), so deface can be wrapped."""
    try:
        first = exe.read_bytes()[:256].split(b"\n", 1)[0].decode()
    except OSError:
        return None
    if first.startswith("#!") and "python" in first:
        parts = shlex.split(first[2:])
        return parts[-1] if parts[0].endswith("env") else parts[0]
    return None


def machine_info(deface: Path | None) -> dict[str, Any]:
    import av
    import numpy
    import onnxruntime

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "numpy": numpy.__version__,
        "pyav": av.__version__,
        "loadavg_start": os.getloadavg(),
    }
    try:
        import cv2

        info["opencv"] = cv2.__version__
    except ImportError:
        pass
    info["stream_redact_commit"] = commit()
    py = interpreter_of(deface) if deface else None
    if py:
        probe = ("import deface, onnxruntime; "
                 "print(deface.__version__, onnxruntime.__version__, *onnxruntime.get_available_providers())")
        res = subprocess.run([py, "-c", probe], capture_output=True, text=True)
        if res.returncode == 0:
            ver, ort_ver, *providers = res.stdout.split()
            info.update(deface=ver, deface_onnxruntime=ort_ver, deface_onnxruntime_providers=providers)
    return info



def run_timed(run: Run, cmd: list[str], timeout: float) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall time of ``cmd``; also records its CPU time and how busy the machine was with other work."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ru0, busy0 = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    ru1, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_s()
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    run.cpu_s.append(round(cpu, 2))
    if busy0 is not None and busy1 is not None:
        run.other_cores.append(round(max(0.0, busy1 - busy0 - cpu) / wall, 2))
    return wall, proc


def tail(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
    return " | ".join(lines[-n:])


def bench_stream_redact(run: Run, exe: str, clip: Path, work: Path, timeout: float) -> None:
    out, masks = work / "sr.mp4", work / "sr.json"
    cmd = [exe, "redact", str(clip), "-o", str(out), "--masks-json", str(masks), "--no-progress", *run.args]
    wall, proc = run_timed(run, cmd, timeout)
    if proc.returncode != 0:
        run.error = f"exit {proc.returncode}: {tail(proc.stderr)}"
        return
    run.walls.append(wall)
    m = re.search(r"([\d.]+) frames/s", proc.stderr)
    if m:
        run.reported_fps.append(float(m.group(1)))
    doc = json.loads(masks.read_text())
    frames = doc["frames"]
    if len(frames) != run.frames:
        run.note += f"masks JSON has {len(frames)} frames, clip has {run.frames}; "
    labels = [[r["label"] for r in f["regions"]] for f in frames]
    run.face_frames = sum("face" in ls for ls in labels)
    run.face_regions = sum(ls.count("face") for ls in labels)
    run.plate_regions = sum(ls.count("plate") for ls in labels)


def bench_deface(run: Run, exe: Path, clip: Path, work: Path, timeout: float) -> None:
    out, counts = work / "df.mp4", work / "df.json"
    counts.unlink(missing_ok=True)
    py = interpreter_of(exe)
    if py:
        cmd = [py, "-c", DEFACE_COUNTING_WRAPPER, str(counts), str(clip), "-o", str(out), *run.args]
    else:
        cmd = [str(exe), str(clip), "-o", str(out), *run.args]
        run.note = "not a Python script: ran as is, no face counts; "
    wall, proc = run_timed(run, cmd, timeout)
    if proc.returncode != 0 or not out.is_file():
        run.error = f"exit {proc.returncode}: {tail(proc.stderr + proc.stdout)}"
        return
    run.walls.append(wall)
    m = re.findall(r"\[[\d:]+<[\d:?]+,\s*([\d.]+)it/s\]", proc.stderr)
    if m:
        run.reported_fps.append(float(m[-1]))  # tqdm's final average rate
    if counts.is_file():
        c = json.loads(counts.read_text())
        run.face_frames, run.face_regions = c["face_frames"], c["faces"]
        if c["frames"] != run.frames:
            run.note += f"deface saw {c['frames']} frames, clip has {run.frames}; "


def detector_configs(providers: tuple[str, ...], threads: int, input_size: int | None,
                     int8: bool = True) -> dict[str, Any]:
    """The default FrameDetector config, and one config per model with only that model on.

    Built from ``DetectorConfig()`` so the timings follow whatever the detection stage defaults
    to today (input sizes, thresholds); YuNet, not on by default, borrows the face model's settings.
    """
    from stream.detect.ensemble import DetectorConfig

    def sized(m: Any) -> Any:
        if m is None or input_size is None:
            return m
        m = replace(m, input_size=input_size)
        if getattr(m, "min_input", None) is not None:
            m = replace(m, min_input=min(m.min_input, input_size))
        return m

    def only(faces: dict[str, Any] | None = None, plate: Any = None, person: Any = None) -> Any:
        cfg = DetectorConfig(providers=providers, threads=threads, int8=int8)
        cfg.faces, cfg.plate, cfg.person_heads = faces or {}, sized(plate), sized(person)
        cfg.faces = {k: sized(v) for k, v in cfg.faces.items()}
        return cfg

    base = DetectorConfig(providers=providers, threads=threads, int8=int8)
    face = next(iter(base.faces.values()))
    configs: dict[str, Any] = {
        "centerface": only(faces={"centerface": replace(base.faces.get("centerface", face))}),
        "yunet": only(faces={"yunet": replace(face, threshold=0.5)}),
    }
    if base.plate is not None:
        configs["plate"] = only(plate=replace(base.plate))
    if base.person_heads is not None:
        configs["person"] = only(person=replace(base.person_heads))
    configs["FrameDetector(default)"] = only(
        faces={k: replace(v) for k, v in base.faces.items()},
        plate=base.plate and replace(base.plate), person=base.person_heads and replace(base.person_heads))
    return configs


def bench_detectors(clip: Path, n_frames: int, batch: int, threads: int, providers: tuple[str, ...],
                    reps: int, input_size: int | None = None, int8: bool = True) -> dict[str, Any]:
    """ms/frame of each stream-redact model alone and of the whole FrameDetector, on decoded frames.

    One untimed warm-up batch per model (session start and first-run allocation are not per-frame
    costs); the best of ``reps`` passes is kept, as other load only ever adds time.
    """
    import av

    from stream.detect.ensemble import FrameDetector

    with av.open(str(clip)) as c:
        decoded = zip(range(n_frames), c.decode(video=0), strict=False)
        frames = [f.to_ndarray(format="bgr24") for _, f in decoded]
    out: dict[str, Any] = {"frames": len(frames), "batch": batch}
    for name, cfg in detector_configs(providers, threads, input_size, int8).items():
        t0 = time.perf_counter()
        model = FrameDetector(cfg)
        load = time.perf_counter() - t0
        model(frames[:batch])
        best, hits, other = float("inf"), 0, 0.0
        for _ in range(reps):
            ru0, busy0 = resource.getrusage(resource.RUSAGE_SELF), busy_cpu_s()
            t0 = time.perf_counter()
            dets = [d for i in range(0, len(frames), batch) for d in model(frames[i : i + batch])]
            dt = time.perf_counter() - t0
            ru1, busy1 = resource.getrusage(resource.RUSAGE_SELF), busy_cpu_s()
            if dt < best and busy0 is not None and busy1 is not None:
                own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
                other = max(0.0, busy1 - busy0 - own) / dt
            best = min(best, dt)
            hits = sum(1 for d in dets if len(d))
        models = {k: asdict(v) for k, v in cfg.faces.items()}
        for key, m in (("plate", cfg.plate), ("person", cfg.person_heads)):
            if m is not None:
                models[key] = asdict(m)
        out[name] = {"ms_per_frame": 1000 * best / len(frames), "load_s": load,
                     "frames_with_detections": hits, "other_cores": round(other, 2), "config": models,
                     "weights": [m.version for m in model.models]}
        print(f"  detector {name}: {out[name]['ms_per_frame']:.1f} ms/frame, "
              f"{hits}/{len(frames)} frames with detections", file=sys.stderr, flush=True)
    return out


def fmt(v: float | int | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def tables(runs: list[Run], detectors: dict[str, Any], reps: int) -> str:
    lines = [
        "Wall time covers the whole process; 'CPU s' is the tool's user+sys time; 'other load' is the "
        "most cores that anything else kept busy during a rep (should be ~0).",
        "",
        f"| tool | variant | size | frames | wall s (median of {reps}) | fps (wall) | fps (best rep) "
        "| fps (tool says) "
        "| CPU s | other load | frames with face masked | face regions | plate regions | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        rep = statistics.median(r.reported_fps) if r.reported_fps else None
        note = (f"FAILED {r.error}" if r.error else r.note).replace("|", "/").strip("; ")
        face = f"{r.face_frames}/{r.frames}" if r.face_frames is not None else "-"
        cpu = statistics.median(r.cpu_s) if r.cpu_s else None
        other = max(r.other_cores) if r.other_cores else None
        lines.append(f"| {r.tool} | {r.variant} | {r.size} | {r.frames} | {fmt(r.wall, '.2f')} "
                     f"| {fmt(r.fps)} | {fmt(r.best_fps)} | {fmt(rep)} | {fmt(cpu)} | {fmt(other, '.2f')} "
                     f"| {face} | {fmt(r.face_regions, 'd')} | {fmt(r.plate_regions, 'd')} | {note} |")
    if detectors:
        names = [k for k in next(iter(detectors.values())) if k not in ("frames", "batch")]
        lines += ["", "Detector only, ms/frame (frames with any output box) on decoded frames. "
                  "Alone, the person model outputs only head boxes for people shorter than 160 px.", "",
                  "| size | frames | batch | " + " | ".join(names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        first = next(iter(detectors.values()))
        settings = []
        for n in names:
            for key, m in first[n].get("config", {}).items():
                lo = f" (min {m['min_input']})" if m.get("min_input") else ""
                settings.append(f"{n}: {key} input {m['input_size']}{lo}, threshold {m['threshold']}")
        for size, d in detectors.items():
            cells = []
            for n in names:
                busy = d[n].get("other_cores", 0)
                cells.append(f"{d[n]['ms_per_frame']:.1f} ({d[n]['frames_with_detections']})"
                             + (f" [other load {busy:.1f}]" if busy > 0.2 else ""))
            lines.append(f"| {size} | {d['frames']} | {d['batch']} | " + " | ".join(cells) + " |")
        if settings:
            lines += ["", "Settings (the detection stage's defaults unless --det-input-size): "
                      + "; ".join(s for s in settings if not s.startswith("FrameDetector")) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    dflt = " (default: %(default)s)"
    p.add_argument("--sample", default=samples.DEFAULT_SAMPLE, choices=sorted(samples.SAMPLES),
                   help="sample clip, see `python -m stream.samples list`" + dflt)
    p.add_argument("--sizes", default="640x360,1280x720", help="clip sizes, comma separated" + dflt)
    p.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                   help="clip length; cuts are cached in the samples directory" + dflt)
    p.add_argument("--reps", type=int, default=2, help="timed runs of each row, median reported" + dflt)
    p.add_argument("--stream-redact", default=str(Path(sys.executable).with_name("stream-redact")),
                   help="stream-redact executable" + dflt)
    p.add_argument("--variant", action="append", metavar="NAME=ARGS",
                   help="a stream-redact configuration, repeatable, e.g. \"yunet=--face-model yunet\" "
                        "(none given: one variant 'default' with no extra args)")
    p.add_argument("--variants", default=None, metavar="NAME=ARGS;NAME=ARGS",
                   help="the same as several --variant, separated by ';'")
    p.add_argument("--extra-args", default="", help="arguments added to every stream-redact variant")
    p.add_argument("--deface", type=Path, default=None,
                   help="deface executable (e.g. /tmp/deface-venv/bin/deface); without it the row is skipped")
    p.add_argument("--deface-variant", action="append", metavar="NAME=ARGS",
                   help="a deface configuration, repeatable, e.g. \"scale640=--scale 640x360\" "
                        "(none given: one variant 'default' with no args)")
    p.add_argument("--no-detectors", action="store_true", help="skip the detector-only timings")
    p.add_argument("--det-frames", type=int, default=16, help="frames for detector-only timings" + dflt)
    p.add_argument("--det-batch", type=int, default=cli_default("batch", 1),
                   help="detector-only batch size, as the CLI's" + dflt)
    p.add_argument("--det-threads", type=int, default=0, help="ORT threads per model, 0: ORT's own" + dflt)
    p.add_argument("--det-providers", default="cuda,cpu", help="ORT providers, as the CLI's" + dflt)
    p.add_argument("--det-input-size", type=int, default=None,
                   help="input size for every model (default: the detection stage's own defaults)")
    p.add_argument("--det-int8", choices=["auto", "off"], default="auto",
                   help="int8 plate and person weights on the CPU, as `redact --int8`" + dflt)
    p.add_argument("--timeout", type=float, default=900, help="seconds before a run counts as failed" + dflt)
    p.add_argument("--keep-outputs", type=Path, default=None, help="keep redacted videos and JSON here")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT, help="JSON results file" + dflt)
    args = p.parse_args(argv)

    args.command_line = ["benchmarks/redact_file.py", *(argv if argv is not None else sys.argv[1:])]
    sizes = parse_sizes(args.sizes)
    specs = list(args.variant or [])
    if args.variants:
        specs += [s for s in args.variants.split(";") if s.strip()]
    extra = shlex.split(args.extra_args)
    sr_variants = [(n, [*a, *extra]) for n, a in map(parse_variant, specs or ["default="])]
    deface = args.deface
    deface_note = None
    if deface is not None and not (deface.is_file() and os.access(deface, os.X_OK)):
        resolved = shutil.which(str(deface))
        deface = Path(resolved) if resolved else None
        if deface is None:
            deface_note = f"--deface {args.deface} is not an executable file: deface rows skipped"
    elif deface is None:
        deface_note = "no --deface given: deface rows skipped"
    df_variants = [parse_variant(s) for s in (args.deface_variant or ["default="])] if deface else []
    if deface_note:
        print(f"note: {deface_note}", file=sys.stderr)

    info = machine_info(deface)
    cores = info["cpus_usable"] or info["cpu_count"] or 1
    if info["loadavg_start"][0] > 0.5 * cores:
        print(f"warning: load average {info['loadavg_start'][0]:.1f} on {cores} CPUs: something else is "
              "running, timings will be low and noisy", file=sys.stderr)

    work_root = Path(tempfile.mkdtemp(prefix="bench-redact-"))
    try:
        return _bench(args, info, sizes, sr_variants, deface, df_variants, deface_note, work_root)
    except samples.SampleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work_root, ignore_errors=True)


def _bench(args: argparse.Namespace, info: dict[str, Any], sizes: list[tuple[int, int]],
           sr_variants: list[tuple[str, list[str]]], deface: Path | None,
           df_variants: list[tuple[str, list[str]]], deface_note: str | None, work_root: Path) -> int:
    clips = samples.ensure_variants(args.sample, sizes, args.seconds, log=lambda m: print(m, file=sys.stderr))
    runs: list[Run] = []
    detectors: dict[str, Any] = {}
    t_start = time.perf_counter()
    for size, clip in clips.items():
        n = count_frames(clip)
        print(f"== {size}: {clip} ({n} frames)", file=sys.stderr, flush=True)
        if not args.no_detectors:
            detectors[size] = bench_detectors(clip, args.det_frames, args.det_batch, args.det_threads,
                                              tuple(args.det_providers.split(",")), reps=2,
                                              input_size=args.det_input_size,
                                              int8=args.det_int8 == "auto")
        size_runs = [Run("stream-redact", name, size, a, frames=n) for name, a in sr_variants]
        size_runs += [Run("deface", name, size, a, frames=n) for name, a in df_variants]
        runs += size_runs
        for rep in range(args.reps):  # interleaved, so drift in machine load hits every row alike
            for r in size_runs:
                if r.error:
                    continue
                work = work_root / f"{r.tool}-{r.variant}-{size}"
                work.mkdir(exist_ok=True)
                try:
                    if r.tool == "deface":
                        assert deface is not None
                        bench_deface(r, deface, clip, work, args.timeout)
                    else:
                        bench_stream_redact(r, args.stream_redact, clip, work, args.timeout)
                except subprocess.TimeoutExpired:
                    r.error = f"timed out after {args.timeout:g} s"
                last = f"{r.walls[-1]:.1f} s" if r.walls and not r.error else r.error
                if r.other_cores:
                    last += f", other load {r.other_cores[-1]:.2f} cores"
                print(f"  rep {rep + 1}/{args.reps} {r.tool} [{r.variant}] {' '.join(r.args)}: {last}",
                      file=sys.stderr, flush=True)
                if args.keep_outputs and rep == 0:
                    args.keep_outputs.mkdir(parents=True, exist_ok=True)
                    for f in work.iterdir():
                        shutil.copy2(f, args.keep_outputs / f"{work.name}-{f.name}")
    total = time.perf_counter() - t_start

    info["loadavg_end"] = os.getloadavg()
    table = tables(runs, detectors, args.reps)
    result = {
        "benchmark": "redact_file",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "sample": {"name": args.sample, **asdict(samples.SAMPLES[args.sample]), "seconds": args.seconds},
        "command": args.command_line,
        "machine": info,
        "reps": args.reps,
        "total_s": round(total, 1),
        "notes": [n for n in [deface_note] if n],
        "runs": [r.as_json() for r in runs],
        "detectors": detectors,
        "table_markdown": table,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.output)
    cpus = info["cpus_usable"] or info["cpu_count"]
    print(f"\n{info['cpu_model']}, {cpus} CPUs, onnxruntime {info['onnxruntime']}, "
          f"load {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}, {total:.0f} s total\n")
    print(table)
    if deface_note:
        print(f"\nnote: {deface_note}")
    print(f"\nwrote {args.output}")
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
