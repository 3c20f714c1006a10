"""CPU lanes: a batch's model runs side by side, one core each, instead of one after the other.

Why: on a CPU, ONNX Runtime spreading one small model over every core buys little. On the 2-core
development machine an int8 YOLO run took 19 ms on two threads against 22 ms on one, for 26 ms
of CPU against 22: the second thread mostly waits. The Python around each run (letterbox
output, decoding, NMS) uses one core anyway. So where a frame needs several models (plates,
persons, faces, text), each of them runs on its own core with one thread, and where a batch holds
several frames for one model, they are split across the cores. A frame that needs every model of
the `fast` preset took 24 ms instead of 43 on that machine, for less CPU (benchmarks/README.md,
"CPU lanes").

GPU models keep one lane: the device already runs a whole batch at once.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

MAX_LANES = 4
"""a frame has at most five model runs (faces, plate, text, person and its crop pass) and the
longest of them sets its time; more lanes than that only split batches further"""


def cores() -> int:
    """CPU cores this process may run on (its affinity, where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def plan_lanes(lanes: int, threads: int, gpu: bool, available: int | None = None) -> tuple[int, int]:
    """(lanes, ONNX Runtime threads per session) for the settings given (0: choose).

    ``gpu`` (or any backend but ONNX Runtime on the CPU): one lane, the threads as given. On a CPU,
    lanes 0 means one per core up to :data:`MAX_LANES`, or cores / ``threads`` where threads are
    set (several processes sharing a machine set threads to cores / processes, and lanes then use
    no more cores than that). Threads 0 with more than one lane means cores / lanes, so that
    lanes x threads fills the cores once.
    """
    if gpu:
        return 1, threads
    n = available or cores()
    if lanes <= 0:
        lanes = min(n, MAX_LANES) if threads <= 0 else max(1, min(MAX_LANES, n // threads))
    if threads <= 0 and lanes > 1:
        threads = max(1, n // lanes)
    return lanes, threads


def split(items: Sequence[int], parts: int) -> list[list[int]]:
    """``items`` in at most ``parts`` contiguous runs of nearly equal length, in order."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, at = [], 0
    for k in range(parts):
        step = size + (k < extra)
        out.append(list(items[at:at + step]))
        at += step
    return [p for p in out if p]


@dataclass
class Lanes:
    """Runs callables side by side on ``count`` threads; ``count`` 1 runs them in the caller."""

    count: int = 1
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    @property
    def parallel(self) -> bool:
        return self.count > 1

    def run(self, tasks: Sequence[Callable[[], T]]) -> list[T]:
        """Every task's result, in the order given. All tasks have finished when this returns,
        also when one raised: its exception is raised then (a model run still going must not
        outlive the batch it belongs to)."""
        if not self.parallel or len(tasks) <= 1:
            return [t() for t in tasks]
        pool = self._executor()
        futures: list[Future[Any]] = [pool.submit(t) for t in tasks]
        wait(futures)
        return [f.result() for f in futures]

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.count, thread_name_prefix="detect-lane")
            weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
