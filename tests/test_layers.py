"""The package's import layers, read from the source: the data path shows in the imports.

Lower layers never import higher ones, and no two packages import each other. The detector library
(``stream.detect``) and the value types (``stream.core``) can be read, tested and reused without
the live runtime, the events or the configuration.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "stream"

LAYERS: list[tuple[str, ...]] = [
    ("stream.core",),
    ("stream.detect",),
    ("stream.audio",),
    ("stream.config",),
    ("stream.events",),
    ("stream.live",),
    ("stream.files", "stream.samples", "stream.sim", "stream.loadtest", "stream.demo"),
    ("stream.cli", "stream.__main__"),
]
"""lowest first; a module may import its own layer's modules and those of layers below it"""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every ``stream`` module ``path`` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "stream":
                found.update(f"stream.{a.name}" for a in node.names)
            elif node.module.startswith("stream."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("stream."))
    return found


def unit(module: str) -> str:
    """The package (or top-level module) of ``module``: ``stream.live.webrtc.whep`` -> ``stream.live``."""
    return ".".join(module.split(".")[:2])


def layer(module: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in graph() if m != "stream" and layer(m) is None)
    assert not missing, f"add these to LAYERS in {Path(__file__).name}: {missing}"


def test_no_module_imports_a_higher_layer() -> None:
    wrong = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
             for m, deps in graph().items() for d in sorted(deps)
             if m != "stream" and d != "stream" and layer(d) is not None and layer(m) is not None
             and layer(d) > layer(m)]  # type: ignore[operator]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for m, deps in graph().items():
        edges.setdefault(unit(m), set()).update(unit(d) for d in deps if unit(d) != unit(m) and d != "stream")
    cycles = [f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and a in edges.get(b, set())]
    assert not cycles, cycles


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The layer test must be able to fail: an import from core into live is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from stream.live.pipeline import Pipeline\nfrom stream import cli\n")
    found = imports(bad)
    assert found == {"stream.live.pipeline", "stream.cli"}
    assert layer("stream.live.pipeline") > layer("stream.core.frames")  # type: ignore[operator]


@pytest.mark.parametrize("package", ["stream.core", "stream.detect"])
def test_library_layers_import_nothing_above_them(package: str) -> None:
    allowed = {n for names in LAYERS[: layer(package) + 1] for n in names}  # type: ignore[operator]
    for m, deps in graph().items():
        if unit(m) == package:
            assert all(any(d == a or d.startswith(a + ".") for a in allowed) for d in deps), (m, deps)
