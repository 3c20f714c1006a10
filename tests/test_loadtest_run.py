"""The load-test harness end to end: synthetic RTSP cameras, a real local pipeline, outputs read back.

Three short runs through `stream-redact bench` (its own entry point, so the CLI, the driver and
the report are all exercised): one against a redacting pipeline (faces only, to fit CI's two
cores), whose report must show leak checks on real received frames and no face visible; one
in mode no-redact (the checkout's benchmarks/baseline_worker.py, a pipeline without detection),
whose report must show leaks, proving the check can fail; and one with `--workers 2` (the
baseline worker as `run --workers 2`: its detection stage process must find the worker's
no-detection factory by reference), whose point must be measured through the merged metrics of
the worker processes.
No timing is asserted: a loaded machine may drop or blank frames, which the report counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ROOT

from stream.core.frames import Drop
from stream.loadtest.cli import main
from stream.sim.server import gst_rtsp_available

pytestmark = pytest.mark.skipif(not gst_rtsp_available(), reason="GStreamer RTSP server not installed "
                                "(apt-get install gir1.2-gst-rtsp-server-1.0 python3-gi ...; see .ci/run)")

CLIP = ROOT / ".samples" / "talking-face" / "WolfgangLanger_Pexels.mp4"
SHORT = ["--streams", "2", "--size", "320x240", "--duration", "5", "--warmup", "1", "--no-calibrate"]


def bench(tmp_path: Path, *extra: str) -> tuple[int, dict]:
    if not CLIP.exists():
        pytest.fail(f"{CLIP} missing: run `python -m stream.samples fetch` (deploy/setup.sh does)")
    out = tmp_path / "report"
    rc = main(["bench", *SHORT, "--work", str(tmp_path / "work"), "--out", str(out), *extra])
    assert out.with_suffix(".html").read_text().count("<svg") >= 2
    return rc, json.loads(out.with_suffix(".json").read_text())


def test_bench_against_redacting_pipeline(tmp_path: Path) -> None:
    rc, report = bench(tmp_path, "--modes", "redact-faces", "--register", "api")
    assert rc in (0, 1)  # 1: a busy machine dropped frames; counted, not a failure of the harness
    (point,) = report["runs"][0]["points"]
    assert point["received"] > 0 and point["latency_ms"]["p50"] is not None
    leaks = point["leaks"]
    assert leaks["by_class"]["face"]["checked"] >= point["received"]  # every received frame checked
    assert leaks["visible"] == 0, f"faces visible in redacted output: {leaks}"
    assert point["leaks_judged"] == ["face"]  # faces only: plates are not redacted, so not judged
    assert point["events"]["gt_tracks"] == 4 and point["events"]["found"] >= 1
    assert point["pipeline"]["cpu_cores"] is not None and point["harness_cpu_cores"] is not None
    assert point["workers"] == 1 and point["pipeline"]["metrics_from"] == [], "one process, unlabelled"
    # drops are told by reason, and the frames not received by when they were sent
    by_reason = point["pipeline"]["dropped_by_reason"]
    assert sum(by_reason.values()) == point["pipeline"]["dropped"]
    assert set(by_reason) <= {d.value for d in Drop}
    for s in point["streams"]:
        assert len(s["not_received_at_s"]) == min(20, s["sent"] - s["received"])
        assert all(0 <= t <= point["window_s"] for t in s["not_received_at_s"])


def test_no_redact_mode_makes_the_leak_check_fail(tmp_path: Path) -> None:
    worker = ROOT / "benchmarks" / "baseline_worker.py"  # found by default too; named so it is explicit
    rc, report = bench(tmp_path, "--modes", "no-redact", "--baseline-worker", str(worker))
    assert rc == 1
    (point,) = report["runs"][0]["points"]
    assert point["mode"] == "no-redact" and not point["held"]
    leaks = point["leaks"]
    assert leaks["checked"] > 0 and leaks["visible"] > 0
    assert leaks["rate"] > 0.9, f"unredacted objects should read as visible: {leaks}"
    assert leaks["by_class"]["plate"]["visible"] > 0 and leaks["by_class"]["face"]["visible"] > 0


def test_bench_with_two_worker_processes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, report = bench(tmp_path, "--modes", "transcode", "--workers", "2", "--streams", "1")
    assert rc in (0, 1)  # 1: a busy machine dropped frames; counted, not a failure of the harness
    (run,) = report["runs"]
    (point,) = run["points"]
    assert run["workers"] == point["workers"] == point["spec"]["workers"] == 2
    assert point["received"] > 0 and point["latency_ms"]["p50"] is not None
    pipe = point["pipeline"]
    assert pipe["metrics_from"] == ["detector", "worker-0", "worker-1"]
    assert pipe["processes"] >= 4, "supervisor, detection stage, two workers"
    assert pipe["frames_in"] > 0 and pipe["published"] > 0, "counters of the worker that runs lt0"
    assert pipe["detector_up"] == 1.0, "up in every process, not summed over them"
    assert pipe["worker_restarts"] == 0
    assert "| 320x240 | transcode | 2 | 1 |" in capsys.readouterr().out


def test_cameras_and_readers_that_never_started_stop_quietly() -> None:
    """A point that fails before its readers start (a pipeline that did not come up, or not with the
    worker processes asked for) stops them on the way out: that must not hide its error behind
    "cannot join thread", nor skip stopping the pipeline and the relay."""
    from stream.loadtest.camera import SyntheticCamera
    from stream.loadtest.reader import OutputReader
    from stream.loadtest.scene import Scene, load_material

    if not CLIP.exists():
        pytest.fail(f"{CLIP} missing: run `python -m stream.samples fetch` (deploy/setup.sh does)")
    scene = Scene(load_material(CLIP), 0, 320, 240, 25)
    OutputReader(scene, "rtsp://127.0.0.1:9/lt-out0").stop()
    SyntheticCamera(scene, "rtsp://127.0.0.1:9/lt-cam0").stop()
