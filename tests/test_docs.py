"""The README stays a short front page, every docs/ page is reachable from it, no relative link is
broken, and the configuration reference is exactly what the models generate."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from stream.config import reference
from stream.config.events import state_dir

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
FIRST_COMMANDS = (
    "bash deploy/setup.sh && .venv/bin/stream-redact demo",
    "bash deploy/setup.sh && .venv/bin/python -m pytest -q",
)
"""the two commands that work on a fresh machine; CI runs the second one"""

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(path: Path) -> list[str]:
    """Targets of the inline Markdown links of a file, code blocks and code spans left out."""
    text = _CODE.sub("", _FENCE.sub("", path.read_text()))
    return _LINK.findall(text)


def relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) and not target.startswith("#")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "README.md"]


def test_configuration_reference_is_generated_from_the_models() -> None:
    page = (DOCS / "configuration.md").read_text()
    assert page == reference.render(), (
        f"docs/configuration.md is out of date with the config models; regenerate it with "
        f"`{reference.COMMAND}`")


def test_readme_is_a_front_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines; move detail into docs/ and link it"


def test_every_docs_file_is_linked_from_the_readme() -> None:
    linked = {(README.parent / t.split("#")[0]).resolve() for t in links(README) if relative(t)}
    pages = sorted(p for p in DOCS.rglob("*") if p.is_file())
    assert pages, "docs/ is empty"
    missing = [str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked]
    assert not missing, f"not linked from README.md: {missing}"


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_that_exist(doc: Path) -> None:
    broken = [t for t in links(doc) if relative(t) and t.split("#")[0]
              and not (doc.parent / t.split("#")[0]).exists()]
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


def test_readme_opens_with_the_two_fresh_machine_commands() -> None:
    head = README.read_text().splitlines()[:8]
    found = [i for c in FIRST_COMMANDS for i, line in enumerate(head) if line.strip() == c]
    assert len(found) == 2 and found[0] < found[1], (
        f"the README's first lines must be the set-up + demo command and then the test command "
        f"(CI runs it): {FIRST_COMMANDS}")


# ----------------------------------------------------------------------------- the generator itself


class _Camera(BaseModel):
    """A camera."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["cam"]
    url: str = Field(description="where it is")


class _Recorder(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["rec"]
    keep_days: int = Field(7, ge=1, le=365, description="how long | why")


class _Root(BaseModel):
    model_config = ConfigDict(extra="forbid")
    devices: list[Annotated[_Camera | _Recorder, Field(discriminator="type")]] = Field(default_factory=list)
    state: str = Field(default_factory=lambda: str(state_dir() / "spool"),
                       description="spool/ in the state directory")
    cache: str = Field(default_factory=lambda: str(Path.home() / ".cache" / "x"), description="a cache")
    size: int = Field(1 << 30, description="bytes <per> device")


def test_reference_follows_the_live_models() -> None:
    page = reference.render(_Root)
    assert "| `devices[].url` | string | required | where it is |" in page
    assert "\n## devices[] (type: cam)\n" in page and "\n## devices[] (type: rec)\n" in page
    assert "A camera." in page, "a model's docstring introduces its section"
    assert "| `devices[].keep_days` | int, 1 to 365 | `7` | how long \\| why |" in page, "pipes are escaped"
    assert "`1073741824 (1 GiB)`" in page and "bytes &lt;per&gt; device" in page
    assert "_Camera" not in page and "_Root" not in page, "class names may change; keys are what users write"


def test_reference_never_prints_a_default_of_this_machine() -> None:
    page = reference.render(_Root)
    for row in ("`state`", "`cache`"):
        line = next(ln for ln in page.splitlines() if ln.startswith(f"| {row} "))
        assert reference.MACHINE_SPECIFIC in line, line
    assert str(Path.home()) not in page and str(state_dir()) not in page
