"""Tools of the deployment checks: helm, hadolint, promtool, the Compose schema (deploy/ci-tools.sh).

In CI (``CI`` set) a missing tool fails the test, since a skipped check would hide a broken chart
or image; on a developer's machine it skips with the command that installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest
from helpers import ROOT

TOOLS = ROOT / ".tools"
INSTALL_HINT = "install the deployment tools with `bash deploy/ci-tools.sh`"


def missing(what: str) -> NoReturn:
    """Fail in CI, skip elsewhere: ``what`` is not installed."""
    message = f"{what} is not installed; {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def tool(name: str) -> str:
    """Path of a tool from .tools/bin or PATH."""
    local = TOOLS / "bin" / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        missing(name)
    return found


def venv_tool(name: str) -> str:
    """A console script installed beside this interpreter (the project's .venv)."""
    import sys

    path = Path(sys.executable).parent / name
    if not path.is_file():
        found = shutil.which(name)
        if found is None:
            missing(name)
        return found
    return str(path)


def compose_schema() -> Path:
    path = TOOLS / "compose-spec.json"
    if not path.is_file():
        missing("the Compose Specification schema (.tools/compose-spec.json)")
    return path


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=kw.pop("cwd", ROOT), timeout=120, **kw)
