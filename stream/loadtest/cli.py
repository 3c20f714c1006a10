"""`stream-redact bench`: the load-test harness on the command line.

Why in the product CLI: operators load-test a deployment before it carries real cameras, with
the same tool they run it with. One K (`--streams`) gives one measured point; `--ramp` sweeps K
per mode until a target breaks, and ``--workers 1 2`` repeats every point with the pipeline run as
one process and as two stream worker processes (``run --workers N``), so that capacity can be
compared. Progress goes to stderr while it runs; the report is a JSON file
and a self-contained HTML page, and a short table is printed at the end. ``bench report JSON``
rebuilds the page from the JSON, so only the JSON needs to be kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from stream.core.urls import mask_url
from stream.loadtest.driver import (
    BASELINE_WORKER,
    MAX_WORKERS,
    MODES,
    NO_DETECTION,
    NoBaselineWorker,
    RunSpec,
    calibrate,
    find_baseline_worker,
    run_point,
)
from stream.loadtest.ramp import ramp, ratios
from stream.loadtest.report import table, write_html, write_json


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use WIDTHxHEIGHT, e.g. 640x360") from None
    if w < 256 or h < 128 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"{text!r}: width >= 256 and height >= 128, both even")
    return w, h


def _ks(text: str) -> list[int]:
    try:
        ks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated list, e.g. 1,2,3,4") from None
    if not ks or min(ks) < 1 or max(ks) > 255:
        raise argparse.ArgumentTypeError(f"{text!r}: stream counts 1..255")
    return ks


def _bounded(kind: type, lo: float, hi: float, what: str) -> Any:
    """An argparse type: a number of ``kind`` within [lo, hi], with an error that says so."""
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{text!r}: {what} must be between {lo:g} and {hi:g}")
        return v
    return parse


def _url(*schemes: str) -> Any:
    def parse(text: str) -> str:
        scheme, sep, rest = text.partition("://")
        if not sep or scheme.lower() not in schemes or not rest.strip("/"):
            raise argparse.ArgumentTypeError(
                f"{mask_url(text)!r} is not a {' or '.join(schemes)} URL; write "
                f"{schemes[0]}://host:port")
        return text
    return parse


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` on the CLI's subparsers and return its parser."""
    p = subparsers.add_parser(
        "bench", help="load-test a pipeline with synthetic cameras (latency, fps, leaks, capacity)",
        description=__doc__.split("\n")[0] + " Synthetic RTSP cameras with stamped frames and known faces "
        "and plates go through a pipeline; the outputs are read back and checked frame by frame.")
    g = p.add_argument_group("load")
    g.add_argument("--streams", type=_bounded(int, 1, 255, "a stream count"), default=2,
                   help="synthetic cameras for a single run (default 2)")
    g.add_argument("--ramp", type=_ks, metavar="K1,K2,...",
                   help="sweep these stream counts per mode, stopping a mode at its first failure")
    g.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="redact (preset, batching on), redact-b1 (max_batch 1), redact-faces (faces only), "
                        "redact-faces-b1, "
                        "transcode (no detection: the ceiling), no-redact (no detection, leaks judged: shows "
                        "the leak check fails). Default: redact; with --ramp all but no-redact. transcode "
                        f"and no-redact run {BASELINE_WORKER} of a source checkout (see --baseline-worker)")
    g.add_argument("--size", type=_size, nargs="+", default=[(640, 360)], metavar="WxH",
                   help="camera resolution(s) (default 640x360)")
    g.add_argument("--fps", type=_bounded(float, 1, 120, "frames per second"), default=25.0)
    g.add_argument("--bitrate-kbps", type=_bounded(int, 50, 100_000, "a bitrate in kbps"), default=1500,
                   help="camera and output bitrate")
    g.add_argument("--faces", type=_bounded(int, 0, 8, "faces per camera"), default=2,
                   help="faces per camera (default 2)")
    g.add_argument("--plates", type=_bounded(int, 0, 8, "plates per camera"), default=1,
                   help="plates per camera (default 1)")
    g.add_argument("--appearing", action="store_true",
                   help="faces and plates vanish and come back whole mid-frame (in view 2 s, out 1 s), so "
                        "their first frames are judged too: what a detector's cadence leaves open")
    g.add_argument("--overload", type=_bounded(int, 1, 255, "a stream count"), metavar="K",
                   help="also run K streams in the first mode (and first --workers value), far beyond "
                        "capacity: leaks must stay 0")
    t = p.add_argument_group("timing and targets")
    t.add_argument("--duration", type=_bounded(float, 1, 3600, "seconds"), default=10.0,
                   help="measured seconds per point (default 10)")
    t.add_argument("--warmup", type=_bounded(float, 0, 600, "seconds"), default=3.0,
                   help="seconds after all outputs are live (default 3)")
    t.add_argument("--latency-bound-ms", type=_bounded(float, 1, 60_000, "milliseconds"), default=200.0,
                   help="p99 target (default 200)")
    t.add_argument("--no-calibrate", action="store_true",
                   help="skip measuring the harness's own latency floor")
    d = p.add_argument_group("pipeline")
    d.add_argument("--preset", choices=["fast", "accurate"], default="fast")
    d.add_argument("--max-batch", type=_bounded(int, 1, 256, "a batch size"), default=None,
                   help="batcher.max_batch of the pipeline (default: its own, 8 on a GPU and one frame "
                        "per lane on a CPU)")
    d.add_argument("--max-wait-ms", type=_bounded(float, 0, 1000, "milliseconds"), default=10.0)
    d.add_argument("--queue-size", type=_bounded(int, 1, 64, "a frame count"), default=None,
                   help="frames waiting per stream in the pipeline (queue_size; default: its own)")
    d.add_argument("--threads", type=_bounded(int, 0, 256, "a thread count"), default=0,
                   help="ONNX Runtime threads per model session in the pipeline (detection.threads; "
                        "default 0: ONNX Runtime's own, one per core)")
    d.add_argument("--lanes", type=_bounded(int, 0, 16, "a lane count"), default=0,
                   help="CPU model runs side by side in the pipeline (detection.lanes; default 0: one "
                        "per core, up to 4; 1: one after the other)")
    d.add_argument("--plate-every", type=_bounded(int, 1, 30, "a frame count"), default=None,
                   help="the plate model on every n-th frame of a stream (detection.plate_every; "
                        "default the preset's)")
    d.add_argument("--person-every", type=_bounded(int, 1, 30, "a frame count"), default=None,
                   help="the same for the person model (detection.person_every)")
    d.add_argument("--skip-unchanged", action="store_true",
                   help="the pipeline's models look again only where the picture changed "
                        "(detection.skip_unchanged)")
    d.add_argument("--workers", type=_bounded(int, 1, MAX_WORKERS, "a worker count"), nargs="+",
                   metavar="N", default=None,
                   help="stream worker processes of the local pipeline (`run --workers N`: N processes "
                        "sharing one detection stage process); every point runs once per value "
                        "(default 1: one process)")
    d.add_argument("--register", choices=["config", "api"], default="config",
                   help="local pipeline: streams in its config file, or added through its control API")
    d.add_argument("--api", metavar="URL", type=_url("http", "https"),
                   help="a running deployment's base URL (http://host:9108): "
                   "streams are added through POST /api/streams and removed afterwards")
    d.add_argument("--token-env", metavar="VAR", default="STREAM_REDACT_TOKEN",
                   help="environment variable holding the API token (never printed)")
    d.add_argument("--media", metavar="rtsp://HOST:PORT", type=_url("rtsp"),
                   help="a media server both sides reach (e.g. MediaMTX), instead of the built-in "
                        "local relay")
    d.add_argument("--judge", nargs="+", choices=["face", "plate"],
                   help="classes the pipeline is set to redact, whose leaks count (default: from the mode; "
                        "for a remote deployment say what it redacts)")
    d.add_argument("--metrics", metavar="URL", type=_url("http", "https"),
                   help="the deployment's /metrics (default: API URL + /metrics)")
    d.add_argument("--baseline-worker", type=Path, metavar="PATH",
                   help=f"the no-detection pipeline of the transcode and no-redact modes (default: "
                        f"{BASELINE_WORKER} of the source checkout bench runs from; it is not installed "
                        "with stream-redact, since it publishes frames unredacted)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("loadtest"),
                   help="report path without suffix: writes OUT.json and OUT.html (default ./loadtest)")
    o.add_argument("--work", type=Path, default=Path("/tmp/stream-redact-bench"),
                   help="generated configs, events")
    o.add_argument("--clip", type=Path,
                   help="video the faces and backgrounds come from (default: the sample clip)")
    p.set_defaults(func=cmd_bench)
    sub = p.add_subparsers(dest="bench_command", metavar="report", required=False,
                           help="report JSON [-o HTML]: rebuild the HTML page from a saved JSON report")
    r = sub.add_parser("report", help="rebuild the HTML page (and the table) from a saved JSON report",
                       description="Rebuild the self-contained HTML page of a load test from its JSON "
                       "report, so only the JSON needs to be kept.")
    r.add_argument("json", type=Path, metavar="JSON", help="a report written by `stream-redact bench`")
    r.add_argument("-o", "--output", type=Path, metavar="HTML",
                   help="where to write the page (default: JSON with .html)")
    r.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    """Write the HTML page of a saved JSON report: 0 when written, 2 when the JSON is missing or no report."""
    try:
        report = json.loads(args.json.read_text())
    except OSError as e:
        print(f"stream-redact: error: cannot read {args.json}: {e.strerror}; give the path of a JSON report "
              "written by `stream-redact bench`", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"stream-redact: error: {args.json} is not valid JSON ({e}); give a JSON report written by "
              "`stream-redact bench`", file=sys.stderr)
        return 2
    if not isinstance(report, dict) or not isinstance(report.get("runs"), list):
        print(f"stream-redact: error: {args.json} is not a `stream-redact bench` report (no 'runs' list)",
              file=sys.stderr)
        return 2
    out = args.output or args.json.with_suffix(".html")
    try:
        write_html(report, out)
    except (KeyError, TypeError, ValueError) as e:
        print(f"stream-redact: error: {args.json} is missing a field the page needs ({e}); was it written by "
              "`stream-redact bench`?", file=sys.stderr)
        return 2
    print(table(report))
    print(f"\nreport: {out}", flush=True)
    return 0


def _progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the load test described by `args`; 0 when every point held, 1 otherwise, 2 on errors."""
    from stream.loadtest.scene import load_material
    from stream.samples import SampleError, sample_path

    ramp_modes = ["redact", "redact-b1", "redact-faces", "redact-faces-b1", "transcode"]
    modes = list(args.modes or (ramp_modes if args.ramp else ["redact"]))
    if args.api and any(m != "redact" for m in modes):
        print("stream-redact: error: against a remote deployment (--api) only --modes redact applies "
              "(it runs as deployed)", file=sys.stderr)
        return 2
    if args.api and args.workers is not None:
        print("stream-redact: error: --workers sets the pipeline bench starts itself; a remote deployment "
              "(--api) runs with the workers it was deployed with (`run --workers N` or `workers:` in its "
              "config): leave --workers out, and load-test each worker count as its own deployment",
              file=sys.stderr)
        return 2
    worker_counts = list(dict.fromkeys(args.workers or [1]))
    worker = None
    if any(m in NO_DETECTION for m in modes):  # before anything starts, not after a long ramp
        try:
            worker = find_baseline_worker(args.baseline_worker)
        except NoBaselineWorker as e:
            print(f"stream-redact: error: {e}", file=sys.stderr)
            return 2
    if "no-redact" in modes:
        print("stream-redact bench: WARNING: mode no-redact runs a pipeline that DOES NOT REDACT, to show "
              "the leak check fails; never point it at real cameras", file=sys.stderr, flush=True)
    try:
        clip = args.clip or sample_path("talking-face")
    except SampleError as e:
        print(f"stream-redact: error: {e}", file=sys.stderr)
        return 2
    material = load_material(clip)
    report: dict[str, Any] = {
        "tool": "stream-redact bench", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "loadavg_at_start": [round(v, 2) for v in os.getloadavg()]},
        "command": list(sys.argv[1:]),
        "calibration": [], "runs": [], "points": [], "overload": [],
    }
    ok = True
    try:
        for w, h in args.size:
            base = RunSpec(streams=args.streams, width=w, height=h, fps=args.fps,
                           bitrate_kbps=args.bitrate_kbps, duration_s=args.duration, warmup_s=args.warmup,
                           preset=args.preset,
                           max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                           queue_size=args.queue_size, threads=args.threads,
                           lanes=args.lanes,
                           skip_unchanged=args.skip_unchanged, plate_every=args.plate_every,
                           person_every=args.person_every,
                           latency_bound_ms=args.latency_bound_ms, faces=args.faces, plates=args.plates,
                           appearing=args.appearing,
                           register=args.register, api=args.api, token_env=args.token_env, media=args.media,
                           metrics_url=args.metrics, work=args.work, mode=modes[0],
                           judge=tuple(args.judge) if args.judge else None, baseline_worker=worker,
                           workers=worker_counts[0])
            if not args.no_calibrate and not args.media:
                _progress(f"calibrating the harness path at {w}x{h}")
                cal = calibrate(material, w, h, args.fps, bitrate_kbps=args.bitrate_kbps)
                report["calibration"].append(cal)
            for mode in modes:
                for n in worker_counts:  # one mode's worker counts back to back: compared under like load
                    spec = dataclasses.replace(base, mode=mode, workers=n)
                    if args.ramp:
                        run = ramp(spec, args.ramp, material, _progress)
                        ok &= run["largest_k_held"] == max(args.ramp)
                    else:
                        _progress(f"[{spec.label}] K={spec.streams}")
                        point = run_point(spec, material, _progress)
                        run = {"size": spec.size, "mode": mode, "workers": point["workers"],
                               "largest_k_held": spec.streams if point["held"] else 0, "points": [point]}
                        ok &= point["held"]
                    report["runs"].append(run)
            if args.overload:
                spec = dataclasses.replace(base, streams=args.overload, mode=modes[0])
                _progress(f"[overload {spec.label}] K={spec.streams}")
                # one point per size: a later size must not overwrite an earlier one's
                report["overload"].append(run_point(spec, material, _progress))
                lk = report["overload"][-1].get("leaks")
                ok &= not lk or lk["visible"] == 0
    except (RuntimeError, ValueError, OSError) as e:
        print(f"stream-redact: error: {e}", file=sys.stderr)
        report["error"] = str(e)
        ok = False
        if not report["runs"] and not report["overload"]:
            return 2
    finally:
        report["ratios"] = ratios(report["runs"])
        report.pop("points")
        out = args.out
        j = write_json(report, out.with_suffix(".json"))
        h = write_html(report, out.with_suffix(".html"))
        print(table(report))
        print(f"\nreport: {j} and {h}", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stream-redact")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))
