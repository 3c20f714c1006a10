"""Build the int8 CPU variants of the YOLOv8n plate and person models (stream/models/*_int8.onnx).

On a CPU an int8 convolution costs a fraction of a float one, and the two YOLOv8n models are
most of the cost of a redacted frame. The variants are ONNX Runtime static quantisations (QDQ,
per-channel int8 weights in 7 bits, uint8 activations), calibrated on frames this project makes
itself, never on the evaluation images:

- the synthetic camera scenes of the load test (real room backgrounds and real faces from the
  sample clip, rendered UK plates; ``stream/loadtest/scene.py``) at 640x360, 1280x720, 768x576;
- frames of the two sample clips (``python -m stream.samples fetch``), whole, and as mosaics of
  2x2 to 5x5 smaller copies so that small people and faces are calibrated too;
- rendered plates 8-48 px tall, tilted and blurred, pasted on those frames and backgrounds.

What stays in float: the last convolution of each head branch (box and class logits), the DFL
and the box decoding after it. Their ranges decide scores and box edges, and the COCO class
logits of vehicles, which no calibration frame shows, must not be clipped to a person's range.
Weights use 7 bits (``reduce_range``) so that CPUs without VNNI, whose uint8 x int8 dot product
saturates in 16 bits, compute the same as those with it.

The variants were calibrated and scored at inputs up to 640 px (``input.max_side`` in the
manifest): at 960 the plate variant lost 2 points of development-set recall, so the detectors
load the fp32 weights for larger inputs.

YuNet has no int8 variant: it is small and mostly depthwise, and its int8 graph ran slower than
the float one here (9.7 against 6.5 ms at 640x640).

The files are committed (about 3.5 MB each) with their sha256 in stream/models/manifest.json, so
a fresh machine needs neither this script nor its inputs. To rebuild them (needs the samples)::

    .venv/bin/python -m stream.samples fetch
    .venv/bin/python deploy/models/quantize_int8.py          # both variants, prints each sha256
    .venv/bin/python deploy/models/quantize_int8.py --check  # rebuild aside, compare with the manifest

A rebuild is deterministic: with onnxruntime 1.32.0, OpenCV 5.1.0 and PyAV 18.1.0 it gives the
committed bytes. Other onnxruntime, OpenCV or FFmpeg versions (calibration ranges come from
decoded, resized frames) give a slightly different file, whose sha256 then goes into the
manifest after the development sets are scored with it.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout

from stream import samples  # noqa: E402
from stream.core.checksum import sha256_file  # noqa: E402
from stream.detect.base import rgb_unit  # noqa: E402
from stream.detect.letterbox import letterbox_batch  # noqa: E402
from stream.detect.models import DEFAULT_MODEL_DIR, int8_variant, model_path, spec  # noqa: E402
from stream.loadtest.scene import Scene, load_material, render_plate  # noqa: E402

MODELS = {"plate": (384, 640), "person": (640, 640)}
"""fp32 model -> calibration canvas (h, w): a 16:9 frame at 640 for the dynamic plate graph; the
person graph is the 640x640 export (PersonYolo re-targets it per input size, int8 or not)"""
PAD = 114
"""YOLOv8 letterbox grey"""
FLOAT_HEAD = ("/model.22/cv2.0/cv2.0.2/Conv", "/model.22/cv2.1/cv2.1.2/Conv", "/model.22/cv2.2/cv2.2.2/Conv",
              "/model.22/cv3.0/cv3.0.2/Conv", "/model.22/cv3.1/cv3.1.2/Conv", "/model.22/cv3.2/cv3.2.2/Conv")
"""the heads' output convolutions, left in float (see the module docstring)"""
CHUNK = 8
"""frames per calibration pass (the histograms are merged across passes)"""
PERCENTILE = 99.999
"""activation ranges cover this share of calibration values: a few outliers do not widen the steps"""


def clip_frames(path: Path, every: int) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for i, f in enumerate(c.decode(video=0)) if i % every == 0]


def mosaic(frames: list[np.ndarray], n: int, size: tuple[int, int] = (640, 360)) -> np.ndarray:
    """An n x n grid of frames on one ``size`` canvas: people and faces n times smaller."""
    w, h = size
    out = np.zeros((h, w, 3), np.uint8)
    tw, th = w // n, h // n
    for k in range(n * n):
        tile = cv2.resize(frames[k % len(frames)], (tw, th), interpolation=cv2.INTER_AREA)
        r, c = divmod(k, n)
        out[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tile
    return out


def paste_plates(background: np.ndarray, rng: random.Random, count: int) -> np.ndarray:
    """Rendered plates 8-48 px tall, tilted and some blurred, pasted at random places."""
    img = background.copy()
    h, w = img.shape[:2]
    letters = "ABCDEFGHJKLMNOPRSTUVWXYZ"
    for _ in range(count):
        text = (rng.choice(letters) + rng.choice(letters) + f"{rng.randint(10, 99)} "
                + "".join(rng.choice(letters) for _ in range(3)))
        plate = render_plate(text, rng.randint(8, 48), rear=rng.random() < 0.5)
        ph, pw = plate.shape[:2]
        if pw >= w - 2 or ph >= h - 2:
            continue
        m = cv2.getRotationMatrix2D((pw / 2, ph / 2), rng.uniform(-8, 8), 1.0)
        plate = cv2.warpAffine(plate, m, (pw, ph), borderMode=cv2.BORDER_REPLICATE)
        if rng.random() < 0.5:
            plate = cv2.GaussianBlur(plate, (0, 0), rng.uniform(0.5, 1.5))
        x, y = rng.randrange(0, w - pw), rng.randrange(0, h - ph)
        img[y:y + ph, x:x + pw] = plate
    return img


def calibration_frames(count: int = 96, seed: int = 0) -> list[np.ndarray]:
    """BGR frames of varied content, all made here (see the module docstring); deterministic."""
    talking = samples.sample_path("talking-face")
    clip = clip_frames(talking, 12) + clip_frames(samples.sample_path("webcam-face"), 6)
    material = load_material(talking)
    rng = random.Random(seed)
    out: list[np.ndarray] = []
    per_kind = max(1, count // 4)
    for i in range(per_kind):  # load-test scenes: faces and plates over the room
        w, h = ((640, 360), (1280, 720), (768, 576))[i % 3]
        scene = Scene(material, stream=i, width=w, height=h, fps=25, faces=1 + i % 3, plates=1 + i % 2)
        out.append(scene.render(rng.randrange(0, 500)))
    for i in range(per_kind):  # whole clip frames, every other one with plates on it
        frame = clip[(i * 7) % len(clip)]
        out.append(paste_plates(frame, rng, 1 + i % 3) if i % 2 else frame)
    for i in range(per_kind):  # mosaics: small people and faces
        out.append(mosaic([clip[rng.randrange(len(clip))] for _ in range(25)], 2 + i % 4))
    while len(out) < count:  # the room with several small plates
        bg = material.backgrounds[len(out) % len(material.backgrounds)]
        bg = cv2.resize(bg, (640, 360), interpolation=cv2.INTER_AREA)
        out.append(paste_plates(bg, rng, rng.randint(2, 6)))
    return out


def model_inputs(frames: list[np.ndarray], canvas: tuple[int, int]) -> list[np.ndarray]:
    """Each frame as the YOLO detectors feed it: long side 640, top-left on a grey ``canvas``."""
    ch, cw = canvas
    out = []
    for frame in frames:
        batch, _ = letterbox_batch([frame], 640, pad=PAD)
        x = np.full((1, ch, cw, 3), PAD, np.uint8)
        h, w = min(ch, batch.shape[1]), min(cw, batch.shape[2])
        x[0, :h, :w] = batch[0, :h, :w]
        out.append(rgb_unit(x))
    return out


class Reader:
    """onnxruntime's CalibrationDataReader over prepared inputs, read in slices (``set_range``) so
    that histograms are built a few frames at a time: every frame's activations at once would
    take tens of GB."""

    def __init__(self, name: str, inputs: list[np.ndarray]) -> None:
        self.name, self.inputs = name, inputs
        self._it: Iterator[np.ndarray] = iter(inputs)

    def __len__(self) -> int:
        return len(self.inputs)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.inputs[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self.name: x}


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes left in float: the heads' output convolutions and everything of the detection
    layer (model.22) outside its two convolution branches (DFL, anchors, box decoding, concat)."""
    branches = ("/model.22/cv2.", "/model.22/cv3.")
    post = [n.name for n in model.graph.node
            if n.name.startswith("/model.22/") and not n.name.startswith(branches)]
    return [*FLOAT_HEAD, *post]


def quantize(name: str, frames: list[np.ndarray], output: Path) -> str:
    """Write the int8 variant of model ``name`` to ``output``; returns its sha256."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(model_path(name)))
    inputs = model_inputs(frames, MODELS[name])
    usable = len(inputs) - len(inputs) % CHUNK
    with tempfile.TemporaryDirectory() as tmp:
        src, pre = Path(tmp) / "src.onnx", Path(tmp) / "pre.onnx"
        onnx.save(model, str(src))
        # shape inference only: graph optimisation would fold the anchor constants that
        # PersonYolo rewrites for each input size
        quant_pre_process(str(src), str(pre), skip_optimization=True, skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(output), Reader(model.graph.input[0].name, inputs[:usable]),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=float_nodes(model), calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": PERCENTILE, "CalibStridedMinMax": CHUNK})
    return sha256_file(output)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help=f"fp32 models to quantise: {', '.join(MODELS)} (default: both)")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_MODEL_DIR,
                    help="where the files go (default: stream/models, under their manifest names)")
    ap.add_argument("--frames", type=int, default=96, help="calibration frames (default 96)")
    ap.add_argument("--check", action="store_true",
                    help="build into a temporary folder and compare with the manifest (exit 1 if different)")
    args = ap.parse_args()
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        ap.error(f"no int8 variant is built for {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    frames = calibration_frames(args.frames)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) if args.check else args.out_dir
        differ = []
        for name in args.models or list(MODELS):
            variant = int8_variant(name)
            filename = spec(variant).file if variant else f"{Path(spec(name).file).stem}_int8.onnx"
            digest = quantize(name, frames, out_dir / filename)
            print(f"{name}_int8: {out_dir / filename} sha256 {digest}", flush=True)
            if args.check and (variant is None or digest != spec(variant).sha256):
                differ.append(name)
    if differ:
        sys.exit(f"differs from the manifest: {', '.join(differ)}")


if __name__ == "__main__":
    main()
