"""ONNX Runtime session settings: the ones measured best on a small CPU (benchmarks/README.md)."""

from __future__ import annotations

import onnxruntime as ort

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
