"""Start and stop the loopback RTSP server (``rtsp_server.py``) from Python, and make clips for it.

The server runs under the system Python (``/usr/bin/python3`` by default) because GStreamer's
bindings come from the distribution and cannot be imported inside a virtual environment.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, NoReturn, Self
from urllib.parse import quote

SCRIPT = Path(__file__).with_name("rtsp_server.py")
SYSTEM_PYTHON = "/usr/bin/python3"
APT_PACKAGES = (
    "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad"
)
HOST = "127.0.0.1"
_PROBE = (
    "import gi\n"
    "for ns in ('Gst', 'GstApp', 'GstRtsp', 'GstRtspServer'): gi.require_version(ns, '1.0')\n"
    "from gi.repository import Gst, GstRtspServer\n"
)


@functools.cache
def gst_rtsp_available(python: str = SYSTEM_PYTHON) -> bool:
    """Whether `python` can import GStreamer's RTSP server bindings (what the server needs)."""
    try:
        done = subprocess.run([python, "-c", _PROBE], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class RtspServer:
    """A loopback RTSP server with looping camera mounts and publish/play relay mounts.

    `cameras` maps mount paths ("/cam1") to mp4 files with an H.264 track; `relays` lists paths
    where a publisher may ANNOUNCE/RECORD; `auth` (user, password) protects the camera mounts
    (`auth_method` "basic" or "digest"). `port` 0 picks a free port at the first start; `restart()`
    keeps it, so clients can reconnect to the same URL.
    """

    def __init__(
        self,
        cameras: dict[str, Path] | None = None,
        relays: list[str] | None = None,
        auth: tuple[str, str] | None = None,
        port: int = 0,
        *,
        auth_method: Literal["basic", "digest"] = "basic",
        python: str = SYSTEM_PYTHON,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 5.0,
        verbose: bool = False,
        media: dict[str, Path] | None = None,
    ) -> None:
        self.cameras = {path: Path(file) for path, file in (cameras or {}).items()}
        self.media = {path: Path(file) for path, file in (media or {}).items()}
        """mounts that play a file's video and audio once, from its start, for each reader"""
        self.relays = list(relays or [])
        self.auth = auth
        self.auth_method = auth_method
        self.python = python
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.verbose = verbose
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=200)
        self._threads: list[threading.Thread] = []
        for path in [*self.cameras, *self.relays, *self.media]:
            if not path.startswith("/"):
                raise ValueError(f"mount paths start with '/': {path!r}")

    @property
    def port(self) -> int:
        """The listening port (known after the first `start()` when 0 was asked for)."""
        return self._port

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stderr_tail(self) -> str:
        """The server's latest stderr lines (errors; lifecycle events too when verbose)."""
        return "".join(self._stderr)

    def command(self) -> list[str]:
        cmd = [self.python, str(SCRIPT), "--port", str(self._port), "--exit-on-stdin-eof"]
        for path, file in self.cameras.items():
            cmd += ["--camera", f"{path}={file}"]
        for path in self.relays:
            cmd += ["--relay", path]
        for path, file in self.media.items():
            cmd += ["--media", f"{path}={file}"]
        if self.auth is not None:
            cmd += ["--auth", f"{self.auth[0]}:{self.auth[1]}", "--auth-method", self.auth_method]
        if self.verbose:
            cmd.append("--verbose")
        return cmd

    def start(self) -> Self:
        """Launch the server and wait for its READY line; RuntimeError (with its stderr) if it fails.

        After a stop() the server comes back on the same port; while the old socket still holds
        it, the launch is retried until `start_timeout_s`.
        """
        if self.running:
            return self
        for file in self.cameras.values():  # a bad media file is named by the server itself
            if not file.is_file():
                raise FileNotFoundError(f"camera clip not found: {file}")
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:  # each launch gets a fair time to come up, even the last retry
                return self._launch(max(deadline, time.monotonic() + min(5.0, self.start_timeout_s)))
            except RuntimeError as exc:
                if not self._port or "cannot listen" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def _launch(self, deadline: float) -> Self:
        try:
            proc = subprocess.Popen(
                self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C in the terminal goes to the tests, not the server
            )
        except OSError as exc:
            raise RuntimeError(
                f"cannot run {self.python} for the RTSP server ({exc}); it needs Debian's python3 with "
                f"GStreamer: apt-get install {APT_PACKAGES}") from exc
        self._proc = proc
        self._stderr.clear()
        lines: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None and proc.stderr is not None
        # Both pipes are drained for the server's whole life: a full pipe would block it.
        self._threads = [
            threading.Thread(target=_pump, args=(proc.stdout, lines.put, lambda: lines.put(None)),
                             daemon=True, name="rtsp-stdout"),
            threading.Thread(target=_pump, args=(proc.stderr, self._stderr.append),
                             daemon=True, name="rtsp-stderr"),
        ]
        for thread in self._threads:
            thread.start()
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._fail(f"gave no READY line within {self.start_timeout_s:g} s")
            if line is None:  # stdout closed: the server is exiting
                self._fail("exited before READY")
            if line.startswith("READY "):
                self._port = int(line.split()[1])
                return self

    def _fail(self, why: str) -> NoReturn:
        proc = self._proc
        assert proc is not None
        self.stop()
        err = self.stderr_tail().strip() or "(no output)"
        hint = ""
        if proc.returncode == 3 or "apt-get install" in err:
            hint = f"\nThe RTSP server needs GStreamer for {self.python}: apt-get install {APT_PACKAGES}"
        raise RuntimeError(f"RTSP server {why} (exit status {proc.returncode}):\n{err}{hint}")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after `stop_timeout_s`) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.stop_timeout_s)
        for thread in self._threads:  # the pipes reach EOF now that the process is gone
            thread.join(timeout=self.stop_timeout_s)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def restart(self) -> Self:
        """Stop and start again on the same port; clients reconnect to the same URLs."""
        self.stop()
        return self.start()

    def url(self, path: str, user: str | None = None, password: str | None = None) -> str:
        """rtsp:// URL of mount `path`, with credentials when given."""
        if not path.startswith("/"):
            path = "/" + path
        if not self._port:
            raise RuntimeError("the server has no port yet: start() it first")
        userinfo = ""
        if user is not None:
            userinfo = quote(user, safe="")
            if password is not None:
                userinfo += ":" + quote(password, safe="")
            userinfo += "@"
        return f"rtsp://{userinfo}{HOST}:{self._port}{path}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()


def _pump(pipe: IO[bytes], put: Callable[[str], object], at_eof: Callable[[], object] | None = None) -> None:
    """Copy a pipe's lines to `put` until EOF, then call `at_eof`."""
    with contextlib.suppress(OSError, ValueError):
        for raw in iter(pipe.readline, b""):
            put(raw.decode("utf-8", "replace"))
    if at_eof is not None:
        at_eof()


def transcode_clip(src: Path, dst: Path, width: int, height: int, fps: int, gop: int | None = None,
                   max_seconds: float | None = None) -> Path:
    """Re-encode the video of `src` to an H.264 mp4 that streams well as a live camera.

    The output has exactly `fps` frames per second (each output slot shows the source frame on
    screen at that time, so the duration stays that of the source, or `max_seconds`), Main profile
    without B-frames, and a keyframe every `gop` frames (default: one a second) and nowhere else.
    Cached: an existing `dst` is returned as it is.
    """
    import av  # PyAV: imported here so that the server control above needs no media stack

    dst = Path(dst)
    if dst.exists():
        return dst
    if width % 2 or height % 2 or width <= 0 or height <= 0:
        raise ValueError(f"H.264 4:2:0 needs an even, positive size, got {width}x{height}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    gop = gop or fps
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp.mp4")
    try:
        with av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
            vin = inp.streams.video[0]
            vin.thread_type = "AUTO"
            stream = out.add_stream("libx264", rate=fps, options={
                "preset": "veryfast",
                "profile": "main",
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:open-gop=0",
            })
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.time_base = Fraction(1, fps)
            stream.codec_context.gop_size = gop
            stream.codec_context.max_b_frames = 0
            # One slice per picture, as most cameras send; PyAV's default (SLICE threads) cuts several.
            stream.codec_context.thread_type = "FRAME"
            step = Fraction(1, fps)
            limit = Fraction(max_seconds).limit_denominator(1_000_000) if max_seconds is not None else None
            start: Fraction | None = None
            shown = None  # the source frame on screen, scaled
            shown_until = Fraction(0)
            n = 0

            def emit_until(t: Fraction) -> None:
                nonlocal n
                while shown is not None and n * step < t and (limit is None or n * step < limit):
                    frame = av.VideoFrame.from_ndarray(shown, format="yuv420p")
                    frame.pts, frame.time_base = n, step
                    out.mux(stream.encode(frame))
                    n += 1

            for frame in inp.decode(vin):
                if frame.pts is None:
                    continue
                t = Fraction(frame.pts) * vin.time_base
                start = t if start is None else start
                emit_until(t - start)
                shown = frame.reformat(width, height, format="yuv420p").to_ndarray()
                rate = vin.average_rate or vin.guessed_rate or fps
                shown_until = t - start + 1 / Fraction(rate)
                if limit is not None and n * step >= limit:
                    break
            emit_until(shown_until)
            if n == 0:
                raise ValueError(f"{src}: no video frames")
            out.mux(stream.encode(None))
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
