"""Resize frames of different sizes into one padded batch, and map boxes back to the source."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Placement:
    """Where a source frame sits in the batch canvas: resized by ``scale`` at offset (dx, dy)."""

    scale: float
    dx: int = 0
    dy: int = 0

    def to_source(self, boxes: np.ndarray) -> np.ndarray:
        out = boxes.astype(np.float32).copy()
        out[:, [0, 2]] = (out[:, [0, 2]] - self.dx) / self.scale
        out[:, [1, 3]] = (out[:, [1, 3]] - self.dy) / self.scale
        return out


def ceil_to(x: float, m: int) -> int:
    return -(-round(x) // m) * m


def target_side(size: int, long_side: int, min_side: int | None = None) -> int:
    """The long side a frame whose long side is ``size`` is resized to (see :func:`letterbox_batch`)."""
    return long_side if min_side is None else min(long_side, max(min_side, size))


def layout(
    shapes: list[tuple[int, int]],
    long_side: int,
    stride: int = 32,
    upscale: bool = True,
    min_side: int | None = None,
    scale: float | None = None,
) -> tuple[list[tuple[float, int, int]], tuple[int, int]]:
    """Scale and resized (w, h) per frame, and the canvas (h, w): shared by host and device paths.
    ``scale`` given: every frame is resized by it (crops read at their whole frame's scale)."""
    sizes = []
    for h, w in shapes:
        s = target_side(max(h, w), long_side, min_side) / max(h, w) if scale is None else scale
        if not upscale:
            s = min(s, 1.0)
        sizes.append((s, max(1, round(w * s)), max(1, round(h * s))))
    cw = ceil_to(max(w for _, w, _ in sizes), stride)
    ch = ceil_to(max(h for _, _, h in sizes), stride)
    return sizes, (ch, cw)


def scaled(image: np.ndarray, scale: float) -> np.ndarray:
    """``image`` resized by ``scale`` as a model reads it (area when shrinking, linear when
    enlarging; sides rounded as :func:`layout` rounds them)."""
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def letterbox_batch(
    images: list[np.ndarray],
    long_side: int,
    stride: int = 32,
    pad: int = 0,
    upscale: bool = True,
    min_side: int | None = None,
    scale: float | None = None,
) -> tuple[np.ndarray, list[Placement]]:
    """Resize each image so its long side is ``long_side`` and pad all into one NHWC uint8 canvas.

    Frames are placed top-left so a box maps back with one scale per frame. The canvas is the
    smallest multiple of ``stride`` holding every resized frame, so a batch of 16:9 frames costs
    640x384, not 640x640. With ``min_side`` the target is the frame's own long side clamped to
    [min_side, long_side]: small detail is never downscaled away below ``long_side`` and small
    frames are not blown up past ``min_side``. With ``scale`` every frame is resized by that factor.
    """
    sizes, (ch, cw) = layout([im.shape[:2] for im in images], long_side, stride, upscale, min_side, scale)
    batch = np.full((len(images), ch, cw, 3), pad, dtype=np.uint8)
    places = []
    for i, (im, (s, w, h)) in enumerate(zip(images, sizes, strict=True)):
        batch[i, :h, :w] = scaled(im, s)
        places.append(Placement(scale=s))
    return batch, places
