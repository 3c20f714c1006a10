"""The synthetic plate generator (benchmarks/plate_synth.py): scorer format, geometry, determinism, variety.

Only tests/fixtures/bus_360.jpg is used as a photo, so nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BUS = "tests/fixtures/bus_360.jpg"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plate_synth", ROOT / "benchmarks" / "plate_synth.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["plate_synth"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


ps = _load()


@pytest.fixture(scope="module")
def bus_pixels() -> dict[str, np.ndarray]:
    return ps.load_sources([ps.FIXTURE_BUS], log=lambda _: None)


def _generate(out: Path, seed: int = 3, n: int = 6) -> dict:
    rc = ps.main([str(out), "--images", str(n), "--seed", str(seed), "--sources", str(ROOT / BUS),
                  "--cache-dir", str(out.parent / "cache")])
    assert rc == 0
    return json.loads((out / "gt.json").read_text())


def test_images_are_in_the_scorer_format_with_boxes_on_the_quads(tmp_path: Path) -> None:
    gt = _generate(tmp_path / "set")
    assert len(gt["images"]) == 6
    for im in gt["images"]:
        img = cv2.imread(str(tmp_path / "set" / im["file"]))
        assert img.shape[:2] == (im["height"], im["width"])
        assert "ultralytics" in im["license"] or "AGPL" in im["license"]
        assert im["source"] and im["vehicle_class"] == "bus"
        (obj,) = im["objects"]
        assert obj["label"] == "plate" and obj["provenance"] == "synthetic" and not obj.get("ignore")
        assert {"format", "yaw_deg", "roll_deg", "motion_blur_px", "night"} <= obj.keys()
        x1, y1, x2, y2 = obj["box"]
        assert 0 <= x1 < x2 <= im["width"] and 0 <= y1 < y2 <= im["height"]
        q = np.array(obj["quad"])
        assert q.shape == (4, 2)
        assert [q[:, 0].min(), q[:, 1].min(), q[:, 0].max(), q[:, 1].max()] == pytest.approx(obj["box"])
        vx1, vy1, vx2, vy2 = im["vehicle_box"]  # the plate sits on the vehicle's lower half
        assert vx1 - 2 <= (x1 + x2) / 2 <= vx2 + 2 and (vy1 + vy2) / 2 <= (y1 + y2) / 2 <= vy2


def test_same_seed_same_set_other_seed_other_set(tmp_path: Path) -> None:
    a = _generate(tmp_path / "a")
    b = _generate(tmp_path / "b")
    assert a == b
    for im in a["images"]:
        assert (tmp_path / "a" / im["file"]).read_bytes() == (tmp_path / "b" / im["file"]).read_bytes()
    c = _generate(tmp_path / "c", seed=4)
    assert [im["objects"] for im in c["images"]] != [im["objects"] for im in a["images"]]


def test_the_plate_is_drawn_where_its_box_is(tmp_path: Path, bus_pixels: dict[str, np.ndarray]) -> None:
    gt = _generate(tmp_path / "set")
    scenes = ps.plan_scenes(6, 3, [ps.FIXTURE_BUS])
    for im, scene in zip(gt["images"], scenes, strict=True):
        assert scene.box == pytest.approx(im["objects"][0]["box"])
        written = cv2.imread(str(tmp_path / "set" / im["file"])).astype(np.float32)
        bare = ps.render_scene(scene, bus_pixels, plate=False).astype(np.float32)
        diff = np.abs(written - bare).mean(axis=2)
        x1, y1, x2, y2 = (round(v) for v in im["objects"][0]["box"])
        inside = diff[y1:y2, x1:x2].mean()
        elsewhere = np.median(diff)  # JPEG's loss only
        assert inside > 12 and inside > 4 * elsewhere, (im["file"], inside, elsewhere)


def test_plans_vary_format_size_pose_and_damage() -> None:
    scenes = ps.plan_scenes(48, 1)  # every registry source, planned from their metadata: no pixels
    heights = [s.box[3] - s.box[1] for s in scenes]
    assert {ps.bucket_of(h) for h in heights} == {"<16", "16-32", "32-64", ">=64"}
    assert min(heights) >= 4 and max(heights) <= 90
    assert {s.plate.format for s in scenes} == {"uk_front", "uk_rear", "eu", "us", "square"}
    assert len({s.source for s in scenes}) == len(ps.SOURCES)
    assert any(s.night for s in scenes) and any(s.motion_px for s in scenes)
    assert any(s.blur_sigma for s in scenes) and any(s.noise_sigma for s in scenes)
    yaws = [s.plate.yaw for s in scenes]
    assert min(yaws) < -20 and max(yaws) > 20 and all(abs(y) <= 45 for y in yaws)
    assert all(abs(s.plate.roll) <= 15 for s in scenes)
    assert all(3 <= s.motion_px <= 15 for s in scenes if s.motion_px)
    assert all(40 <= s.jpeg_quality <= 95 for s in scenes)
    vehicle_h = [s.vehicle_box[3] - s.vehicle_box[1] for s in scenes]
    assert min(vehicle_h) >= 40 - 1 and max(vehicle_h) <= 600 + 1
    assert len(Counter(s.canvas for s in scenes)) == len(ps.CANVASES)
    bus_only = ps.plan_scenes(16, 1, [ps.FIXTURE_BUS])  # a bus's plate is small: fewer buckets, still 2
    assert len({ps.bucket_of(s.box[3] - s.box[1]) for s in bus_only}) >= 2


def test_clip_labels_every_second_frame_in_the_video_format(tmp_path: Path,
                                                            bus_pixels: dict[str, np.ndarray]) -> None:
    gt = ps.write_videos(tmp_path, 1, seed=9, sources=[ps.FIXTURE_BUS], pixels=bus_pixels)  # 640x360
    assert json.loads((tmp_path / "gt.json").read_text()) == gt
    (v,) = gt["videos"]
    assert v["fps"] == 25.0 and 50 <= v["num_frames"] <= 75 and (v["width"], v["height"]) in ps.CLIP_SIZES
    assert sorted(int(k) for k in v["frames"]) == list(range(0, v["num_frames"], 2))
    cap = cv2.VideoCapture(str(tmp_path / v["file"]))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == v["num_frames"]
    seen = 0
    for objs in v["frames"].values():
        for o in objs:
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= v["width"] and 0 <= y1 < y2 <= v["height"]
            q = np.array(o["quad"])
            inside = q[:, 0].min() >= 0 and q[:, 1].min() >= 0 and q[:, 0].max() <= v["width"] \
                and q[:, 1].max() <= v["height"]
            assert bool(o.get("ignore")) == (not inside)
            seen += not o.get("ignore")
    assert seen > 0


def test_unknown_source_and_failed_download_say_what_to_do(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ps.PlateSynthError, match="ultralytics-bus"):
        ps.resolve_sources(["no-such-photo"])
    monkeypatch.setattr(ps, "_run", lambda cmd, cwd: "no network")
    with pytest.raises(ps.PlateSynthError, match=r"pip download --no-deps .*ultralytics==8\.4\.190"):
        ps.fetch_sources([ps.SOURCES[0]], tmp_path, log=lambda _: None)
    deb = next(s for s in ps.SOURCES if s.registry == "deb")
    with pytest.raises(ps.PlateSynthError, match=r"apt-get download opencv-doc=4\.6\.0"):
        ps.fetch_sources([deb], tmp_path, log=lambda _: None)
