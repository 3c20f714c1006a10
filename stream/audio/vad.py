"""Speech detection for audio redaction: Silero VAD (MIT, shipped in the ``silero-vad`` wheel).

The model scores 32 ms of 16 kHz mono audio at a time and carries a recurrent state from one
chunk to the next, so each stream keeps its own state and context while every stream shares one
ONNX Runtime session (one thread: a chunk costs a fraction of a millisecond, and the cores
belong to video). Audio of any rate is brought to 16 kHz here; the decisions are mapped back
to the caller's samples by :class:`SpeechTracker`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from stream.detect.models import model_path
from stream.detect.runtime import create_session

VAD_RATE = 16_000
CHUNK = 512
"""new samples per model call at 16 kHz (32 ms)"""
CONTEXT = 64
"""samples of the previous chunk the model sees again before the new ones"""
STATE_SHAPE = (2, 1, 128)


class SpeechModel:
    """One shared Silero session; thread-safe (each call passes its own stream's state)."""

    def __init__(self, model_dir: Path | None = None) -> None:
        self.session = create_session(model_path("vad", model_dir), providers=["cpu"],
                                      threads=1)
        self._sr = np.array(VAD_RATE, dtype=np.int64)
        self._lock = threading.Lock()

    def score(self, chunks: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Speech probability of each row of ``chunks`` ([N, CONTEXT + CHUNK] float32) given
        ``state`` ([2, N, 128]); returns (probabilities [N], the next state)."""
        with self._lock:  # one thread: a second caller would only wait for the same core
            out, new_state = self.session.run(None, {"input": chunks, "state": state, "sr": self._sr})
        return out[:, 0], new_state


_shared: dict[Path | None, SpeechModel] = {}
_shared_lock = threading.Lock()


def shared_model(model_dir: Path | None = None) -> SpeechModel:
    """The process's one speech model (per model folder), loaded on first use: a verified file, or
    a ModelError that names the fix."""
    key = model_dir.resolve() if model_dir is not None else None
    with _shared_lock:
        if key not in _shared:
            _shared[key] = SpeechModel(model_dir)
        return _shared[key]


class Resampler16k:
    """Streaming conversion of mono audio at ``rate`` to 16 kHz, for the detector only.

    Linear interpolation after a short moving-average low-pass when decimating: the detector
    needs the speech band (below 4 kHz), not fidelity, and this keeps no more than a few samples
    of state and adds no delay worth counting.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.step = rate / VAD_RATE
        taps = max(1, round(self.step))
        self._kernel = np.full(taps, 1.0 / taps, dtype=np.float32) if taps > 1 else None
        self._tail = np.zeros(max(0, taps - 1), dtype=np.float32)
        self._pos = 0.0
        """position of the next output sample, in input samples from the start of ``_carry``"""
        self._carry = np.zeros(0, dtype=np.float32)

    def push(self, mono: np.ndarray) -> np.ndarray:
        x = mono.astype(np.float32, copy=False)
        if self._kernel is not None:
            padded = np.concatenate([self._tail, x])
            self._tail = padded[len(padded) - len(self._tail):] if len(self._tail) else self._tail
            x = np.convolve(padded, self._kernel, mode="valid").astype(np.float32)
        buf = np.concatenate([self._carry, x])
        if len(buf) < 2:
            self._carry = buf
            return np.zeros(0, dtype=np.float32)
        last = len(buf) - 1
        n = int(np.floor((last - self._pos) / self.step)) + 1 if self._pos <= last else 0
        pos = self._pos + self.step * np.arange(n)
        i = np.minimum(pos.astype(np.int64), last - 1)
        frac = (pos - i).astype(np.float32)
        out = buf[i] * (1 - frac) + buf[i + 1] * frac
        self._pos += self.step * n
        keep = int(np.floor(self._pos))
        keep = min(keep, last)
        self._carry = buf[keep:]
        self._pos -= keep
        return out.astype(np.float32)


class Decision(NamedTuple):
    """The speech state after one chunk: caller samples before ``end`` are scored; ``onset`` is
    where the current stretch of speech began (meaningful while ``speaking``)."""

    end: int
    speaking: bool
    onset: int
    probability: float


@dataclass(frozen=True)
class SpeechConfig:
    """When a run of chunks counts as speech, and how long speech is held after it fades."""

    start: float = 0.5
    """probability at which speech starts"""
    stop: float = 0.35
    """probability under which speech may end (hysteresis: a syllable's dip does not end it)"""
    hangover_s: float = 0.3
    """speech ends only after this long under ``stop`` (the tail of a word, a short pause)"""
    min_chunks: int = 2
    """chunks in a row at ``start`` before speech starts: a siren's attack or a beep scores high for
    one chunk; speech does for many. The look-ahead reaches back over them, so nothing leaks"""


class SpeechTracker:
    """One stream's speech state: feed audio at its own rate, get speech on/off per chunk.

    Decisions come back per chunk (:class:`Decision`), in the caller's samples counted from the
    first sample fed.
    """

    def __init__(self, model: SpeechModel, rate: int, config: SpeechConfig | None = None,
                 origin: int = 0) -> None:
        self.model = model
        self.rate = rate
        self.config = config or SpeechConfig()
        self._resampler = Resampler16k(rate)
        self._pending = np.zeros(0, dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._chunks = 0
        self._fed = origin
        self._origin = origin
        """the caller's sample at which the current run of chunks began (moved by :meth:`reset`)"""
        self.speaking = False
        self._quiet_s = 0.0
        self._run = 0
        self.onset = origin
        """the caller's sample where the current (or last) stretch of speech began"""
        self.last_probability = 0.0

    def reset(self, skipped: int = 0) -> None:
        """Forget the model state (after a fault, or a gap in the audio of ``skipped`` samples the
        detector will never see); decisions go on from the next sample fed."""
        self._fed += skipped
        self._origin, self._chunks = self._fed, 0
        self._resampler = Resampler16k(self.rate)
        self._pending = np.zeros(0, dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self.speaking = False
        self._quiet_s = 0.0
        self._run = 0

    @property
    def pending_onset(self) -> int | None:
        """Where speech would begin if the chunks now above ``start`` are confirmed (None: no such
        run): audio from there on must not be released yet."""
        return self.onset if self._run > 0 and not self.speaking else None

    def feed(self, mono: np.ndarray) -> list[Decision]:
        """Score ``mono`` (float32, the caller's rate); the decisions of every whole chunk."""
        self._fed += len(mono)
        self._pending = np.concatenate([self._pending, self._resampler.push(mono)])
        n = len(self._pending) // CHUNK
        if n == 0:
            return []
        out: list[Decision] = []
        cfg = self.config
        for k in range(n):
            new = self._pending[k * CHUNK:(k + 1) * CHUNK]
            window = np.concatenate([self._context, new])[None, :]
            prob, self._state = self.model.score(window, self._state)
            self._context = new[-CONTEXT:].copy()
            p = float(prob[0])
            self.last_probability = p
            begin = self._origin + round(self._chunks * CHUNK * self.rate / VAD_RATE)
            self._chunks += 1
            if p >= cfg.start:
                self._quiet_s = 0.0
                if not self.speaking:
                    if self._run == 0:
                        self.onset = begin
                    self._run += 1
                    self.speaking = self._run >= cfg.min_chunks
            elif not self.speaking:
                self._run = 0
            elif p < cfg.stop:
                self._quiet_s += CHUNK / VAD_RATE
                if self._quiet_s >= cfg.hangover_s:
                    self.speaking, self._run = False, 0
            # between stop and start, speech goes on but the quiet time is not reset: a fading tail
            # hovering there does not hold speech open for ever
            end = self._origin + round(self._chunks * CHUNK * self.rate / VAD_RATE)
            out.append(Decision(end, self.speaking, self.onset, p))
        self._pending = self._pending[n * CHUNK:]
        return out
