"""Machine facts every benchmark records beside its numbers: the CPU, how busy the machine was
meanwhile, and which commit ran. One copy, imported by the benchmark scripts (run by path, so
their folder is on ``sys.path``)."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (from /proc/stat), None elsewhere.

    Two readings around a timed step, less the step's own CPU time, give the cores anything else
    kept busy meanwhile: the "other load" column that says whether a number was disturbed."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commit() -> str:
    """The checkout's short commit, ``-dirty`` when tracked files have changes; "" without git."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""
    return rev + ("-dirty" if dirty and rev else "")


def clip_args(description: str, frames: int, reps: int, frames_help: str,
              reps_help: str) -> argparse.ArgumentParser:
    """The options every benchmark on the sample clip shares: its sizes, frames and repetitions."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--sizes", default="640x360,1280x720", help="frame sizes of the sample clip")
    p.add_argument("--frames", type=int, default=frames, help=f"{frames_help} (default {frames})")
    p.add_argument("--reps", type=int, default=reps, help=f"{reps_help} (default {reps})")
    return p
