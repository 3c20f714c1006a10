"""Bearer tokens for the control API, WHIP and WHEP: loaded once, compared in constant time.

Tokens come from an environment variable (comma-separated) and/or a file (one per line, ``#``
comments), never from the YAML itself, so a config file can be shared without its secrets.
With no token configured the protected routes refuse every request (and say how to configure
one); ``--insecure-no-auth`` opens them for a local demo and is logged loudly.
"""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from stream.core.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_ENV = "STREAM_REDACT_TOKENS"


@dataclass(frozen=True)
class Tokens:
    values: tuple[bytes, ...] = field(default=(), repr=False)
    insecure: bool = False

    @property
    def configured(self) -> bool:
        return bool(self.values) or self.insecure

    def check(self, header: str | None) -> str | None:
        """None when ``header`` (an Authorization value) is acceptable, else why not."""
        if self.insecure:
            return None
        if not self.values:
            return (f"the control API is disabled: no token is configured; set {DEFAULT_ENV} or "
                    "auth.tokens_file (or run with --insecure-no-auth for a local demo)")
        if not header:
            return "missing token: send 'Authorization: Bearer <token>'"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "malformed Authorization header: use 'Authorization: Bearer <token>'"
        given = token.strip().encode()
        ok = False
        for t in self.values:  # compare against every token so timing says nothing about which
            ok |= hmac.compare_digest(given, t)
        return None if ok else "invalid token"


def load_tokens(env: str = DEFAULT_ENV, path: Path | None = None, insecure: bool = False) -> Tokens:
    values: list[str] = []
    raw = os.environ.get(env, "")
    values += [t.strip() for t in raw.split(",") if t.strip()]
    if path is not None:
        try:
            text = path.read_text()
        except OSError as e:
            raise UserError(f"auth.tokens_file {path}: {e.strerror}; give a readable file with one token "
                            "per line", exit_code=2) from None
        values += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    short = [t for t in values if len(t) < 16]
    if short:
        raise UserError(f"{len(short)} API token(s) shorter than 16 characters; use long random tokens "
                        "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)", exit_code=2)
    if insecure:
        log.warning("--insecure-no-auth: the control API, WHIP and WHEP accept requests WITHOUT a token; "
                    "use this for a local demo only, never on a network")
    elif not values:
        log.warning("no API token configured (%s or auth.tokens_file): the control API is disabled", env)
    return Tokens(tuple(v.encode() for v in values), insecure)
