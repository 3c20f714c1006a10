"""Zones set through the API outlive a restart: one JSON file per stream in the state directory.

A zone drawn in the control room hides something that must stay hidden; if a restart brought the
config file's older zones back, the neighbour's garden would reappear without anyone noticing. So
every ``PUT /api/streams/{id}/zones`` is written here (atomically), and a stream that starts takes
the saved zones instead of its config's. The file also holds the digest of the config's zones at
the time: when the config's zones have been edited since, the config is the newer word and wins
(the saved file is set aside, logged). Removing a stream through the API forgets its zones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from stream.config import StreamConfig
from stream.config.privacy import ZoneConfig
from stream.core.durable import write_atomic

log = logging.getLogger(__name__)

_ZONES = TypeAdapter(list[ZoneConfig])


def zones_digest(zones: list[ZoneConfig]) -> str:
    """SHA-256 of zones as canonical JSON: what the config said when the API changed them."""
    doc = [z.model_dump(mode="json") for z in zones]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ZoneStore:
    """Saved API zones under ``folder`` (created on the first save)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, stream_id: str) -> Path:
        return self.folder / f"{stream_id}.json"  # stream ids are [A-Za-z0-9_.-], never a path

    def save(self, config: StreamConfig, zones: list[ZoneConfig], configured: list[ZoneConfig],
             user: str | None = None) -> None:
        """Keep ``zones`` for ``config``'s stream; ``configured`` are the config file's zones (the
        baseline a later config edit is compared with). OSError when it cannot be written."""
        self.folder.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {
            "stream_id": config.id, "saved_at": round(time.time(), 3), "by": user,
            "config_zones_sha256": zones_digest(configured),
            "zones": [z.model_dump(mode="json") for z in zones],
        }
        write_atomic(self.path(config.id), json.dumps(doc, indent=1).encode() + b"\n", mode=0o600)

    def forget(self, stream_id: str) -> None:
        try:
            self.path(stream_id).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("stream %s: its saved zones in %s could not be deleted (%s); they come back if a "
                      "stream of that id is added again", stream_id, self.path(stream_id), e.strerror)

    def restore(self, config: StreamConfig) -> StreamConfig:
        """``config`` with the zones saved for it, when there are any and its own zones have not
        changed since they were saved; else ``config`` as it is."""
        path = self.path(config.id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return config
        except OSError as e:
            log.error("stream %s: saved zones %s cannot be read (%s); the config's %d zone(s) apply. Fix the "
                      "file's permissions, or delete it and set the zones again", config.id, path, e.strerror,
                      len(config.zones))
            return config
        try:
            doc = json.loads(raw)
            zones = _ZONES.validate_python(doc["zones"])
            baseline = str(doc["config_zones_sha256"])
        except (ValueError, KeyError, TypeError, ValidationError) as e:
            log.error("stream %s: saved zones %s are damaged (%s); the config's %d zone(s) apply. Delete "
                      "the file and set the zones again", config.id, path, type(e).__name__,
                      len(config.zones))
            return config
        if baseline != zones_digest(config.zones):
            aside = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            try:
                path.rename(aside)
            except OSError:
                aside = path
            log.warning("stream %s: its zones in the config changed after zones were set through the API; "
                        "the config's %d zone(s) apply (the API's are kept in %s)", config.id,
                        len(config.zones), aside)
            return config
        log.info("stream %s: %d zone(s) set through the API%s restored from %s", config.id, len(zones),
                 f" by {doc['by']}" if doc.get("by") else "", path)
        return config.model_copy(update={"zones": zones})
