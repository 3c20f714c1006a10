"""One H.264 encoder for every output: pictures (BGR arrays or I420) in, packets out.

A recorded file, an RTSP push and the WebRTC viewers differ only in their settings
(:class:`H264Settings`) and in what they do with the packets (mux them into a container, hand
them to many viewers); setting up libx264 and turning an image into a frame live here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import av
import cv2
import numpy as np
from av.video.codeccontext import VideoCodecContext
from av.video.frame import PictureType
from av.video.stream import VideoStream

from stream.core.yuv import I420, Picture


def even_size(width: int, height: int) -> tuple[int, int]:
    """The largest even width and height that fit (4:2:0 encoders refuse odd sides)."""
    return width & ~1, height & ~1


def video_frame(image: Picture, pts: int, time_base: Fraction,
                size: tuple[int, int] | None = None) -> av.VideoFrame:
    """A video frame of ``image`` (BGR HxWx3 uint8, or I420) cut to ``size`` (default: even sides),
    at ``pts``.

    Cutting drops the last column and/or row only; nothing is scaled. An I420 picture goes in as
    its planes, with no conversion at all.
    """
    w, h = size or even_size(image.shape[1], image.shape[0])
    if isinstance(image, I420):
        if w % 2 == 0 and h % 2 == 0 and w <= image.width and h <= image.height:
            frame = av.VideoFrame.from_ndarray(image.cropped(w, h).data, format="yuv420p")
            frame.pts, frame.time_base = pts, time_base
            return frame
        image = image.to_bgr()  # a 4:4:4 encoder of another size: the BGR route below
    if image.shape[:2] != (h, w):
        image = image[:h, :w]
    if w % 2 == 0 and h % 2 == 0:
        # straight to the encoders' 4:2:0 (same BT.601 conversion as FFmpeg's, within 1 level):
        # OpenCV's converter takes a third of swscale's time from bgr24 (0.4 against 1.0 ms at
        # 640x360, 0.7 against 3.0 ms at 1280x720 on the 2-core CI machine)
        yuv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2YUV_I420)
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
    else:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
    frame.pts, frame.time_base = pts, time_base
    return frame


@dataclass(frozen=True)
class H264Settings:
    """What each use asks of libx264; unset options keep libx264's defaults."""

    preset: str = "ultrafast"
    tune: str | None = None
    """``zerolatency`` for live outputs: no frames held back for look-ahead"""
    crf: int | None = None
    """constant quality (lower is better), used when no ``bitrate`` is set"""
    bitrate: int | None = None
    """target bits per second"""
    bufsize: int | None = None
    """with ``bitrate``: cap the rate at ``bitrate`` over a buffer of this many bits (a link that
    cannot absorb bursts, such as a WebRTC viewer's)"""
    gop: int | None = None
    """frames from one periodic keyframe to the next"""
    b_frames: int | None = None
    profile: str | None = None
    """``Baseline`` (constrained baseline): what every WebRTC H.264 decoder takes"""
    repeat_headers: bool = False
    """SPS/PPS before every keyframe, so a reader joining mid-stream can start (RTSP)"""
    forced_idr: bool = False
    """a requested keyframe is an IDR frame, one a new decoder can start from (WebRTC)"""
    odd_size: Literal["crop", "yuv444p"] = "crop"
    """odd widths/heights: drop the last column/row (4:2:0), or keep them all in 4:4:4 (files)"""

    def options(self) -> dict[str, str]:
        """The libx264 private options these settings make."""
        opts = {"preset": self.preset}
        if self.tune:
            opts["tune"] = self.tune
        if self.bitrate and self.bufsize:
            opts["maxrate"], opts["bufsize"] = str(self.bitrate), str(self.bufsize)
        elif not self.bitrate and self.crf is not None:
            opts["crf"] = str(self.crf)
        if self.repeat_headers:
            opts["repeat-headers"] = "1"
        if self.forced_idr:
            opts["forced-idr"] = "1"
        return opts

    def frame_size(self, width: int, height: int) -> tuple[int, int]:
        """The size frames of ``width`` x ``height`` are encoded at."""
        return (width, height) if self.odd_size == "yuv444p" else even_size(width, height)


class VideoEncoder:
    """Encodes pictures (BGR or I420) with one codec: a container's stream (packets ready to mux) or a
    standalone, opened codec context (packets to send elsewhere)."""

    def __init__(self, codec: VideoStream | VideoCodecContext, time_base: Fraction) -> None:
        """``time_base``: the unit of the ``pts`` given to :meth:`encode`."""
        self._stream = codec if isinstance(codec, VideoStream) else None
        self.context: VideoCodecContext = codec.codec_context if isinstance(codec, VideoStream) else codec
        self.time_base = time_base
        self._encode = codec.encode

    @property
    def size(self) -> tuple[int, int]:
        return self.context.width, self.context.height

    def encode(self, image: Picture, pts: int, keyframe: bool = False) -> list[av.Packet]:
        """Packets for one image (maybe none yet); ``keyframe`` forces this frame to be one."""
        frame = video_frame(image, pts, self.time_base, self.size)
        if keyframe:
            frame.pict_type = PictureType.I
        return self._stamp(self._encode(frame))

    def flush(self) -> list[av.Packet]:
        """The packets still held in the encoder; the encoder takes no frame after this."""
        return self._stamp(self._encode(None))

    def _stamp(self, packets: list[av.Packet]) -> list[av.Packet]:
        if self._stream is None:  # a container sets them when muxing; a WebRTC packetizer reads them here
            for p in packets:
                p.time_base = self.time_base
        return packets


class H264Encoder(VideoEncoder):
    """libx264 at ``width`` x ``height`` (see :meth:`H264Settings.frame_size`) with ``settings``.

    With ``container`` the encoder is a new stream of it (the caller muxes the packets and closes the
    container); without, a standalone context. Frames are stamped in ``time_base`` (default
    ``1/rate``: one tick per frame).
    """

    def __init__(self, width: int, height: int, settings: H264Settings, *, rate: Fraction,
                 time_base: Fraction | None = None,
                 container: av.container.OutputContainer | None = None) -> None:
        codec: VideoStream | VideoCodecContext
        if container is not None:
            codec = container.add_stream("libx264", rate=rate)
            if time_base is not None:
                codec.time_base = time_base
            ctx = codec.codec_context
        else:
            codec = ctx = av.CodecContext.create("libx264", "w")  # type: ignore[assignment]
            ctx.framerate = rate
            time_base = time_base or 1 / rate
        ctx.width, ctx.height = settings.frame_size(width, height)
        # 4:2:0 needs even sides; odd ones only get here in 4:4:4
        ctx.pix_fmt = "yuv420p" if ctx.width % 2 == 0 and ctx.height % 2 == 0 else "yuv444p"
        if time_base is not None:
            ctx.time_base = time_base
        if settings.gop is not None:
            ctx.gop_size = settings.gop
        if settings.b_frames is not None:
            ctx.max_b_frames = settings.b_frames
        if settings.bitrate:
            ctx.bit_rate = settings.bitrate
        if settings.profile:
            ctx.profile = settings.profile
        ctx.options = settings.options()
        if container is None:
            ctx.open()
        super().__init__(codec, time_base or 1 / rate)
        self.settings = settings
