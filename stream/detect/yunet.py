"""YuNet face detector: anchor-free heads at strides 8/16/32, BGR 0-255 input."""

from __future__ import annotations

import numpy as np

from stream.detect.backend import Backend
from stream.detect.base import Group, OnnxDetector

STRIDES = (8, 16, 32)


class YuNet(OnnxDetector):
    model_name = "yunet"
    label = "face"
    dynamic_rewrite = True  # BGR 0-255: the default input convention
    unused_outputs = ("kps_8", "kps_16", "kps_32")

    def begin(self, n: int, canvas: tuple[int, int], backend: Backend) -> None:
        self._n, self._hw, self._names = n, canvas, backend.output_names

    def decode(self, outputs: list[np.ndarray], index: int) -> tuple[np.ndarray, np.ndarray]:
        named = dict(zip(self._names, outputs, strict=True))
        h, w = self._hw
        boxes, scores = [], []
        for s in STRIDES:
            rows, cols = h // s, w // s
            # the graph folds the batch into the anchor axis: (1, N*A, C)
            cls = named[f"cls_{s}"].reshape(self._n, -1)[index]
            obj = named[f"obj_{s}"].reshape(self._n, -1)[index]
            score = np.sqrt(np.clip(cls, 0, 1) * np.clip(obj, 0, 1))
            sel = np.flatnonzero(score >= self.threshold)
            if not len(sel):
                continue
            bb = named[f"bbox_{s}"].reshape(self._n, -1, 4)[index][sel]
            r, c = np.divmod(sel, cols)
            cx = (c + bb[:, 0]) * s
            cy = (r + bb[:, 1]) * s
            bw = np.exp(bb[:, 2]) * s
            bh = np.exp(bb[:, 3]) * s
            boxes.append(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1))
            scores.append(score[sel])
            assert rows * cols == len(score)
        if not boxes:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        return np.concatenate(boxes), np.concatenate(scores)

    def groups(self) -> list[Group]:
        return [Group(0, 1, self.label, self.threshold)]

    def device_candidates(self, outputs: list, n: int, canvas: tuple[int, int], names: list[str]) -> tuple:
        from stream.detect.device_decode import yunet_candidates

        return yunet_candidates(dict(zip(names, outputs, strict=True)), n, canvas, STRIDES)
