"""The load-test report and ramp arithmetic, on hand-made points (no cameras, no pipeline)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.loadtest.ramp import by_latency_bound, ratios
from stream.loadtest.report import table, write_html, write_json


def point(mode: str, k: int, p99: float, held: bool, fps: float = 25.0, visible: int = 0) -> dict:
    return {
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
    assert "| 640x360 | redact | 2 | no |" in text and "2/10" in text


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
    assert "| 640x360 | redact | 2 | no |" in capsys.readouterr().out
    assert main(["bench", "report", str(saved)]) == 0
    assert (tmp_path / "run.html").read_text() == rebuilt, "default: the JSON's name with .html"


@pytest.mark.parametrize(("content", "words"), [
    (None, "cannot read"),
    ("{not json", "is not valid JSON"),
    ('{"runs": 3}', "is not a `stream-redact bench` report"),
    ('{"runs": [{"size": "640x360"}]}', "missing a field the page needs"),
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
