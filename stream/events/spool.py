"""The on-disk spool in front of Kafka: an append-only log of events, read and acknowledged in order.

Every event the Kafka sink accepts is appended here first; the sender reads from the spool and
moves the spool's *cursor* only past events the broker has acknowledged. So an outage, a broker
that rejects writes, or a restart of the process only delays events: what is in the spool is
sent again until it is acknowledged (at-least-once, in order).

Layout of the folder:

- ``<first seq>.seg``: segments, each a run of records in sequence order, one record a line:
  ``<seq> <key|-> <category> <time> <crc32> <event JSON>\\n``. The CRC covers the rest of the
  line, so a record damaged on disk is detected, skipped and counted instead of being sent.
- ``cursor``: ``<seq> <segment> <offset>`` of the first record not yet acknowledged, rewritten
  (atomically) as acknowledgements come in. After a crash the spool resumes from the last
  cursor written: a few records may be sent twice, none is skipped.
- ``lock``: held (flock) by the process writing to the spool, so two pipelines never share one;
  ``reader.lock`` likewise by the process reading from it.

The spool is bounded by ``max_bytes``. When full, ``drop_oldest`` deletes the oldest segment
(its undelivered records are counted as dropped) and ``drop_newest`` refuses new records
(counted); both are reported to the caller, which raises the alarm.

When the file system refuses a write (no space, quota, I/O error), ``append`` keeps the records
that reached the file whole, cuts a record torn by the failed write off the segment (so the next
record starts on a line of its own), reuses the sequence numbers of the records it could not
write, and reports them and the error to the caller instead of raising. Nothing written before
is touched; the next ``append`` simply tries again.

**One process or two.** :class:`Spool` writes and reads in one process (``events.delivery:
thread``). With ``events.delivery: process`` the pipeline appends through a :class:`SpoolWriter`
and the delivery process reads through a :class:`SpoolReader`, so that creating events and the
Kafka client do not share one interpreter. The two share nothing but these files, and each file
has one writer:

- segments are written by the writer only, and only the newest one: whole records, in order,
  each batch with one ``write``. It starts the next segment only after it is done with the
  previous one, so a segment with a later one beside it is complete, and bytes without their
  newline at the end of a segment are a record still being written (the reader waits) or, once a
  later segment exists, one torn by a crash (the reader skips it; a writer that starts again
  cuts it off first). The reader takes whole lines only, CRC checked, and never one twice;
- ``cursor`` is written by the reader only. The reader deletes segments older than the one its
  cursor is in, never the newest. The writer reads the cursor when the spool is full: what it
  deletes then (drop_oldest) and was not acknowledged in the cursor is counted as dropped, by
  the writer alone (records the reader had in flight included). The reader notices a deleted
  segment by its open file's link count and goes on with the next one;
- a delivered spool is emptied by whichever half stops last: the writer when it closes and the
  cursor has reached its ``written_seq``, the reader when it closes and no writer holds ``lock``
  (which it takes for the moment: a writer starting then waits for it);
- ``head`` holds the writer's ``written_seq``: the reader's count of what waits (a hint only: it
  reads up to the last whole line whatever ``head`` says), and where numbering goes on after a
  clean stop that left the folder empty.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO, TypeVar

from stream.core.errors import UserError
from stream.events.sink import FsyncPolicy, write_records

log = logging.getLogger(__name__)

SUFFIX = ".seg"
TAIL_RECORDS = 50_000
TAIL_BYTES = 32 << 20
T = TypeVar("T")


@dataclass(slots=True)
class Record:
    """One spooled event as read back, with where it sits (to rewind to it or acknowledge it)."""

    seq: int
    key: bytes | None
    category: str
    time: float
    value: bytes
    segment: int
    start: int
    end: int
    spool: int = 0
    """which spool of several it came from (a delivery process reads one per worker)"""


@dataclass
class Appended:
    """What one ``append`` did: records written, and records dropped to stay within ``max_bytes``."""

    first_seq: int
    written: int = 0
    dropped_new: int = 0
    """records of this call refused (drop_newest)"""
    dropped_old: int = 0
    """older, never-sent records deleted to make room (drop_oldest)"""
    failed: int = 0
    """records of this call not stored because the file system refused the write (see ``error``)"""
    error: OSError | None = None
    """why writing failed (records already written stay; a torn one was cut off)"""


class _WriteFailed(Exception):
    """A write stopped part way: ``records`` whole records of the buffer reached the file."""

    def __init__(self, records: int, error: OSError) -> None:
        super().__init__(str(error))
        self.records = records
        self.error = error


def encode_record(seq: int, key: str | None, category: str, when: float, value: bytes) -> bytes:
    head = b"%d %s %s %.3f" % (seq, (key or "-").encode(), category.encode(), when)
    crc = zlib.crc32(value, zlib.crc32(head))
    return b"%s %08x %s\n" % (head, crc, value)


def records_in(chunk: bytes, off: int, segment: str) -> Iterator[tuple[int, int, Any]]:
    """Each line of ``chunk`` (whole records read from byte ``off`` of ``segment``, the last newline
    cut off): its start, the byte after its newline, and the record (:func:`decode_record`), None
    for a damaged one, which is logged. Both spool readers parse their chunks through it."""
    for line in chunk.split(b"\n"):
        start, off = off, off + len(line) + 1
        rec = decode_record(line)
        if rec is None:
            log.error("events: spool segment %s has a damaged record at byte %d; skipping it", segment, start)
        yield start, off, rec


def decode_record(line: bytes) -> tuple[int, bytes | None, str, float, bytes] | None:
    """Parse one line (without its newline); None if it is damaged."""
    parts = line.split(b" ", 5)
    if len(parts) != 6:
        return None
    seq, key, category, when, crc, value = parts
    head = line[:len(seq) + len(key) + len(category) + len(when) + 3]
    try:
        if int(crc, 16) != zlib.crc32(value, zlib.crc32(head)):
            return None
        return int(seq), None if key == b"-" else key, category.decode(), float(when), value
    except ValueError:
        return None


def segment_ids(directory: Path) -> list[int]:
    """The segments in ``directory``, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(n[:-len(SUFFIX)]) for n in names if n.endswith(SUFFIX) and n[:-len(SUFFIX)].isdigit())


def read_cursor(directory: Path) -> tuple[int, int, int]:
    """``(seq, segment, offset)`` of the first record not acknowledged, as last written to disk."""
    try:
        seq, seg, off = (int(x) for x in (directory / "cursor").read_text().split())
        return seq, seg, off
    except FileNotFoundError:
        return 0, -1, 0
    except (OSError, ValueError):
        log.warning("events: spool cursor in %s is unreadable; resending the whole spool", directory)
        return 0, -1, 0


def _take_lock(directory: Path, name: str, busy: Callable[[str], str], wait_s: float = 0.0) -> TextIO:
    """Hold ``directory/name`` (flock) for this process, or raise UserError with ``busy(holder)``
    (after trying for ``wait_s``: a reader cleaning up a drained spool holds the writer's lock a moment)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        f = (directory / name).open("a+")
    except OSError as e:
        raise UserError(f"events.spool.dir: cannot use {directory}: {e.strerror}; choose a writable "
                        "folder") from None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() < deadline:
                time.sleep(0.05)  # polling a lock held for a moment; flock has no timeout
                continue
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(busy(holder)) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def _release(f: TextIO) -> None:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def _in_use(directory: Path) -> Callable[[str], str]:
    return lambda holder: (f"events.spool.dir: {directory} is in use by {holder}; give each pipeline its own "
                           "spool folder")


def _read_by(directory: Path) -> Callable[[str], str]:
    return lambda holder: (f"events.spool.dir: {directory} is already read by {holder} (an events delivery "
                           "process); run one delivery process per spool folder")


def write_cursor(folder: Path, cursor: tuple[int, int, int], error: str | None) -> str | None:
    """Replace the cursor file at once (a crash leaves the old or the new one, never half of one).

    ``error`` is what the last attempt said (None: it worked); returns this attempt's. A cursor the
    disk refuses only means a few more repeats after a crash, so it is logged once per outage."""
    tmp = folder / "cursor.tmp"
    try:
        tmp.write_text("{} {} {}\n".format(*cursor))
        os.replace(tmp, folder / "cursor")
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if error is None:
            log.warning("events: cannot write the spool cursor in %s (%s); delivery goes on, after a "
                        "crash some events would be sent twice", folder, e.strerror)
        return e.strerror or str(e)
    if error is not None:
        log.info("events: the spool cursor in %s is written again", folder)
    return None


class _Cursor:
    """The reading side's cursor, shared by :class:`Spool` and :class:`SpoolReader`: what was
    acknowledged, and where reading goes on. Subclasses free the segments the cursor has passed."""

    _lock: Any  # an RLock, set by the subclass
    cursor: tuple[int, int, int]
    read_pos: tuple[int, int, int]

    def _acked_through(self, segment: int) -> None:
        raise NotImplementedError

    def rewind_to_cursor(self) -> None:
        """Read again from the oldest record not acknowledged."""
        with self._lock:
            self.read_pos = self.cursor

    def ack(self, rec: Record) -> None:
        """Everything up to and including ``rec`` is delivered."""
        with self._lock:
            if rec.seq < self.cursor[0]:
                return  # already passed (dropped meanwhile)
            self.cursor = (rec.seq + 1, rec.segment, rec.end)
            self._acked_through(rec.segment)


class _Segments:
    """Appending to numbered segment files within ``max_bytes``: what :class:`Spool` and
    :class:`SpoolWriter` share. Subclasses say what reading needs to hear of it (the hooks)."""

    def __init__(self, directory: Path, max_bytes: int, overflow: str, fsync: str, fsync_interval_s: float,
                 segment_bytes: int | None) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.overflow = overflow
        self.segment_bytes = segment_bytes or min(64 << 20, max(64 << 10, max_bytes // 16))
        self._fsync = FsyncPolicy(fsync, fsync_interval_s)
        self._lock = threading.RLock()
        self._sizes: dict[int, int] = {}
        """segment id (its first seq) -> bytes, in order; the last one is being written"""
        self._fd: int | None = None
        self._closed = False
        self._torn = False
        """a failed write left bytes after the last whole record that could not be cut off yet"""
        self.next_seq = 1
        self.written_seq = 1
        """every record below this is in the segment files: a crash of this process loses none of
        them (power loss only per the fsync policy). ``next_seq`` runs ahead of it while ``append``
        is still writing, so it is what "accepted" means to anyone watching from another thread."""

    # -- hooks -------------------------------------------------------------------------------------
    def _appended(self, fresh: list[tuple[int, bytes | None, str, float, bytes, int]]) -> None:
        """After every ``append``: ``fresh`` are the records it wrote (seq, key, category, time, value,
        line length)."""

    def _reclaim(self) -> bool:
        """The spool looks full: True if room was found without dropping anything."""
        return False

    def _drop_oldest(self) -> int:
        """Delete the oldest segment to make room; return how many undelivered records went with it."""
        raise NotImplementedError

    def _rolled(self, seg: int) -> None:
        """A new segment ``seg`` was started."""

    def _delete(self, seg: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(seg).unlink()
        self._sizes.pop(seg, None)

    # -- files -------------------------------------------------------------------------------------
    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:020d}{SUFFIX}"

    def _scan_tail(self, seg: int) -> int:
        """Check the last segment: cut a record torn by a crash, return the next free seq."""
        path = self._path(seg)
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("events: spool segment %s ends in a record cut short (crash while writing); dropping "
                        "its %d byte(s)", path.name, len(data) - end)
            with path.open("r+b") as f:
                f.truncate(end)
            self._sizes[seg] = end
        next_seq = seg
        for line in data[:end].split(b"\n"):
            rec = decode_record(line) if line else None
            if rec is not None:
                next_seq = rec[0] + 1
        return next_seq

    # -- writing -----------------------------------------------------------------------------------
    def append(self, items: list[tuple[str | None, str, float, T]],
               encode: Callable[[T, int], bytes]) -> Appended:
        """Append ``(key, category, time, payload)`` records in order; durable per the fsync policy.

        ``encode(payload, seq)`` makes each record's value once its sequence number is known, so the
        number can be stamped into the event itself. A write the file system refuses does not raise:
        the result says how many records were stored and why the others were not."""
        with self._lock:
            result = Appended(self.next_seq)
            fresh: list[tuple[int, bytes | None, str, float, bytes, int]] = []
            stored = 0
            """records of ``fresh`` known to be whole in a segment file"""
            try:
                self._untear()
                buf: list[bytes] = []
                buffered = 0
                total = self._total()
                for key, category, when, payload in items:
                    value = encode(payload, self.next_seq)
                    line = encode_record(self.next_seq, key, category, when, value)
                    while total + buffered + len(line) > self.max_bytes:
                        if self._reclaim():
                            total = self._total()
                            continue
                        if self.overflow == "drop_newest" or len(line) > self.max_bytes // 2:
                            line = b""
                            break
                        stored += self._write(buf)
                        buf, buffered = [], 0
                        result.dropped_old += self._drop_oldest()
                        total = self._total()
                    if not line:
                        result.dropped_new += 1
                        continue
                    if self._fd is None or self._sizes[self._active()] + buffered >= self.segment_bytes:
                        stored += self._write(buf)
                        buf, buffered = [], 0
                        self._roll()
                        total = self._total()
                    buf.append(line)
                    fresh.append((self.next_seq, key.encode() if key else None, category, when, value,
                                  len(line)))
                    buffered += len(line)
                    self.next_seq += 1
                stored += self._write(buf)
            except _WriteFailed as e:
                stored += e.records
                result.error = e.error
            except OSError as e:
                result.error = e
            if result.error is not None:
                if not self._torn:  # (still torn: _untear tried already)
                    self._cut()
                if stored < len(fresh):
                    self.next_seq = fresh[stored][0]  # numbers of records not stored are used again
                del fresh[stored:]
                result.failed = len(items) - stored - result.dropped_new
            result.written = stored
            self.written_seq = self.next_seq
            self._appended(fresh)
            if stored and self._fd is not None:
                try:
                    self._fsync.after_write(self._fd)
                except OSError as e:  # the records are in the file (and are sent); the disk is in trouble
                    result.error = result.error or e
            return result

    def _untear(self) -> None:
        """Before writing: cut off what an earlier failed write left, if that could not be done then."""
        if self._torn:
            self._cut()
            if self._torn:
                raise OSError(errno.EIO, "cannot cut a torn record off the spool segment")

    def _cut(self) -> None:
        """Make the active segment end at its last whole record (what ``_sizes`` says)."""
        self._torn = False
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_size != self._sizes[self._active()]:
                os.ftruncate(self._fd, self._sizes[self._active()])
        except OSError as e:
            self._torn = True
            log.error("events: cannot cut a torn record off spool segment %s (%s); trying again before the "
                      "next write", self._path(self._active()).name, e.strerror)

    def _active(self) -> int:
        return next(reversed(self._sizes))

    def _total(self) -> int:
        return sum(self._sizes.values())

    def _write(self, buf: list[bytes]) -> int:
        """Write ``buf`` to the active segment; returns how many records it held.

        On a failure the whole records that reached the file count as written and the error is
        raised as ``_WriteFailed``; the caller cuts off the torn rest."""
        if not buf:
            return 0
        assert self._fd is not None
        records, whole, e = write_records(self._fd, buf)
        self._sizes[self._active()] += whole
        if e is not None:
            raise _WriteFailed(records, e) from e
        return records

    def _roll(self) -> None:
        """Start a new segment at ``next_seq``."""
        if self._fd is not None:
            self._fsync.sync(self._fd)
            os.close(self._fd)
            self._fd = None
        seg = self.next_seq
        if seg in self._sizes:  # an empty active segment left by recovery: reuse it
            self._fd = os.open(self._path(seg), os.O_WRONLY | os.O_APPEND)
            return
        self._fd = os.open(self._path(seg), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o640)
        self._sizes[seg] = 0
        self._rolled(seg)
        if self._fsync.mode != "never":
            self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- state -------------------------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        """Bytes of segment files on disk."""
        with self._lock:
            return self._total()

    def tick(self) -> None:
        """Called when idle: fsync per an interval policy."""
        with self._lock:
            if self._fd is not None:
                self._fsync.tick(self._fd)

    def __enter__(self) -> _Segments:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    def _close_segment(self) -> None:
        """Sync and close the segment being appended to (at close; the caller holds the lock)."""
        if self._fd is None:
            return
        try:
            self._fsync.sync(self._fd)
        except OSError as e:
            log.error("events: fsync of the spool in %s failed at close (%s)", self.dir, e.strerror)
        os.close(self._fd)
        self._fd = None


class Spool(_Cursor, _Segments):
    """A bounded, append-only, crash-safe event log with one reader, in one process. Thread-safe."""

    in_flight_drops_counted = False
    """records read (in flight) and then deleted to make room are counted by the sender, not here"""

    def __init__(self, directory: Path, max_bytes: int, overflow: str = "drop_oldest",
                 fsync: str = "interval", fsync_interval_s: float = 1.0,
                 segment_bytes: int | None = None) -> None:
        super().__init__(directory, max_bytes, overflow, fsync, fsync_interval_s, segment_bytes)
        self.corrupt = 0
        """records found damaged on disk and skipped (each one lost)"""
        self._lockf = _take_lock(self.dir, "lock", _in_use(self.dir))
        try:
            self._readlockf = _take_lock(self.dir, "reader.lock", _read_by(self.dir))
        except UserError:
            _release(self._lockf)
            raise
        self._reader: tuple[int, BinaryIO] | None = None
        self._tail: deque[Record] = deque()
        """the newest records as written, so a reader that keeps up never reads the disk back"""
        self._tail_bytes = 0
        self._cursor_error: str | None = None
        self._recover()

    # -- opening -----------------------------------------------------------------------------------
    def _recover(self) -> None:
        segs = segment_ids(self.dir)
        for seg in segs:
            self._sizes[seg] = self._path(seg).stat().st_size
        cseq, cseg, coff = read_cursor(self.dir)
        self.next_seq = max(cseq, 1)
        if segs:
            self.next_seq = max(self.next_seq, self._scan_tail(segs[-1]))
        self.written_seq = self.next_seq
        # the cursor may point into a segment deleted after it was written: start at the first one left
        if cseg not in self._sizes or coff > self._sizes[cseg]:
            later = [s for s in segs if s >= cseq] or segs[-1:]
            cseg, coff = (later[0], 0) if later else (self.next_seq, 0)
            cseq = max(cseq, cseg) if later else self.next_seq
        self.cursor = (cseq, cseg, coff)
        self.read_pos = self.cursor
        for seg in [s for s in segs if s < cseg]:
            self._delete(seg)
        if self.pending:
            log.info("events: spool %s holds %d undelivered event(s) from an earlier run", self.dir,
                     self.pending)

    # -- writing -----------------------------------------------------------------------------------
    def _appended(self, fresh: list[tuple[int, bytes | None, str, float, bytes, int]]) -> None:
        self._remember(fresh)

    def _remember(self, fresh: list[tuple[int, bytes | None, str, float, bytes, int]]) -> None:
        """Keep what was just written in memory (bounded) for the reader; positions are computed back
        from the active segment's end, where these records are the last ones."""
        if not fresh:
            return
        seg = self._active()
        end = self._sizes[seg]
        recs = []
        for seq, key, category, when, value, n in reversed(fresh):
            if end - n < 0:
                break  # earlier records of this call went to the previous segment: not kept
            recs.append(Record(seq, key, category, when, value, seg, end - n, end))
            end -= n
        recs.reverse()
        tail = self._tail
        if tail and recs and tail[-1].seq + 1 != recs[0].seq:
            tail.clear()
            self._tail_bytes = 0
        tail.extend(recs)
        self._tail_bytes += sum(len(r.value) for r in recs)
        while tail and (len(tail) > TAIL_RECORDS or self._tail_bytes > TAIL_BYTES):
            self._tail_bytes -= len(tail.popleft().value)

    def _rolled(self, seg: int) -> None:
        if len(self._sizes) == 1 and self.cursor[1] != seg and self.cursor[0] >= seg:
            self.cursor = self.read_pos = (seg, seg, 0)

    def _drop_oldest(self) -> int:
        """Delete the oldest segment to make room; return how many never-sent records went with it."""
        segs = list(self._sizes)
        if len(segs) == 1:
            self._roll()  # the active segment is the only one: close it so it can go
            segs = list(self._sizes)
        oldest, following = segs[0], segs[1]
        lost = max(0, following - max(self.read_pos[0], oldest))
        self._delete(oldest)
        if self.cursor[0] < following:
            self.cursor = (following, following, 0)
        if self.read_pos[0] < following:
            self.read_pos = (following, following, 0)
        return lost

    def _delete(self, seg: int) -> None:
        while self._tail and self._tail[0].segment == seg:
            self._tail_bytes -= len(self._tail.popleft().value)
        if self._reader is not None and self._reader[0] == seg:
            self._reader[1].close()
            self._reader = None
        super()._delete(seg)

    # -- reading -----------------------------------------------------------------------------------
    def read(self, max_records: int, max_bytes: int = 1 << 20) -> list[Record]:
        """The next records after the last one read, in order (none when caught up)."""
        out: list[Record] = []
        got = 0
        with self._lock:
            seq, seg, off = self.read_pos
            tail = self._tail
            if tail and tail[0].seq <= seq <= tail[-1].seq and seg in self._sizes:
                i = seq - tail[0].seq
                if tail[i].segment == seg and tail[i].start == off:
                    while i < len(tail) and len(out) < max_records and got < max_bytes:
                        rec = tail[i]
                        if rec.segment not in self._sizes:
                            break
                        out.append(rec)
                        got += len(rec.value)
                        i += 1
                    last = out[-1]
                    self.read_pos = (last.seq + 1, last.segment, last.end)
                    return out
            while len(out) < max_records and got < max_bytes and seq < self.next_seq:
                size = self._sizes.get(seg)
                if size is None or off >= size:
                    later = [s for s in self._sizes if s > seg]
                    if not later:
                        break
                    seg, off = later[0], 0
                    seq = max(seq, seg)
                    continue
                f = self._reader_file(seg)
                f.seek(off)
                chunk = f.read(min(size - off, max(65536, max_bytes - got)))
                cut = chunk.rfind(b"\n")
                if cut < 0:
                    chunk = chunk + f.readline()  # one record longer than the chunk
                    cut = len(chunk) - 1
                for start, end, rec in records_in(chunk[:cut], off, self._path(seg).name):
                    off = end
                    if rec is None:
                        self.corrupt += 1
                        continue
                    seq = rec[0] + 1
                    out.append(Record(rec[0], rec[1], rec[2], rec[3], rec[4], seg, start, off))
                    got += off - start - 1
                    if len(out) >= max_records or got >= max_bytes:
                        break
            self.read_pos = (seq, seg, off)
        return out

    def _reader_file(self, seg: int) -> BinaryIO:
        if self._reader is None or self._reader[0] != seg:
            if self._reader is not None:
                self._reader[1].close()
            self._reader = (seg, self._path(seg).open("rb"))
        return self._reader[1]

    def rewind(self, rec: Record) -> int:
        """Read again from ``rec`` (it failed); returns the seq reading resumes at, which is later than
        ``rec.seq`` when the records from there on were dropped meanwhile (drop_oldest)."""
        with self._lock:
            if rec.seq >= self.cursor[0] and rec.segment in self._sizes:
                self.read_pos = (rec.seq, rec.segment, rec.start)
            else:
                self.read_pos = self.cursor
            return self.read_pos[0]

    def _acked_through(self, segment: int) -> None:
        for seg in [s for s in self._sizes if s < segment]:
            self._delete(seg)

    # -- state -------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Records accepted and not yet acknowledged."""
        return max(0, self.next_seq - self.cursor[0])

    @property
    def unread(self) -> int:
        return max(0, self.next_seq - self.read_pos[0])

    def commit(self, compact: bool = False) -> None:
        """Write the cursor to disk; with ``compact``, delete the segments of a fully delivered spool.

        A cursor the disk refuses (full) is not an error for the caller: the one on disk is older, so
        after a crash a few more records are sent twice, none is skipped; it is written again next time."""
        with self._lock:
            if compact and self.pending == 0 and self._sizes and self._total() > 0:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                for seg in list(self._sizes):
                    self._delete(seg)
                self.cursor = self.read_pos = (self.next_seq, self.next_seq, 0)
            self._cursor_error = write_cursor(self.dir, self.cursor, self._cursor_error)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_segment()
            if self._reader is not None:
                self._reader[1].close()
                self._reader = None
            self.commit()
            with contextlib.suppress(OSError):
                if self._fsync.mode != "never":
                    self._sync_dir()
            _release(self._readlockf)
            _release(self._lockf)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


HEAD_BYTES = 21
"""``head``: the writer's written_seq, 20 digits and a newline, rewritten in place"""
CHUNK = 1 << 20
"""most bytes the reader reads from a segment at once (what it does not use is read again)"""


class SpoolWriter(_Segments):
    """The appending half of a spool whose records another process delivers (``events.delivery:
    process``): the pipeline's side. Thread-safe; see the module docstring for how the two halves
    keep out of each other's way."""

    def __init__(self, directory: Path, max_bytes: int, overflow: str = "drop_oldest",
                 fsync: str = "interval", fsync_interval_s: float = 1.0,
                 segment_bytes: int | None = None) -> None:
        super().__init__(directory, max_bytes, overflow, fsync, fsync_interval_s, segment_bytes)
        self._lockf = _take_lock(self.dir, "lock", _in_use(self.dir), wait_s=2.0)
        try:
            self._head = os.open(self.dir / "head", os.O_RDWR | os.O_CREAT, 0o640)
            self._recover()
        except OSError as e:
            _release(self._lockf)
            raise UserError(f"events.spool.dir: cannot use {self.dir}: {e.strerror}; choose a writable "
                            "folder") from None

    def _recover(self) -> None:
        for seg in segment_ids(self.dir):
            with contextlib.suppress(FileNotFoundError):  # delivered and deleted by the reader meanwhile
                self._sizes[seg] = self._path(seg).stat().st_size
        data = os.pread(self._head, HEAD_BYTES, 0)
        head = int(data) if data.strip().isdigit() else 0
        self.next_seq = max(read_cursor(self.dir)[0], head, 1)
        if self._sizes:
            self.next_seq = max(self.next_seq, self._scan_tail(self._active()))
        self.written_seq = self.next_seq
        self._publish()

    def _publish(self) -> None:
        """Tell the reader how far records are written (a hint: see the module docstring)."""
        with contextlib.suppress(OSError):  # a full disk: the reader reads the files all the same
            os.pwrite(self._head, b"%020d\n" % self.written_seq, 0)

    def _appended(self, fresh: list[tuple[int, bytes | None, str, float, bytes, int]]) -> None:
        if fresh:
            self._publish()

    def _refresh(self) -> None:
        """Forget segments the reader has deleted (delivered)."""
        present = set(segment_ids(self.dir))
        active = self._active() if self._fd is not None else None
        for seg in [s for s in self._sizes if s not in present and s != active]:
            del self._sizes[seg]

    def _reclaim(self) -> bool:
        before = self._total()
        self._refresh()
        return self._total() < before

    def _rolled(self, seg: int) -> None:
        self._refresh()

    def _drop_oldest(self) -> int:
        """Delete the oldest segment to make room; return how many of its records the reader had not
        acknowledged (per the cursor on disk): they are lost, counted here and nowhere else."""
        segs = list(self._sizes)
        if len(segs) == 1:
            self._roll()  # the active segment is the only one: close it so it can go
            segs = list(self._sizes)
        if len(segs) < 2:
            return 0
        oldest, following = segs[0], segs[1]
        lost = max(0, following - max(read_cursor(self.dir)[0], oldest))
        self._delete(oldest)
        return lost

    @property
    def bytes(self) -> int:
        """Bytes of segment files on disk."""
        with self._lock:
            self._refresh()
            return self._total()

    @property
    def pending(self) -> int:
        """Records written and not yet acknowledged by the reader (per the cursor on disk)."""
        return max(0, self.written_seq - read_cursor(self.dir)[0])

    def close(self) -> None:
        """Sync and release the spool; a spool the reader has fully delivered is emptied."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_segment()
            if read_cursor(self.dir)[0] >= self.written_seq:  # all delivered: the files can go
                for seg in segment_ids(self.dir):
                    self._delete(seg)
            self._publish()
            with contextlib.suppress(OSError):
                if self._fsync.mode != "never":
                    os.fsync(self._head)
                    self._sync_dir()
            os.close(self._head)
            _release(self._lockf)

    def __enter__(self) -> SpoolWriter:
        return self


class SpoolReader(_Cursor):
    """The reading half of a spool another process writes (``events.delivery: process``): the
    delivery process's side. Same reading interface as :class:`Spool`. Thread-safe."""

    in_flight_drops_counted = True
    """records deleted to make room are counted by the writer, in flight or not"""

    def __init__(self, directory: Path, index: int = 0) -> None:
        self.dir = Path(directory)
        self.index = index
        """this spool's number among those one delivery process reads (``Record.spool``)"""
        self.corrupt = 0
        """records found damaged on disk and skipped (each one lost)"""
        self._lock = threading.RLock()
        self._lockf = _take_lock(self.dir, "reader.lock", _read_by(self.dir))
        self._fd: int | None = None
        self._fd_seg = -1
        self._head_fd: int | None = None
        self._dry: tuple[int, int] | None = None
        """(read seq, head) when ``head`` promised records that the files did not hold"""
        self._cursor_error: str | None = None
        self._closed = False
        segs = segment_ids(self.dir)
        cseq, cseg, coff = read_cursor(self.dir)
        cseq = max(cseq, 1)  # numbering starts at 1
        if cseg not in segs or coff > self._size(cseg):
            # the cursor's segment is gone (made room for newer ones): on with the next one left
            later = [s for s in segs if s > cseg]
            if later:
                cseq, cseg, coff = max(cseq, later[0]), later[0], 0
        self.cursor = (cseq, cseg, coff)
        self.read_pos = self.cursor
        self._committed: tuple[int, int, int] | None = None
        self._acked_seg = cseg
        self._delete_before(cseg)
        if self.pending:
            log.info("events: spool %s holds %d undelivered event(s)", self.dir, self.pending)

    # -- files -------------------------------------------------------------------------------------
    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:020d}{SUFFIX}"

    def _size(self, seg: int) -> int:
        try:
            return self._path(seg).stat().st_size
        except FileNotFoundError:
            return -1

    def _file(self, seg: int) -> int | None:
        """An open descriptor of segment ``seg``; None if there is no such file."""
        if self._fd_seg != seg or self._fd is None:
            self._close_file()
            if seg < 0:
                return None
            try:
                self._fd = os.open(self._path(seg), os.O_RDONLY)
            except FileNotFoundError:
                return None
            self._fd_seg = seg
        return self._fd

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._fd_seg = -1

    def _next_segment(self, seg: int) -> int | None:
        return next((s for s in segment_ids(self.dir) if s > seg), None)

    def _head(self) -> int:
        """The writer's written_seq as it last told it (0 when it never has)."""
        if self._head_fd is None:
            try:
                self._head_fd = os.open(self.dir / "head", os.O_RDONLY)
            except FileNotFoundError:
                return 0
        data = os.pread(self._head_fd, HEAD_BYTES, 0)
        return int(data) if data.strip().isdigit() else 0

    def _delete_before(self, seg: int) -> None:
        """Delete the segments older than ``seg`` (delivered, or dropped by the writer)."""
        for s in segment_ids(self.dir):
            if s >= seg:
                break
            if s == self._fd_seg:
                self._close_file()
            with contextlib.suppress(FileNotFoundError):
                self._path(s).unlink()

    # -- reading -----------------------------------------------------------------------------------
    def read(self, max_records: int, max_bytes: int = 1 << 20) -> list[Record]:
        """The next whole records after the last one read, in order (none when caught up)."""
        out: list[Record] = []
        got = 0
        with self._lock:
            seq, seg, off = self.read_pos
            while len(out) < max_records and got < max_bytes:
                fd = self._file(seg)
                st = os.fstat(fd) if fd is not None else None
                if st is not None and st.st_nlink == 0:
                    self._close_file()  # deleted; a new file of the same name may be there (an empty
                    fd = self._file(seg)  # segment, deleted with a drained spool, started again)
                    st = os.fstat(fd) if fd is not None else None
                if st is None or st.st_nlink == 0:
                    # deleted by the writer to make room (counted there), or emptied after delivery
                    self._close_file()
                    nxt = self._next_segment(seg)
                    if nxt is None:
                        break
                    seq, seg, off = max(seq, nxt), nxt, 0
                    continue
                size = st.st_size
                if off >= size:
                    nxt = self._next_segment(seg)
                    if nxt is None or os.fstat(fd).st_size > off:
                        if nxt is None:
                            break
                        continue  # it grew before the writer moved on: read that first
                    seq, seg, off = max(seq, nxt), nxt, 0
                    continue
                chunk = os.pread(fd, min(size - off, max(65536, min(max_bytes - got, CHUNK))), off)
                cut = chunk.rfind(b"\n")
                if cut < 0 and off + len(chunk) < size:
                    chunk = os.pread(fd, size - off, off)  # one record longer than the chunk
                    cut = chunk.rfind(b"\n")
                if cut < 0:
                    # a record without its newline: still being written, or torn by a crash when the
                    # writer has moved on to a later segment since (a writer that starts again cuts it)
                    nxt = self._next_segment(seg)
                    now = os.fstat(fd).st_size
                    if nxt is None or now != size:
                        if nxt is None:
                            break
                        continue  # finished meanwhile, or cut off by a writer that started again
                    log.warning("events: spool segment %s ends in a record cut short (crash while writing); "
                                "skipping its %d byte(s)", self._path(seg).name, size - off)
                    seq, seg, off = max(seq, nxt), nxt, 0
                    continue
                for start, end, rec in records_in(chunk[:cut], off, self._path(seg).name):
                    off = end
                    if rec is None:
                        self.corrupt += 1
                        continue
                    if rec[0] < seq:
                        continue  # before the cursor (a segment read again from its start)
                    seq = rec[0] + 1
                    out.append(Record(rec[0], rec[1], rec[2], rec[3], rec[4], seg, start, off, self.index))
                    got += off - start - 1
                    if len(out) >= max_records or got >= max_bytes:
                        break
            self.read_pos = (seq, seg, off)
        return out

    def rewind(self, rec: Record) -> int:
        """Read again from ``rec`` (it failed); returns the seq reading resumes at, which is later than
        ``rec.seq`` when its segment was deleted meanwhile to make room (drop_oldest)."""
        with self._lock:
            if rec.seq >= self.cursor[0] and self._path(rec.segment).exists():
                self.read_pos = (rec.seq, rec.segment, rec.start)
            else:
                seq, seg, off = self.cursor
                if not self._path(seg).exists():  # deleted to make room: on with the next one left
                    nxt = self._next_segment(seg)
                    if nxt is not None:
                        seq, seg, off = max(seq, nxt), nxt, 0
                self.read_pos = (seq, seg, off)
            return self.read_pos[0]

    def _acked_through(self, segment: int) -> None:
        if segment != self._acked_seg:
            self._acked_seg = segment
            self._delete_before(segment)

    # -- state -------------------------------------------------------------------------------------
    @property
    def unread(self) -> int:
        """Records written and not read yet (exact while the writer keeps ``head``; else at least 1
        when there is one)."""
        with self._lock:
            seq = self.read_pos[0]
            head = self._head()
            if head > seq and self._dry != (seq, head):
                return head - seq
            # nothing more by the head (or the files did not hold what it said): look at the files
            pos = self.read_pos
            recs = self.read(1)
            if not recs:
                if head > self.read_pos[0]:
                    self._dry = (self.read_pos[0], head)
                return 0
            if self.read_pos != pos:
                self.read_pos = (recs[0].seq, recs[0].segment, recs[0].start)
            return max(1, head - recs[0].seq)

    @property
    def pending(self) -> int:
        """Records written and not yet acknowledged."""
        with self._lock:
            return max(0, self.read_pos[0] - self.cursor[0]) + self.unread

    @property
    def bytes(self) -> int:
        """Bytes of segment files on disk."""
        return sum(max(0, self._size(s)) for s in segment_ids(self.dir))

    def commit(self, compact: bool = False) -> None:
        """Write the cursor to disk (the reader's file alone). Delivered segments are deleted as the
        cursor passes them; the newest one stays (the writer may be appending to it), so ``compact``
        has nothing more to do. A cursor the disk refuses only means a few more repeats after a crash."""
        with self._lock:
            if self.cursor == self._committed and self._cursor_error is None:
                return  # nothing new: spare the disk a rewrite every fraction of a second
            self._cursor_error = write_cursor(self.dir, self.cursor, self._cursor_error)
            if self._cursor_error is None:
                self._committed = self.cursor

    def tick(self) -> None:
        """Nothing to sync: the reader writes only its cursor."""

    def close(self) -> None:
        """Write the cursor and release the spool; a drained spool no writer uses is emptied."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.commit()
            drained = self.pending == 0 and self._cursor_error is None
            self._close_file()
            if drained:
                self._empty_if_unused()
            if self._head_fd is not None:
                os.close(self._head_fd)
                self._head_fd = None
            _release(self._lockf)

    def _empty_if_unused(self) -> None:
        """Delete the segments of a delivered spool while holding the writer's lock (a writer that
        starts meanwhile waits a moment for it): numbering goes on from the cursor (and ``head``)."""
        try:
            f = (self.dir / "lock").open("a+")
        except OSError:
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return  # a writer runs: the newest segment is its own
        try:
            if read_cursor(self.dir)[0] >= self._head():
                for seg in segment_ids(self.dir):
                    with contextlib.suppress(FileNotFoundError):
                        self._path(seg).unlink()
        finally:
            _release(f)

    def __enter__(self) -> SpoolReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
