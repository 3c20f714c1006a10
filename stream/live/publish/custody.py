"""Chain of custody of recordings: segment manifests, their hash chain, verification and export.

Beside every finished segment lies its manifest: the segment's SHA-256 and size, the time it
covers, what was painted on each frame, the SHA-256 of each frame's H.264 packet, the models and
the config that produced it, and the SHA-256 of the stream's previous manifest. Changing a segment
breaks its manifest's hash; changing, removing or reordering a manifest breaks the next one's
link. Segments deleted on purpose (retention, full disk) are listed in the stream's pruned record,
the only way a chain may start after a missing link. An export carries the manifests of its
source segments, so it can be checked frame by frame without the recordings at hand.

Manifests are written as canonical JSON (sorted keys, no spaces), so a manifest embedded in an
export bundle hashes to exactly the bytes of the file it was read from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import av
import av.error

from stream.core import durable
from stream.core.checksum import sha256_file
from stream.core.durable import fsync_dir
from stream.core.urls import mask_url

MANIFEST_FORMAT = "stream-redact/recording-manifest/1"
BUNDLE_FORMAT = "stream-redact/export-custody/1"
GENESIS = "0" * 64
"""the previous-manifest hash of a stream's first segment"""
SEGMENT_SUFFIX = ".mp4"
MANIFEST_SUFFIX = ".manifest.json"
PARTIAL_SUFFIX = ".partial"
PRUNED_NAME = "pruned.jsonl"
PRUNED_KEEP = 256
"""pruned-record lines kept when it is compacted: a chain only ever needs the newest one"""
_NAME = re.compile(r"-(\d{8}T\d{6}\.\d{3}Z)(?:_\d+)?\.mp4$")


class CustodyError(Exception):
    """Recordings or an export that do not verify; the message says what was found where."""


# -- values --------------------------------------------------------------------------------------
def canonical(doc: Any) -> bytes:
    """The one byte form of a manifest or bundle: what its SHA-256 is taken over."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode() + b"\n"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iso(epoch: float) -> str:
    """``2024-05-01T12:00:00.123Z``: UTC, milliseconds."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def stamp(epoch: float) -> dict[str, Any]:
    return {"utc": iso(epoch), "epoch": round(epoch, 3)}


def parse_time(text: str) -> float:
    """Seconds since the epoch from ``1714564800``, ``1714564800.5`` or ISO-8601 (``2024-05-01T12:00Z``,
    an offset, or no zone: UTC). ValueError names the accepted forms."""
    t = text.strip()
    try:
        value = float(t)
    except ValueError:
        try:
            when = datetime.fromisoformat(t.replace("z", "Z").replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{text!r} is not a time; give ISO-8601 (2024-05-01T12:00:00Z) or seconds "
                             "since the epoch") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a time; give ISO-8601 or seconds since the epoch")
    return value


def segment_name(stream_id: str, epoch: float) -> str:
    """``cam-20240501T120000.123Z.mp4``: names sort in time order (see :func:`name_time`)."""
    when = datetime.fromtimestamp(epoch, UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3]
    return f"{stream_id}-{when}Z{SEGMENT_SUFFIX}"


def name_time(name: str) -> float | None:
    """The start time a segment's name holds; None for a name this recorder did not make."""
    m = _NAME.search(name)
    if m is None:
        return None
    return datetime.strptime(m.group(1), "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC).timestamp()


def day_folder(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y%m%d")


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of a stream's config (``model_dump(mode="json")``) with every URL's secrets masked,
    so a manifest names the config without holding a camera's password."""

    def masked(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: mask_url(x) if k == "url" and isinstance(x, str) else masked(x) for k, x in v.items()}
        if isinstance(v, list):
            return [masked(x) for x in v]
        return v

    return sha256_bytes(canonical(masked(config)))


@cache
def models_digest(families: Iterable[str] | None = None) -> dict[str, Any]:
    """The installed model manifest's SHA-256 and the pinned SHA-256 of each model of ``families``
    (``face`` model names, ``plate``, ``person``; with their int8 variants; None: every model): a
    detector loads a weights file only when it has exactly that digest (stream.detect.models)."""
    from stream.detect.models import MANIFEST_PATH, manifest

    wanted = None if families is None else set(families)
    return {"manifest_sha256": sha256_file(MANIFEST_PATH),
            "models": {name: spec.sha256 for name, spec in sorted(manifest().items())
                       if wanted is None or name.removesuffix("_int8") in wanted}}


# -- files ---------------------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes) -> None:
    """``path`` is either complete or untouched (see :mod:`stream.core.durable`)."""
    durable.write_atomic(path, data, suffix=PARTIAL_SUFFIX)


def packet_hashes(path: Path) -> list[str]:
    """SHA-256 of each video packet's payload, in file order: the same bytes in a segment and in an
    export that copied it (a remux does not touch them)."""
    with av.open(str(path)) as c:
        return [sha256_bytes(bytes(p)) for p in c.demux(c.streams.video[0]) if p.size]


# -- the pruned record ---------------------------------------------------------------------------
def read_pruned(stream_dir: Path) -> list[dict[str, Any]]:
    """Entries of segments deleted on purpose, oldest first (a damaged line is skipped)."""
    try:
        text = (stream_dir / PRUNED_NAME).read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and isinstance(entry.get("manifest_sha256"), str):
                out.append(entry)
    return out


def append_pruned(stream_dir: Path, entry: dict[str, Any]) -> None:
    """Add a deletion to the pruned record and force it to disk before the files go; past
    2 x :data:`PRUNED_KEEP` lines it is rewritten with the newest ones only."""
    path = stream_dir / PRUNED_NAME
    line = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    if size > 2 * PRUNED_KEEP * len(line):
        entries = read_pruned(stream_dir)
        if len(entries) > 2 * PRUNED_KEEP:
            keep = entries[-PRUNED_KEEP:]
            write_atomic(path, b"".join(json.dumps(e, sort_keys=True, separators=(",", ":")).encode()
                                        + b"\n" for e in keep))


# -- reading a stream's recordings ---------------------------------------------------------------
@dataclass
class Link:
    """One manifest on disk: its document and the SHA-256 of its bytes."""

    path: Path
    doc: dict[str, Any]
    sha256: str

    @property
    def index(self) -> int:
        return int(self.doc["index"])

    @property
    def segment(self) -> Path:
        return self.path.parent / str(self.doc["segment"])

    @property
    def start(self) -> float:
        return float(self.doc["start"]["epoch"])

    @property
    def end(self) -> float:
        return float(self.doc["end"]["epoch"])


_REQUIRED = {"format", "stream", "index", "segment", "sha256", "bytes", "start", "end", "frames", "masks",
             "packet_sha256", "previous_manifest_sha256"}


def _check_doc(doc: Any) -> str | None:
    """Why ``doc`` is not a manifest of this format, or None."""
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        return "not a stream-redact recording manifest"
    missing = sorted(_REQUIRED - set(doc))
    if missing:
        return f"lacks {', '.join(missing)}"
    try:
        int(doc["index"]), float(doc["start"]["epoch"]), float(doc["end"]["epoch"])
    except (TypeError, ValueError, KeyError):
        return "has a bad index or time range"
    if not isinstance(doc["packet_sha256"], list) or not isinstance(doc["masks"], dict):
        return "has a bad packet or mask list"
    return None


def manifest_paths(stream_dir: Path) -> list[Path]:
    """Every finished manifest of a stream, in name (= time) order."""
    return sorted(stream_dir.glob(f"*/*{MANIFEST_SUFFIX}"), key=lambda p: p.name)


def segment_paths(stream_dir: Path) -> list[Path]:
    return sorted(stream_dir.glob(f"*/*{SEGMENT_SUFFIX}"), key=lambda p: p.name)


def read_link(path: Path) -> Link:
    """A manifest and its hash; CustodyError when it is no manifest (OSError as it comes)."""
    data = path.read_bytes()
    try:
        doc = json.loads(data)
    except ValueError:
        raise CustodyError(f"manifest {path.name} is not valid JSON (damaged or edited)") from None
    why = _check_doc(doc)
    if why is not None:
        raise CustodyError(f"manifest {path.name} {why}")
    return Link(path, doc, sha256_bytes(data))


@dataclass
class Report:
    """What verifying a stream's recordings found."""

    links: list[Link] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    broken: dict[int, str] = field(default_factory=dict)
    """position in ``links`` -> the problem of a manifest whose incoming link or segment does not verify"""

    @property
    def ok(self) -> bool:
        return not self.problems


def check_chain(links: list[Link], pruned: list[dict[str, Any]]) -> Iterator[tuple[int, str]]:
    """(position in ``links``, problem) for every link that does not hold; ``links`` in index order.

    The first manifest may point to a deleted predecessor only if the pruned record lists that
    predecessor's hash; every later one must point to the manifest just before it."""
    known = {e["manifest_sha256"]: e for e in pruned}
    for i, link in enumerate(links):
        prev = link.doc["previous_manifest_sha256"]
        name = link.segment.name
        if i == 0:
            if link.index == 0 and prev == GENESIS:
                continue
            entry = known.get(prev)
            if entry is None or entry.get("index") not in (None, link.index - 1):
                yield i, (f"chain broken before {name}: its predecessor (index {link.index - 1}) is missing "
                          f"and not recorded as deleted by retention or a full disk in {PRUNED_NAME}")
            continue
        before = links[i - 1]
        if link.index == before.index:
            yield i, f"{before.segment.name} and {name} both claim index {link.index}"
        elif link.index > before.index + 1:
            yield i, (f"chain broken: {link.index - before.index - 1} segment(s) between "
                      f"{before.segment.name} and {name} are missing (deleted outside retention)")
        elif prev != before.sha256:
            yield i, (f"manifest {before.path.name} was edited: its SHA-256 is not the one {name}'s manifest "
                      "recorded")


def verify_stream(stream_dir: Path, segments: bool = True) -> Report:
    """Check every manifest of a stream (and with ``segments`` every segment against its manifest) and
    the chain. FileNotFoundError when ``stream_dir`` is not a folder."""
    if not stream_dir.is_dir():
        raise FileNotFoundError(f"{stream_dir} is not a folder of recordings")
    report = Report()
    links: list[Link] = []
    for path in manifest_paths(stream_dir):
        try:
            links.append(read_link(path))
        except CustodyError as e:
            report.problems.append(str(e))
    links.sort(key=lambda link: link.index)
    report.links = links
    described = {link.segment.name for link in links} | {
        p.name.removesuffix(MANIFEST_SUFFIX) for p in manifest_paths(stream_dir)}
    for seg in segment_paths(stream_dir):
        if seg.name not in described:
            report.problems.append(f"segment {seg.name} has no manifest")
    for i, problem in check_chain(links, read_pruned(stream_dir)):
        report.problems.append(problem)
        report.broken[i] = problem
    if segments:
        for i, link in enumerate(links):
            problem = segment_problem(link)
            if problem is not None:
                report.problems.append(problem)
                report.broken.setdefault(i, problem)
    return report


def segment_problem(link: Link) -> str | None:
    """Why a segment does not match its manifest, or None."""
    seg = link.segment
    try:
        size = seg.stat().st_size
        digest = sha256_file(seg)
    except FileNotFoundError:
        return f"segment {seg.name} is missing (its manifest is there)"
    except OSError as e:
        return f"segment {seg.name} cannot be read ({e.strerror})"
    if digest != link.doc["sha256"] or size != link.doc["bytes"]:
        return f"segment {seg.name} was changed after recording: its SHA-256 is not the one in its manifest"
    return None


# -- export --------------------------------------------------------------------------------------
def export(stream_dir: Path, start: float, end: float, out: Path) -> dict[str, Any]:
    """Join the segments overlapping [start, end] into ``out`` (packets copied, nothing re-encoded)
    and write ``out``.custody.json beside it; return the bundle.

    The export starts at the last keyframe at or before ``start`` (a decoder needs it) and ends with
    the last frame at or before ``end``. Only segments that match their manifests and chain to each
    other are exported: CustodyError otherwise, and nothing is written."""
    if end < start:
        raise ValueError(f"--to ({iso(end)}) is before --from ({iso(start)}); swap them")
    report = verify_stream(stream_dir, segments=False)
    chosen = [i for i, link in enumerate(report.links) if link.end >= start and link.start <= end]
    if not chosen:
        raise LookupError(f"no recording of {stream_dir.name} between {iso(start)} and {iso(end)}")
    links = [report.links[i] for i in chosen]
    inner = [report.broken[i] for i in chosen[1:] if i in report.broken]
    if inner:
        raise CustodyError(f"{'; '.join(inner)}; not exported")
    for link in links:
        problem = segment_problem(link)
        if problem is not None:
            raise CustodyError(f"{problem}; not exported")
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    try:
        used = _remux(links, start, end, tmp)
        if not any(b >= a for a, b in used):
            raise LookupError(f"no frame of {stream_dir.name} between {iso(start)} and {iso(end)}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest, size = sha256_file(tmp), tmp.stat().st_size
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent if str(out.parent) else Path("."))
    parts = [(link, a, b) for link, (a, b) in zip(links, used, strict=True) if b >= a]
    times = [t for link, a, b in parts for t in (frame_time(link, a), frame_time(link, b))]
    bundle = {
        "format": BUNDLE_FORMAT,
        "stream": links[0].doc["stream"],
        "export": {"file": out.name, "sha256": digest, "bytes": size,
                   "frames": sum(b - a + 1 for _, a, b in parts)},
        "requested": {"from": stamp(start), "to": stamp(end)},
        "covered": {"from": stamp(min(times)), "to": stamp(max(times))},
        "trimming": "starts at the last keyframe at or before 'from' (up to gop_s earlier); ends with the "
                    "last frame at or before 'to'",
        "segments": [{"segment": link.segment.name, "sha256": link.doc["sha256"],
                      "manifest_sha256": link.sha256, "frames": [a, b], "manifest": link.doc}
                     for link, a, b in parts],
        "chain": {"ok": not report.problems, "segments_in_stream": len(report.links),
                  "problems_elsewhere": report.problems},
        "created": stamp(datetime.now(UTC).timestamp()),
    }
    write_atomic(bundle_path(out), canonical(bundle))
    return bundle


def bundle_path(export_path: Path) -> Path:
    return export_path.with_name(export_path.name + ".custody.json")


def frame_time(link: Link, i: int) -> float:
    frames = link.doc["masks"].get("frames", [])
    if 0 <= i < len(frames) and isinstance(frames[i], dict) and "time" in frames[i]:
        return float(frames[i]["time"])
    return link.start


def _remux(links: list[Link], start: float, end: float, out: Path) -> list[tuple[int, int]]:
    """Copy the packets of ``links`` that fall in the range into ``out``; per link the first and last
    frame index used (last < first: none). Each segment is placed at its wall-clock start, so a gap
    in the recording stays a gap; timestamps only ever increase. The segments' (redacted) audio comes
    along for the same stretch of time, moved by the same amount."""
    used: list[tuple[int, int]] = []
    with av.open(str(out), "w", format="mp4", options={"movflags": "+faststart"}) as dst:
        ost = None
        aost = None
        alast = -1
        size: tuple[int, int] | None = None
        out_first: int | None = None
        last = -1
        for n, link in enumerate(links):
            with av.open(str(link.segment)) as src:
                ist = src.streams.video[0]
                here = (ist.codec_context.width, ist.codec_context.height)
                if ost is None:
                    ost, size = dst.add_stream_from_template(ist), here
                    if src.streams.audio:  # every stream is declared before the first packet
                        aost = dst.add_stream_from_template(src.streams.audio[0])
                elif here != size:
                    raise ValueError(f"the stream changed size at {link.segment.name} ({size[0]}x{size[1]} "
                                     f"-> {here[0]}x{here[1]}); export the time before and after it "
                                     "separately")
                tb: Fraction = ist.time_base or Fraction(1, 90_000)
                packets = [p for p in src.demux(ist) if p.size]
                times = [frame_time(link, i) for i in range(len(packets))]
                lo, hi = 0, len(packets) - 1
                if n == 0:
                    keys = [i for i, p in enumerate(packets) if p.is_keyframe and times[i] <= start]
                    lo = keys[-1] if keys else 0
                if n == len(links) - 1:
                    while hi >= lo and times[hi] > end:
                        hi -= 1
                used.append((lo, hi))
                if hi < lo:
                    continue
                shift = round((link.start - links[0].start) / tb) - (packets[0].pts or 0)
                first = (packets[lo].pts or 0) + shift
                if out_first is None:
                    out_first = first
                if first - out_first <= last:  # the wall clock went back: keep the order anyway
                    shift += last + 1 - (first - out_first)
                # the stretch of the segment's own time taken (read before the packets are moved)
                span = ((packets[lo].pts or 0) * tb,
                        (packets[hi + 1].pts or 0) * tb if hi + 1 < len(packets) else Fraction(10**9))
                for p in packets[lo:hi + 1]:
                    pts = (p.pts or 0) + shift - out_first
                    dts = (p.dts if p.dts is not None else p.pts or 0) + shift - out_first
                    p.pts, p.dts, p.stream = pts, dts, ost
                    dst.mux(p)
                    last = max(last, pts)
                if aost is not None:
                    alast = _remux_audio(link.segment, dst, aost, alast, *span, (shift - out_first) * tb)
    return used


def _remux_audio(segment: Path, dst: av.container.OutputContainer, ost: Any, last: int, lo: Fraction,
                 hi: Fraction, shift: Fraction) -> int:
    """Copy the audio packets of ``segment`` that start in [lo, hi) seconds, moved by ``shift``
    seconds (the video's move), never going back in time; returns the last pts written."""
    with av.open(str(segment)) as src:
        if not src.streams.audio:
            return last
        ist = src.streams.audio[0]
        atb: Fraction = ist.time_base or Fraction(1, 48_000)
        for p in src.demux(ist):
            if not p.size or p.pts is None or not lo <= p.pts * atb < hi:
                continue
            pts = round((p.pts * atb + shift) / atb)  # in the packet's own time base; mux rescales
            if pts <= last:
                continue
            p.pts = p.dts = pts
            p.stream = ost
            dst.mux(p)
            last = pts
    return last


# -- verifying an export -------------------------------------------------------------------------
def verify_export(export_path: Path, bundle: Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """The bundle and every problem found: the export's hash, the embedded manifests and their chain,
    and each exported frame's packet against the manifests. OSError when a file cannot be read."""
    bundle = bundle or bundle_path(export_path)
    data = bundle.read_bytes()
    digest, size = sha256_file(export_path), export_path.stat().st_size
    try:
        doc = json.loads(data)
    except ValueError:
        return {}, [f"bundle {bundle.name} is not valid JSON (damaged or edited)"]
    if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
        return {}, [f"{bundle.name} is not a stream-redact export bundle"]
    problems: list[str] = []
    ex = doc.get("export") or {}
    if ex.get("sha256") != digest or ex.get("bytes") != size:
        problems.append(f"{export_path.name} was changed after export: its SHA-256 is not the one in the "
                        "bundle")
    expected: list[tuple[str, int, str]] = []
    prev: tuple[str, int] | None = None
    for entry in doc.get("segments") or []:
        try:
            m, name = entry["manifest"], entry["segment"]
            a, b = (int(v) for v in entry["frames"])
        except (KeyError, TypeError, ValueError):
            problems.append("a segment entry of the bundle is incomplete (edited)")
            continue
        why = _check_doc(m)
        if why is not None:
            problems.append(f"the manifest of {name} in the bundle {why}")
            continue
        own = sha256_bytes(canonical(m))
        if own != entry.get("manifest_sha256") or m.get("segment") != name:
            problems.append(f"the manifest of {name} in the bundle was edited: its SHA-256 is not the "
                            "recorded one")
        if prev is not None:
            if int(m["index"]) != prev[1] + 1:
                problems.append(f"chain broken before {name}: index {m['index']} follows {prev[1]}")
            elif m["previous_manifest_sha256"] != prev[0]:
                problems.append(f"chain broken before {name}: it does not point to the manifest before it")
        prev = (own, int(m["index"]))
        hashes = m["packet_sha256"]
        if not 0 <= a <= b < len(hashes):
            problems.append(f"frames {a}-{b} of {name} are not in its manifest")
            continue
        expected += [(name, i, hashes[i]) for i in range(a, b + 1)]
    try:
        got = packet_hashes(export_path)
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        problems.append(f"{export_path.name} cannot be read as video ({e}): damaged or replaced")
        return doc, problems
    if len(got) != len(expected):
        problems.append(f"{export_path.name} has {len(got)} frames, its manifests list {len(expected)}")
    for k, (h, (name, i, want)) in enumerate(zip(got, expected, strict=False)):
        if h != want:
            problems.append(f"frame {k} of {export_path.name} is not frame {i} of {name} as recorded")
            break
    return doc, problems
