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
- ``lock``: held (flock) by the process using the spool, so two pipelines never share one.

The spool is bounded by ``max_bytes``. When full, ``drop_oldest`` deletes the oldest segment
(its undelivered records are counted as dropped) and ``drop_newest`` refuses new records
(counted); both are reported to the caller, which raises the alarm.

When the file system refuses a write (no space, quota, I/O error), ``append`` keeps the records
that reached the file whole, cuts a record torn by the failed write off the segment (so the next
record starts on a line of its own), reuses the sequence numbers of the records it could not
write, and reports them and the error to the caller instead of raising. Nothing written before
is touched; the next ``append`` simply tries again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

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


class Spool:
    """A bounded, append-only, crash-safe event log with one reader. Thread-safe."""

    def __init__(self, directory: Path, max_bytes: int, overflow: str = "drop_oldest",
                 fsync: str = "interval", fsync_interval_s: float = 1.0,
                 segment_bytes: int | None = None) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.overflow = overflow
        self.segment_bytes = segment_bytes or min(64 << 20, max(64 << 10, max_bytes // 16))
        self._fsync = FsyncPolicy(fsync, fsync_interval_s)
        self._lock = threading.RLock()
        self.corrupt = 0
        """records found damaged on disk and skipped (each one lost)"""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lockf = (self.dir / "lock").open("a+")
        except OSError as e:
            raise UserError(f"events.spool.dir: cannot use {self.dir}: {e.strerror}; choose a writable "
                            "folder") from None
        try:
            fcntl.flock(self._lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lockf.seek(0)
            holder = self._lockf.read().strip() or "another process"
            self._lockf.close()
            raise UserError(f"events.spool.dir: {self.dir} is in use by {holder}; give each pipeline its own "
                            "spool folder") from None
        self._lockf.seek(0)
        self._lockf.truncate()
        self._lockf.write(f"pid {os.getpid()}\n")
        self._lockf.flush()
        self._sizes: dict[int, int] = {}
        """segment id (its first seq) -> bytes, in order; the last one is being written"""
        self._fd: int | None = None
        self._reader: tuple[int, BinaryIO] | None = None
        self._tail: deque[Record] = deque()
        """the newest records as written, so a reader that keeps up never reads the disk back"""
        self._tail_bytes = 0
        self._closed = False
        self._torn = False
        """a failed write left bytes after the last whole record that could not be cut off yet"""
        self._cursor_error: str | None = None
        self._recover()

    # -- opening -----------------------------------------------------------------------------------
    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:020d}{SUFFIX}"

    def _recover(self) -> None:
        segs = sorted(int(p.name[:-len(SUFFIX)]) for p in self.dir.glob("*" + SUFFIX)
                      if p.name[:-len(SUFFIX)].isdigit())
        for seg in segs:
            self._sizes[seg] = self._path(seg).stat().st_size
        cseq, cseg, coff = self._read_cursor()
        self.next_seq = max(cseq, 1)
        if segs:
            self.next_seq = max(self.next_seq, self._scan_tail(segs[-1]))
        self.written_seq = self.next_seq
        """every record below this is in the segment files: a crash of this process loses none of
        them (power loss only per the fsync policy). ``next_seq`` runs ahead of it while ``append``
        is still writing, so it is what "accepted" means to anyone watching from another thread."""
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

    def _read_cursor(self) -> tuple[int, int, int]:
        try:
            seq, seg, off = (int(x) for x in (self.dir / "cursor").read_text().split())
            return seq, seg, off
        except FileNotFoundError:
            return 0, -1, 0
        except (OSError, ValueError):
            log.warning("events: spool cursor in %s is unreadable; resending the whole spool", self.dir)
            return 0, -1, 0

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
            self._remember(fresh)
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
        if len(self._sizes) == 1 and self.cursor[1] != seg and self.cursor[0] >= seg:
            self.cursor = self.read_pos = (seg, seg, 0)
        if self._fsync.mode != "never":
            self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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
        with contextlib.suppress(FileNotFoundError):
            self._path(seg).unlink()
        self._sizes.pop(seg, None)

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
                for line in chunk[:cut].split(b"\n"):
                    start, off = off, off + len(line) + 1
                    rec = decode_record(line)
                    if rec is None:
                        self.corrupt += 1
                        log.error("events: spool segment %s has a damaged record at byte %d; skipping it",
                                  self._path(seg).name, start)
                        continue
                    seq = rec[0] + 1
                    out.append(Record(rec[0], rec[1], rec[2], rec[3], rec[4], seg, start, off))
                    got += len(line)
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
            for seg in [s for s in self._sizes if s < rec.segment]:
                self._delete(seg)

    # -- state -------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Records accepted and not yet acknowledged."""
        return max(0, self.next_seq - self.cursor[0])

    @property
    def unread(self) -> int:
        return max(0, self.next_seq - self.read_pos[0])

    @property
    def bytes(self) -> int:
        """Bytes of segment files on disk."""
        with self._lock:
            return self._total()

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
            tmp = self.dir / "cursor.tmp"
            try:
                tmp.write_text("{} {} {}\n".format(*self.cursor))
                os.replace(tmp, self.dir / "cursor")
            except OSError as e:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                if self._cursor_error is None:
                    log.warning("events: cannot write the spool cursor in %s (%s); delivery goes on, after a "
                                "crash some events would be sent twice", self.dir, e.strerror)
                self._cursor_error = e.strerror or str(e)
                return
            if self._cursor_error is not None:
                log.info("events: the spool cursor in %s is written again", self.dir)
                self._cursor_error = None

    def tick(self) -> None:
        """Called when idle: fsync per an interval policy."""
        with self._lock:
            if self._fd is not None:
                self._fsync.tick(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._fd is not None:
                try:
                    self._fsync.sync(self._fd)
                except OSError as e:
                    log.error("events: fsync of the spool in %s failed at close (%s)", self.dir, e.strerror)
                os.close(self._fd)
                self._fd = None
            if self._reader is not None:
                self._reader[1].close()
                self._reader = None
            self.commit()
            with contextlib.suppress(OSError):
                if self._fsync.mode != "never":
                    self._sync_dir()
            fcntl.flock(self._lockf, fcntl.LOCK_UN)
            self._lockf.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
