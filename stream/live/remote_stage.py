"""A stream worker's handle on the detection stage process: the batcher's interface over a socket.

The pipeline of a worker process (``run --workers N``) attaches its stream queues here exactly as
it would to a local :class:`~stream.live.batcher.Batcher`. A sender thread takes each queued frame
at once, copies it into a shared-memory slot and sends the slot's name to the stage; a receiver
thread resolves each job with the stage's answer and frees its slot. The stage batches, admits
and sheds; this side only carries frames and answers.

It fails closed like the local batcher: while the stage is not connected or not ready, frames are
failed at once (their streams blank); when the connection drops, every frame waiting for an
answer is failed; a stage that stops answering leaves frames to their deadline (blanked by the
stream). The connection is retried until the supervisor has a new stage up.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from multiprocessing.connection import Client, Connection
from typing import Any

from stream.core.detections import Detections
from stream.core.frames import Drop, Failure, Job
from stream.core.metrics import Metrics
from stream.live.batcher import StreamQueues
from stream.live.frame_ring import SlotWriter

log = logging.getLogger(__name__)

RETRY_S = 0.2


class RemoteStage(StreamQueues):
    """Sends frames to the stage process and resolves their jobs with its answers."""

    def __init__(self, address: str, authkey: bytes, slots: SlotWriter, metrics: Metrics,
                 name: str = "worker", connect_timeout_s: float = 30.0) -> None:
        super().__init__()
        self.address, self._authkey, self.slots, self.metrics = address, authkey, slots, metrics
        self.name = name
        self.connect_timeout_s = connect_timeout_s
        self._pending: dict[int, Job] = {}
        self._conn: Connection | None = None
        self._remote_ready = False
        self._send_lock = threading.Lock()
        self._incident = False
        self._shm_full = False
        self.connects = 0

    # -- the batcher's interface ------------------------------------------------------------------
    def start(self) -> None:
        """Connect (waiting up to ``connect_timeout_s`` for the stage), then carry frames."""
        deadline = time.monotonic() + self.connect_timeout_s
        while not self._connect() and time.monotonic() < deadline:
            time.sleep(RETRY_S)  # the stage process is still starting; its socket appears when ready
        self._thread = threading.Thread(target=self._send_loop, name="stage-send", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._end_thread(timeout)
        self._disconnect("stopping")
        self._fail_queued()
        self.slots.close()

    @property
    def ready(self) -> bool:
        return self._conn is not None and self._remote_ready

    def detach(self, stream_id: str) -> None:
        super().detach(stream_id)
        self._send(("detach", stream_id))

    # -- connection -------------------------------------------------------------------------------
    def _connect(self) -> bool:
        try:
            conn = Client(self.address, family="AF_UNIX", authkey=self._authkey)
        except (OSError, EOFError):
            return False
        except Exception as e:  # the stage refused the key: retried like a stage that is not up
            log.error("the detection stage refused this worker (%s)", type(e).__name__)
            return False
        with self._send_lock:
            self._conn = conn
        self._remote_ready = False
        self.connects += 1
        self._send(("hello", self.name))
        threading.Thread(target=self._recv_loop, args=(conn,), name="stage-recv", daemon=True).start()
        log.info("connected to the detection stage")
        return True

    def _disconnect(self, why: str) -> None:
        with self._send_lock:
            conn, self._conn = self._conn, None
        if conn is None:
            return
        self._remote_ready = False
        self._set_up(False)
        with contextlib.suppress(OSError):
            conn.close()
        with self.cond:
            pending, self._pending = self._pending, {}
            self.slots.release_all()
        for job in pending.values():
            job.resolve(failure=Failure.DETECTOR_UNAVAILABLE)
        if not self._stop.is_set():
            log.error("lost the detection stage (%s); %d frame(s) in flight failed closed, streams blank "
                      "until it is back", why, len(pending))

    def _send(self, msg: tuple[Any, ...]) -> bool:
        with self._send_lock:
            conn = self._conn
            if conn is None:
                return False
            try:
                conn.send(msg)
                return True
            except (OSError, EOFError, ValueError):
                pass
        self._disconnect("send failed")
        return False

    def _set_up(self, up: bool) -> None:
        self.metrics.detector_up.set(1 if up else 0)
        if up and self._incident:
            log.warning("detection stage ready again")
        self._incident = not up

    # -- the two loops ----------------------------------------------------------------------------
    def _send_loop(self) -> None:
        next_try = 0.0
        while not self._stop.is_set():
            with self.cond:
                while not self._stop.is_set() and not any(len(q) for q in self._queues.values()):
                    self.cond.wait(RETRY_S if self._conn is None else 1.0)
                    if self._conn is None:
                        break
                jobs: list[Job] = []
                for q in list(self._queues.values()):
                    jobs.extend(q.take(len(q)))
            if self._conn is None and time.monotonic() >= next_try and not self._connect():
                next_try = time.monotonic() + RETRY_S
            for job in jobs:
                self._forward(job)

    def _forward(self, job: Job) -> None:
        if job.done:
            return
        if not self.ready:
            job.resolve(failure=Failure.DETECTOR_UNAVAILABLE)
            return
        f = job.frame
        with self.cond:
            try:
                ref = self.slots.put(f.image)
            except OSError as e:  # shared memory is full: this frame fails closed, the stream goes on
                if not self._shm_full:
                    log.error("%s; frames are blanked until there is room", e)
                self._shm_full = True
                ref = None
                job.resolve(failure=Failure.DETECTOR_UNAVAILABLE)
            else:
                self._shm_full = False
            if ref is not None:
                self._pending[ref.slot] = job
        if ref is None:  # every slot is still at the stage: it is not answering
            job.resolve(failure=Failure.DETECTOR_HUNG)
            return
        msg = ("frame", ref, f.stream_id, f.seq, f.captured_at, f.wall_time, f.pts, job.deadline)
        if not self._send(msg):
            with self.cond:  # never sent: its slot is free again
                if self._pending.get(ref.slot) is job:
                    del self._pending[ref.slot]
                    self.slots.release(ref.slot)
            job.resolve(failure=Failure.DETECTOR_UNAVAILABLE)

    def _recv_loop(self, conn: Connection) -> None:
        try:
            while True:
                msg = conn.recv()
                if msg[0] == "done":
                    self._answers(conn, msg[1])
                elif msg[0] == "admitted":
                    with self.cond:
                        if self._conn is not conn:
                            continue  # a connection given up on: its slots may hold other frames now
                        for slot in msg[1]:
                            job = self._pending.get(slot)
                            if job is not None:
                                job.admitted = True
                elif msg[0] == "ready":
                    self._remote_ready = bool(msg[1])
                    self._set_up(self._remote_ready)
        except (EOFError, OSError):
            pass
        except Exception:
            if self._conn is conn:  # else: the connection was closed under the read (stopping)
                log.exception("bad answer from the detection stage")
        if self._conn is conn:
            self._disconnect("connection closed")

    def _answers(self, conn: Connection,
                 answers: list[tuple[int, Detections | None, str | None, str | None]]) -> None:
        with self.cond:
            if self._conn is not conn:
                # read just before that connection was given up: its frames were failed and their
                # slots freed, so a slot number here may name a newer frame; these boxes are not its
                return
            jobs = []
            for slot, dets, failure, dropped in answers:
                job = self._pending.pop(slot, None)
                self.slots.release(slot)
                if job is not None:
                    jobs.append((job, dets, failure, dropped))
        for job, dets, failure, dropped in jobs:
            sid = job.frame.stream_id
            if dets is not None:
                job.admitted = True
                if not job.resolve(detections=dets):
                    self._send(("forget", sid))  # given up on meanwhile: its tracker never sees these
            elif dropped is not None:
                why = Drop(dropped)
                if job.resolve(dropped=why) and why is not Drop.OVERLOAD:
                    # overload drops are counted by the stream (it may publish black instead)
                    self.metrics.frames_dropped.labels(sid, why.value).inc()
            else:
                if failure in (Failure.DETECTOR_ERROR.value, Failure.DETECTOR_HUNG.value):
                    job.admitted = True
                job.resolve(failure=Failure(failure or Failure.DETECTOR_UNAVAILABLE.value))
