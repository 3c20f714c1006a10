"""`stream-redact redact`: redact an image or a video file and report exactly what was masked."""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from stream.detect.detections import Detections
from stream.errors import UserError
from stream.masking import Masked, MaskingStage
from stream.redact import Redactor
from stream.track import Tracker

log = logging.getLogger(__name__)

IMAGE_EXT = {".jpg", ".jpeg", ".png"}
VIDEO_EXT = {".mp4", ".mov", ".avi", ".mkv"}

Detect = Callable[[list[np.ndarray], list[int]], list[Detections]]


@dataclass
class JobOptions:
    batch: int = 4
    lookback: int = 4
    keep_audio: bool = False
    crf: int = 18
    preset: str = "veryfast"
    progress: bool = True


@dataclass
class MaskReport:
    """The --masks-json document: one entry per decoded frame, regions as painted."""

    width: int = 0
    height: int = 0
    frames: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, m: Masked) -> None:
        self.frames.append({"frame": m.index, "regions": [r.as_json() for r in m.regions]})

    def write(self, path: Path) -> None:
        doc: dict[str, Any] = {"width": self.width, "height": self.height, "frames": self.frames}
        if self.warnings:
            doc["warnings"] = self.warnings
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(doc, separators=(",", ":")))
            tmp.replace(path)
        except OSError as e:
            raise UserError(f"cannot write masks JSON {path}: {e.strerror or e}") from None


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
    if dst.resolve() == src.resolve():
        raise UserError(f"output {dst} would overwrite the input; choose another output path")
    if masks is not None and masks.resolve() in (src.resolve(), dst.resolve()):
        raise UserError(f"--masks-json {masks} is the same file as the input or output; choose another path")
    for p in (dst, masks):
        if p is not None:
            _probe_writable(p)
    return kind


def _probe_writable(path: Path) -> None:
    """Open the file for writing now, so an unwritable target fails before any work is done."""
    existed = path.exists()
    try:
        with path.open("ab"):
            pass
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; choose a writable location") from None
    if not existed:
        path.unlink(missing_ok=True)


def redact_image(src: Path, dst: Path, detect: Detect, stage: MaskingStage) -> MaskReport:
    image = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"cannot decode image {src}: the file is corrupt or not a {src.suffix} image")
    report = MaskReport(width=image.shape[1], height=image.shape[0])
    dets = detect([image], [0])[0]
    for m in [*stage.push(0, image, dets), *stage.flush()]:
        report.add(m)
        if not cv2.imwrite(str(dst), m.image):
            raise UserError(f"cannot write image {dst}")
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
    """Writes painted frames with libx264 at the input's frame rate; frames keep their order."""

    def __init__(self, dst: Path, width: int, height: int, rate: Fraction, opts: JobOptions,
                 audio_template: av.audio.stream.AudioStream | None) -> None:
        self.container = av.open(str(dst), mode="w")
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height = width, height
        # 4:2:0 needs even sizes; odd-sized video keeps its exact size in 4:4:4
        self.stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        self.stream.options = {"crf": str(opts.crf), "preset": opts.preset}
        self.audio = self.container.add_stream_from_template(audio_template) if audio_template else None
        self.count = 0

    def write(self, image: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(image, format="bgr24")
        frame.pts = self.count
        frame.time_base = Fraction(1, 1) / self.stream.codec_context.framerate
        self.count += 1
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def write_audio(self, packet: av.Packet) -> None:
        if self.audio is not None:
            packet.stream = self.audio
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()


def _pump(frames: queue.Queue, detect: Detect, stage: MaskingStage, encoder: _Encoder, report: MaskReport,
          opts: JobOptions, audio_q: queue.Queue | None, decoder: threading.Thread, progress: Any) -> int:
    """Detect, mask and encode until the decoder is done; returns the number of frames."""
    index = 0
    for batch in _batches(frames, opts.batch):
        seqs = list(range(index, index + len(batch)))
        for image, dets in zip(batch, detect(batch, seqs), strict=True):
            for m in stage.push(index, image, dets):
                encoder.write(m.image)
                report.add(m)
            index += 1
        if audio_q is not None:
            while not audio_q.empty():
                encoder.write_audio(audio_q.get())
        if progress is not None:
            progress.update(len(batch))
    for m in stage.flush():
        encoder.write(m.image)
        report.add(m)
    if audio_q is not None:
        decoder.join()
        while not audio_q.empty():
            encoder.write_audio(audio_q.get())
    return index


def redact_video(src: Path, dst: Path, detect: Detect, stage: MaskingStage, opts: JobOptions) -> MaskReport:
    try:
        container = av.open(str(src))
    except (av.error.FFmpegError, OSError) as e:
        raise UserError(f"cannot open video {src}: {e}; the file is corrupt or not a video") from None
    if not container.streams.video:
        container.close()
        raise UserError(f"{src} has no video stream")
    vstream = container.streams.video[0]
    vstream.thread_type = "AUTO"
    width, height = vstream.codec_context.width, vstream.codec_context.height
    rate = vstream.average_rate or vstream.guessed_rate or Fraction(25)
    total = vstream.frames or None
    audio = container.streams.audio[0] if opts.keep_audio and container.streams.audio else None
    if opts.keep_audio and audio is None:
        log.warning("--keep-audio: %s has no audio stream", src)
    report = MaskReport(width=width, height=height)
    frames: queue.Queue = queue.Queue(maxsize=16)
    stop = threading.Event()
    audio_q: queue.Queue | None = queue.Queue() if audio is not None else None
    decoder = threading.Thread(
        target=_decode, args=(container, vstream, frames, report.warnings, audio_q, stop), daemon=True
    )
    try:
        encoder = _Encoder(dst, width, height, rate, opts, audio)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        container.close()
        raise UserError(f"cannot write video {dst}: {e}") from None
    progress = None
    if opts.progress:
        from tqdm import tqdm

        progress = tqdm(total=total, unit="frame", desc=src.name, file=sys.stderr, leave=False)
    decoder.start()
    index = 0
    failed = True
    try:
        index = _pump(frames, detect, stage, encoder, report, opts, audio_q, decoder, progress)
        failed = False
    except (av.error.FFmpegError, OSError) as e:
        raise UserError(f"cannot write video {dst}: {e}") from None
    except Exception as e:
        # fail closed: only painted frames were ever encoded, but a half-finished file must not be
        # mistaken for a complete redaction, so it is removed
        raise UserError(f"detection failed after {len(report.frames)} frames ({type(e).__name__}: {e}); "
                        f"removed the incomplete output {dst}") from e
    finally:
        if progress is not None:
            progress.close()
        stop.set()  # on an error the decoder may be blocked on a full queue
        decoder.join(timeout=5)
        try:
            encoder.close()
        except (av.error.FFmpegError, OSError) as e:
            log.debug("closing %s failed: %s", dst, e)
        container.close()
        if failed:
            dst.unlink(missing_ok=True)

    if index == 0:
        raise UserError(f"no frame of {src} could be decoded: the file is corrupt or truncated")
    # containers round their declared count (an AVI with audio may declare 10 for 8 frames), so
    # only a clear shortfall is reported as truncation
    if total and index < total * 0.95 - 2 and not report.warnings:
        report.warnings.append(
            f"input is truncated or corrupt: it declares {total} frames but only {index} decoded; "
            f"redacted the {index} frames that decoded"
        )
    return report


def run_job(src: Path, dst: Path, masks: Path | None, detect: Detect, tracker: Tracker,
            redactor: Redactor, opts: JobOptions, kind: str | None = None) -> MaskReport:
    """Redact one file; ``kind`` is what :func:`check_paths` returned, if the caller ran it."""
    kind = kind or check_paths(src, dst, masks)
    if kind == "image":
        report = redact_image(src, dst, detect, MaskingStage(tracker, redactor, lookback=0))
    else:
        report = redact_video(src, dst, detect, MaskingStage(tracker, redactor, opts.lookback), opts)
    if masks is not None:
        report.write(masks)
    return report
