"""Graphs fixed to one input shape, with every shape computation folded away, for the torch path.

onnx2torch turns each ONNX op into a module that reads its shape inputs (Reshape targets, Resize
scales, Split sizes, Slice bounds) as tensors on every call: on a GPU each read is a device
synchronisation, on the order of a hundred per plate-model forward, and a captured CUDA graph
cannot contain one at all. A detector runs on a few fixed canvas and batch sizes (the buckets),
so per shape the graph can be made static before conversion:

1. :func:`freeze` fixes the input's dimensions and lets ONNX Runtime's basic optimisations (plain
   ONNX ops only: constant folding, which folds ``Shape`` once the shape is known, and dead-node
   removal) compute every shape expression once. :func:`shape_ops` lists what is left; the
   detectors' graphs keep none.
2. :func:`to_torch` converts the frozen graph and keeps the constant shape inputs that remain on
   the host (Python-side tensors that ``.to(device)`` does not move), so reading them is never a
   device synchronisation, and fuses ``x * sigmoid(x)`` into one SiLU kernel (57 in YOLOv8n).

Frozen graphs are cached on disk beside the TensorRT engines, keyed by the model's digest and the
shape, so a restart does not fold them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)

SHAPE_OPS = frozenset({"Shape", "Size", "Range", "ConstantOfShape", "NonZero", "EyeLike"})
"""ops whose output depends on a tensor's shape or values at run time: none may stay"""
SHAPE_INPUTS = {"Reshape": (1,), "Resize": (1, 2, 3), "Split": (1,), "Slice": (1, 2, 3, 4),
                "Expand": (1,), "Tile": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "Pad": (1, 2, 3),
                "TopK": (1,), "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,)}
"""per op, the inputs that are shapes, sizes or indices: each must be a constant once frozen"""


def fix_shape(model: onnx.ModelProto, shape: tuple[int, int, int, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose first input is exactly ``shape`` (N, C, H, W)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dims = out.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise ValueError(f"input has {len(dims)} dimensions, shape {shape} has {len(shape)}")
    for d, v in zip(dims, shape, strict=True):
        d.ClearField("dim_param")
        d.dim_value = int(v)
    del out.graph.value_info[:]  # shapes inferred for another input size would be wrong
    return out


def freeze(model: onnx.ModelProto, shape: tuple[int, int, int, int]) -> onnx.ModelProto:
    """``model`` for exactly ``shape``, its shape computations folded into constants.

    ONNX Runtime's basic level rewrites only with standard ONNX ops, so the result stays a plain
    ONNX graph (the opset imports it adds for its own domains are dropped again).
    """
    fixed = fix_shape(model, shape)
    with tempfile.TemporaryDirectory(prefix="stream-redact-freeze-") as tmp:
        path = Path(tmp) / "frozen.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(path)
        opts.log_severity_level = 3
        ort.InferenceSession(fixed.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
        frozen = onnx.load(str(path))
    used = {n.domain for n in frozen.graph.node}
    keep = [o for o in frozen.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del frozen.opset_import[:]
    frozen.opset_import.extend(keep)
    return frozen


def shape_ops(model: onnx.ModelProto) -> list[str]:
    """What would still compute or read a shape at run time: shape ops, and shape inputs that are
    not constants (``"Reshape:1 <name>"``). Empty for a fully static graph."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    left = [f"{n.op_type} {n.name}" for n in model.graph.node if n.op_type in SHAPE_OPS]
    for n in model.graph.node:
        for i in SHAPE_INPUTS.get(n.op_type, ()):
            if i < len(n.input) and n.input[i] and n.input[i] not in consts:
                left.append(f"{n.op_type}:{i} {n.name}")
    return left


def digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()[:16]


def frozen_cached(model: onnx.ModelProto, shape: tuple[int, int, int, int], cache_dir: Path | None,
                  key: str | None = None) -> onnx.ModelProto:
    """:func:`freeze`, kept in ``cache_dir/static`` (written atomically) when a folder is given.

    ``key`` names the model (its weights) for a reader of the folder; the file is told apart by
    the digest of the graph itself, because one set of weights is run as several graphs (the
    person model's output cut to 5 rows, or to 9 with vehicles): keyed by the weights alone, a
    graph frozen for one was loaded for the other. A cache file that cannot be read is rebuilt;
    one that cannot be written is only logged.
    """
    if cache_dir is None:
        return freeze(model, shape)
    folder = Path(cache_dir) / "static"
    name = f"{key}-{digest(model)}" if key else digest(model)
    path = folder / f"{name}-{'x'.join(map(str, shape))}.onnx"
    if path.exists():
        try:
            return onnx.load(str(path))
        except Exception as e:  # a torn or foreign file: fold again
            log.warning("static graph cache %s unreadable (%s); folding again", path, e)
    frozen = freeze(model, shape)
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(frozen.SerializeToString())
        os.replace(tmp, path)
    except OSError as e:
        log.warning("static graph not cached in %s (%s); it is folded again on the next start", folder, e)
    return frozen


# -- torch -------------------------------------------------------------------------------------

HOST_ARG_MODULES = ("OnnxResize", "OnnxExpand", "OnnxTile", "OnnxUnsqueezeDynamicAxes",
                    "OnnxSqueezeDynamicAxes", "OnnxPadDynamic", "OnnxTopK")
"""onnx2torch modules that read constant inputs on the host as they are: those stay there"""


def _static_modules(torch: Any) -> dict[str, Any]:
    """Static stand-ins for the onnx2torch ops whose constant inputs are shapes: Python ints,
    no tensor read at all (onnx2torch's own versions compare and iterate those tensors)."""

    class HostArgs(torch.nn.Module):
        """An onnx2torch op whose constant inputs live on the host (plain attributes, not
        buffers: ``.to(device)`` leaves them), so its ``.tolist()`` never waits for the GPU."""

        def __init__(self, inner: Any, args: list[Any]) -> None:
            super().__init__()
            self.inner = inner
            self.host_args = args  # CPU tensors, or None where a tensor input passes through

        def forward(self, *tensors: Any) -> Any:
            it = iter(tensors)
            return self.inner(*[next(it) if a is None else a for a in self.host_args])

    class StaticReshape(torch.nn.Module):
        def __init__(self, shape: list[int]) -> None:
            super().__init__()
            self.shape = shape

        def forward(self, x: Any) -> Any:
            return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(self.shape)])

    class StaticSplit(torch.nn.Module):
        def __init__(self, sizes: list[int], axis: int) -> None:
            super().__init__()
            self.sizes, self.axis = sizes, axis

        def forward(self, x: Any) -> Any:
            return torch.split(x, self.sizes, dim=self.axis)

    class StaticSlice(torch.nn.Module):
        def __init__(self, index: tuple) -> None:
            super().__init__()
            self.index = index

        def forward(self, x: Any) -> Any:
            return x[self.index]

    class StaticResize(torch.nn.Module):
        def __init__(self, mode: str, align_corners: bool | None, scales: list[float] | None,
                     sizes: list[int] | None) -> None:
            super().__init__()
            self.mode, self.align_corners, self.scales, self.sizes = mode, align_corners, scales, sizes

        def forward(self, x: Any) -> Any:
            return torch.nn.functional.interpolate(x, size=self.sizes, scale_factor=self.scales,
                                                   mode=self.mode, align_corners=self.align_corners)

    return {"HostArgs": HostArgs, "StaticReshape": StaticReshape, "StaticSplit": StaticSplit,
            "StaticSlice": StaticSlice, "StaticResize": StaticResize}


RESIZE_MODES = {"nearest": "nearest", "linear": "bilinear", "cubic": "bicubic"}
"""ONNX Resize modes on NCHW input and the torch interpolate mode that matches"""


def _static_resize(mods: dict[str, Any], mod: Any, roi: Any, scales: Any, sizes: Any) -> Any:
    """A constant Resize of a 4-D input as one ``interpolate`` call, or None (left as it is)."""
    def values(c: Any) -> list | None:
        return None if c is None or c.numel() == 0 else c.reshape(-1).tolist()

    r, sc, sz = values(roi), values(scales), values(sizes)
    mode = RESIZE_MODES.get(getattr(mod, "onnx_mode", ""))
    if mode is None or (r is not None and not getattr(mod, "ignore_roi", False)):
        return None
    if (sc is None) == (sz is None) or (sc is not None and (len(sc) != 4 or sc[:2] != [1.0, 1.0])):
        return None
    if sz is not None and len(sz) != 4:
        return None
    return mods["StaticResize"](mode, mod.align_corners, None if sc is None else [float(v) for v in sc[2:]],
                                None if sz is None else [int(v) for v in sz[2:]])


def _slice_index(starts: list[int], ends: list[int], axes: list[int] | None, steps: list[int] | None,
                 rank: int | None) -> tuple | None:
    """The Python index of a constant ONNX Slice, or None where it needs a flip (negative step)."""
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if any(s <= 0 for s in steps) or (any(a < 0 for a in axes) and rank is None):
        return None
    if rank is not None:
        axes = [a % rank for a in axes]
    index: list[slice] = [slice(None)] * (max(axes) + 1)
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        index[a] = slice(s, e, st)
    return tuple(index)


def to_torch(model: onnx.ModelProto) -> Any:
    """The frozen ``model`` as a torch ``GraphModule``: constant shape inputs become Python values
    or stay on the host, and ``x * sigmoid(x)`` is fused into SiLU."""
    import torch
    from onnx2torch import convert

    gm = convert(model)
    mods = _static_modules(torch)

    def const(a: Any) -> Any:
        if isinstance(a, torch.fx.Node) and a.op == "get_attr":
            return _attr(gm, a.target).detach().cpu().clone()
        return None

    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args:
            continue
        mod = gm.get_submodule(node.target)
        kind = type(mod).__name__
        data = node.args[0]
        new = None
        if kind == "OnnxResize":
            names = ("input", "roi", "scales", "sizes")
            named = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
            given = {k: v for k, v in named.items() if k != "input" and v is not None}
            got = {k: const(v) for k, v in given.items()}
            if given and all(v is not None for v in got.values()):
                new = _static_resize(mods, mod, got.get("roi"), got.get("scales"), got.get("sizes"))
                data = named["input"]
        elif not node.kwargs:
            consts = [None, *(const(a) for a in node.args[1:])]
            ints = [None if c is None or c.is_floating_point() else [int(v) for v in c.reshape(-1).tolist()]
                    for c in consts]
            if kind == "OnnxReshape" and len(ints) == 2 and ints[1] is not None:
                new = mods["StaticReshape"](ints[1])
            elif kind == "OnnxSplit13" and len(ints) == 2 and ints[1] is not None:
                new = mods["StaticSplit"](ints[1], mod.axis)
            elif kind == "OnnxSlice" and len(ints) >= 3 and all(c is not None for c in ints[1:]):
                padded = ints + [None] * (5 - len(ints))
                index = _slice_index(padded[1], padded[2], padded[3], padded[4], None)
                new = mods["StaticSlice"](index) if index is not None else None
            elif kind in HOST_ARG_MODULES and any(c is not None for c in consts):
                gm.add_submodule(node.target, mods["HostArgs"](mod, consts))
                node.args = tuple(a for a, c in zip(node.args, consts, strict=True) if c is None)
                continue
        if new is not None:
            gm.add_submodule(node.target, new)
            node.args, node.kwargs = (data,), {}
    fuse_silu(gm)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _attr(gm: Any, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def fuse_silu(gm: Any) -> int:
    """Replace ``x * sigmoid(x)`` (either order) by ``silu(x)``: one kernel instead of two and one
    intermediate tensor fewer. Returns how many were fused."""
    import torch

    def is_sigmoid(n: Any) -> bool:
        if n.op == "call_module":
            return isinstance(gm.get_submodule(n.target), torch.nn.Sigmoid)
        return n.op == "call_function" and n.target in (torch.sigmoid, torch.nn.functional.sigmoid)

    def is_mul(n: Any) -> bool:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            return type(mod).__name__ == "OnnxBinaryMathOperation" and getattr(mod, "math_op_function",
                                                                                None) is torch.mul
        return n.op == "call_function" and n.target in (torch.mul, __import__("operator").mul)

    fused = 0
    for node in list(gm.graph.nodes):
        if not is_mul(node) or len(node.args) != 2:
            continue
        a, b = node.args
        for x, s in ((a, b), (b, a)):
            if isinstance(s, torch.fx.Node) and is_sigmoid(s) and s.args[0] is x:
                with gm.graph.inserting_before(node):
                    silu = gm.graph.call_function(torch.nn.functional.silu, (x,))
                node.replace_all_uses_with(silu)
                gm.graph.erase_node(node)
                if not s.users:
                    gm.graph.erase_node(s)
                fused += 1
                break
    gm.recompile()
    return fused


@contextlib.contextmanager
def count_host_reads(allowed: Any = ()) -> Iterator[list[str]]:
    """Count reads of tensor values on the host while the block runs (``item``, ``tolist``,
    ``bool``, ``int``, ``float``, ``numpy``), except of the tensors in ``allowed``.

    On a GPU each such read of a device tensor is a synchronisation; on the CPU they cost little,
    so this is how a CPU test shows that a module would run free of them. The list yields one
    entry per read (the method's name).
    """
    import torch

    reads: list[str] = []
    ok = {id(t) for t in allowed}
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(name: str, fn: Any) -> Any:
        def counted(self: Any, *a: Any, **k: Any) -> Any:
            if id(self) not in ok:
                reads.append(name)
            return fn(self, *a, **k)
        return counted

    try:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, wrap(n, fn))
        yield reads
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


def host_tensors(module: Any) -> list[Any]:
    """The constant shape inputs :func:`to_torch` kept on the host (reading them is no sync)."""
    out = []
    for m in module.modules():
        for a in getattr(m, "host_args", ()) or ():
            if a is not None:
                out.append(a)
    return out
