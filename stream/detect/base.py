"""The shared shape of an ONNX detector: letterbox a batch, run one backend, decode per frame."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from stream.core.detections import Detections
from stream.core.nms import clip_boxes, nms
from stream.core.yuv import Picture, as_bgr
from stream.detect.backend import Backend, BackendName, OrtBackend, choose_backend, make_backend, runs_on_gpu
from stream.detect.buckets import DEFAULT_BUCKETS, check_buckets, plan
from stream.detect.device import DeviceFrames, claim_on_this_stream
from stream.detect.letterbox import Placement, letterbox_batch, target_side
from stream.detect.models import int8_variant, model_path, spec
from stream.detect.runtime import DEFAULT_PROVIDERS, make_dynamic


@dataclass
class Chunk:
    """One bucket-sized run of a model, prepared: its input (host array or device tensor) and
    where each frame sits on the canvas."""

    x: Any
    places: list[Placement]
    canvas: tuple[int, int]
    shapes: list[tuple[int, ...]]
    """source frame shapes, to clip the boxes mapped back"""


@dataclass(frozen=True)
class Group:
    """One class of boxes a model reports, for decoding on the device: the output rows
    ``start:stop`` whose maximum is its score (the person model reports persons, vehicles and
    screens), its label and its score threshold."""

    start: int
    stop: int
    label: str
    threshold: float


class OnnxDetector(ABC):
    """One model on one inference backend; ``detect`` takes BGR uint8 frames of any sizes.

    The model's input convention (channel order, 0-1 or 0-255) is declared as data (``rgb``,
    ``unit``), so the same preprocessing runs on the host (NumPy/OpenCV) or on the GPU (torch).
    On a GPU backend a batch is split into fixed bucket sizes (see :mod:`stream.detect.buckets`).
    With ``int8`` the model's int8 variant (manifest entry ``<name>_int8``) is loaded where
    ONNX Runtime runs on the CPU, the manifest has one and ``input_size`` is within the sides it
    was checked at; elsewhere the fp32 weights are.
    """

    model_name: str = ""
    label: str = ""
    pad_value: int = 0
    dynamic_rewrite: bool = False
    per_shape: bool = False  # models whose graph bakes in its input size get one backend per size
    rgb: bool = False
    unit: bool = False
    unused_outputs: tuple[str, ...] = ()
    """graph outputs the decoder never reads (landmarks): dropped, so they are neither computed
    nor copied back from the device"""

    def __init__(
        self,
        input_size: int = 640,
        threshold: float = 0.5,
        nms_iou: float = 0.4,
        model_dir: Path | None = None,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        threads: int = 0,
        min_input: int | None = None,
        backend: BackendName = "auto",
        device_id: int = 0,
        fp16: bool = True,
        cache_dir: Path | None = None,
        buckets: Sequence[int] | None = None,
        int8: bool = False,
        static_graphs: bool = True,
        device_decode: bool = True,
        cuda_graphs: bool = True,
    ) -> None:
        self.input_size = input_size
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.min_input = min_input
        self._gpu = runs_on_gpu(backend, providers)
        # int8 weights only where ONNX Runtime runs them on the CPU: a GPU runs fp32/fp16 engines
        cpu_ort = not self._gpu and choose_backend(backend, providers) == "onnxruntime"
        variant = int8_variant(self.model_name, input_size) if int8 and cpu_ort else None
        self.int8 = variant is not None
        self.weights = variant or self.model_name
        """the manifest entry actually loaded (``plate`` or ``plate_int8``)"""
        self.spec = spec(self.weights)
        self._path = model_path(self.weights, model_dir)
        self.buckets = check_buckets(buckets) if buckets else DEFAULT_BUCKETS
        self.device_decode = device_decode
        self._make = lambda model, profile=None: make_backend(
            model, backend, providers, threads, device_id, fp16, cache_dir, profile, static=static_graphs,
            graphs=cuda_graphs, key=f"{self.weights}-{self.spec.sha256[:16]}")
        self.decoded_on_device = 0
        """frames decoded on the device, and those the host decoded instead (overflow, uncertified)"""
        self.decoded_on_host = 0
        self._thresholds: Any = None
        """the groups' score thresholds as a device tensor (made once: a CUDA graph cannot upload)"""
        self._backends: dict[tuple[int, int], Backend] = {}
        self.backend: Backend | None = None
        if self.per_shape:  # backends are made per canvas size on first use
            self.input_name = onnx.load(str(self._path), load_external_data=False).graph.input[0].name
        else:
            self.backend = self._make(self.load_model(), self._profile())
            self.input_name = self.backend.input_name
        self._lock = threading.Lock()  # one run at a time per model keeps CPU threads predictable

    def load_model(self) -> onnx.ModelProto:
        model = onnx.load(str(self._path))
        model = make_dynamic(model) if self.dynamic_rewrite else model
        if self.unused_outputs:
            keep = [o for o in model.graph.output if o.name not in self.unused_outputs]
            del model.graph.output[:]
            model.graph.output.extend(keep)
        return model

    def _profile(self, shape: tuple[int, int] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """TensorRT's shape range: batch 1..largest bucket, canvas up to ``input_size`` square."""
        h, w = shape or (self.input_size, self.input_size)
        lo = (1, 3, *(shape or (32, 32)))
        return lo, (self.buckets[-1], 3, h, w)

    def backend_for(self, height: int, width: int) -> Backend:
        if self.backend is not None:
            return self.backend
        key = (height, width)
        if key not in self._backends:
            model = self.reshape_model(onnx.load(str(self._path)), height, width)
            self._backends[key] = self._make(model, self._profile(key))
        return self._backends[key]

    def target_side(self, size: int) -> int:
        """The long side this model letterboxes a frame whose long side is ``size`` to."""
        return target_side(size, self.input_size, self.min_input)

    @property
    def on_gpu(self) -> bool:
        """Where this model runs (per-shape models: where their backends will run)."""
        return self.backend.on_gpu if self.backend is not None else self._gpu

    def backends(self) -> list[Backend]:
        """Every backend built so far (per-shape models have one per canvas)."""
        return [self.backend] if self.backend is not None else list(self._backends.values())

    @property
    def device(self) -> str:
        b = self.backend or next(iter(self._backends.values()), None)
        return b.device if b is not None else "cpu"

    def reshape_model(self, model: onnx.ModelProto, height: int, width: int) -> onnx.ModelProto:
        """For ``per_shape`` models: the graph re-targeted to this input size."""
        raise NotImplementedError

    @property
    def version(self) -> str:
        return f"{self.weights}@{self.spec.sha256[:12]}"

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        """NHWC BGR uint8 canvas -> the model's NCHW float32 input (host path)."""
        x = batch[..., ::-1] if self.rgb else batch
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
        return x * np.float32(1 / 255) if self.unit else x

    def begin(self, n: int, canvas: tuple[int, int], backend: Backend) -> None:
        """Called (under the model's lock) before decoding a batch of ``n`` on a ``canvas``."""
        return None

    @abstractmethod
    def decode(self, outputs: list[np.ndarray], index: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (canvas pixels) and scores of batch item ``index``, before NMS."""

    def run(self, images: list[Picture], frames: DeviceFrames | None = None) -> list[Detections]:
        """Detections per image; ``frames`` are the same images already on this model's device."""
        return self.complete(self.prepare(images, frames))

    __call__ = run

    def prepare(self, images: list[Picture], frames: DeviceFrames | None = None,
                scale: float | None = None) -> list[Chunk]:
        """The model inputs of a batch, letterboxed and normalised, split into bucket-sized runs.

        ``scale`` given, every image is resized by it, not to the model's input size: crops of a
        frame read at the scale of the whole frame (host path only).

        Kept apart from :meth:`complete` so that the next batch can be prepared (uploaded and
        letterboxed) while the previous one is still running on the device. I420 pictures are
        converted to BGR here on the host path; with ``frames`` (the batch on the device) they are
        converted there, and only their sizes are read here.
        """
        if not images:
            return []
        if frames is None or scale is not None:
            images = [as_bgr(im) for im in images]
        if scale is not None or (frames is None and not self.on_gpu):
            return [self._prepare_chunk(images, None, len(images), scale)]
        out: list[Chunk] = []
        at = 0
        for n, bucket in plan(len(images), self.buckets):
            sub = frames.subset(list(range(at, at + n))) if frames is not None else None
            out.append(self._prepare_chunk(images[at:at + n], sub, bucket, None))
            at += n
        return out

    def complete(self, chunks: list[Chunk]) -> list[Detections]:
        """Run the prepared inputs and decode them: detections per image, in order."""
        out: list[Detections] = []
        for chunk in chunks:
            out.extend(self._complete_chunk(chunk))
        return out

    def _prepare_chunk(self, images: list[Picture], frames: DeviceFrames | None, bucket: int,
                       scale: float | None = None) -> Chunk:
        n = len(images)
        if frames is not None:
            x, places = frames.letterbox(self.input_size, pad=self.pad_value, min_side=self.min_input,
                                         rgb=self.rgb, unit=self.unit, pad_to=bucket)
            canvas = tuple(x.shape[2:4])
        else:
            batch, places = letterbox_batch(images, self.input_size, pad=self.pad_value,
                                            min_side=self.min_input, scale=scale)
            if bucket > n:  # blank frames up to the bucket: one engine shape per bucket
                blank = np.full((bucket - n, *batch.shape[1:]), self.pad_value, np.uint8)
                batch = np.concatenate([batch, blank])
            canvas = batch.shape[1:3]
            x = self.preprocess(batch)
        return Chunk(x, places, (int(canvas[0]), int(canvas[1])), [im.shape for im in images])

    def _complete_chunk(self, chunk: Chunk) -> list[Detections]:
        backend = self.backend_for(*chunk.canvas)
        claim_on_this_stream(chunk.x)
        if isinstance(backend, OrtBackend) and not backend.on_gpu:
            # ONNX Runtime runs a session from several threads at once: CPU lanes run chunks of one
            # model side by side (stream.detect.lanes); decoding still takes the lock below
            outputs = backend.run(chunk.x)
            with self._lock:
                self.begin(chunk.x.shape[0], chunk.canvas, backend)
                return [self._finish(outputs, i, place, shape)
                        for i, (place, shape) in enumerate(zip(chunk.places, chunk.shapes, strict=True))]
        # decode may keep per-batch state (YuNet's grid size): same lock as the run
        with self._lock:
            if self.device_decode and self.groups() and hasattr(backend, "run_decoded"):
                return self._complete_on_device(chunk, backend)
            outputs = backend.run(chunk.x)
            self.begin(chunk.x.shape[0], chunk.canvas, backend)
            return [self._finish(outputs, i, place, shape)
                    for i, (place, shape) in enumerate(zip(chunk.places, chunk.shapes, strict=True))]

    # -- decoding on the device (torch backend) ------------------------------------------------------

    def groups(self) -> list[Group]:
        """The classes this model reports, for decoding on the device; empty: host decoding only."""
        return []

    def device_candidates(self, outputs: list[Any], n: int, canvas: tuple[int, int],
                          names: list[str]) -> tuple[Any, Any, Any]:
        """Per frame and candidate: score, canvas box and group index, as device tensors."""
        raise NotImplementedError

    def _complete_on_device(self, chunk: Chunk, backend: Any) -> list[Detections]:
        import torch

        from stream.detect.device_decode import DEFAULT_K, select, unpack

        groups = self.groups()
        n, canvas = chunk.x.shape[0], chunk.canvas
        names = backend.output_names

        def decode(outputs: list[Any]) -> Any:
            device = outputs[0].device
            if self._thresholds is None or self._thresholds.device != device:
                self._thresholds = torch.tensor([g.threshold for g in groups], device=device)
            scores, boxes, classes = self.device_candidates(outputs, n, canvas, names)
            return select(scores, boxes, classes, self._thresholds, self.nms_iou, DEFAULT_K)

        packed, raw = backend.run_decoded(chunk.x, decode, key=chunk.canvas)
        frames = unpack(packed)
        host: list[np.ndarray] | None = None
        out: list[Detections] = []
        for i, (place, shape) in enumerate(zip(chunk.places, chunk.shapes, strict=True)):
            found = frames[i]
            if found is None:  # too many candidates, or NMS not certified: the host decodes this frame
                if host is None:
                    host = [r.cpu().numpy() for r in raw]
                    self.begin(n, chunk.canvas, backend)
                self.decoded_on_host += 1
                out.append(self._finish(host, i, place, shape))
                continue
            self.decoded_on_device += 1
            boxes, scores, classes = found
            parts = [self._place(boxes[classes == g], scores[classes == g], place, shape, grp.label)
                     for g, grp in enumerate(groups)]
            out.append(Detections.concat(parts) if len(parts) > 1 else parts[0])
        return out

    def _finish(self, outputs: list[np.ndarray], i: int, place: Placement, shape: tuple) -> Detections:
        boxes, scores = self.decode(outputs, i)
        return self._boxes(boxes, scores, place, shape, self.label)

    def _boxes(self, boxes: np.ndarray, scores: np.ndarray, place: Placement, shape: tuple,
               label: str, threshold: float | None = None) -> Detections:
        """Canvas boxes above the threshold, NMS'd, mapped back to the source frame and clipped."""
        keep = scores >= (self.threshold if threshold is None else threshold)
        boxes, scores = boxes[keep], scores[keep]
        if len(boxes):
            k = nms(boxes, scores, self.nms_iou)
            boxes, scores = boxes[k], scores[k]
        return self._place(boxes, scores, place, shape, label)

    @staticmethod
    def _place(boxes: np.ndarray, scores: np.ndarray, place: Placement, shape: tuple,
               label: str) -> Detections:
        """Canvas boxes (after threshold and NMS) mapped back to the source frame, clipped, and
        those under a pixel wide or tall dropped."""
        if len(boxes):
            boxes = clip_boxes(place.to_source(boxes), shape[1], shape[0])
            ok = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
            boxes, scores = boxes[ok], scores[ok]
        return Detections(boxes=boxes.astype(np.float32), scores=scores.astype(np.float32),
                          labels=(label,) * len(boxes))

def bgr_planar(batch: np.ndarray) -> np.ndarray:
    """NHWC uint8 BGR -> NCHW float32 BGR 0-255."""
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)


def rgb_unit(batch: np.ndarray) -> np.ndarray:
    """NHWC uint8 BGR -> NCHW float32 RGB 0-1."""
    x = np.ascontiguousarray(batch[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
    return x * np.float32(1 / 255)
