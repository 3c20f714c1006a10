"""Who may call the control API, WHIP and WHEP: users with roles, shared tokens, a trusted proxy.

Three ways in, checked in this order:

- a reverse proxy (SSO) in ``auth.proxy.trusted`` names the user in a header (``X-Forwarded-User``);
  that header from any other address is refused, never believed;
- a user's own token ``<id>.<secret>`` from the users file (:mod:`stream.live.users`), whose
  role is written there;
- a shared token from ``$STREAM_REDACT_TOKENS`` or ``auth.tokens_file`` (never the YAML itself),
  which acts as role admin under the name ``token-1``, ``token-2``, ... in their order.

With nothing configured the protected routes refuse every request (and say how to configure
one); ``--insecure-no-auth`` opens them for a local demo and is logged loudly. What each role may
do is the one table :data:`ROUTES`; a protected route missing from it needs admin.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stream.core.errors import UserError
from stream.live import users as users_file
from stream.live.users import ROLES, Entry, User, check_secret, split_token

if TYPE_CHECKING:
    from stream.config import AuthConfig, ProxyAuthConfig

log = logging.getLogger(__name__)

DEFAULT_ENV = "STREAM_REDACT_TOKENS"
PEER_HEADER = "X-Stream-Redact-Peer"
"""set by the front of ``run --workers N``: the address the request really came from"""
FRONT_HEADER = "X-Stream-Redact-Front"
"""the front's per-run secret, without which a worker ignores :data:`PEER_HEADER`"""

ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/api/streams", "viewer"),
    ("POST", "/api/streams", "operator"),
    ("GET", "/api/streams/{stream_id}", "viewer"),
    ("DELETE", "/api/streams/{stream_id}", "operator"),
    ("GET", "/api/streams/{stream_id}/zones", "viewer"),
    ("PUT", "/api/streams/{stream_id}/zones", "operator"),
    ("POST", "/whep/{stream_id}", "viewer"),
    ("DELETE", "/whep/{stream_id}/{session}", "viewer"),
    ("PATCH", "/whep/{stream_id}/{session}", "viewer"),
    ("POST", "/whip/{stream_id}", "operator"),
    ("DELETE", "/whip/{stream_id}/{session}", "operator"),
    ("PATCH", "/whip/{stream_id}/{session}", "operator"),
    ("GET", "/api/audit", "admin"),
)
"""(method, path template, least role) of every protected route; HEAD is GET. A new route gets
its role by a row here; a protected path not listed needs admin (fail closed)."""
DEFAULT_ROLE = "admin"


def _compile(template: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template)))


_ROUTES = [(method, _compile(template), template, role) for method, template, role in ROUTES]


def required_role(method: str, path: str) -> tuple[str, str]:
    """The least role for ``method path`` and the route as it may be shown (its template, so a
    WHEP session id in the path never reaches a message or the audit log)."""
    method = "GET" if method == "HEAD" else method
    for m, pattern, template, role in _ROUTES:
        if m == method and pattern.fullmatch(path):
            return role, template
    return DEFAULT_ROLE, path[:100]


@dataclass(frozen=True)
class Tokens:
    """The shared tokens (env and file), compared in constant time."""

    values: tuple[bytes, ...] = field(default=(), repr=False)
    insecure: bool = False

    @property
    def configured(self) -> bool:
        return bool(self.values) or self.insecure

    def match(self, given: bytes) -> int | None:
        """Index of the token ``given`` is, compared against every one so timing says nothing."""
        found = None
        for i, t in enumerate(self.values):
            if hmac.compare_digest(given, t):
                found = i
        return found

    def check(self, header: str | None) -> str | None:
        """None when ``header`` (an Authorization value) is acceptable, else why not."""
        if self.insecure:
            return None
        if not self.values:
            return disabled_message()
        token, why = bearer(header)
        if token is None:
            return why
        return None if self.match(token.encode()) is not None else "invalid token"


def disabled_message() -> str:
    return (f"the control API is disabled: no token is configured; set {DEFAULT_ENV}, auth.tokens_file or "
            "auth.users_file (or run with --insecure-no-auth for a local demo)")


def bearer(header: str | None) -> tuple[str | None, str]:
    """The token of an ``Authorization: Bearer`` value, or None and why it is not one."""
    if not header:
        return None, "missing token: send 'Authorization: Bearer <token>'"
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None, "malformed Authorization header: use 'Authorization: Bearer <token>'"
    return token.strip(), ""


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
    return Tokens(tuple(v.encode() for v in values), insecure)


Changes = Callable[[list[str], list[str], list[str]], None]
"""told (added, removed, role changed) user names when the users file changes at run time"""


class UserStore:
    """The users file, read again when it changes (looked at no more than every ``recheck_s``), so
    ``stream-redact users add/remove`` takes effect on a running server. A file that turns bad
    refuses every user token until it is fixed (fail closed), logged once."""

    CACHE = 1024

    def __init__(self, path: Path, recheck_s: float = 2.0) -> None:
        self.path, self.recheck_s = path, recheck_s
        self.on_change: list[Changes] = []
        self._lock = threading.Lock()
        self._by_id: dict[str, Entry] = {}
        self._by_name: dict[str, Entry] = {}
        self._stat: tuple[int, int, int] | None = None
        self._checked = 0.0
        self.problem: str | None = None
        self._verified: OrderedDict[bytes, str] = OrderedDict()
        """sha256 of a token that checked out -> the hash it matched: one PBKDF2 per token per process"""
        self._load(users_file.read(path), self._stat_of())

    def _stat_of(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _load(self, entries: list[Entry], stat: tuple[int, int, int] | None) -> None:
        old = self._by_name
        self._by_id = {e.id: e for e in entries}
        self._by_name = {e.name: e for e in entries}
        self._stat = stat
        if old is not self._by_name and self.on_change:
            added = sorted(set(self._by_name) - set(old))
            removed = sorted(set(old) - set(self._by_name))
            changed = sorted(n for n in set(old) & set(self._by_name)
                             if (old[n].role, old[n].id) != (self._by_name[n].role, self._by_name[n].id))
            if added or removed or changed:
                for cb in self.on_change:
                    cb(added, removed, changed)

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.recheck_s:
            return
        with self._lock:
            if now - self._checked < self.recheck_s:
                return
            self._checked = now
            stat = self._stat_of()
            if stat == self._stat and (stat is not None or self.problem is not None):
                return
            try:
                entries = users_file.read(self.path)
            except UserError as e:
                if self.problem != str(e):
                    log.error("%s; every user token is refused until it is fixed", e)
                self.problem = str(e)
                self._load([], stat)
                return
            if self.problem is not None:
                log.info("users file %s is readable again", self.path)
            self.problem = None
            self._load(entries, stat)
            log.info("users file %s read: %d user(s)", self.path, len(entries))

    def entry(self, token_id: str) -> Entry | None:
        return self._by_id.get(token_id)

    def named(self, name: str) -> Entry | None:
        return self._by_name.get(name)

    def __len__(self) -> int:
        return len(self._by_id)

    async def verify(self, entry: Entry, token: str, secret: str, cached_only: bool = False) -> bool:
        """Whether ``secret`` is ``entry``'s: from the cache, else (unless ``cached_only``) one PBKDF2
        off the event loop."""
        key = hashlib.sha256(token.encode()).digest()
        with self._lock:
            cached = self._verified.get(key)
        if cached is not None and hmac.compare_digest(cached, entry.hash):
            return True
        if cached_only:
            return False
        ok = await asyncio.to_thread(check_secret, secret, entry.hash)
        if ok:
            with self._lock:
                self._verified[key] = entry.hash
                while len(self._verified) > self.CACHE:
                    self._verified.popitem(last=False)
        return ok


@dataclass(frozen=True)
class Refusal:
    """A request turned away: the HTTP status and message, and what the audit log records."""

    status: int
    message: str
    reason: str
    claimed: str | None = None
    """the user name the request claimed (a proxy header, a user token's entry), never a token"""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def within(address: str | None, networks: list[Network]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


class Authenticator:
    """Turns a request's headers and peer address into a :class:`User`, or a :class:`Refusal`."""

    def __init__(self, tokens: Tokens | None = None, users: UserStore | None = None,
                 proxy: ProxyAuthConfig | None = None, front_secret: str | None = None) -> None:
        self.tokens = tokens or Tokens()
        self.users = users
        self.proxy = proxy
        self.trusted: list[Network] = [ipaddress.ip_network(n, strict=False) for n in proxy.trusted] \
            if proxy is not None else []
        self.front_secret = front_secret

    @property
    def insecure(self) -> bool:
        return self.tokens.insecure

    @property
    def configured(self) -> bool:
        return self.tokens.configured or self.users is not None or self.proxy is not None

    def peer(self, remote: str | None, peer_header: str | None, front_header: str | None) -> str | None:
        """The address a request came from: the front's word for it (``run --workers N``) only from
        loopback with the run's secret, else the TCP peer's."""
        if not (self.front_secret and peer_header and front_header):
            return remote
        local = _ip(remote)
        if (local is not None and local.is_loopback and _ip(peer_header) is not None
                and hmac.compare_digest(front_header.encode(), self.front_secret.encode())):
            return peer_header
        return remote

    async def authenticate(self, headers: Mapping[str, str], peer: str | None,
                           cached_only: bool = False) -> User | Refusal:
        """Who sent a request with ``headers`` (a case-insensitive mapping) from ``peer``;
        ``cached_only``: a user token is accepted only if it was verified before (no hashing: what a
        throttled address may still spend)."""
        get = headers.get
        if self.tokens.insecure:
            return User("anonymous", "admin", "insecure")
        if self.proxy is not None:
            claimed = get(self.proxy.header)
            if claimed is not None:
                return self._proxied(claimed, get, peer)
        if not self.configured:
            return Refusal(401, disabled_message(), "control API disabled")
        token, why = bearer(get("Authorization"))
        if token is None:
            return Refusal(401, why, why.split(":", 1)[0])
        if self.users is not None:
            self.users.refresh()
            parts = split_token(token)
            entry = self.users.entry(parts[0]) if parts is not None else None
            if entry is not None and parts is not None and await self.users.verify(entry, token, parts[1],
                                                                                   cached_only):
                if entry.expired():
                    return Refusal(401, f"the token of user {entry.name!r} expired at "
                                        f"{users_file.stamp(entry.expires or 0)}; an admin issues a new one "
                                        f"(`stream-redact users remove {entry.name}`, then `stream-redact "
                                        f"users add {entry.name} --role {entry.role}`)", "expired token",
                                   entry.name)
                return User(entry.name, entry.role, "users_file")
            claimed_name = entry.name if entry is not None else None
        else:
            claimed_name = None
        index = self.tokens.match(token.encode())
        if index is not None:
            return User(f"token-{index + 1}", "admin", "token")
        if self.users is not None and self.users.problem is not None and not self.tokens.values:
            return Refusal(401, "user tokens are refused until the server's users file is fixed (see its "
                                "log)", "users file unreadable", claimed_name)
        return Refusal(403, "invalid token", "invalid token", claimed_name)

    def _proxied(self, claimed: str, get: Callable[[str], str | None], peer: str | None) -> User | Refusal:
        proxy = self.proxy
        assert proxy is not None
        shown = claimed[:128]
        if not within(peer, self.trusted):
            return Refusal(403, f"the {proxy.header} header is accepted only from the reverse proxy "
                                f"(auth.proxy.trusted), not from {peer}; connect through the proxy",
                           "proxy header from an untrusted address", shown)
        if not users_file.NAME.fullmatch(claimed):
            return Refusal(403, f"{proxy.header} does not hold a valid user name; the proxy must send "
                                "1-128 letters, digits and '_.@+-'", "bad proxy user name", shown)
        entry = self.users.named(claimed) if self.users is not None else None
        if entry is not None:
            return User(claimed, entry.role, "proxy")
        if proxy.role_header:
            role = get(proxy.role_header)
            if role is not None:
                if role not in ROLES:
                    return Refusal(403, f"{proxy.role_header} names no role; the proxy must send one of "
                                        f"{', '.join(ROLES)}", "bad proxy role", shown)
                return User(claimed, role, "proxy")
        return User(claimed, proxy.default_role, "proxy")

    @staticmethod
    def authorize(user: User, method: str, path: str) -> Refusal | None:
        """None when ``user``'s role may call ``method path``; else a 403 naming the role needed."""
        needed, route = required_role(method, path)
        if user.may(needed):
            return None
        return Refusal(403, f"user {user.name!r} ({user.role}) may not {method} {route}: needs role {needed}",
                       f"needs role {needed}", user.name)


def load_auth(auth: AuthConfig, insecure: bool = False, front_secret: str | None = None) -> Authenticator:
    """Everything the config names for authentication, read now: a missing or bad file stops
    ``run`` before anything starts (UserError, exit 2)."""
    tokens = load_tokens(auth.tokens_env, auth.tokens_file, insecure)
    users = UserStore(auth.users_file) if auth.users_file is not None else None
    authn = Authenticator(tokens, users, auth.proxy, front_secret)
    if not insecure and not authn.configured:
        log.warning("no API token configured (%s, auth.tokens_file or auth.users_file): the control API "
                    "is disabled", auth.tokens_env)
    return authn
