"""Audio redaction for one stream: speech muted (or disguised), everything else kept, fail closed.

Speech is personal data as much as a face is. The redactor holds the audio back by a look-ahead
(``lookahead_s``) so that when the detector decides speech has started, the samples just
before that decision (the first syllable, which the detector needs a few chunks to be sure of)
are still here to be muted: the same idea as the video look-back. Sirens, alarms and ambient
sound between speech pass unchanged.

Fail closed: if the detector (or the disguise) raises, every sample it was responsible for comes
out silent, counted as ``fault``; samples the caller marks late (the lane fell behind) come out
silent as ``late``. A sample is released only once a decision covers it, or as silence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from stream.audio.vad import SpeechConfig, SpeechModel, SpeechTracker

log = logging.getLogger(__name__)

FOLLOW_S = 0.04
"""how far the caller's time for a block may drift from the samples' own count before the released
audio's times follow it: lip-sync error stays under this, a jittery clock does not shift every block"""


class AudioPolicy(StrEnum):
    DROP = "drop"
    """no audio in the outputs (the behaviour before audio redaction existed)"""
    MUTE_SPEECH = "mute_speech"
    """speech replaced by silence; sirens, alarms and ambient sound kept"""
    DISGUISE = "disguise"
    """speech kept intelligible with the voice pitch- and formant-shifted by a per-stream key"""
    KEEP = "keep"
    """audio passed unredacted (voices and spoken names stay audible)"""


class MuteReason(StrEnum):
    SPEECH = "speech"
    FAULT = "fault"
    LATE = "late"


@dataclass(frozen=True)
class AudioRedactConfig:
    policy: AudioPolicy = AudioPolicy.MUTE_SPEECH
    lookahead_s: float = 0.3
    """speech is muted from this long before the detector's first speech chunk; also the delay
    the redactor adds (plus a detector chunk, 32 ms)"""
    ramp_s: float = 0.005
    """fade into and out of each muted stretch (a hard cut clicks), outside the muted stretch"""
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    key: int = 0
    """the disguise key: a voice disguised with one stream's key cannot be undone with another's"""


@dataclass(frozen=True)
class SpeechSegment:
    """A stretch of speech: times on the caller's clock (no content)."""

    start: float
    end: float
    probability: float
    """the highest speech probability the detector gave inside it"""


@dataclass
class Released:
    """Redacted samples ready to go out: ``samples`` [n, channels] float32 from time ``t``."""

    samples: np.ndarray
    t: float
    muted: dict[MuteReason, int] = field(default_factory=dict)
    """samples of this block muted (or disguised), by reason"""


class _Interval:
    __slots__ = ("end", "peak", "reason", "speech_start", "start")

    def __init__(self, start: int, end: int | None, reason: MuteReason, speech_start: int = 0) -> None:
        self.start, self.end, self.reason, self.speech_start = start, end, reason, speech_start
        self.peak = 0.0


class AudioRedactor:
    """Feed decoded audio in order with :meth:`push`; take the redacted audio it releases.

    Samples are float32 [n, channels] in -1..1 at ``rate``. ``t`` is the time of a block's first
    sample on the caller's clock; released blocks carry the time of their own first sample, so
    the caller can keep them in step with the video.
    """

    def __init__(self, rate: int, channels: int, config: AudioRedactConfig, model: SpeechModel | None = None,
                 on_segment: Callable[[SpeechSegment], None] | None = None, stream_id: str = "") -> None:
        self.rate, self.channels, self.config = rate, channels, config
        self.stream_id = stream_id
        self.on_segment = on_segment
        self.policy = config.policy
        self._model = model
        self._tracker: SpeechTracker | None = None
        self._disguise = None
        if self.policy in (AudioPolicy.MUTE_SPEECH, AudioPolicy.DISGUISE):
            if model is None:
                from stream.audio.vad import shared_model

                self._model = shared_model()
            assert self._model is not None
            self._tracker = SpeechTracker(self._model, rate, config.speech)
        if self.policy is AudioPolicy.DISGUISE:
            from stream.audio.disguise import VoiceDisguise

            self._disguise = VoiceDisguise(rate, config.key)
        self.preroll = round(config.lookahead_s * rate)
        self.ramp = max(1, round(config.ramp_s * rate))
        self._buf = np.zeros((0, channels), dtype=np.float32)
        self._head = 0
        """absolute index of ``_buf[0]``"""
        self._fed = 0
        self._decided = 0
        """samples before this index have a speech decision"""
        self._disg = np.zeros(0, dtype=np.float32)
        self._disg_start = -(self._disguise.latency if self._disguise is not None else 0)
        self._intervals: list[_Interval] = []
        self._open: _Interval | None = None
        self._t0: float | None = None
        self.faults = 0
        self.totals: dict[MuteReason, int] = dict.fromkeys(MuteReason, 0)

    @property
    def delay_s(self) -> float:
        """How long audio is held back (look-ahead, one detector chunk, the disguise's latency)."""
        if self._tracker is None:
            return 0.0
        extra = self._disguise.latency if self._disguise is not None else 0
        return (self.preroll + self.ramp + extra) / self.rate + 0.032

    # -- input -----------------------------------------------------------------------------------
    def push(self, samples: np.ndarray, t: float | None = None, late: bool = False) -> list[Released]:
        """Take one block; ``late`` blocks are muted without being scored (the caller fell behind).
        Returns the blocks now released (none while the look-ahead fills)."""
        if self.policy is AudioPolicy.DROP:
            return []
        x = np.asarray(samples, dtype=np.float32).reshape(len(samples), self.channels)
        if self._t0 is None or (t is not None and abs(t - self._time(self._fed)) > FOLLOW_S):
            # the first block, or the caller's clock moved away from the samples' count (a reconnect, a
            # stall, or the video's arrival offset settling): the timeline follows the caller; the
            # samples held meanwhile go out just before the new block
            self._t0 = (t if t is not None else 0.0) - self._fed / self.rate
        out: list[Released] = []
        self._ingest(x, late)
        out += self._release(self._releasable())
        return out

    def flush(self) -> list[Released]:
        """Release everything held (end of stream): the tail is scored against trailing silence."""
        if self._tracker is not None and self._fed > self._decided:
            pad = np.zeros(self.preroll + self.ramp + self.rate // 10, dtype=np.float32)
            self._score(pad, count=False)
        out = self._release(self._fed, final=True)
        if self._tracker is not None:  # the padding moved the detector's count: it starts again here
            self._restart_tracker()
        return out

    def _time(self, index: int) -> float:
        assert self._t0 is not None
        return self._t0 + index / self.rate

    def _ingest(self, x: np.ndarray, late: bool) -> None:
        start = self._fed
        self._buf = np.concatenate([self._buf, x]) if len(self._buf) else x.copy()
        self._fed += len(x)
        if self._tracker is None:
            self._decided = self._fed
            return
        mono = x.mean(axis=1) if self.channels > 1 else x[:, 0]
        if late:
            self._mute(start, self._fed, MuteReason.LATE)
            self._restart_tracker()
        else:
            self._score(mono, count=True)
        if self._disguise is not None:
            try:
                self._disg = np.concatenate([self._disg, self._disguise.process(mono)])
            except Exception:
                self._on_fault("voice disguise")
                self._disg = np.concatenate([self._disg, np.zeros(len(mono), dtype=np.float32)])
                self._mute(max(self._head, self._fed - len(mono) - self._disguise.latency), self._fed,
                           MuteReason.FAULT)

    def _score(self, mono: np.ndarray, count: bool) -> None:
        """Run the detector on ``mono`` (``count``: real samples; else padding after the end)."""
        assert self._tracker is not None
        start = self._fed - len(mono) if count else self._fed
        try:
            decisions = self._tracker.feed(mono)
        except Exception:
            self._on_fault("speech detector")
            self._mute(min(self._decided, start), self._fed, MuteReason.FAULT)
            self._restart_tracker()
            return
        prev = self._decided
        for end, speaking, onset, p in decisions:
            end = min(end, self._fed)
            if speaking and self._open is None:
                onset = min(prev, onset)
                self._open = _Interval(max(0, onset - self.preroll), None, MuteReason.SPEECH,
                                       speech_start=onset)
                self._intervals.append(self._open)
            if self._open is not None:
                self._open.peak = max(self._open.peak, p)
                if not speaking:
                    self._close(end)
            prev = max(prev, end)
        self._decided = max(self._decided, prev)

    def _close(self, end: int) -> None:
        iv = self._open
        assert iv is not None
        iv.end, self._open = end, None
        if self.on_segment is not None:
            seg = SpeechSegment(self._time(iv.speech_start), self._time(end), round(iv.peak, 3))
            try:
                self.on_segment(seg)
            except Exception:
                log.exception("stream %s: speech segment hook failed", self.stream_id)

    def _restart_tracker(self) -> None:
        if self._open is not None:
            self._close(self._fed)
        assert self._tracker is not None
        self._tracker = SpeechTracker(self._tracker.model, self.rate, self.config.speech, origin=self._fed)
        self._decided = self._fed

    def _mute(self, start: int, end: int, reason: MuteReason) -> None:
        if end > start:
            self._intervals.append(_Interval(start, end, reason))

    def _on_fault(self, what: str) -> None:
        self.faults += 1
        if self.faults == 1 or self.faults % 100 == 0:
            log.exception("stream %s: %s failed (%d time(s)); the audio it covers is muted", self.stream_id,
                          what, self.faults)

    # -- output ----------------------------------------------------------------------------------
    def _releasable(self) -> int:
        if self._tracker is None:
            return self._fed
        pending = self._tracker.pending_onset
        base = self._decided if pending is None else min(self._decided, pending)
        limit = base - self.preroll - self.ramp
        if self._disguise is not None:
            limit = min(limit, self._disg_start + len(self._disg))
        return max(self._head, min(limit, self._fed))

    def _release(self, upto: int, final: bool = False) -> list[Released]:
        if final and self._open is not None:
            self._close(self._fed)
        n = upto - self._head
        if n <= 0:
            return []
        x = self._buf[:n]
        self._buf = self._buf[n:]
        lo, hi = self._head, upto
        t = self._time(lo)
        muted: dict[MuteReason, int] = {}
        if self._tracker is not None:
            gain, muted = self._gain(lo, hi, final)
            if muted:
                if self._disguise is not None:
                    d = self._disguised(lo, hi)
                    x = x * gain[:, None] + (d * (1 - gain))[:, None]
                else:
                    x = x * gain[:, None]
                # a fault or a late block is silent even under disguise
                silent = self._silent(lo, hi)
                if silent is not None:
                    x = x * silent[:, None]
            self._intervals = [iv for iv in self._intervals
                               if iv.end is None or iv.end + self.ramp > hi or iv is self._open]
        for r, k in muted.items():
            self.totals[r] += k
        self._head = hi
        return [Released(np.ascontiguousarray(x, dtype=np.float32), t, muted)]

    def _gain(self, lo: int, hi: int, final: bool) -> tuple[np.ndarray, dict[MuteReason, int]]:
        """1 where the samples [lo, hi) go out as they came, 0 where they are muted, a short ramp
        between (placed outside the muted stretch)."""
        idx = np.arange(lo, hi)
        gain = np.ones(hi - lo, dtype=np.float32)
        muted: dict[MuteReason, int] = {}
        undecided = self._decided if not final else hi
        for iv in self._intervals:
            end = iv.end if iv.end is not None else max(hi, undecided)
            if end + self.ramp <= lo or iv.start - self.ramp >= hi:
                continue
            inside = (idx >= iv.start) & (idx < end)
            k = int(inside.sum())
            if k:
                muted[iv.reason] = muted.get(iv.reason, 0) + k
            # distance to the stretch in ramps: before it (start - idx) or after it (idx - end + 1)
            ramp = np.maximum(np.clip((iv.start - idx) / self.ramp, 0, 1),
                              np.clip((idx - end + 1) / self.ramp, 0, 1))
            gain = np.minimum(gain, np.where(inside, 0.0, ramp).astype(np.float32))
        return gain, muted

    def _silent(self, lo: int, hi: int) -> np.ndarray | None:
        """Zero where a fault or a late block covers [lo, hi) (for disguise, which keeps speech)."""
        if self._disguise is None:
            return None
        idx = np.arange(lo, hi)
        keep = np.ones(hi - lo, dtype=np.float32)
        for iv in self._intervals:
            if iv.reason is MuteReason.SPEECH or iv.end is None:
                continue
            keep[(idx >= iv.start) & (idx < iv.end)] = 0
        return keep

    def _disguised(self, lo: int, hi: int) -> np.ndarray:
        a, b = lo - self._disg_start, hi - self._disg_start
        d = self._disg[max(0, a):max(0, b)]
        if len(d) < hi - lo:  # not produced yet (end of stream): silence, never the clear voice
            d = np.concatenate([np.zeros(hi - lo - len(d), dtype=np.float32), d]) if a < 0 else \
                np.concatenate([d, np.zeros(hi - lo - len(d), dtype=np.float32)])
        # the disguise output before ``lo`` is no longer needed
        cut = max(0, b)
        self._disg = self._disg[cut:]
        self._disg_start += cut
        return d

