"""Plates found as text: a text detector's lines, for the plates the plate model was not trained on.

The plate model (one YOLOv8n trained on one public plate set) misses square two-line plates,
other countries' formats and strongly skewed or blurred plates; on the project's rendered plate
set it found about half of them (benchmarks/README.md, ``plate_recall.py``). A plate is, first of
all, a line of large characters: PP-OCRv4's text detector (DBNet) marks text pixels whatever the
plate's shape or format, and each line it finds is masked as a plate. It runs beside the plate
model on whole frames and only adds boxes: the vehicle stand-ins (see ``vehicle_plates``) are
decided by the plate model's plates alone, so a badge read as text cannot cancel one.
"""

from __future__ import annotations

import cv2
import numpy as np
import onnx
from onnx import helper, numpy_helper

from stream.core.detections import Detections
from stream.core.vehicle_plates import TEXT_LABEL
from stream.detect.base import OnnxDetector
from stream.detect.letterbox import Placement

PIXEL_THRESHOLD = 0.3
"""text probability above which a pixel counts as text (DBNet's usual binarisation)"""
UNCLIP = 1.6
"""how far a text region is grown, as DBNet does: by area x UNCLIP / perimeter pixels each side;
the probability map marks a shrunk core of each line"""
MAX_ASPECT = 8.0
"""lines wider than this many times their height are signs and captions, not plates (a UK plate's
line with its margin is about 5:1)"""
MAX_HEIGHT = 0.15
"""lines taller than this share of the frame's height are not plates: on the development and
rendered plate sets no plate's line was taller than 0.141 of its frame, while a tenth of the other
lines were taller than 0.23 (shop fronts, a cat's eyes, blurred edges), the largest false masks.
A plate that close is the plate model's: it finds nearly all plates over 64 px"""
ON_PLATE = 0.5
"""a line with at least this share of its area on a plate the plate model found is that plate"""


class TextPlates(OnnxDetector):
    """Text lines as plate boxes; ``threshold`` is a line's mean text probability (0.5 as in PaddleOCR)."""

    model_name = "text"
    label = "plate"
    unit = True  # fed 0-1 like the YOLO models (host or device letterbox); the graph rescales to -1..1
    max_height = MAX_HEIGHT

    def load_model(self) -> onnx.ModelProto:
        """The graph with PaddleOCR's normalisation, (x - 0.5) / 0.5, as its first node, and its
        weights as initializers (the export holds them in Constant nodes, which the torch backend's
        converter cannot read as a convolution's weights)."""
        model = super().load_model()
        g = model.graph
        consts = [n for n in g.node if n.op_type == "Constant" and len(n.attribute) == 1
                  and n.attribute[0].name == "value"]
        for node in consts:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            g.initializer.append(tensor)
            g.node.remove(node)
        name = g.input[0].name
        inner = name + "_unit"
        for node in g.node:
            for i, inp in enumerate(node.input):
                if inp == name:
                    node.input[i] = inner
        g.initializer.extend([numpy_helper.from_array(np.array(2.0, np.float32), name + "_two"),
                              numpy_helper.from_array(np.array(1.0, np.float32), name + "_one")])
        scaled = name + "_x2"
        g.node.insert(0, helper.make_node("Sub", [scaled, name + "_one"], [inner]))
        g.node.insert(0, helper.make_node("Mul", [name, name + "_two"], [scaled]))
        return model

    def decode(self, outputs: list[np.ndarray], index: int) -> tuple[np.ndarray, np.ndarray]:
        return text_lines(outputs[0][index, 0])

    def _finish(self, outputs: list[np.ndarray], i: int, place: Placement, shape: tuple) -> Detections:
        found = super()._finish(outputs, i, place, shape)
        if not len(found):
            return found
        return found.select(found.boxes[:, 3] - found.boxes[:, 1] <= self.max_height * shape[0])


def merge_lines(plates: Detections, lines: Detections) -> Detections:
    """The plate model's plates with the text lines added: a line lying mostly on a plate already
    found widens that plate's box to cover both, so that one plate stays one mask, one track and
    one event; the other lines are plates of their own, labelled :data:`TEXT_LABEL` (weaker evidence
    than the plate model's: the tracker coasts them less, and they end no vehicle's stand-in)."""
    lines = Detections(lines.boxes, lines.scores, (TEXT_LABEL,) * len(lines))
    if not len(lines) or not len(plates):
        return Detections.concat([plates, lines])
    boxes, scores = plates.boxes.copy(), plates.scores.copy()
    a, b = lines.boxes, plates.boxes
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    area = np.maximum((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]), 1e-6)
    share = iw * ih / area[:, None]
    alone = np.ones(len(lines), bool)
    for i, j in enumerate(share.argmax(axis=1)):
        if share[i, j] >= ON_PLATE:
            alone[i] = False
            boxes[j, :2] = np.minimum(boxes[j, :2], a[i, :2])
            boxes[j, 2:] = np.maximum(boxes[j, 2:], a[i, 2:])
            scores[j] = max(scores[j], lines.scores[i])
    return Detections.concat([Detections(boxes, scores, plates.labels), lines.select(alone)])


def text_lines(prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (map pixels) and mean probabilities of the text lines of one probability map."""
    mask = cv2.dilate((prob > PIXEL_THRESHOLD).astype(np.uint8), np.ones((2, 2), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    boxes, scores = [], []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if w < 3 or h < 3:
            continue
        grow = area * UNCLIP / (2 * (w + h))
        bw, bh = w + 2 * grow, h + 2 * grow
        if bw > MAX_ASPECT * bh:
            continue
        region = labels[y:y + h, x:x + w] == i
        scores.append(float(prob[y:y + h, x:x + w][region].mean()))
        boxes.append((x - grow, y - grow, x + w + grow, y + h + grow))
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    return np.asarray(boxes, np.float32), np.asarray(scores, np.float32)
