"""The audit log: who watched which stream, who changed what, who was refused, and incidents.

A control room must be able to show afterwards who saw or changed what. Each record is one JSON
line ``{"seq", "time", "action", "user", ..., "prev"}`` where ``prev`` is the sha256 (hex) of
the previous line's bytes (64 zeros for the first line), so editing, deleting or reordering a
line breaks the chain at that point, and ``stream-redact audit verify`` names the line. The chain
cannot show a change to the very last line, nor stop someone who rewrites every line after the
one they changed: the copy of each record sent as an ``audit.*`` event (``audit.events``) is the
anchor off the machine for that.

Records are handed to one writer thread (never blocking the event loop or a redaction thread),
which appends them and fsyncs after each batch, so a crash loses at most the records handed over
in the last few milliseconds. A full queue (the disk stalled) or a failed write drops records
and counts them; the next record written says how many (``audit.log.records_lost``). One
process owns a file (an exclusive lock): ``run --workers N`` gives each worker its own.

Reopening a file continues its chain. A last line torn by a crash is never silently chained
over: it is ended with a newline and the next record, ``audit.log.resumed_after_damage``, names
its line number and hash, which ``verify`` accepts as a known gap. A file whose last whole line
is not a record at all is moved aside (``<name>.damaged-<time>``) and a new chain starts, whose
first record names it. Other code records through :meth:`AuditLog.record`; the zones API, for
instance: ``audit.record("audit.zones.changed", user, stream_id=..., address=..., old=..., new=...)``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from stream.core.errors import UserError
from stream.core.frames import Failure
from stream.core.observe import Observer
from stream.core.urls import mask_url
from stream.events import schema

if TYPE_CHECKING:
    from stream.config import PipelineConfig

log = logging.getLogger(__name__)

ZERO = "0" * 64
"""the ``prev`` of a chain's first record"""
ACTIONS = schema.AUDIT_ACTIONS
"""every record's action; each is also the event type ``stream-redact.<action>``"""
RESERVED = ("seq", "time", "action", "user", "prev")
QUEUE = 10_000
"""records waiting for the writer before new ones are dropped (and counted)"""
RECENT = 1000
"""records kept in memory for ``GET /api/audit``"""
RETRY_S = 1.0
SECRET_KEYS = frozenset({"password", "sasl_password", "token", "secret", "authorization"})


class Sink(Protocol):
    def submit(self, event: dict[str, Any]) -> bool: ...


def masked(doc: Any) -> Any:
    """``doc`` (e.g. a stream config as JSON) with every URL's credentials and query values masked
    and secret-named keys blanked, fit for the audit log."""
    if isinstance(doc, dict):
        return {k: "***" if str(k).lower() in SECRET_KEYS and v is not None else masked(v)
                for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [masked(v) for v in doc]
    if isinstance(doc, str) and "://" in doc:
        return mask_url(doc)
    return doc


def line_hash(line: bytes) -> str:
    """The ``prev`` of the record after ``line`` (the line's bytes without its newline)."""
    return hashlib.sha256(line).hexdigest()


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("seq"), int) \
            or not isinstance(doc.get("prev"), str) or not isinstance(doc.get("action"), str):
        return None
    return doc


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def process_path(path: Path, process: str) -> Path:
    """``audit.jsonl`` -> ``audit.worker-0.jsonl``: one chain per process of ``run --workers N``."""
    return path.with_name(f"{path.stem}.{process}{path.suffix}")


@dataclass
class _Tail:
    seq: int = 0
    prev: str = ZERO
    size: int = 0
    damage: dict[str, Any] | None = None
    """a torn last line: its line number, length and sha256 (for ``resumed_after_damage``)"""
    moved: Path | None = None


def _read_back(fd: int, size: int) -> bytes:
    """The file's last whole line and what follows it (a torn line), or the whole file if shorter."""
    block = 64 * 1024
    start = size
    while True:
        start = max(0, start - block)
        data = os.pread(fd, size - start, start)
        if start == 0:
            return data
        if data.count(b"\n") >= 2:
            return data[data.index(b"\n") + 1:]  # before the first newline: part of an earlier line
        block *= 2


def _count_lines(fd: int, end: int) -> int:
    n, pos = 0, 0
    while pos < end:
        chunk = os.pread(fd, min(1 << 20, end - pos), pos)
        if not chunk:
            break
        n += chunk.count(b"\n")
        pos += len(chunk)
    return n


def _resume(fd: int, path: Path) -> _Tail:
    """Where the chain in ``fd`` goes on (see the module's doc for damaged files)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return _Tail()
    lines = _read_back(fd, size).split(b"\n")
    tail = lines.pop()  # after the last newline: b"" unless the last line was torn
    last = lines[-1] if lines else None
    if tail:
        whole = _parse(tail)
        if whole is not None and (last is None or ((p := _parse(last)) is not None
                                  and whole["prev"] == line_hash(last) and whole["seq"] == p["seq"] + 1)):
            os.write(fd, b"\n")  # written whole but for its newline: it is a record
            return _Tail(whole["seq"], line_hash(tail), size + 1)
        lineno = _count_lines(fd, size) + 1
        damage = {"damaged_line": lineno, "damaged_bytes": len(tail), "damaged_sha256": line_hash(tail)}
        log.error("audit log %s: its last line (line %d, %d bytes) is torn, as a crash while writing "
                  "leaves it; it is kept, and the next record (audit.log.resumed_after_damage) names it",
                  path, lineno, len(tail))
        os.write(fd, b"\n")
        size += 1
        if last is None:
            return _Tail(0, ZERO, size, damage)
        p = _parse(last)
        if p is not None:
            return _Tail(p["seq"], line_hash(last), size, damage)
    elif last is not None and (p := _parse(last)) is not None:
        return _Tail(p["seq"], line_hash(last), size)
    return _Tail(moved=path)  # the last whole line is not a record: the caller moves the file aside


def _open_locked(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise UserError(f"cannot open audit log {path}: {e.strerror}; choose a writable audit.path",
                        exit_code=2) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(f"audit log {path} is in use by another process; give each process its own "
                            "audit.path", exit_code=2) from None
        raise UserError(f"cannot lock audit log {path}: {e.strerror}", exit_code=2) from None
    return fd


class AuditLog:
    """An append-only, hash-chained JSON Lines file with one writer thread."""

    def __init__(self, path: Path, sink: Sink | None = None, source: str = "/stream-redact",
                 process: str = "main", queue_size: int = QUEUE) -> None:
        from stream import __version__

        self.path, self.sink, self.source, self.queue_size = path, sink, source, queue_size
        self._fd = _open_locked(path)
        try:
            tail = _resume(self._fd, path)
            if tail.moved is not None:
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                aside = path.with_name(f"{path.name}.damaged-{stamp}")
                os.rename(path, aside)
                log.error("audit log %s: its last line is not an audit record (edited, or not an audit "
                          "log); moved to %s, a new chain starts (run `stream-redact audit verify %s`)",
                          path, aside, aside)
                os.close(self._fd)
                self._fd = _open_locked(path)
                tail = _Tail(moved=aside)
        except OSError as e:
            os.close(self._fd)
            raise UserError(f"cannot read audit log {path}: {e.strerror}", exit_code=2) from None
        self._seq, self._prev, self._size = tail.seq, tail.prev, tail.size or os.fstat(self._fd).st_size
        self._cond = threading.Condition()
        self._pending: deque[tuple[str, float, str | None, dict[str, Any]]] = deque()
        self._queued = self._done = 0
        self._lost = 0
        self._lost_span: tuple[float, float] | None = None
        self._closing = False
        self.problem: str | None = None
        self.written = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
        self._thread.start()
        if tail.damage is not None:
            self.record("audit.log.resumed_after_damage", None, **tail.damage)
        opened: dict[str, Any] = {"process": process, "pid": os.getpid(), "version": __version__}
        if tail.moved is not None:
            opened["damaged_file"] = str(tail.moved)
        self.record("audit.log.opened", None, **opened)

    # -- recording ---------------------------------------------------------------------------------
    def record(self, action: str, user: str | None = None, **fields: Any) -> bool:
        """Hand a record to the writer without blocking; False when it was dropped (queue full or the
        log closed: counted, and said in the next record written)."""
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}; add it to stream.events.audit.ACTIONS "
                             "and the event schema")
        bad = [k for k in fields if k in RESERVED]
        if bad:
            raise ValueError(f"audit field(s) {bad} are set by the log itself")
        now = time.time()
        data = json.loads(json.dumps(fields, default=str))  # a copy: later changes by the caller do not count
        with self._cond:
            if self._closing or len(self._pending) >= self.queue_size:
                self._count_lost(1, now)
                return False
            self._pending.append((action, now, user, data))
            self._queued += 1
            self._cond.notify_all()
        return True

    def _count_lost(self, n: int, when: float) -> None:
        first = when if self._lost_span is None else self._lost_span[0]
        if not self._lost:
            log.error("audit log %s: records are being lost (writer stalled or failing); counted, and "
                      "said in the next record written", self.path)
        self._lost += n
        self._lost_span = (first, when)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record handed over so far is written (or ``timeout`` passes)."""
        with self._cond:
            target = self._queued
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Record ``audit.log.closed``, write what is queued (for up to ``timeout``), let go of the file."""
        if self._fd < 0:
            return
        self.record("audit.log.closed", None)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("audit log %s: the writer did not finish within %g s; records still queued are lost",
                      self.path, timeout)
            return
        os.close(self._fd)
        self._fd = -1

    # -- the writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    return
                batch = list(self._pending)
                self._pending.clear()
            self._write(batch)
            with self._cond:
                self._done += len(batch)
                self._cond.notify_all()

    def _write(self, batch: list[tuple[str, float, str | None, dict[str, Any]]]) -> None:
        while True:
            with self._cond:
                lost, span = self._lost, self._lost_span
            items = list(batch)
            if lost and span is not None:
                items.insert(0, ("audit.log.records_lost", span[1], None,
                                 {"count": lost, "first_at": schema.rfc3339(span[0]),
                                  "last_at": schema.rfc3339(span[1])}))
            seq, prev, out, records = self._seq, self._prev, bytearray(), []
            for action, when, user, data in items:
                seq += 1
                record = {"seq": seq, "time": schema.rfc3339(when), "action": action, "user": user, **data,
                          "prev": prev}
                line = _encode(record)
                prev = line_hash(line)
                out += line + b"\n"
                records.append(record)
            try:
                view = memoryview(bytes(out))
                while view:
                    view = view[os.write(self._fd, view):]
                os.fsync(self._fd)
            except OSError as e:
                with contextlib.suppress(OSError):  # no half record stays behind to break the chain
                    os.ftruncate(self._fd, self._size)
                why = f"{e.strerror}"
                if self.problem != why:
                    log.error("audit log %s: writing failed (%s); retrying every %g s, records wait in "
                              "memory (up to %d)", self.path, why, RETRY_S, self.queue_size)
                self.problem = why
                with self._cond:
                    if self._closing:
                        self._count_lost(len(batch), time.time())
                        return
                    self._cond.wait(RETRY_S)
                continue
            if self.problem is not None:
                log.info("audit log %s: writing works again", self.path)
                self.problem = None
            with self._cond:
                if lost:
                    self._lost -= lost
                    if not self._lost:
                        self._lost_span = None
            self._seq, self._prev, self._size = seq, prev, self._size + len(out)
            self.written += len(records)
            self.recent.extend(records)
            if self.sink is not None:
                for r in records:
                    self.sink.submit(schema.envelope(schema.PREFIX + r["action"], self.source,
                                                     time.time(), r, subject=schema.AUDIT_SUBJECT))
            return

    def users_changed(self, added: list[str], removed: list[str], changed: list[str]) -> None:
        """The users file changed on a running server (``stream-redact users add/remove``)."""
        self.record("audit.users.changed", None, added=added, removed=removed, changed=changed)

    def since(self, seq: int = 0, limit: int = RECENT) -> list[dict[str, Any]]:
        """The records in memory after ``seq`` (the last :data:`RECENT`), oldest first."""
        return [r for r in list(self.recent) if r["seq"] > seq][:limit]


def open_audit(config: PipelineConfig, sink: Sink | None, process: str = "main") -> AuditLog | None:
    """The configured audit log, open (``audit.events``: its records go to ``sink`` too); None, and
    a warning saying what goes unrecorded, when ``audit.path`` is not set."""
    audit = config.audit
    if audit.path is None:
        log.warning("audit.path is not set: who watched or changed which stream, and refused logins, are "
                    "not recorded; set audit.path for a control room")
        return None
    opened = AuditLog(audit.path, sink if audit.events else None, config.events.source_uri, process)
    log.info("audit log: %s (%s)", audit.path,
             "also sent as events" if opened.sink is not None else "file only")
    return opened


class AuditObserver(Observer):
    """The pipeline's fail-closed incidents (detector failed, hung or late) and recordings' segments
    (each finished one's manifest hash, an anchor for its chain outside the recording's folder; each
    deleted one) into the audit log."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def recording(self, stream_id: str, action: str, fields: dict[str, Any]) -> None:
        self.audit.record(action, None, **{k: v for k, v in fields.items() if k not in RESERVED})

    def incident(self, stream_id: str, reason: Failure, frames: int, ended: bool, action: str) -> None:
        self.audit.record("audit.incident.ended" if ended else "audit.incident.started", None,
                          stream_id=stream_id, reason=reason.value, fail_action=action, frames=max(1, frames))


# -- checking a file ---------------------------------------------------------------------------------
@dataclass
class Verdict:
    """What ``audit verify`` found in one file."""

    path: Path
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    line: int | None = None
    """the first broken line (1-based); None when the chain is intact"""
    why: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return self.why is None


def verify(path: Path) -> Verdict:
    """Check ``path``'s chain from its first line; the first broken link and why. UserError (exit 2)
    when the file cannot be read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"audit log {path} does not exist; give the path of an audit log (audit.path)",
                        exit_code=2) from None
    except OSError as e:
        raise UserError(f"cannot read audit log {path}: {e.strerror}", exit_code=2) from None
    v = Verdict(path)
    lines = data.split(b"\n")
    torn = lines.pop()
    parsed = [_parse(ln) for ln in lines]
    by_seq = {p["seq"]: i for i, p in enumerate(parsed) if p is not None}
    prev, want, before = ZERO, 1, 0
    for i, (raw, rec) in enumerate(zip(lines, parsed, strict=True)):
        n = i + 1
        if rec is None:
            ack = parsed[i + 1] if i + 1 < len(parsed) else None
            if ack is not None and ack["action"] == "audit.log.resumed_after_damage" \
                    and ack.get("damaged_line") == n and ack.get("damaged_sha256") == line_hash(raw):
                v.notes.append(f"line {n} was torn by a crash while it was written (acknowledged by line "
                               f"{n + 1})")
                continue
            v.line, v.why = n, f"line {n} is not an audit record (edited or damaged)"
            return v
        seq = rec["seq"]
        if seq != want:
            v.line = n
            if seq > want and want in by_seq and by_seq[want] > i:
                v.why = (f"line {n} has seq {seq} where seq {want} was due, which is at line "
                         f"{by_seq[want] + 1}: lines were reordered")
            elif seq > want:
                missing = seq - want
                v.why = (f"seq jumps from {want - 1} to {seq} at line {n}: {missing} record(s) deleted"
                         + (" from the start" if want == 1 else f" after line {before}"))
            else:
                v.why = f"seq goes back from {want - 1} to {seq} at line {n}: lines were reordered or copied"
            return v
        if rec["prev"] != prev:
            v.line = n
            v.why = (f"line {before} was changed after it was written: its sha256 is not the prev of line {n}"
                     if before else f"line {n} does not start a chain (its prev is not {ZERO[:8]}...)")
            return v
        prev, want, before = line_hash(raw), want + 1, n
        v.records += 1
        v.first_seq = seq if v.first_seq is None else v.first_seq
        v.last_seq = seq
    if torn:
        v.line = len(lines) + 1
        v.why = (f"line {v.line} is incomplete (no newline at its end): torn by a crash the log has not yet "
                 "acknowledged, or cut")
    return v


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every record of ``path`` that parses, in file order (for ``audit show``)."""
    try:
        with path.open("rb") as f:
            for raw in f:
                rec = _parse(raw.rstrip(b"\n"))
                if rec is not None:
                    yield rec
    except FileNotFoundError:
        raise UserError(f"audit log {path} does not exist; give the path of an audit log (audit.path)",
                        exit_code=2) from None
    except OSError as e:
        raise UserError(f"cannot read audit log {path}: {e.strerror}", exit_code=2) from None


def describe(rec: dict[str, Any]) -> str:
    """One ``audit show`` line: seq, time, action, user, then the other fields as key=value."""
    rest = " ".join(f"{k}={json.dumps(v, ensure_ascii=False, separators=(',', ':'))}" for k, v in rec.items()
                    if k not in RESERVED)
    return f"{rec['seq']:>6} {rec.get('time', '?')} {rec['action']:<30} {rec.get('user') or '-':<16} {rest}"


def matches(rec: dict[str, Any], user: str | None, stream: str | None, since: float | None) -> bool:
    if user is not None and rec.get("user") != user and rec.get("claimed_user") != user:
        return False
    if stream is not None and rec.get("stream_id") != stream:
        return False
    return since is None or parse_time(str(rec.get("time", ""))) >= since


def parse_time(text: str) -> float:
    """RFC 3339 (``2025-01-31T12:00:00Z``, a date, or with an offset) as Unix seconds."""
    from datetime import UTC, datetime

    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"{text!r} is not a time; write e.g. 2025-01-31T12:00:00Z or 2025-01-31",
                        exit_code=2) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()
