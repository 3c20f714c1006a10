"""I420 pictures: a frame kept in the decoder's own planar YUV 4:2:0 from decode to encode.

Cameras send H.264 in 4:2:0 and every encoder takes 4:2:0 back. Turning each frame into BGR
after decoding and back before encoding costs two full-size colour conversions per frame and
output, yet only the detector needs BGR, and usually at a smaller size than the frame. So live
frames stay :class:`I420`: masks are painted on the planes, encoders take the planes as they are,
and the detector gets a BGR copy shrunk on the planes first (:meth:`I420.to_bgr`).

The rest of the code tells the two kinds of picture apart by type (``isinstance(image, I420)``),
never by an array's shape. Both answer ``shape`` with (height, width) first, so code that only
reads a picture's size works on either; anything that reads pixels must ask which it has.
Values are BT.601 limited range, as OpenCV's ``COLOR_BGR2YUV_I420`` and FFmpeg's ``yuv420p`` have
them; full-range (JPEG) input is mapped to limited range once, when it is decoded.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, TypeAlias

import cv2
import numpy as np

if TYPE_CHECKING:  # PyAV only for a type: the GPU stage's image has no PyAV, and needs none
    import av


class I420:
    """One I420 picture in one contiguous ``uint8`` array of shape (height * 3/2, width).

    The array holds the Y plane (height x width), then U and V (height/2 x width/2 each), as
    FFmpeg's ``yuv420p`` and OpenCV's I420 lay them out. Width and height are even.
    """

    __slots__ = ("data", "height", "width")

    def __init__(self, data: np.ndarray) -> None:
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[0] % 3 or not data.flags.c_contiguous:
            raise ValueError(f"an I420 picture is one contiguous uint8 array of (height*3/2, width) rows, "
                             f"got {data.dtype} {data.shape}")
        self.data = data
        self.height = data.shape[0] * 2 // 3
        self.width = data.shape[1]
        if self.width % 2 or self.height % 2 or not self.width:
            raise ValueError(f"I420 needs even, non-zero sides, got {self.width}x{self.height}")

    # -- geometry -------------------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.width, self.height

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width): what ``image.shape[:2]`` gives for a BGR array of the same picture."""
        return self.height, self.width

    # -- planes (views: writing to them writes the picture) --------------------------------------
    @property
    def y(self) -> np.ndarray:
        return self.data[:self.height]

    def _chroma(self, index: int) -> np.ndarray:
        w, h = self.width, self.height
        n = (w // 2) * (h // 2)
        start = w * h + index * n
        return self.data.reshape(-1)[start:start + n].reshape(h // 2, w // 2)

    @property
    def u(self) -> np.ndarray:
        return self._chroma(0)

    @property
    def v(self) -> np.ndarray:
        return self._chroma(1)

    @property
    def planes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.y, self.u, self.v

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_planes(cls, y: np.ndarray, u: np.ndarray, v: np.ndarray) -> I420:
        h, w = y.shape
        data = np.empty((h * 3 // 2, w), np.uint8)
        out = cls(data)
        out.y[...], out.u[...], out.v[...] = y, u, v
        return out

    @classmethod
    def from_bgr(cls, image: np.ndarray) -> I420:
        """The picture of a BGR image with even sides (OpenCV's BT.601 conversion)."""
        return cls(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2YUV_I420))

    @classmethod
    def filled(cls, width: int, height: int, bgr: tuple[int, int, int]) -> I420:
        """A ``width`` x ``height`` picture of one colour, given in BGR."""
        out = cls(np.empty((height * 3 // 2, width), np.uint8))
        for plane, value in zip(out.planes, yuv_color(bgr), strict=True):
            plane[...] = value
        return out

    @classmethod
    def black(cls, width: int, height: int) -> I420:
        """Black, exactly as OpenCV's conversion of a black BGR image gives it (Y 16, U and V 128):
        a blanked frame looks the same on the wire on either path."""
        return cls.filled(width, height, (0, 0, 0))

    def copy(self) -> I420:
        return I420(self.data.copy())

    # -- conversions ----------------------------------------------------------------------------
    def resized(self, width: int, height: int) -> I420:
        """The picture scaled to even ``width`` x ``height``, plane by plane (area when shrinking)."""
        if (width, height) == self.size:
            return self.copy()
        interp = cv2.INTER_AREA if width * height < self.width * self.height else cv2.INTER_LINEAR
        out = I420(np.empty((height * 3 // 2, width), np.uint8))
        for src, dst in zip(self.planes, out.planes, strict=True):
            cv2.resize(src, dst.shape[::-1], dst=dst, interpolation=interp)  # straight into the buffer
        return out

    def cropped(self, width: int, height: int) -> I420:
        """The top-left ``width`` x ``height`` (even sides, within the picture): nothing scaled."""
        if (width, height) == self.size:
            return self
        if width % 2 or height % 2 or width > self.width or height > self.height:
            raise ValueError(f"cannot crop {self.width}x{self.height} to {width}x{height}")
        return I420.from_planes(self.y[:height, :width], self.u[:height // 2, :width // 2],
                                self.v[:height // 2, :width // 2])

    def region(self, x1: int, y1: int, x2: int, y2: int) -> I420:
        """A copy of the box ``x1, y1, x2, y2`` (even coordinates, within the picture): nothing scaled."""
        if (x1 | y1 | x2 | y2) % 2 or not (0 <= x1 < x2 <= self.width and 0 <= y1 < y2 <= self.height):
            raise ValueError(f"cannot cut ({x1}, {y1}, {x2}, {y2}) from {self.width}x{self.height}")
        return I420.from_planes(self.y[y1:y2, x1:x2], self.u[y1 // 2:y2 // 2, x1 // 2:x2 // 2],
                                self.v[y1 // 2:y2 // 2, x1 // 2:x2 // 2])

    def to_bgr(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """A BGR copy, optionally at ``size`` (width, height; even): the planes are scaled first, so
        a detector that wants 640 px of a 1280 px frame pays for a quarter of the colour conversion."""
        src = self if size is None or tuple(size) == self.size else self.resized(*size)
        return cv2.cvtColor(src.data, cv2.COLOR_YUV2BGR_I420)

    def __repr__(self) -> str:
        return f"I420({self.width}x{self.height})"


Picture: TypeAlias = "np.ndarray | I420"
"""A decoded frame as the live path carries it: a BGR array (H x W x 3 uint8) or an :class:`I420`."""


@functools.lru_cache(maxsize=64)
def yuv_color(bgr: tuple[int, int, int]) -> tuple[int, int, int]:
    """(Y, U, V) of a BGR colour, by the very conversion :meth:`I420.from_bgr` uses."""
    px = np.empty((2, 2, 3), np.uint8)
    px[...] = bgr
    flat = cv2.cvtColor(px, cv2.COLOR_BGR2YUV_I420).reshape(-1)
    return int(flat[0]), int(flat[4]), int(flat[5])


def blank_like(image: Picture) -> Picture:
    """A black picture of the same kind and size (what a frame that failed closed becomes)."""
    if isinstance(image, I420):
        return I420.black(image.width, image.height)
    return np.zeros_like(image)


def resize_picture(image: Picture, size: tuple[int, int]) -> Picture:
    """``image`` scaled to ``size`` (width, height; even for I420), staying the kind it is."""
    if isinstance(image, I420):
        return image.resized(*size)
    interp = cv2.INTER_AREA if size[0] * size[1] < image.shape[0] * image.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def as_bgr(image: Picture) -> np.ndarray:
    """A BGR array of ``image`` (the array itself when it is one already)."""
    return image.to_bgr() if isinstance(image, I420) else image


_YUV420 = frozenset({"yuv420p", "yuvj420p", "nv12"})
_FULL_RANGE = 2
"""``AVCOL_RANGE_JPEG``: samples use 0-255, not 16-235 (luma) / 16-240 (chroma)"""
_LUT_Y = np.round(16 + np.arange(256) * (219 / 255)).astype(np.uint8)
_LUT_C = np.round(128 + (np.arange(256) - 128) * (224 / 255)).clip(0, 255).astype(np.uint8)


def decoded_picture(frame: av.VideoFrame) -> Picture:
    """The picture of a decoded video frame: I420 when the decoder made 4:2:0 with even sides
    (copied out of its planes, no colour conversion), BGR otherwise.

    ``yuvj420p`` and other full-range frames are mapped to limited range (a table look-up per
    sample), which is what the encoders and the BGR conversions here take; ``nv12`` (what NVDEC
    hands back) has its interleaved chroma split into planes.
    """
    fmt = frame.format.name
    if fmt not in _YUV420 or frame.width % 2 or frame.height % 2 or not frame.width or not frame.height:
        return frame.to_ndarray(format="bgr24")
    h, w = frame.height, frame.width
    raw = frame.to_ndarray()
    if fmt == "nv12":
        pic = I420(np.empty((h * 3 // 2, w), np.uint8))
        pic.y[...] = raw[:h]
        uv = raw[h:].reshape(h // 2, w // 2, 2)
        pic.u[...], pic.v[...] = uv[..., 0], uv[..., 1]
    else:
        pic = I420(np.ascontiguousarray(raw))
    if fmt == "yuvj420p" or frame.color_range == _FULL_RANGE:
        pic.data[:h] = cv2.LUT(pic.data[:h], _LUT_Y)
        pic.data[h:] = cv2.LUT(pic.data[h:], _LUT_C)
    return pic
