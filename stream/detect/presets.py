"""Named detector settings (``accurate``, ``fast``) and the one place options become a DetectorConfig.

The file command, the live pipeline and the benchmarks all reach it through one conversion
(``stream.config.DetectionConfig.detector_settings``), so a preset means the same models, sizes and
schedules wherever it is named.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stream.detect.crops import CropConfig
from stream.detect.ensemble import DetectorConfig, ModelConfig
from stream.detect.regions import GateConfig
from stream.detect.relook import RelookConfig

VEHICLE_PLATES_PX = 200.0
"""vehicles up to this tall get a plate mask when no plate is found on them (both presets; 0: off).
The crop pass searches them first; it does not replace the mask: on the moving-camera development
clips, with the crop pass and masks only up to 120 px, 14 of 268 plates under 16 px were lost
(motion-blurred plates on buses and vans 120-200 px tall, which the plate model misses at any crop
scale), while up to 200 px the crop pass raised recall from 0.930 to 0.957 (docs/redaction-quality.md)"""

PRESETS: dict[str, dict[str, object]] = {
    # the text pass (plates as text lines) costs about 70 ms a frame on 2 CPU cores, about as much
    # as the plate model at 960: on in the file command's preset, off in the live one
    "accurate": {"face_model": "centerface", "input_size": 960, "plate_size": 960, "person_size": 960,
                 "plate_every": 1, "person_every": 1, "text_plates": True},
    # persons at 512: people and vehicles are the largest things looked for, and no development
    # set scored lower than at 640 (480 and 448 found fewer CCTV heads); plates keep 640: at 512
    # moving plates fell from 0.971 to 0.880 recall (docs/redaction-quality.md, "step by step")
    "fast": {"face_model": "yunet", "input_size": 640, "plate_size": 640, "person_size": 512,
             "plate_every": 3, "person_every": 3, "text_plates": False},
}
FILE_BATCH = {"accurate": 1, "fast": 4}
"""frames per detector call in the file command on a CPU with lanes (``redact --batch``'s default).
`fast` runs only its face model on two frames of three, and a batch of 4 lets the lanes split them:
47.8 against 37.7 frames/s at 640x360 on 2 cores. `accurate` already keeps every lane busy with its
four models on each frame, and batching it only delays the first frames (5.2 against 5.5)
(benchmarks/README.md, "CPU lanes")"""
FACE_THRESHOLDS = {"centerface": 0.35, "yunet": 0.5}
TEXT_THRESHOLD = 0.5
"""a text line's mean text probability (PaddleOCR's box threshold)"""


def file_batch(preset: str, lanes: int) -> int:
    """The file command's batch where ``--batch`` is not given: :data:`FILE_BATCH` with CPU lanes,
    else 1 (a GPU's batch is for its user to size)."""
    return FILE_BATCH[preset] if lanes > 1 else 1


def face_models(preset: str, face_model: str | None = None) -> list[str]:
    """The face detectors that run: the one named (``both``: CenterFace and YuNet merged), else the
    preset's. Detectors and event model info read it here, so events name the models that ran."""
    face = face_model or str(PRESETS[preset]["face_model"])
    return ["centerface", "yunet"] if face == "both" else [face]


def text_plates_on(preset: str, text_plates: bool | None = None, plates: bool = True) -> bool:
    """Whether the text pass runs: asked for explicitly, else the preset's choice; never without
    plates. The detector and the events' model info read it here, so events name what ran."""
    return plates and (bool(PRESETS[preset]["text_plates"]) if text_plates is None else text_plates)


def detector_config(preset: str = "accurate", *, face_model: str | None = None,
                    face_threshold: float | None = None, plate_threshold: float | None = None,
                    input_size: int | None = None, plate_every: int | None = None,
                    person_every: int | None = None, plates: bool = True, heads: bool = True,
                    vehicle_plates: float | None = None, plate_crops: bool = True,
                    crop_sizes: Sequence[int] | None = None, text_plates: bool | None = None,
                    plate_relook: bool = True,
                    int8: bool | str = True,
                    providers: Sequence[str] = ("cuda", "cpu"), threads: int = 0, lanes: int = 0,
                    model_dir: Path | None = None, classes: Sequence[str] = (), regions: bool = False,
                    **runtime: Any) -> DetectorConfig:
    """A preset with the options given explicitly taking precedence over it.

    ``vehicle_plates`` is the tallest vehicle that gets a middle mask where neither the full-frame
    pass nor the crop pass (``plate_crops``, on vehicle crops) found a plate on it (0: none).
    ``plate_relook`` looks again, on an enlarged crop, for plates a stream's frames showed in the
    last frames where a due frame's full-frame pass did not find them (:mod:`stream.detect.relook`).
    ``text_plates`` (None: the preset's) adds the text detector's lines as plates
    (:mod:`stream.detect.text`), at the plate model's size and cadence.
    ``input_size`` given explicitly sets every model's size. ``int8`` (``auto``/True or
    ``off``/False) lets CPU sessions load the int8 variants of the plate and person models where
    their input is within what the variant was checked at (640: the fast preset's sizes).
    ``threads`` and ``lanes`` set how CPU models share the cores (:mod:`stream.detect.lanes`).
    ``regions`` gates CPU models by change (:mod:`stream.detect.regions`).
    ``classes`` adds ``screen`` and/or ``person`` (whole bodies) boxes to what is reported; they come
    from the person model, which then runs even without ``heads`` (head masks stay off).
    ``runtime`` sets where models run (backend, device_id, fp16, cache_dir, buckets,
    device_preprocess, static_graphs, device_decode, cuda_graphs): fields of
    :class:`DetectorConfig` that do not change what is detected.
    """
    p = PRESETS[preset]
    crops = plate_crops and plates and heads  # the vehicles come from the person model
    vp = VEHICLE_PLATES_PX if vehicle_plates is None else vehicle_plates
    size = input_size or int(p["input_size"])  # type: ignore[call-overload]
    plate_size = input_size or int(p["plate_size"])  # type: ignore[call-overload]
    person_size = input_size or int(p["person_size"])  # type: ignore[call-overload]
    use_int8 = int8 not in (False, "off")
    cfg = DetectorConfig(providers=tuple(providers), threads=threads, lanes=lanes, model_dir=model_dir,
                         int8=use_int8,
                         **runtime)
    cfg.faces = {n: ModelConfig(threshold=face_threshold or FACE_THRESHOLDS[n], input_size=size,
                                min_input=min(640, size)) for n in face_models(preset, face_model)}
    if not plates:
        cfg.plate = None
    elif cfg.plate is not None:
        cfg.plate.threshold = plate_threshold or cfg.plate.threshold
        cfg.plate.input_size = plate_size
        cfg.plate.every = plate_every or int(p["plate_every"])  # type: ignore[call-overload]
    cfg.plate_max_vehicle_px = vp or None
    if cfg.plate is not None and text_plates_on(preset, text_plates, plates):
        cfg.text_plates = ModelConfig(threshold=TEXT_THRESHOLD, input_size=plate_size, every=cfg.plate.every)
    if crops and cfg.plate is not None:
        cfg.plate_crops = CropConfig(threshold=max(CropConfig.threshold, plate_threshold or 0.0),
                                     **({"sizes": tuple(crop_sizes)} if crop_sizes else {}))
    if plate_relook and cfg.plate is not None:
        cfg.plate_relook = RelookConfig(threshold=max(RelookConfig.threshold, plate_threshold or 0.0))
    cfg.screens, cfg.bodies = "screen" in classes, "person" in classes
    cfg.regions = GateConfig() if regions else None
    if not heads and not classes:
        cfg.person_heads = None
    elif cfg.person_heads is not None:
        if not heads:  # the model runs for the classes asked for; no head masks
            cfg.head_max_person_px = 0.0
        cfg.person_heads.input_size, cfg.person_heads.min_input = person_size, min(640, person_size)
        cfg.person_heads.every = person_every or int(p["person_every"])  # type: ignore[call-overload]
    return cfg
