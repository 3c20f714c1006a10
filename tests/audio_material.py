"""Self-made audio/video material for the audio redaction tests, and the meters that read it back.

Nothing here is downloaded: speech comes from Debian's espeak-ng, sirens, noise and beeps are
synthesised, and the picture is the fixture face on a textured background. A scene knows its own
ground truth (where the speech, the siren and the sync markers are), so tests can check that an
output mutes speech, keeps the siren and stays in lip-sync.

Sync markers are a 40 ms 1 kHz beep in the audio and a white frame in the video at the same
instant; at an output, (first white frame) - (beep onset) is the A/V offset.
"""

from __future__ import annotations

import functools
import math
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from helpers import face_sprite, textured_background

ESPEAK = "espeak-ng"
HAVE_ESPEAK: bool = shutil.which(ESPEAK) is not None
ESPEAK_RATE = 22050

SENTENCES = (
    "my name is John Smith",
    "I live at forty two Baker Street",
    "my password is blue horse",
    "meet me at the station at noon",
    "call me on oh seven seven nine",
)
"""Short utterances with personal details (what redaction must hide), 1.3-2.2 s each at 150 wpm."""

BEEP_S = 0.040
BEEP_HZ = 1000.0
MARKER_GRID_S = 0.2
"""Marker times are multiples of this, so each lands exactly on a frame at 5, 10, 25, 30, 50 or 60 fps
and the source clip itself has no A/V offset."""

CONTAINER_CODECS = {".mp4": ("aac",), ".mkv": ("aac", "libopus"), ".mov": ("aac", "pcm_mulaw")}
"""Which audio codecs each container takes here (FFmpeg's Matroska muxer has no mu-law; QuickTime does)."""
CODEC_RATES = {"libopus": 48000, "pcm_mulaw": 8000}
"""Audio codecs that only take one sample rate (the others keep the scene's)."""


class EspeakMissing(RuntimeError):
    """espeak-ng is not installed, so no speech can be made."""


# --------------------------------------------------------------------------------------------- sounds


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample by FFT (band-limited), so going down to 8 kHz does not fold speech into the band."""
    x = np.asarray(x, np.float32)
    if src_rate == dst_rate or len(x) == 0:
        return x.copy()
    n_out = max(1, round(len(x) * dst_rate / src_rate))
    spectrum = np.fft.rfft(x.astype(np.float64))
    bins = n_out // 2 + 1
    if bins <= len(spectrum):
        spectrum = spectrum[:bins]
    else:
        spectrum = np.concatenate([spectrum, np.zeros(bins - len(spectrum), complex)])
    return (np.fft.irfft(spectrum, n=n_out) * (n_out / len(x))).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _espeak(text: str, voice: str) -> np.ndarray:
    if not HAVE_ESPEAK:
        raise EspeakMissing(f"{ESPEAK} is not installed; install it with: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory(prefix="espeak-") as tmp:
        wav = Path(tmp) / "speech.wav"
        done = subprocess.run([ESPEAK, "-w", str(wav), "-s", "150", "-v", voice, text],
                              capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0 or not wav.is_file():
            raise RuntimeError(f"{ESPEAK} failed for voice {voice!r}: {done.stderr.strip()}")
        with wave.open(str(wav)) as w:
            if (w.getsampwidth(), w.getnchannels()) != (2, 1):
                raise RuntimeError(f"{ESPEAK} wrote {w.getnchannels()} channel(s) of "
                                   f"{8 * w.getsampwidth()} bits, expected 16-bit mono")
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    x = pcm.astype(np.float32) / 32768.0
    return x if rate == ESPEAK_RATE else resample(x, rate, ESPEAK_RATE)


def speech(text: str, rate: int = 48000, voice: str = "en", threshold: float = 0.01) -> np.ndarray:
    """`text` spoken by espeak-ng: float32 mono at `rate`, silence before and after trimmed (so a
    scene's ground truth is where the voice is, not where the file is)."""
    x = resample(_espeak(text, voice), ESPEAK_RATE, rate)
    loud = np.flatnonzero(np.abs(x) > threshold)
    if not len(loud):
        raise RuntimeError(f"{ESPEAK} produced silence for {text!r} (voice {voice!r})")
    return x[loud[0]:loud[-1] + 1].copy()


def _fade(x: np.ndarray, rate: int, seconds: float) -> np.ndarray:
    n = min(len(x) // 2, round(seconds * rate))
    if n:
        ramp = (0.5 - 0.5 * np.cos(np.linspace(0, np.pi, n))).astype(np.float32)
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def siren(seconds: float, rate: int = 48000, low: float = 650.0, high: float = 1300.0,
          period: float = 2.0, amplitude: float = 0.25) -> np.ndarray:
    """An emergency-vehicle wail: a tone swept low-high-low every `period` s, with a weaker third
    harmonic. Sirens are what audio redaction must keep, so tests need one that is not speech."""
    t = np.arange(round(seconds * rate)) / rate
    tri = 1 - np.abs(2 * ((t / period) % 1.0) - 1)  # 0 -> 1 -> 0 over one period
    phase = 2 * np.pi * np.cumsum(low + (high - low) * tri) / rate
    x = amplitude * (np.sin(phase) + 0.2 * np.sin(3 * phase)) / 1.2
    return _fade(x.astype(np.float32), rate, 0.02)


def ambient(seconds: float, rate: int = 48000, seed: int = 0, rms: float = 0.02) -> np.ndarray:
    """Pink noise at a low level (RMS `rms`), a stand-in for street hum that must survive redaction."""
    n = round(seconds * rate)
    if n == 0:
        return np.zeros(0, np.float32)
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spectrum /= np.sqrt(np.maximum(freqs, 20.0))
    spectrum[0] = 0
    x = np.fft.irfft(spectrum, n=n)
    return (x * (rms / max(float(np.sqrt(np.mean(x ** 2))), 1e-12))).astype(np.float32)


def beep(seconds: float = BEEP_S, rate: int = 48000, freq: float = BEEP_HZ,
         amplitude: float = 0.5) -> np.ndarray:
    """A tone burst with 1 ms ramps: sharp enough to time to a few ms, without a broadband click."""
    t = np.arange(round(seconds * rate)) / rate
    return _fade((amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, 0.001)


# ---------------------------------------------------------------------------------------------- scene


@dataclass
class Scene:
    """A mono mix and its ground truth, all in seconds from the start of `samples`."""

    samples: np.ndarray
    rate: int
    duration: float
    speech: list[tuple[float, float]] = field(default_factory=list)
    siren: list[tuple[float, float]] = field(default_factory=list)
    markers: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    """what each `speech` interval says"""


def _grid_up(t: float) -> float:
    return round(math.ceil(round(t / MARKER_GRID_S, 6)) * MARKER_GRID_S, 6)


def make_scene(duration: float = 12.0, rate: int = 48000, seed: int = 0, spacing: float = 2.5,
               margin: float = 0.2, voice: str = "en") -> Scene:
    """Ambient noise throughout; utterances and one siren, one per gap between sync markers.

    Markers come every `spacing` s (later where an event needs more room), each event sits centred
    between two markers with at least `margin` s of noise on either side, so no beep ever overlaps
    speech or siren. Events that would not end `margin` before the last marker are left out (a
    12 s scene holds three utterances and the siren).
    """
    mix = ambient(duration, rate, seed)
    events: list[tuple[str, np.ndarray]] = []
    sentences = iter(SENTENCES)
    for kind in ("speech", "speech", "siren", "speech", "speech", "speech"):
        if kind == "siren":
            events.append(("siren", siren(2.0, rate)))
        else:
            text = next(sentences)
            voiced = speech(text, rate, voice)
            events.append((text, 0.6 * voiced / float(np.abs(voiced).max())))
    scene = Scene(mix, rate, duration)
    marker = _grid_up(0.5)
    if marker + BEEP_S + margin > duration:
        raise ValueError(f"a {duration:g} s scene is too short for a single marker")
    scene.markers.append(marker)
    for name, sound in events:
        length = len(sound) / rate
        after = _grid_up(max(marker + spacing, marker + BEEP_S + 2 * margin + length))
        if after + BEEP_S + margin > duration:
            break
        start = round(((marker + BEEP_S + after) / 2 - length / 2) * rate)
        mix[start:start + len(sound)] += sound
        interval = (start / rate, (start + len(sound)) / rate)
        if name == "siren":
            scene.siren.append(interval)
        else:
            scene.speech.append(interval)
            scene.texts.append(name)
        scene.markers.append(after)
        marker = after
    tone = beep(BEEP_S, rate)
    for t in scene.markers:
        i = round(t * rate)
        mix[i:i + len(tone)] += tone
    np.clip(mix, -1.0, 1.0, out=mix)
    return scene


# ----------------------------------------------------------------------------------------------- clip


def write_av_clip(path: Path | str, scene: Scene, size: tuple[int, int] = (640, 360), fps: int = 25,
                  audio_codec: str = "aac", face: bool = True) -> Path:
    """Encode `scene` with a picture: H.264 (no B-frames, a keyframe a second, one slice per picture,
    as cameras send) and the audio in `audio_codec`, both starting at time 0.

    The container follows the suffix: .mp4 holds aac; .mkv aac or libopus (48 kHz); .mov aac or
    pcm_mulaw (8 kHz, G.711 as IP cameras send it). The picture is a textured background with the
    fixture face drifting across when `face`; the frame nearest each marker is all white (the flash
    that pairs with the beep).
    """
    path = Path(path)
    width, height = size
    allowed = CONTAINER_CODECS.get(path.suffix.lower())
    if allowed is None:
        raise ValueError(f"{path.name}: the container must be one of {sorted(CONTAINER_CODECS)}")
    if audio_codec not in allowed:
        raise ValueError(f"{path.suffix} cannot hold {audio_codec!r} here; use one of {allowed}"
                         + "".join(f" (or a {ext} file)" for ext, codecs in CONTAINER_CODECS.items()
                                   if audio_codec in codecs and ext != path.suffix.lower()))
    if width % 2 or height % 2:
        raise ValueError(f"H.264 4:2:0 needs an even size, got {width}x{height}")
    arate = CODEC_RATES.get(audio_codec, scene.rate)
    audio = resample(scene.samples, scene.rate, arate)
    frames = round(scene.duration * fps)
    flash = {round(t * fps) for t in scene.markers}
    bg = textured_background(width, height)
    sprite = face_sprite(round(height * 0.27), round(height * 0.3)) if face else None

    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps, options={
            "preset": "veryfast", "crf": "23",
            "x264-params": f"keyint={fps}:min-keyint={fps}:scenecut=0:bframes=0:open-gop=0",
        })
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        vs.codec_context.time_base = Fraction(1, fps)
        vs.codec_context.gop_size = fps
        vs.codec_context.max_b_frames = 0
        vs.codec_context.thread_type = "FRAME"  # one slice per picture
        aus = out.add_stream(audio_codec, rate=arate)
        aus.layout = "mono"
        sent = 0
        for i in range(frames):
            if i in flash:
                img = np.full((height, width, 3), 255, np.uint8)
            else:
                img = bg.copy()
                if sprite is not None:
                    sh, sw = sprite.shape[:2]
                    x = round((width - sw) / 2 + (width - sw) * 0.3 * math.sin(2 * math.pi * i / (8 * fps)))
                    y = (height - sh) // 2
                    img[y:y + sh, x:x + sw] = sprite
            frame = av.VideoFrame.from_ndarray(img, format="bgr24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(vs.encode(frame))
            upto = min(len(audio), round((i + 1) * arate / fps))
            if upto > sent:
                chunk = av.AudioFrame.from_ndarray(audio[None, sent:upto], format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts, chunk.time_base = arate, sent, Fraction(1, arate)
                out.mux(aus.encode(chunk))
                sent = upto
        out.mux(vs.encode(None))
        out.mux(aus.encode(None))
    return path


# ------------------------------------------------------------------------------------------- readback


def find_flashes(frames_with_times: Iterable[tuple[float, np.ndarray]],
                 min_white: float = 0.6) -> list[float]:
    """Times of the flash frames: the first of each run of frames that are mostly white.

    `frames_with_times` is (time s, image) pairs in display order, image grey or colour; a frame is
    white when `min_white` of its pixels exceed 220 (an encoded white frame is not exactly 255).
    """
    times: list[float] = []
    previous = False
    for t, image in frames_with_times:
        img = np.asarray(image)
        white = float(np.mean(img.min(axis=2) > 220 if img.ndim == 3 else img > 220)) >= min_white
        if white and not previous:
            times.append(float(t))
        previous = white
    return times


def _moving_mean(x: np.ndarray, n: int) -> np.ndarray:
    """Centred running mean over `n` samples (same length as `x`)."""
    c = np.concatenate([[0], np.cumsum(x)])
    lo = np.clip(np.arange(len(x)) - n // 2, 0, len(x))
    hi = np.clip(lo + n, 0, len(x))
    return (c[hi] - c[lo]) / n


def find_beeps(samples: np.ndarray, rate: int, freq: float = BEEP_HZ, window_s: float = 0.005,
               min_s: float = 0.015, max_s: float = 0.1, min_dbfs: float = -40.0) -> list[float]:
    """Onset times (s) of short tone bursts at `freq`: a sliding single-bin DFT (Goertzel) over
    `window_s` windows, one per sample.

    A sample belongs to a burst where the tone holds most of the window's power and is louder than
    `min_dbfs`; runs lasting `min_s`-`max_s` count (a siren sweeping through `freq` stays in band far
    longer than a 40 ms beep; speech spreads its power). The onset is where the tone's amplitude
    first reaches half its peak in the burst, which is the true start for a centred window.
    """
    x = np.asarray(samples, np.float64)
    if x.ndim == 2:
        x = x.mean(axis=0) if x.shape[0] < x.shape[1] else x.mean(axis=1)
    n = max(4, round(window_s * rate))
    if len(x) < n:
        return []
    osc = np.exp(-2j * np.pi * freq * np.arange(len(x)) / rate)
    bin_ = _moving_mean(x * osc.real, n) + 1j * _moving_mean(x * osc.imag, n)
    amp = 2 * np.abs(bin_)  # the tone's amplitude
    power = _moving_mean(x * x, n)
    in_band = (amp ** 2 / 2 > 0.6 * power) & (amp > 10 ** (min_dbfs / 20) * math.sqrt(2))
    edges = np.flatnonzero(np.diff(np.concatenate([[0], in_band.astype(np.int8), [0]])))
    runs: list[list[int]] = []
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
        if runs and start - runs[-1][1] < n:  # a glitch (a codec frame edge) does not split a burst
            runs[-1][1] = stop
        else:
            runs.append([start, stop])
    onsets: list[float] = []
    for start, stop in runs:
        if not min_s <= (stop - start) / rate <= max_s:
            continue
        lo = max(0, start - n)
        peak = amp[start:stop].max()
        onsets.append(float(lo + int(np.argmax(amp[lo:stop] >= peak / 2))) / rate)
    return onsets


def av_offsets(flashes: Sequence[float], beeps: Sequence[float], max_gap: float = 1.0) -> list[float]:
    """Flash time minus the nearest beep's onset, per flash (positive: video late); flashes with no
    beep within `max_gap` s are left out, since pairing them would measure the marker spacing."""
    offsets: list[float] = []
    for f in flashes:
        if beeps:
            nearest = min(beeps, key=lambda b: abs(f - b))
            if abs(f - nearest) <= max_gap:
                offsets.append(f - nearest)
    return offsets


def segment_energy(samples: np.ndarray, rate: int, intervals: Iterable[tuple[float, float]]) -> list[float]:
    """RMS in dBFS (re. amplitude 1.0; -120 for digital silence) of each (start, end) interval, for
    checks such as "speech is silent, the siren is still there"."""
    x = np.asarray(samples, np.float64)
    levels = []
    for start, end in intervals:
        part = x[max(0, round(start * rate)):max(0, round(end * rate))]
        rms = float(np.sqrt(np.mean(part ** 2))) if len(part) else 0.0
        levels.append(20 * math.log10(rms) if rms > 1e-6 else -120.0)
    return levels


def _mono(frame: av.AudioFrame) -> np.ndarray:
    a = frame.to_ndarray()
    channels = len(frame.layout.channels)
    a = a if frame.format.is_planar else a.reshape(-1, channels).T
    if a.dtype.kind == "i":
        a = a / float(np.iinfo(a.dtype).max + 1)
    elif a.dtype.kind == "u":
        a = (a.astype(np.float64) - 128) / 128
    return np.asarray(a, np.float32).mean(axis=0)


CONTIGUOUS_S = 0.01
"""Audio chunks this close to where the previous one ended follow it without a gap: containers round
timestamps (Matroska to 1 ms), and a gap of a few samples inside a tone would read as its end."""


@dataclass
class Capture:
    """What a reader decoded: small grey frames with their times, and the audio laid out on the same
    clock (each decoded chunk at its own timestamp unless it is within CONTIGUOUS_S of following on;
    silence in any gap, a later chunk overwrites an overlap)."""

    frames: list[tuple[float, np.ndarray]]
    audio: np.ndarray
    rate: int
    audio_start: float
    """the time of `audio[0]`, on the clock of the frame times"""
    video_codec: str = ""
    audio_codec: str = ""

    def flashes(self) -> list[float]:
        return find_flashes(self.frames)

    def beeps(self) -> list[float]:
        return [self.audio_start + t for t in find_beeps(self.audio, self.rate)]

    def offsets(self, after: float | None = None) -> list[float]:
        """A/V offsets of the markers whose flash comes later than `after` (s) on this clock."""
        flashes = [f for f in self.flashes() if after is None or f > after]
        return av_offsets(flashes, self.beeps())


def read_av(source: str | Path, options: dict[str, str] | None = None, max_seconds: float | None = None,
            timeout: float | tuple[float, float] | None = None, scale: int = 4) -> Capture:
    """Decode the first video and audio streams of a file or URL, e.g. an RTSP camera, up to the end
    or `max_seconds` of video; frames are kept grey and shrunk by `scale` (enough to see a flash)."""
    frames: list[tuple[float, np.ndarray]] = []
    chunks: list[tuple[float | None, np.ndarray]] = []
    rate = 0
    kwargs = {"timeout": timeout} if timeout is not None else {}
    with av.open(str(source), options=options or {}, **kwargs) as container:
        streams = [*container.streams.video[:1], *container.streams.audio[:1]]
        if len(streams) < 2:
            raise ValueError(f"{source}: wants one video and one audio stream, found "
                             f"{[s.type for s in container.streams]}")
        codecs = (streams[0].codec_context.name, streams[1].codec_context.name)
        first: float | None = None
        try:
            for frame in container.decode(*streams):
                if isinstance(frame, av.AudioFrame):
                    rate = frame.sample_rate
                    chunks.append((frame.time, _mono(frame)))
                    continue
                if frame.time is None:
                    continue  # an RTSP reader's very first frame may have no timestamp
                first = frame.time if first is None else first
                if max_seconds is not None and frame.time - first > max_seconds:
                    break
                small = frame.reformat(width=max(2, frame.width // scale),
                                       height=max(2, frame.height // scale), format="gray")
                frames.append((frame.time, small.to_ndarray()))
        except av.error.EOFError:
            pass  # a live source that ended (RTCP BYE)
    if not chunks:
        return Capture(frames, np.zeros(0, np.float32), rate or 1, 0.0, *codecs)
    placed: list[tuple[float, np.ndarray]] = []
    clock: float | None = None
    for t, data in chunks:
        if clock is not None and (t is None or abs(t - clock) < CONTIGUOUS_S):
            t = clock
        t = 0.0 if t is None else t
        placed.append((t, data))
        clock = t + len(data) / rate
    start = min(t for t, _ in placed)
    audio = np.zeros(round((max(t + len(d) / rate for t, d in placed) - start) * rate) + 1, np.float32)
    for t, data in placed:
        i = round((t - start) * rate)
        audio[i:i + len(data)] = data[:len(audio) - i]
    return Capture(frames, audio, rate, start, *codecs)
