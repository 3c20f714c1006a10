"""`stream-redact models`: verify, list (with licences) and the manifest's promises."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli

from stream import __version__
from stream.detect.models import DEFAULT_MODEL_DIR, ModelError, manifest, model_path, sha256_file


def test_manifest_lists_the_detectors_two_int8_variants_and_the_vad() -> None:
    assert set(manifest()) == {"centerface", "yunet", "plate", "person", "plate_int8", "person_int8", "text",
                               "vad"}
    for name, spec in manifest().items():
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256), name
        assert spec.license.strip(), name
        assert {"kind", "package", "version", "member"} <= set(spec.source), name


@pytest.mark.parametrize("name", sorted(manifest()))
def test_shipped_weights_match_their_sha256(name: str) -> None:
    path = DEFAULT_MODEL_DIR / manifest()[name].file
    assert path.is_file(), f"{path} missing: run `stream-redact models fetch`"
    assert sha256_file(path) == manifest()[name].sha256
    assert model_path(name) == path


def test_models_verify_passes() -> None:
    res = run_cli("models", "verify")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert sorted(ln.split(":")[0] for ln in lines) == sorted(manifest())
    assert all(": ok (" in ln for ln in lines)


def test_models_verify_rejects_a_wrong_file(tmp_path: Path) -> None:
    for spec in manifest().values():
        shutil.copyfile(DEFAULT_MODEL_DIR / spec.file, tmp_path / spec.file)
    (tmp_path / manifest()["yunet"].file).write_bytes(b"not an onnx model")
    res = run_cli("models", "verify", "--model-dir", tmp_path)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert re.search(r"^stream-redact: error: model 'yunet' .*sha256", res.stderr, re.M), res.stderr


def test_model_path_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="stream-redact models fetch"):
        model_path("centerface", tmp_path)
    (tmp_path / manifest()["centerface"].file).write_bytes(b"\0" * 10)
    with pytest.raises(ModelError, match="sha256"):
        model_path("centerface", tmp_path)
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        model_path("nope")


def test_models_fetch_keeps_verified_files_without_downloading(tmp_path: Path) -> None:
    for spec in manifest().values():
        shutil.copyfile(DEFAULT_MODEL_DIR / spec.file, tmp_path / spec.file)
    res = run_cli("models", "fetch", "--model-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    assert "downloading" not in res.stdout
    assert res.stdout.count(": ok (") == len(manifest())


def test_models_list_shows_source_and_licence() -> None:
    res = run_cli("models", "list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == len(manifest())
    for name, spec in manifest().items():
        (line,) = [ln for ln in lines if ln.split()[0] == name]
        assert f"{spec.source['package']}=={spec.source['version']}" in line
        assert f"[{spec.license}]" in line
    text = res.stdout
    assert "AGPL-3.0" in text and "MIT" in text


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("stream-redact")
    assert exe.exists(), f"{exe}: is the package installed (pip install -e .)?"
    res = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == f"stream-redact {__version__}"
