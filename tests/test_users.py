"""Named users with roles through the real HTTP app: what each role may call, the users file and its
command, expired and wrong tokens, the reverse-proxy header from trusted and untrusted addresses, and
the address the front of ``run --workers N`` vouches for."""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from live_helpers import Served

from stream.cli import main
from stream.config import ProxyAuthConfig, parse_config
from stream.core.errors import UserError
from stream.live import auth, users
from stream.live.auth import ROUTES, Authenticator, Tokens, UserStore, load_auth
from stream.live.front import Child, start_front

SHARED = "shared-admin-token-0123456789"
NAMES = {"viewer": "vera", "operator": "otto", "admin": "ada"}
OFFER = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
"""not a usable offer: a request that passes auth gets 400 or 404 from the route, never 401/403"""


@pytest.fixture
def people(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A users file with one user per role; their tokens by role."""
    path = tmp_path / "users.jsonl"
    tokens = {role: users.add(path, name, role)[1] for role, name in NAMES.items()}
    return path, tokens


@pytest.fixture
async def served(people: tuple[Path, dict[str, str]]) -> AsyncIterator[Served]:
    authn = Authenticator(Tokens((SHARED.encode(),)), UserStore(people[0], recheck_s=0))
    s = await Served().start(authn)
    yield s
    await s.stop()


# (method, path, body, what the route is called in a refusal, the least role)
CASES = [
    ("GET", "/api/streams", None, "/api/streams", "viewer"),
    ("GET", "/api/streams/nope", None, "/api/streams/{stream_id}", "viewer"),
    ("GET", "/api/streams/nope/zones", None, "/api/streams/{stream_id}/zones", "viewer"),
    ("POST", "/whep/nope", OFFER, "/whep/{stream_id}", "viewer"),
    ("DELETE", "/whep/nope/some-session", None, "/whep/{stream_id}/{session}", "viewer"),
    ("POST", "/api/streams", {"id": "bad id"}, "/api/streams", "operator"),
    ("DELETE", "/api/streams/nope", None, "/api/streams/{stream_id}", "operator"),
    ("PUT", "/api/streams/nope/zones", {"zones": []}, "/api/streams/{stream_id}/zones", "operator"),
    ("POST", "/whip/nope", OFFER, "/whip/{stream_id}", "operator"),
    ("DELETE", "/whip/nope/some-session", None, "/whip/{stream_id}/{session}", "operator"),
    ("GET", "/api/audit", None, "/api/audit", "admin"),
    ("GET", "/api/not-a-route", None, "/api/not-a-route", "admin"),  # unlisted: admin only (fail closed)
]


async def test_each_role_may_call_its_routes_and_is_refused_the_others(
        served: Served, people: tuple[Path, dict[str, str]]) -> None:
    _, tokens = people
    rank = users.ROLES.index
    for method, path, body, route, needed in CASES:
        for role, token in tokens.items():
            kw = {"sdp": body} if isinstance(body, str) else {"body": body}
            status, doc, _ = await served.call(method, path, token, **kw)
            if rank(role) >= rank(needed):
                assert status not in (401, 403), (role, method, path, status, doc)
            else:
                assert status == 403, (role, method, path, status, doc)
                assert doc == {"error": f"user {NAMES[role]!r} ({role}) may not {method} {route}: "
                                        f"needs role {needed}"}
    # the shared tokens act as admin
    assert (await served.call("GET", "/api/audit", SHARED))[0] == 404  # allowed; no audit log configured


async def test_operator_adds_and_removes_a_stream(served: Served,
                                                  people: tuple[Path, dict[str, str]]) -> None:
    token = people[1]["operator"]
    cam = {"id": "door-1", "source": {"type": "rtsp", "url": "rtsp://cam:pw@127.0.0.1:9/x"}}
    assert (await served.call("POST", "/api/streams", token, body=cam))[0] == 201
    assert (await served.call("GET", "/api/streams/door-1", people[1]["viewer"]))[0] == 200
    assert (await served.call("DELETE", "/api/streams/door-1", people[1]["viewer"]))[0] == 403
    assert (await served.call("DELETE", "/api/streams/door-1", token))[0] == 204


async def test_every_protected_route_of_the_app_has_a_row(served: Served) -> None:
    listed = {(m, t) for m, t, _ in ROUTES}
    protected = ("/api/", "/whip/", "/whep/")
    routes = {(r.method, r.resource.canonical) for r in served.runner.app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith(protected)
              and r.method not in ("HEAD", "OPTIONS")}
    assert {("PUT", "/api/streams/{stream_id}/zones"), ("POST", "/whep/{stream_id}")} <= routes
    assert routes <= listed, routes - listed


async def test_missing_wrong_unknown_and_expired_tokens(served: Served,
                                                        people: tuple[Path, dict[str, str]]) -> None:
    path, tokens = people
    status, doc, headers = await served.call("GET", "/api/streams")
    assert status == 401 and "Bearer" in doc["error"] and "Bearer" in headers["WWW-Authenticate"]
    status, doc, _ = await served.call("GET", "/api/streams", "wrong-token-0123456789")
    assert (status, doc) == (403, {"error": "invalid token"})
    token_id, secret = tokens["viewer"].split(".")
    for bad in (f"{'0' * 16}.{secret}", f"{token_id}.{'x' * 43}"):  # unknown id; known id, wrong secret
        status, doc, _ = await served.call("GET", "/api/streams", bad)
        assert (status, doc) == (403, {"error": "invalid token"})
    entry, token = users.new_entry("old", "viewer", expires_days=1, now=1_700_000_000)
    users.write(path, [*users.read(path), entry])
    status, doc, headers = await served.call("GET", "/api/streams", token)
    assert status == 401 and "expired at 2023-11-15T22:13:20Z" in doc["error"]
    assert "stream-redact users add old --role viewer" in doc["error"]
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_users_file_changes_take_effect_and_a_broken_file_refuses_every_user(
        served: Served, people: tuple[Path, dict[str, str]]) -> None:
    path, tokens = people
    _, newcomer = users.add(path, "nina", "viewer")
    assert (await served.call("GET", "/api/streams", newcomer))[0] == 200
    users.remove(path, "nina")
    assert (await served.call("GET", "/api/streams", newcomer))[0] == 403
    good = users.read(path)
    path.write_text(path.read_text() + "{not json\n")
    assert (await served.call("GET", "/api/streams", tokens["admin"]))[0] == 403  # fail closed
    assert (await served.call("GET", "/api/streams", SHARED))[0] == 200  # the shared tokens still work
    with pytest.raises(UserError, match="line 4: not JSON"):
        users.remove(path, "vera")  # the command will not rewrite what it cannot read
    users.write(path, good)
    assert (await served.call("GET", "/api/streams", tokens["admin"]))[0] == 200


async def test_a_token_is_hashed_once_per_process(people: tuple[Path, dict[str, str]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path, tokens = people
    store = UserStore(path)
    calls: list[str] = []
    real = auth.check_secret
    monkeypatch.setattr(auth, "check_secret", lambda s, h: calls.append(h) or real(s, h))
    authn = Authenticator(users=store)
    for _ in range(5):
        user = await authn.authenticate({"Authorization": f"Bearer {tokens['operator']}"}, "127.0.0.1")
        assert user == users.User("otto", "operator", "users_file")
    assert len(calls) == 1


def test_users_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "users.jsonl"
    argv = ["users", "add", "alice", "--role", "viewer", "--file", str(path), "--expires-days", "30"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n" and users.split_token(token) is not None  # the token and nothing else
    assert "alice" in err and "only this once" in err and token not in err
    text = path.read_text()
    assert token.split(".")[1] not in text and "pbkdf2_sha256$" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (entry,) = users.read(path)
    assert (entry.name, entry.role) == ("alice", "viewer") and entry.expires is not None

    assert main(["users", "list", "--file", str(path)]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("alice\tviewer\texpires ") and "pbkdf2" not in listed and entry.id not in listed

    for argv, words in [
        (["users", "add", "alice", "--role", "admin"], "exists already"),
        (["users", "add", "bad name", "--role", "admin"], "not a valid user name"),
        (["users", "add", "bob", "--role", "boss"], "unknown role 'boss'; use one of viewer, operator"),
        (["users", "remove", "nobody"], "no user 'nobody'"),
    ]:
        assert main([*argv, "--file", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("stream-redact: error: ") and words in err, err
    assert main(["users", "add", "bob", "--role", "admin", "--file", str(tmp_path / "no" / "u.jsonl")]) == 2
    assert "cannot write users file" in capsys.readouterr().err

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"auth: {{users_file: {path.name}}}\n")
    assert main(["users", "remove", "alice", "--config", str(cfg)]) == 0
    assert users.read(path) == []


def test_run_check_reads_the_users_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("auth: {users_file: missing.jsonl}\n")
    assert main(["run", "--config", str(cfg), "--check"]) == 2
    err = capsys.readouterr().err
    assert "users file" in err and "does not exist" in err and "stream-redact users add" in err


def proxy(trusted: str, **kw: str) -> ProxyAuthConfig:
    return ProxyAuthConfig(trusted=[trusted], role_header="X-Forwarded-Role", **kw)


@pytest.mark.parametrize(("headers", "status", "words"), [
    ({"X-Forwarded-User": "vera", "X-Forwarded-Role": "admin"}, 403, "user 'vera' (viewer)"),  # the file wins
    ({"X-Forwarded-User": "sso-op", "X-Forwarded-Role": "operator"}, 403, "user 'sso-op' (operator)"),
    ({"X-Forwarded-User": "sso-someone"}, 403, "user 'sso-someone' (viewer)"),  # default_role
    ({"X-Forwarded-User": "sso-op", "X-Forwarded-Role": "root"}, 403, "names no role"),
    ({"X-Forwarded-User": "two words"}, 403, "not hold a valid user name"),
    ({"X-Forwarded-User": "ada"}, 404, "no audit log"),  # admin in the users file: allowed
])
async def test_proxy_header_from_a_trusted_address(people: tuple[Path, dict[str, str]], headers: dict,
                                                   status: int, words: str) -> None:
    s = await Served().start(Authenticator(users=UserStore(people[0]), proxy=proxy("127.0.0.1/32")))
    try:
        got, doc, _ = await s.call("GET", "/api/audit", headers=headers)
        assert got == status and words in doc["error"], doc
    finally:
        await s.stop()


async def test_proxy_header_from_an_untrusted_address_is_refused(people: tuple[Path, dict[str, str]]) -> None:
    path, tokens = people
    s = await Served().start(Authenticator(users=UserStore(path), proxy=proxy("10.0.0.0/8")))
    try:
        status, doc, _ = await s.call("GET", "/api/streams", tokens["admin"],
                                      headers={"X-Forwarded-User": "ada"})
        assert status == 403 and "only from the reverse proxy" in doc["error"] and "127.0.0.1" in doc["error"]
        assert (await s.call("GET", "/api/streams", tokens["admin"]))[0] == 200  # no header: its token counts
    finally:
        await s.stop()


def test_only_the_fronts_secret_makes_a_worker_believe_its_peer_header() -> None:
    authn = Authenticator(front_secret="s" * 64)
    assert authn.peer("127.0.0.1", "192.0.2.7", "s" * 64) == "192.0.2.7"
    assert authn.peer("127.0.0.1", "192.0.2.7", "t" * 64) == "127.0.0.1"  # wrong secret
    assert authn.peer("10.0.0.9", "192.0.2.7", "s" * 64) == "10.0.0.9"  # not from loopback
    assert authn.peer("127.0.0.1", "not-an-address", "s" * 64) == "127.0.0.1"
    assert Authenticator().peer("127.0.0.1", "192.0.2.7", "s" * 64) == "127.0.0.1"  # no front


class OneWorker:
    def __init__(self, port: int) -> None:
        self.port = port

    def children(self) -> list[Child]:
        return [Child("worker-0", "worker", 0, self.port)]

    @property
    def worker_count(self) -> int:
        return 1

    def running(self, stream_id: str) -> int | None:
        return None


@pytest.mark.parametrize(("trusted", "status"), [("127.0.0.5/32", 404), ("127.0.0.1/32", 403)])
async def test_behind_the_front_the_proxy_check_sees_the_callers_address(
        people: tuple[Path, dict[str, str]], trusted: str, status: int) -> None:
    """The caller connects from 127.0.0.5; the front forwards from 127.0.0.1: only the caller's address
    may make the proxy header count."""
    secret = "f" * 64
    authn = Authenticator(users=UserStore(people[0]), proxy=proxy(trusted), front_secret=secret)
    worker = await Served().start(authn)
    port = int(worker.base.rsplit(":", 1)[1])
    front, front_port = await start_front(OneWorker(port), "127.0.0.1", 0, peer_secret=secret)
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.5", 0))
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            spoof = {auth.PEER_HEADER: "127.0.0.5", auth.FRONT_HEADER: "guess", "X-Forwarded-User": "ada"}
            async with http.get(f"http://127.0.0.1:{front_port}/api/streams/x", headers=spoof) as r:
                doc = await r.json()
                assert r.status == status, doc
    finally:
        await front.cleanup()
        await worker.stop()


def test_load_auth_reads_everything_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USERS_TEST_TOKENS", "aaaaaaaaaaaaaaaaaaaa,bbbbbbbbbbbbbbbbbbbb")
    path = tmp_path / "u.jsonl"
    users.add(path, "vera", "viewer")
    cfg = parse_config({"auth": {"tokens_env": "USERS_TEST_TOKENS", "users_file": str(path),
                                 "proxy": {"trusted": ["10.0.0.0/8"]}}})
    authn = load_auth(cfg.auth)
    assert authn.tokens.match(b"bbbbbbbbbbbbbbbbbbbb") == 1
    assert authn.users is not None and len(authn.users) == 1
    assert authn.proxy is not None and authn.proxy.header == "X-Forwarded-User"
    with pytest.raises(Exception, match="trusted"):
        parse_config({"auth": {"proxy": {"trusted": ["not a network"]}}})
    with pytest.raises(Exception, match="cannot carry the user name"):
        parse_config({"auth": {"proxy": {"trusted": ["10.0.0.0/8"], "header": "Authorization"}}})


def test_user_entries_never_show_the_secret(people: tuple[Path, dict[str, str]]) -> None:
    path, tokens = people
    entries = users.read(path)
    assert all(t.split(".")[1] not in path.read_text() for t in tokens.values())
    assert all(t.split(".")[1] not in repr(e) for t in tokens.values() for e in entries)
    assert json.loads(path.read_text().splitlines()[0])["hash"].count("$") == 3
