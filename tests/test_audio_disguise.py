"""Voice disguise: pitch and formants moved by the stream key, words and level kept, exact when streamed.

The speech is synthesised by espeak-ng (a real voice, with formants and a moving pitch); the
exact-frequency checks use a harmonic tone whose F0 is known.
"""

from __future__ import annotations

import shutil
import subprocess
import wave

import numpy as np
import pytest

from stream.audio.disguise import (
    FORMANT_DOWN,
    FORMANT_UP,
    MIN_SEPARATION,
    PITCH_DOWN,
    PITCH_UP,
    VoiceDisguise,
    disguise_factors,
)

RATE = 48000
SENTENCE = ("The suspect told me his name was John Smith, and that he lives on Baker Street, "
            "near the old railway station.")


def _key(pitch_up: bool, formant_up: bool) -> int:
    """The first key whose factors go the given ways, so every combination is tested."""
    for key in range(10_000):
        pitch, formant = disguise_factors(key)
        if (pitch > 1.0) == pitch_up and (formant > 1.0) == formant_up:
            return key
    raise AssertionError("no key gives this combination")


def _disguise(x: np.ndarray, rate: int, key: int, block: int | None = None) -> np.ndarray:
    v = VoiceDisguise(rate, key)
    if block is None:
        return v.process(x)
    return np.concatenate([v.process(x[i:i + block]) for i in range(0, len(x), block)])


def _aligned(x: np.ndarray, rate: int, key: int) -> tuple[np.ndarray, np.ndarray]:
    """(input, disguised output) with the disguise's delay taken out, sample for sample."""
    v = VoiceDisguise(rate, key)
    y = v.process(x)[v.latency:]
    return x[:len(y)].astype(np.float64), y.astype(np.float64)


def _tone(f0: float, rate: int, seconds: float, harmonics: int = 10) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = sum(np.sin(2 * np.pi * f0 * h * t + h) / h for h in range(1, harmonics + 1))
    return (0.2 * x / np.abs(x).max()).astype(np.float32)


def _f0_frames(x: np.ndarray, rate: int) -> np.ndarray:
    """F0 of each 30 ms frame, NaN where not clearly periodic: the normalised cross-correlation of
    the frame with the signal one lag later (unbiased for low voices, unlike plain autocorrelation),
    60-450 Hz."""
    n, lo, hi = int(0.03 * rate), int(rate / 450), int(rate / 60)
    m = 1 << (n + hi).bit_length()
    level = np.sqrt(np.mean(x**2))
    found = []
    for start in range(0, len(x) - n - hi, n // 2):
        a = x[start:start + n].astype(np.float64)
        seg = x[start:start + n + hi].astype(np.float64)
        if np.sqrt(np.mean(a**2)) < 0.1 * level:
            found.append(np.nan)
            continue
        num = np.fft.irfft(np.conj(np.fft.rfft(a, m)) * np.fft.rfft(seg, m), m)[lo:hi]
        energy = np.concatenate([[0.0], np.cumsum(seg**2)])
        nccf = num / (np.sqrt(np.dot(a, a) * (energy[lo + n:hi + n] - energy[lo:hi])) + 1e-12)
        top = nccf.max()
        # the first peak near the top, not a multiple of the period
        i = next((i for i in range(1, len(nccf) - 1) if nccf[i] >= 0.9 * top
                  and nccf[i] >= nccf[i - 1] and nccf[i] >= nccf[i + 1]), None)
        if top < 0.7 or i is None:
            found.append(np.nan)
            continue
        p, q, r = nccf[i - 1], nccf[i], nccf[i + 1]
        found.append(rate / (lo + i + 0.5 * (p - r) / (p - 2 * q + r)))
    return np.array(found)


def _envelope_warp(x: np.ndarray, y: np.ndarray, rate: int) -> float:
    """The frequency scaling that best maps the input's long-term spectral envelope onto the
    output's, 300-4000 Hz (where speech formants are): the formant shift as heard."""

    def ltas(s: np.ndarray) -> np.ndarray:
        n = 1024
        frames = np.lib.stride_tricks.sliding_window_view(s, n)[::n // 2] * np.hanning(n)
        power = np.mean(np.abs(np.fft.rfft(frames, axis=1)) ** 2, axis=0)
        k = max(1, round(250 / (rate / n)))
        return 10 * np.log10(np.convolve(power, np.ones(k) / k, mode="same") + 1e-20)

    f = np.fft.rfftfreq(1024, 1 / rate)
    band = (f > 300) & (f < 4000)
    lx, ly = ltas(x), ltas(y)
    target = ly[band] - ly[band].mean()
    errors = {}
    for g in np.arange(0.70, 1.45, 0.01):
        moved = np.interp(f[band] / g, f, lx)
        errors[g] = np.mean((target - (moved - moved.mean())) ** 2)
    return float(min(errors, key=errors.get))


def _voiced_rms(x: np.ndarray, y: np.ndarray, rate: int) -> tuple[float, float]:
    """RMS of input and output over the frames where the input is speaking."""
    n = int(0.02 * rate)
    fx = x[:len(x) // n * n].reshape(-1, n)
    fy = y[:len(x) // n * n].reshape(-1, n)
    loud = np.sqrt(np.mean(fx**2, axis=1)) > 0.1 * np.sqrt(np.mean(x**2))
    return float(np.sqrt(np.mean(fx[loud] ** 2))), float(np.sqrt(np.mean(fy[loud] ** 2)))


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Spoken sentence at 48 kHz."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed: no speech to disguise (apt-get install espeak-ng)")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "-s", "150", "-v", "en", SENTENCE],
                   check=True, capture_output=True, timeout=60)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64) / 32768
    t = np.arange(int(len(pcm) * RATE / rate)) * rate / RATE
    return np.interp(t, np.arange(len(pcm)), pcm).astype(np.float32)


@pytest.mark.parametrize("rate", [48000, 16000])
@pytest.mark.parametrize("pitch_up", [False, True])
def test_tone_f0_moves_by_the_pitch_factor(rate: int, pitch_up: bool) -> None:
    key = _key(pitch_up, not pitch_up)
    pitch, _ = disguise_factors(key)
    x, y = _aligned(_tone(150.0, rate, 1.5), rate, key)
    steady = y[int(0.3 * rate):int(1.2 * rate)]
    f0 = _f0_frames(steady, rate)
    assert np.isfinite(f0).all()  # periodic all along
    assert np.median(f0) == pytest.approx(150.0 * pitch, rel=0.05)
    assert np.median(_f0_frames(x[int(0.3 * rate):int(1.2 * rate)], rate)) == pytest.approx(150.0, rel=0.01)


@pytest.mark.parametrize(("pitch_up", "formant_up"),
                         [(False, True), (True, False), (False, False), (True, True)])
def test_speech_voice_moved_words_kept(speech: np.ndarray, pitch_up: bool, formant_up: bool) -> None:
    key = _key(pitch_up, formant_up)
    pitch, formant = disguise_factors(key)
    x, y = _aligned(speech, RATE, key)

    f0_in, f0_out = _f0_frames(x, RATE), _f0_frames(y, RATE)
    voiced_in, voiced_out = np.isfinite(f0_in), np.isfinite(f0_out)
    assert voiced_in.sum() > 50
    assert voiced_out.sum() > 0.7 * voiced_in.sum()  # the output is still voiced speech, not a rasp
    assert abs(np.median(f0_out[voiced_out]) / np.median(f0_in[voiced_in]) - 1.0) >= 0.15
    both = voiced_in & voiced_out
    assert np.median(f0_out[both] / f0_in[both]) == pytest.approx(pitch, rel=0.03)

    warp = _envelope_warp(x, y, RATE)
    assert (warp > 1.0) == formant_up
    assert warp == pytest.approx(formant, abs=0.05)

    rms_in, rms_out = _voiced_rms(x, y, RATE)
    assert abs(20 * np.log10(rms_out / rms_in)) < 3.0  # the words are not muted


def _mixture(rate: int) -> np.ndarray:
    """Tone, a glide, noise, a click and silence: every code path in one signal."""
    rng = np.random.default_rng(7)
    t = np.arange(int(0.6 * rate)) / rate
    glide = 0.3 * np.sin(2 * np.pi * (120 * t + 150 * t**2))
    noise = 0.1 * rng.standard_normal(int(0.3 * rate))
    click = np.zeros(int(0.2 * rate))
    click[len(click) // 2] = 0.9
    parts = [_tone(180.0, rate, 0.5), glide, np.zeros(int(0.2 * rate)), noise, click]
    return np.concatenate(parts).astype(np.float32)


@pytest.mark.parametrize("rate", [48000, 16000])
def test_block_size_does_not_change_the_output(rate: int) -> None:
    x = _mixture(rate)
    key = 11
    whole = _disguise(x, rate, key)
    assert len(whole) == len(x) and whole.dtype == np.float32
    for block in (160, 441, 1024):
        out = _disguise(x, rate, key, block)
        assert len(out) == len(x)
        np.testing.assert_allclose(out, whole, rtol=0, atol=1e-4)
    # uneven blocks, empty ones included, each answered with exactly its own length
    v = VoiceDisguise(rate, key)
    rng = np.random.default_rng(3)
    cuts = np.sort(np.concatenate([rng.integers(0, len(x), 60), [100, 100, 2000, 2000]]))
    pieces = np.split(x, cuts)
    outs = [v.process(p) for p in [*pieces, np.zeros(0, np.float32)]]
    assert [len(o) for o in outs] == [*[len(p) for p in pieces], 0]
    np.testing.assert_allclose(np.concatenate(outs), whole, rtol=0, atol=1e-4)


def test_silence_stays_silent_noise_and_full_scale_stay_sane() -> None:
    v = VoiceDisguise(RATE, 5)
    assert np.abs(v.process(np.zeros(RATE, np.float32))).max() < 1e-6
    v.process(_tone(150.0, RATE, 0.5))
    after = v.process(np.zeros(RATE, np.float32))  # nothing rings on once the voice stops
    assert np.abs(after[2 * (v.latency + 1):]).max() < 1e-6

    rng = np.random.default_rng(1)
    out = VoiceDisguise(RATE, 5).process(rng.standard_normal(RATE).astype(np.float32))
    assert np.isfinite(out).all()

    t = np.arange(RATE) / RATE
    square = np.sign(np.sin(2 * np.pi * 220 * t)).astype(np.float32)  # clipped, full scale
    for signal in (square, np.clip(3 * _tone(130.0, RATE, 1.0) / 0.2, -1, 1).astype(np.float32)):
        out = VoiceDisguise(RATE, 6).process(signal)
        assert np.isfinite(out).all() and np.abs(out).max() <= 1.0
        assert np.sqrt(np.mean(out**2)) > 0.1

    # garbage far outside +-1 is clamped, not turned into inf or NaN
    huge = VoiceDisguise(RATE, 5).process(rng.standard_normal(RATE) * 1e200)
    assert np.isfinite(huge).all() and np.abs(huge).max() <= 1.0

    # a decoder glitch (NaN, inf) costs those samples, not the rest of the stream
    v = VoiceDisguise(RATE, 5)
    bad = _tone(150.0, RATE, 1.0)
    bad[1000:1010] = np.nan
    bad[5000] = np.inf
    out = np.concatenate([v.process(bad), v.process(_tone(150.0, RATE, 1.0))])
    assert np.isfinite(out).all()
    assert np.sqrt(np.mean(out[-RATE // 2:] ** 2)) > 0.05


def test_keys_choose_the_voice() -> None:
    factors = [disguise_factors(k) for k in range(500)]
    for pitch, formant in factors:
        assert PITCH_DOWN[0] <= pitch <= PITCH_DOWN[1] or PITCH_UP[0] <= pitch <= PITCH_UP[1]
        assert FORMANT_DOWN[0] <= formant <= FORMANT_DOWN[1] or FORMANT_UP[0] <= formant <= FORMANT_UP[1]
        if (pitch > 1) == (formant > 1):  # one resampling would move both the same way
            assert max(pitch / formant, formant / pitch) >= MIN_SEPARATION - 1e-9
    assert len(set(factors)) == len(factors)
    # all four directions occur, so pitch and formants are not tied to each other
    directions = {(p > 1, f > 1) for p, f in factors}
    assert directions == {(False, False), (False, True), (True, False), (True, True)}
    assert disguise_factors(-3) != disguise_factors(3)
    with pytest.raises(TypeError):
        disguise_factors(1.5)  # type: ignore[arg-type]

    x = _mixture(RATE)
    a, b = VoiceDisguise(RATE, 42), VoiceDisguise(RATE, 42)
    first = a.process(x)
    np.testing.assert_array_equal(first, b.process(x))
    assert (a.pitch_factor, a.formant_factor) == disguise_factors(42)
    a.reset()  # a reset stream is a new stream: the same output again
    np.testing.assert_array_equal(a.process(x), first)
    assert not np.allclose(_disguise(x, RATE, 43), first, atol=1e-3)


@pytest.mark.parametrize("rate", [48000, 16000, 8000, 44100])
def test_latency_is_the_delay_of_a_click(rate: int) -> None:
    v = VoiceDisguise(rate, 2)
    assert isinstance(v.latency, int) and 0.02 * rate < v.latency < 0.06 * rate
    hop = v.hop
    x = np.zeros(2 * rate, np.float32)
    clicks = np.arange(rate // 8, len(x) - rate // 4, rate // 4)
    x[clicks] = 0.8
    y = v.process(x).astype(np.float64)
    energy = np.convolve(y**2, np.ones(max(1, hop // 4)), mode="same")
    for c in clicks:
        delay = int(np.argmax(energy[c:c + v.latency + 3 * hop]))
        assert abs(delay - v.latency) <= hop
    assert np.abs(y[:clicks[0]]).max() < 1e-6  # causal: nothing comes out before it went in
