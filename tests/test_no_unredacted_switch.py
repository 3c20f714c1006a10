"""The installed package cannot be made to publish unredacted frames: no flag, variable or config key.

The only pipeline without detection is the load test's baseline worker, which lives in the
source checkout (benchmarks/baseline_worker.py), not in the package. These tests scan the
package for anything that would bring such a switch back.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import subprocess
import sys

import pytest
from helpers import ROOT

from stream.cli import build_parser
from stream.config import DetectionConfig

PACKAGE = ROOT / "stream"
SWITCH_WORDS = re.compile(r"no.?redact|no.?detect|unredact|transcode|bypass|skip.?detect|detect\w*.?off|"
                          r"faces?.?off|disable|raw", re.IGNORECASE)
"""words an option or variable that turns detection off would carry"""


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:  # argparse offers no public walk over subcommands
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def test_the_no_detection_worker_is_not_part_of_the_package() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("stream.loadtest.worker")
    assert (ROOT / "benchmarks" / "baseline_worker.py").is_file()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "stream.loadtest.worker" not in text and "no-redact-test-only" not in text, path


def test_no_cli_option_switches_detection_off() -> None:
    parsers = _parsers(build_parser())
    assert len(parsers) > 3 and any(p.prog.endswith(" bench") for p in parsers)
    for parser in parsers:
        for action in parser._actions:
            assert action.help != argparse.SUPPRESS, f"{parser.prog}: hidden option {action.option_strings}"
            for option in action.option_strings:
                assert not SWITCH_WORDS.search(option), f"{parser.prog} {option}"


def test_bench_help_offers_no_switch() -> None:
    r = subprocess.run([sys.executable, "-m", "stream.cli", "bench", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    options = re.findall(r"(?<![\w-])--[\w-]+", r.stdout)
    assert "--modes" in options and "--baseline-worker" in options
    assert not [o for o in options if SWITCH_WORDS.search(o)]
    assert "test-only" not in r.stdout


def _env_names(tree: ast.AST) -> set[str]:
    """Constant names read through os.environ[...], os.environ.get/setdefault/pop and os.getenv."""
    names = set()
    for node in ast.walk(tree):
        arg = None
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            arg = node.slice
        elif isinstance(node, ast.Call) and node.args and ast.unparse(node.func) in (
                "os.environ.get", "os.environ.setdefault", "os.environ.pop", "os.getenv"):
            arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            names.add(arg.value)
    return names


def test_no_environment_variable_switches_detection_off() -> None:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        names |= _env_names(ast.parse(path.read_text(), str(path)))
    assert "STREAM_REDACT_SAMPLES" in names  # the scan sees the variables that are read
    assert not {n for n in names if SWITCH_WORDS.search(n) or re.search(r"DETECT|FACE|PLATE", n)}


def test_no_config_key_switches_faces_off() -> None:
    assert "faces" not in DetectionConfig.model_fields
    switches = {name for name, field in DetectionConfig.model_fields.items() if field.annotation is bool}
    assert "faces" not in switches and not {s for s in switches if SWITCH_WORDS.search(s)}


def _passes_on(node: ast.AST) -> bool:
    """The caller's own factory (a parameter passed on), or the configured detector's."""
    if isinstance(node, ast.Name):
        return node.id in ("detector_factory", "factory", "configured")
    return isinstance(node, ast.Call) and ast.unparse(node.func).endswith("detector_factory_for")


FACTORY_TAKERS = {"serve": 1, "Pipeline": 1, "StageServer": 1, "Supervisor": None, "supervise": None,
                  "stage_main": None}
"""calls that take a detector factory, and the position it may be passed at (None: keyword only)"""


def test_nothing_in_the_package_hands_the_pipeline_its_own_detector() -> None:
    """`serve`, `Pipeline` and the detection stage of `run --workers N` (StageServer, stage_main,
    Supervisor, supervise) take a detector factory for tests and the load test's baseline; the
    package itself never makes one up, it only passes on the one its caller gave, so every
    pipeline it starts detects with the configured models."""
    calls = 0
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = ast.unparse(node.func).rsplit(".", 1)[-1] if isinstance(node, ast.Call) else None
            if name not in FACTORY_TAKERS:
                continue
            calls += 1
            pos = FACTORY_TAKERS[name]
            given = (node.args[pos:pos + 1] if pos is not None else []) + \
                [k.value for k in node.keywords if k.arg in ("detector_factory", "factory")]
            for arg in given:  # only ever the caller's own factory, or the configured one, passed on
                forwarded = any(_passes_on(n) for n in ast.walk(arg))
                assert forwarded or (isinstance(arg, ast.Constant) and arg.value is None), \
                    f"{path}:{node.lineno}: {ast.unparse(node)}"
    assert calls >= 5, "the scan finds the calls it checks"
