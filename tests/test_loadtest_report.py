"""The load-test report and ramp arithmetic, on hand-made points, and how the figures of a pipeline
of one or several processes are read (hand-made metrics and event files; no cameras, no pipeline)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stream.loadtest import probe
from stream.loadtest.ramp import by_latency_bound, ratios
from stream.loadtest.report import table, write_html, write_json
from stream.loadtest.tracks import read_track_events


def point(mode: str, k: int, p99: float, held: bool, fps: float = 25.0, visible: int = 0,
          workers: int | None = None) -> dict:
    """A point as bench writes it; ``workers`` None: as reports from before the workers axis."""
    p = {
        "mode": mode, "k": k, "size": "640x360", "fps": 25.0, "held": held, "broke_on": [] if held else ["x"],
        "spec": {"latency_bound_ms": 200}, "latency_ms": {"p50": p99 / 2, "p99": p99},
        "latency_hist": {"edges_ms": [0.0, 50.0, 100.0], "counts": [3, 1]},
        "delivered_fps_min": fps, "delivered_fps_mean": fps, "blanked_seen": 0, "unreadable": 0,
        "pipeline": {"dropped": 0.0, "blanked": 0.0, "cpu_cores": 0.5},
        "harness_cpu_cores": 0.2, "other_load_cores": 0.0,
        "leaks": None if mode == "transcode" else {
            "checked": 10, "visible": visible, "rate": visible / 10,
            "by_size": {"face 32-64": {"checked": 10, "visible": visible, "rate": visible / 10}}},
        "events": None, "streams": [{"stream": f"lt{i}", "delivered_fps": fps} for i in range(k)],
    }
    if workers is not None:
        p["workers"] = workers
        p["spec"]["workers"] = workers
    return p


def test_largest_k_per_latency_bound() -> None:
    pts = [point("redact", 1, 150, True), point("redact", 2, 300, True), point("redact", 3, 900, False)]
    assert by_latency_bound(pts) == {"100": 0, "200": 1, "500": 2, "1000": 2}


def test_ratios_compare_modes_of_one_size() -> None:
    runs = [{"size": "640x360", "mode": "redact", "largest_k_held": 1,
             "points": [point("redact", 1, 100, True), point("redact", 2, 300, False, fps=20)]},
            {"size": "640x360", "mode": "transcode", "largest_k_held": 4,
             "points": [point("transcode", 4, 100, True)]}]
    r = ratios(runs)["640x360"]["redact_vs_transcode"]
    assert r["largest_k"] == "1/4" and r["throughput_ratio"] == 0.4  # 40 / 100 frames/s


def test_report_files_are_self_contained(tmp_path: Path) -> None:
    points = [point("redact", 1, 120, True), point("redact", 2, 400, False, visible=2)]
    report = {"started": "2026-01-01T00:00:00Z", "machine": {"cpus": 2}, "calibration": [],
              "runs": [{"size": "640x360", "mode": "redact", "largest_k_held": 1, "points": points}],
              "overload": None, "ratios": {}}
    write_json(report, tmp_path / "r.json")
    page = write_html(report, tmp_path / "r.html").read_text()
    assert page.count("<svg") >= 4 and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "<script" not in page and "<link" not in page
    text = table(report)
    assert "| 640x360 | redact | 1 | 2 | no |" in text and "2/10" in text, "no workers field: one process"
    assert "| 640x360 | redact | 1 | 1 |" in text, "largest K held, one process"


def test_every_sizes_overload_point_is_reported_and_old_reports_still_read(tmp_path: Path) -> None:
    """``--overload`` with two sizes runs one point per size; both are kept (an earlier report held
    one point there, and the second size's overwrote the first's). A saved report of the old form
    still makes its table and page."""
    small, large = point("redact", 8, 2000, False), point("redact", 8, 2400, False)
    large["size"] = "1280x720"
    one = point("redact", 1, 120, True)
    runs = [{"size": "640x360", "mode": "redact", "largest_k_held": 1, "points": [one]}]
    report = {"started": "2026-01-01T00:00:00Z", "machine": {"cpus": 2}, "calibration": [], "runs": runs,
              "overload": [small, large], "ratios": {}}
    text = table(report)
    assert "| 640x360 | redact | 1 | 8 | no |" in text and "| 1280x720 | redact | 1 | 8 | no |" in text
    old = dict(report, overload=small)
    assert "| 640x360 | redact | 1 | 8 | no |" in table(old)
    assert write_html(old, tmp_path / "old.html").read_text().count("<svg") >= 2


def tiny_report() -> dict:
    points = [point("redact", 1, 120, True), point("redact", 2, 400, False, visible=2)]
    return {"started": "2026-01-01T00:00:00Z", "machine": {"cpus": 2}, "calibration": [],
            "runs": [{"size": "640x360", "mode": "redact", "largest_k_held": 1, "points": points}],
            "overload": None, "ratios": {}}


def test_bench_report_rebuilds_the_page_from_a_saved_json(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from stream.cli import main

    report = tiny_report()
    saved = write_json(report, tmp_path / "run.json")
    assert main(["bench", "report", str(saved), "-o", str(tmp_path / "page.html")]) == 0
    rebuilt = (tmp_path / "page.html").read_text()
    assert rebuilt == write_html(report, tmp_path / "direct.html").read_text(), "the same page bench writes"
    assert "| 640x360 | redact | 1 | 2 | no |" in capsys.readouterr().out
    assert main(["bench", "report", str(saved)]) == 0
    assert (tmp_path / "run.html").read_text() == rebuilt, "default: the JSON's name with .html"


@pytest.mark.parametrize(("content", "words"), [
    (None, "cannot read"),
    ("{not json", "is not valid JSON"),
    ('{"runs": 3}', "is not a `stream-redact bench` report"),
    ('{"runs": [{"size": "640x360"}]}', "missing a field the page needs"),
    ('{"runs": [{"size": "640x360", "mode": "redact", "workers": "many", "points": []}]}',
     "missing a field the page needs"),
])
def test_bench_report_refuses_what_is_not_a_report(content: str | None, words: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from stream.cli import main

    src = tmp_path / "in.json"
    if content is not None:
        src.write_text(content)
    assert main(["bench", "report", str(src)]) == 2
    err = capsys.readouterr().err
    assert words in err and "stream-redact bench" in err
    assert not (tmp_path / "in.html").exists()


def test_reports_show_the_worker_count_of_every_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Runs of one mode with 1 and 2 worker processes: a column in the tables, a series each in the
    plots, and the ratio of 2 workers to 1; the page rebuilds from the JSON alike."""
    from stream.cli import main

    def run(mode: str, workers: int, best: int, fps: float) -> dict:
        pts = [point(mode, k, 150, k <= best, fps=fps, workers=workers) for k in range(1, best + 2)]
        return {"size": "640x360", "mode": mode, "workers": workers, "largest_k_held": best, "points": pts}

    runs = [run("transcode", 1, 2, 25.0), run("transcode", 2, 3, 25.0),
            run("redact-faces", 1, 1, 25.0), run("redact-faces", 2, 2, 20.0)]
    report = {"started": "2026-01-01T00:00:00Z", "machine": {"cpus": 2}, "calibration": [], "runs": runs,
              "overload": None, "ratios": ratios(runs)}
    r = report["ratios"]
    assert r["640x360"]["faces_vs_transcode"]["largest_k"] == "1/2", "one process against one process"
    assert r["640x360 workers=2"]["faces_vs_transcode"]["largest_k"] == "2/3"
    assert r["640x360 workers=2"]["transcode_workers_2_vs_1"] == {
        "largest_k": "3/2", "throughput_fps": "100.0/75.0", "throughput_ratio": 1.33}
    assert r["640x360 workers=2"]["redact-faces_workers_2_vs_1"]["throughput_ratio"] == 1.2  # 60 / 50
    text = table(report)
    assert "| 640x360 | transcode | 2 | 4 | no |" in text
    assert "| 640x360 | redact-faces | 1 | 1 | yes |" in text
    assert "| 640x360 | transcode | 2 | 3 |" in text and "| 640x360 | redact-faces | 1 | 1 |" in text
    saved = write_json(report, tmp_path / "w.json")
    assert main(["bench", "report", str(saved)]) == 0
    page = (tmp_path / "w.html").read_text()
    assert "redact-faces w2</text>" in page and "transcode w1</text>" in page, "a series per worker count"
    assert "transcode 640x360 2 workers K=4" in page
    assert "| 640x360 | redact-faces | 2 | 3 | no |" in capsys.readouterr().out


def test_an_old_report_without_workers_rebuilds(tmp_path: Path) -> None:
    """A JSON written before the workers axis (no field anywhere) reads as one process."""
    report = tiny_report()
    report["ratios"] = ratios(report["runs"])
    assert list(report["ratios"]) == ["640x360"]
    page = write_html(report, write_json(report, tmp_path / "old.json").with_suffix(".html")).read_text()
    assert "redact 640x360 1 worker K=2" in page and "redact w1" not in page, "one series, named by its mode"


# -- metrics of a pipeline of several processes --------------------------------------------------------
CHILDREN = ("detector", "worker-0", "worker-1")


def exposition(frames: dict[str, float], up: dict[str, float], batches: float,
               latency: dict[str, tuple[float, float]]) -> str:
    """A front's /metrics as ``run --workers 2`` serves it: every child's samples with a worker
    label, batches only in the stage (worker="detector"), detector_up in every child; ``latency``:
    per worker, frames under 50 ms and in all."""
    lines = ["# TYPE stream_redact_frames_published_total counter"]
    lines += [f'stream_redact_frames_published_total{{stream="{sid}",worker="{w}"}} {frames[sid]}'
              for sid, w in (("lt0", "worker-1"), ("lt1", "worker-0"))]
    lines += ["# TYPE stream_redact_detector_up gauge"]
    lines += [f'stream_redact_detector_up{{worker="{w}"}} {v}' for w, v in up.items()]
    for w in CHILDREN:
        lines += [f'stream_redact_batch_size_sum{{worker="{w}"}} {batches * 4 if w == "detector" else 0}',
                  f'stream_redact_batch_size_count{{worker="{w}"}} {batches if w == "detector" else 0}',
                  f'stream_redact_worker_up{{worker="{w}"}} 1.0']
    for w, (fast, n) in latency.items():
        lines += [f'stream_redact_latency_seconds_bucket{{le="{le}",stream="x",worker="{w}"}} {c}'
                  for le, c in (("0.05", fast), ("0.1", n), ("+Inf", n))]
    return "\n".join(lines) + "\n"


def test_metrics_of_several_processes_are_summed_per_series_and_gauges_are_not() -> None:
    all_up = dict.fromkeys(CHILDREN, 1)
    a = probe.parse(exposition({"lt0": 100, "lt1": 50}, all_up, 10,
                               {"worker-0": (72, 80), "worker-1": (50, 100)}))
    # worker-0 restarted in between: its counters start again from 0
    b = probe.parse(exposition({"lt0": 350, "lt1": 20}, all_up, 60,
                               {"worker-0": (9, 10), "worker-1": (150, 300)}))
    assert probe.delta(a, b, "stream_redact_frames_published_total", stream="lt0") == 250
    assert probe.delta(a, b, "stream_redact_frames_published_total", stream="lt1") == 20, "not 20 - 50"
    assert probe.delta(a, b, "stream_redact_frames_published_total") == 270
    assert probe.delta(a, b, "stream_redact_batch_size_sum") / probe.delta(
        a, b, "stream_redact_batch_size_count") == 4.0, "mean batch: the stage's, the workers' zeros aside"
    assert probe.gauge(b, "stream_redact_detector_up") == 1.0, "up everywhere is 1, not 3"
    down = probe.parse(exposition({"lt0": 1, "lt1": 1}, {**all_up, "worker-0": 0}, 1, {}))
    assert probe.gauge(down, "stream_redact_detector_up") == 0.0, "one worker without its stage: not up"
    assert probe.gauge(down, "stream_redact_detector_up", worker="detector") == 1.0
    assert probe.gauge(down, "stream_redact_absent") is None
    assert probe.label_values(b, "worker") == list(CHILDREN)
    # increase: worker-0 9 of 10 under 50 ms (since its restart), worker-1 100 of 200: 109 of 210
    q = probe.histogram_quantile(a, b, "stream_redact_latency_seconds", 0.5)
    assert q is not None and q == pytest.approx(0.05 * 105 / 109)


def test_a_single_process_exposition_reads_as_before() -> None:
    text = 'stream_redact_frames_dropped_total{stream="lt0"} 3.0\nstream_redact_detector_up 1.0\n'
    a, b = probe.parse(text), probe.parse(text.replace("3.0", "7.0"))
    assert probe.delta(a, b, "stream_redact_frames_dropped_total", stream="lt0") == 4
    assert probe.gauge(b, "stream_redact_detector_up") == 1.0 and probe.label_values(b, "worker") == []
    escaped = probe.parse('m{stream="a\\"b",worker="worker-1"} 2 1700000000000\n')
    assert escaped == {("m", (("stream", 'a"b'), ("worker", "worker-1"))): 2.0}


def test_events_are_read_from_every_worker_file(tmp_path: Path) -> None:
    """``run --workers N`` writes ``<stem>.worker-<i><suffix>`` beside the configured file."""
    def ev(uid: str) -> str:
        return json.dumps({"type": "com.example.track.started", "data": {"track_uid": uid}}) + "\n"

    path = tmp_path / "pt.events.jsonl"
    (tmp_path / "pt.events.worker-0.jsonl").write_text(ev("a") + "not json\n")
    (tmp_path / "pt.events.worker-1.jsonl").write_text(ev("b") + ev("c"))
    (tmp_path / "other.events.worker-0.jsonl").write_text(ev("x"))  # another point's
    assert sorted(e["data"]["track_uid"] for e in read_track_events(path)) == ["a", "b", "c"]
    path.write_text(ev("d"))  # one process
    assert len(read_track_events(path)) == 4
    assert read_track_events(tmp_path / "absent.jsonl") == []


def test_cpu_and_memory_cover_the_whole_process_tree() -> None:
    """The pipeline's figures include its live child processes (``run --workers N``), which a
    parent's own /proc entry counts only once they have exited."""
    code = ("import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', 'import sys; "
            "sys.stdin.read()'], stdin=subprocess.PIPE); print(c.pid, flush=True); sys.stdin.read(); "
            "c.stdin.close(); c.wait()")
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        child = int(parent.stdout.readline())  # the child exists once its pid is printed
        assert set(probe.descendants(parent.pid)) == {parent.pid, child}
        cpu, rss, n = probe.tree_cpu_rss(parent.pid)
        assert n == 2 and cpu > 0 and rss > probe.proc_cpu_rss(parent.pid)[1], "the child's memory too"
    finally:
        parent.stdin.close()
        parent.wait(30)
