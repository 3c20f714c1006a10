"""`stream-redact bench` refuses bad options before starting anything, and says what to write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "stream-redact"


@pytest.mark.parametrize(("args", "words"), [
    (["--streams", "0"], "--streams: '0': a stream count must be between 1 and 255"),
    (["--ramp", "1,x"], "comma-separated list"),
    (["--size", "641x360"], "both even"),
    (["--duration", "abc"], "expected seconds"),
    (["--max-batch", "999"], "between 1 and 256"),
    (["--api", "ftp://host"], "not a http or https URL; write http://host:port"),
    (["--media", "http://user:hunter22secret@h:8554"], "not a rtsp URL; write rtsp://host:port"),
    (["--preset", "slow"], "invalid choice"),
    (["--workers", "0"], "--workers: '0': a worker count must be between 1 and 256"),
    (["--workers", "1", "257"], "--workers: '257': a worker count must be between 1 and 256"),
    (["--workers", "two"], "--workers: 'two': expected a worker count"),
    (["--threads", "-1"], "--threads: '-1': a thread count must be between 0 and 256"),
])
def test_bad_bench_options_are_refused_with_the_fix(args: list[str], words: str, tmp_path: Path) -> None:
    r = subprocess.run([str(BIN), "bench", *args, "--out", str(tmp_path / "lt")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr
    assert "hunter22secret" not in r.stderr + r.stdout, "a password in a URL is never echoed"
    assert not (tmp_path / "lt.json").exists(), "nothing ran"


@pytest.mark.parametrize("mode", ["transcode", "no-redact"])
def test_no_detection_modes_say_when_the_baseline_worker_is_missing(mode: str, tmp_path: Path) -> None:
    r = subprocess.run([str(BIN), "bench", "--modes", "redact", mode, "--baseline-worker",
                        str(tmp_path / "absent.py"), "--out", str(tmp_path / "lt")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"--baseline-worker {tmp_path / 'absent.py'}: no such file" in r.stderr
    assert "benchmarks/baseline_worker.py in a stream-redact source checkout" in r.stderr
    assert not (tmp_path / "lt.json").exists(), "nothing ran, not even the redact mode before it"


def test_an_installed_package_has_no_baseline_worker(tmp_path: Path) -> None:
    """Outside a source checkout (site-packages) the no-detection modes cannot run at all."""
    from stream.loadtest.driver import CHECKOUT, NoBaselineWorker, find_baseline_worker

    assert find_baseline_worker() == CHECKOUT / "benchmarks" / "baseline_worker.py"  # tests run in one
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "baseline_worker.py").write_text("")  # a stray file is not a checkout
    with pytest.raises(NoBaselineWorker) as e:
        find_baseline_worker(checkout=tmp_path)
    assert "not installed with stream-redact" in str(e.value)
    assert "pass --baseline-worker PATH, or leave these modes out" in str(e.value)


def test_workers_are_refused_for_a_remote_deployment(tmp_path: Path) -> None:
    """A deployment runs with the worker processes it was started with; bench cannot change them."""
    r = subprocess.run([str(BIN), "bench", "--api", "http://127.0.0.1:9", "--media", "rtsp://127.0.0.1:9",
                        "--workers", "2", "--out", str(tmp_path / "lt")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--workers sets the pipeline bench starts itself" in r.stderr
    assert "leave --workers out" in r.stderr
    assert not (tmp_path / "lt.json").exists(), "nothing ran"


def test_the_generated_pipeline_config_carries_the_worker_count(tmp_path: Path) -> None:
    """The config a local point writes is one `stream-redact run` accepts, with its workers."""
    import yaml

    from stream.config import load_config
    from stream.loadtest.driver import RunSpec, pipeline_doc, stream_doc

    streams = [stream_doc("lt0", "rtsp://127.0.0.1:8554/lt-cam0", "rtsp://127.0.0.1:8554/lt-out0", 1500)]
    for workers in (1, 2):
        doc = pipeline_doc(RunSpec(streams=1, workers=workers), streams, tmp_path / "events.jsonl")
        assert doc["workers"] == workers
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc))
        assert load_config(tmp_path / "cfg.yaml").workers == workers
    assert pipeline_doc(RunSpec(streams=1), streams, tmp_path / "e.jsonl")["workers"] == 1, "one process"


def test_the_generated_pipeline_config_carries_the_detector_settings(tmp_path: Path) -> None:
    import yaml

    from stream.config import load_config
    from stream.loadtest.driver import RunSpec, pipeline_doc

    doc = pipeline_doc(RunSpec(streams=1, threads=1, skip_unchanged=True, plate_every=1, person_every=2), [],
                       tmp_path / "e.jsonl")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc))
    det = load_config(tmp_path / "cfg.yaml").detection
    assert det.threads == 1 and det.skip_unchanged
    assert det.detector_settings().regions is not None
    settings = det.detector_settings()
    assert settings.plate is not None and settings.plate.every == 1
    assert settings.person_heads is not None and settings.person_heads.every == 2
    plain = pipeline_doc(RunSpec(streams=1), [], tmp_path / "e.jsonl")["detection"]
    assert not {"threads", "skip_unchanged", "plate_every", "person_every"} & set(plain), \
        "the defaults stay the pipeline's"


def test_the_generated_pipeline_config_carries_the_queue_size(tmp_path: Path) -> None:
    import yaml

    from stream.config import load_config
    from stream.loadtest.driver import RunSpec, pipeline_doc

    doc = pipeline_doc(RunSpec(streams=1, queue_size=3), [], tmp_path / "e.jsonl")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc))
    assert load_config(tmp_path / "cfg.yaml").queue_size == 3
    plain = pipeline_doc(RunSpec(streams=1), [], tmp_path / "e.jsonl")
    assert "queue_size" not in plain, "the pipeline's own"


def test_a_bad_queue_size_is_refused_before_anything_runs(tmp_path: Path) -> None:
    r = subprocess.run([str(BIN), "bench", "--queue-size", "0", "--out", str(tmp_path / "lt")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--queue-size" in r.stderr and "1" in r.stderr and "64" in r.stderr
    assert not (tmp_path / "lt.json").exists(), "nothing ran"


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"workers": 0}, "workers must be 1..256"),
    ({"workers": 257}, "workers must be 1..256"),
    ({"workers": 2, "api": "http://h:9108", "media": "rtsp://h:8554"}, "a remote deployment runs with the "
     "workers it was deployed with"),
])
def test_run_spec_refuses_worker_counts_it_cannot_run(kwargs: dict, words: str) -> None:
    from stream.loadtest.driver import RunSpec

    with pytest.raises(ValueError, match=words):
        RunSpec(streams=1, **kwargs)
