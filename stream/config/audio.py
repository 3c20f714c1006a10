"""A stream's audio policy: speech is personal data, so by default it is muted and nothing else is.

``mute_speech`` keeps sirens, alarms and the street and silences every stretch of speech;
``disguise`` keeps the words and changes the voice (a per-stream random key); ``drop`` publishes
no audio; ``keep`` passes it unredacted, for sites whose own rules allow it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stream.config.base import ConfigModel


class AudioConfig(ConfigModel):
    policy: Literal["mute_speech", "disguise", "drop", "keep"] = Field(
        "mute_speech", description="mute_speech: speech silenced, every other sound kept; disguise: words "
        "kept, voices pitch- and formant-shifted with a random per-stream key; drop: no audio in the "
        "outputs; keep: the audio passed unredacted (voices and spoken names stay audible)")
    lookahead_ms: float = Field(
        300.0, ge=64, le=2000,
        description="audio is held back this long so the first syllable of speech, which the detector "
                    "needs a few chunks to be sure of, is muted too; the video waits for nothing")
    speech_threshold: float = Field(
        0.5, gt=0, lt=1, description="speech probability at which a stretch counts as speech (lower: "
                                     "more is muted, quiet speech included)")
    codec: Literal["aac", "opus"] = Field(
        "aac", description="audio codec of RTSP outputs (recordings are AAC, WebRTC viewers Opus)")
    bitrate_kbps: int = Field(64, ge=8, le=512, description="audio bitrate of every encoded output")
    lip_sync_webrtc: bool = Field(
        True, description="hold the WebRTC (WHEP) picture back by the audio's look-ahead so viewers hear "
                          "and see the same moment (WebRTC players sync by arrival); false: the picture "
                          "as early as possible, the sound about lookahead_ms behind it. RTSP, files and "
                          "recordings carry timestamps and are in sync either way")
