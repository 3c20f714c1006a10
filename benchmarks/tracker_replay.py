"""Coasted plate boxes under frame drops, replayed offline: how well do they still cover the plate?

The load test showed a plate's lower third uncovered for two frames at K=1: under overload most
frames are dropped and a track coasts between the few that are detected. This replays that
offline and deterministically. It renders one synthetic camera of the load test (its moving
plate), encodes it with libx264 and decodes it as the pipeline would, then detects plates on
every frame with the ``fast`` preset. Then it runs the tracker over many random drop patterns
(2-6 source frames between updates), with the old linear box prediction, with the centre
prediction alone (centre at the tracked velocity, size never shrinking), and with the current
one, whose coasting plate boxes also reach back to the last sighting (``track.BACKTRACK_LABELS``).

Run: ``python benchmarks/tracker_replay.py [--kbps 500] [--trials 60] [--camera 1 --first 0]``. Needs
the sample clip that ``deploy/setup.sh`` fetches. Writes ``benchmarks/results/tracker_replay.json``
(``tracker_replay_cameraN.json`` for another camera).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import av
import numpy as np

from stream.config import DetectionConfig
from stream.core import track
from stream.core.vehicle_plates import LABEL as VEHICLE_PLATE
from stream.detect.ensemble import FrameDetector
from stream.loadtest.scene import Scene, load_material
from stream.samples import sample_path

ROOT = Path(__file__).resolve().parent.parent
PLATE_SCALE = 1.25  # the redactor's default plate mask enlargement


def detect_encoded(seqs: list[int], kbps: int, work: Path,
                   camera: int = 0) -> dict[int, tuple[Any, list[tuple[int, ...]]]]:
    """Plate detections and ground truth per frame, after an H.264 round trip."""
    scene = Scene(load_material(sample_path("talking-face")), camera, 640, 360, 25.0)
    path = work / "tracker_replay.mp4"
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=25)
        st.width, st.height, st.pix_fmt, st.bit_rate = 640, 360, "yuv420p", kbps * 1000
        st.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for seq in seqs:
            for p in st.encode(av.VideoFrame.from_ndarray(scene.render(seq), format="bgr24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    det = FrameDetector(DetectionConfig(preset="fast", providers=["cpu"]).detector_settings())
    frames = {}
    with av.open(str(path)) as inp:
        for seq, fr in zip(seqs, inp.decode(video=0), strict=False):
            found = det.detect([fr.to_ndarray(format="bgr24")])[0]
            found = found.select(np.isin(np.asarray(found.labels, dtype=object), ["plate", VEHICLE_PLATE]))
            truth = [(b.x1, b.y1, b.x2, b.y2) for b in scene.truth(seq) if b.label == "plate"]
            frames[seq] = (found, truth)
    return frames


def coverage(box: np.ndarray, truth: tuple[int, ...]) -> float:
    c, half = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) / 2 * PLATE_SCALE
    b = np.concatenate([c - half, c + half])
    ix = max(0.0, min(b[2], truth[2]) - max(b[0], truth[0]))
    iy = max(0.0, min(b[3], truth[3]) - max(b[1], truth[1]))
    return float(ix * iy / ((truth[2] - truth[0]) * (truth[3] - truth[1])))


MODES = ("linear", "forward", "current")


def replay(frames: dict, seqs: list[int], trials: int, mode: str) -> dict[str, Any]:
    current, backtrack = track.predict, track.BACKTRACK_LABELS
    if mode == "linear":
        track.predict = lambda box, v, n: (box + v * n).astype(np.float32)  # type: ignore[assignment]
    if mode in ("linear", "forward"):
        track.BACKTRACK_LABELS = frozenset()
    try:
        rng = np.random.default_rng(0)
        checks, short, worst = 0, 0, 1.0
        for trial in range(trials):
            tracker = track.Tracker(track.TrackerConfig(max_coast=12))
            seq, last = seqs[0] + trial % 10, None
            while seq <= seqs[-1]:
                found, truth = frames[seq]
                out = tracker.update(found, elapsed=1 if last is None else seq - last)
                last = seq
                shown = [b for b, lb in zip(out.boxes, out.labels, strict=True)
                         if lb in ("plate", VEHICLE_PLATE)]
                for t in truth:
                    c = max((coverage(b, t) for b in shown), default=0.0)
                    checks, worst = checks + 1, min(worst, c)
                    short += c < 0.9
                seq += int(rng.integers(2, 7))
    finally:
        track.predict, track.BACKTRACK_LABELS = current, backtrack
    return {"checks": checks, "below_0.9": short, "worst_coverage": round(worst, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kbps", type=int, default=500)
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--camera", type=int, default=0, help="which of the load test's cameras (0: the first)")
    ap.add_argument("--first", type=int, default=500, help="the first of the 260 frames replayed")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seqs = list(range(args.first, args.first + 260))
    frames = detect_encoded(seqs, args.kbps, args.out, args.camera)
    (args.out / "tracker_replay.mp4").unlink(missing_ok=True)
    missed = sum(1 for found, truth in frames.values() if truth and not len(found))
    result = {"kbps": args.kbps, "camera": args.camera, "first": args.first, "frames": len(frames),
              "plate_missed_frames": missed, "trials": args.trials,
              **{mode: replay(frames, seqs, args.trials, mode) for mode in MODES}}
    name = "tracker_replay.json" if args.camera == 0 else f"tracker_replay_camera{args.camera}.json"
    (args.out / name).write_text(json.dumps(result, indent=1))
    print(f"{len(frames)} frames at {args.kbps} kbps, the plate missed by the detector on {missed}")
    print("| prediction | plate checks | coverage < 0.9 | worst coverage |\n|---|---|---|---|")
    for mode in MODES:
        r = result[mode]
        print(f"| {mode} | {r['checks']} | {r['below_0.9']} | {r['worst_coverage']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
