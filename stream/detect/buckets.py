"""Fixed batch sizes for GPU inference: a few shapes, built once, instead of one per batch size.

TensorRT builds an engine (and CUDA graphs capture a launch sequence) per input shape; a batch of
13 frames would otherwise cost a new build. A batch is therefore split into bucket-sized runs,
and the last run is padded up to the next bucket when it is nearly full (one run of 16 with 3
blank frames beats runs of 8, 4 and 1 on a GPU). Padding frames are never returned.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
PAD_FILL = 0.75
"""pad a remainder up to the next bucket when it fills at least this share of it"""


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Sorted, unique, positive bucket sizes that include 1 (so any batch can be split)."""
    out = tuple(sorted(set(int(b) for b in buckets)))
    if not out or out[0] < 1:
        raise ValueError(f"batch buckets must be positive whole numbers, got {list(buckets)}")
    if out[0] != 1:
        raise ValueError(f"batch buckets must include 1 so any batch can be split, got {list(out)}")
    return out


def plan(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS,
         pad_fill: float = PAD_FILL) -> list[tuple[int, int]]:
    """Split ``n`` frames into runs of ``(frames, bucket)``: each run is padded to its bucket size.

    Greedy from the largest bucket that fits; a remainder that fills at least ``pad_fill`` of the
    next larger bucket is padded into one run instead of being split further.
    """
    bs = check_buckets(buckets)
    runs: list[tuple[int, int]] = []
    left = n
    while left > 0:
        fits = [b for b in bs if b <= left]
        above = [b for b in bs if b > left]
        if above and left >= pad_fill * above[0]:
            runs.append((left, above[0]))
            break
        b = fits[-1]
        runs.append((b, b))
        left -= b
    return runs


def padding(runs: list[tuple[int, int]]) -> int:
    """Blank frames a plan adds."""
    return sum(b - f for f, b in runs)
