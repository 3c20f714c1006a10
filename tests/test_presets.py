"""Detector settings: a preset with explicit options over it, reached through one conversion
(``DetectionConfig.detector_settings``) by ``redact``, the live pipeline and event model info alike."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import ASTRONAUT, run_cli

from stream import cli
from stream.config import DetectionConfig, parse_config
from stream.detect import ensemble
from stream.detect.presets import face_models
from stream.events.emitter import model_info
from stream.live.service import detector_factory_for


def summary(cfg: ensemble.DetectorConfig) -> dict[str, Any]:
    """What a DetectorConfig decides about detection, in a form a table can state."""
    return {
        "faces": {n: (m.threshold, m.input_size, m.min_input) for n, m in cfg.faces.items()},
        "plate": None if cfg.plate is None else (cfg.plate.threshold, cfg.plate.input_size, cfg.plate.every),
        "person": None if cfg.person_heads is None else (cfg.person_heads.input_size, cfg.person_heads.every),
        "vehicle_plates": cfg.plate_max_vehicle_px,
        "crops": None if cfg.plate_crops is None else (cfg.plate_crops.sizes, cfg.plate_crops.threshold),
    }


@pytest.mark.parametrize(("settings", "expected"), [
    ({"preset": "accurate"},
     {"faces": {"centerface": (0.35, 960, 640)}, "plate": (0.2, 960, 1), "person": (960, 1),
      "vehicle_plates": 200.0, "crops": ((256,), 0.3)}),
    ({"preset": "fast"},
     {"faces": {"yunet": (0.5, 640, 640)}, "plate": (0.2, 640, 3), "person": (512, 3),
      "vehicle_plates": 200.0, "crops": ((256,), 0.3)}),
    ({"preset": "fast", "face_model": "both", "face_threshold": 0.4},
     {"faces": {"centerface": (0.4, 640, 640), "yunet": (0.4, 640, 640)}, "plate": (0.2, 640, 3),
      "person": (512, 3), "vehicle_plates": 200.0, "crops": ((256,), 0.3)}),
    ({"preset": "fast", "input_size": 800},  # an explicit size is every model's
     {"faces": {"yunet": (0.5, 800, 640)}, "plate": (0.2, 800, 3), "person": (800, 3),
      "vehicle_plates": 200.0, "crops": ((256,), 0.3)}),
    ({"preset": "accurate", "input_size": 480, "plate_every": 2, "person_every": 4, "plate_threshold": 0.5},
     {"faces": {"centerface": (0.35, 480, 480)}, "plate": (0.5, 480, 2), "person": (480, 4),
      "vehicle_plates": 200.0, "crops": ((256,), 0.5)}),
    ({"preset": "fast", "plates": False, "heads": False, "vehicle_plates_px": 0},
     {"faces": {"yunet": (0.5, 640, 640)}, "plate": None, "person": None, "vehicle_plates": None,
      "crops": None}),
    ({"preset": "accurate", "face_model": "yunet", "vehicle_plates_px": 90},
     {"faces": {"yunet": (0.5, 960, 640)}, "plate": (0.2, 960, 1), "person": (960, 1),
      "vehicle_plates": 90.0, "crops": ((256,), 0.3)}),
    ({"preset": "accurate", "vehicle_plates_px": 0},  # 0: no middle masks at all
     {"faces": {"centerface": (0.35, 960, 640)}, "plate": (0.2, 960, 1), "person": (960, 1),
      "vehicle_plates": None, "crops": ((256,), 0.3)}),
    ({"preset": "accurate", "plate_crops": False, "vehicle_plates_px": 120},
     {"faces": {"centerface": (0.35, 960, 640)}, "plate": (0.2, 960, 1), "person": (960, 1),
      "vehicle_plates": 120.0, "crops": None}),
    ({"preset": "fast", "heads": False},  # no person model: no vehicles to crop
     {"faces": {"yunet": (0.5, 640, 640)}, "plate": (0.2, 640, 3), "person": None,
      "vehicle_plates": 200.0, "crops": None}),
])
def test_preset_with_explicit_settings_over_it(settings: dict[str, Any], expected: dict[str, Any]) -> None:
    assert summary(DetectionConfig(**settings).detector_settings()) == expected


@pytest.mark.parametrize(("settings", "expected"), [
    ({"preset": "accurate"}, (960, 1)),  # the file command's preset: at the plate model's size and cadence
    ({"preset": "fast"}, None),  # the live preset: it costs as much as the plate model
    ({"preset": "fast", "text_plates": True}, (640, 3)),
    ({"preset": "accurate", "text_plates": False}, None),
    ({"preset": "accurate", "plates": False}, None),  # no plates asked for: no text pass either
    ({"preset": "accurate", "input_size": 800, "plate_every": 2}, (800, 2)),
])
def test_text_pass_follows_the_preset_and_the_plate_model(settings: dict[str, Any],
                                                          expected: tuple[int, int] | None) -> None:
    text = DetectionConfig(**settings).detector_settings().text_plates
    assert (None if text is None else (text.input_size, text.every)) == expected


def test_runtime_settings_and_buckets_reach_the_detector(tmp_path: Path) -> None:
    d = DetectionConfig(providers=["cuda", "cpu"], threads=3, backend="torch", device_id=1, fp16=False,
                        engine_cache_dir=tmp_path, device_preprocess=False, model_dir=tmp_path)
    cfg = d.detector_settings([1, 4])
    assert (cfg.providers, cfg.threads, cfg.backend, cfg.device_id, cfg.fp16) == (("cuda", "cpu"), 3, "torch",
                                                                                   1, False)
    assert (cfg.cache_dir, cfg.model_dir, cfg.device_preprocess, tuple(cfg.buckets)) == (tmp_path, tmp_path,
                                                                                         False, (1, 4))
    assert tuple(d.detector_settings().buckets) == tuple(ensemble.DetectorConfig().buckets)


@pytest.mark.parametrize(("preset", "face_model", "expected"), [
    ("accurate", None, ["centerface"]),
    ("fast", None, ["yunet"]),
    ("fast", "centerface", ["centerface"]),
    ("accurate", "both", ["centerface", "yunet"]),
])
def test_face_models_of_detector_and_events_agree(preset: str, face_model: str | None,
                                                  expected: list[str]) -> None:
    detection = DetectionConfig(preset=preset, face_model=face_model)
    assert face_models(preset, face_model) == expected
    assert list(detection.detector_settings().faces) == expected
    assert model_info(detection)["face"]["name"] == "+".join(expected)


@pytest.mark.parametrize(("settings", "expected"), [
    ({"preset": "accurate"}, "plate+text"),
    ({"preset": "fast"}, "plate"),
    ({"preset": "fast", "text_plates": True}, "plate+text"),
    ({"preset": "accurate", "text_plates": False}, "plate"),
])
def test_events_name_the_plate_models_that_ran(settings: dict[str, Any], expected: str) -> None:
    detection = DetectionConfig(**settings)
    info = model_info(detection)["plate"]
    assert info["name"] == expected
    assert len(info["version"].split("+")) == len(expected.split("+"))
    assert (detection.detector_settings().text_plates is not None) == ("text" in expected)


class Built(Exception):
    """Raised by the stand-in detector: the settings are all a test needs, no model is loaded."""

    def __init__(self, cfg: ensemble.DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg


def _capture(monkeypatch: pytest.MonkeyPatch) -> None:
    def detector(cfg: ensemble.DetectorConfig) -> None:
        raise Built(cfg)

    monkeypatch.setattr(ensemble, "FrameDetector", detector)


@pytest.mark.parametrize(("options", "detection"), [
    ([], {"preset": "accurate", "providers": ["cuda", "cpu"]}),
    (["--preset", "fast", "--face-model", "both", "--face-threshold", "0.4", "--input-size", "800",
      "--plate-every", "2", "--no-heads", "--vehicle-plates", "0", "--providers", "CPU", "--threads", "2"],
     {"preset": "fast", "face_model": "both", "face_threshold": 0.4, "input_size": 800, "plate_every": 2,
      "heads": False, "vehicle_plates_px": 0, "providers": ["cpu"], "threads": 2}),
    (["--preset", "fast", "--no-plate-crops", "--vehicle-plates", "150"],
     {"preset": "fast", "plate_crops": False, "vehicle_plates_px": 150, "providers": ["cuda", "cpu"]}),
    (["--preset", "fast", "--text-plates", "on"],
     {"preset": "fast", "text_plates": True, "providers": ["cuda", "cpu"]}),
    (["--text-plates", "off"], {"preset": "accurate", "text_plates": False, "providers": ["cuda", "cpu"]}),
    (["--preset", "accurate", "--plate-threshold", "0.3", "--person-every", "2", "--no-plates"],
     {"preset": "accurate", "plate_threshold": 0.3, "person_every": 2, "plates": False,
      "providers": ["cuda", "cpu"]}),
])
def test_redact_and_the_live_pipeline_build_the_same_detector(
        options: list[str], detection: dict[str, Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same settings, given as `redact` options and as a live config, give one detector."""
    _capture(monkeypatch)
    with pytest.raises(Built) as from_cli:
        cli.main(["redact", str(ASTRONAUT), "-o", str(tmp_path / "o.jpg"), *options])
    config = parse_config({"detection": {"warmup": False, **detection}})
    with pytest.raises(Built) as from_config:
        detector_factory_for(config)()
    live = from_config.value.cfg
    if config.detection.heads:
        # the person model runs anyway, so the live detector reports screens and bodies for the
        # streams that ask for them (each stream masks only what it asks for)
        assert (live.screens, live.bodies) == (True, True)
        live = dataclasses.replace(live, screens=False, bodies=False)
    assert from_cli.value.cfg == live


@pytest.mark.parametrize(("options", "pattern"), [
    (["--input-size", "100"], r"--input-size: input should be greater than or equal to 160"),
    (["--plate-every", "31", "--coast", "40"], r"--plate-every: input should be less than or equal to 30"),
    (["--threads", "-1"], r"--threads: input should be greater than or equal to 0"),
    (["--preset", "fast", "--coast", "2"], r"--coast 2 is shorter than the detector gap \(3 frames"),
])
def test_redact_options_outside_the_config_ranges_are_refused_naming_the_option(
        options: list[str], pattern: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _capture(monkeypatch)  # nothing may get as far as building a detector
    assert cli.main(["redact", str(ASTRONAUT), "-o", str(tmp_path / "o.jpg"), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stream-redact: error: ")
    assert re.search(pattern, err), err


def test_no_plate_or_person_detector_means_no_gap_to_cover(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """--coast only has to bridge detectors that skip frames and run at all."""
    _capture(monkeypatch)
    with pytest.raises(Built):
        cli.main(["redact", str(ASTRONAUT), "-o", str(tmp_path / "o.jpg"), "--preset", "fast", "--no-plates",
                  "--no-heads", "--coast", "1"])


def test_a_bad_text_plates_setting_is_refused_naming_it(tmp_path: Path) -> None:
    from stream.core.errors import UserError

    with pytest.raises(UserError, match=r"detection\.text_plates: Input should be a valid boolean"):
        parse_config({"detection": {"text_plates": "maybe"}})
    res = run_cli("redact", ASTRONAUT, "-o", tmp_path / "o.jpg", "--text-plates", "maybe")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "argument --text-plates: invalid choice: 'maybe' (choose from 'on', 'off')" in res.stderr
    assert not (tmp_path / "o.jpg").exists()


def test_file_batch_default_follows_the_preset_where_there_are_lanes() -> None:
    from stream.detect.presets import file_batch

    assert file_batch("fast", 2) == 4 and file_batch("accurate", 2) == 1
    assert file_batch("fast", 1) == 1, "one lane (a GPU, or --lanes 1): batches are for the user to size"
