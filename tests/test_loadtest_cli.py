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
])
def test_bad_bench_options_are_refused_with_the_fix(args: list[str], words: str, tmp_path: Path) -> None:
    r = subprocess.run([str(BIN), "bench", *args, "--out", str(tmp_path / "lt")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr
    assert "hunter22secret" not in r.stderr + r.stdout, "a password in a URL is never echoed"
    assert not (tmp_path / "lt.json").exists(), "nothing ran"
