"""Helpers for live-pipeline tests: detectors that misbehave on purpose, waiting on conditions."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stream.core.detections import Detections, FrameRef
from stream.core.metrics import Metrics, sample
from stream.live.service import serve


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``cond`` until true; fail with ``what`` after ``timeout`` seconds (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


class NoFaces:
    """A detector that looks at every frame and finds nothing."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, images: list[np.ndarray], refs: Sequence[FrameRef] | None = None) -> list[Detections]:
        self.batches.append(len(images))
        return [Detections(observed=frozenset({"face", "plate"})) for _ in images]


class Raises:
    def __call__(self, images: list[np.ndarray], refs: Sequence[FrameRef] | None = None) -> list[Detections]:
        raise RuntimeError("injected detector failure")


class Hangs:
    """Blocks until released (tests release it at teardown so no thread outlives them)."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.entered = threading.Event()

    def __call__(self, images: list[np.ndarray], refs: Sequence[FrameRef] | None = None) -> list[Detections]:
        self.entered.set()
        self.release.wait()
        return [Detections() for _ in images]


class Slow(NoFaces):
    """Takes ``seconds`` per batch: a detector slower than the cameras feeding it."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def __call__(self, images: list[np.ndarray], refs: Sequence[FrameRef] | None = None) -> list[Detections]:
        threading.Event().wait(self.seconds)  # the work this detector "does"
        return super().__call__(images, refs)


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return sample(metrics, f"stream_redact_{name}_total", **labels)


class ServiceThread:
    """`serve()` (what `stream-redact run` runs) on a thread with its own event loop, for tests that
    talk to it over real HTTP; ``detector_factory`` None uses the real detectors."""

    def __init__(self, config: Any, detector_factory: Callable[[], Any] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.listening = threading.Event()
        self.done = threading.Event()
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, args=(config, detector_factory), daemon=True)
        self.thread.start()
        assert self.listening.wait(60), "service did not start"
        self.base = f"http://127.0.0.1:{self.port}"

    def _run(self, config: Any, detector_factory: Callable[[], Any] | None) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.stop_event = asyncio.Event()

            def on_listen(port: int) -> None:
                self.port = port
                self.listening.set()

            await serve(config, detector_factory=detector_factory, stop=self.stop_event, on_listen=on_listen)

        try:
            self.loop.run_until_complete(main())
        finally:
            self.done.set()

    def stop(self) -> None:
        if self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        assert self.done.wait(30), "service did not stop"


class Served:
    """A pipeline (no streams unless ``config`` has some) with its WebRTC gateway and HTTP app, on the
    running event loop, as `stream-redact run` assembles them, with the given authenticator and audit log."""

    async def start(self, authn: Any, audit_log: Any = None, config: Any = None,
                    detector_factory: Callable[[], Any] = NoFaces) -> Served:
        import aiohttp

        from stream.config import parse_config
        from stream.live.http import start_http
        from stream.live.pipeline import Pipeline
        from stream.live.rtc import RtcGateway

        self.pipeline = Pipeline(config or parse_config({}), detector_factory)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.pipeline.start)
        self.gateway = RtcGateway(self.pipeline)
        self.runner, port = await start_http(self.pipeline, "127.0.0.1", 0, authn, gateway=self.gateway,
                                             audit_log=audit_log)
        self.base = f"http://127.0.0.1:{port}"
        self.http = aiohttp.ClientSession()
        return self

    async def call(self, method: str, path: str, token: str | None = None, headers: dict | None = None,
                   body: Any = None, sdp: str | None = None) -> tuple[int, Any, dict]:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {"json": body} if body is not None else {}
        if sdp is not None:
            kwargs = {"data": sdp.encode()}
            h["Content-Type"] = "application/sdp"
        async with self.http.request(method, self.base + path, headers=h, **kwargs) as r:
            text = await r.text()
            try:
                doc = await r.json(content_type=None) if text else None
            except ValueError:
                doc = text
            return r.status, doc, dict(r.headers)

    async def stop(self) -> None:
        await self.http.close()
        await self.gateway.close()
        await self.runner.cleanup()
        await asyncio.get_running_loop().run_in_executor(None, self.pipeline.stop, 5.0)
