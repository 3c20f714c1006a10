"""Named users with roles: the users file, its token hashes, and the roles' order.

A control room must be able to say who watched or changed what, which shared bearer tokens
cannot. Each user has a name, a role and a token of the form ``<id>.<secret>``: the id picks the
user's entry, so checking a token costs one hash, never one per user. The file holds only a
salted PBKDF2 hash of each secret (the secret has 256 random bits, so the hash guards a copied
file, not a guessable password; its iteration count is stored with it and can be raised).

The file is JSON Lines, one user per line, written whole to a temporary file, fsynced and renamed
over the old one (mode 0600), so a reader never sees half a file and a crash never loses it.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stream.core.durable import write_atomic
from stream.core.errors import UserError

ROLES = ("viewer", "operator", "admin")
"""lowest first: each role may do everything the ones before it may"""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}")
"""a user name (matched whole): also what a reverse proxy may send, e.g. an e-mail address"""
ITERATIONS = 60_000
SCHEME = "pbkdf2_sha256"
TOKEN = re.compile(r"([0-9a-f]{16})\.([A-Za-z0-9_-]{32,})")
"""``<id>.<secret>``: 16 hex digits, a dot, the URL-safe secret"""


def rank(role: str) -> int:
    """Where ``role`` stands in :data:`ROLES`; unknown roles rank below every real one."""
    return ROLES.index(role) if role in ROLES else -1


@dataclass(frozen=True)
class User:
    """Who made a request: ``via`` says how that was established (``users_file``, ``token`` for
    the shared tokens, ``proxy`` for a trusted reverse proxy's header, ``insecure``)."""

    name: str
    role: str
    via: str

    def may(self, role: str) -> bool:
        return rank(self.role) >= rank(role)


@dataclass(frozen=True)
class Entry:
    """One line of the users file."""

    name: str
    role: str
    id: str
    hash: str
    created: float
    expires: float | None = None

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (time.time() if now is None else now) >= self.expires

    def line(self) -> str:
        return json.dumps({"name": self.name, "role": self.role, "id": self.id, "hash": self.hash,
                           "created": stamp(self.created),
                           "expires": None if self.expires is None else stamp(self.expires)},
                          separators=(",", ":"))


def stamp(t: float) -> str:
    """Unix seconds as ``2030-01-31T00:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _unstamp(text: object, what: str) -> float:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a time like 2030-01-31T00:00:00Z")
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a time like 2030-01-31T00:00:00Z") from None


def hash_secret(secret: str, iterations: int = ITERATIONS) -> str:
    """``pbkdf2_sha256$iterations$salt$hash`` (salt and hash base64) of ``secret``."""
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)
    return f"{SCHEME}${iterations}${_b64(salt)}${_b64(digest)}"


def check_secret(secret: str, stored: str) -> bool:
    """Whether ``secret`` matches ``stored`` (compared in constant time); False for a bad hash."""
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        want = base64.b64decode(digest + "=" * (-len(digest) % 4), altchars=b"-_", validate=True)
        got = hashlib.pbkdf2_hmac("sha256", secret.encode(), base64.b64decode(
            salt + "=" * (-len(salt) % 4), altchars=b"-_", validate=True), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(got, want)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw, altchars=b"-_").decode().rstrip("=")


def split_token(token: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a user token, None when ``token`` is not shaped like one."""
    m = TOKEN.fullmatch(token)
    return (m.group(1), m.group(2)) if m else None


def new_entry(name: str, role: str, expires_days: float | None = None,
              now: float | None = None) -> tuple[Entry, str]:
    """A new user and its token (to be shown once, never stored)."""
    check_name(name)
    check_role(role)
    now = time.time() if now is None else now
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    expires = None if expires_days is None else now + expires_days * 86400
    return Entry(name, role, token_id, hash_secret(secret), now, expires), f"{token_id}.{secret}"


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise UserError(f"{name!r} is not a valid user name; use 1-128 letters, digits and '_.@+-', "
                        "starting with a letter or digit", exit_code=2)


def check_role(role: str) -> None:
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}; use one of {', '.join(ROLES)}", exit_code=2)


def parse(text: str, origin: str) -> list[Entry]:
    """The entries of a users file's text; UserError naming the line and the fix for a bad one."""
    entries: list[Entry] = []
    seen: set[str] = set()
    ids: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            name, role, token_id, hashed = doc.get("name"), doc.get("role"), doc.get("id"), doc.get("hash")
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise ValueError(f"bad name {name!r}")
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r} (use {', '.join(ROLES)})")
            if not isinstance(token_id, str) or not re.fullmatch(r"[0-9a-f]{16}", token_id):
                raise ValueError("bad id")
            if not isinstance(hashed, str) or not hashed.startswith(SCHEME + "$"):
                raise ValueError(f"hash is not a {SCHEME} hash")
            created = _unstamp(doc.get("created"), "created")
            expires = None if doc.get("expires") is None else _unstamp(doc["expires"], "expires")
        except ValueError as e:
            why = "not JSON" if isinstance(e, json.JSONDecodeError) else str(e)
            raise UserError(f"users file {origin}, line {n}: {why}; fix or remove that line, or rewrite it "
                            "with `stream-redact users remove/add`", exit_code=2) from None
        if name in seen or token_id in ids:
            raise UserError(f"users file {origin}, line {n}: user {name!r} or its id appears twice; "
                            "remove one of the lines", exit_code=2)
        seen.add(name)
        ids.add(token_id)
        entries.append(Entry(name, role, token_id, hashed, created, expires))
    return entries


def read(path: Path) -> list[Entry]:
    """The users in ``path``; UserError (exit 2) when it cannot be read or a line is bad."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"users file {path} does not exist; create it with `stream-redact users add NAME "
                        f"--role admin --file {path}`", exit_code=2) from None
    except OSError as e:
        raise UserError(f"cannot read users file {path}: {e.strerror}; check its permissions",
                        exit_code=2) from None
    except UnicodeDecodeError:
        raise UserError(f"users file {path} is not UTF-8 text; it is not a stream-redact users file",
                        exit_code=2) from None
    return parse(text, str(path))


def write(path: Path, entries: Iterable[Entry]) -> None:
    """Replace ``path`` with ``entries``: temp file (mode 0600) + fsync + rename + fsync of the folder."""
    body = "".join(e.line() + "\n" for e in entries).encode()
    try:
        write_atomic(path, body, mode=0o600)
    except OSError as e:
        raise UserError(f"cannot write users file {path}: {e.strerror}; choose a writable --file",
                        exit_code=2) from None


def add(path: Path, name: str, role: str, expires_days: float | None = None) -> tuple[Entry, str]:
    """Add a user to ``path`` (created if missing); returns the entry and its one-time token."""
    entries = read(path) if path.exists() else []
    check_name(name)
    check_role(role)
    if any(e.name == name for e in entries):
        raise UserError(f"user {name!r} exists already in {path}; remove it first (`stream-redact users "
                        f"remove {name} --file {path}`) to issue a new token", exit_code=2)
    entry, token = new_entry(name, role, expires_days)
    write(path, [*entries, entry])
    return entry, token


def remove(path: Path, name: str) -> Entry:
    entries = read(path)
    gone = [e for e in entries if e.name == name]
    if not gone:
        raise UserError(f"no user {name!r} in {path}; `stream-redact users list --file {path}` shows them",
                        exit_code=2)
    write(path, [e for e in entries if e.name != name])
    return gone[0]


def describe(entry: Entry, now: float | None = None) -> str:
    """A ``users list`` line: name, role, expiry; never the hash or id."""
    now = time.time() if now is None else now
    if entry.expires is None:
        expiry = "never expires"
    else:
        expiry = f"{'expired' if entry.expired(now) else 'expires'} {stamp(entry.expires)}"
    return f"{entry.name}\t{entry.role}\t{expiry}"
