"""Streams spread over workers: each stream runs on exactly one `stream-redact run --shard-index I`.

The unit tests pin the hash (a change would move streams between the pods of a running
deployment) and its properties; the live test starts three real worker processes on one config
and asks each for its streams over HTTP.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CLI, ROOT, make_clip
from live_helpers import NoFaces, wait_for
from test_api import Server, call

from stream.config import parse_config
from stream.core.errors import UserError
from stream.live.auth import Tokens
from stream.live.pipeline import Pipeline
from stream.live.shard import Shard, ordinal_from_hostname, owner, resolve

IDS = ["gate-north", "gate-south", "lobby", "car-park", "bodycam-7", "platform-2"]
TOKEN = "shard-test-token-0123456789"


def test_owner_is_pinned() -> None:
    """These values are a contract with running deployments: changing the hash moves streams."""
    assert [owner(i, 3) for i in IDS] == [1, 1, 2, 0, 0, 2]
    assert [owner(i, 2) for i in IDS] == [1, 1, 1, 0, 0, 0]
    assert all(owner(i, 1) == 0 for i in IDS)


def test_owner_does_not_depend_on_the_python_hash_seed() -> None:
    code = f"from stream.live.shard import owner; print([owner(i, 5) for i in {IDS!r}])"
    outs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("0", "1", "4242")}
    assert len(outs) == 1, outs


def test_streams_spread_evenly() -> None:
    ids = [f"cam-{i:04d}" for i in range(4000)]
    for n in (2, 3, 5, 8):
        counts = collections.Counter(owner(i, n) for i in ids)
        assert set(counts) == set(range(n))
        assert max(counts.values()) / min(counts.values()) < 1.25, counts


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_adding_a_worker_moves_only_the_streams_it_takes(n: int) -> None:
    ids = [f"cam-{i:04d}" for i in range(2000)]
    moved = [i for i in ids if owner(i, n) != owner(i, n + 1)]
    assert all(owner(i, n + 1) == n for i in moved)  # nothing shuffles between the old workers
    assert 0.5 / (n + 1) < len(moved) / len(ids) < 1.5 / (n + 1)


def test_split_partitions_the_ids() -> None:
    parts = [Shard(i, 3).split(IDS) for i in range(3)]
    mine = [set(m) for m, _ in parts]
    assert set().union(*mine) == set(IDS) and sum(map(len, mine)) == len(IDS)
    for (m, others) in parts:
        assert sorted(m + others) == sorted(IDS)


@pytest.mark.parametrize("host, expected", [
    ("stream-redact-0", (0, "stream-redact")),
    ("stream-redact-12", (12, "stream-redact")),
    ("my-release-stream-redact-3.my-release-stream-redact-headless.ns.svc", (3, "my-release-stream-redact")),
])
def test_ordinal_from_hostname(host: str, expected: tuple[int, str]) -> None:
    assert ordinal_from_hostname(host) == expected


@pytest.mark.parametrize("index, count, env, host, expected", [
    (None, None, {}, None, None),
    ("1", "3", {}, None, Shard(1, 3)),
    (None, None, {"STREAM_REDACT_SHARD_INDEX": "2", "STREAM_REDACT_SHARD_COUNT": "4"}, None, Shard(2, 4)),
    ("0", None, {"STREAM_REDACT_SHARD_COUNT": "2"}, None, Shard(0, 2)),  # option beats env, env fills in
    ("auto", "3", {}, "stream-redact-2", Shard(2, 3, "stream-redact")),
    (None, "3", {"STREAM_REDACT_SHARD_INDEX": "auto", "HOSTNAME": "w-1"}, None, Shard(1, 3, "w")),
])
def test_resolve(index, count, env, host, expected) -> None:
    assert resolve(index, count, environ=env, hostname=host) == expected


@pytest.mark.parametrize("index, count, env, host, message", [
    ("3", "3", {}, None, r"shard index must be between 0 and 2 \(shard count 3\), got 3"),
    ("-1", "2", {}, None, r"shard index must be between 0 and 1"),
    ("0", "0", {}, None, r"shard count must be between 1 and 1024, got 0"),
    ("one", "2", {}, None, r"--shard-index: expected a whole number or 'auto', got 'one'"),
    ("0", "two", {}, None, r"--shard-count: expected a whole number"),
    ("1", None, {}, None, r"--shard-count \(or \$STREAM_REDACT_SHARD_COUNT\) is missing"),
    (None, "2", {}, None, r"--shard-index \(or \$STREAM_REDACT_SHARD_INDEX\) is missing"),
    ("auto", "2", {}, "redactor", r"host name 'redactor' does not end in -<number>"),
    ("auto", "2", {}, "w-5", r"shard index must be between 0 and 1 .*got 5"),
])
def test_resolve_rejects(index, count, env, host, message: str) -> None:
    with pytest.raises(UserError, match=message) as e:
        resolve(index, count, environ=env, hostname=host)
    assert e.value.exit_code == 2


def test_shard_module_prints_owners() -> None:
    out = subprocess.run([sys.executable, "-m", "stream.live.shard", "--count", "3", *IDS], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"{i}\t{owner(i, 3)}" for i in IDS]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cheap camera: 160x120 at 5 fps, so three workers with six streams fit on two cores."""
    return make_clip(tmp_path_factory.mktemp("shard") / "cam.mp4", frames=10, width=160, height=120,
                     fps=5).path


def _config_text(clip: Path) -> str:
    streams = "".join(f"  - id: {i}\n    source: {{type: file, path: '{clip}', loop: true}}\n" for i in IDS)
    return ("streams:\n" + streams
            + "detection: {preset: fast, plates: false, heads: false, providers: [cpu], threads: 1}\n"
              "batcher: {max_batch: 4, max_wait_ms: 5}\n"
              "fail_closed: {max_latency_ms: 5000}\n"
              "http: {host: 127.0.0.1, port: 0}\n"
              "events: {sink: none}\n")


@pytest.mark.parametrize("argv, message", [
    (["--shard-index", "3", "--shard-count", "3"], "shard index must be between 0 and 2"),
    (["--shard-index", "x", "--shard-count", "3"], "--shard-index: expected a whole number or 'auto'"),
    (["--shard-index", "1"], "--shard-count (or $STREAM_REDACT_SHARD_COUNT) is missing"),
])
def test_run_rejects_bad_shard_options(argv: list[str], message: str, clip: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_config_text(clip))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_REDACT_SHARD_")}
    res = subprocess.run([*CLI, "run", "--config", str(cfg), "--check", *argv], cwd=ROOT, capture_output=True,
                         text=True, env=env)
    assert res.returncode == 2
    assert res.stderr.startswith("stream-redact: error: ") and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_run_check_reports_the_split(clip: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_config_text(clip))
    env = {**os.environ, "STREAM_REDACT_SHARD_INDEX": "0", "STREAM_REDACT_SHARD_COUNT": "3"}
    res = subprocess.run([*CLI, "run", "--config", str(cfg), "--check"], cwd=ROOT, capture_output=True,
                         text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "shard 0 of 3: 2 stream(s) here (car-park, bodycam-7), 4 left to the other workers" in res.stderr


def test_api_refuses_a_stream_another_worker_owns(clip: Path) -> None:
    cfg = parse_config({"streams": [], "api": {"allow_file_sources": True}})
    pipeline = Pipeline(cfg, NoFaces)
    pipeline.start()
    pipeline.shard = Shard(0, 3, "stream-redact")
    server = Server(pipeline, Tokens((TOKEN.encode(),)), allow_files=True)
    try:
        body = {"id": "lobby", "source": {"type": "file", "path": str(clip), "loop": True}}
        status, doc, _ = call("POST", f"{server.base}/api/streams", body, token=TOKEN)
        assert status == 421, doc
        assert doc["error"] == ("stream 'lobby' belongs to stream-redact-2, not to this worker "
                                "(shard 0 of 3); add it there")
        assert doc["shard"] == 2 and doc["shard_count"] == 3
        assert "lobby" not in pipeline.streams
        status, doc, _ = call("POST", f"{server.base}/api/streams", {**body, "id": "car-park"}, token=TOKEN)
        assert status == 201, doc
        assert "car-park" in pipeline.streams
    finally:
        server.close()
        pipeline.stop()


class Worker:
    """One `stream-redact run --shard-index I --shard-count N` process; stderr goes to a file."""

    def __init__(self, config: Path, index: int, count: int, log: Path) -> None:
        self.index, self.log = index, log
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "STREAM_REDACT_TOKENS": TOKEN}
        self._err = log.open("w")
        self.proc = subprocess.Popen([*CLI, "run", "--config", str(config), "--shard-index", str(index),
                                      "--shard-count", str(count)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=self._err, env=env)
        self.base = ""

    def text(self) -> str:
        return self.log.read_text()

    def listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker {self.index} exited {self.proc.returncode}:\n{self.text()}")
        m = re.search(r"metrics at (http://[\d.]+:\d+)/metrics", self.text())
        if m:
            self.base = m.group(1)
        return bool(m)

    def streams(self) -> dict[str, dict]:
        status, doc, _ = call("GET", f"{self.base}/api/streams", token=TOKEN)
        assert status == 200, doc
        return {s["id"]: s for s in doc["streams"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._err.close()


@pytest.mark.slow
def test_three_workers_run_every_stream_exactly_once(clip: Path, tmp_path: Path) -> None:
    config = tmp_path / "shared.yaml"
    config.write_text(_config_text(clip))  # one config for all; port 0: each worker binds its own
    n = 3
    workers = [Worker(config, i, n, tmp_path / f"worker-{i}.log") for i in range(n)]
    try:
        for w in workers:
            wait_for(w.listening, timeout=90, what=f"worker {w.index} to serve HTTP")

        def frames_everywhere() -> bool:
            return all(s.get("frames_in", 0) > 0 for w in workers for s in w.streams().values())

        wait_for(frames_everywhere, timeout=90, what="frames on every worker's streams")
        seen: dict[str, list[int]] = collections.defaultdict(list)
        for w in workers:
            ids = w.streams()
            assert set(ids) == {i for i in IDS if owner(i, n) == w.index}, (w.index, sorted(ids))
            for sid in ids:
                seen[sid].append(w.index)
            mine = [i for i in IDS if owner(i, n) == w.index]
            assert (f"shard {w.index} of {n}: {len(mine)} stream(s) here ({', '.join(mine)}), "
                    f"{len(IDS) - len(mine)} left to the other workers") in w.text()
        assert {sid: len(owners) for sid, owners in seen.items()} == dict.fromkeys(IDS, 1)
        # a stream added at run time on the wrong worker is refused with the owner's name
        status, doc, _ = call("POST", f"{workers[0].base}/api/streams",
                              {"id": "lobby", "source": {"type": "rtsp", "url": "rtsp://127.0.0.1:9/x"}},
                              token=TOKEN)
        assert status == 421 and doc["shard"] == owner("lobby", n) == 2, doc
    finally:
        for w in workers:
            w.stop()
    for w in workers:
        assert w.proc.returncode == 0, w.text()
        assert "Traceback" not in w.text()
