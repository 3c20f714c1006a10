"""`stream-redact redact`: redact an image or a video file and report exactly what was masked."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import secrets
import stat
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from stream.audio.codec import RATE as AUDIO_RATE
from stream.audio.codec import AudioIn, AudioOut
from stream.audio.redactor import AudioPolicy, AudioRedactConfig, AudioRedactor, SpeechSegment
from stream.audio.vad import SpeechModel, shared_model
from stream.core.detections import Detect, FrameRef
from stream.core.durable import fsync_dir
from stream.core.errors import UserError
from stream.core.h264 import H264Encoder, H264Settings
from stream.core.masking import Masked, MaskingStage
from stream.core.redact import Redactor
from stream.core.track import Tracker
from stream.core.zones import ZoneSet

log = logging.getLogger(__name__)

IMAGE_EXT = {".jpg", ".jpeg", ".png"}
VIDEO_EXT = {".mp4", ".mov", ".avi", ".mkv"}

DEFAULT_MAX_PIXELS = 100_000_000
"""Largest image or video frame (width x height) redacted unless the caller raises it: a decoded
100 MP frame is 300 MB of BGR, and the copies made while painting take several times that."""


@dataclass
class JobOptions:
    batch: int = 4
    lookback: int = 4
    audio: AudioPolicy = AudioPolicy.MUTE_SPEECH
    """what happens to an audio track: muted speech (default), disguised voices, dropped or kept"""
    model_dir: Path | None = None
    """where the speech detector's weights are (None: the installed models)"""
    crf: int = 18
    preset: str = "veryfast"
    progress: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    """0: no limit"""


@dataclass
class MaskReport:
    """The --masks-json document: one entry per decoded frame, regions as painted."""

    width: int = 0
    height: int = 0
    frames: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    audio: dict[str, Any] | None = None
    """the audio's policy, its speech segments (seconds) and how much of it was muted, by reason"""

    def add(self, m: Masked) -> None:
        self.frames.append({"frame": m.index, "regions": [r.as_json() for r in m.regions]})

    def to_json(self) -> str:
        """The document as compact JSON; ``warnings`` only when there are any."""
        doc: dict[str, Any] = {"width": self.width, "height": self.height, "frames": self.frames}
        if self.audio is not None:
            doc["audio"] = self.audio
        if self.warnings:
            doc["warnings"] = self.warnings
        return json.dumps(doc, separators=(",", ":"))

    def write(self, path: Path) -> None:
        """Write the document atomically: ``path`` is either complete or untouched."""
        with Staged() as staged:
            _write_bytes(staged.new(path), self.to_json().encode(), path)
            staged.commit()


_WRITE_PROBLEMS = {
    errno.ENOSPC: ("no space left on device", "free space or choose another folder"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another folder"),
    errno.EFBIG: ("file too large for this filesystem", "choose another folder"),
    errno.EROFS: ("read-only filesystem", "choose a writable folder"),
    errno.EACCES: ("permission denied", "choose a writable location"),
    errno.EPERM: ("permission denied", "choose a writable location"),
    errno.EIO: ("I/O error", "check the disk or choose another folder"),
}


def write_error(e: OSError, path: Path) -> UserError:
    """One line naming what went wrong writing ``path`` (the final name, never the temp file) and the fix."""
    problem, fix = _WRITE_PROBLEMS.get(e.errno or 0, (e.strerror or str(e), "choose another location"))
    return UserError(f"cannot write {path}: {problem}; {fix}")


class Staged:
    """Temp files next to their targets, renamed into place only once every one is complete.

    A full disk, a crash or a signal then leaves the targets untouched: no half-written video
    without its index, no masks JSON for a video that was never written. The temp file sits in
    the target's own folder so the final rename stays on one filesystem (atomic). Leaving the
    ``with`` block without :meth:`commit` removes every temp file.
    """

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path]] = []

    def new(self, dst: Path) -> Path:
        """Create an empty temp file for ``dst`` (same folder, same extension) and return its path."""
        parent = dst.parent if str(dst.parent) else Path(".")
        while True:
            tmp = parent / f".{dst.stem}.partial-{secrets.token_hex(4)}{dst.suffix}"
            # recorded before it exists, so a signal between creation and bookkeeping leaks nothing
            self.pairs.append((tmp, dst))
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileExistsError:
                self.pairs.pop()  # someone else's file: never ours to remove
                continue
            except OSError:
                self.pairs.pop()
                raise
            break
        os.close(fd)
        return tmp

    def commit(self) -> None:
        """Flush every temp file to disk and rename it over its target; the first error aborts all.

        Raises :class:`UserError` naming the target (never the temp file) on a write error.
        """
        for tmp, dst in self.pairs:
            try:
                _fsync(tmp)
            except OSError as e:
                raise write_error(e, dst) from None
        done: list[Path] = []
        try:
            for tmp, dst in self.pairs:
                # a replaced file keeps its mode; a new one has the umask's, set when the temp was made
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(tmp, stat.S_IMODE(dst.stat().st_mode))
                try:
                    os.replace(tmp, dst)
                except OSError as e:
                    raise write_error(e, dst) from None
                done.append(dst)
        except BaseException:
            for dst in done:  # all or nothing: a masks JSON without its video is a lie
                dst.unlink(missing_ok=True)
            raise
        self.pairs = []
        for folder in {dst.parent for dst in done}:
            fsync_dir(folder)

    def discard(self) -> None:
        """Remove every temp file not yet committed (a no-op after :meth:`commit`)."""
        for tmp, _ in self.pairs:
            tmp.unlink(missing_ok=True)
        self.pairs = []

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def _fsync(path: Path) -> None:
    """Force the data to disk now: some filesystems (NFS, quotas, delayed allocation) only report
    a full disk here, and a rename over the target must not publish data that is not there."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(tmp: Path, data: bytes, label: Path) -> None:
    try:
        with tmp.open("wb") as f:
            f.write(data)
    except OSError as e:
        raise write_error(e, label) from None


def kind_of(path: Path) -> str:
    ext = path.suffix.lower()
    if ext in IMAGE_EXT:
        return "image"
    if ext in VIDEO_EXT:
        return "video"
    raise UserError(
        f"unsupported file type {path.suffix or '(none)'!r} for {path}; "
        f"use an image ({', '.join(sorted(IMAGE_EXT))}) or a video ({', '.join(sorted(VIDEO_EXT))})",
        exit_code=2,
    )


def _same_file(a: Path, b: Path) -> bool:
    """Same file on disk: hard links and symlinks included, not just the same spelling."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False  # one of them does not exist (yet)


def check_paths(src: Path, dst: Path, masks: Path | None) -> str:
    """Validate input/output before any model is loaded, so bad paths fail in milliseconds."""
    if not src.exists():
        raise UserError(f"input file not found: {src}")
    if src.is_dir():
        raise UserError(f"input is a directory, not a file: {src}")
    kind = kind_of(src)
    out_kind = kind_of(dst)
    if out_kind != kind:
        raise UserError(f"output {dst} is a {out_kind} type but input {src} is a {kind}; use the same kind")
    for p in (dst, masks):
        if p is None:
            continue
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise UserError(f"output directory does not exist: {parent} (create it first)")
        if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
            raise UserError(f"cannot write {p}: permission denied; choose a writable location")
    if _same_file(src, dst):
        raise UserError(f"output {dst} would overwrite the input (it is the same file, or a link to it); "
                        "choose another output path")
    if masks is not None and (_same_file(masks, src) or _same_file(masks, dst)):
        raise UserError(f"--masks-json {masks} is the same file as the input or output; choose another path")
    for p in (dst, masks):
        if p is not None:
            _probe_writable(p)
    return kind


def _probe_writable(path: Path) -> None:
    """Create (and remove) a temp file beside the target now, so an unwritable folder fails before
    any work is done; the target itself is never opened, it may be a link to something else."""
    try:
        with Staged() as staged:
            staged.new(path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; choose a writable location") from None


def _png_size(head: bytes) -> tuple[int, int] | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    return None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(path: Path) -> tuple[int, int] | None:
    """Walk the JPEG segments up to the frame header; the pixels are never read."""
    with path.open("rb") as f:
        if f.read(2) != b"\xff\xd8":
            return None
        for _ in range(10_000):
            b = f.read(1)
            while b == b"\xff":
                b = f.read(1)  # fill bytes
            if not b:
                return None
            marker = b[0]
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:
                continue  # standalone markers carry no length
            seg = f.read(2)
            if len(seg) < 2 or marker == 0xDA:  # start of scan: no frame header came first
                return None
            length = struct.unpack(">H", seg)[0]
            if marker in _JPEG_SOF:
                body = f.read(5)
                if len(body) < 5:
                    return None
                height, width = struct.unpack(">HH", body[1:5])
                return width, height
            f.seek(length - 2, os.SEEK_CUR)
    return None


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header, or None when the header cannot be read."""
    try:
        with path.open("rb") as f:
            head = f.read(24)
        return _png_size(head) or _jpeg_size(path)
    except (OSError, struct.error):
        return None


def _open_video(src: Path) -> av.container.InputContainer:
    try:
        container = av.open(str(src))
    except (av.error.FFmpegError, OSError) as e:
        raise UserError(f"cannot open video {src}: {e}; the file is corrupt or not a video") from None
    if not container.streams.video:
        container.close()
        raise UserError(f"{src} has no video stream")
    return container


def _pixels(n: int) -> str:
    return f"{n / 1e6:.1f} megapixels" if n >= 1_000_000 else f"{n} pixels"


def _check_pixels(src: Path, width: int, height: int, max_pixels: int) -> None:
    n = width * height
    if max_pixels and n > max_pixels:
        raise UserError(
            f"{src} is {width}x{height} ({_pixels(n)}), over the limit of {_pixels(max_pixels)}; "
            f"downscale it first, or raise --max-pixels (e.g. --max-pixels {-(-n // 1_000_000)}M) "
            "if this machine has the memory"
        )


def check_size(src: Path, kind: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse an input over ``max_pixels`` from its header alone, before anything is decoded:
    a 20000x20000 PNG otherwise takes gigabytes and many seconds before the first error."""
    if not max_pixels:
        return
    if kind == "image":
        size = image_size(src)
        if size is not None:
            _check_pixels(src, *size, max_pixels)
        return
    container = _open_video(src)
    try:
        cc = container.streams.video[0].codec_context
        _check_pixels(src, cc.width, cc.height, max_pixels)
    finally:
        container.close()


def redact_image(src: Path, dst: Path, detect: Detect, stage: MaskingStage,
                 max_pixels: int = DEFAULT_MAX_PIXELS, label: Path | None = None) -> MaskReport:
    """Redact one image into ``dst``; ``label`` is the name errors show (the final output)."""
    label = label or dst
    check_size(src, "image", max_pixels)
    image = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"cannot decode image {src}: the file is corrupt or not a {src.suffix} image")
    _check_pixels(src, image.shape[1], image.shape[0], max_pixels)  # a header the probe could not read
    report = MaskReport(width=image.shape[1], height=image.shape[0])
    dets = detect([image], None)[0]  # one image: every model runs
    for m in [*stage.push(0, image, dets), *stage.flush()]:
        report.add(m)
        # encoded in memory and written here: cv2.imwrite reports a full disk only as False
        ok, data = cv2.imencode(dst.suffix.lower(), m.image)
        if not ok:
            raise UserError(f"cannot encode image for {label}")
        _write_bytes(dst, data.tobytes(), label)
    return report


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Blocking put that gives up once the consumer has stopped; False if it did."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _decode(container: av.container.InputContainer, vstream: av.VideoStream, out: queue.Queue,
            warnings: list[str], audio_packets: queue.Queue | None, stop: threading.Event) -> None:
    """Decode thread: frames go to ``out``; a decode error ends the stream with a warning.

    Audio packets go to an unbounded queue, but the decoder can only run ``out``'s size ahead
    of the encoder, so it holds at most that many frames' worth of audio.
    """
    n = 0
    try:
        streams = [vstream] + ([container.streams.audio[0]] if audio_packets is not None else [])
        for packet in container.demux(*streams):
            if packet.stream.type == "audio":
                if packet.dts is not None and audio_packets is not None:
                    audio_packets.put(packet)
                continue
            try:
                frames = packet.decode()
            except av.error.InvalidDataError as e:
                warnings.append(f"corrupt data after frame {n} ({e.strerror or e}); skipped a packet")
                continue
            for f in frames:
                if not _put(out, f.to_ndarray(format="bgr24"), stop):
                    return
                n += 1
    except (av.error.FFmpegError, OSError) as e:
        warnings.append(f"input ended early after frame {n}: {e}; redacted the {n} frames that decoded")
    finally:
        _put(out, None, stop)


def _batches(frames: queue.Queue, size: int) -> Iterator[list[np.ndarray]]:
    batch: list[np.ndarray] = []
    while True:
        f = frames.get()
        if f is None:
            break
        batch.append(f)
        if len(batch) >= size or frames.empty():
            yield batch
            batch = []
    if batch:
        yield batch


class _Encoder:
    """Writes painted frames with libx264 at the input's frame rate, and the audio (redacted and
    encoded as AAC, or copied with ``keep``); frames keep their order. Odd-sized video keeps its
    exact size (in 4:4:4)."""

    def __init__(self, dst: Path, width: int, height: int, rate: Fraction, opts: JobOptions,
                 audio_template: av.audio.stream.AudioStream | None) -> None:
        self.container = av.open(str(dst), mode="w")
        self.audio: Any = None
        self.audio_out: AudioOut | None = None
        try:
            self.video = H264Encoder(width, height, H264Settings(preset=opts.preset, crf=opts.crf,
                                                                 odd_size="yuv444p"),
                                     rate=rate, container=self.container)
            if audio_template is not None and opts.audio is AudioPolicy.KEEP:
                self.audio = self.container.add_stream_from_template(audio_template)
            elif audio_template is not None:
                channels = 1 if audio_template.codec_context.layout.nb_channels == 1 else 2
                self.audio_out = AudioOut(self.container, "aac", channels)
        except BaseException:
            self.abort()
            raise
        self.count = 0

    def write(self, image: np.ndarray) -> None:
        for packet in self.video.encode(image, self.count):  # one tick of 1/rate per frame
            self.container.mux(packet)
        self.count += 1

    def write_audio(self, packet: av.Packet) -> None:
        if self.audio is not None:
            packet.stream = self.audio
            self.container.mux(packet)

    def write_redacted(self, samples: np.ndarray, t: float) -> None:
        """Redacted samples whose first one belongs at ``t`` seconds of the output."""
        if self.audio_out is not None and len(samples):
            for packet in self.audio_out.encode(samples, round(t * AUDIO_RATE)):
                self.container.mux(packet)

    def close(self) -> None:
        """Flush the encoders and write the index; a full disk surfaces here, so it must propagate."""
        for packet in self.video.flush():
            self.container.mux(packet)
        if self.audio_out is not None:
            for packet in self.audio_out.flush():
                self.container.mux(packet)
        self.container.close()

    def abort(self) -> None:
        """Release the file after a failure; the temp file is removed by its owner."""
        try:
            self.container.close()
        except (av.error.FFmpegError, OSError) as e:
            log.debug("closing the aborted output failed: %s", e)


class _AudioTrack:
    """Decodes the input's audio packets, redacts them (the policy) and hands them to the encoder.

    Times are seconds from the video's first frame, which is where the output's clock starts;
    audio from before it is cut (the output has no picture there to go with it).
    """

    def __init__(self, stream: av.audio.stream.AudioStream, start: float, policy: AudioPolicy,
                 report: MaskReport, model: SpeechModel | None) -> None:
        self.stream, self.start, self.policy, self.model = stream, start, policy, model
        self.input = AudioIn()
        self.redactor: AudioRedactor | None = None
        self.report = report
        self.speech: list[list[float]] = []

    def packets(self, q: queue.Queue, encoder: _Encoder) -> None:
        while not q.empty():
            packet = q.get()
            if self.policy is AudioPolicy.KEEP:
                encoder.write_audio(packet)
                continue
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:  # a bad audio packet is silence, never the video's end
                self.report.warnings.append(f"undecodable audio packet skipped ({e})")
                continue
            for frame in frames:
                t = float(frame.time) - self.start if frame.time is not None else None
                samples = self.input.convert(frame)
                if self.redactor is None:
                    self.redactor = AudioRedactor(AUDIO_RATE, self.input.channels,
                                                  AudioRedactConfig(policy=self.policy,
                                                                    key=secrets.randbits(32)),
                                                  model=self.model,
                                                  on_segment=self._segment, stream_id="file")
                for r in self.redactor.push(samples, t):
                    self._write(r.samples, r.t, encoder)

    def finish(self, encoder: _Encoder) -> None:
        if self.redactor is not None:
            for r in self.redactor.flush():
                self._write(r.samples, r.t, encoder)
            self.report.audio = {"policy": self.policy.value, "speech": self.speech,
                                 "muted_s": {k.value: round(v / AUDIO_RATE, 3)
                                             for k, v in self.redactor.totals.items()}}

    def _segment(self, seg: SpeechSegment) -> None:
        self.speech.append([round(seg.start, 3), round(seg.end, 3)])

    @staticmethod
    def _write(samples: np.ndarray, t: float, encoder: _Encoder) -> None:
        if t < 0:  # before the first picture
            cut = min(len(samples), round(-t * AUDIO_RATE))
            samples, t = samples[cut:], t + cut / AUDIO_RATE
        encoder.write_redacted(samples, t)


def _pump(frames: queue.Queue, detect: Detect, stage: MaskingStage, encoder: _Encoder, report: MaskReport,
          opts: JobOptions, audio_q: queue.Queue | None, decoder: threading.Thread, progress: Any,
          track: _AudioTrack | None = None) -> int:
    """Detect, mask and encode until the decoder is done; returns the number of frames."""
    index = 0
    for batch in _batches(frames, opts.batch):
        refs = [FrameRef("", i) for i in range(index, index + len(batch))]  # one stream: the file
        for image, dets in zip(batch, detect(batch, refs), strict=True):
            for m in stage.push(index, image, dets):
                encoder.write(m.image)
                report.add(m)
            index += 1
        if audio_q is not None and track is not None:
            track.packets(audio_q, encoder)
        if progress is not None:
            progress.update(len(batch))
    for m in stage.flush():
        encoder.write(m.image)
        report.add(m)
    if audio_q is not None and track is not None:
        decoder.join()
        track.packets(audio_q, encoder)
        track.finish(encoder)
    return index


def redact_video(src: Path, dst: Path, detect: Detect, stage: MaskingStage, opts: JobOptions,
                 label: Path | None = None) -> MaskReport:
    """Redact one video into ``dst``; ``label`` is the name errors show (the final output)."""
    label = label or dst
    container = _open_video(src)
    vstream = container.streams.video[0]
    vstream.thread_type = "AUTO"
    width, height = vstream.codec_context.width, vstream.codec_context.height
    try:
        _check_pixels(src, width, height, opts.max_pixels)
    except UserError:
        container.close()
        raise
    rate = vstream.average_rate or vstream.guessed_rate or Fraction(25)
    total = vstream.frames or None
    keeps_audio = opts.audio is not AudioPolicy.DROP
    audio = container.streams.audio[0] if keeps_audio and container.streams.audio else None
    if opts.audio is AudioPolicy.KEEP and audio is None:
        log.warning("--audio keep: %s has no audio stream", src)
    report = MaskReport(width=width, height=height)
    start = float(vstream.start_time * vstream.time_base) if vstream.start_time is not None else 0.0
    # a missing or corrupt speech detector is named before anything is written, like a detector's
    try:
        model = shared_model(opts.model_dir) if audio is not None and opts.audio in (
            AudioPolicy.MUTE_SPEECH, AudioPolicy.DISGUISE) else None
    except BaseException:
        container.close()
        raise
    track = _AudioTrack(audio, start, opts.audio, report, model) if audio is not None else None
    frames: queue.Queue = queue.Queue(maxsize=16)
    stop = threading.Event()
    audio_q: queue.Queue | None = queue.Queue() if audio is not None else None
    decoder = threading.Thread(
        target=_decode, args=(container, vstream, frames, report.warnings, audio_q, stop), daemon=True
    )
    try:
        encoder = _Encoder(dst, width, height, rate, opts, audio)
    except OSError as e:
        container.close()
        raise write_error(e, label) from None
    except (av.error.FFmpegError, ValueError) as e:
        container.close()
        raise UserError(f"cannot write video {label}: {e}") from None
    progress = None
    if opts.progress:
        from tqdm import tqdm

        progress = tqdm(total=total, unit="frame", desc=src.name, file=sys.stderr, leave=False)
    decoder.start()
    index = 0
    closed = False
    try:
        index = _pump(frames, detect, stage, encoder, report, opts, audio_q, decoder, progress, track)
        encoder.close()
        closed = True
    except OSError as e:  # av.error.OSError too: ENOSPC from mux or from the trailer
        raise write_error(e, label) from None
    except av.error.FFmpegError as e:
        raise UserError(f"cannot write video {label}: {e}") from None
    except Exception as e:
        # fail closed: only painted frames were ever encoded, but a half-finished file must not be
        # mistaken for a complete redaction, so it is removed
        raise UserError(f"detection failed after {len(report.frames)} frames ({type(e).__name__}: {e}); "
                        f"removed the incomplete output, {label} was not written") from e
    finally:
        if progress is not None:
            progress.close()
        stop.set()  # on an error the decoder may be blocked on a full queue
        decoder.join(timeout=5)
        if not closed:
            encoder.abort()
        container.close()

    if index == 0:
        raise UserError(f"no frame of {src} could be decoded: the file is corrupt or truncated")
    _check_readable(dst, label)
    # containers round their declared count (an AVI with audio may declare 10 for 8 frames), so
    # only a clear shortfall is reported as truncation
    if total and index < total * 0.95 - 2 and not report.warnings:
        report.warnings.append(
            f"input is truncated or corrupt: it declares {total} frames but only {index} decoded; "
            f"redacted the {index} frames that decoded"
        )
    return report


def _check_readable(path: Path, label: Path) -> None:
    """Open the written video again: a muxer can lose its index without an error code."""
    try:
        with av.open(str(path)) as c:
            ok = bool(c.streams.video)
    except (av.error.FFmpegError, OSError) as e:
        ok, why = False, str(e)
    else:
        why = "it has no video stream"
    if not ok:
        raise UserError(f"the video written for {label} cannot be read back ({why}); "
                        "check the disk and free space, then run again")


def run_job(src: Path, dst: Path, masks: Path | None, detect: Detect, tracker: Tracker,
            redactor: Redactor, opts: JobOptions, kind: str | None = None,
            zones: ZoneSet | None = None) -> MaskReport:
    """Redact one file; ``kind`` is what :func:`check_paths` returned, if the caller ran it;
    ``zones`` are painted over every frame.

    Everything is written to temp files beside the targets and renamed into place at the end, so
    a failure (full disk, detector error, signal) leaves neither a partial output nor a temp file,
    and the input is never opened for writing.
    """
    kind = kind or check_paths(src, dst, masks)
    with Staged() as staged:
        try:
            out = staged.new(dst)
        except OSError as e:
            raise write_error(e, dst) from None
        if kind == "image":
            report = redact_image(src, out, detect, MaskingStage(tracker, redactor, 0, zones),
                                  opts.max_pixels, label=dst)
        else:
            stage = MaskingStage(tracker, redactor, opts.lookback, zones)
            report = redact_video(src, out, detect, stage, opts, label=dst)
        if masks is not None:
            try:
                tmp = staged.new(masks)
            except OSError as e:
                raise write_error(e, masks) from None
            _write_bytes(tmp, report.to_json().encode(), masks)
        staged.commit()
    return report
