"""CenterFace detector: a stride-4 centre heatmap with log-scale sizes, good on small faces."""

from __future__ import annotations

import numpy as np

from stream.detect.base import Group, OnnxDetector

STRIDE = 4


class CenterFace(OnnxDetector):
    model_name = "centerface"
    label = "face"
    dynamic_rewrite = True

    rgb = True  # the network was trained on RGB 0-255 without normalisation
    unused_outputs = ("540",)  # landmarks: 10 channels at stride 4, the largest output

    def decode(self, outputs: list[np.ndarray], index: int) -> tuple[np.ndarray, np.ndarray]:
        heat, scale, offset = outputs[0][index, 0], outputs[1][index], outputs[2][index]
        ys, xs = np.nonzero(heat >= self.threshold)
        if not len(ys):
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        sh = np.exp(scale[0, ys, xs]) * STRIDE
        sw = np.exp(scale[1, ys, xs]) * STRIDE
        cy = (ys + offset[0, ys, xs] + 0.5) * STRIDE
        cx = (xs + offset[1, ys, xs] + 0.5) * STRIDE
        boxes = np.stack([cx - sw / 2, cy - sh / 2, cx + sw / 2, cy + sh / 2], 1)
        return boxes, heat[ys, xs]

    def groups(self) -> list[Group]:
        return [Group(0, 1, self.label, self.threshold)]

    def device_candidates(self, outputs: list, n: int, canvas: tuple[int, int], names: list[str]) -> tuple:
        from stream.detect.device_decode import centerface_candidates

        return centerface_candidates(outputs[0], outputs[1], outputs[2], STRIDE)
