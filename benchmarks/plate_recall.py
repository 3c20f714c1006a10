"""Plate recall of the detector alone, in process, on a scorer-format set (images or labelled video frames).

The scorer (``shared/eval/score.py``) runs the whole command once per image, which is the number to
report; this is the loop for choosing settings: it loads the models once, runs the detector frame by
frame (no tracking) and counts a ground-truth plate as covered when the plate masks the redactor
would paint cover 80% of its box, the scorer's rule. Per size bucket, with the masked share of
each frame that is not a plate (false-positive area) and what it cost.

    python benchmarks/plate_recall.py ../shared/eval/dev/plates --preset accurate
    python benchmarks/plate_recall.py SET --crops off --vehicle-plates 0 --json out.json
    python benchmarks/plate_recall.py SET --text off   # without the text pass
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream.core.detections import Detections, FrameRef
from stream.core.redact import Redactor
from stream.core.vehicle_plates import LABEL as VEHICLE_PLATE
from stream.core.vehicle_plates import TEXT_LABEL
from stream.detect.ensemble import FrameDetector
from stream.detect.presets import PRESETS, detector_config

BUCKETS = ((0, 16, "<16"), (16, 32, "16-32"), (32, 64, "32-64"), (64, 1e9, ">=64"))
COVERED = 0.8


def bucket(h: float) -> str:
    return next(name for lo, hi, name in BUCKETS if lo <= h < hi)


def frames_of(set_dir: Path) -> list[tuple[str, np.ndarray, list[dict]]]:
    """(name, BGR frame, objects) for every labelled image or video frame of the set."""
    gt = json.loads((set_dir / "gt.json").read_text())
    out = []
    for im in gt.get("images", []):
        out.append((im["file"], cv2.imread(str(set_dir / im["file"])), im["objects"]))
    for v in gt.get("videos", []):
        wanted = {int(k): objs for k, objs in v["frames"].items()}
        cap = cv2.VideoCapture(str(set_dir / v["file"]))
        i = 0
        while wanted:
            ok, frame = cap.read()
            if not ok:
                break
            if i in wanted:
                out.append((f"{v['file']}#{i}", frame, wanted.pop(i)))
            i += 1
    return out


def score(frame: np.ndarray, objs: list[dict], dets: Detections, redactor: Redactor) -> tuple[list, float]:
    """Per scored plate (height, covered); and the masked share of the frame outside every object."""
    h, w = frame.shape[:2]
    mask = np.zeros((h, w), bool)
    plates = dets.select(np.isin(np.asarray(dets.labels, dtype=object), ["plate", VEHICLE_PLATE, TEXT_LABEL]))
    for r in redactor.regions(plates, w, h):
        x1, y1, x2, y2 = r.box
        mask[y1:y2, x1:x2] = True
    truth = np.zeros((h, w), bool)
    found = []
    for o in objs:
        x1, y1, x2, y2 = o["box"]
        xi1, yi1, xi2, yi2 = int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2))
        truth[max(0, yi1):yi2, max(0, xi1):xi2] = True
        if o["label"] != "plate" or o.get("ignore"):
            continue
        roi = mask[max(0, yi1):yi2, max(0, xi1):xi2]
        share = float(roi.mean()) if roi.size else 0.0
        found.append((y2 - y1, share >= COVERED, {**o, "covered": round(share, 2)}))
    return found, float((mask & ~truth).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", type=Path)
    ap.add_argument("--preset", default="accurate", choices=sorted(PRESETS))
    ap.add_argument("--vehicle-plates", type=float, default=None)
    ap.add_argument("--crops", choices=["on", "off"], default=None, help="the vehicle-crop plate pass")
    ap.add_argument("--crop", action="append", default=[], metavar="FIELD=VALUE",
                    help="a field of the crop pass's settings (stream.detect.crops.CropConfig), "
                         "e.g. sizes=256,384 or threshold=0.45")
    ap.add_argument("--text", choices=["on", "off"], default=None,
                    help="the text pass (text lines masked as plates); default: the preset's")
    ap.add_argument("--plate-threshold", type=float, default=None)
    ap.add_argument("--int8", default="auto")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="the weights from this folder instead of the package's")
    ap.add_argument("--plate-scale", type=float, default=None,
                    help="plate mask enlargement (default: the redactor's, 1.25)")
    ap.add_argument("--misses", action="store_true", help="list every missed plate")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    crops: dict[str, object] = {}
    if a.crops is not None:
        crops["plate_crops"] = a.crops == "on"
    if a.text is not None:
        crops["text_plates"] = a.text == "on"
    cfg = detector_config(a.preset, vehicle_plates=a.vehicle_plates, plate_threshold=a.plate_threshold,
                          int8=a.int8, providers=("cpu",), model_dir=a.model_dir, **crops)
    for item in a.crop:
        key, _, value = item.partition("=")
        if cfg.plate_crops is None or not hasattr(cfg.plate_crops, key):
            ap.error(f"--crop {item}: not a field of CropConfig, or the crop pass is off")
        old = getattr(cfg.plate_crops, key)
        setattr(cfg.plate_crops, key, tuple(int(v) for v in value.split(",")) if isinstance(old, tuple)
                else type(old)(value))
    det = FrameDetector(cfg)
    redactor = Redactor()
    if a.plate_scale is not None:
        redactor.config.mask_scale["plate"] = a.plate_scale
    report = {}
    crops0, crop_s0 = 0, 0.0
    for set_dir in a.sets:
        frames = frames_of(set_dir)
        per: dict[str, list[int]] = {}
        fp, seconds, misses = [], 0.0, []
        for n, (name, frame, objs) in enumerate(frames):
            t0 = time.perf_counter()
            dets = det.detect([frame], [FrameRef(f"{set_dir}#{n}", 1)])[0]  # a stream each: every model runs
            seconds += time.perf_counter() - t0
            found, fp_area = score(frame, objs, dets, redactor)
            fp.append(fp_area)
            for h, ok, o in found:
                per.setdefault(bucket(h), [0, 0])[0] += int(ok)
                per[bucket(h)][1] += 1
                if not ok:
                    misses.append((name, round(h, 1), o.get("box"), f"covered {o['covered']}"))
        hit = sum(v[0] for v in per.values())
        tot = sum(v[1] for v in per.values())
        crops, crop_s = det.crops_run - crops0, det.crop_seconds - crop_s0
        crops0, crop_s0 = det.crops_run, det.crop_seconds
        row = {"recall": hit / max(1, tot), "found": hit, "plates": tot, "vehicle_crops": crops,
               "ms_per_crop": 1000 * crop_s / crops if crops else None,
               "buckets": {k: per[k] for _, _, k in BUCKETS if k in per},
               "fp_area": float(np.mean(fp)) if fp else 0.0,
               "ms_per_frame": 1000 * seconds / max(1, len(frames))}
        report[str(set_dir)] = row
        buckets = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in row["buckets"].items())
        print(f"{set_dir.name:22s} plates {hit}/{tot} ({row['recall']:.3f}): {buckets}; "
              f"fp area {100 * row['fp_area']:.1f}%; {row['ms_per_frame']:.0f} ms/frame"
              + (f", of which crop pass {1000 * crop_s / len(frames):.0f} ms ({crops} vehicle crops, "
                 f"{row['ms_per_crop']:.1f} ms each)" if crops else ""), flush=True)
        if a.misses:
            for m in misses:
                print("   miss", *m)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
