"""Inference backends: one ONNX graph, run by ONNX Runtime (CPU, CUDA, TensorRT) or by torch.

ONNX Runtime is the production path: ``pip install stream-redact[gpu]`` brings onnxruntime-gpu,
whose CUDA and TensorRT providers run the graphs with I/O binding (the input is uploaded once,
outputs come back once), fp16 TensorRT engines cached on disk and built once per batch bucket.
GPU images that ship torch and CuPy but not onnxruntime-gpu can run the same graphs under torch
(``onnx2torch``); that backend also checks the ORT path independently. Every backend counts the
bytes it moves between host and device, which the metrics export.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from stream.detect.runtime import DEFAULT_PROVIDERS, PROVIDER_ALIASES, resolve_providers

log = logging.getLogger(__name__)

Profile = tuple[tuple[int, ...], tuple[int, ...]]
"""TensorRT shape range of the input: smallest and largest (N, C, H, W)"""
BackendName = Literal["auto", "onnxruntime", "torch"]
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stream-redact" / "trt"


class BackendError(RuntimeError):
    """A backend that cannot be built as configured; the message names the fix."""


class Transfers:
    """Bytes moved host->device and device->host, summed over every backend of a process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.h2d = 0
        self.d2h = 0

    def add(self, h2d: int = 0, d2h: int = 0) -> None:
        with self._lock:
            self.h2d += h2d
            self.d2h += d2h

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.h2d, self.d2h


TRANSFERS = Transfers()


class Backend(ABC):
    """Runs one graph on one device. ``run`` takes the model's NCHW input, on the host or device."""

    name: str = ""
    device: str = "cpu"

    def __init__(self, input_name: str, output_names: Sequence[str]) -> None:
        self.input_name = input_name
        self.output_names = list(output_names)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @abstractmethod
    def run(self, x: Any) -> list[np.ndarray]:
        """Outputs as host float32 arrays, in ``output_names`` order."""

    def describe(self) -> str:
        return f"{self.name} on {self.device}"


def _io_names(model: onnx.ModelProto) -> tuple[str, list[str]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    return inputs[0], [o.name for o in model.graph.output]


class OrtBackend(Backend):
    """ONNX Runtime with the first available of the configured providers.

    On a GPU provider the run goes through I/O binding: a host input is uploaded once into an
    OrtValue on the device (a torch CUDA tensor is bound in place, no copy), and outputs are
    bound to host memory so each comes back once. TensorRT builds fp16 engines for the batch
    buckets and caches them on disk, so a restart does not rebuild them.
    """

    def __init__(self, model: onnx.ModelProto, providers: Sequence[str] = DEFAULT_PROVIDERS,
                 threads: int = 0, device_id: int = 0, fp16: bool = True,
                 cache_dir: Path | None = None, profile: Profile | None = None,
                 io_binding: bool | None = None) -> None:
        from stream.detect.runtime import session_options

        input_name, output_names = _io_names(model)
        super().__init__(input_name, output_names)
        chosen = resolve_providers(providers)
        provider_args: list[Any] = []
        for p in chosen:
            if p == "TensorrtExecutionProvider":
                cache = Path(cache_dir or DEFAULT_CACHE)
                cache.mkdir(parents=True, exist_ok=True)
                opts = {"device_id": device_id, "trt_fp16_enable": fp16,
                        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
                if profile is not None:  # one engine covering every bucket, built once
                    lo, hi = profile
                    opts["trt_profile_min_shapes"] = f"{input_name}:{'x'.join(map(str, lo))}"
                    opts["trt_profile_opt_shapes"] = f"{input_name}:{'x'.join(map(str, hi))}"
                    opts["trt_profile_max_shapes"] = f"{input_name}:{'x'.join(map(str, hi))}"
                provider_args.append((p, opts))
            elif p == "CUDAExecutionProvider":
                provider_args.append((p, {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"}))
            else:
                provider_args.append(p)
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(threads),
                                            providers=provider_args)
        active = self.session.get_providers()
        self.provider = active[0]
        self.device = f"cuda:{device_id}" if self.provider in GPU_PROVIDERS else "cpu"
        self.name = "ort-" + {v: k for k, v in PROVIDER_ALIASES.items()}.get(self.provider, self.provider)
        self.device_id = device_id
        self.io_binding = self.on_gpu if io_binding is None else io_binding

    def run(self, x: Any) -> list[np.ndarray]:
        if not self.io_binding:
            x = _to_host(x)
            return self.session.run(None, {self.input_name: x})
        binding = self.session.io_binding()
        kind = "cuda" if self.on_gpu else "cpu"
        if isinstance(x, np.ndarray):
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), kind, self.device_id)
            binding.bind_ortvalue_input(self.input_name, value)
            h2d = x.nbytes if self.on_gpu else 0
        else:  # a torch tensor already on the device: bind its memory, no copy
            x = x.contiguous()
            binding.bind_input(self.input_name, kind, self.device_id, _np_dtype(x), tuple(x.shape),
                               x.data_ptr())
            h2d = 0
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.copy_outputs_to_cpu()
        TRANSFERS.add(h2d=h2d, d2h=sum(o.nbytes for o in outs) if self.on_gpu else 0)
        return outs


class TorchBackend(Backend):
    """The ONNX graph converted to a torch module (onnx2torch), on a CUDA device or the CPU.

    On the GPU, fp16 runs the module in half precision with channels-last tensors (what cuDNN's
    tensor-core convolutions want); a graph that cannot run in half precision falls back to
    autocast (convolutions in fp16, the rest in fp32). Outputs come back as float32.

    With ``static`` each input shape (bucket x canvas) gets a module of its own, converted from
    the graph frozen to that shape (:mod:`stream.detect.static_graph`): no shape is read on the
    host. :meth:`run_decoded` also decodes on the device and, with ``graphs`` on a GPU, replays
    forward and decoding as one CUDA graph per shape (:mod:`stream.detect.graph_replay`).
    """

    def __init__(self, model: onnx.ModelProto, device: str = "cuda:0", fp16: bool = True,
                 static: bool = False, graphs: bool = False, cache_dir: Path | None = None,
                 key: str | None = None) -> None:
        try:
            import torch
            from onnx2torch import convert
        except ImportError as e:
            raise BackendError(f"the torch backend needs torch and onnx2torch ({e}); install them "
                               "(pip install onnx2torch) or set detection.backend: onnxruntime") from None
        input_name, output_names = _io_names(model)
        super().__init__(input_name, output_names)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"torch sees no CUDA device for {device}; set detection.backend: "
                               "onnxruntime (CPU) or run on a GPU machine")
        self.torch = torch
        self.device = device
        self.name = "torch-cuda" if device.startswith("cuda") else "torch-cpu"
        self.fp16 = fp16 and self.on_gpu
        self.mode = "fp32"
        self.static, self.graphs = static, graphs
        self._model, self._cache_dir, self._key = model, cache_dir or DEFAULT_CACHE.parent, key
        self._static: dict[tuple[int, ...], tuple[Any, Any]] = {}
        """per input shape: the (float, half) modules converted from the graph frozen to it"""
        self._replays: dict[tuple[Any, ...], Any] = {}
        self._capped = False
        if self.on_gpu:
            torch.backends.cudnn.benchmark = True  # fixed bucket shapes: pick the fastest kernels once
        # the one module for every shape: what runs when not static, and a static shape's batches
        # while its own module is still being built
        self._dynamic = self._place(convert(for_onnx2torch(model)))
        self._building: set[tuple[int, ...]] = set()
        self._build_lock = threading.Condition()
        self._queued: list[tuple[int, ...]] = []
        self._builder: threading.Thread | None = None
        if self.fp16:
            self.mode = "half"

    def _place(self, module: Any) -> tuple[Any, Any]:
        module = module.eval().to(self.device)
        if self.on_gpu:
            module = module.to(memory_format=self.torch.channels_last)
        return module, (copy.deepcopy(module).half() if self.fp16 else None)

    def is_static(self, shape: tuple[int, ...]) -> bool:
        """Whether inputs of ``shape`` get a module of their own (at most :data:`MAX_STATIC_SHAPES`)."""
        if not self.static:
            return False
        with self._build_lock:
            if shape in self._static or shape in self._building:
                return True
            if len(self._static) + len(self._building) < MAX_STATIC_SHAPES:
                return True
        if not self._capped:
            self._capped = True
            log.warning("%s: more than %d input shapes; further shapes run on the dynamic graph "
                        "(host syncs, no CUDA graph)", self.name, MAX_STATIC_SHAPES)
        return False

    def modules_for(self, shape: tuple[int, ...]) -> tuple[Any, Any]:
        """The (float, half) modules that run inputs of ``shape`` now: its static ones once built,
        else the dynamic module. A static module is built on a thread of its own (converting a
        graph takes a second or more, which a batch must not wait for: a detector that stalls that
        long is taken as hung); the batches of a new shape run on the dynamic module meanwhile."""
        ready = self._static.get(shape)
        if ready is not None:
            return ready
        if self.is_static(shape):
            self._build_later(shape)
        return self._dynamic

    def _build_later(self, shape: tuple[int, ...]) -> None:
        with self._build_lock:
            if shape in self._static or shape in self._building:
                return
            self._building.add(shape)
            self._queued.append(shape)
            if self._builder is None:  # one builder at a time; it ends when nothing is queued
                self._builder = threading.Thread(target=self._drain, name="static-graphs", daemon=True)
                self._builder.start()

    def _drain(self) -> None:
        while True:
            with self._build_lock:
                if not self._queued:
                    self._builder = None
                    return
                shape = self._queued.pop(0)
            self._build(shape)

    def _build(self, shape: tuple[int, ...]) -> None:
        from stream.detect.static_graph import frozen_cached, to_torch

        try:
            frozen = frozen_cached(self._model, shape, self._cache_dir, self._key)  # type: ignore[arg-type]
            modules = self._place(to_torch(for_onnx2torch(frozen)))
        except Exception as e:  # the dynamic module keeps serving this shape
            log.warning("%s: no static graph for input %s (%s: %s); it runs on the dynamic graph",
                        self.name, shape, type(e).__name__, e)
            modules = self._dynamic
        with self._build_lock:
            self._static[shape] = modules
            self._building.discard(shape)
            self._build_lock.notify_all()

    def wait_static(self, timeout: float = 300.0) -> bool:
        """Wait until every static module asked for is built (warm-up); False on timeout."""
        with self._build_lock:
            return self._build_lock.wait_for(lambda: not self._building, timeout)

    def static_ready(self, shape: tuple[int, ...]) -> bool:
        """Whether ``shape`` runs on a static module of its own now."""
        ready = self._static.get(shape)
        return ready is not None and ready is not self._dynamic

    def _forward(self, t: Any) -> Any:
        torch = self.torch
        float_module, half_module = self.modules_for(tuple(t.shape))
        if self.mode == "half" and half_module is not None:
            try:
                return half_module(t.half())
            except RuntimeError as e:  # an op of this graph has no half kernel or mixes dtypes
                log.warning("%s: half precision failed (%s); using autocast", self.name, e)
                self.mode = "autocast"
        if self.mode == "autocast":
            with torch.autocast(device_type="cuda", dtype=torch.float16):
                return float_module(t)
        return float_module(t)

    def _input(self, x: Any) -> Any:
        torch = self.torch
        if isinstance(x, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(x))
            if self.on_gpu:
                TRANSFERS.add(h2d=t.numel() * t.element_size())
                t = t.pin_memory().to(self.device, non_blocking=True)
        else:
            t = x.to(self.device)
        t = t.float()
        if self.on_gpu:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def run_device(self, x: Any) -> list[Any]:
        """The graph's outputs as float32 tensors on the device, in ``output_names`` order."""
        outs = self._forward(self._input(x))
        return [o.float() for o in (list(outs) if isinstance(outs, (tuple, list)) else [outs])]

    def run(self, x: Any) -> list[np.ndarray]:
        with self.torch.inference_mode():
            host = [o.cpu().numpy() for o in self.run_device(x)]
        if self.on_gpu:
            TRANSFERS.add(d2h=sum(o.nbytes for o in host))
        return host

    def run_decoded(self, x: Any, decode: Any, key: Any = None) -> tuple[np.ndarray, list[Any]]:
        """``decode(outputs)`` run on the device after the forward; returns its (small) result on
        the host and the raw outputs, still on the device, for frames the host must decode.

        With ``graphs`` on a GPU, forward and ``decode`` are one CUDA graph per input shape and
        ``key`` (what else ``decode`` depends on, e.g. the canvas)."""
        from stream.detect.graph_replay import Replay

        with self.torch.inference_mode():
            t = self._input(x)
            shape = tuple(t.shape)
            slot = (shape, key)
            replay = self._replays.get(slot)
            # a shape whose static module was still being built ran eagerly on the dynamic one: once
            # it is ready, the shape gets a replay that can be captured
            if replay is None or (not replay.static and self.static_ready(shape)):
                def step(inp: Any) -> tuple[Any, list[Any]]:
                    outs = self.run_device(inp)
                    return decode(outs), outs
                static = self.static_ready(shape)
                replay = Replay(step, self.device, capture=self.graphs and static)
                replay.static = static
                self._replays[slot] = replay
            packed, raw = replay(t)
            host = packed.cpu().numpy()
        if self.on_gpu:
            TRANSFERS.add(d2h=host.nbytes)
        return host, raw

    def replays(self) -> list[Any]:
        """Every shape's :class:`~stream.detect.graph_replay.Replay` (captured or eager)."""
        return list(self._replays.values())


MAX_STATIC_SHAPES = 32
"""static modules (and CUDA graphs) per backend: the buckets times the canvases of the streams'
frame sizes fit; the crop pass's varied canvases could otherwise make a new module (a second of
conversion, a stall) for every new batch shape"""

TORCH_OPSET = 17
"""newest opset onnx2torch converts"""
SAME_SINCE_13 = {"Add", "Concat", "Conv", "Div", "MaxPool", "Mul", "Reshape", "Resize", "Sigmoid", "Slice",
                 "Softmax", "Sub", "Transpose", "Relu", "BatchNormalization", "ConvTranspose", "Exp", "Sqrt",
                 "Clip", "Flatten", "Gather", "Shape", "Unsqueeze", "Cast", "Constant"}


def for_onnx2torch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph at an opset onnx2torch knows (17).

    onnx's version converter has no downgrade for some ops (Split 18 -> 17). Where every op of
    the graph means the same at 17 as at its own opset (the ops above; Split with its sizes given
    as an input), the opset is relabelled. Anything else is refused rather than converted wrongly.
    """
    version = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if version <= TORCH_OPSET:
        return model
    ops = {n.op_type for n in model.graph.node}
    split_as_input = all(len(n.input) == 2 for n in model.graph.node if n.op_type == "Split")
    if not ops <= SAME_SINCE_13 | {"Split"} or not split_as_input:
        raise BackendError(f"the torch backend cannot run this opset-{version} graph (ops "
                           f"{sorted(ops - SAME_SINCE_13)}); use detection.backend: onnxruntime")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for o in out.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = TORCH_OPSET
    return out


def _to_host(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.float().cpu().numpy()  # a device tensor given to a CPU session


def _np_dtype(t: Any) -> type:
    return np.float16 if str(t.dtype) == "torch.float16" else np.float32


def nvidia_driver_present() -> bool:
    """Whether this machine shows an NVIDIA driver or device (Linux, containers, WSL)."""
    return (Path("/proc/driver/nvidia/version").exists() or Path("/dev/dxg").exists()
            or any(Path("/dev").glob("nvidia[0-9]*")))


@functools.lru_cache(maxsize=1)
def torch_cuda_available() -> bool:
    """True where torch, onnx2torch and a CUDA device are all present (GPU images without ORT-GPU).

    Asked once per process, and without a driver it does not import torch: importing torch and
    onnx2torch took 3 s of every CPU start where torch was installed (the file benchmark's
    start-up)."""
    if not nvidia_driver_present():
        return False
    try:
        import onnx2torch  # noqa: F401
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def ort_gpu_available() -> bool:
    return bool(set(ort.get_available_providers()) & set(GPU_PROVIDERS))


def choose_backend(backend: BackendName, providers: Sequence[str]) -> str:
    """Which backend ``auto`` means on this machine, given the providers asked for.

    onnxruntime when it has a GPU provider that was asked for, or no GPU was asked for; torch
    when a GPU was asked for and only torch can reach it; else onnxruntime on the CPU (logged).
    """
    if backend != "auto":
        return backend
    wants_gpu = any(p in ("cuda", "tensorrt") for p in providers)
    if not wants_gpu or ort_gpu_available():
        return "onnxruntime"
    if torch_cuda_available():
        return "torch"
    return "onnxruntime"


def runs_on_gpu(backend: BackendName, providers: Sequence[str]) -> bool:
    """Whether :func:`make_backend` will put a model on a GPU, without building it."""
    wants_gpu = any(p in ("cuda", "tensorrt") for p in providers)
    which = choose_backend(backend, providers)
    if which == "torch":
        return wants_gpu and torch_cuda_available()
    return wants_gpu and ort_gpu_available()


def make_backend(model: onnx.ModelProto, backend: BackendName = "auto",
                 providers: Sequence[str] = DEFAULT_PROVIDERS, threads: int = 0, device_id: int = 0,
                 fp16: bool = True, cache_dir: Path | None = None,
                 profile: Profile | None = None, static: bool = False, graphs: bool = False,
                 key: str | None = None) -> Backend:
    """The configured backend for ``model``; ``auto`` picks as :func:`choose_backend` says.
    ``static``, ``graphs`` and ``key`` (the weights' digest, naming cached frozen graphs) apply
    to the torch backend only."""
    which = choose_backend(backend, providers)
    if which == "torch":
        gpu = any(p in ("cuda", "tensorrt") for p in providers)
        return TorchBackend(model, f"cuda:{device_id}" if gpu else "cpu", fp16=fp16, static=static,
                            graphs=graphs, cache_dir=cache_dir, key=key)
    if which != "onnxruntime":
        raise BackendError(f"unknown inference backend {backend!r}; use auto, onnxruntime or torch")
    return OrtBackend(model, providers, threads, device_id, fp16, cache_dir, profile)
