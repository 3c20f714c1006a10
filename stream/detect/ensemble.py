"""The detection stage as the rest of the system sees it: frames in, face/plate Detections out.

It runs the configured models over one batch of frames (possibly from different streams and of
different sizes) and merges their results per frame:
- faces from one or more face models, merged by NMS;
- licence plates from the plate model;
- heads of people too small for any face model (CCTV at a distance, faces of 6-15 px): a person
  detector finds the body and a head-sized mask is placed at its top. Such masks carry label
  ``face`` since that is what they hide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream.core.cuts import MAX_GAP, ShotCuts
from stream.core.detections import Detections, FrameRef
from stream.core.nms import iou_matrix, nms
from stream.core.vehicle_plates import LABEL as VEHICLE_PLATE
from stream.core.vehicle_plates import TEXT_LABEL, plates_from_vehicles
from stream.core.yuv import I420, Picture
from stream.detect.backend import TRANSFERS, BackendName, choose_backend, runs_on_gpu
from stream.detect.base import Chunk, OnnxDetector
from stream.detect.buckets import DEFAULT_BUCKETS
from stream.detect.centerface import CenterFace
from stream.detect.crops import CropConfig, cut, plan_crops, to_frame
from stream.detect.device import DeviceFrames, SideStream, StagingRing, torch_device_ok
from stream.detect.lanes import Lanes, plan_lanes, split
from stream.detect.letterbox import scaled
from stream.detect.regions import (
    GateConfig,
    Look,
    RegionGate,
    changed_cells,
    grey_region,
    model_rect,
    signature,
    truncated,
)
from stream.detect.relook import LostPlates, RelookConfig
from stream.detect.runtime import DEFAULT_PROVIDERS
from stream.detect.text import TextPlates, merge_lines
from stream.detect.yolo import PersonYolo, PlateYolo
from stream.detect.yunet import YuNet

log = logging.getLogger(__name__)

PLATE_CONTEXT = 128
"""pixels of the plate model's input added around each change-gated crop: it reads a plate by what
is around it, and on crops with less it missed plates it found on the whole frame (docs/
redaction-quality.md, "Still cameras")"""

IDLE_S = 60.0
"""a stream no batch held a frame of for this long is dropped from the stage's memories (change-
gated pictures and boxes, plates just lost): a camera removed or a WHIP session ended must not hold
them for ever"""

FACE_MODELS: dict[str, type[OnnxDetector]] = {"centerface": CenterFace, "yunet": YuNet}


def phase(stream: str) -> int:
    """A stable per-stream offset for the cadences' first run.

    Without it every stream started at once would run its plate and person detectors on the same
    batches, and those batches would be several times slower than the rest (latency spikes at p99).
    """
    return zlib.crc32(stream.encode()) % 65536


@dataclass
class ModelConfig:
    threshold: float
    input_size: int
    min_input: int | None = None
    """if set, frames are detected at their own size clamped to [min_input, input_size]"""
    every: int = 1
    """run on every n-th frame of a stream only; the tracker carries boxes in between"""
    enabled: bool = True


@dataclass
class DetectorConfig:
    faces: dict[str, ModelConfig] = field(
        default_factory=lambda: {"centerface": ModelConfig(threshold=0.35, input_size=960, min_input=640)}
    )
    plate: ModelConfig | None = field(
        # small plates are found far more often when the frame is enlarged to 960 (dev set:
        # 164/191 plates at 960 against 152/191 at native size), so plates always use 960
        default_factory=lambda: ModelConfig(threshold=0.2, input_size=960)
    )
    person_heads: ModelConfig | None = field(
        default_factory=lambda: ModelConfig(threshold=0.3, input_size=960, min_input=640)
    )
    head_max_person_px: float = 160.0
    """people shorter than this (in source pixels) get a head mask from their body box"""
    plate_max_vehicle_px: float | None = None
    """vehicles (found by the person model) shorter than this with no plate detected on them get
    a plate mask over their middle: their plates are below what the plate model sees (with
    ``plate_crops``: neither pass found one). None or 0: no masks"""
    plate_crops: CropConfig | None = None
    """the plate model run again on a crop around each vehicle (see :mod:`stream.detect.crops`);
    needs the plate model and the person model (which reports the vehicles)"""
    plate_relook: RelookConfig | None = None
    """the plate model again on an enlarged crop around each plate seen in the last frames of a
    stream that a due frame's full-frame pass did not find (see :mod:`stream.detect.relook`); needs the
    plate model and frame references (streams and video files)"""
    text_plates: ModelConfig | None = None
    """the text detector on whole frames, its lines masked as plates (see :mod:`stream.detect.text`);
    needs the plate model (plates on)"""
    screens: bool = False
    """report screens (COCO tv, laptop, cell phone) as ``screen`` boxes; needs the person model"""
    bodies: bool = False
    """report the person model's body boxes as ``person`` boxes (streams that mask whole persons)"""
    providers: Sequence[str] = DEFAULT_PROVIDERS
    threads: int = 0
    """ONNX Runtime threads per CPU session; 0: cores / lanes (see :mod:`stream.detect.lanes`)"""
    lanes: int = 0
    """CPU only: model runs of a batch that go side by side, one core each; 0: one per core (up to
    4), or cores / ``threads`` where threads are set; 1: one after the other"""
    model_dir: Path | None = None
    backend: BackendName = "auto"
    device_id: int = 0
    fp16: bool = True
    """GPU only: fp16 TensorRT engines / fp16 torch modules"""
    cache_dir: Path | None = None
    """where TensorRT engines are cached (built once per model, shape range and GPU)"""
    buckets: Sequence[int] = DEFAULT_BUCKETS
    device_preprocess: bool = True
    """on a GPU: upload frames once and letterbox/normalise there (needs torch)"""
    int8: bool = True
    """CPU only: run a model's int8 variant where the manifest has one (plate, person) for its
    input size (up to 640); GPUs and the torch backend always run the fp32 graphs"""
    static_graphs: bool = True
    """torch backend: one module per input shape, from the graph frozen to it (no host syncs)"""
    device_decode: bool = True
    """torch backend: threshold, top-K and NMS on the device; only the kept boxes come back"""
    cuda_graphs: bool = True
    """torch backend on a GPU: forward and device decoding replayed as one CUDA graph per shape"""
    regions: GateConfig | None = None
    """CPU models on streams: look again only where the picture changed since the model last
    looked (see :mod:`stream.detect.regions`); None: every due frame is searched whole"""


def merge_plates(parts: list[Detections]) -> Detections:
    """Plates of one frame from several passes; the same plate found twice keeps its more certain box."""
    both = Detections.concat(parts)
    if len(both) < 2:
        return both
    return both.select(np.isin(np.arange(len(both)), nms(both.boxes, both.scores, 0.5)))


def heads_from_people(people: Detections, max_height: float) -> Detections:
    """Head-sized boxes at the top of small person boxes.

    An upright adult's head is about 1/7 of body height and sits near the top centre of the
    box; the box is made wider and taller than that because arms, strides and partial occlusion
    move the body box's centre away from the head.
    """
    if not len(people):
        return Detections()
    b = people.boxes
    h = b[:, 3] - b[:, 1]
    keep = h <= max_height
    b, s, h = b[keep], people.scores[keep], h[keep]
    cx = (b[:, 0] + b[:, 2]) / 2
    hh = h * 0.22
    hw = np.maximum(h * 0.2, np.minimum(b[:, 2] - b[:, 0], h * 0.3))
    heads = np.stack([cx - hw / 2, b[:, 1] - h * 0.02, cx + hw / 2, b[:, 1] + hh], 1).astype(np.float32)
    return Detections(boxes=heads, scores=s.astype(np.float32), labels=("face",) * len(heads))


_NOT_LOOKED_AT = np.zeros((2, 2, 3), np.uint8)
"""stands in for an I420 frame no model is due on: no model reads it, so it is not converted"""


Scale = tuple[float, float] | None
"""(x, y) factors from a frame the models saw to its source frame; None: the same size"""


def detector_input(images: Sequence[Picture], models: Sequence[OnnxDetector | None],
                   due: Sequence[Sequence[bool]]) -> tuple[list[np.ndarray], list[Scale]]:
    """The BGR frames a batch's models read, and per frame the (x, y) factors that map their boxes
    back to the source frame (None: the frame is at its own size).

    BGR frames pass as they are. An I420 frame is converted once for every model, and when it is
    larger than the largest canvas any model ``due`` on it letterboxes it to, it is shrunk to that
    size on its planes first: a 1280x720 frame for 640 px models costs a quarter of the conversion,
    and each model's letterbox then has nothing (or less) left to shrink.
    """
    out: list[np.ndarray] = []
    scales: list[Scale] = []
    for i, im in enumerate(images):
        if not isinstance(im, I420):
            out.append(im)
            scales.append(None)
            continue
        long = max(im.width, im.height)
        need = max((m.target_side(long) for m, d in zip(models, due, strict=True) if m is not None and d[i]),
                   default=0)
        if need == 0:
            out.append(_NOT_LOOKED_AT)
            scales.append(None)
        elif need >= long:
            out.append(im.to_bgr())
            scales.append(None)
        else:
            s = need / long
            w, h = max(2, round(im.width * s / 2) * 2), max(2, round(im.height * s / 2) * 2)
            out.append(im.to_bgr((w, h)))
            scales.append((im.width / w, im.height / h))
    return out, scales


def device_input(images: Sequence[Picture], due: Sequence[Sequence[bool]]) -> list[Picture]:
    """The pictures a batch uploads when its models read them on the device: each as it is (an
    I420 picture is converted there, after a transfer of half the bytes of BGR), and a stand-in
    for a frame no model is due on, which is then not uploaded at all."""
    return [im if any(d[i] for d in due) else _NOT_LOOKED_AT for i, im in enumerate(images)]


def to_source(dets: Detections, scale: Scale) -> Detections:
    """Boxes found on a frame shrunk by :func:`detector_input`, in the source frame's pixels."""
    if scale is None or not len(dets):
        return dets
    sx, sy = scale
    return dataclasses.replace(dets, boxes=(dets.boxes * np.array([sx, sy, sx, sy], np.float32)))


@dataclass
class _Searched:
    """A vehicle crop searched by the crop pass: when, the picture searched (see
    :func:`~stream.detect.regions.signature`) and the plates found, in frame pixels."""

    seq: int
    sig: np.ndarray
    found: Detections


@dataclass
class Prepared:
    """A batch made ready for every model (see :meth:`FrameDetector.prepare`)."""

    n: int
    runs: list[tuple[OnnxDetector | None, list[bool], list[Chunk] | None]]
    """per model, in the order faces..., plate, person, text: the frames it is due on and its inputs
    (None: change-gated, decided and run in :meth:`FrameDetector.complete`)"""
    scales: list[Scale] = field(default_factory=list)
    """per frame: how the models' boxes map back to the source (see :func:`detector_input`)"""
    images: list[Picture] = field(default_factory=list)
    """the source frames, which the crop pass cuts vehicles from at full resolution"""
    read: list[np.ndarray] = field(default_factory=list)
    """the frames the models read (see :func:`detector_input`), kept for change-gated models"""
    refs: Sequence[FrameRef] | None = None


class FrameDetector:
    """Runs every configured model on a batch and returns one :class:`Detections` per frame."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = cfg = config or DetectorConfig()
        # lanes are for ONNX Runtime on the CPU: a GPU runs a whole batch at once, and the torch
        # backend (a GPU path, tested on the CPU) runs one model at a time
        cpu_ort = (choose_backend(cfg.backend, cfg.providers) == "onnxruntime"
                   and not runs_on_gpu(cfg.backend, cfg.providers))
        count, threads = plan_lanes(cfg.lanes, cfg.threads, not cpu_ort)
        self.lanes = Lanes(count)
        """where a batch's model runs go side by side (CPU only)"""
        common = {"model_dir": cfg.model_dir, "providers": cfg.providers, "threads": threads,
                  "backend": cfg.backend, "device_id": cfg.device_id, "fp16": cfg.fp16,
                  "cache_dir": cfg.cache_dir, "buckets": cfg.buckets, "int8": cfg.int8,
                  "static_graphs": cfg.static_graphs, "device_decode": cfg.device_decode,
                  "cuda_graphs": cfg.cuda_graphs}

        def build(cls: type[OnnxDetector], m: ModelConfig | None, **extra: object) -> OnnxDetector | None:
            if m is None or not m.enabled:
                return None
            return cls(threshold=m.threshold, input_size=m.input_size, min_input=m.min_input, **common,
                       **extra)

        self.face_models = [(build(FACE_MODELS[n], m), m) for n, m in cfg.faces.items() if m.enabled]
        self.plate_model = build(PlateYolo, cfg.plate)
        plates_on = cfg.plate is not None and cfg.plate.enabled
        vehicles = plates_on and (bool(cfg.plate_max_vehicle_px) or cfg.plate_crops is not None)
        self.person_model = build(PersonYolo, cfg.person_heads, **({"vehicles": True} if vehicles else {}),
                                  **({"screens": True} if cfg.screens else {}))
        self.text_model = build(TextPlates, cfg.text_plates) if plates_on else None
        # the crop pass: the plate model's weights again, one session per crop size (on a CPU the
        # int8 variant where the size allows, as for the full-frame pass)
        self.crop_models: list[OnnxDetector] = []
        cc = cfg.plate_crops
        if cc is not None and plates_on and self.person_model is not None:
            for size in cc.sizes:
                model = build(PlateYolo, ModelConfig(threshold=cc.threshold, input_size=size, min_input=size))
                if model is not None:
                    self.crop_models.append(model)
        self.relook_model: OnnxDetector | None = None
        self._lost: LostPlates | None = None
        """per stream, the plates found in its last frames (see :mod:`stream.detect.relook`)"""
        rc = cfg.plate_relook
        if rc is not None and plates_on:
            self.relook_model = build(PlateYolo, ModelConfig(threshold=rc.threshold, input_size=rc.side,
                                                             min_input=rc.side))
            self._lost = LostPlates(rc)
        self.relooks_run = 0
        """lost plates looked for again so far, and how many of those looks found a plate"""
        self.relooks_found = 0
        self.crops_run = 0
        """vehicle crops searched so far, and the seconds the crop pass took (cutting and the plate
        model): the cost per vehicle that benchmarks report"""
        self.crop_seconds = 0.0
        gpu = [m for m in self.models if m.on_gpu]
        self.device = f"cuda:{cfg.device_id}" if gpu else "cpu"
        # frames go up once per batch and every model cuts its canvas from that copy
        self.upload = bool(gpu) and cfg.device_preprocess and torch_device_ok(self.device)
        self._side: SideStream | None = None
        self._ring: StagingRing | None = None
        """pinned buffers the batches' frames go up through (one copy per batch)"""
        self._last_run: dict[tuple[int, str], int] = {}
        """per (model slot, stream): the frame number a model last ran on (its cadence)"""
        self._cuts: dict[str, tuple[int, ShotCuts]] = {}
        """per stream: the last frame number judged, and its shot-cut reader (cadences only)"""
        self._gates: dict[tuple[int, str], RegionGate] = {}
        """per (model slot, stream): what a change-gated model last saw and found"""
        self.looks = {"full": 0, "crops": 0, "skip": 0}
        """change-gated model runs so far, by what the model looked at"""
        self._crop_memo: dict[str, dict[tuple[int, int, int, int], _Searched]] = {}
        """per stream, the vehicle crops of its last crop pass: what was searched and found"""
        self.crops_reused = 0
        """vehicle crops not searched again: their pixels had not changed (``regions``)"""
        self._seen_at: dict[str, float] = {}
        """per stream, when a batch last held a frame of it (its memories are dropped when idle)"""
        self._swept = time.monotonic()
        if gpu and cfg.regions is not None:
            log.warning("detection.skip_unchanged applies to models on the CPU only; %s on the GPU search "
                        "every due frame whole", ", ".join(m.weights for m in gpu))
        if gpu and cfg.device_preprocess and not self.upload:
            log.warning("preprocessing on the host: torch is not installed (pip install torch) so "
                        "frames cannot be letterboxed on the GPU")

    def transfer_bytes(self) -> tuple[int, int]:
        """Host->device and device->host bytes moved so far (all detectors of the process)."""
        return TRANSFERS.snapshot()

    def warmup(self, shape: tuple[int, int] = (1080, 1920), max_batch: int = 1) -> None:
        """Run every model once per bucket up to ``max_batch`` on black frames of ``shape``.

        On a GPU this builds the TensorRT engines and cuDNN plans before the first real frame;
        without it the first batches of a new stream would miss their deadline and be blanked.
        """
        frame = np.zeros((*shape, 3), np.uint8)
        sizes = sorted({b for m in self.models for b in m.buckets if b <= max_batch} | {1})

        def run_all() -> None:
            for n in sizes:
                self.detect([frame] * n)
            # black frames have no vehicles and no plates: the crop pass and the second look at lost
            # plates get runs of their own
            for m in [*self.crop_models, *([self.relook_model] if self.relook_model else [])]:
                # vehicle crops are mostly wider than tall; the second look's are square
                tall = m.input_size if m is self.relook_model else m.input_size // 2
                crop = np.zeros((tall, m.input_size, 3), np.uint8)
                for n in sizes:
                    m.run([crop] * n)

        run_all()
        # the torch path builds a static graph per shape on a thread of its own: wait for them, then
        # run once more so that each shape's CUDA graph is captured before the first real frame
        pending = [bk for bk in self.backends() if hasattr(bk, "wait_static")]
        if pending:
            for bk in pending:
                if not bk.wait_static():
                    log.warning("static graphs still being built after warm-up; their shapes run on the "
                                "dynamic graph until they are ready")
            run_all()

    def backends(self) -> list[Any]:
        """Every inference backend of every model (per-shape models have one per canvas)."""
        return [bk for m in self.models for bk in m.backends()]

    @property
    def models(self) -> list[OnnxDetector]:
        found = [m for m, _ in self.face_models] + [self.plate_model, self.person_model, self.text_model,
                                                     *self.crop_models, self.relook_model]
        return [m for m in found if m is not None]

    def __call__(self, images: list[Picture],
                 refs: Sequence[FrameRef] | None = None) -> list[Detections]:
        return self.detect(images, refs)

    def detect(self, images: list[Picture], refs: Sequence[FrameRef] | None = None) -> list[Detections]:
        """Detections per image; ``refs`` (stream and frame number of each) drive the cadences."""
        return self.complete(self.prepare(images, refs))

    def _schedule(self, slot: int, model: OnnxDetector | None, mcfg: ModelConfig | None, n: int,
                  refs: Sequence[FrameRef] | None) -> list[bool]:
        """Which images ``model`` (the ``slot``-th of the plan) is due on: its cadence, in source frames.

        A model with ``every = k`` runs on a stream's frame once ``k`` source frames have passed
        since it last ran on that stream, dropped ones included. Under load frames are dropped,
        and the model still runs about every ``k`` frames of the camera's time: a gap does not make
        it run more often (that spiral made every frame cost all models just when the stage was
        slowest), and does not make it run less often either (no modulo schedule that a run of
        drops could skip). A stream's first frame, or a frame numbered at or below the last run
        (the stream started again), runs it; that first run is counted as if it came
        ``(phase(stream) + stagger) % k`` frames earlier, so streams started together do not run
        their heavy models on the same batches; ``stagger`` (0 for the plate model, 1 for the person
        model) puts one stream's plate and person runs on different frames, so that no frame costs
        both and its latency spikes.
        """
        if model is None or mcfg is None:
            return [False] * n
        every = max(1, mcfg.every)
        if refs is None or every == 1:
            return [True] * n
        stagger = 1 if model is self.person_model else 0
        due = [False] * n
        # a stream's frames are counted oldest first whatever order the batch has: a frame older
        # than the one just counted would otherwise read as the stream having started again
        for i in sorted(range(n), key=lambda i: (refs[i].stream, refs[i].seq)):
            ref = refs[i]
            key = (slot, ref.stream)
            last = self._last_run.get(key)
            if last is not None and 0 < ref.seq - last < every:
                continue
            fresh = last is None or ref.seq <= last
            self._last_run[key] = ref.seq - ((phase(ref.stream) + stagger) % every if fresh else 0)
            due[i] = True
        return due

    def _restart_on_cuts(self, images: list[Picture], refs: Sequence[FrameRef]) -> None:
        """A frame that cuts to another view (:mod:`stream.core.cuts`) starts its stream's cadences
        afresh, so every model looks at the new view at once: the tracker ends the old view's
        tracks there, and a model due two frames later would leave the new view's plates and
        distant heads unmasked until then. Frames of a stream are read oldest first."""
        for i in sorted(range(len(images)), key=lambda i: (refs[i].stream, refs[i].seq)):
            ref = refs[i]
            seen = self._cuts.get(ref.stream)
            judge = seen[1] if seen is not None else ShotCuts()
            gap = ref.seq - seen[0] if seen is not None else MAX_GAP + 1  # a first frame is not judged
            if gap <= 0:  # the stream started again: this frame is not judged
                judge.reset()
            self._cuts[ref.stream] = (ref.seq, judge)
            if judge(images[i], gap):
                for key in [k for k in self._last_run if k[1] == ref.stream]:
                    del self._last_run[key]
                if self._lost is not None:  # the old view's plates are not in the new one
                    self._lost.forget(ref.stream)

    def forget(self, stream: str) -> None:
        """Start ``stream``'s cadences afresh: the results of a run on it never reached its tracker."""
        for key in [k for k in self._last_run if k[1] == stream]:
            self._last_run.pop(key, None)
        for key in [k for k in self._gates if k[1] == stream]:
            self._gates.pop(key, None)
        self._crop_memo.pop(stream, None)
        self._cuts.pop(stream, None)
        if self._lost is not None:
            self._lost.forget(stream)

    def _gated(self, model: OnnxDetector, refs: Sequence[FrameRef] | None) -> bool:
        return self.config.regions is not None and refs is not None and not model.on_gpu

    def prepare(self, images: list[Picture], refs: Sequence[FrameRef] | None = None) -> Prepared:
        """Upload and letterbox a batch for every model due on it; no inference yet.

        The batcher's worker calls this for the next batch while :meth:`complete` runs the
        previous one (two batches in flight); on a GPU it works on a stream of its own. I420
        frames become BGR here, once per batch: on the host (see :func:`detector_input`), or,
        where every model reads the batch from the device, on the device after the upload.
        """
        n = len(images)
        runs: list[tuple[OnnxDetector | None, list[bool], list[Chunk] | None]] = []
        plan = [*self.face_models, (self.plate_model, self.config.plate),
                (self.person_model, self.config.person_heads), (self.text_model, self.config.text_plates)]
        if refs is not None and any(m is not None and c is not None and c.every > 1 for m, c in plan):
            self._restart_on_cuts(images, refs)
        dues = [self._schedule(slot, model, mcfg, n, refs) for slot, (model, mcfg) in enumerate(plan)]
        models = [m for m, _ in plan]
        if self.upload and all(m.on_gpu for m in models if m is not None):
            # I420 goes up as it is (half the bytes of BGR) and is converted on the device
            bgr, scales = device_input(images, dues), [None] * n
        else:
            bgr, scales = detector_input(images, models, dues)
        if self._side is None and self.upload:
            self._side = SideStream(self.device)
        with self._side or contextlib.nullcontext():
            if self.upload and self._ring is None:
                self._ring = StagingRing(self.device)
            frames = DeviceFrames(bgr, self.device, self._ring) if self.upload and bgr else None
            for (model, _), due in zip(plan, dues, strict=True):
                picked = [i for i in range(n) if due[i]]
                chunks: list[Chunk] | None = []
                if model is not None and picked and self._gated(model, refs):
                    chunks = None  # where it looks depends on the last run's results: decided at run time
                elif model is not None and picked and self.lanes.parallel and not model.on_gpu:
                    # one chunk per lane: a model's frames of a batch run side by side
                    chunks = [c for part in split(picked, self.lanes.count)
                              for c in model.prepare([bgr[i] for i in part])]
                elif model is not None and picked:
                    sub = frames.subset(picked) if frames is not None and model.on_gpu else None
                    chunks = model.prepare([bgr[i] for i in picked], sub)
                runs.append((model, due, chunks))
        gated = any(chunks is None for _, _, chunks in runs)
        return Prepared(n, runs, scales, list(images) if self.crop_models or self._lost is not None else [],
                        bgr if gated else [], refs)

    def complete(self, prepared: Prepared) -> list[Detections]:
        """Run every model on a prepared batch and merge their boxes per frame.

        On a CPU with lanes (:mod:`stream.detect.lanes`) the models' runs go side by side: the plate
        model followed by the second look at plates just lost, the text pass, the person model
        followed by the crop pass on its vehicles, and the face models, each chunk a task.
        Change-gated models run first, in this thread: their gates and the frames' signatures are
        shared."""
        n = prepared.n
        scales = prepared.scales or [None] * n
        results: list[tuple[list[Detections], list[bool]]] = [([Detections()] * n, due)
                                                               for _, due, _ in prepared.runs]
        person_slot = len(prepared.runs) - 2
        sigs: dict[int, np.ndarray] = {}
        for slot, (model, due, chunks) in enumerate(prepared.runs):
            if model is not None and chunks is None:
                for i, d in self._gated_run(slot, model, due, prepared, sigs).items():
                    results[slot][0][i] = to_source(d, scales[i])

        def place(slot: int, found: list[Detections]) -> None:
            out, due = results[slot]
            for i, d in zip([i for i in range(n) if due[i]], found, strict=True):
                out[i] = to_source(d, scales[i])

        vehicles: list[Detections] = []
        crop_plates: list[list[Detections]] = []

        def people_then_crops() -> list[Detections]:
            model, _, chunks = prepared.runs[person_slot]
            if model is not None and chunks:
                place(person_slot, model.complete(chunks))
            people, people_due = results[person_slot]
            vehicles.extend(people[i].with_label("vehicle") for i in range(n))
            crop_plates.append(self._crop_pass(prepared.images, vehicles, people_due, prepared.refs))
            return []

        def runner(model: OnnxDetector, chunks: list[Chunk]) -> Callable[[], list[Detections]]:
            return lambda: model.complete(chunks)

        # the second look at plates just lost follows the plate model's run in the same task, on
        # the frames of that task, so that it goes beside the person model's lane, not after it
        plate_slot = len(prepared.runs) - 3
        relook = self._lost is not None and prepared.refs is not None
        relooked: list[tuple[dict[int, list[Detections]], int, int]] = []
        looked_again: set[int] = set()

        def plate_then_relook(model: OnnxDetector, chunks: list[Chunk],
                              frames: list[int]) -> Callable[[], list[Detections]]:
            def job() -> list[Detections]:
                found = model.complete(chunks)
                plates = {i: to_source(d, scales[i]) for i, d in zip(frames, found, strict=True)}
                relooked.append(self._second_looks(prepared, frames, plates))
                return found
            return job

        # the longest runs first, so that the short ones fill in beside them; with lanes each chunk
        # (a lane's share of the batch) is a task of its own
        jobs: list[tuple[int, Callable[[], list[Detections]]]] = []
        for slot in [plate_slot, len(prepared.runs) - 1, *range(len(self.face_models))]:
            model, due, chunks = prepared.runs[slot]
            if model is not None and chunks:
                parts = [[c] for c in chunks] if self.lanes.parallel else [chunks]
                if slot == plate_slot and relook:
                    picked = iter([i for i in range(n) if due[i]])
                    for part in parts:
                        frames = [next(picked) for c in part for _ in c.places]
                        looked_again.update(frames)
                        jobs.append((slot, plate_then_relook(model, part, frames)))
                    continue
                jobs += [(slot, runner(model, part)) for part in parts]
        jobs.insert(min(2, len(jobs)), (person_slot, people_then_crops))
        found: dict[int, list[Detections]] = {}
        for (slot, job), out in zip(jobs, self.lanes.run([job for _, job in jobs]), strict=True):
            if job is not people_then_crops:
                found.setdefault(slot, []).extend(out)
        for slot, dets in found.items():
            place(slot, dets)
        face_runs = results[:len(self.face_models)]
        plates, plate_due = results[-3]
        people, people_due = results[-2]
        texts, _ = results[-1]
        # the same plate found twice (full frame, vehicle crop, second look): the more certain box
        found_plates = [merge_plates([plates[i], crops]) for i, crops in enumerate(crop_plates[0])]
        if relook:
            # change-gated plate runs (no task above) are looked at again here, after every pass
            rest = [i for i in range(n) if plate_due[i] and i not in looked_again]
            relooked.append(self._second_looks(prepared, rest, {i: found_plates[i] for i in rest}))
            for extra, run, hits in relooked:
                for i, parts in extra.items():
                    found_plates[i] = merge_plates([found_plates[i], *parts])
                self.relooks_run += run
                self.relooks_found += hits
            self._remember_plates(prepared, found_plates, plate_due)
        out = []
        for i in range(n):
            observed = set()
            # head masks from the person model are faces too: faces count as looked for only
            # when every source of face boxes ran on this frame
            if any(due[i] for _, due in face_runs) and (self.person_model is None or people_due[i]):
                observed.add("face")
            if plate_due[i]:
                observed.add("plate")
                if self.text_model is not None:  # the text pass runs at the plate model's cadence
                    observed.add(TEXT_LABEL)
            extra = []
            if people_due[i] and self.person_model is not None:
                if self.config.bodies:
                    observed.add("person")
                    extra.append(people[i].with_label("person"))
                if self.config.screens:
                    observed.add("screen")
                    extra.append(people[i].with_label("screen"))
            faces = Detections.concat([r[i] for r, _ in face_runs])
            if len(self.face_models) > 1 and len(faces):
                faces = faces.select(np.isin(np.arange(len(faces)), nms(faces.boxes, faces.scores, 0.4)))
            heads = heads_from_people(people[i].with_label("person"), self.config.head_max_person_px)
            if len(heads) and len(faces):
                # a head already covered by a detected face needs no second mask
                inter = iou_matrix(heads.boxes, faces.boxes)
                heads = heads.select(inter.max(axis=1) < 0.1)
            found = found_plates[i]
            zones = Detections()
            if self.config.plate_max_vehicle_px and self.plate_model is not None and people_due[i]:
                observed.add(VEHICLE_PLATE)
                zones = plates_from_vehicles(vehicles[i], found, self.config.plate_max_vehicle_px)
            # text lines only add masks: a stand-in is kept or dropped by the plate model's plates
            d = Detections.concat([faces, heads, merge_lines(found, texts[i]), zones, *extra])
            out.append(Detections(d.boxes, d.scores, d.labels, observed=frozenset(observed)))
        if prepared.refs is not None:
            now = time.monotonic()
            for ref in prepared.refs:
                self._seen_at[ref.stream] = now
            self._sweep(now)
        return out

    def _second_looks(self, prepared: Prepared, frames: Sequence[int],
                      plates: dict[int, Detections]) -> tuple[dict[int, list[Detections]], int, int]:
        """What a second look found around each plate lost on ``frames`` (``plates``: what was found
        on them, in source pixels; see :mod:`stream.detect.relook`), per frame, with the crops run and
        those that found a plate. One plate-model run for all the crops. It only reads what is
        remembered, so lanes call it side by side."""
        assert self._lost is not None and self.relook_model is not None and self.plate_model is not None
        assert prepared.refs is not None
        refs = prepared.refs
        todo: list[tuple[int, tuple[int, int, int, int]]] = []
        for i in frames:
            shape = prepared.images[i].shape[:2]
            long = max(shape)
            read = self.plate_model.target_side(long) / long
            lost = self._lost.crops(refs[i].stream, refs[i].seq, plates[i], shape, read)
            todo += [(i, box) for box in lost]
        if not todo:
            return {}, 0, 0
        extra: dict[int, list[Detections]] = {}
        hits = 0
        for (i, box), d in zip(todo, self.relook_model.run([cut(prepared.images[i], box) for i, box in todo]),
                               strict=True):
            extra.setdefault(i, []).append(to_frame(d, box))
            hits += bool(len(d))
        return extra, len(todo), hits

    def _remember_plates(self, prepared: Prepared, plates: list[Detections], due: list[bool]) -> None:
        """Every due frame's plates, a stream's frames oldest first, for the next second looks."""
        assert self._lost is not None and prepared.refs is not None
        refs = prepared.refs
        due_frames = [i for i in range(prepared.n) if due[i]]
        for i in sorted(due_frames, key=lambda i: (refs[i].stream, refs[i].seq)):
            self._lost.remember(refs[i].stream, refs[i].seq, plates[i], prepared.images[i].shape[:2])

    def _sweep(self, now: float) -> None:
        """Drop the memories of streams not seen for :data:`IDLE_S` (checked every half of it; on
        the detector's own thread, so no lock is needed)."""
        if now - self._swept < IDLE_S / 2:
            return
        self._swept = now
        for stream in [s for s, t in self._seen_at.items() if now - t > IDLE_S]:
            del self._seen_at[stream]
            for key in [k for k in self._gates if k[1] == stream]:
                del self._gates[key]
            self._crop_memo.pop(stream, None)
            if self._lost is not None:
                self._lost.forget(stream)

    def _gated_run(self, slot: int, model: OnnxDetector, due: list[bool], prepared: Prepared,
                   sigs: dict[int, np.ndarray]) -> dict[int, Detections]:
        """A change-gated model on the frames it is due on: per frame, the whole frame, crops
        around what changed, or nothing (its last boxes stand). Boxes in the read frames' pixels.

        Frames of one stream are taken one after the other, oldest first (a stream's second frame in
        the batch is compared with what its first left), in rounds that batch the streams' whole
        frames together."""
        assert prepared.refs is not None
        refs = prepared.refs
        rounds: list[list[int]] = []
        seen: dict[str, int] = {}
        picked = [i for i in range(prepared.n) if due[i]]
        for i in sorted(picked, key=lambda i: (refs[i].stream, refs[i].seq)):
            k = seen.get(refs[i].stream, 0)
            seen[refs[i].stream] = k + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(i)
        out: dict[int, Detections] = {}
        for frames in rounds:
            out.update(self._gated_round(slot, model, frames, prepared, sigs))
        return out

    def _gated_round(self, slot: int, model: OnnxDetector, frames: list[int], prepared: Prepared,
                     sigs: dict[int, np.ndarray]) -> dict[int, Detections]:
        """One round of :meth:`_gated_run`: at most one frame per stream."""
        cfg = self.config.regions
        assert cfg is not None and prepared.refs is not None
        out: dict[int, Detections] = {}
        whole: list[int] = []
        looks: dict[int, tuple[RegionGate, Look, np.ndarray]] = {}
        for i in frames:
            im, ref = prepared.read[i], prepared.refs[i]
            shape = im.shape[:2]
            if i not in sigs:
                sigs[i] = signature(im, cfg.cell)
            gate = self._gates.setdefault((slot, ref.stream), RegionGate(cfg))
            long = max(shape)
            look = gate.look(sigs[i], ref.seq, shape, model.target_side(long) / long, model.per_shape,
                             context=PLATE_CONTEXT if model is self.plate_model else 0)
            looks[i] = (gate, look, sigs[i])
            if look.kind == "full":
                whole.append(i)
        for i, (gate, look, sig) in looks.items():
            if look.kind != "crops":
                continue
            im = prepared.read[i]
            shape = im.shape[:2]
            long = max(shape)
            scale = model.target_side(long) / long
            picture = scaled(im, scale)  # crops are cut from what the model reads of the whole frame
            parts = []
            for crop in look.crops:
                x1, y1, x2, y2 = model_rect(crop, shape, scale)
                found = model.complete(model.prepare([picture[y1:y2, x1:x2]], scale=1.0))[0]
                if len(found):
                    offset = np.array([x1, y1, x1, y1], np.float32)
                    found = dataclasses.replace(found, boxes=(found.boxes + offset) / np.float32(scale))
                if truncated(found, crop, shape):
                    break
                parts.append(found)
            else:
                out[i] = gate.commit(look, sig, prepared.refs[i].seq, shape, Detections.concat(parts))
                continue
            looks[i] = (gate, Look("full", why="cut"), sig)  # an object across a crop's edge
            whole.append(i)
        if whole:
            for i, found in zip(whole, model.run([prepared.read[i] for i in whole]), strict=True):
                gate, look, sig = looks[i]
                out[i] = gate.commit(Look("full", why=look.why), sig, prepared.refs[i].seq,
                                     prepared.read[i].shape[:2], found)
        for i, (gate, look, sig) in looks.items():
            if look.kind == "skip":
                out[i] = gate.commit(look, sig, prepared.refs[i].seq, prepared.read[i].shape[:2],
                                     Detections())
        for _, look, _ in looks.values():
            self.looks[look.kind] += 1
        return out

    def _crop_pass(self, images: list[Picture], vehicles: list[Detections], due: list[bool],
                   refs: Sequence[FrameRef] | None = None) -> list[Detections]:
        """Plates found on the vehicle crops of a batch (one plate-model batch for all of them), per
        frame in source pixels.

        Change-gated (``regions`` and ``refs``): a vehicle cut at the same box as in its stream's
        last crop pass, whose pixels there still match (cell by cell, as :mod:`stream.detect.regions`
        compares) the picture searched then, less than ``refresh`` frames ago, keeps what was found
        then without a new search: a parked car is searched once, not on every pass."""
        found = [Detections()] * len(vehicles)
        cc = self.config.plate_crops
        if not self.crop_models or cc is None or not images:
            return found
        crops = plan_crops([v if due[i] else None for i, v in enumerate(vehicles)],
                           [im.shape[:2] for im in images], cc)
        if not crops:
            return found
        per_frame: dict[int, list[Detections]] = {}
        on_cpu = not any(m.on_gpu for m in self.crop_models)
        gate = self.config.regions if refs is not None and on_cpu else None
        memo: dict[str, dict[tuple[int, int, int, int], _Searched]] = {}
        todo = crops
        if gate is not None and refs is not None:
            todo = []
            for c in crops:
                ref = refs[c.frame]
                sig = signature(grey_region(images[c.frame], c.box), gate.cell)
                old = self._crop_memo.get(ref.stream, {}).get(c.box)
                if (old is not None and old.seq < ref.seq < old.seq + gate.refresh
                        and not changed_cells(sig, old.sig, gate.cell, gate.levels).any()):
                    per_frame.setdefault(c.frame, []).append(old.found)
                    memo.setdefault(ref.stream, {})[c.box] = old  # the reference stays what was searched
                    self.crops_reused += 1
                else:
                    todo.append(c)
                    memo.setdefault(ref.stream, {})[c.box] = _Searched(ref.seq, sig, Detections())
        if todo:
            t0 = time.perf_counter()
            pixels = [cut(images[c.frame], c.box) for c in todo]
            for model in self.crop_models:
                for c, d in zip(todo, model.run(pixels), strict=True):
                    plates = to_frame(d, c.box)
                    per_frame.setdefault(c.frame, []).append(plates)
                    if gate is not None and refs is not None:
                        entry = memo[refs[c.frame].stream][c.box]
                        entry.found = Detections.concat([entry.found, plates])
            self.crops_run += len(todo)
            self.crop_seconds += time.perf_counter() - t0
        self._crop_memo.update(memo)
        for i, parts in per_frame.items():
            found[i] = Detections.concat(parts)
        return found
