"""GPU utilisation and memory from NVML, sampled into the pipeline's metrics.

nvidia-ml-py (``pynvml``) comes with ``stream-redact[gpu]``. Without it, or without a GPU, the
monitor does not start and the GPU series stay absent: a CPU deployment exports no zeros that
would read as "idle GPU".
"""

from __future__ import annotations

import logging
import threading
from types import ModuleType

from stream.core.metrics import Metrics

log = logging.getLogger(__name__)


def load_nvml() -> ModuleType | None:
    """The initialised pynvml module, or None where there is no NVML (no package, driver or GPU)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        log.info("no GPU metrics: NVML unavailable (%s)", e)
        return None
    return pynvml


class GpuMonitor:
    """A thread sampling every GPU's utilisation and memory each ``interval_s`` seconds."""

    def __init__(self, metrics: Metrics, nvml: ModuleType, interval_s: float = 1.0) -> None:
        self.metrics, self.nvml, self.interval_s = metrics, nvml, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)

    def start(self) -> GpuMonitor:
        self.sample()  # the first values are there before the first scrape
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval_s + 1)

    def sample(self) -> None:
        nv = self.nvml
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                util = nv.nvmlDeviceGetUtilizationRates(h)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                dev = str(i)
                self.metrics.gpu_utilization.labels(dev).set(util.gpu / 100)
                self.metrics.gpu_memory_used.labels(dev).set(mem.used)
                self.metrics.gpu_memory_total.labels(dev).set(mem.total)
        except Exception as e:  # a lost GPU must not stop the pipeline; detection fails closed anyway
            log.warning("GPU metrics: NVML sample failed (%s)", e)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()


def start_gpu_monitor(metrics: Metrics, interval_s: float = 1.0) -> GpuMonitor | None:
    nvml = load_nvml()
    return GpuMonitor(metrics, nvml, interval_s).start() if nvml is not None else None
