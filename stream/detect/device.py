"""Preprocessing on the GPU: each frame goes up once as uint8, is resized and normalised there.

On the host, letterboxing a 1080p frame and converting it to float32 costs a few ms of CPU per
frame per model and uploads 4 bytes per pixel. Here the frame is uploaded once (1 byte per
pixel, or not at all when the decoder left it on the device) and every model's canvas is cut
from that copy, for all frames of a batch together. The geometry is the host path's own
(:func:`stream.detect.letterbox.layout`), so boxes map back identically.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from stream.core.yuv import I420
from stream.detect.backend import TRANSFERS
from stream.detect.letterbox import Placement, layout

# OpenCV's fixed-point BT.601 limited-range coefficients (COLOR_YUV2BGR_I420), scaled by 2**20, so
# that a frame converted here has the very pixels the host conversion gives
_SHIFT = 20
_CY, _CUB, _CUG, _CVG, _CVR = 1220542, 2116026, -409993, -852492, 1673527


PACK_THREADS = max(1, min(4, (os.cpu_count() or 1) // 4))
"""threads that copy a batch's frames into its staging buffer: NumPy lets go of the GIL while it
copies, and one core moved 5-7 GB/s on an H200 box (a batch of 64 1080p BGR frames, 398 MB, took
56-74 ms to pack: the largest single cost of the batch); one thread on small machines, where the
cores run the models"""
PACK_PIECE = 4 << 20
"""bytes one thread copies at a time: large frames are cut into pieces so that the threads share
a batch of few frames evenly"""


class StagingRing:
    """Pinned host buffers, reused in turn, through which a batch's frames go up in one copy.

    Copying each frame from pageable memory is one small transfer per frame, each staged by the
    driver through a bounce buffer; here the frames are packed into one page-locked buffer and sent
    as one transfer. Each buffer is reused only once the copy out of it has finished (a CUDA event),
    so with ``slots`` buffers that many batches can be on their way at once. On the CPU there is
    nothing to pin; the packing is the same, which is how it is tested.
    """

    def __init__(self, device: str, slots: int = 3, pack_threads: int = PACK_THREADS) -> None:
        import torch

        self.torch = torch
        self._pool = (ThreadPoolExecutor(pack_threads, thread_name_prefix="stage-pack")
                      if pack_threads > 1 else None)
        self.device = device
        self.pin = device.startswith("cuda")
        self._buffers: list[Any] = [None] * slots
        self._events: list[Any] = [None] * slots
        self._next = 0
        self._lock = threading.Lock()
        self.uploads = 0
        self.grown = 0
        """buffers (re)allocated because a batch was larger than the slot's buffer"""

    def upload(self, images: list[np.ndarray]) -> list[Any]:
        """The frames as HWC uint8 tensors on the device: views into one uploaded copy."""
        torch = self.torch
        total = sum(im.nbytes for im in images)
        with self._lock:
            slot = self._next
            self._next = (self._next + 1) % len(self._buffers)
            if self._events[slot] is not None:
                self._events[slot].synchronize()  # the copy out of this buffer has finished
            buf = self._buffers[slot]
            if buf is None or buf.numel() < total:
                buf = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=self.pin)
                self._buffers[slot] = buf
                self.grown += 1
            self._pack(buf.numpy(), images, total)
            dev = buf[:total].to(self.device, non_blocking=self.pin, copy=True)
            if self.pin:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
                self._events[slot] = event
            self.uploads += 1
        TRANSFERS.add(h2d=total if self.pin else 0)
        out, at = [], 0
        for im in images:
            out.append(dev[at:at + im.nbytes].view(*im.shape))
            at += im.nbytes
        return out

    def _pack(self, host: np.ndarray, images: list[np.ndarray], total: int) -> None:
        """The frames one after another into ``host``; on several threads when the batch is large."""
        pieces: list[tuple[int, np.ndarray]] = []
        at = 0
        for im in images:
            flat = np.ascontiguousarray(im).reshape(-1)
            for start in range(0, flat.size, PACK_PIECE):
                pieces.append((at + start, flat[start:start + PACK_PIECE]))
            at += flat.size

        def copy(piece: tuple[int, np.ndarray]) -> None:
            start, src = piece
            host[start:start + src.size] = src

        if self._pool is None or len(pieces) < 2:
            for piece in pieces:
                copy(piece)
        else:
            for _ in self._pool.map(copy, pieces):  # re-raises a thread's error here
                pass


I420_GROUP = 16
"""I420 pictures converted to BGR in one step on the device"""


def i420_to_bgr(x: Any, height: int, width: int) -> Any:
    """(N, height*3/2, width) uint8 I420 pictures on the device -> (N, height, width, 3) uint8 BGR.

    The arithmetic is OpenCV's ``COLOR_YUV2BGR_I420`` (BT.601 limited range, each chroma sample
    shared by its 2x2 block, the same fixed-point coefficients and rounding), so the models see the
    pixels the host path would have given them, while the picture crosses the bus at half the
    bytes of BGR and no host core converts it."""
    import torch

    n = x.shape[0]
    flat = x.reshape(n, -1)
    hw, q, h2, w2 = height * width, (height // 2) * (width // 2), height // 2, width // 2
    y = (flat[:, :hw].reshape(n, height, width).to(torch.int32) - 16).clamp_(min=0) * _CY

    def chroma(at: int) -> Any:
        c = flat[:, at:at + q].reshape(n, h2, 1, w2, 1).to(torch.int32) - 128
        return c.expand(n, h2, 2, w2, 2).reshape(n, height, width)

    u, v = chroma(hw), chroma(hw + q)
    half = 1 << (_SHIFT - 1)
    b = (y + (_CUB * u + half)) >> _SHIFT
    g = (y + (_CVG * v + _CUG * u + half)) >> _SHIFT
    r = (y + (_CVR * v + half)) >> _SHIFT
    return torch.stack([b, g, r], -1).clamp_(0, 255).to(torch.uint8)


class DeviceFrames:
    """Frames of one batch on the device (HWC uint8 BGR), uploaded once and shared by every model.

    Every model cuts its letterboxed canvas from this copy; frames resized to the same size for
    two models (same canvas geometry) are resized once and the result shared. I420 pictures (what
    the decoders give) go up as they are and are converted to BGR here, all of one size at once.
    """

    def __init__(self, images: list[Any], device: str, ring: StagingRing | None = None) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.shapes = [tuple(im.shape[:2]) for im in images]
        self.tensors: list[Any] = [None] * len(images)
        self._resized: dict[tuple[int, int, int], Any] = {}
        """(frame index, height, width) -> the frame resized, CHW float 0-255 BGR (shared by subsets)"""
        self._index = list(range(len(images)))
        """each frame's index in the batch this set was cut from (the resize cache's key)"""
        host = [(i, im.data if isinstance(im, I420) else np.ascontiguousarray(im))
                for i, im in enumerate(images) if isinstance(im, (np.ndarray, I420))]
        if ring is not None and host:
            sent = ring.upload([data for _, data in host])
            for (i, _), t in zip(host, sent, strict=True):
                self.tensors[i] = t
        else:
            for i, data in host:
                self.tensors[i] = torch.from_numpy(data).to(device, non_blocking=True)
                TRANSFERS.add(h2d=data.nbytes)
        for i, im in enumerate(images):
            if self.tensors[i] is None:  # already on the device (NVDEC)
                self.tensors[i] = im.to(device)
        sizes: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            if isinstance(im, I420):
                sizes.setdefault(im.shape, []).append(i)
        for (h, w), same in sizes.items():
            # in groups: the conversion's int32 planes take 26 bytes a pixel while they live (5 GB
            # for 64 1080p frames at once, 1.3 GB for 16)
            for at in range(0, len(same), I420_GROUP):
                idx = same[at:at + I420_GROUP]
                bgr = i420_to_bgr(torch.stack([self.tensors[i] for i in idx]), h, w)
                for j, i in enumerate(idx):
                    self.tensors[i] = bgr[j]

    def subset(self, idx: list[int]) -> DeviceFrames:
        """The frames at ``idx`` (no copy): for models that run on every n-th frame only."""
        out = DeviceFrames.__new__(DeviceFrames)
        out.torch, out.device = self.torch, self.device
        out.shapes = [self.shapes[i] for i in idx]
        out.tensors = [self.tensors[i] for i in idx]
        out._resized = self._resized
        out._index = [self._index[i] for i in idx]
        return out

    def __len__(self) -> int:
        return len(self.tensors)

    def letterbox(self, long_side: int, *, stride: int = 32, pad: int = 0, min_side: int | None = None,
                  rgb: bool = False, unit: bool = False,
                  pad_to: int | None = None) -> tuple[Any, list[Placement]]:
        """NCHW float32 model input on the device, frames top-left on a ``pad`` canvas (the
        backend casts to half precision where it runs in it).

        Frames of the same size are resized together in one call. ``pad_to`` appends padding
        frames up to a batch bucket.
        """
        torch = self.torch
        import torch.nn.functional as F

        sizes, (ch, cw) = layout(list(self.shapes), long_side, stride, True, min_side)
        n = max(len(self), pad_to or 0)
        dtype = torch.float32
        scale = 1 / 255 if unit else 1.0
        canvas = torch.full((n, 3, ch, cw), pad * scale, dtype=dtype, device=self.device)
        groups: dict[tuple, list[int]] = {}
        for i, (shape, (_, w, h)) in enumerate(zip(self.shapes, sizes, strict=True)):
            groups.setdefault((shape, w, h), []).append(i)
        for (_, w, h), idx in groups.items():
            todo = [i for i in idx if (self._index[i], h, w) not in self._resized]
            if todo:  # resized once per geometry, whichever model asks first
                x = torch.stack([self.tensors[i] for i in todo]).permute(0, 3, 1, 2).float()
                if x.shape[2:] != (h, w):
                    down = h < x.shape[2]
                    # antialiased bilinear downscaling is close to OpenCV's INTER_AREA of the host path
                    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=down)
                    x = x.round_().clamp_(0, 255)
                for j, i in enumerate(todo):
                    self._resized[(self._index[i], h, w)] = x[j]
            x = torch.stack([self._resized[(self._index[i], h, w)] for i in idx])
            if rgb:
                x = x.flip(1)
            canvas[idx, :, :h, :w] = (x * scale).to(dtype)
        return canvas, [Placement(scale=s) for s, _, _ in sizes]


class SideStream:
    """A CUDA stream of its own for preparing batches (upload, letterbox).

    With two batches in flight one thread prepares the next batch while another runs the current
    one; on separate streams the copy and the resize kernels overlap the inference instead of
    queueing behind it. Leaving the ``with`` block waits (on the preparing thread only) until the
    prepared tensors are complete, so the running thread and ONNX Runtime's own stream can use
    them at once.
    On CPU all of this is a no-op.
    """

    def __init__(self, device: str) -> None:
        self.stream = None
        if device.startswith("cuda"):
            import torch

            self.stream = torch.cuda.Stream(device=device)

    def __enter__(self) -> SideStream:
        if self.stream is not None:
            import torch

            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stream is not None:
            self._ctx.__exit__(*exc)
            self.stream.synchronize()


def claim_on_this_stream(x: Any) -> None:
    """Tell torch's allocator that a tensor made on the side stream is used on this thread's
    stream, so its memory is not handed to the next upload while kernels here still read it."""
    if getattr(x, "is_cuda", False):
        import torch

        x.record_stream(torch.cuda.current_stream(x.device))


def torch_device_ok(device: str) -> bool:
    """True when torch can place tensors on ``device`` (used to enable the device path)."""
    try:
        import torch
    except ImportError:
        return False
    if device.startswith("cuda"):
        return bool(torch.cuda.is_available())
    return device == "cpu"
