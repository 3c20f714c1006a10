"""Rendered screens (monitors and TVs) for measuring how many the `screens` privacy class masks.

Why: no development set labels screens, and flat rectangles with a picture on them do not look like
a screen to the COCO person/vehicle model (they score under 0.1 as tv, laptop or cell phone). A
screen in a scene does: a bezel, a picture on it, a little perspective, a stand, a blurred room
behind. This renders such scenes deterministically from the repository's own fixture photos (no
download) over a grid of screen widths, tilts and bezels, runs the product's detector with screens
on, and reports recall per screen width: a screen counts as masked when the painted screen masks
(1.1x the box, as the live pipeline paints them) cover at least 80% of its true box.

    python benchmarks/screen_synth.py                       # table, and JSON in benchmarks/results/
    python benchmarks/screen_synth.py --write /tmp/screens  # also the rendered images, for a look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

FIXTURES = REPO / "tests" / "fixtures"
BACKGROUNDS = ("chelsea.jpg", "bus_360.jpg")
CONTENTS = ("astronaut_256.jpg", "chelsea.jpg", "bus_360.jpg")
WIDTHS = (120, 200, 300, 420)
TILTS = (-0.15, 0.0, 0.15)
BEZELS = (6, 16)
CANVAS = (640, 480)
SCALE = 1.1
"""the live pipeline's mask scale for screens (RedactionConfig.redact_config)"""


@dataclass(frozen=True)
class Scene:
    """One rendered scene: the picture and the true box of its screen (bezel included)."""

    image: np.ndarray
    box: tuple[int, int, int, int]
    width: int
    tilt: float
    bezel: int
    background: str
    content: str


def _photo(name: str) -> np.ndarray:
    image = cv2.imread(str(FIXTURES / name))
    if image is None:
        raise SystemExit(f"{FIXTURES / name} is missing; run from a checkout of the repository")
    return image


def render(width: int, tilt: float = 0.0, bezel: int = 6, background: str = BACKGROUNDS[0],
           content: str = CONTENTS[0]) -> Scene:
    """A monitor ``width`` px wide (16:9 picture) showing ``content``, turned by ``tilt`` (share of
    its width the far edge is shortened by; the sign says which side), on a stand, in front of the
    blurred ``background`` photo."""
    cw, ch = CANVAS
    img = cv2.GaussianBlur(cv2.resize(_photo(background), (cw, ch)), (0, 0), 6)
    h = round(width * 9 / 16)
    screen = np.full((h + 2 * bezel, width + 2 * bezel, 3), (25, 25, 28), np.uint8)
    screen[bezel:bezel + h, bezel:bezel + width] = cv2.resize(_photo(content), (width, h))
    gloss = screen.copy()
    cv2.line(gloss, (0, 0), (width // 2, h + 2 * bezel), (255, 255, 255), max(1, width // 6))
    screen = cv2.addWeighted(screen, 0.9, gloss, 0.1, 0)
    sh, sw = screen.shape[:2]
    x0, y0 = cw // 2 - sw // 2, ch * 5 // 12 - sh // 2
    d = abs(tilt) * sw
    left_far = tilt < 0
    corners = np.float32([[x0 + (d if left_far else 0), y0 + (d * 0.3 if not left_far else 0)],
                          [x0 + sw - (0 if left_far else d), y0 + (d * 0.3 if left_far else 0)],
                          [x0 + sw - (0 if left_far else d), y0 + sh - (d * 0.3 if left_far else 0)],
                          [x0 + (d if left_far else 0), y0 + sh - (d * 0.3 if not left_far else 0)]])
    m = cv2.getPerspectiveTransform(np.float32([[0, 0], [sw, 0], [sw, sh], [0, sh]]), corners)
    warped = cv2.warpPerspective(screen, m, (cw, ch))
    inside = cv2.warpPerspective(np.ones((sh, sw), np.uint8), m, (cw, ch)).astype(bool)
    img[inside] = warped[inside]
    bottom = int(corners[:, 1].max())
    cx = int(corners[:, 0].mean())
    cv2.rectangle(img, (cx - 10, bottom), (cx + 10, bottom + 40), (30, 30, 30), -1)
    cv2.rectangle(img, (cx - 50, bottom + 40), (cx + 50, bottom + 48), (30, 30, 30), -1)
    ys, xs = np.nonzero(inside)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Scene(img, box, width, tilt, bezel, background, content)


def scenes() -> list[Scene]:
    return [render(w, t, b, bg, c) for w in WIDTHS for t in TILTS for b in BEZELS
            for bg in BACKGROUNDS for c in CONTENTS]


def covered(masks: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]) -> float:
    """Share of ``box`` under the union of ``masks`` (boxes, scaled by SCALE about their centres)."""
    painted = np.zeros(shape, bool)
    for x1, y1, x2, y2 in masks:
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * SCALE / 2, (y2 - y1) * SCALE / 2
        painted[max(0, int(cy - hh)):int(np.ceil(cy + hh)), max(0, int(cx - hw)):int(np.ceil(cx + hw))] = True
    x1, y1, x2, y2 = box
    return float(painted[y1:y2, x1:x2].mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="accurate", choices=("accurate", "fast"))
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "screens.json")
    p.add_argument("--write", type=Path, help="also write the rendered scenes here")
    args = p.parse_args(argv)

    from stream.config import DetectionConfig
    from stream.detect.ensemble import FrameDetector

    detector = FrameDetector(DetectionConfig(preset=args.preset, providers=["cpu"], plates=False)
                             .detector_settings(classes=["screen"]))
    rows: dict[int, list[bool]] = {w: [] for w in WIDTHS}
    false_alarms = 0
    t0 = time.perf_counter()
    for i, s in enumerate(scenes()):
        screens = detector([s.image])[0].with_label("screen")
        found = covered(screens.boxes, s.box, s.image.shape[:2]) >= 0.8
        rows[s.width].append(found)
        false_alarms += sum(1 for b in screens.boxes if covered(np.array([b]), s.box, s.image.shape[:2]) == 0)
        if args.write:
            args.write.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(args.write / f"screen_{i:03d}_w{s.width}_{'found' if found else 'missed'}.jpg"),
                        s.image)
    dt = time.perf_counter() - t0
    total = sum(len(v) for v in rows.values())
    hits = sum(sum(v) for v in rows.values())
    print(f"screens masked ({args.preset} preset, person model with screens on; {total} rendered monitors)")
    print(f"{'screen width px':>16} {'masked':>8} {'recall':>7}")
    for w, v in rows.items():
        print(f"{w:>16} {sum(v):>4}/{len(v):<3} {sum(v) / len(v):>7.3f}")
    print(f"{'all':>16} {hits:>4}/{total:<3} {hits / total:>7.3f}   "
          f"screen boxes off any screen: {false_alarms}")
    doc = {"benchmark": "screen_synth", "preset": args.preset, "scenes": total, "masked": hits,
           "recall": round(hits / total, 4), "by_width": {str(w): [sum(v), len(v)] for w, v in rows.items()},
           "boxes_off_screen": false_alarms, "seconds": round(dt, 1),
           "grid": {"widths": WIDTHS, "tilts": TILTS, "bezels": BEZELS, "backgrounds": BACKGROUNDS,
                    "contents": CONTENTS}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
