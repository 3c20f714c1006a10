"""One CUDA graph per input shape: a model's forward and its device decoding, replayed per batch.

With static graphs (:mod:`stream.detect.static_graph`) and decoding on the device
(:mod:`stream.detect.device_decode`) a batch's work is a fixed sequence of kernels with no host
synchronisation, so it can be captured once and replayed: one launch instead of hundreds, which
is what a launch-bound stage of small models needs. The input is copied into the graph's static
buffer, the graph replays, and the caller reads the static outputs before the next replay of the
same shape (the model's lock serialises them). On the CPU, or where capture fails, the same
function runs eagerly: that is the path CI tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

WARMUP_RUNS = 3
"""eager runs on a side stream before capture: cuDNN picks its kernels and the caching allocator
settles, both of which must not happen inside the capture"""


class Replay:
    """``fn(x)`` for inputs of one shape: captured as a CUDA graph after warm-up on a GPU, eager on
    the CPU. ``fn`` must be free of host synchronisation and allocate the same way every call."""

    def __init__(self, fn: Callable[[Any], Any], device: str, capture: bool = True) -> None:
        self.fn = fn
        self.device = device
        self.capture = capture and device.startswith("cuda")
        self.graph: Any = None
        self.static_in: Any = None
        self.static_out: Any = None
        self.calls = 0
        self.replays = 0
        self.failed: str | None = None
        """why capture was given up (this shape then runs eagerly)"""
        self.static = False
        """whether ``fn`` runs a static module (set by the backend; only those are captured)"""

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, x: Any) -> Any:
        self.calls += 1
        if self.graph is not None:
            self.static_in.copy_(x, non_blocking=True)
            self.graph.replay()
            self.replays += 1
            return self.static_out
        if self.capture and self.failed is None:
            return self._capture(x)
        return self.fn(x)

    def _capture(self, x: Any) -> Any:
        import torch

        try:
            self.static_in = x.clone()
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self.fn(self.static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread-local: the other threads of the stage (the next batch's upload, a static graph
            # being placed on the device) may allocate and copy meanwhile; in the default (global)
            # mode their calls would break this capture and fail themselves
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.static_out = self.fn(self.static_in)
            self.graph = graph
        except Exception as e:  # capture is an optimisation: a graph that cannot be captured runs eagerly
            self.failed = f"{type(e).__name__}: {e}"
            self.graph = self.static_in = self.static_out = None
            log.warning("CUDA graph capture failed for input %s (%s); running this shape eagerly",
                        tuple(x.shape), self.failed)
            return self.fn(x)
        self.graph.replay()
        self.replays += 1
        return self.static_out
