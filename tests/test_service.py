"""`stream-redact run` as a service: HTTP metrics and health, clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import ROOT, make_clip
from live_helpers import NoFaces, Raises, counter, wait_for

from stream.config import parse_config
from stream.live.http import start_http
from stream.live.pipeline import Pipeline


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("svc") / "face.mp4", frames=25, width=320, height=240).path


async def test_metrics_health_and_readiness(clip_path: Path) -> None:
    cfg = parse_config({"streams": [{"id": "cam-a", "source": {"type": "file", "path": str(clip_path),
                                                                 "loop": True}}]})
    det = NoFaces()
    p = Pipeline(cfg, lambda: det)
    p.start()
    runner, port = await start_http(p, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{port}"
    try:
        loop = asyncio.get_running_loop()

        async def aget(path: str) -> tuple[int, str]:
            return await loop.run_in_executor(None, get, base + path)

        deadline = time.monotonic() + 20
        while counter(p.metrics, "frames_published", stream="cam-a") < 3:
            assert time.monotonic() < deadline, "no frames published"
            await asyncio.sleep(0.05)
        status, body = await aget("/metrics")
        assert status == 200
        for name in ("frames_in_total", "frames_dropped_total", "frames_blanked_total", "detections_total",
                     "batch_size_bucket", "inference_seconds_bucket", "queue_depth", "stream_up",
                     "reconnects_total", "detector_up"):
            assert f"stream_redact_{name}" in body, name
        assert 'stream_redact_stream_up{stream="cam-a"} 1.0' in body
        status, body = await aget("/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, body = await aget("/readyz")
        doc = json.loads(body)
        assert status == 200 and doc["ready"] is True
        assert doc["streams"][0]["id"] == "cam-a" and doc["streams"][0]["state"] == "up"
        status, _ = await aget("/nope")
        assert status == 404
    finally:
        await runner.cleanup()
        p.stop()


async def test_readiness_fails_while_the_detector_is_down(clip_path: Path) -> None:
    cfg = parse_config({"streams": [{"id": "cam-b", "source": {"type": "file", "path": str(clip_path),
                                                                 "loop": True}}],
                        "fail_closed": {"max_latency_ms": 200}})
    calls: list[int] = []

    def factory():
        calls.append(1)
        if len(calls) == 1:
            return Raises()
        raise RuntimeError("model file unreadable")  # every rebuild fails: the detector stays down

    p = Pipeline(cfg, factory)
    p.start()
    runner, port = await start_http(p, "127.0.0.1", 0)
    try:
        loop = asyncio.get_running_loop()
        url = f"http://127.0.0.1:{port}/readyz"
        deadline = time.monotonic() + 20
        while (await loop.run_in_executor(None, get, url))[0] != 503:
            assert time.monotonic() < deadline, "readiness never failed"
            await asyncio.sleep(0.05)
        status, _ = await loop.run_in_executor(None, get, f"http://127.0.0.1:{port}/healthz")
        assert status == 200  # alive: restarting the process would not help a missing model
    finally:
        await runner.cleanup()
        p.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_stops_cleanly_on_signal(clip_path: Path, tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "rec.mkv"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"streams:\n  - id: cam1\n    source: {{type: file, path: '{clip_path}', loop: true}}\n"
        f"    outputs: [{{type: file, path: '{out}'}}]\n"
        "detection: {preset: fast, plates: false, heads: false, providers: [cpu]}\nhttp: {port: 0}\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "run", "--config", str(cfg)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "metrics at http://" in line:
                break
        url = lines[-1].split("metrics at ")[1].split(",")[0]
        wait_for(lambda: 'stream_redact_output_frames_total{output="file",stream="cam1"}' in get(url)[1]
                 and out.exists() and out.stat().st_size > 0, timeout=60, what="frames recorded")
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=15)
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "stopped" in rest
    assert "Traceback" not in rest
    from helpers import read_video

    assert read_video(out).frames  # the recording was closed properly and is playable


def test_run_with_a_missing_model_dir_fails_clearly(clip_path: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"streams:\n  - id: cam1\n    source: {{type: file, path: '{clip_path}'}}\n"
                   f"detection: {{model_dir: '{tmp_path / 'nomodels'}'}}\nhttp: {{port: 0}}\n")
    r = subprocess.run([sys.executable, "-m", "stream.cli", "run", "--config", str(cfg)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "stream-redact: error:" in r.stderr and "models fetch" in r.stderr
    assert "Traceback" not in r.stderr
