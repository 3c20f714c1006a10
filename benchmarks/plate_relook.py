"""The second look at plates just lost, replayed offline: how often is a plate found on the frames
the plate model is due on, with and without it, and what does it cost?

The load test at two cameras showed a 170 px rendered plate for up to 11 frames: the plate model at
640 px missed it on 36 frames in a row and its track ran out of coasting. This renders each of the
load test's first cameras (its moving plate), encodes it with libx264 and decodes it as the
pipeline would, then runs the ``fast`` detector on every frame in order, with the plate model at
its cadence, once with ``plate_relook`` and once without. Per camera: plate looks (frames the plate
model was due on) where a plate box covers at least half the plate, the longest run of looks in a
row without one, the second looks run and found, and the detector's seconds.

Run: ``python benchmarks/plate_relook.py [--cameras 0 1 2 3] [--frames 400]``. Needs the sample clip
that ``deploy/setup.sh`` fetches. Writes ``benchmarks/results/plate_relook.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np

from stream.config import DetectionConfig
from stream.core.detections import Detections, FrameRef
from stream.detect.ensemble import FrameDetector
from stream.loadtest.scene import Scene, load_material
from stream.samples import sample_path

ROOT = Path(__file__).resolve().parent.parent


def encoded(scene: Scene, frames: int, kbps: int, path: Path) -> list[np.ndarray]:
    """The scene's first ``frames`` frames after an H.264 round trip, as BGR."""
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=25)
        st.width, st.height, st.pix_fmt, st.bit_rate = scene.width, scene.height, "yuv420p", kbps * 1000
        st.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for seq in range(frames):
            for p in st.encode(av.VideoFrame.from_ndarray(scene.render(seq), format="bgr24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    with av.open(str(path)) as inp:
        return [f.to_ndarray(format="bgr24") for f in inp.decode(video=0)]


def covered(found: Detections, truth: tuple[int, int, int, int]) -> bool:
    for b, label in zip(found.boxes, found.labels, strict=True):
        ix = max(0.0, min(b[2], truth[2]) - max(b[0], truth[0]))
        iy = max(0.0, min(b[3], truth[3]) - max(b[1], truth[1]))
        if label == "plate" and ix * iy >= 0.5 * (truth[2] - truth[0]) * (truth[3] - truth[1]):
            return True
    return False


def replay(scene: Scene, frames: list[np.ndarray], relook: bool) -> dict[str, Any]:
    det = FrameDetector(DetectionConfig(preset="fast", providers=["cpu"], lanes=1,
                                        plate_relook=relook).detector_settings())
    hits: list[bool] = []
    seconds = 0.0
    for seq, image in enumerate(frames):
        t0 = time.perf_counter()
        found = det.detect([image], [FrameRef("camera", seq)])[0]
        seconds += time.perf_counter() - t0
        truth = [(b.x1, b.y1, b.x2, b.y2) for b in scene.truth(seq) if b.label == "plate"]
        if truth and "plate" in (found.observed or ()):
            hits.append(covered(found, truth[0]))
    run = longest = 0
    for hit in hits:
        run = 0 if hit else run + 1
        longest = max(longest, run)
    return {"looks": len(hits), "found": int(sum(hits)), "longest_miss_run": longest,
            "relooks_run": det.relooks_run, "relooks_found": det.relooks_found,
            "ms_per_frame": round(1000 * seconds / len(frames), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cameras", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--kbps", type=int, default=500)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    material = load_material(sample_path("talking-face"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cam in args.cameras:
            scene = Scene(material, cam, 640, 360, 25.0)
            frames = encoded(scene, args.frames, args.kbps, Path(tmp) / f"camera{cam}.mp4")
            off, on = replay(scene, frames, False), replay(scene, frames, True)
            rows.append({"camera": cam, "off": off, "on": on})
    (args.out / "plate_relook.json").write_text(json.dumps(
        {"frames": args.frames, "kbps": args.kbps, "preset": "fast", "lanes": 1, "cameras": rows}, indent=1))
    print("| camera | plate looks found: without / with | longest miss run (looks) | second looks run "
          "(found) | detector ms/frame |\n|---|---|---|---|---|")
    for r in rows:
        off, on = r["off"], r["on"]
        print(f"| {r['camera']} | {off['found']}/{off['looks']} / **{on['found']}/{on['looks']}** | "
              f"{off['longest_miss_run']} / {on['longest_miss_run']} | {on['relooks_run']} "
              f"({on['relooks_found']}) | {off['ms_per_frame']} / {on['ms_per_frame']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
