"""The configuration reference (docs/configuration.md), generated from the pydantic models.

Why generated: the models already carry every key, type, bound, default and description, and they
are what ``stream-redact run --check`` validates against; a hand-written table drifts from them.
The walk starts at ``PipelineConfig`` and follows whatever fields and nested models it finds, so a
renamed class or a new field needs no change here, only a regenerated page:

    python -m stream.config.reference > docs/configuration.md

The output is deterministic: a default that depends on the machine (a path under the home or
working directory, or a factory whose value changes with the environment, such as the state
directory) is not printed; its description says what it is.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import sys
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from stream.config import PipelineConfig

COMMAND = "python -m stream.config.reference > docs/configuration.md"
MACHINE_SPECIFIC = "depends on the machine (see description)"
_MiB = 1 << 20
_UNITS = ((1 << 40, "TiB"), (1 << 30, "GiB"), (_MiB, "MiB"))
_ENV_PROBE = ("HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR",
              "STATE_DIRECTORY", "CACHE_DIRECTORY", "TMPDIR", "USER")


@dataclass
class _Row:
    key: str
    type: str
    default: str
    description: str
    children: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """(link text, section title) of the sections that describe this key's value"""


@dataclass
class _Section:
    path: str
    title: str
    intro: str
    depth: int
    rows: list[_Row]


# ---------------------------------------------------------------------------- types


def _strip(ann: Any) -> tuple[Any, list[Any]]:
    """The annotation without ``Annotated[...]``, and the metadata that wrapped it."""
    meta: list[Any] = []
    while get_origin(ann) is typing.Annotated:
        ann, *extra = get_args(ann)
        meta.extend(extra)
    return ann, meta


def _is_union(ann: Any) -> bool:
    return get_origin(ann) in (typing.Union, types.UnionType)


def _without_none(ann: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (ann, False)."""
    ann, meta = _strip(ann)
    if _is_union(ann):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) < len(get_args(ann)):
            rest = args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
            return (typing.Annotated[rest, *meta] if meta else rest), True
    return (typing.Annotated[ann, *meta] if meta else ann), False


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _model_union(ann: Any) -> list[type[BaseModel]] | None:
    """The members of a union whose members are all models, else None."""
    ann, _ = _strip(ann)
    if _is_union(ann):
        members = [_strip(a)[0] for a in get_args(ann)]
        if members and all(_is_model(m) for m in members):
            return members
    return None


def _discriminator(field: FieldInfo | None, meta: list[Any]) -> str | None:
    for source in (field, *meta):
        disc = getattr(source, "discriminator", None)
        if isinstance(disc, str):
            return disc
    return None


def _tag(model: type[BaseModel], disc: str | None, index: int) -> str:
    """What the config writes to pick this union member (``type: rtsp``), never a class name."""
    if disc and disc in model.model_fields:
        ann, _ = _strip(model.model_fields[disc].annotation)
        if get_origin(ann) is Literal and len(get_args(ann)) == 1:
            return f"{disc}: {get_args(ann)[0]}"
    return f"variant {index + 1}"


def _code(value: Any) -> str:
    return f"`{value}`"


def _type_name(ann: Any) -> str:
    ann, _ = _strip(ann)
    inner, optional = _without_none(ann)
    if optional:
        return _type_name(inner)
    if ann is Any:
        return "any"
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return _code(args[0]) if len(args) == 1 else "one of " + ", ".join(_code(a) for a in args)
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return "one of " + ", ".join(_code(m.value) for m in ann)
    if _is_model(ann):
        return "section"
    if _model_union(ann):
        return "section (one of several kinds)"
    if _is_union(ann):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, set, frozenset, tuple) or (isinstance(origin, type) and issubclass(origin, list)):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "[" + ", ".join(_type_name(a) for a in args) + "]"
        item = _type_name(args[0]) if args else "any"
        return f"list, each {item}" if item.startswith("one of") else f"list of {item}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "mapping"
    if isinstance(ann, type) and issubclass(ann, PurePath):
        return "path"
    names = {bool: "bool", int: "int", float: "float", str: "string"}
    return names.get(ann) or getattr(ann, "__name__", str(ann))


def _number(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() and abs(v) >= 1e3 else str(v)


def _bounds(field: FieldInfo, ann: Any) -> str:
    """The limits pydantic enforces on a value, in words: ``1 to 256``, ``over 0``, ``1-249 characters``."""
    meta = list(field.metadata) + _strip(ann)[1]
    get = {k: getattr(m, k) for m in meta for k in ("gt", "ge", "lt", "le", "min_length", "max_length",
                                                    "pattern") if getattr(m, k, None) is not None}
    parts = []
    lo = ("at least ", get["ge"]) if "ge" in get else ("over ", get["gt"]) if "gt" in get else ("", None)
    hi = ("at most ", get["le"]) if "le" in get else ("under ", get["lt"]) if "lt" in get else ("", None)
    if "ge" in get and "le" in get:
        parts.append(f"{_number(lo[1])} to {_number(hi[1])}")
    else:
        parts.extend(f"{words}{_number(v)}" for words, v in (lo, hi) if words)
    base, _ = _without_none(ann)
    unit = "items" if get_origin(_strip(base)[0]) in (list, tuple, set) else "characters"
    if "min_length" in get and "max_length" in get:
        parts.append(f"{get['min_length']}-{get['max_length']} {unit}")
    elif "min_length" in get:
        parts.append(f"at least {get['min_length']} {'item' if unit == 'items' else 'character'}"
                     + ("s" if get["min_length"] != 1 else ""))
    elif "max_length" in get:
        parts.append(f"at most {get['max_length']} {unit}")
    if "pattern" in get:
        parts.append(f"matching `{get['pattern']}`")
    return ", ".join(parts)


# ---------------------------------------------------------------------------- defaults


@contextmanager
def _other_machine() -> Iterator[None]:
    """The environment of an imaginary other machine, to see which default factories depend on it."""
    saved = {k: os.environ.get(k) for k in _ENV_PROBE}
    try:
        for k in _ENV_PROBE:
            os.environ[k] = f"/nonexistent-reference-probe/{k.lower()}"
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _yaml(value.value)
    if isinstance(value, int):
        for size, unit in _UNITS:
            if value >= size and value % size == 0:
                return f"{value} ({value // size} {unit})"
        return str(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return "[" + ", ".join(_yaml(v) for v in items) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in sorted(value.items(), key=str)) + "}"
    return str(value)


def _machine_paths() -> list[str]:
    """Folders no default may name: a literal default never does, a computed one only on this machine."""
    paths = {str(Path.home()), os.getcwd()}
    return sorted((p for p in paths if p not in ("", "/")), key=len, reverse=True)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if field.default_factory is not None:
        with _other_machine():
            elsewhere = field.get_default(call_default_factory=True)
        if elsewhere != value:
            return MACHINE_SPECIFIC
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "see below"
    text = _yaml(value)
    if any(p in text for p in _machine_paths()):
        return MACHINE_SPECIFIC
    return _code(text)


# ---------------------------------------------------------------------------- the walk


def _doc(model: type[BaseModel]) -> str:
    """The model's own docstring (not one it inherits), as one paragraph."""
    doc = model.__dict__.get("__doc__") or ""
    return " ".join(doc.split())


def _cell(text: str) -> str:
    """Table-safe text: pipes escaped, and ``<x>`` outside code spans kept as text, not HTML."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _walk(model: type[BaseModel], path: str, title: str, intro: str, depth: int,
          out: list[_Section], ancestors: tuple[type[BaseModel], ...] = ()) -> None:
    section = _Section(path=path, title=title, intro=intro, depth=depth, rows=[])
    out.append(section)
    later: list[tuple[type[BaseModel], str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        ann, optional = _without_none(field.annotation)
        bare, meta = _strip(ann)
        item_path = key
        if get_origin(bare) is list and get_args(bare):
            bare, meta = _strip(get_args(bare)[0])
            item_path = f"{key}[]"
        listed = "list of sections" if item_path != key else "section"
        row = _Row(key=key, type="", default=_default(field), description=field.description or "")
        if _is_model(bare):
            row.description = row.description or _doc(bare).split(". ")[0].rstrip(".")
            row.type = listed
            later.append((bare, item_path, item_path, item_path))
        elif members := _model_union(bare):
            disc = _discriminator(field if item_path == key else None, meta)
            tags = [_tag(m, disc, i) for i, m in enumerate(members)]
            later.extend((m, item_path, f"{item_path} ({t})", t) for m, t in zip(members, tags, strict=True))
            row.type = f"{listed}, one of " + ", ".join(_code(t) for t in tags)
        else:
            row.type = _type_name(field.annotation)
            if bounds := _bounds(field, field.annotation):
                row.type += f", {bounds}"
        if optional and field.is_required():
            row.type += " or null"
        section.rows.append(row)
    for sub, sub_path, sub_title, label in later:
        if sub in ancestors or sub is model:
            continue  # a model that contains itself is described once
        row = next(r for r in section.rows if sub_path in (r.key, f"{r.key}[]"))
        row.children.append((label, sub_title))
        _walk(sub, sub_path, sub_title, _doc(sub), depth + 1, out, (*ancestors, model))


def sections(root: type[BaseModel] = PipelineConfig) -> list[_Section]:
    """Every model reachable from ``root``, parents before children, in field order."""
    out: list[_Section] = []
    _walk(root, "", "Top level", _doc(root), 0, out)
    return out


def _slug(title: str, seen: dict[str, int]) -> str:
    """The anchor GitHub gives a heading (lower case, punctuation dropped, spaces to dashes)."""
    base = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
    n = seen.get(base, 0)
    seen[base] = n + 1
    return base if n == 0 else f"{base}-{n}"


def render(root: type[BaseModel] = PipelineConfig) -> str:
    """The reference as Markdown: one table per section, keys written as paths (``streams[].source.url``)."""
    secs = sections(root)
    seen: dict[str, int] = {}
    anchors = {id(s): _slug(s.title, seen) for s in secs}
    by_title = {s.title: anchors[id(s)] for s in secs}
    lines = [
        "# Configuration reference",
        "",
        f"<!-- generated from the pydantic models in stream/config/ by `{COMMAND}`; do not edit -->",
        "",
        "Every key of the pipeline config (`stream-redact run --config FILE`), generated from the models "
        "that validate it, so this page and `stream-redact run --config FILE --check` always agree. "
        "Unknown keys are errors. A key written `streams[].source.url` is the `url` of the `source` of "
        "each entry of the `streams` list. \"unset\" means the key may be left out; the description says "
        "what happens then. Regenerate this page after changing a model:",
        "",
        "```sh",
        COMMAND,
        "```",
        "",
        "Sections:",
        "",
    ]
    for s in secs:
        lines.append(f"{'  ' * max(s.depth - 1, 0)}- [{s.title}](#{anchors[id(s)]})")
    for s in secs:
        lines += ["", f"{'#' * min(max(s.depth + 1, 2), 4)} {s.title}", ""]
        if s.intro:
            lines += [s.intro, ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for r in s.rows:
            desc = _cell(r.description)
            if r.children:
                links = ", ".join(f"[{label}](#{by_title[title]})" for label, title in r.children)
                desc = (desc + " " if desc else "") + f"(see {links})"
            lines.append(f"| `{r.key}` | {_cell(r.type)} | {_cell(r.default)} | {desc} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the reference to stdout (``> docs/configuration.md`` to regenerate the page)."""
    if argv is None:
        argv = sys.argv[1:]
    if argv:
        print(f"usage: {COMMAND}", file=sys.stderr)
        return 2
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
