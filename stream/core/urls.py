"""Stream URLs as they may be shown: credentials never reach logs, metrics or error messages.

User info is cut at the LAST ``@`` of the URL, not at the first ``/``: a password such as
``Sl/ash``, ``At@home`` or ``x#y`` written unencoded would otherwise be taken for part of the
path and shown. Masking more than needed (a path holding ``@``) is the safe error.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

_USERINFO = re.compile(r"(?<=://)[^\s'\"]*@")
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>:.,;)]")


def _userinfo(url: str) -> tuple[int, int] | None:
    """Start and end (the last ``@``) of the user info in ``url``, or None when it has none."""
    start = url.find("://")
    if start < 0:
        return None
    start += 3
    at = url.rfind("@", start)
    return (start, at) if at >= 0 else None


def mask_url(url: str) -> str:
    """``rtsp://user:pass@host/x`` -> ``rtsp://***@host/x``; query values are masked too."""
    span = _userinfo(url)
    masked = url if span is None else url[:span[0]] + "***" + url[span[1]:]
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


def secrets_of(url: str) -> list[str]:
    """The user name and password written in ``url`` (raw and percent-decoded), longest first."""
    span = _userinfo(url)
    if span is None:
        return []
    user, _, password = url[span[0]:span[1]].partition(":")
    found = {s for v in (user, password) for s in (v, unquote(v)) if len(s) >= 3}
    return sorted(found, key=len, reverse=True)


def mask_text(text: str, url: str) -> str:
    """Replace ``url`` and its credentials wherever they occur in ``text`` (e.g. an FFmpeg error)."""
    out = text.replace(url, mask_url(url))
    for secret in secrets_of(url):
        out = out.replace(secret, "***")
    return _USERINFO.sub("***@", out)


def origin(url: str) -> str:
    """``rtsp://user:pass@cam.example:8554/live?token=x`` -> ``rtsp://cam.example:8554``.

    What open endpoints (``/readyz``) and the control-room page may show: which server, never
    the path or query, which can carry a token or name more than the viewer needs."""
    span = _userinfo(url)
    rest = url if span is None else url[:span[0]] + url[span[1] + 1:]
    try:
        parts = urlsplit(rest)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return f"{rest.split('://', 1)[0]}://(unreadable host)"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def origins_only(text: str) -> str:
    """``text`` with every URL in it cut down to its :func:`origin`."""
    return _URL.sub(lambda m: origin(m.group(0)), text)
