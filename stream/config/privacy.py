"""A stream's privacy settings beyond faces and plates: fixed zones and the extra classes it masks.

Zones are polygons in fractions of the picture (0..1), so one outline fits every resolution the
camera sends; they are checked here (inside the picture, not crossing themselves, with an area)
so a bad polygon is refused when the config is loaded or the API is called, never at paint time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, TypeAdapter, ValidationError, field_validator

from stream.config.base import ConfigModel
from stream.core.errors import UserError
from stream.core.zones import MAX_POINTS, MAX_ZONES, Zone, ZoneSet, polygon_problem

OPTIONAL_LABELS = frozenset({"screen", "person"})
"""labels a stream masks only when its ``privacy`` settings ask for them"""


class ZoneConfig(ConfigModel):
    """One privacy zone."""

    kind: Literal["mask", "only"] = Field(
        "mask", description="mask: always painted over; only: everything OUTSIDE the stream's only-zones "
        "is painted over")
    points: list[tuple[float, float]] = Field(
        description=f"the polygon's corners in order, [x, y] each as a fraction of the picture's width and "
        f"height (0..1); 3 to {MAX_POINTS} points, not crossing itself")
    name: str = Field("", max_length=64, description="a label for people (e.g. 'neighbour's garden')")

    @field_validator("points")
    @classmethod
    def _polygon(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        why = polygon_problem(v)
        if why is not None:
            raise ValueError(why)
        return v


class PrivacyConfig(ConfigModel):
    """Which classes of the person/vehicle model a stream masks besides faces and plates."""

    screens: bool = Field(False, description="mask screens (TVs, laptops, phones: COCO tv, laptop, cell "
                          "phone) so what they show is never visible")
    persons: bool = Field(False, description="mask whole persons (body boxes), for strict sites; faces "
                          "and heads are masked either way")

    @property
    def labels(self) -> frozenset[str]:
        """The detection labels this adds to what is painted."""
        return frozenset({"screen"} if self.screens else set()) | frozenset(
            {"person"} if self.persons else set())


def check_zones(zones: list[ZoneConfig]) -> list[ZoneConfig]:
    if len(zones) > MAX_ZONES:
        raise ValueError(f"at most {MAX_ZONES} zones per stream, got {len(zones)}; merge neighbouring ones")
    return zones


_ZONES = TypeAdapter(list[ZoneConfig])


def zone_set(zones: list[ZoneConfig]) -> ZoneSet:
    """The painter for ``zones``."""
    return ZoneSet(tuple(Zone(z.kind, tuple((float(x), float(y)) for x, y in z.points), z.name)
                         for z in zones))


def load_zones(path: Path) -> ZoneSet:
    """The zones of a YAML or JSON file (a list of zones, or ``{zones: [...]}``), checked as the
    config checks them; a :class:`UserError` names the bad point and the fix."""
    from stream.config import format_errors

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"--zones {path}: {e.strerror}; give a readable YAML or JSON file",
                        exit_code=2) from None
    except yaml.YAMLError as e:
        raise UserError(f"--zones {path}: not YAML or JSON ({str(e).splitlines()[0]})", exit_code=2) from None
    if isinstance(data, dict) and "zones" in data:
        data = data["zones"]
    try:
        zones = check_zones(_ZONES.validate_python(data))
    except ValidationError as e:
        raise UserError(f"--zones {path} is not valid:\n{format_errors(e)}", exit_code=2) from None
    except ValueError as e:
        raise UserError(f"--zones {path}: {e}", exit_code=2) from None
    return zone_set(zones)
