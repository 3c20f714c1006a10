"""`stream-redact redact` on an image, end to end in a subprocess: output file and masks JSON contract."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import (
    ASTRONAUT,
    ASTRONAUT_FACE,
    CHELSEA,
    check_masks_contract,
    contains,
    laplacian_var,
    read_bgr,
    run_cli,
    uk_plate,
)


@pytest.mark.slow
def test_image_default_models_output_and_masks_json(tmp_path: Path) -> None:
    out, masks = tmp_path / "out.jpg", tmp_path / "masks.json"
    res = run_cli("redact", ASTRONAUT, "-o", out, "--masks-json", masks, "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    src, dst = read_bgr(ASTRONAUT), read_bgr(out)
    assert dst.shape == src.shape
    doc = json.loads(masks.read_text())
    check_masks_contract(doc, 256, 256, frames=1)
    faces = [r for r in doc["frames"][0]["regions"] if r["label"] == "face"]
    face = max(faces, key=lambda r: r["score"])
    assert face["shape"] == "ellipse" and face["score"] > 0.5
    assert contains(face["box"], ASTRONAUT_FACE, tol=3), "the painted region must cover the whole face"
    assert laplacian_var(dst, ASTRONAUT_FACE, 6) < 0.3 * laplacian_var(src, ASTRONAUT_FACE, 6)
    # far from every region the picture is the input (up to JPEG re-encoding)
    keep = np.ones(src.shape[:2], bool)
    for r in doc["frames"][0]["regions"]:
        x1, y1, x2, y2 = r["box"]
        keep[max(0, y1 - 8):y2 + 8, max(0, x1 - 8):x2 + 8] = False
    assert np.abs(dst.astype(int) - src.astype(int))[keep].mean() < 3


@pytest.mark.parametrize(("style", "suffix"), [("blur", ".png"), ("pixelate", ".jpg"), ("solid", ".jpeg")])
def test_image_styles_obscure_the_face(tmp_path: Path, style: str, suffix: str) -> None:
    out = tmp_path / f"out{suffix}"
    res = run_cli("redact", ASTRONAUT, "-o", out, "--style", style, "--no-plates", "--no-heads")
    assert res.returncode == 0, res.stderr
    src, dst = read_bgr(ASTRONAUT), read_bgr(out)
    assert dst.shape == src.shape
    x1, y1, x2, y2 = ASTRONAUT_FACE
    diff = np.abs(dst[y1:y2, x1:x2].astype(int) - src[y1:y2, x1:x2].astype(int)).mean()
    assert diff > 8, f"{style}: face barely changed (mean abs diff {diff:.1f})"
    if style == "solid":
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        assert np.all(dst[cy - 5:cy + 5, cx - 5:cx + 5] < 12)  # black, up to JPEG ringing


def test_image_without_any_region_has_one_empty_frame(tmp_path: Path) -> None:
    out, masks = tmp_path / "cat.png", tmp_path / "cat.json"
    # without the text pass, which reads the dark spots of the cat's whisker pad as a line of text
    # (a false mask it makes on this photo: docs/redaction-quality.md, "Plates: the text pass")
    res = run_cli("redact", CHELSEA, "-o", out, "--masks-json", masks, "--no-heads", "--text-plates", "off")
    assert res.returncode == 0, res.stderr
    doc = json.loads(masks.read_text())
    check_masks_contract(doc, 451, 300, frames=1)
    assert doc["frames"][0]["regions"] == []
    assert np.abs(read_bgr(out).astype(int) - read_bgr(CHELSEA).astype(int)).mean() < 2


@pytest.mark.slow
def test_image_plate_is_masked_as_rect(tmp_path: Path) -> None:
    src_path, out, masks = tmp_path / "car.png", tmp_path / "car_out.png", tmp_path / "car.json"
    img = read_bgr(CHELSEA)
    plate_box = (300, 250, 420, 278)
    img[250:278, 300:420] = uk_plate()
    cv2.imwrite(str(src_path), img)
    res = run_cli("redact", src_path, "-o", out, "--masks-json", masks, "--no-heads", "--style", "solid")
    assert res.returncode == 0, res.stderr
    doc = json.loads(masks.read_text())
    check_masks_contract(doc, 451, 300, frames=1)
    plates = [r for r in doc["frames"][0]["regions"] if r["label"] == "plate"]
    assert len(plates) == 1 and plates[0]["shape"] == "rect"
    assert contains(plates[0]["box"], plate_box, tol=2)
    x1, y1, x2, y2 = plates[0]["box"]
    assert np.all(read_bgr(out)[y1:y2, x1:x2] == 0)


def test_face_scale_option_enlarges_the_region(tmp_path: Path) -> None:
    boxes = {}
    for scale in ("1", "2"):
        masks = tmp_path / f"m{scale}.json"
        res = run_cli("redact", ASTRONAUT, "-o", tmp_path / f"o{scale}.png", "--masks-json", masks,
                      "--no-plates", "--no-heads", "--face-scale", scale)
        assert res.returncode == 0, res.stderr
        (r,) = json.loads(masks.read_text())["frames"][0]["regions"]
        boxes[scale] = r["box"]
    w1, w2 = boxes["1"][2] - boxes["1"][0], boxes["2"][2] - boxes["2"][0]
    assert 1.8 * w1 <= w2 <= 2.2 * w1 + 2
    assert contains(boxes["2"], boxes["1"])
