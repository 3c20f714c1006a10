"""ONNX Runtime session settings: the ones measured best on a small CPU (benchmarks/README.md)."""

from __future__ import annotations

import subprocess
import sys

import onnxruntime as ort
import pytest

from stream.detect.backend import nvidia_driver_present
from stream.detect.runtime import session_options


def test_cpu_sessions_optimise_fully_run_sequentially_and_do_not_spin() -> None:
    opts = session_options()
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    # spinning workers would take the cores that decode and encode need
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 0, "0: ORT's own choice, one thread per core"


def test_threads_setting_reaches_the_session() -> None:
    assert session_options(1).intra_op_num_threads == 1
    assert session_options(3).intra_op_num_threads == 3


def test_a_cpu_start_does_not_import_torch_without_an_nvidia_driver() -> None:
    """Importing torch and onnx2torch to ask whether CUDA is there took 3 s of every CPU start
    where torch is installed; without a driver the answer is known without them."""
    if nvidia_driver_present():
        pytest.skip("this machine has an NVIDIA driver: asking torch is the point there")
    code = ("import sys\n"
            "from stream.detect.ensemble import FrameDetector\n"
            "from stream.detect.presets import detector_config\n"
            "d = FrameDetector(detector_config('fast'))\n"  # providers cuda, cpu: the default
            "assert d.device == 'cpu', d.device\n"
            "print(sorted(m for m in ('torch', 'onnx2torch') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
