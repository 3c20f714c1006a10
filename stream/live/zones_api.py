"""The privacy-zone routes of the control API: read and replace a stream's zones while it runs.

``PUT /api/streams/{id}/zones`` replaces the whole set (an empty list removes them); the next
frame the stream publishes is painted with the new zones. The body is checked by the same model
as the config file, so a bad polygon is refused with the same words, and nothing changes.
A new set is painted first and then saved (:mod:`stream.live.zone_store`) so it outlives a restart.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from pydantic import Field, ValidationError, field_validator

from stream.config import format_errors
from stream.config.base import ConfigModel
from stream.config.privacy import ZoneConfig, check_zones
from stream.live.api import PIPE, USER, _Bad, _json_body, audit, error

log = logging.getLogger(__name__)

class ZonesBody(ConfigModel):
    """What PUT takes: the whole new set of a stream's zones."""

    zones: list[ZoneConfig] = Field(description="the stream's zones; an empty list removes them all")

    @field_validator("zones")
    @classmethod
    def _count(cls, v: list[ZoneConfig]) -> list[ZoneConfig]:
        return check_zones(v)


def zones_json(zones: list[ZoneConfig]) -> list[dict[str, Any]]:
    return [z.model_dump(mode="json") for z in zones]


async def get_zones(request: web.Request) -> web.Response:
    sid = request.match_info["stream_id"]
    runner = request.app[PIPE].streams.get(sid)
    if runner is None:
        return error(404, f"no stream {sid!r}; GET /api/streams lists them")
    return web.json_response({"zones": zones_json(runner.config.zones)})


async def put_zones(request: web.Request) -> web.Response:
    sid = request.match_info["stream_id"]
    runner = request.app[PIPE].streams.get(sid)
    if runner is None:
        return error(404, f"no stream {sid!r}; GET /api/streams lists them")
    try:
        body = await _json_body(request, 'the zones: {"zones": [{"kind": "mask", "points": [[x, y], ...]}]}')
    except _Bad as e:
        return error(e.status, str(e))
    try:
        zones = ZonesBody.model_validate(body).zones
    except ValidationError as e:
        details = format_errors(e).split("\n  ")
        return error(400, f"invalid zones: {'; '.join(details)}", details=details)
    # painted first: hiding more is never the wrong way to fail; then kept for the next start
    old = runner.set_zones(zones)
    log.info("stream %s: %d privacy zone(s) set (were %d)", sid, len(zones), len(old))
    user = request.get(USER)
    audit(request, "audit.zones.changed", stream_id=sid, old=zones_json(old), new=zones_json(zones))
    store = request.app[PIPE].zone_store
    try:
        await asyncio.to_thread(store.save, runner.config, zones, runner.configured_zones,
                                user.name if user is not None else None)
    except OSError as e:
        log.error("stream %s: zones applied but not saved to %s (%s); they are lost on restart", sid,
                  store.folder, e.strerror)
        return error(507, f"zones applied but not saved ({e.strerror} in {store.folder}): they are lost when "
                          "the service restarts; make api.zones_dir writable and PUT them again")
    return web.json_response({"zones": zones_json(zones)})


def add_zone_routes(app: web.Application) -> None:
    app.router.add_get("/api/streams/{stream_id}/zones", get_zones)
    app.router.add_put("/api/streams/{stream_id}/zones", put_zones)
