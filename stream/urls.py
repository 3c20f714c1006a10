"""Stream URLs as they may be shown: credentials never reach logs, metrics or error messages."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def mask_url(url: str) -> str:
    """``rtsp://user:pass@host/x`` -> ``rtsp://***@host/x``; query tokens are masked too."""
    masked = _USERINFO.sub("***@", url)
    try:
        parts = urlsplit(masked)
    except ValueError:
        return masked
    if parts.query:
        query = "&".join(
            f"{kv.split('=', 1)[0]}=***" if "=" in kv else kv for kv in parts.query.split("&")
        )
        masked = urlunsplit(parts._replace(query=query))
    return masked


def mask_text(text: str, url: str) -> str:
    """Replace ``url`` and its credentials wherever they occur in ``text`` (e.g. an FFmpeg error)."""
    out = text.replace(url, mask_url(url))
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub("***@", out)
    for secret in (parts.password, parts.username):
        if secret and len(secret) >= 3:
            out = out.replace(secret, "***")
    return _USERINFO.sub("***@", out)
