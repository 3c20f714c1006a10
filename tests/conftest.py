"""Shared fixtures: the fixture photos, real detector sessions (loaded once), small test clips."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import ASTRONAUT, CHELSEA, make_clip, read_bgr

from stream.detect.centerface import CenterFace
from stream.detect.ensemble import DetectorConfig, FrameDetector, ModelConfig
from stream.detect.yolo import PersonYolo, PlateYolo
from stream.detect.yunet import YuNet

CPU = ("cpu",)


@pytest.fixture(autouse=True)
def _logger_levels() -> Iterator[None]:
    """``cli.main`` sets library logger levels for the process; a test that calls it in-process must
    not change what later tests' caplog sees."""
    names = ("stream", "stream.detect.runtime", "kafka")
    levels = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test has its own state directory (events spool, saved zones): what one test leaves there
    never reaches the next, nor the home directory of whoever runs the suite."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return read_bgr(ASTRONAUT)


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    return read_bgr(CHELSEA)


@pytest.fixture(scope="session")
def centerface() -> CenterFace:
    return CenterFace(threshold=0.35, providers=CPU)


@pytest.fixture(scope="session")
def yunet() -> YuNet:
    return YuNet(threshold=0.6, providers=CPU)


@pytest.fixture(scope="session")
def plate_yolo() -> PlateYolo:
    return PlateYolo(threshold=0.25, providers=CPU)


@pytest.fixture(scope="session")
def person_yolo() -> PersonYolo:
    return PersonYolo(threshold=0.3, providers=CPU)


@pytest.fixture(scope="session")
def frame_detector() -> FrameDetector:
    """The CLI's default ensemble: CenterFace, plates and person heads."""
    return FrameDetector(DetectorConfig(providers=CPU))


@pytest.fixture(scope="session")
def both_faces_detector() -> FrameDetector:
    """`--face-model both`: CenterFace and YuNet merged by NMS, nothing else."""
    return FrameDetector(DetectorConfig(
        faces={"centerface": ModelConfig(0.35, 640), "yunet": ModelConfig(0.6, 640)},
        plate=None, person_heads=None, providers=CPU))


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def face_clip(media_dir: Path):
    """20 frames, odd size 321x241, 25 fps; no face in frames 0-5, then the head moves across."""
    return make_clip(media_dir / "face_clip.mp4", frames=20, width=321, height=241, fps=25, face_from=6)


@pytest.fixture(scope="session")
def full_mp4_faststart(media_dir: Path):
    """A 24-frame mp4 with audio and its index at the front, the source of the truncated file."""
    return make_clip(media_dir / "full_faststart.mp4", frames=24, audio=True, faststart=True)
