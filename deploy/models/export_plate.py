"""Rebuild stream/models/plate_yolov8n_fastanpr.onnx from the fastanpr package (optional tool).

The runtime never imports ultralytics; this script is how the committed ONNX file was produced
and how anyone can check where its bytes came from:

    python -m venv /tmp/export && /tmp/export/bin/pip install torch torchvision onnx
    /tmp/export/bin/pip install --no-deps ultralytics==8.4.190 ultralytics-thop
    /tmp/export/bin/pip download --no-deps fastanpr==0.1.13 -d /tmp/fastanpr
    /tmp/export/bin/python deploy/models/export_plate.py /tmp/fastanpr/fastanpr-0.1.13-py3-none-any.whl

The export is dynamic in batch, height and width (multiples of 32), opset 17.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import zipfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel", type=Path, help="fastanpr-0.1.13 wheel downloaded with pip")
    ap.add_argument("-o", "--output", type=Path,
                    default=Path(__file__).resolve().parents[2] / "stream/models/plate_yolov8n_fastanpr.onnx")
    args = ap.parse_args()
    from ultralytics import YOLO  # optional tool dependency, never imported by the runtime

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(args.wheel) as zf:
            zf.extract("fastanpr/best.pt", tmp)
        model = YOLO(str(Path(tmp) / "fastanpr/best.pt"))
        out = model.export(format="onnx", opset=17, dynamic=True, simplify=False, imgsz=640)
        shutil.copyfile(out, args.output)
    print(args.output, hashlib.sha256(args.output.read_bytes()).hexdigest())


if __name__ == "__main__":
    main()
