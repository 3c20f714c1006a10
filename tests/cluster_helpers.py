"""Cluster-mode members for tests and the failover benchmark: real `stream-redact run` processes."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from kafka_broker import Broker

TOKEN = "cluster-test-token-0123456789"


class Member:
    """One `stream-redact run` process of the cluster, with its own HTTP port."""

    def __init__(self, folder: Path, name: str, doc: dict[str, Any], args: tuple[str, ...] = ()) -> None:
        """``args``: more options of `run` (``--workers 2``: a member of worker processes)."""
        self.name = name
        self.args = args
        self.config = folder / f"{name}.yaml"
        self.events = folder / f"{name}.events.jsonl"
        events = {**doc.get("events", {}), "sink": "jsonl", "jsonl": {"path": str(self.events)}}
        # port 0: the member binds a free port itself and says which (a port picked here could be
        # taken by some outgoing connection before the member binds it)
        self.config.write_text(yaml.safe_dump({**doc, "http": {"port": 0}, "events": events}))
        self._port: int | None = None
        self._log_from = 0
        self.log = folder / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        """The HTTP port this run of the member listens on (9, where nothing answers, until it says)."""
        if self._port is None and self.log.exists():
            text = self.log.read_bytes()[self._log_from:].decode("utf-8", "replace")
            found = re.search(r"metrics at http://[^\s/]+:(\d+)/metrics", text)
            if found:
                self._port = int(found.group(1))
        return self._port or 9

    def start(self) -> Member:
        self._port = None
        self._log_from = self.log.stat().st_size if self.log.exists() else 0
        env = {**os.environ, "CLUSTER_TEST_TOKENS": TOKEN}
        with self.log.open("ab") as out:
            cmd = [sys.executable, "-m", "stream.cli", *(["-v"] if os.environ.get("CLUSTER_DEBUG") else []),
                   "run", "--config", str(self.config), *self.args]
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    def streams(self) -> set[str] | None:
        """The streams running here (None: the member does not answer)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/streams",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return {s["id"] for s in json.loads(r.read())["streams"]}
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def published(self) -> dict[str, int] | None:
        """Frames published so far by each stream running here (None: the member does not answer)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/streams",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return {s["id"]: int(s.get("published") or 0) for s in json.loads(r.read())["streams"]}
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    @property
    def member_id(self) -> str:
        """The name the member goes by in the members topic and in stream.moved events."""
        assert self.proc is not None
        return f"{socket.gethostname()}-{self.proc.pid}"

    def emitted(self, event_type: str) -> list[dict[str, Any]]:
        """The events of ``event_type`` this member wrote so far."""
        if not self.events.exists():
            return []
        out = []
        for line in self.events.read_text().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue  # a line being written
            if doc.get("type") == event_type:
                out.append(doc)
        return out

    def raw(self, method: str, path: str, token: str | None = TOKEN) -> tuple[int, dict[str, str], Any]:
        """One request, redirects not followed: (status, headers, JSON body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
            r = conn.getresponse()
            body = r.read()
            return r.status, dict(r.getheaders()), json.loads(body or b"null")
        finally:
            conn.close()

    def metric(self, name: str) -> float | None:
        """A metric's value from this member's /metrics (None: absent or no answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except (OSError, urllib.error.URLError):
            return None
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def cluster_doc(broker: Broker, clip: Path, streams: list[str]) -> dict[str, Any]:
    return {
        "streams": [{"id": s, "source": {"type": "file", "path": str(clip), "loop": True}} for s in streams],
        "detection": {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"],
                      "warmup": False},
        "auth": {"tokens_env": "CLUSTER_TEST_TOKENS"},
        "events": {"sink": "none", "kafka": {"bootstrap_servers": broker.bootstrap}},
        "cluster": {"mode": "kafka", "partitions": 16, "session_timeout_s": 6},
    }


def placement(ms: list[Member]) -> Counter[str] | None:
    """How many members run each stream; None while one of the live members does not answer."""
    seen: Counter[str] = Counter()
    for m in ms:
        got = m.streams()
        if got is None:
            return None
        seen.update(got)
    return seen


def each_once(ms: list[Member], ids: list[str]) -> bool:
    seen = placement(ms)
    return seen is not None and sorted(seen) == sorted(ids) and all(n == 1 for n in seen.values())
