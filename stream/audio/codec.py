"""Decoded audio in, encoded audio out: one sample format inside, whatever the codecs want outside.

Inside the pipeline audio is float32 [samples, channels] at 48 kHz, mono or stereo: every
source (AAC, G.711 at 8 kHz, Opus, surround) is brought to that once, and every output
(AAC for RTSP, files and recordings; Opus for WebRTC) is made from it. 48 kHz because Opus
only takes a few rates and 48 kHz is the one every browser plays without resampling.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import av
import numpy as np

RATE = 48_000
FRAME_SIZE = {"aac": 1024, "libopus": 960}
"""samples per encoded frame (Opus: 20 ms, the size WebRTC peers expect)"""
CODECS = {"aac": "aac", "opus": "libopus"}


class AudioIn:
    """Converts decoded frames of one source to float32 [n, channels] at :data:`RATE`.

    A reconnect may bring another codec, rate or layout: the converter follows the frames.
    More than two channels are mixed down to stereo (a control room listens on two).
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._resampler: av.AudioResampler | None = None
        self.channels = 0

    def convert(self, frame: av.AudioFrame) -> np.ndarray:
        channels = 1 if frame.layout.nb_channels == 1 else 2
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if key != self._key or channels != self.channels:
            self._key, self.channels = key, channels
            self._resampler = av.AudioResampler(format="flt", layout="mono" if channels == 1 else "stereo",
                                                rate=RATE)
        assert self._resampler is not None
        frame.pts = None  # the caller keeps time; the resampler must not pad gaps with silence
        parts = [f.to_ndarray().reshape(-1, channels) for f in self._resampler.resample(frame)]
        if not parts:
            return np.zeros((0, channels), dtype=np.float32)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def to_frame(samples: np.ndarray, pts: int | None = None) -> av.AudioFrame:
    """float32 [n, channels] (channels 1 or 2) as a packed ``flt`` frame at :data:`RATE`."""
    channels = samples.shape[1]
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1),
                                       format="flt", layout="mono" if channels == 1 else "stereo")
    frame.sample_rate = RATE
    frame.time_base = Fraction(1, RATE)
    frame.pts = pts
    return frame


class AudioOut:
    """Encodes one output's audio (``aac`` or ``opus``) into ``container`` with steady timestamps.

    Timestamps are in samples at :data:`RATE`. The caller gives each block the sample position it
    belongs at (its time on the stream's clock). A gap of more than a frame is left as a gap (the
    muxer and players keep the timing); a block that reaches back more than a frame into time
    already written loses that part (a source that sent a burst of old audio). Either way audio
    stays on the video's clock instead of drifting behind it.
    """

    def __init__(self, container: av.container.OutputContainer, codec: str, channels: int,
                 bitrate: int | None = None) -> None:
        name = CODECS.get(codec, codec)
        self.stream = container.add_stream(name, rate=RATE)
        self.stream.layout = "mono" if channels == 1 else "stereo"
        if bitrate:
            self.stream.bit_rate = bitrate
        self.stream.time_base = Fraction(1, RATE)
        self.codec_context = self.stream.codec_context
        fmt = self.codec_context.codec.audio_formats[0].name
        self.channels = channels
        self.frame_size = FRAME_SIZE.get(name, 1024)
        self._resampler = av.AudioResampler(format=fmt, layout=self.stream.layout.name, rate=RATE,
                                            frame_size=self.frame_size)
        self._next: int | None = None
        """the sample position the next encoded frame starts at"""
        self._in_next: int | None = None
        """where the next input block would start if there were no gap"""

    def encode(self, samples: np.ndarray, at: int) -> list[av.Packet]:
        """Encode ``samples`` [n, channels] that start at sample position ``at``."""
        if samples.shape[1] != self.channels:  # a source that changed layout: mix or duplicate
            samples = samples.mean(axis=1, keepdims=True) if self.channels == 1 else \
                np.repeat(samples[:, :1], 2, axis=1)
        packets: list[av.Packet] = []
        if self._in_next is not None and self._in_next - at > self.frame_size:
            cut = min(len(samples), self._in_next - at)
            samples, at = samples[cut:], at + cut
            if not len(samples):
                return packets
        if self._in_next is not None and at - self._in_next > self.frame_size:
            packets += self._drain()  # a gap: what is buffered goes out where it belongs
            self._next = None
        if self._next is None:
            self._next = at
        self._in_next = max(at, self._in_next or at) + len(samples)
        for f in self._resampler.resample(to_frame(samples)):
            packets += self._encode_one(f)
        return packets

    def _encode_one(self, f: av.AudioFrame) -> list[av.Packet]:
        assert self._next is not None
        f.pts = self._next
        f.time_base = Fraction(1, RATE)
        self._next += f.samples
        return list(self.stream.encode(f))

    def _drain(self) -> list[av.Packet]:
        packets: list[av.Packet] = []
        for f in self._resampler.resample(None):
            packets += self._encode_one(f)
        self._resampler = av.AudioResampler(format=self._resampler.format.name,
                                            layout=self._resampler.layout.name, rate=RATE,
                                            frame_size=self.frame_size)
        return packets

    def flush(self) -> list[av.Packet]:
        packets = self._drain() if self._next is not None else []
        return packets + list(self.stream.encode(None))
