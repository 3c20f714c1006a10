"""What every config model shares: strict models, and the one way a config file names the environment.

Only the config file may name environment variables (``${VAR}``) and only its relative paths are
taken relative to its folder: its author is the operator. A value from an API body is validated
by the same models with no context, so it is taken as written. ``file_context`` is the marker
``parse_config`` passes to pydantic; the validators below read it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""an environment variable's name (matched whole)"""
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
_FROM_FILE = "config_file"


class ConfigModel(BaseModel):
    """Unknown keys are errors (a misspelt key never falls back to its default) and values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def file_context(base_dir: Path | None) -> dict[str, Any]:
    """The validation context of a config document; ``base_dir`` is its file's folder (None: the
    working directory, for a document that came from no file)."""
    return {_FROM_FILE: True, "base_dir": base_dir}


def from_file(info: ValidationInfo) -> bool:
    """Whether the value being validated comes from a config document (not an API body)."""
    return bool(info.context and info.context.get(_FROM_FILE))


def env_name(value: str) -> bool:
    """Whether ``value`` can be an environment variable's name."""
    return ENV_NAME.fullmatch(value) is not None


def expand_env(value: str, info: ValidationInfo) -> str:
    """``${VAR}`` / ``$VAR`` expanded in a value from the config file; anything else as written.

    An unset variable is an error naming it, so a typo never reaches a camera or broker as a literal."""
    if not from_file(info):
        return value
    expanded = os.path.expandvars(value)
    unset = _VAR.search(expanded)
    if unset:
        raise ValueError(f"environment variable {unset.group(1)} is not set; export it or write the value")
    return expanded


def config_path(path: Path, info: ValidationInfo) -> Path:
    """A path from the config file with ``${VAR}`` and ``~`` expanded and, when relative, taken relative
    to the config file's folder; a path from an API body as written."""
    if not from_file(info):
        return path
    path = Path(os.path.expanduser(expand_env(str(path), info)))
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path
