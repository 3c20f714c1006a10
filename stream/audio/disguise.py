"""Voice disguise: speech stays intelligible, the speaker does not stay recognisable.

A voice is recognised by two things: its pitch (how fast the vocal folds vibrate) and its timbre,
the resonances of the throat and mouth (the formants, the spectral envelope). Shifting the pitch
alone is weak: anyone can shift it back, and the formants still identify the speaker. So the
voice is split, frame by frame, into an envelope (cepstral smoothing of the log spectrum) and an
excitation (the harmonics, spectrum over envelope); the excitation is moved by a pitch factor with
phase-vocoder phases, so harmonics stay coherent from frame to frame, and the envelope by a
separate formant factor. Words survive because the formants keep their pattern, only stretched.

Both factors come from a per-stream key and never sit near 1.0, nor near each other when they go
the same way, so one resampling (which moves pitch and formants together) cannot undo the
disguise, and the inverse found for one stream's voice does not match another stream's. This is
a signal transformation, not encryption: its purpose is that a recording cannot be listened to
for a known voice, and the spectral smoothing and phase resynthesis also lose detail that no
inverse brings back.

Streaming: each call takes any number of samples and returns as many; the output is the disguised
input delayed by exactly ``latency`` samples (one analysis window less one sample), whatever the
block sizes, so a caller can line it up with the other lanes.
"""

from __future__ import annotations

import hashlib
import numbers

import numpy as np

TWO_PI = 2.0 * np.pi
PITCH_DOWN = (0.70, 0.82)
PITCH_UP = (1.22, 1.40)
FORMANT_DOWN = (0.82, 0.90)
FORMANT_UP = (1.12, 1.22)
MIN_SEPARATION = 1.10
"""pitch and formant factors that go the same way differ by at least this ratio, so that one
resampling (which moves both by the same factor) cannot restore the voice"""

WINDOW_S = 2048 / 48000
"""analysis window, ~43 ms: it must hold several periods of a low voice (a 100 Hz voice's harmonics
are 2 bins apart in a 21 ms window, too close for the phase vocoder to keep them apart, and the
output lost its periodicity); the delay it adds is still small beside the redactor's look-ahead"""
LIFTER_S = 0.0018
"""envelope smoothing: quefrencies below this (1.8 ms) are the envelope; a voice's pitch period
(2.5 ms at 400 Hz and longer below) lies above, so harmonics are not taken for formants"""
FLOOR = 1e-5
"""magnitudes below this fraction of a frame's peak are treated as that level: keeps the log
spectrum finite in digital silence and band-limited input"""
OVERLAP = 4
"""frames per window (75% overlap): at 2/3 a disguised tone measured several times more envelope
ripple and less energy on its harmonics"""
BATCH = 64
"""frames analysed together: amortises numpy's per-call cost without large temporaries"""
MAX_GAIN = 4.0
"""the level correction never amplifies a frame more than this (+12 dB), so a frame whose
harmonics were moved above Nyquist is not blown up from its leftovers"""
INPUT_LIMIT = 1000.0
"""float audio is nominally within +-1; far beyond it is garbage, clamped so energies cannot
overflow into inf and NaN"""


def _uniform(digest: bytes, i: int) -> float:
    return int.from_bytes(digest[8 * i:8 * i + 8], "big") / 2.0**64


def disguise_factors(key: int) -> tuple[float, float]:
    """The (pitch_factor, formant_factor) for a stream key: same key, same voice, across runs and
    machines (a hash, not a random generator whose stream could change between library versions)."""
    if isinstance(key, bool) or not isinstance(key, numbers.Integral):
        raise TypeError(f"disguise key must be an integer, got {type(key).__name__}")
    digest = hashlib.sha256(f"stream-redact voice disguise {int(key)}".encode()).digest()
    f_lo, f_hi = FORMANT_DOWN if _uniform(digest, 0) < 0.5 else FORMANT_UP
    formant = f_lo + (f_hi - f_lo) * _uniform(digest, 1)
    up = _uniform(digest, 2) >= 0.5
    p_lo, p_hi = PITCH_UP if up else PITCH_DOWN
    if up and formant > 1.0:
        p_lo = max(p_lo, formant * MIN_SEPARATION)
    elif not up and formant < 1.0:
        p_hi = min(p_hi, formant / MIN_SEPARATION)
    pitch = p_lo + (p_hi - p_lo) * _uniform(digest, 3)
    return pitch, formant


def _frame_size(rate: int) -> int:
    """A window of about WINDOW_S, a multiple of 2 * OVERLAP with only the factors 2, 3 and 5,
    which keep the FFTs fast at any sample rate."""
    target = WINDOW_S * rate
    best = 0
    step = 2 * OVERLAP
    for n in range(max(16, int(target * 0.7)) // step * step, int(target * 1.3) + 8, step):
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1 and (best == 0 or abs(n - target) < abs(best - target)):
            best = n
    return best


class _Resample:
    """Reads each row (frame) at the fractional bins ``k / factor`` (linear interpolation), the
    positions and weights fixed once per stream so a frame costs two gathers.
    ``scale`` multiplies the result per output bin (free here, a full pass over the frame later)."""

    def __init__(self, bins: int, factor: float, scale: np.ndarray | None = None) -> None:
        src = np.arange(bins) / factor
        beyond = src > bins - 1  # moved above Nyquist: nothing to read there
        src = np.clip(src, 0.0, bins - 1)
        self.lo = np.minimum(src.astype(np.intp), bins - 2)
        self.hi = self.lo + 1
        frac = src - self.lo
        weight = np.where(beyond, 0.0, 1.0) * (1.0 if scale is None else scale)
        self.w_lo, self.w_hi = (1.0 - frac) * weight, frac * weight
        self.nearest = np.rint(src).astype(np.intp)

    def __call__(self, a: np.ndarray) -> np.ndarray:
        out = a[:, self.lo] * self.w_lo
        out += a[:, self.hi] * self.w_hi
        return out


class VoiceDisguise:
    """Pitch- and formant-shifts one mono stream, block by block, with a fixed delay of ``latency``
    samples. Not thread-safe: one instance per stream, fed in order."""

    def __init__(self, rate: int, key: int) -> None:
        if not isinstance(rate, numbers.Integral) or rate < 4000:
            raise ValueError(f"sample rate must be an integer >= 4000 Hz, got {rate!r}")
        self.rate = int(rate)
        self.pitch_factor, self.formant_factor = disguise_factors(key)
        n = _frame_size(self.rate)
        self._n = n
        self.hop: int = n // OVERLAP
        """analysis step: output is computed this many samples at a time (smaller blocks are held)"""
        bins = n // 2 + 1
        self._window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
        # overlapped analysis x synthesis windows sum to a constant for a periodic Hann: divide it out
        self._synthesis = self._window * self.hop / float(np.sum(self._window**2))
        self._bins = np.arange(bins)
        self._expected = TWO_PI * self._bins * self.hop / n
        # (-1)^k moves the time origin to the window's centre: there a sinusoid's bins share one
        # phase, which is what phase locking copies
        self._centre = np.where(self._bins % 2 == 0, 1.0, -1.0)
        self._pitch = _Resample(bins, self.pitch_factor, scale=self._centre)  # back to frame origin
        self._formant = _Resample(bins, self.formant_factor)
        self._lead = np.minimum(np.rint(self._bins * self.pitch_factor).astype(np.intp), bins - 1)
        # kept quefrencies (both halves of the real cepstrum): flat, then a half-cosine taper to
        # zero at LIFTER_S, so that the cut adds no ripple to the envelope
        cut = max(4, round(LIFTER_S * self.rate))
        q = np.minimum(np.arange(n), n - np.arange(n))
        taper = 0.5 + 0.5 * np.cos(np.pi * np.clip(2.0 * q / cut - 1.0, 0.0, 1.0))
        self._lifter = np.where(q < cut / 2, 1.0, np.where(q < cut, taper, 0.0))
        self.latency: int = n - 1
        """samples of delay: output sample i is the disguised input sample i - latency"""
        self.reset()

    def reset(self) -> None:
        """Forget the past: the next sample is treated as the start of a new stream (silence before)."""
        n, hop, bins = self._n, self.hop, self._n // 2 + 1
        self._history = np.zeros(n - hop)
        self._pending = np.zeros(0)
        self._overlap = np.zeros(n - hop)
        # hop - 1 samples of output are owed before the first hop completes; with the window's
        # n - hop this makes the delay n - 1 for every sample whatever the block sizes
        self._ready = np.zeros(hop - 1)
        self._in_phase = np.zeros(bins)
        self._out_phase = np.zeros(bins)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Disguise the next block (float mono, any length); returns as many float32 samples, in
        [-1, 1], delayed by ``latency``."""
        x = np.asarray(samples, dtype=np.float64)
        if x.ndim != 1:
            raise ValueError(f"expected mono samples (1-D), got shape {x.shape}")
        if not np.isfinite(x).all():  # a decoder glitch must not poison the phase state for good
            x = np.where(np.isfinite(x), x, 0.0)
        x = np.clip(x, -INPUT_LIMIT, INPUT_LIMIT)
        hop = self.hop
        buf = np.concatenate([self._pending, x])
        hops = len(buf) // hop
        self._pending = buf[hops * hop:]
        if hops:
            # bounded batches: one long block must not allocate every frame's spectra at once
            done = [self._frames(buf[first * hop:min(hops, first + BATCH) * hop])
                    for first in range(0, hops, BATCH)]
            self._ready = np.concatenate([self._ready, *done])
        out = self._ready[:len(x)]
        self._ready = self._ready[len(x):]
        return np.clip(out, -1.0, 1.0).astype(np.float32)

    def _frames(self, new: np.ndarray) -> np.ndarray:
        """Analyse the frames that ``new`` (whole hops) completes, disguise them, overlap-add; returns
        the output samples they finish, as many as ``new`` has."""
        n, hop = self._n, self.hop
        hops = len(new) // hop
        stream = np.concatenate([self._history, new])
        self._history = stream[hops * hop:]
        step = stream.strides[0]
        frames = np.lib.stride_tricks.as_strided(stream, (hops, n), (hop * step, step), writeable=False)
        spectra = np.fft.rfft(frames * self._window, axis=1)
        synth = np.fft.irfft(self._shift(spectra), n, axis=1)
        synth *= self._synthesis
        acc = np.zeros(hops * hop + n - hop)
        acc[:n - hop] = self._overlap
        for q in range(n // hop):
            acc[q * hop:q * hop + hops * hop] += synth[:, q * hop:(q + 1) * hop].reshape(-1)
        self._overlap = acc[hops * hop:]
        return acc[:hops * hop]

    def _shift(self, spectra: np.ndarray) -> np.ndarray:
        """Frames' spectra -> disguised spectra: envelope moved by the formant factor, excitation
        by the pitch factor, each frame at the level it came in."""
        bins, k = self._n // 2 + 1, self._bins
        spectra *= self._centre
        mag = np.abs(spectra)
        phase = np.angle(spectra)
        # instantaneous frequency per bin from the phase advance over one hop, as the phase the
        # shifted harmonic advances by in the output (radians per hop)
        dev = phase - self._expected
        dev[0] -= self._in_phase
        dev[1:] -= phase[:-1]
        self._in_phase = phase[-1]
        dev -= TWO_PI * np.rint(dev / TWO_PI)
        advance = (self._expected + dev) * self.pitch_factor
        # envelope: low quefrencies of the log magnitude; excitation: what is left
        floor = FLOOR * mag.max(axis=1, keepdims=True) + 1e-12
        cep = np.fft.irfft(np.log(mag + floor), self._n, axis=1)
        cep *= self._lifter
        env = np.exp(np.fft.rfft(cep, axis=1).real)
        new_mag = self._pitch(mag / env)
        new_mag *= self._formant(env)
        e_in = np.einsum("ij,ij->i", mag, mag)
        e_out = np.einsum("ij,ij->i", new_mag, new_mag)
        gain = np.minimum(np.sqrt(e_in / np.maximum(e_out, 1e-30)), MAX_GAIN)
        new_mag *= gain[:, None]
        # phase locking: every bin follows the peak (harmonic) it belongs to, so a harmonic's
        # bins stay one sinusoid instead of drifting apart into a reverberant smear. The top bin
        # always counts as a peak: a frame without any other (flat or silent) locks every bin to
        # it, which keeps relative phases and with them a click's shape
        peak = np.ones(mag.shape, dtype=bool)
        peak[:, 0] = False
        peak[:, 1:-1] = (mag[:, 1:-1] > mag[:, :-2]) & (mag[:, 1:-1] >= mag[:, 2:])
        below = np.maximum.accumulate(np.where(peak, k, -2 * bins), axis=1)
        above = np.minimum.accumulate(np.where(peak, k, 2 * bins)[:, ::-1], axis=1)[:, ::-1]
        owner = np.where(k - below <= above - k, below, above)
        own = owner[:, self._pitch.nearest]
        lead = self._lead[own]  # where that peak lands in the output
        flat = own + np.arange(0, own.size, bins)[:, None]
        base = np.take((advance - phase).ravel(), flat) + phase[:, self._pitch.nearest]
        base -= TWO_PI * np.rint(base / TWO_PI)
        acc = self._out_phase
        for t in range(len(base)):
            acc = acc[lead[t]] + base[t]
            base[t] = acc
        base -= TWO_PI * np.rint(base / TWO_PI)
        self._out_phase = base[-1].copy()
        phase32 = base.astype(np.float32)
        out = np.empty(spectra.shape, dtype=np.complex128)
        out.real = new_mag * np.cos(phase32)
        out.imag = new_mag * np.sin(phase32)
        return out
