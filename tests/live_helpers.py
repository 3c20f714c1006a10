"""Helpers for live-pipeline tests: detectors that misbehave on purpose, waiting on conditions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from stream.detect.detections import Detections
from stream.metrics import Metrics, sample


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``cond`` until true; fail with ``what`` after ``timeout`` seconds (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


class NoFaces:
    """A detector that looks at every frame and finds nothing."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, images: list[np.ndarray], seqs: Sequence[int] | None = None) -> list[Detections]:
        self.batches.append(len(images))
        return [Detections(observed=frozenset({"face", "plate"})) for _ in images]


class Raises:
    def __call__(self, images: list[np.ndarray], seqs: Sequence[int] | None = None) -> list[Detections]:
        raise RuntimeError("injected detector failure")


class Hangs:
    """Blocks until released (tests release it at teardown so no thread outlives them)."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.entered = threading.Event()

    def __call__(self, images: list[np.ndarray], seqs: Sequence[int] | None = None) -> list[Detections]:
        self.entered.set()
        self.release.wait()
        return [Detections() for _ in images]


class Slow(NoFaces):
    """Takes ``seconds`` per batch: a detector slower than the cameras feeding it."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def __call__(self, images: list[np.ndarray], seqs: Sequence[int] | None = None) -> list[Detections]:
        threading.Event().wait(self.seconds)  # the work this detector "does"
        return super().__call__(images, seqs)


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return sample(metrics, f"stream_redact_{name}_total", **labels)
