"""Shot cuts: where a video jumps to another view, masks carried from the old view mean nothing.

Edited footage (a montage, a news clip) and live feeds switched by a VMS or a PTZ guard tour jump
from one view to another between two frames. The tracker would coast every box of the old view
on for ``max_coast`` frames and a file's look-back would mask the new view's first boxes into the
old one: masks over nothing in either view, which hide what the viewer needs to see and protect
no one (a coasting box covers the object it followed, and that object is not in the new view).

A cut is read from two consecutive frames' luma, shrunk, and it takes two signs at once:
- their structure differs: the shrunk pictures, normalised to zero mean and unit variance (so that
  exposure, gain or a day/night switch do not count), correlate below the threshold. Within one shot,
  however the camera pans, zooms, shakes or blurs, neighbouring frames correlate far above it
  (development clips: >= 0.87, and 0.54 where a car crossed close to a panning camera; their cuts:
  <= 0.2);
- their brightness distribution differs: the luma histograms (:data:`BINS` bins) are more than
  :data:`HIST_DISTANCE` apart (L1 of shares, 0-2; development clips within a shot: <= 0.22, at
  their cuts: >= 0.48). Shake and a passing vehicle change the structure more than the histogram.
A false cut would end the coasting that covers a face the detector missed in that frame, so both
must agree; a cut between two views that look alike is missed, which costs masks over nothing,
not a leak. Frames further apart than :data:`MAX_GAP` source frames (dropped frames under
overload) are never judged: a moving view changes too much in a second to tell a cut from motion,
and a false cut would end the coasting that carries misses exactly then. A flat picture (black,
one colour) has no structure to compare and never makes a cut.
"""

from __future__ import annotations

import cv2
import numpy as np

from stream.core.yuv import I420, Picture

SIZE = (48, 27)
"""the shrunk luma correlated (width, height): coarse enough that motion of a few pixels a frame
keeps the correlation high, fine enough that two views rarely agree"""

HIST_SIZE = (96, 54)
"""the shrunk luma the histogram is taken of"""

THRESHOLD = 0.35
"""correlation below which two consecutive frames may belong to different shots"""

BINS = 32
HIST_DISTANCE = 0.3
"""L1 distance of the luma histograms (shares) above which they may belong to different shots"""

MAX_GAP = 2
"""source frames between two judged frames, at most"""

FLAT_STD = 2.0
"""luma standard deviation (of 255) below which a picture is flat and is not compared"""


def signature(image: Picture) -> tuple[np.ndarray, np.ndarray] | None:
    """The picture's shrunk luma, normalised, and its luma histogram (shares); None if it is flat."""
    if isinstance(image, I420):
        grey = cv2.resize(image.y, HIST_SIZE, interpolation=cv2.INTER_AREA)
    else:
        grey = cv2.resize(image, HIST_SIZE, interpolation=cv2.INTER_AREA)
        grey = cv2.cvtColor(grey, cv2.COLOR_BGR2GRAY) if grey.ndim == 3 else grey
    hist = np.bincount((grey // (256 // BINS)).ravel(), minlength=BINS) / grey.size
    small = cv2.resize(grey, SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)
    small -= small.mean()
    std = float(small.std())
    return (small / std, hist) if std >= FLAT_STD else None


class ShotCuts:
    """Feed a stream's frames in order; each call says whether the frame starts a new shot."""

    def __init__(self, threshold: float = THRESHOLD) -> None:
        self.threshold = threshold
        self._last: tuple[np.ndarray, np.ndarray] | None = None
        self.correlation: float | None = None
        """of the last frame judged with the one before it"""
        self.distance: float | None = None
        """of their histograms"""

    def __call__(self, image: Picture, elapsed: int = 1) -> bool:
        """Whether ``image`` starts a new shot (``elapsed``: source frames since the previous call)."""
        if self.threshold <= 0:
            return False
        sig = signature(image)
        last, self._last = self._last, sig
        self.correlation = self.distance = None
        if sig is None or last is None or elapsed > MAX_GAP:
            return False
        self.correlation = float((sig[0] * last[0]).mean())
        self.distance = float(np.abs(sig[1] - last[1]).sum())
        return self.correlation < self.threshold and self.distance > HIST_DISTANCE

    def reset(self) -> None:
        """Forget the last frame (a new stream, or a new size): the next frame is not judged."""
        self._last = None
