"""Leak check: is a ground-truth face or plate visible unobscured in a received frame?

Why this measure: a redacted region keeps none of the fine detail that identifies a face or a
plate, whatever the style (blur averages it away, pixelation replaces it with blocks, solid
paints over it). So the received region is compared with what was sent at the scale of facial
features and characters: both are area-reduced to 16 px height (a 1-px smear of a large face does
not count, and H.264 noise averages out), high-passed with a 4-neighbour Laplacian, and
correlated. A clean pass through two H.264 encodes keeps the correlation high; a blurred,
pixelated or blanked region drops it to around zero. An object is *visible* (a leak) when the
correlation is at least `CORR` and the received region keeps at least `ENERGY` of the sent
high-pass energy. The thresholds follow the project's development-set scorer and are validated by
the harness's own runs: clean (no redaction) runs read as visible on every object, redacted runs
as obscured (see tests/test_loadtest_run.py and docs/load-testing.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

NORM_H = 16
CORR = 0.5
ENERGY = 0.3
BLANK_MEAN = 24.0
BLANK_STD = 6.0


def _laplacian(g: np.ndarray) -> np.ndarray:
    p = np.pad(g, 1, mode="edge")
    return p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * p[1:-1, 1:-1]


def _detail(grey: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    small = cv2.resize(grey.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    lap = _laplacian(small)[1:-1, 1:-1]  # the border sees the padding, not the object
    return (lap - lap.mean()).ravel()


@dataclass(frozen=True)
class Verdict:
    """How much of an object's sent detail the received frame still shows."""

    corr: float
    energy: float  # received high-pass energy / sent

    @property
    def visible(self) -> bool:
        return self.corr >= CORR and self.energy >= ENERGY


class Reference:
    """The sent pixels of one object, reduced once to the scale the check works at."""

    def __init__(self, grey: np.ndarray) -> None:
        h, w = grey.shape
        s = min(1.0, NORM_H / h)
        self.size = (max(4, round(w * s)), max(4, round(h * s)))
        self.detail = _detail(grey, self.size)
        self.energy = float((self.detail ** 2).sum()) + 1e-9

    def check(self, received: np.ndarray) -> Verdict:
        """Compare the received grey region (the object's box, same size as sent) with the reference."""
        d = _detail(received, self.size)
        e = float((d ** 2).sum())
        corr = float((d * self.detail).sum() / (np.sqrt(e * self.energy) + 1e-9))
        return Verdict(corr, e / self.energy)


def is_blank(grey: np.ndarray) -> bool:
    """A frame the pipeline published black (fail closed): dark and flat, stamp included."""
    small = grey[::8, ::8]
    return float(small.mean()) < BLANK_MEAN and float(small.std()) < BLANK_STD
