"""Frame stamp: stream id, sequence number and send time as a strip of large black/white blocks.

Why blocks: they survive H.264 at any sane bitrate (each block is at least 8x8 luma pixels, far
above what quantisation smears), they need no library to read back, and they look nothing like a
face or a plate, so no detector masks them. The strip sits on the top rows of the frame; the
scene keeps every face and plate (including its mask enlargement) clear of it. Only a mask that
drifts far from its object (a coasted track under overload) can reach the strip; the frame then
reads as unreadable, which reports count, never as clean. A blanked frame carries no stamp (its
strip is black): readers count such frames as blanked, never as leaks.

Layout: ROWS x COLS blocks across the full width; 96 bits, most significant first:
magic (4) | stream id (8) | sequence (24, wraps) | send time in ms since the epoch (44) | CRC-16 (16).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass

import numpy as np

COLS = 32
ROWS = 3
BITS = COLS * ROWS
MAGIC = 0b1010
_FIELDS = ((4, "magic"), (8, "stream"), (24, "seq"), (44, "ms"))
_PAYLOAD_BITS = sum(n for n, _ in _FIELDS)  # 80
SEQ_MOD = 1 << 24
MS_MOD = 1 << 44


@dataclass(frozen=True)
class Stamp:
    """What a frame says about itself: which stream, which frame, when it was sent (ms, epoch)."""

    stream: int
    seq: int
    sent_ms: int


def geometry(width: int) -> tuple[int, int]:
    """Block width and height in pixels for a frame `width` wide (height clamped to 8..16)."""
    bw = width // COLS
    if bw < 8:
        raise ValueError(f"frames narrower than {8 * COLS} px cannot carry a stamp (got {width})")
    return bw, max(8, min(16, bw))


def strip_height(width: int) -> int:
    """Rows at the top of the frame the stamp covers."""
    return ROWS * geometry(width)[1]


def _crc(payload: int) -> int:
    # init 0xFFFF: an all-black strip (payload 0, CRC 0) is not a valid stamp
    return binascii.crc_hqx(payload.to_bytes(_PAYLOAD_BITS // 8, "big"), 0xFFFF)


def encode_bits(stamp: Stamp) -> np.ndarray:
    """The stamp as BITS booleans, most significant first."""
    if not 0 <= stamp.stream < 256:
        raise ValueError(f"stream id must be 0..255, got {stamp.stream}")
    value = 0
    for n, name in _FIELDS:
        v = MAGIC if name == "magic" else {"stream": stamp.stream, "seq": stamp.seq % SEQ_MOD,
                                            "ms": stamp.sent_ms % MS_MOD}[name]
        value = (value << n) | v
    value = (value << 16) | _crc(value)
    return np.array([(value >> (BITS - 1 - i)) & 1 for i in range(BITS)], dtype=bool)


def draw(image: np.ndarray, stamp: Stamp) -> None:
    """Paint the stamp onto the top rows of a BGR (or grey) frame, in place."""
    bw, bh = geometry(image.shape[1])
    bits = encode_bits(stamp).reshape(ROWS, COLS)
    cells = np.where(bits, 255, 0).astype(np.uint8)
    block = np.repeat(np.repeat(cells, bh, axis=0), bw, axis=1)
    h, w = block.shape
    image[:h, :w] = block[..., None] if image.ndim == 3 else block
    image[:h, w:] = 0


def read(image: np.ndarray) -> Stamp | None:
    """Decode the stamp of a received frame (BGR or grey); None when absent or damaged."""
    bw, bh = geometry(image.shape[1])
    h, w = ROWS * bh, COLS * bw
    strip = image[:h, :w]
    if strip.ndim == 3:  # luma from BGR, enough for black/white blocks
        strip = strip.astype(np.float32) @ np.array([0.114, 0.587, 0.299], np.float32)
    # the centre half of each block: edges are where the codec blurs
    cells = strip.reshape(ROWS, bh, COLS, bw)[:, bh // 4: bh - bh // 4, :, bw // 4: bw - bw // 4]
    means = cells.mean(axis=(1, 3)).ravel()
    value = 0
    for bit in means > 127.5:
        value = (value << 1) | int(bit)
    payload, crc = value >> 16, value & 0xFFFF
    if _crc(payload) != crc:
        return None
    ms = payload & (MS_MOD - 1)
    seq = (payload >> 44) & (SEQ_MOD - 1)
    stream = (payload >> 68) & 0xFF
    if payload >> 76 != MAGIC:
        return None
    return Stamp(stream, seq, ms)

