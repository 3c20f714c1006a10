"""deploy/constraints.txt pins every Python package a clean build installs, at versions that
pyproject.toml allows, and every install path uses it: a dependency added to pyproject.toml and not
pinned would float to whatever PyPI has on the day CI runs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
USERS = ("deploy/setup.sh", ".ci/run", "deploy/Dockerfile", "deploy/ci-tools.sh")
"""every place that installs the project's Python packages"""


def pins() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for n, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s=;]+)", line.strip())
        assert m, f"deploy/constraints.txt:{n}: {line!r} is not `name==version`"
        name = canonicalize_name(m[1])
        assert name not in out, f"deploy/constraints.txt:{n}: {m[1]} pinned twice"
        out[name] = Version(m[2])
    return out


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_every_dependency_of_a_clean_build_is_pinned_at_a_version_pyproject_allows() -> None:
    pinned = pins()
    assert len(pinned) > 50  # the whole resolved set, not only the direct dependencies
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is a dependency but not in deploy/constraints.txt; refresh it"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"deploy/constraints.txt pins {req.name}=={pinned[name]}, outside pyproject.toml's {req}")


def test_nothing_the_gpu_machines_bring_is_pinned() -> None:
    """torch and CUDA wheels come with .ci/run's own torch pin, or with the GPU machine's image."""
    gpu = {"torch", "torchvision", "triton"}
    assert not [n for n in pins() if n in gpu or n.startswith(("nvidia-", "cuda-"))]


def test_every_install_path_uses_the_constraints() -> None:
    for rel in USERS:
        text = (ROOT / rel).read_text()
        installs = [ln for ln in text.splitlines() if "pip install" in ln and not ln.lstrip().startswith("#")
                    and "--upgrade pip" not in ln and "--no-deps" not in ln]
        assert installs, rel
        for ln in installs:
            assert "constraints.txt" in ln, f"{rel}: `{ln.strip()}` installs without the constraints"
