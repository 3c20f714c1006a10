"""Reading redacted outputs back over RTSP, as a viewer would, and checking every frame on arrival.

Each received frame is classified by what it shows: a readable stamp (then its latency is the
receive time minus the stamp's send time, and every ground-truth object of that frame is checked
for a leak), a black frame (the pipeline failed closed: blanked, never a leak), or neither
(unreadable: counted, not attributed). Only the grey plane is decoded: it is all the checks need.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import av
import av.error
import cv2
import numpy as np

from stream.loadtest import leak, stamp
from stream.loadtest.scene import Scene, size_bucket

MAX_LEAK_FRAMES = 5
VIEWER_OPTIONS = {"rtsp_transport": "tcp", "max_delay": "0", "reorder_queue_size": "0"}
"""RTSP over TCP arrives in order: FFmpeg's reorder buffer would only add delay to the reading"""


class Check(NamedTuple):
    """The leak verdict of one ground-truth object in one received frame."""

    label: str
    bucket: str
    visible: bool
    corr: float
    box: tuple[int, int, int, int]


@dataclass
class Received:
    """One received frame: when, what it was, and the leak verdict of each ground-truth object."""

    recv_ms: float
    kind: str  # "stamped" | "blank" | "unreadable" | "misrouted"
    seq: int = -1
    sent_ms: int = 0
    objects: list[Check] = field(default_factory=list)


class OutputReader:
    """Pulls one redacted stream from `url` until stopped, reconnecting while the publisher is away."""

    def __init__(self, scene: Scene, url: str, check_leaks: bool = True,
                 judged: set[str] | frozenset[str] = frozenset({"face", "plate"})) -> None:
        self.scene = scene
        self.url = url
        self.check_leaks = check_leaks
        self.judged = judged  # what the pipeline was asked to redact: only their leaks are kept as evidence
        self.frames: list[Received] = []
        self.leak_frames: list[tuple[int, np.ndarray]] = []  # evidence: the first few frames with a leak
        self.first_frame = threading.Event()
        """set at the first decoded frame, stamped or not: an overloaded pipeline may blank them all"""
        self.opens = 0
        self.error: str | None = None
        self._refs = [leak.Reference(scene.reference(i)) for i in range(len(scene.sprites))]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"reader-{scene.stream}")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the reader to stop: it sees the flag at its next frame or read timeout (5 s at most).

        The container is never closed from this thread: FFmpeg does not allow a close while
        another thread reads, and PyAV crashes on it."""
        self._stop.set()
        if self._thread.ident is not None:  # a point that failed before the readers started
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with av.open(self.url, options=VIEWER_OPTIONS, timeout=(5, 5)) as c:
                    self.opens += 1
                    # frame threading would hold frames back (one per thread): a viewer adds no delay
                    c.streams.video[0].codec_context.thread_count = 1
                    for frame in c.decode(video=0):
                        now = time.time() * 1000
                        self.frames.append(self.classify(frame.to_ndarray(format="gray"), now))
                        if self._stop.is_set():
                            return
            except (av.error.FFmpegError, OSError, ValueError) as e:
                self.error = str(e)
            if self._stop.wait(0.2):
                return

    def classify(self, grey: np.ndarray, recv_ms: float) -> Received:
        """Stamp, blank or unreadable; for a stamped frame, the leak verdict of each object."""
        sc = self.scene
        if grey.shape != (sc.height, sc.width):  # an output scaled on the way: back to the sent size
            grey = cv2.resize(grey, (sc.width, sc.height), interpolation=cv2.INTER_AREA)
        st = stamp.read(grey)
        self.first_frame.set()
        if st is None:
            return Received(recv_ms, "blank" if leak.is_blank(grey) else "unreadable")
        if st.stream != sc.stream:
            return Received(recv_ms, "misrouted", st.seq, st.sent_ms)
        rec = Received(recv_ms, "stamped", st.seq, st.sent_ms)
        if self.check_leaks:
            for b in sc.truth(st.seq):
                v = self._refs[b.obj].check(grey[b.y1:b.y2, b.x1:b.x2])
                rec.objects.append(Check(b.label, size_bucket(b.height), v.visible, round(v.corr, 3),
                                         (b.x1, b.y1, b.x2, b.y2)))
                if v.visible and b.label in self.judged and len(self.leak_frames) < MAX_LEAK_FRAMES:
                    self.leak_frames.append((st.seq, grey.copy()))
        return rec
