"""ONNX Runtime sessions: one per model, providers chosen from config with a logged fallback."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)
_warned: set[str] = set()

PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
DEFAULT_PROVIDERS = ("tensorrt", "cuda", "cpu")


def resolve_providers(wanted: Sequence[str] = DEFAULT_PROVIDERS) -> list[str]:
    """Map short names to ORT provider names, keep the available ones, always end with CPU.

    A provider asked for but not built into the installed onnxruntime is skipped with a warning,
    so a GPU config still runs (more slowly) on a CPU-only machine.
    """
    available = set(ort.get_available_providers())
    out: list[str] = []
    for name in wanted:
        full = PROVIDER_ALIASES.get(name.lower())
        if full is None:
            raise ValueError(f"unknown execution provider {name!r}; use one of {', '.join(PROVIDER_ALIASES)}")
        if full in available:
            out.append(full)
        elif full != "CPUExecutionProvider" and name not in _warned:
            _warned.add(name)
            log.warning(
                "execution provider %s is not available in this onnxruntime build (install "
                "stream-redact[gpu] on a GPU machine); falling back to the next one", name)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def make_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    """Declare batch/height/width of the first input dynamic and drop initializers listed as inputs.

    YuNet and CenterFace ship with a fixed input shape (and CenterFace lists its weights as graph
    inputs, which blocks constant folding); both run correctly on any N x 3 x 32k x 32k input.
    """
    init_names = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in init_names]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, name in zip(dims, ("batch", None, "height", "width"), strict=False):
        if name:
            d.ClearField("dim_value")
            d.dim_param = name
    for out in model.graph.output:
        for d in out.type.tensor_type.shape.dim:
            d.ClearField("dim_value")
            d.dim_param = ""
    return model


def session_options(threads: int = 0) -> ort.SessionOptions:
    """Full graph optimisation, one operator at a time, and idle CPU workers that sleep.

    Measured on 2 cores (benchmarks/README.md, ``detector_latency.py``): spinning workers
    cut a lone model's latency by a tenth but took the cores from decoding and encoding, so a
    file redacted a third slower; the parallel executor, the extended (not full) optimisation
    level and dynamic block sizes were no faster. ``threads`` 0 lets ORT use one thread per
    core, best for one process; several processes on one machine do better with cores / processes.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def create_session(
    path: Path | onnx.ModelProto,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    threads: int = 0,
    dynamic: bool = False,
) -> ort.InferenceSession:
    """An inference session for ``path``; ``dynamic`` rewrites fixed input shapes in memory."""
    opts = session_options(threads)
    source: str | bytes
    if isinstance(path, onnx.ModelProto):
        source = path.SerializeToString()
    elif dynamic:
        source = make_dynamic(onnx.load(str(path))).SerializeToString()
    else:
        source = str(path)
    return ort.InferenceSession(source, sess_options=opts, providers=resolve_providers(providers))
