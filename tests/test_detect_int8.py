"""The int8 CPU variants of the plate and person models: chosen only where they can run (ONNX
Runtime on the CPU), switched off by `detection.int8: off` / `--int8 off`, and finding what the
fp32 models find on the fixture photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ASTRONAUT_PERSON, BUS, BUS_VEHICLE, ROOT, best_iou, finds, iou, read_bgr, uk_plate

from stream.config import DetectionConfig
from stream.detect import base
from stream.detect.ensemble import DetectorConfig, FrameDetector
from stream.detect.models import int8_variant, manifest
from stream.detect.presets import detector_config
from stream.detect.yolo import PersonYolo, PlateYolo

CPU = ("cpu",)


@pytest.fixture(scope="module")
def plates() -> dict[bool, PlateYolo]:
    return {q: PlateYolo(threshold=0.25, providers=CPU, int8=q) for q in (False, True)}


@pytest.fixture(scope="module")
def people() -> dict[bool, PersonYolo]:
    return {q: PersonYolo(threshold=0.3, providers=CPU, int8=q, vehicles=True, input_size=512, min_input=512)
            for q in (False, True)}


def test_int8_variants_are_declared_for_the_two_yolo_models_only() -> None:
    assert int8_variant("plate") == "plate_int8" and int8_variant("person") == "person_int8"
    assert int8_variant("yunet") is None and int8_variant("centerface") is None
    for name in ("plate_int8", "person_int8"):
        spec = manifest()[name]
        parent = manifest()[spec.source["from"]]
        assert spec.source["kind"] == "export" and (ROOT / spec.source["script"]).is_file()
        assert spec.task == parent.task and spec.license == parent.license
        assert spec.file != parent.file and spec.sha256 != parent.sha256


def test_int8_weights_are_loaded_on_the_cpu_only_when_asked(plates: dict[bool, PlateYolo]) -> None:
    assert plates[True].int8 and plates[True].weights == "plate_int8"
    assert plates[True].version.startswith("plate_int8@")
    assert not plates[False].int8 and plates[False].version.startswith("plate@")
    ops = {n.op_type for n in onnx.load(str(plates[True]._path), load_external_data=False).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert not PlateYolo(providers=CPU).int8, "a bare detector defaults to fp32"


def test_a_model_without_an_int8_variant_loads_its_fp32_weights() -> None:
    from stream.detect.yunet import YuNet

    face = YuNet(providers=CPU, int8=True)
    assert not face.int8 and face.weights == "yunet"


class _Loaded(Exception):
    """Raised by the stand-in backend maker: which graph a detector would have run, unbuilt."""


def test_gpu_paths_keep_the_fp32_graphs_mocked_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: ``runs_on_gpu`` is made to say yes; the detector must then load fp32 weights."""
    monkeypatch.setattr(base, "runs_on_gpu", lambda backend, providers: True)

    def make_backend(model: onnx.ModelProto, *a: object, **k: object) -> None:
        raise _Loaded(model)

    monkeypatch.setattr(base, "make_backend", make_backend)
    with pytest.raises(_Loaded) as built:
        PlateYolo(providers=("cuda", "cpu"), int8=True)
    ops = {n.op_type for n in built.value.args[0].graph.node}
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    det = PersonYolo(providers=("tensorrt", "cuda", "cpu"), int8=True)  # per-shape: nothing built yet
    assert not det.int8 and det.weights == "person"


def test_the_torch_backend_keeps_the_fp32_graphs() -> None:
    """onnx2torch cannot run QDQ graphs: the torch backend, even on the CPU, gets fp32 weights."""
    det = PersonYolo(providers=CPU, backend="torch", int8=True)  # per-shape: no backend built yet
    assert not det.int8 and det.weights == "person"


@pytest.mark.parametrize(("setting", "expected"), [("auto", True), ("off", False)])
def test_detection_int8_setting_reaches_the_detector(setting: str, expected: bool) -> None:
    cfg = DetectionConfig(preset="fast", int8=setting, providers=["cpu"]).detector_settings()
    assert cfg.int8 is expected
    assert detector_config("fast", int8=setting).int8 is expected
    det = FrameDetector(cfg)
    assert det.plate_model is not None and det.person_model is not None
    assert det.plate_model.int8 is expected and det.person_model.int8 is expected
    assert DetectorConfig().int8, "int8 on the CPU is the detection stage's default"


def test_int8_is_a_choice_of_auto_or_off() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="int8"):
        DetectionConfig(int8="on")


@pytest.mark.parametrize("where", [(115, 282), (265, 166), (410, 290)])
def test_int8_plate_model_finds_the_plate_fp32_finds(plates: dict[bool, PlateYolo], chelsea: np.ndarray,
                                                     where: tuple[int, int]) -> None:
    """A 120x28 plate on the cat photo in a 16:9 frame: both models find it, as tightly, with
    about the same score (over a grid of 56 places the int8 score was fp32's +0.02 +- 0.07)."""
    frame = np.full((360, 640, 3), 90, np.uint8)
    frame[30:330, 95:546] = chelsea
    x, y = where
    frame[y:y + 28, x:x + 120] = uk_plate()
    target = (x, y, x + 120, y + 28)
    found = {q: plates[q]([frame])[0] for q in plates}
    for q, d in found.items():
        assert finds(d.boxes, target), (q, d)
    fit = {q: best_iou(d.boxes, target) for q, d in found.items()}
    assert fit[True] > fit[False] - 0.1, fit
    assert abs(float(found[True].scores.max()) - float(found[False].scores.max())) < 0.2
    assert len(plates[True]([chelsea])[0]) == 0, "no plate on the plain cat photo"


def test_int8_person_model_finds_people_and_vehicles(people: dict[bool, PersonYolo], astronaut: np.ndarray,
                                                     chelsea: np.ndarray) -> None:
    """The vehicle classes, which no calibration frame shows, still score: their logits stay float."""
    bus = read_bgr(BUS)
    fp32, int8 = people[False]([bus])[0], people[True]([bus])[0]
    for d in (fp32, int8):
        cars = d.with_label("vehicle")
        assert len(cars) == 1 and iou(cars.boxes[0], BUS_VEHICLE) > 0.8, d
    assert abs(len(int8.with_label("person")) - len(fp32.with_label("person"))) <= 1
    assert len(int8.with_label("person")) >= 3
    assert best_iou(people[True]([astronaut])[0].with_label("person").boxes, ASTRONAUT_PERSON) > 0.5
    assert len(people[True]([chelsea])[0]) == 0


def test_quantisation_script_names_the_manifest_files(tmp_path: Path) -> None:
    """The script that rebuilds the variants writes them under the names the manifest expects."""
    import importlib.util

    path = ROOT / "deploy/models/quantize_int8.py"
    mod_spec = importlib.util.spec_from_file_location("quantize_int8", path)
    assert mod_spec is not None and mod_spec.loader is not None
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    assert set(mod.MODELS) == {"plate", "person"}
    model = onnx.load(str(base.model_path("plate")), load_external_data=False)
    kept = mod.float_nodes(model)
    assert set(mod.FLOAT_HEAD) <= set(kept)
    assert all(n.startswith("/model.22/") for n in kept), "only the detection layer stays float"
    assert not any(n.startswith(("/model.22/cv2.0/cv2.0.0", "/model.22/cv3.0/cv3.0.1")) for n in kept)


@pytest.mark.parametrize(("preset", "plate", "person"), [("fast", True, True), ("accurate", False, False)])
def test_int8_only_up_to_the_input_size_it_was_checked_at(preset: str, plate: bool, person: bool) -> None:
    """The variants were calibrated and scored at 640 (fast: plates 640, persons 512); at the
    accurate preset's 960 the plate variant lost 2 points of recall, so 960 runs fp32."""
    det = FrameDetector(detector_config(preset, providers=CPU))
    assert det.plate_model is not None and det.person_model is not None
    assert (det.plate_model.int8, det.person_model.int8) == (plate, person)
    assert int8_variant("plate", 640) == "plate_int8" and int8_variant("plate", 960) is None
    assert FrameDetector(detector_config("accurate", providers=CPU, input_size=640)).plate_model.int8
