"""The shared shape of an ONNX detector: letterbox a batch, run one session, decode per frame."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from stream.detect.detections import Detections
from stream.detect.letterbox import Placement, letterbox_batch
from stream.detect.models import model_path, spec
from stream.detect.nms import clip_boxes, nms
from stream.detect.runtime import DEFAULT_PROVIDERS, create_session


class OnnxDetector(ABC):
    """One model, one ONNX Runtime session; ``detect`` takes BGR uint8 frames of any sizes."""

    model_name: str = ""
    label: str = ""
    pad_value: int = 0
    dynamic_rewrite: bool = False
    per_shape: bool = False  # models whose graph bakes in its input size get one session per size

    def __init__(
        self,
        input_size: int = 640,
        threshold: float = 0.5,
        nms_iou: float = 0.4,
        model_dir: Path | None = None,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        threads: int = 0,
        min_input: int | None = None,
    ) -> None:
        self.input_size = input_size
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.min_input = min_input
        self.spec = spec(self.model_name)
        self._path = model_path(self.model_name, model_dir)
        self._providers, self._threads = providers, threads
        self._sessions: dict[tuple[int, int], ort.InferenceSession] = {}
        self.session: ort.InferenceSession | None = None
        if self.per_shape:  # sessions are made per canvas size on first use
            self.input_name = onnx.load(str(self._path), load_external_data=False).graph.input[0].name
        else:
            self.session = create_session(self._path, providers, threads, dynamic=self.dynamic_rewrite)
            self.input_name = self.session.get_inputs()[0].name
        self._lock = threading.Lock()  # one run at a time per session keeps CPU threads predictable

    def session_for(self, height: int, width: int) -> ort.InferenceSession:
        if self.session is not None:
            return self.session
        key = (height, width)
        if key not in self._sessions:
            model = self.reshape_model(onnx.load(str(self._path)), height, width)
            self._sessions[key] = create_session(model, self._providers, self._threads)
        return self._sessions[key]

    def reshape_model(self, model: onnx.ModelProto, height: int, width: int) -> onnx.ModelProto:
        """For ``per_shape`` models: the graph re-targeted to this input size."""
        raise NotImplementedError

    @property
    def version(self) -> str:
        return f"{self.model_name}@{self.spec.sha256[:12]}"

    @abstractmethod
    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        """NHWC BGR uint8 canvas -> the model's input tensor."""

    @abstractmethod
    def decode(self, outputs: list[np.ndarray], index: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (canvas pixels) and scores of batch item ``index``, before NMS."""

    def run(self, images: list[np.ndarray]) -> list[Detections]:
        if not images:
            return []
        return self._run_batch(images)

    __call__ = run

    def _run_batch(self, images: list[np.ndarray]) -> list[Detections]:
        batch, places = letterbox_batch(
            images, self.input_size, pad=self.pad_value, min_side=self.min_input
        )
        # preprocess and decode may keep per-batch state (YuNet's grid size): same lock as the run
        with self._lock:
            x = self.preprocess(batch)
            outputs = self.session_for(*batch.shape[1:3]).run(None, {self.input_name: x})
            return [self._finish(outputs, i, places[i], images[i].shape) for i in range(len(images))]

    def _finish(self, outputs: list[np.ndarray], i: int, place: Placement, shape: tuple) -> Detections:
        boxes, scores = self.decode(outputs, i)
        keep = scores >= self.threshold
        boxes, scores = boxes[keep], scores[keep]
        if len(boxes):
            k = nms(boxes, scores, self.nms_iou)
            boxes = clip_boxes(place.to_source(boxes[k]), shape[1], shape[0])
            scores = scores[k]
            ok = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
            boxes, scores = boxes[ok], scores[ok]
        return Detections(boxes=boxes.astype(np.float32), scores=scores.astype(np.float32),
                          labels=(self.label,) * len(boxes))


def bgr_planar(batch: np.ndarray) -> np.ndarray:
    """NHWC uint8 BGR -> NCHW float32 BGR 0-255."""
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)


def rgb_unit(batch: np.ndarray) -> np.ndarray:
    """NHWC uint8 BGR -> NCHW float32 RGB 0-1."""
    x = np.ascontiguousarray(batch[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
    return x * np.float32(1 / 255)
