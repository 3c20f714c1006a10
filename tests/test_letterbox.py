"""letterbox_batch: the detection size of each frame, the shared canvas, and boxes mapped back."""

from __future__ import annotations

import numpy as np
import pytest

from stream.detect.letterbox import letterbox_batch


def frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# (h, w) of the frame, long_side, min_side, upscale -> long side it is detected at
MIN_SIDE_CASES = [
    ((256, 256), 960, 640, True, 640),      # small frame: raised to min_side, not to long_side
    ((300, 451), 960, 640, True, 640),
    ((480, 800), 960, 640, True, 800),      # inside [min_side, long_side]: its own size
    ((720, 960), 960, 640, True, 960),      # exactly long_side
    ((640, 640), 960, 640, True, 640),      # exactly min_side
    ((720, 1280), 960, 640, True, 960),     # large frame: lowered to long_side
    ((2160, 3840), 960, 640, True, 960),
    ((1280, 720), 960, 640, True, 960),     # portrait: the long side is the height
    ((800, 480), 960, 640, True, 800),
    ((200, 120), 960, 640, True, 640),
    ((256, 256), 640, 640, True, 640),      # min_side == long_side: always that size
    ((1080, 1920), 640, 640, True, 640),
    ((256, 256), 640, 1000, True, 640),     # min_side above long_side: long_side wins
    ((256, 256), 960, 320, True, 320),
    ((256, 256), 960, None, True, 960),     # no min_side: always long_side
    ((1080, 1920), 960, None, True, 960),
    ((256, 256), 960, 640, False, 256),     # upscale=False: never enlarged, even to min_side
    ((720, 1280), 960, 640, False, 960),
]


@pytest.mark.parametrize(("hw", "long_side", "min_side", "upscale", "target"), MIN_SIDE_CASES,
                         ids=[f"{h}x{w}-long{ls}-min{ms}-{'up' if up else 'noup'}"
                              for (h, w), ls, ms, up, _ in MIN_SIDE_CASES])
def test_target_long_side_is_clamped_to_min_side_and_long_side(
        hw: tuple[int, int], long_side: int, min_side: int | None, upscale: bool, target: int) -> None:
    h, w = hw
    batch, (place,) = letterbox_batch([frame(h, w)], long_side, min_side=min_side, upscale=upscale)
    assert place.scale == pytest.approx(target / max(h, w))
    rw, rh = round(w * place.scale), round(h * place.scale)
    assert max(rw, rh) == target
    # the canvas is the resized frame rounded up to the stride, never more
    assert batch.shape == (1, -(-rh // 32) * 32, -(-rw // 32) * 32, 3)
    assert batch.dtype == np.uint8
    assert (place.dx, place.dy) == (0, 0)


def test_mixed_batch_each_frame_at_its_own_size_one_canvas() -> None:
    small, hd, tall = frame(256, 256, 1), frame(1080, 1920, 2), frame(900, 500, 3)
    batch, places = letterbox_batch([small, hd, tall], 960, pad=114, min_side=640)
    assert [p.scale for p in places] == pytest.approx([640 / 256, 960 / 1920, 900 / 900])
    # 640x640, 960x540 and 500x900 share one canvas holding the largest of each side
    assert batch.shape == (3, 928, 960, 3)
    # each frame sits top-left, the rest is padding
    assert np.all(batch[0, 640:] == 114) and np.all(batch[0, :, 640:] == 114)
    assert np.all(batch[1, 540:] == 114)
    assert np.all(batch[2, :, 500:] == 114) and np.all(batch[2, 900:] == 114)
    np.testing.assert_array_equal(batch[2, :900, :500], tall)  # scale 1: copied, not resampled


@pytest.mark.parametrize("min_side", [None, 640])
def test_boxes_map_back_to_source_pixels(min_side: int | None) -> None:
    images = [frame(256, 256), frame(1080, 1920), frame(480, 800)]
    src = np.array([[10, 20, 110, 220]], np.float32)
    _, places = letterbox_batch(images, 960, min_side=min_side)
    for p in places:
        on_canvas = src * p.scale
        np.testing.assert_allclose(p.to_source(on_canvas), src, rtol=1e-5)
