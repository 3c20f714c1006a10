"""Record a redacted stream as evidence: fragmented MP4 segments, each with a hash-chained manifest.

Layout: ``DIR/STREAM_ID/YYYYMMDD/STREAM_ID-<start>.mp4`` and ``<that>.manifest.json`` beside it
(see :mod:`stream.live.publish.custody` for what a manifest holds). A segment is written under a
temporary name, fsynced, and only then renamed into place, after its manifest has been written
and fsynced under a temporary name too; so after a crash every segment with a manifest is whole
and verifies. What a crash leaves half-written is removed at the next start, where the chain
continues from the newest manifest on disk.

Retention and the disk quota delete the oldest segments first, recording each deletion in the
pruned record before the files go, so what remains still verifies. The recorder runs on its own
output thread: a full disk or a broken folder costs recordings (counted, logged, alarmed through
``recording_failing``), never a frame of the live outputs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import av
import av.error

from stream import __version__
from stream.config import RecordOutputConfig, StreamConfig
from stream.core.checksum import sha256_file
from stream.core.durable import fsync_dir, write_synced
from stream.core.frames import Drop
from stream.core.metrics import Metrics
from stream.core.yuv import Picture
from stream.live.publish import custody
from stream.live.publish.custody import MANIFEST_SUFFIX, PARTIAL_SUFFIX, SEGMENT_SUFFIX
from stream.live.publish.encoder import EncoderOutput, Painted

log = logging.getLogger(__name__)

Audit = Callable[[str, dict[str, Any]], None]
"""``audit(action, fields)``: where finished and deleted segments are reported for the audit log"""
DELETED = "audit.recording.deleted"
SEGMENT = "audit.recording.segment"
FMP4 = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}
"""fragmented MP4: a fragment per keyframe, nothing rewritten at the start when the file ends"""
RETRY_S = 5.0
"""how long a recorder that could not write waits before trying a new segment"""
MIN_FREE = 64 * 1024 * 1024
"""after a full disk, old segments are deleted until this much (or twice the largest segment) is free"""


class _Writer:
    """The segment's file as PyAV writes it, front to back (it offers no seek): counts and hashes the
    bytes on their way (no second read of the file) and keeps the first write error, which PyAV
    would otherwise lose when it closes a container."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.bytes = 0
        self.sha256 = hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.bytes += len(data)
        self.sha256.update(data)
        return n

    def seekable(self) -> bool:
        return False

    def finish(self) -> None:
        """Force the file to disk and close it (OSError as it comes; the file is closed either way)."""
        try:
            if self.error is not None:
                raise self.error
            self.f.flush()
            os.fsync(self.f.fileno())
        finally:
            with contextlib.suppress(OSError):
                self.f.close()


@dataclass
class _Segment:
    name: str
    folder: Path
    tmp: Path
    writer: _Writer
    t0: float
    """capture time (monotonic) of its first frame: when it is due to end"""
    size: tuple[int, int] = (0, 0)
    frames: list[dict[str, Any]] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.folder / self.name


@dataclass
class _Stored:
    """A finished segment on disk, as the recorder tracks it (oldest first)."""

    name: str
    folder: Path
    start: float
    bytes: int

    @property
    def segment(self) -> Path:
        return self.folder / self.name

    @property
    def manifest(self) -> Path:
        return self.folder / (self.name + MANIFEST_SUFFIX)


class RecordOutput(EncoderOutput):
    kind = "record"
    keep_size = False  # a new size ends the segment: each one has one size, masks in its pixels
    wants_painted = True

    def __init__(self, stream_id: str, label: str, config: RecordOutputConfig, metrics: Metrics,
                 stream: Callable[[], StreamConfig] | None = None, fps: float = 25.0,
                 audit: Audit | None = None, clock: Callable[[], float] = time.time,
                 models: Sequence[str] | None = None) -> None:
        """``stream`` gives the stream's config as it is now (zones change at run time): each manifest
        records its digest; ``audit`` is told of every finished and deleted segment; ``clock`` is
        what retention measures age against; ``models`` names the model families the detector runs
        (None: every installed model is listed)."""
        super().__init__(stream_id, label, metrics, fps=fps, bitrate_kbps=config.bitrate_kbps,
                         gop_s=config.gop_s, queue_size=8)
        self.config = config
        self.folder = Path(config.dir) / stream_id
        self.audit = audit
        self.clock = clock
        self.stream = stream
        self.models = custody.models_digest(None if models is None else tuple(models))
        self.audio_lead_s = 1.0  # each segment keeps the sound of its first second, not the last one's
        self._seg: _Segment | None = None
        self._next: Painted | None = None
        self._stored: deque[_Stored] = deque()
        self._disk_bytes = 0
        self._prev = custody.GENESIS
        self._index = 0
        self._last_name = ""
        self._lock: int | None = None
        self._retry_at = 0.0
        self._no_delete_until = 0.0
        self._usable = False
        self._failing = False
        self.segments_written = 0
        self.deleted: list[tuple[str, str]] = []
        """(segment name, reason) of every deletion, in order"""
        metrics.recording_failing.labels(stream_id).set(0)
        metrics.recording_segments.labels(stream_id)
        for reason in ("retention", "disk_full"):
            metrics.recording_deleted.labels(stream_id, reason)

    # -- called by the redaction stage -----------------------------------------------------------
    def submit(self, image: Picture, captured_at: float, painted: Painted | None = None) -> None:
        # the queue holds (image, captured_at, painted): handle() takes all three
        if self._queue.put((image, captured_at, painted)) is not None:  # type: ignore[arg-type]
            why = Drop.STOPPING if self._queue.closed else Drop.OUTPUT_BUSY
            self.metrics.frames_dropped.labels(self.stream_id, why.value).inc()

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        self._ready()
        try:
            super()._run()
        finally:
            if self._lock is not None:
                os.close(self._lock)  # releases the lock
                self._lock = None

    def _ready(self) -> bool:
        """Lock, repair and resume the stream's folder once; after a failure, again every RETRY_S."""
        if self._usable:
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            self._prepare()
        except Exception as e:
            locked = isinstance(e, BlockingIOError)
            self.metrics.recording_errors.labels(self.stream_id, "locked" if locked else "io").inc()
            self._retry_at = time.monotonic() + RETRY_S
            if not self._failing:
                if locked:
                    log.error("stream %s: %s is being recorded by another recorder (a second record output "
                              "with the same dir, or another process); this one records nothing until it "
                              "stops", self.stream_id, self.folder)
                else:
                    log.error("stream %s: cannot record to %s (%s); trying again every %.0f s, the stream "
                              "goes on", self.stream_id, self.folder, e, RETRY_S)
            self._alarm(True)
            return False
        self._usable = True
        self._alarm(False)
        return True

    def handle(self, image: Picture, captured_at: float, painted: Painted | None = None) -> None:
        if not self._ready() or time.monotonic() < self._retry_at:
            self.metrics.frames_dropped.labels(self.stream_id, Drop.OUTPUT_DOWN.value).inc()
            return
        try:
            seg = self._seg
            if seg is not None and (captured_at - seg.t0 >= self.config.segment_s or self._over_quarter(seg)):
                self._close(flush=True)  # ends the segment; the next one starts with a keyframe
            self._next = painted
            self.write(image, captured_at)
            seg = self._seg
            assert seg is not None
            seg.frames.append(self._entry(len(seg.frames), painted, captured_at))
            if self.config.max_bytes is not None:
                self._make_room(self.config.max_bytes - seg.writer.bytes, "max_bytes")
        except (OSError, av.error.FFmpegError, ValueError) as e:
            self._failed(e)

    def _entry(self, n: int, painted: Painted | None, captured_at: float) -> dict[str, Any]:
        """One frame's entry of the manifest's masks document (the shape of ``redact --masks-json``)."""
        if painted is None:  # not published by a stream runner (tests): no masks known
            wall = time.time() - (time.monotonic() - captured_at)
            return {"frame": n, "regions": [], "time": round(wall, 3), "masks_unknown": True}
        entry: dict[str, Any] = {"frame": n, "regions": [r.as_json() for r in painted.regions or ()],
                                 "time": round(painted.wall_time, 3)}
        if painted.regions is None:
            entry["blanked"] = True
        return entry

    def _over_quarter(self, seg: _Segment) -> bool:
        """A segment ends early at a quarter of max_bytes, so the quota can always be met by deleting
        finished segments."""
        return self.config.max_bytes is not None and seg.writer.bytes * 4 >= self.config.max_bytes

    def open_container(self) -> av.container.OutputContainer:
        painted = self._next
        wall = painted.wall_time if painted is not None else time.time()
        name = custody.segment_name(self.stream_id, wall)
        if name <= self._last_name:  # names sort in chain order, even if the clock went back
            stem = self._last_name[:self._last_name.rindex("Z") + 1]
            k = 1
            while f"{stem}_{k:04d}{SEGMENT_SUFFIX}" <= self._last_name:
                k += 1
            name = f"{stem}_{k:04d}{SEGMENT_SUFFIX}"
        folder = self.folder / custody.day_folder(wall)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}{PARTIAL_SUFFIX}"
        f = open(tmp, "xb")  # noqa: SIM115 - closed by _Writer.finish
        writer = _Writer(f)
        try:
            container = av.open(writer, "w", format="mp4", options=FMP4)
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        self._last_name = name
        self._seg = _Segment(name, folder, tmp, writer, t0=time.monotonic())
        self._t0, self._last_pts = None, -1  # every segment starts at 0
        return container

    def write(self, image: Picture, captured_at: float) -> None:
        super().write(image, captured_at)
        if self._seg is not None and not self._seg.frames:
            self._seg.t0 = captured_at
            self._seg.size = (image.shape[1], image.shape[0])

    def _close(self, flush: bool) -> None:
        seg, self._seg = self._seg, None
        super()._close(flush)
        if seg is not None:
            try:
                self._finish(seg)
            except (OSError, av.error.FFmpegError, ValueError) as e:
                self._failed(e, seg)

    # -- a segment's end -------------------------------------------------------------------------
    def _finish(self, seg: _Segment) -> None:
        seg.writer.finish()
        if not seg.frames:
            seg.tmp.unlink(missing_ok=True)
            return
        digest, size = seg.writer.sha256.hexdigest(), seg.tmp.stat().st_size
        if size != seg.writer.bytes:  # never seen; a file written other than front to back
            digest = sha256_file(seg.tmp)
        packets = custody.packet_hashes(seg.tmp)
        if len(packets) != len(seg.frames):
            log.warning("stream %s: segment %s holds %d packets for %d frames; its masks may not line up",
                        self.stream_id, seg.name, len(packets), len(seg.frames))
        times = [f["time"] for f in seg.frames]
        doc = {
            "format": custody.MANIFEST_FORMAT,
            "stream": self.stream_id,
            "index": self._index,
            "segment": seg.name,
            "sha256": digest,
            "bytes": size,
            "start": custody.stamp(min(times)),
            "end": custody.stamp(max(times)),
            "frames": len(seg.frames),
            "blanked_frames": sum(1 for f in seg.frames if f.get("blanked")),
            "masks": {"width": seg.size[0], "height": seg.size[1], "frames": seg.frames},
            "packet_sha256": packets,
            "models": self.models,
            "config_sha256": custody.config_digest(self.stream().model_dump(mode="json")) if self.stream
            else None,
            "previous_manifest_sha256": self._prev,
            "recorder": {"version": __version__, "segment_s": self.config.segment_s},
        }
        data = custody.canonical(doc)
        manifest = seg.folder / (seg.name + MANIFEST_SUFFIX)
        mtmp = seg.folder / f".{manifest.name}{PARTIAL_SUFFIX}"
        try:
            write_synced(mtmp, data)  # the manifest first: a crash between the renames is repaired
            os.replace(seg.tmp, seg.path)
            os.replace(mtmp, manifest)
        except BaseException:
            mtmp.unlink(missing_ok=True)
            if not manifest.exists():
                seg.path.unlink(missing_ok=True)
            raise
        fsync_dir(seg.folder)
        self._prev, self._index = custody.sha256_bytes(data), self._index + 1
        # the manifest's hash leaves the folder: whoever can rewrite the folder cannot rewrite this
        self._tell(SEGMENT, {"segment": seg.name, "index": self._index - 1, "manifest_sha256": self._prev,
                             "sha256": digest, "start": _utc(doc["start"]), "end": _utc(doc["end"]),
                             "frames": len(seg.frames)})
        self._stored.append(_Stored(seg.name, seg.folder, min(times), size + len(data)))
        self._add_bytes(size + len(data))
        self.segments_written += 1
        self.metrics.recording_segments.labels(self.stream_id).inc()
        self._alarm(False)
        self._apply_retention()
        if self.config.max_bytes is not None:
            self._make_room(self.config.max_bytes, "max_bytes")

    def _failed(self, e: BaseException, seg: _Segment | None = None) -> None:
        """Give up the segment being written (it has no manifest, so nothing claims it); on a full
        disk delete the oldest segments; try again with a new segment (at once if room was made)."""
        seg = seg or self._seg
        self._seg = None
        super()._close(flush=False)
        if seg is not None:
            with contextlib.suppress(OSError):
                seg.writer.f.close()
            seg.tmp.unlink(missing_ok=True)
        code = getattr(e, "errno", None)
        full = code in (errno.ENOSPC, errno.EDQUOT)
        reason = "disk_full" if full else "io"
        self.metrics.recording_errors.labels(self.stream_id, reason).inc()
        self._alarm(True)
        lost = len(seg.frames) if seg is not None else 0
        freed = self._free_disk() if full else 0
        self._retry_at = 0.0 if freed else time.monotonic() + RETRY_S
        log.error("stream %s: recording to %s failed (%s): %d frame(s) of the unfinished segment lost; %s",
                  self.stream_id, self.folder, "disk full" if full else e, lost,
                  f"deleted the {freed} oldest segment(s) and go on" if freed else
                  f"trying again in {RETRY_S:.0f} s; the live outputs are not affected")

    def _alarm(self, on: bool) -> None:
        if on != self._failing:
            self._failing = on
            self.metrics.recording_failing.labels(self.stream_id).set(1 if on else 0)
            if not on:
                log.warning("stream %s: recording to %s works again", self.stream_id, self.folder)

    # -- start: lock, repair, resume the chain ---------------------------------------------------
    def _prepare(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BaseException:
                os.close(fd)
                raise
            self._lock = fd
        self._stored.clear()
        self._disk_bytes = 0
        self._repair()
        manifests = {p.name.removesuffix(MANIFEST_SUFFIX) for p in custody.manifest_paths(self.folder)}
        for seg in custody.segment_paths(self.folder):
            if seg.name not in manifests:
                log.warning("stream %s: segment %s has no manifest; it is left as it is and will not verify",
                            self.stream_id, seg)
                continue
            manifest = seg.with_name(seg.name + MANIFEST_SUFFIX)
            start = custody.name_time(seg.name)
            size = seg.stat().st_size + manifest.stat().st_size
            self._stored.append(_Stored(seg.name, seg.parent, start if start is not None else 0.0, size))
            self._disk_bytes += size
        self._resume_chain()
        self.metrics.recording_bytes.labels(self.stream_id).set(self._disk_bytes)
        self._apply_retention()
        if self.config.max_bytes is not None:
            self._make_room(self.config.max_bytes, "max_bytes")

    def _repair(self) -> None:
        """What a crash left: a segment whose manifest was written (and fsynced) but not yet renamed
        into place is completed, if the segment matches it; every other temporary file belongs to an
        unfinished segment and goes."""
        partials = sorted(self.folder.glob(f"*/.*{PARTIAL_SUFFIX}"),
                          key=lambda t: not t.name.endswith(MANIFEST_SUFFIX + PARTIAL_SUFFIX))
        for tmp in partials:  # manifests first: they may save their segment's temporary file
            if not tmp.exists():
                continue
            name = tmp.name[1:].removesuffix(PARTIAL_SUFFIX)
            if name.endswith(MANIFEST_SUFFIX) and self._complete(tmp, tmp.with_name(name)):
                continue
            with contextlib.suppress(OSError):
                log.warning("stream %s: removed %s, left by a run that did not stop cleanly (%d bytes, no "
                            "manifest)", self.stream_id, tmp, tmp.stat().st_size)
                tmp.unlink()

    def _complete(self, tmp: Path, manifest: Path) -> bool:
        """Rename a stopped segment and its manifest into place when they match; False otherwise."""
        seg = manifest.with_name(manifest.name.removesuffix(MANIFEST_SUFFIX))
        seg_tmp = seg.with_name(f".{seg.name}{PARTIAL_SUFFIX}")
        try:
            link = custody.read_link(tmp)
            source = next((p for p in (seg, seg_tmp) if p.is_file()), None)
            if manifest.exists() or source is None or link.doc["segment"] != seg.name \
                    or sha256_file(source) != link.doc["sha256"]:
                return False
            if source != seg:
                os.replace(source, seg)
            os.replace(tmp, manifest)
        except (custody.CustodyError, OSError):
            return False
        fsync_dir(manifest.parent)
        log.warning("stream %s: completed segment %s, which a stop had left between its last two steps",
                    self.stream_id, seg.name)
        return True

    def _resume_chain(self) -> None:
        """Continue the chain after the newest manifest on disk (or the newest deleted one)."""
        for stored in reversed(self._stored):
            try:
                link = custody.read_link(stored.manifest)
            except (custody.CustodyError, OSError) as e:
                log.error("stream %s: %s; the chain continues from the manifest before it", self.stream_id, e)
                continue
            self._prev, self._index = link.sha256, link.index + 1
            self._last_name = stored.name
            return
        pruned = custody.read_pruned(self.folder)
        if pruned and isinstance(pruned[-1].get("index"), int):
            self._prev, self._index = pruned[-1]["manifest_sha256"], pruned[-1]["index"] + 1

    # -- deleting: retention, quota, full disk ---------------------------------------------------
    def _apply_retention(self) -> None:
        cutoff = self.clock() - self.config.retention_days * 86400
        while self._stored and self._stored[0].start < cutoff:
            if not self._delete(self._stored[0], "retention", "retention_days"):
                return

    def _make_room(self, budget: int, trigger: str) -> None:
        """Delete the oldest segments while this stream's recordings take more than ``budget`` bytes."""
        while self._stored and self._disk_bytes > budget:
            if not self._delete(self._stored[0], "disk_full", trigger):
                return

    def _free_disk(self) -> int:
        """After ENOSPC: delete the oldest segments, at least one, until the disk has room again."""
        want = max(MIN_FREE, 2 * max((s.bytes for s in self._stored), default=0))
        n = 0
        while self._stored and self._delete(self._stored[0], "disk_full", "ENOSPC"):
            n += 1
            try:
                if shutil.disk_usage(self.folder).free >= want:
                    break
            except OSError:
                break
        return n

    def _delete(self, stored: _Stored, reason: str, trigger: str) -> bool:
        """Record the deletion in the pruned record before the manifest goes, delete, log, count, audit.

        On a full disk the segment goes first, making room for the record's line; a crash just
        then leaves a manifest without its segment, which verification reports as such."""
        if time.monotonic() < self._no_delete_until:  # a deletion failed just now: not again per frame
            return False
        try:
            data = stored.manifest.read_bytes()
            doc = custody.read_link(stored.manifest).doc
        except (OSError, custody.CustodyError):
            data, doc = b"", {}
        entry = {"segment": stored.name, "index": doc.get("index"),
                 "manifest_sha256": custody.sha256_bytes(data) if data else None,
                 "segment_sha256": doc.get("sha256"), "start": doc.get("start"), "end": doc.get("end"),
                 "reason": reason, "trigger": trigger, "deleted": custody.stamp(self.clock())}
        try:
            if trigger == "ENOSPC":
                stored.segment.unlink(missing_ok=True)
            if data:
                custody.append_pruned(self.folder, entry)
            stored.segment.unlink(missing_ok=True)
            stored.manifest.unlink(missing_ok=True)
            fsync_dir(stored.folder)
            with contextlib.suppress(OSError):
                stored.folder.rmdir()  # an emptied day folder
        except OSError as e:
            log.error("stream %s: cannot delete recording %s (%s); trying again in %.0f s", self.stream_id,
                      stored.segment, e, RETRY_S)
            self._no_delete_until = time.monotonic() + RETRY_S
            return False
        self._stored.popleft()
        self._add_bytes(-stored.bytes)
        self.deleted.append((stored.name, reason))
        self.metrics.recording_deleted.labels(self.stream_id, reason).inc()
        level = {"retention_days": logging.INFO, "max_bytes": logging.WARNING}.get(trigger, logging.ERROR)
        log.log(level, "stream %s: deleted recording %s (%s: %s)", self.stream_id, stored.segment, reason,
                {"retention_days": f"older than {self.config.retention_days:g} days",
                 "max_bytes": f"over max_bytes {self.config.max_bytes}",
                 "ENOSPC": "the disk is full"}[trigger])
        self._tell(DELETED, {"segment": stored.name, "index": entry["index"], "reason": reason,
                             "trigger": trigger, "manifest_sha256": entry["manifest_sha256"],
                             "start": _utc(entry["start"]), "end": _utc(entry["end"])})
        return True

    def _tell(self, action: str, fields: dict[str, Any]) -> None:
        """Report to the audit log, if there is one; its failure never stops the recording."""
        if self.audit is None:
            return
        try:
            self.audit(action, {"stream_id": self.stream_id, **fields})
        except Exception:
            log.exception("stream %s: the audit log did not take %s", self.stream_id, action)

    def _add_bytes(self, n: int) -> None:
        self._disk_bytes += n
        self.metrics.recording_bytes.labels(self.stream_id).set(self._disk_bytes)


def _utc(stamp: dict[str, Any] | None) -> str | None:
    """The RFC 3339 half of a manifest's time stamp (what audit records carry)."""
    return stamp.get("utc") if isinstance(stamp, dict) else None
