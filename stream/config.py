"""The live pipeline's configuration: one YAML file, validated field by field before anything starts.

Every field carries a description so a rejected value can be explained in the words of the
config file itself: ``streams[1].source.url: ...``. Unknown keys are errors, not ignored, since a
misspelt ``max_latency_ms`` silently falling back to a default is how a pipeline ends up
leaking or stalling in production.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stream.errors import UserError
from stream.events.config import EventsConfig
from stream.redact import RedactConfig, Style
from stream.track import TrackerConfig
from stream.urls import mask_url

STREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_UNSET_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def _rtsp_url(value: str) -> str:
    value = os.path.expandvars(value)
    unset = _UNSET_VAR.search(value)
    if unset:
        raise ValueError(f"environment variable {unset.group(1)} is not set; export it or write the value")
    parts = urlsplit(value)
    if parts.scheme not in ("rtsp", "rtsps"):
        raise ValueError(f"{mask_url(value)!r} is not an RTSP URL; write rtsp://host[:port]/path")
    if not parts.hostname:
        raise ValueError(f"{mask_url(value)!r} has no host; write rtsp://host[:port]/path")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ValueError(f"{mask_url(value)!r} has a bad port; use 1-65535") from None
    return value


class Reconnect(_Model):
    initial_s: float = Field(0.5, gt=0, le=60, description="first wait before reconnecting")
    max_s: float = Field(10.0, gt=0, le=600, description="longest wait between reconnects")
    jitter: float = Field(0.2, ge=0, le=1, description="random share added to each wait")

    @model_validator(mode="after")
    def _order(self) -> Reconnect:
        if self.max_s < self.initial_s:
            raise ValueError("max_s must be >= initial_s")
        return self


class RtspSource(_Model):
    """A camera or VMS stream pulled over RTSP."""

    type: Literal["rtsp"]
    url: str = Field(description="rtsp://[user:pass@]host[:port]/path; credentials may also come from env")
    transport: Literal["tcp", "udp"] = Field("tcp", description="RTP transport; tcp survives NAT and loss")
    open_timeout_s: float = Field(5.0, gt=0, le=120, description="give up opening after this long")
    read_timeout_s: float = Field(5.0, gt=0, le=120, description="a stream silent this long is reconnected")
    reconnect: Reconnect = Reconnect()
    decode: Literal["cpu", "nvdec"] = Field(
        "cpu", description="nvdec: decode on the GPU (CUDA hwaccel), falling back to the CPU with a "
                           "warning where no GPU or CUDA-enabled FFmpeg is present")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _rtsp_url(v)


class FileSource(_Model):
    """A video file played as if it were a live camera (demos, tests, load tests)."""

    type: Literal["file"]
    path: Path = Field(description="video file to play")
    loop: bool = Field(False, description="start again at the end instead of ending the stream")
    realtime: bool = Field(True, description="pace frames at the file's frame rate, as a camera would")
    decode: Literal["cpu", "nvdec"] = Field(
        "cpu", description="nvdec: decode on the GPU (CUDA hwaccel), falling back to the CPU with a "
                           "warning where no GPU or CUDA-enabled FFmpeg is present")

    @field_validator("path")
    @classmethod
    def _exists(cls, v: Path) -> Path:
        if not v.is_file():
            raise ValueError(f"{v} does not exist or is not a file; give the path of a video file")
        return v


class WhipSource(_Model):
    """A bodycam, phone or OBS publishing over WebRTC (WHIP): it POSTs its offer to /whip/{id}."""

    type: Literal["whip"]


Source = Annotated[RtspSource | FileSource | WhipSource, Field(discriminator="type")]


class RtspOutput(_Model):
    """Push the redacted stream to a media server (ANNOUNCE/RECORD), e.g. MediaMTX."""

    type: Literal["rtsp"]
    url: str = Field(description="rtsp://host:port/path to publish to")
    transport: Literal["tcp", "udp"] = "tcp"
    bitrate_kbps: int | None = Field(None, ge=50, le=100_000, description="target bitrate; none: CRF 23")
    gop_s: float = Field(1.0, gt=0, le=10,
                         description="seconds between key frames; new viewers wait this long")
    reconnect: Reconnect = Reconnect()

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _rtsp_url(v)


class FileOutput(_Model):
    """Record the redacted stream to a local file (mp4, mkv or ts)."""

    type: Literal["file"]
    path: Path = Field(description="where to write the recording; its folder must exist")
    bitrate_kbps: int | None = Field(None, ge=50, le=100_000)
    gop_s: float = Field(2.0, gt=0, le=10)

    @field_validator("path")
    @classmethod
    def _writable(cls, v: Path) -> Path:
        if v.suffix.lower() not in (".mp4", ".mkv", ".ts", ".mov"):
            raise ValueError(f"{v}: use a .mp4, .mkv, .mov or .ts file name")
        if not v.parent.is_dir():
            raise ValueError(f"folder {v.parent} does not exist; create it or choose another path")
        return v


Output = Annotated[RtspOutput | FileOutput, Field(discriminator="type")]


class StreamConfig(_Model):
    id: str = Field(description="stream id: letters, digits, _ . -; used in metrics, URLs and events")
    source: Source
    outputs: list[Output] = Field(default_factory=list, description="where the redacted stream goes")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not STREAM_ID.match(v):
            raise ValueError(f"{v!r} is not a valid stream id; use 1-64 letters, digits, '_', '.', '-'")
        return v


class BatcherConfig(_Model):
    max_batch: int = Field(8, ge=1, le=256, description="most frames, from all streams, per detector run")
    max_wait_ms: float = Field(10.0, ge=0, le=1000, description="longest wait to fill a batch")
    inflight: int | None = Field(
        None, ge=1, le=4,
        description="batches handed to the detector at once: with 2 the next batch is uploaded and "
                    "letterboxed while the current one runs (default: 2 on a GPU, 1 on CPU)")
    buckets: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32], min_length=1,
        description="GPU batch sizes (engines are built once per bucket); a batch is split into "
                    "these and nearly full remainders are padded. Must include 1")

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, v: list[int]) -> list[int]:
        if any(b < 1 or b > 256 for b in v):
            raise ValueError(f"bucket sizes must be between 1 and 256, got {v}")
        if 1 not in v:
            raise ValueError(f"buckets must include 1 so any batch can be split, got {v}; add 1")
        return sorted(set(v))


class FailClosedConfig(_Model):
    max_latency_ms: float = Field(
        1000.0, ge=50, le=60_000,
        description="a frame with no detections this long after capture is blanked or withheld")
    action: Literal["blank", "withhold"] = Field(
        "blank", description="blank: publish a black frame (the stream stays live); withhold: skip it")
    hang_timeout_ms: float | None = Field(
        None, ge=50, le=600_000,
        description="a detector run longer than this is abandoned and the detector recreated "
                    "(default: the larger of 5000 and 4 x max_latency_ms; late frames are blanked "
                    "at their deadline either way)")


class DetectionConfig(_Model):
    preset: Literal["accurate", "fast"] = Field(
        "fast", description="accurate: CenterFace, all detectors every frame; fast: YuNet, plates and "
                            "people every 3rd frame with tracking in between")
    face_model: Literal["centerface", "yunet", "both"] | None = None
    face_threshold: float | None = Field(None, gt=0, lt=1)
    plate_threshold: float | None = Field(None, gt=0, lt=1)
    input_size: int | None = Field(None, ge=160, le=4096,
                                   description="largest long side frames are detected at")
    plate_every: int | None = Field(None, ge=1, le=30)
    person_every: int | None = Field(None, ge=1, le=30)
    plates: bool = Field(True, description="detect licence plates")
    heads: bool = Field(True, description="mask heads of small, distant people (CCTV)")
    vehicle_plates_px: float | None = Field(
        None, ge=0, le=4096,
        description="vehicles up to this many pixels tall with no plate found on them get a plate mask "
                    "over their middle (default 200; 0: off). Needs plates and heads (the person model)")
    faces: bool = Field(True, description="detect faces; off only for load-test baselines")
    providers: list[Literal["tensorrt", "cuda", "cpu"]] = Field(
        default_factory=lambda: ["tensorrt", "cuda", "cpu"], min_length=1)
    threads: int = Field(0, ge=0, le=256, description="CPU inference threads per session; 0 = ORT default")
    backend: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto", description="onnxruntime (CPU, CUDA, TensorRT providers); torch runs the same ONNX "
                            "graphs where torch has a GPU but onnxruntime-gpu is not installed; auto "
                            "picks onnxruntime unless only torch can reach the GPU asked for")
    device_id: int = Field(0, ge=0, le=63, description="GPU index")
    fp16: bool = Field(True, description="GPU only: fp16 TensorRT engines and torch modules")
    engine_cache_dir: Path | None = Field(
        None, description="TensorRT engine cache (default ~/.cache/stream-redact/trt); keep it on a "
                          "volume so restarts do not rebuild engines")
    device_preprocess: bool = Field(
        True, description="GPU only: upload each frame once and letterbox/normalise on the GPU "
                          "(needs torch); else on the host")
    warmup: bool = Field(True, description="GPU only: run every model per bucket at start, so the "
                                           "first frames do not wait for engine builds")
    model_dir: Path | None = None


class RedactionConfig(_Model):
    style: Style = Style.BLUR
    face_scale: float = Field(1.4, ge=1, le=4)
    plate_scale: float = Field(1.25, ge=1, le=4)
    coast: int = Field(12, ge=0, le=300, description="frames a lost box stays masked")

    def redact_config(self) -> RedactConfig:
        return RedactConfig(style=self.style, mask_scale={"face": self.face_scale, "plate": self.plate_scale})

    def tracker_config(self) -> TrackerConfig:
        return TrackerConfig(max_coast=self.coast)


class HttpConfig(_Model):
    host: str = Field("127.0.0.1", description="address for /metrics and health; 0.0.0.0 to expose it")
    port: int = Field(9108, ge=0, le=65535, description="0 picks a free port")


class AuthConfig(_Model):
    """Where bearer tokens for the control API, WHIP and WHEP come from (never the YAML itself)."""

    tokens_env: str = Field("STREAM_REDACT_TOKENS", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                            description="environment variable holding comma-separated tokens")
    tokens_file: Path | None = Field(None, description="file with one token per line (e.g. a mounted secret)")


class ApiConfig(_Model):
    allow_file_sources: bool = Field(
        False, description="let API clients add `file` sources; off, since a file source reads any local "
                           "video the process can read")


class PipelineConfig(_Model):
    streams: list[StreamConfig] = Field(default_factory=list)
    queue_size: int = Field(2, ge=1, le=64, description="frames waiting per stream; older ones are dropped")
    batcher: BatcherConfig = BatcherConfig()
    fail_closed: FailClosedConfig = FailClosedConfig()
    detection: DetectionConfig = DetectionConfig()
    redaction: RedactionConfig = RedactionConfig()
    http: HttpConfig = HttpConfig()
    auth: AuthConfig = AuthConfig()
    api: ApiConfig = ApiConfig()
    events: EventsConfig = Field(EventsConfig(), description="detection/stream/incident events: jsonl file "
                                                             "or Kafka")

    @model_validator(mode="after")
    def _unique(self) -> PipelineConfig:
        seen: set[str] = set()
        for s in self.streams:
            if s.id in seen:
                raise ValueError(f"stream id {s.id!r} is used twice; give each stream its own id")
            seen.add(s.id)
        gap = max(self.detection.plate_every or 1, self.detection.person_every or 1)
        if self.redaction.coast < gap:
            raise ValueError(f"redaction.coast ({self.redaction.coast}) is shorter than the detector gap "
                             f"({gap} frames): boxes would vanish between runs; raise coast")
        return self


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("rtsp", "file", "whip"):
            continue  # discriminated-union tags are not config keys
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def format_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against the documented config keys"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown type; use one of {err.get('ctx', {}).get('expected_tags', '')}"
        elif err["type"] == "union_tag_not_found":
            msg = "missing 'type'; say type: rtsp, file or whip"
        lines.append(f"{_where(err['loc'])}: {msg}")
    return "\n  ".join(lines)


def parse_config(data: Any, origin: str = "config", base_dir: Path | None = None) -> PipelineConfig:
    """Validate a loaded YAML/JSON document; raise UserError listing every bad field.

    ``base_dir`` is the config file's folder: relative paths in ``events`` resolve against it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{origin}: the top level must be a mapping with a 'streams' list", exit_code=2)
    try:
        return PipelineConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as e:
        raise UserError(f"{origin} is not valid:\n  {format_errors(e)}", exit_code=2) from None


def load_config(path: Path) -> PipelineConfig:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file {path} not found; pass an existing YAML file to --config", 2) from None
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror}", exit_code=2) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}", exit_code=2) from None
    return parse_config(data, origin=str(path), base_dir=path.resolve().parent)
