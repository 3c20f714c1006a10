"""Opening a video with NVDEC when asked for, and on the CPU when NVDEC is not there.

NVDEC takes H.264/HEVC decoding off the CPU, which on H100/H200 nodes is also needed for the
x264 encoders (those GPUs have no NVENC). It is optional: a machine, FFmpeg build or container
without CUDA decodes on the CPU instead, with one warning per stream, never a dead stream.
"""

from __future__ import annotations

import logging
from typing import Any

import av
from av.codec.hwaccel import HWAccel, hwdevices_available

from stream.core.urls import mask_text

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn(stream_id: str, why: str) -> None:
    if stream_id not in _warned:  # once per stream, not once per reconnect
        _warned.add(stream_id)
        log.warning("stream %s: %s; decoding on the CPU", stream_id, why)


def open_video(url: str, decode: str, stream_id: str, device_id: int = 0,
               **kwargs: Any) -> tuple[Any, str]:
    """``av.open`` with CUDA decoding for ``decode == "nvdec"``; returns (container, decoder used).

    Frames are downloaded to host memory after decoding (the redaction and the x264 encoder
    work on the host copy). If the CUDA device cannot be opened the stream is opened again
    without it; an error that has nothing to do with the GPU is raised by that second open.
    """
    if decode != "nvdec":
        return av.open(url, **kwargs), "cpu"
    if "cuda" not in hwdevices_available():
        _warn(stream_id, "nvdec asked for but this FFmpeg build has no CUDA support")
        return av.open(url, **kwargs), "cpu"
    try:
        return av.open(url, hwaccel=HWAccel("cuda", device=str(device_id), allow_software_fallback=True),
                       **kwargs), "nvdec"
    except (av.error.FFmpegError, OSError) as e:
        container = av.open(url, **kwargs)  # a network or file error is raised here, as without nvdec
        _warn(stream_id, f"nvdec unavailable ({mask_text(str(e), url)})")  # FFmpeg errors quote the URL
        return container, "cpu"
