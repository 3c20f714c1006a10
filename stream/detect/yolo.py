"""Ultralytics YOLOv8 detection heads exported to ONNX: licence plates and COCO persons."""

from __future__ import annotations

import numpy as np

from stream.detect.base import OnnxDetector, rgb_unit


class YoloV8(OnnxDetector):
    """Output (N, 4 + classes, anchors): cx, cy, w, h then one score per class, no objectness."""

    pad_value = 114
    class_index = 0

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        return rgb_unit(batch)

    def decode(self, outputs: list[np.ndarray], index: int) -> tuple[np.ndarray, np.ndarray]:
        out = outputs[0][index]
        score = out[4 + self.class_index]
        sel = np.flatnonzero(score >= self.threshold)
        cx, cy, w, h = out[:4, sel]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        return boxes, score[sel]


class PlateYolo(YoloV8):
    model_name = "plate"
    label = "plate"


class PersonYolo(YoloV8):
    """COCO person class; only used to place head masks where faces are too small to detect."""

    model_name = "person"
    label = "person"
    fixed_input = (640, 640)
