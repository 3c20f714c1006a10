"""The live pipeline's configuration: one YAML file, validated field by field before anything starts.

Every field carries a description so a rejected value can be explained in the words of the
config file itself: ``streams[1].source.url: ...``. Unknown keys are errors, not ignored, since a
misspelt ``max_latency_ms`` silently falling back to a default is how a pipeline ends up
leaking or stalling in production.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from stream.config.audio import AudioConfig
from stream.config.base import ENV_NAME, ConfigModel, config_path, expand_env, file_context
from stream.config.cluster import ClusterConfig
from stream.config.events import EventsConfig
from stream.config.privacy import OPTIONAL_LABELS, PrivacyConfig, ZoneConfig, check_zones
from stream.core.cuts import THRESHOLD as CUT_THRESHOLD
from stream.core.errors import UserError
from stream.core.redact import RedactConfig, Style
from stream.core.track import TrackerConfig
from stream.core.urls import mask_url
from stream.core.vehicle_plates import LABEL as VEHICLE_PLATE
from stream.core.vehicle_plates import SCALE as VEHICLE_PLATE_SCALE

if TYPE_CHECKING:
    from stream.detect.ensemble import DetectorConfig

STREAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""matched whole (``fullmatch``): ``$`` would let a trailing newline through into headers and metrics"""
MAX_DEPTH = 32
"""deepest nesting a config document or API body may have (the real schema needs 5)"""
MAX_CONFIG_BYTES = 4 * 1024 * 1024


def _rtsp_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("rtsp", "rtsps"):
        raise ValueError(f"{mask_url(value)!r} is not an RTSP URL; write rtsp://host[:port]/path")
    if "@" in parts.path + parts.query + parts.fragment or "#" in value:
        raise ValueError(f"{mask_url(value)!r} cannot be read unambiguously: a user name or password holding "
                         "'/', '#', '?' or '@' must be percent-encoded (%2F, %23, %3F, %40)")
    if not parts.hostname:
        raise ValueError(f"{mask_url(value)!r} has no host; write rtsp://host[:port]/path")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"{mask_url(value)!r} has a bad port; use 1-65535") from None
    return value


def nesting_depth(data: Any, limit: int = MAX_DEPTH) -> int:
    """How deep ``data`` nests (iteratively, stopping past ``limit``): no recursion to exhaust."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


class ReconnectConfig(ConfigModel):
    initial_s: float = Field(0.5, gt=0, le=60, description="first wait before reconnecting")
    max_s: float = Field(10.0, gt=0, le=600, description="longest wait between reconnects")
    jitter: float = Field(0.2, ge=0, le=1, description="random share added to each wait")

    @model_validator(mode="after")
    def _order(self) -> ReconnectConfig:
        if self.max_s < self.initial_s:
            raise ValueError("max_s must be >= initial_s")
        return self


class RtspSourceConfig(ConfigModel):
    """A camera or VMS stream pulled over RTSP."""

    type: Literal["rtsp"]
    url: str = Field(description="rtsp://[user:pass@]host[:port]/path; in the config file credentials may "
                                 "come from the environment as ${VAR}")
    transport: Literal["tcp", "udp"] = Field("tcp", description="RTP transport; tcp survives NAT and loss")
    open_timeout_s: float = Field(5.0, gt=0, le=120, description="give up opening after this long")
    read_timeout_s: float = Field(5.0, gt=0, le=120, description="a stream silent this long is reconnected")
    reconnect: ReconnectConfig = ReconnectConfig()
    decode: Literal["cpu", "nvdec"] = Field(
        "cpu", description="nvdec: decode on the GPU (CUDA hwaccel), falling back to the CPU with a "
                           "warning where no GPU or CUDA-enabled FFmpeg is present")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str, info: ValidationInfo) -> str:
        return _rtsp_url(expand_env(v, info))


class FileSourceConfig(ConfigModel):
    """A video file played as if it were a live camera (demos, tests, load tests)."""

    type: Literal["file"]
    path: Path = Field(description="video file to play; in the config file a relative path is relative "
                                   "to the config file's folder")
    loop: bool = Field(False, description="start again at the end instead of ending the stream")
    realtime: bool = Field(True, description="pace frames at the file's frame rate, as a camera would")
    decode: Literal["cpu", "nvdec"] = Field(
        "cpu", description="nvdec: decode on the GPU (CUDA hwaccel), falling back to the CPU with a "
                           "warning where no GPU or CUDA-enabled FFmpeg is present")

    @field_validator("path")
    @classmethod
    def _exists(cls, v: Path, info: ValidationInfo) -> Path:
        v = config_path(v, info)
        if not v.is_file():
            raise ValueError(f"{v} does not exist or is not a file; give the path of a video file")
        return v


class WhipSourceConfig(ConfigModel):
    """A bodycam, phone or OBS publishing over WebRTC (WHIP): it POSTs its offer to /whip/{id}."""

    type: Literal["whip"]


SourceConfig = Annotated[RtspSourceConfig | FileSourceConfig | WhipSourceConfig, Field(discriminator="type")]


class RtspOutputConfig(ConfigModel):
    """Push the redacted stream to a media server (ANNOUNCE/RECORD), e.g. MediaMTX."""

    type: Literal["rtsp"]
    url: str = Field(description="rtsp://host:port/path to publish to; in the config file it may use ${VAR}")
    transport: Literal["tcp", "udp"] = Field("tcp", description="RTP transport towards the media server")
    bitrate_kbps: int | None = Field(None, ge=50, le=100_000, description="target bitrate; none: CRF 23")
    gop_s: float = Field(1.0, gt=0, le=10,
                         description="seconds between key frames; new viewers wait this long")
    reconnect: ReconnectConfig = ReconnectConfig()

    @field_validator("url")
    @classmethod
    def _url(cls, v: str, info: ValidationInfo) -> str:
        return _rtsp_url(expand_env(v, info))


class FileOutputConfig(ConfigModel):
    """Record the redacted stream to a local file (mp4, mkv or ts)."""

    type: Literal["file"]
    path: Path = Field(description="where to write the recording; its folder must exist. In the config "
                                   "file a relative path is relative to the config file's folder; through "
                                   "the API, to api.file_output_dir")
    bitrate_kbps: int | None = Field(None, ge=50, le=100_000, description="target bitrate; none: CRF 23")
    gop_s: float = Field(2.0, gt=0, le=10, description="seconds between keyframes")

    @field_validator("path")
    @classmethod
    def _writable(cls, v: Path, info: ValidationInfo) -> Path:
        v = config_path(v, info)
        if v.suffix.lower() not in (".mp4", ".mkv", ".ts", ".mov"):
            raise ValueError(f"{v}: use a .mp4, .mkv, .mov or .ts file name")
        if not v.parent.is_dir():
            raise ValueError(f"folder {v.parent} does not exist; create it or choose another path")
        return v


class RecordOutputConfig(ConfigModel):
    """Record the redacted stream as evidence: fragmented MP4 segments, each with a hash-chained manifest."""

    type: Literal["record"]
    dir: Path = Field(description="folder of the recordings: each stream writes DIR/STREAM_ID/YYYYMMDD/; "
                                  "created if missing, but its parent must exist. In the config file a "
                                  "relative path is relative to the config file's folder; through the API, "
                                  "to api.file_output_dir")
    segment_s: float = Field(60.0, ge=1, le=3600,
                             description="seconds per segment; a segment ends at the first frame after "
                                         "this long and the next starts with a keyframe")
    retention_days: float = Field(30.0, gt=0, le=36_500,
                                  description="segments that ended longer ago than this are deleted with "
                                              "their manifests (logged, counted, audited)")
    max_bytes: int | None = Field(None, ge=10_000,
                                  description="most bytes this stream's recordings may take on disk; past "
                                              "it the oldest segments are deleted (none: only a full disk "
                                              "deletes early)")
    bitrate_kbps: int | None = Field(None, ge=50, le=100_000, description="target bitrate; none: CRF 23")
    gop_s: float = Field(2.0, gt=0, le=10, description="seconds between keyframes within a segment")

    @field_validator("dir")
    @classmethod
    def _parent_exists(cls, v: Path, info: ValidationInfo) -> Path:
        v = config_path(v, info)
        if v.exists() and not v.is_dir():
            raise ValueError(f"{v} is not a folder; give the folder recordings go to")
        if not v.exists() and not v.parent.is_dir():
            raise ValueError(f"folder {v.parent} does not exist; create it or choose another dir")
        return v


OutputConfig = Annotated[RtspOutputConfig | FileOutputConfig | RecordOutputConfig,
                         Field(discriminator="type")]


class StreamConfig(ConfigModel):
    id: str = Field(description="stream id: letters, digits, _ . -; used in metrics, URLs and events")
    source: SourceConfig
    outputs: list[OutputConfig] = Field(default_factory=list, description="where the redacted stream goes")
    zones: list[ZoneConfig] = Field(default_factory=list, description=(
        "privacy zones: polygons always painted over (mask) or the only parts shown (only), in every "
        "published frame whatever detection says; changeable at run time with PUT /api/streams/{id}/zones"))
    privacy: PrivacyConfig = Field(PrivacyConfig(), description="extra classes masked on this stream: "
                                   "screens, whole persons")
    audio: AudioConfig = Field(AudioConfig(), description="what happens to the stream's sound: speech "
                               "muted (default) or disguised, or the audio dropped or kept")

    @field_validator("zones")
    @classmethod
    def _zones(cls, v: list[ZoneConfig]) -> list[ZoneConfig]:
        return check_zones(v)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not STREAM_ID.fullmatch(v):
            raise ValueError(f"{v!r} is not a valid stream id; use 1-64 letters, digits, '_', '.', '-'")
        return v

    def file_paths(self) -> list[Path]:
        """Where this stream's file outputs write, resolved (two streams must never share one)."""
        return [Path(os.path.realpath(o.path)) for o in self.outputs if isinstance(o, FileOutputConfig)]


DEFAULT_MAX_BATCH = 8
"""``batcher.max_batch`` on a GPU where it is not set"""


class BatcherConfig(ConfigModel):
    max_batch: int | None = Field(
        None, ge=1, le=256,
        description="most frames, from all streams, per detector run (default: 8 on a GPU; on a CPU one "
                    "per lane of detection.lanes, since a second frame per lane only waits for the "
                    "first: two fast 640x360 cameras on 2 cores held with 2 and dropped frames with 8)")

    def batch_bound(self) -> int:
        """The largest batch there can be, before the stage knows where it runs (queue room,
        warm-up): ``max_batch`` or the GPU default."""
        return self.max_batch or DEFAULT_MAX_BATCH
    max_wait_ms: float = Field(10.0, ge=0, le=1000, description="longest wait to fill a batch")
    inflight: int | None = Field(
        None, ge=1, le=4,
        description="batches handed to the detector at once: with 2 the next batch is uploaded and "
                    "letterboxed while the current one runs (default: 2 on a GPU, 1 on CPU)")
    buckets: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64], min_length=1,
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


class FailClosedConfig(ConfigModel):
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


class DetectionConfig(ConfigModel):
    preset: Literal["accurate", "fast"] = Field(
        "fast", description="accurate: CenterFace, all detectors every frame; fast: YuNet, plates and "
                            "people every 3rd frame with tracking in between")
    face_model: Literal["centerface", "yunet", "both"] | None = Field(
        None, description="face detector; default from the preset (fast: yunet, accurate: centerface); "
                          "both merges the two")
    face_threshold: float | None = Field(
        None, gt=0, lt=1, description="face score threshold; default per model (centerface 0.35, yunet 0.5)")
    plate_threshold: float | None = Field(None, gt=0, lt=1,
                                          description="plate score threshold (default 0.2)")
    input_size: int | None = Field(None, ge=160, le=4096,
                                   description="largest long side frames are detected at")
    plate_every: int | None = Field(None, ge=1, le=30,
                                    description="run the plate model on every n-th frame of a stream (the "
                                                "tracker carries its boxes between); default from the preset")
    person_every: int | None = Field(None, ge=1, le=30,
                                     description="the same for the person model (head and vehicle masks)")
    plates: bool = Field(True, description="detect licence plates")
    heads: bool = Field(True, description="mask heads of small, distant people (CCTV)")
    plate_crops: bool = Field(
        True, description="search each vehicle the person model finds for its plate a second time, on a "
                          "crop scaled to the plate model's reach (small and distant plates). Needs "
                          "plates and heads (the person model)")
    plate_relook: bool = Field(
        True, description="look again for a plate a stream showed in its last 50 frames where a frame's "
                          "full-frame pass did not find it: the plate model on a crop around where it was "
                          "(and is heading), read 1.5x larger than the full-frame pass (plates whose "
                          "detection flickers). Needs plates")
    text_plates: bool | None = Field(
        None, description="also mask as plates the text lines a text detector (PP-OCRv4) finds on the "
                          "whole frame: square, foreign, skewed plates the plate model misses; signs "
                          "and lettering are masked too. Default from the preset (accurate: on, fast: "
                          "off: it costs as much as the plate model). Needs plates")
    vehicle_plates_px: float | None = Field(
        None, ge=0, le=4096,
        description="vehicles up to this many pixels tall with no plate found on them get a plate mask "
                    "over their middle (default 200; 0: off): with plate_crops, after their crop was "
                    "searched too. Needs plates and heads (the person model)")
    providers: list[Literal["tensorrt", "cuda", "cpu"]] = Field(
        default_factory=lambda: ["tensorrt", "cuda", "cpu"], min_length=1,
        description="ONNX Runtime providers in order; unavailable ones are skipped with a warning")
    threads: int = Field(0, ge=0, le=256, description="CPU inference threads per session; 0: cores / lanes")
    lanes: int = Field(
        0, ge=0, le=16,
        description="CPU only: how many of a batch's model runs go side by side, each on its own core "
                    "(plates, persons, faces and text of one frame; the frames of a batch split between "
                    "them). 0: one per core up to 4, or cores / threads where threads is set; 1: one "
                    "after the other, each on every core")
    skip_unchanged: bool = Field(
        False, description="CPU only, for fixed cameras: a model looks again only at the parts of a "
                           "stream's picture that changed since it last looked there (with a margin and "
                           "every box they touch), keeps its last boxes elsewhere, and looks at the whole "
                           "picture at least every 50 frames (docs/redaction-quality.md)")
    backend: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto", description="onnxruntime (CPU, CUDA, TensorRT providers); torch runs the same ONNX "
                            "graphs where torch has a GPU but onnxruntime-gpu is not installed; auto "
                            "picks onnxruntime unless only torch can reach the GPU asked for")
    device_id: int = Field(0, ge=0, le=63, description="GPU index")
    fp16: bool = Field(True, description="GPU only: fp16 TensorRT engines and torch modules")
    int8: Literal["auto", "off"] = Field(
        "auto", description="CPU only: auto runs the plate and person models as their int8 variants "
                            "where their input is at most 640 px, as in the fast preset (about 1.6x "
                            "faster, development-set recall within a point of fp32); off runs fp32. "
                            "GPUs and the torch backend always run the fp32 graphs")
    engine_cache_dir: Path | None = Field(
        None, description="TensorRT engine cache (default ~/.cache/stream-redact/trt; relative to the "
                          "config file's folder); keep it on a volume so restarts do not rebuild engines")
    device_preprocess: bool = Field(
        True, description="GPU only: upload each frame once and letterbox/normalise on the GPU "
                          "(needs torch); else on the host")
    static_graphs: bool = Field(
        True, description="torch backend: one module per input shape (bucket x canvas), converted from "
                          "the graph frozen to that shape, so no shape is read back from the GPU "
                          "(frozen graphs are cached in engine_cache_dir/static, by default "
                          "~/.cache/stream-redact/static)")
    device_decode: bool = Field(
        True, description="torch backend: score threshold, top-K and NMS on the device, only the kept "
                          "boxes come back; a frame the device cannot decode exactly (more than 128 "
                          "candidates, NMS not certified) is decoded on the host")
    cuda_graphs: bool = Field(
        True, description="torch backend on a GPU, with static_graphs: each shape's forward and "
                          "decoding captured once as a CUDA graph and replayed per batch (capture "
                          "failures are logged and that shape runs eagerly)")
    warmup: bool = Field(True, description="GPU only: run every model per bucket at start, so the "
                                           "first frames do not wait for engine builds")
    model_dir: Path | None = Field(
        None, description="folder with the ONNX weights (default: the ones installed with the package); "
                          "relative to the config file's folder")

    @field_validator("model_dir", "engine_cache_dir")
    @classmethod
    def _relative_to_config(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else config_path(v, info)

    def detector_settings(self, buckets: Sequence[int] | None = None,
                          classes: Sequence[str] = ()) -> DetectorConfig:
        """What the detector is built from: the preset, with every field set here taking precedence.

        The one conversion from these settings to the detector's: the live pipeline (with the
        batcher's ``buckets``), ``redact`` and the benchmarks all call it, so one config means one
        detector wherever it is used. ``buckets`` None keeps the detector's default sizes; ``classes``
        (``screen``, ``person``) are reported besides faces and plates."""
        from stream.detect.presets import detector_config

        runtime: dict[str, Any] = {} if buckets is None else {"buckets": tuple(buckets)}
        return detector_config(
            self.preset, face_model=self.face_model, face_threshold=self.face_threshold,
            plate_threshold=self.plate_threshold, input_size=self.input_size, plate_every=self.plate_every,
            person_every=self.person_every, plates=self.plates, heads=self.heads,
            vehicle_plates=self.vehicle_plates_px, plate_crops=self.plate_crops, classes=tuple(classes),
            plate_relook=self.plate_relook,
            text_plates=self.text_plates,
            providers=self.providers,
            threads=self.threads, lanes=self.lanes, regions=self.skip_unchanged,
            model_dir=self.model_dir, backend=self.backend, device_id=self.device_id, fp16=self.fp16,
            int8=self.int8, cache_dir=self.engine_cache_dir, device_preprocess=self.device_preprocess,
            static_graphs=self.static_graphs, device_decode=self.device_decode, cuda_graphs=self.cuda_graphs,
            **runtime)


class RedactionConfig(ConfigModel):
    style: Style = Field(Style.BLUR, description="blur (no feature survives at any face size), pixelate "
                                                 "or solid (black)")
    face_scale: float = Field(1.4, ge=1, le=4, description="face mask enlargement about the box centre")
    plate_scale: float = Field(1.25, ge=1, le=4, description="plate mask enlargement about the box centre")
    coast: int = Field(12, ge=0, le=300, description="frames a lost box stays masked")
    cut_threshold: float = Field(CUT_THRESHOLD, ge=0, lt=1,
                                 description="two consecutive frames whose shrunk luma correlates below "
                                             "this, and whose luma histograms differ, are a shot cut (a "
                                             "VMS switch, a PTZ tour, an edit): the masks of the old view "
                                             "end there; 0: never")

    def redact_config(self) -> RedactConfig:
        # whole persons and screens: a little margin for limbs and bezels, which their boxes cut close
        return RedactConfig(style=self.style, mask_scale={"face": self.face_scale, "plate": self.plate_scale,
                                                          VEHICLE_PLATE: VEHICLE_PLATE_SCALE,
                                                          "person": 1.1, "screen": 1.1})

    def tracker_config(self) -> TrackerConfig:
        return TrackerConfig(max_coast=self.coast, cut_threshold=self.cut_threshold)


_HOSTNAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def _host(v: str) -> str:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        if not _HOSTNAME.fullmatch(v):
            raise ValueError(f"{v!r} is neither an IP address nor a host name; write e.g. 127.0.0.1, 0.0.0.0 "
                             "or worker-1.example.org") from None
    return v


class HttpConfig(ConfigModel):
    host: str = Field("127.0.0.1", description="address for /metrics and health; 0.0.0.0 to expose it")
    port: int = Field(9108, ge=0, le=65535, description="0 picks a free port")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return _host(v)


_HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
"""an HTTP header name (matched whole)"""
ROLE = Literal["viewer", "operator", "admin"]


class ProxyAuthConfig(ConfigModel):
    """A reverse proxy (SSO) that has logged the user in and names them in a header."""

    header: str = Field("X-Forwarded-User", description="header holding the user name; believed only "
                                                        "from the addresses in trusted")
    trusted: list[str] = Field(min_length=1, description="CIDRs of the reverse proxies (e.g. 10.0.5.7/32); "
                                                         "the header from any other address is refused")
    role_header: str | None = Field(None, description="header holding the user's role (viewer, operator, "
                                                      "admin) for users not in auth.users_file")
    default_role: ROLE = Field("viewer", description="role of a proxied user neither in auth.users_file nor "
                                                     "given a role by role_header")

    @field_validator("header", "role_header")
    @classmethod
    def _header(cls, v: str | None) -> str | None:
        if v is not None and not _HEADER.fullmatch(v):
            raise ValueError(f"{v!r} is not an HTTP header name; write e.g. X-Forwarded-User")
        if v is not None and v.lower() in ("authorization", "host", "x-forwarded-for", "x-stream-redact-peer",
                                           "x-stream-redact-front"):
            raise ValueError(f"{v} cannot carry the user name; use the header the proxy sets, e.g. "
                             "X-Forwarded-User")
        return v

    @field_validator("trusted")
    @classmethod
    def _trusted(cls, v: list[str]) -> list[str]:
        for entry in v:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not a CIDR network; write the proxy's address, e.g. "
                                 "10.0.5.7/32") from None
        return v


class AuthConfig(ConfigModel):
    """Where bearer tokens for the control API, WHIP and WHEP come from (never the YAML itself)."""

    tokens_env: str = Field("STREAM_REDACT_TOKENS", pattern=f"^{ENV_NAME.pattern}$",
                            description="environment variable holding comma-separated tokens (each acts "
                                        "as role admin)")
    tokens_file: Path | None = Field(
        None, description="file with one token per line (e.g. a mounted secret); a relative path is "
                          "relative to the config file's folder")
    users_file: Path | None = Field(
        None, description="named users with roles (viewer, operator, admin) and hashed tokens, managed "
                          "with `stream-redact users`; read again when it changes. Relative to the "
                          "config file's folder")
    proxy: ProxyAuthConfig | None = Field(
        None, description="trust a reverse proxy's (SSO) user header, from its addresses only")

    @field_validator("tokens_file", "users_file")
    @classmethod
    def _tokens_file(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else config_path(v, info)


class AuditConfig(ConfigModel):
    """The tamper-evident audit log: who watched, changed or was refused what, and incidents."""

    path: Path | None = Field(
        None, description="JSON Lines file, hash-chained and appended to (each `run --workers N` worker "
                          "writes <name>.worker-<i><suffix>); none: no audit log, and a warning at start. "
                          "Relative to the config file's folder")
    events: bool = Field(True, description="also send every record as an audit.* event through the event "
                                           "sink (a copy off the machine anchors the chain)")

    @field_validator("path")
    @classmethod
    def _path(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None:
            return None
        v = config_path(v, info)
        if not v.parent.is_dir():
            raise ValueError(f"folder {v.parent} does not exist; create it or choose another audit path")
        return v


DEFAULT_SOURCE_NETWORKS = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                           "100.64.0.0/10", "fc00::/7", "fe80::/10")
"""loopback and private ranges: where cameras, VMSs and media servers of a control room live"""


class ApiConfig(ConfigModel):
    allow_file_sources: bool = Field(
        False, description="let API clients add `file` sources; off, since a file source reads any local "
                           "video the process can read")
    allow_file_outputs: bool = Field(
        False, description="let API clients add `file` outputs (recordings); they are written only under "
                           "api.file_output_dir, never over an existing file or another stream's output")
    file_output_dir: Path | None = Field(
        None, description="the one folder API-added recordings go to (needed by allow_file_outputs); a "
                          "relative output path in an API request is taken relative to it. A relative "
                          "file_output_dir is relative to the config file's folder")
    zones_dir: Path | None = Field(
        None, description="where zones set through the API are kept, one file per stream, so they outlive a "
                          "restart (default: zones/ in the state directory); relative to the config file's "
                          "folder")
    max_streams: int = Field(128, ge=1, le=10_000,
                             description="most streams this worker runs (config and API together); "
                                         "an API add beyond it gets 429")
    allowed_source_networks: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SOURCE_NETWORKS),
        description="hosts API clients may make this worker connect to (RTSP sources and outputs added "
                    "through the API): CIDRs (10.0.0.0/8) or host names; a name in a URL must resolve "
                    "into these networks or be listed itself. Default: loopback and private ranges; "
                    "'0.0.0.0/0' and '::/0' allow any. Config streams are not limited")

    @field_validator("allowed_source_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for entry in v:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if not _HOSTNAME.fullmatch(entry):
                    raise ValueError(f"{entry!r} is neither a CIDR network nor a host name; write e.g. "
                                     "10.0.0.0/8 or cam.example.org") from None
        return v

    @field_validator("file_output_dir", "zones_dir")
    @classmethod
    def _dir(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else config_path(v, info)

    @model_validator(mode="after")
    def _output_dir(self) -> ApiConfig:
        if self.allow_file_outputs:
            if self.file_output_dir is None:
                raise ValueError("allow_file_outputs needs file_output_dir: the one folder API recordings "
                                 "may be written to")
            if not self.file_output_dir.is_dir():
                raise ValueError(f"file_output_dir {self.file_output_dir} is not a folder; create it or "
                                 "choose another")
        return self


class WebRtcConfig(ConfigModel):
    """WHIP/WHEP limits and where WebRTC media may flow (so a firewall can be written for it)."""

    max_viewers_per_stream: int = Field(16, ge=1, le=1000,
                                        description="WHEP viewers per stream; more get 503")
    max_viewers: int = Field(256, ge=1, le=10_000,
                             description="WHEP viewers of this worker in all; more get 503")
    host_candidates: list[str] | None = Field(
        None, description="IP addresses offered as ICE host candidates (default: http.host when it is "
                          "one address, else every interface but loopback)")
    udp_ports: tuple[int, int] | None = Field(
        None, description="[first, last] local UDP ports WebRTC media may use (default: any ephemeral)")

    @field_validator("host_candidates")
    @classmethod
    def _candidates(cls, v: list[str] | None) -> list[str] | None:
        for addr in v or ():
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ValueError(f"{addr!r} is not an IP address; write e.g. 10.0.0.5") from None
        if v is not None and not v:
            raise ValueError("give at least one address, or leave host_candidates out")
        return v

    @field_validator("udp_ports")
    @classmethod
    def _ports(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (1024 <= v[0] <= v[1] <= 65535):
            raise ValueError(f"{list(v)} is not a port range; write [first, last] with 1024 <= first <= last "
                             "<= 65535")
        return v


class PipelineConfig(ConfigModel):
    streams: list[StreamConfig] = Field(default_factory=list)
    workers: int | None = Field(None, ge=1, le=256, description=(
        "stream worker processes of `run` (--workers overrides): each decodes, paints and encodes a share "
        "of the streams while one detection stage process batches for all of them; default one per spare "
        "core (cores - 1, at least 1); 1 runs everything in one process"))
    queue_size: int = Field(2, ge=1, le=64, description="frames waiting per stream; older ones are dropped")
    batcher: BatcherConfig = BatcherConfig()
    fail_closed: FailClosedConfig = FailClosedConfig()
    detection: DetectionConfig = DetectionConfig()
    redaction: RedactionConfig = RedactionConfig()
    http: HttpConfig = HttpConfig()
    auth: AuthConfig = AuthConfig()
    api: ApiConfig = ApiConfig()
    webrtc: WebRtcConfig = WebRtcConfig()
    events: EventsConfig = Field(EventsConfig(), description="detection/stream/incident events: jsonl file "
                                                             "or Kafka")
    cluster: ClusterConfig = Field(ClusterConfig(), description="how the workers of a deployment share the "
                                   "streams: a fixed split (static) or a Kafka consumer group (kafka)")
    audit: AuditConfig = Field(AuditConfig(), description="who watched, changed or was refused what: a "
                                                          "hash-chained JSON Lines file")

    @model_validator(mode="after")
    def _unique(self) -> PipelineConfig:
        seen: set[str] = set()
        paths: dict[Path, str] = {}
        for s in self.streams:
            if s.id in seen:
                raise ValueError(f"stream id {s.id!r} is used twice; give each stream its own id")
            seen.add(s.id)
            for path in s.file_paths():
                if path in paths:
                    raise ValueError(f"streams {paths[path]!r} and {s.id!r} both record to {path}; give each "
                                     "file output its own path")
                paths[path] = s.id
        if len(self.streams) > self.api.max_streams:
            raise ValueError(f"{len(self.streams)} streams are configured but api.max_streams is "
                             f"{self.api.max_streams}; raise api.max_streams or split the streams over "
                             "workers")
        if self.cluster.mode == "kafka" and self.events.kafka is None:
            raise ValueError("cluster.mode kafka needs events.kafka (bootstrap_servers and security): the "
                             "workers find each other through the same brokers; add an events.kafka section")
        gap = max(self.detection.plate_every or 1, self.detection.person_every or 1)
        if self.redaction.coast < gap:
            raise ValueError(f"redaction.coast ({self.redaction.coast}) is shorter than the detector gap "
                             f"({gap} frames): boxes would vanish between runs; raise coast")
        return self

    def privacy_classes(self) -> tuple[str, ...]:
        """The optional classes (``screen``, ``person``) the shared detector reports. With head masks
        on, the person model runs anyway and reports both, so a stream added later may ask for them;
        without, only what a configured stream asks for (the person model then runs for it)."""
        if self.detection.heads:
            return tuple(sorted(OPTIONAL_LABELS))
        return tuple(sorted(set().union(*(s.privacy.labels for s in self.streams))))


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("rtsp", "file", "whip", "record"):
            continue  # discriminated-union tags are not config keys
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


_NO_SUCH_SWITCH = {
    "detection.faces": "unknown key: faces are always detected and redacted, nothing turns that off; "
                       "remove the key",
}
"""keys people may expect to exist, with why they do not"""


def format_errors(e: ValidationError) -> str:
    """One line per bad field: where it is, what is wrong with it and the fix."""
    lines = []
    for err in e.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = _NO_SUCH_SWITCH.get(_where(err["loc"]),
                                      "unknown key; check its spelling against the documented config keys")
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown type; use one of {err.get('ctx', {}).get('expected_tags', '')}"
        elif err["type"] == "union_tag_not_found":
            msg = "missing 'type'; say type: rtsp, file or whip"
        lines.append(f"{_where(err['loc'])}: {msg}")
    return "\n  ".join(lines)


def parse_config(data: Any, origin: str = "config", base_dir: Path | None = None) -> PipelineConfig:
    """Validate a loaded YAML/JSON document; raise UserError listing every bad field.

    ``base_dir`` is the config file's folder: relative paths resolve against it (None: the working
    directory). ``${VAR}`` is expanded here, in a config document, never in an API body."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{origin}: the top level must be a mapping with a 'streams' list", exit_code=2)
    if nesting_depth(data) > MAX_DEPTH:
        raise UserError(f"{origin} nests deeper than {MAX_DEPTH} levels; a stream-redact config needs about "
                        "5: check its indentation", exit_code=2)
    try:
        return PipelineConfig.model_validate(data, context=file_context(base_dir))
    except ValidationError as e:
        raise UserError(f"{origin} is not valid:\n  {format_errors(e)}", exit_code=2) from None


def load_config(path: Path) -> PipelineConfig:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file {path} not found; pass an existing YAML file to --config", 2) from None
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror}", exit_code=2) from None
    if len(text) > MAX_CONFIG_BYTES:
        raise UserError(f"config {path} is larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB; a config "
                        "this big is not a stream-redact config", exit_code=2)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}", exit_code=2) from None
    except RecursionError:
        raise UserError(f"{path} nests too deeply to read; a stream-redact config needs about 5 levels: "
                        "check its indentation", exit_code=2) from None
    return parse_config(data, origin=str(path), base_dir=path.resolve().parent)
