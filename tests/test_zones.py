"""Privacy zones: polygons checked like every other input, painted on every published frame of a real
stream (also while the detector fails), and changed at run time through the API."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import make_clip, run_cli
from live_helpers import NoFaces, ServiceThread, counter, wait_for

from stream.config import parse_config
from stream.config.privacy import ZoneConfig, load_zones, zone_set
from stream.core.detections import Detections
from stream.core.errors import UserError
from stream.core.yuv import I420, as_bgr, yuv_color
from stream.core.zones import FILL_BGR, Zone, ZoneSet, polygon_problem
from stream.live.pipeline import Pipeline
from stream.sim.server import RtspServer, gst_rtsp_available

TOKEN = "zones-test-token-0123456789"
SQUARE = [[0.1, 0.1], [0.4, 0.1], [0.4, 0.5], [0.1, 0.5]]


@pytest.mark.parametrize(("points", "problem"), [
    ([[0, 0], [1, 1]], "at least 3 points"),
    ([[0, 0], [1.2, 0], [1, 1]], "outside the picture"),
    ([[0, 0], [1, 0], [-0.01, 1]], "outside the picture"),
    ([[0, 0], [1, 1], [1, 0], [0, 1]], "crosses itself"),
    ([[0.1, 0.1], [0.5, 0.5], [0.9, 0.1], [0.9, 0.9], [0.5, 0.4], [0.1, 0.9]], "crosses itself"),
    ([[0, 0], [0.5, 0.5], [1, 1]], "no area"),
    ([[0, 0], [0, 0], [1, 1], [1, 0]], "the same"),
    ([[0, 0], [1, 0], [1]], "give each point as [x, y]"),
    ([[i / 100, (i % 2) / 2] for i in range(65)], "at most 64 points"),
])
def test_bad_polygons_are_refused_with_the_fix(points: list, problem: str) -> None:
    why = polygon_problem(points)
    assert why is not None and problem in why


@pytest.mark.parametrize("points", [
    SQUARE,
    [[0, 0], [1, 0], [1, 1], [0, 1]],
    [[0.2, 0.2], [0.8, 0.2], [0.5, 0.5], [0.8, 0.8], [0.2, 0.8]],  # concave
])
def test_good_polygons_pass(points: list) -> None:
    assert polygon_problem(points) is None


def test_config_errors_name_the_zone_and_the_problem() -> None:
    with pytest.raises(UserError, match=r"streams\[0\]\.zones\[1\]\.points: .*crosses itself"):
        parse_config({"streams": [{"id": "a", "source": {"type": "whip"}, "zones": [
            {"points": SQUARE}, {"points": [[0, 0], [1, 1], [1, 0], [0, 1]]}]}]})
    with pytest.raises(UserError, match=r"zones\[0\]\.kind"):
        parse_config({"streams": [{"id": "a", "source": {"type": "whip"}, "zones": [
            {"kind": "blur", "points": SQUARE}]}]})


def _inside(points: list, w: int, h: int) -> np.ndarray:
    """Pixels whose centre lies inside the polygon (even-odd rule), computed independently of cv2."""
    ys, xs = np.mgrid[0:h, 0:w]
    px, py = (xs + 0.5) / w, (ys + 0.5) / h
    inside = np.zeros((h, w), bool)
    n = len(points)
    for i in range(n):
        (x1, y1), (x2, y2) = points[i], points[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = ((y1 > py) != (y2 > py)) & (px < (x2 - x1) * (py - y1) / (y2 - y1) + x1)
        inside ^= crosses
    return inside


@pytest.mark.parametrize("points", [SQUARE, [[0.2, 0.2], [0.8, 0.2], [0.5, 0.5], [0.8, 0.8], [0.2, 0.8]],
                                    [[0.05, 0.9], [0.5, 0.03], [0.97, 0.6]]])
@pytest.mark.parametrize(("w", "h"), [(320, 240), (641, 359)])
def test_a_mask_zone_covers_every_pixel_inside_it(points: list, w: int, h: int) -> None:
    zones = ZoneSet((Zone("mask", tuple(map(tuple, points))),))
    painted = zones.mask(w, h)
    inside = _inside(points, w, h)
    assert not (inside & ~painted).any(), "a pixel inside the zone is not painted"
    # and not much more than the zone: the outline adds at most about one pixel around it
    assert painted.sum() <= inside.sum() + 2.5 * (w + h) * 2


def test_rasters_kept_for_a_few_sizes_only() -> None:
    """A sender that changes resolution all the time must not grow memory without bound."""
    from stream.core.zones import MAX_RASTERS

    zones = ZoneSet((Zone("mask", tuple(map(tuple, SQUARE))),))
    for w in range(100, 140, 2):
        zones.paint(np.zeros((80, w, 3), np.uint8))
    assert len(zones._rasters) == MAX_RASTERS
    frame = np.zeros((80, 100, 3), np.uint8)  # an evicted size is rasterised again, the same
    zones.paint(frame)
    assert (frame[zones.mask(100, 80)] == FILL_BGR).all()


def test_an_only_zone_paints_everything_outside_it() -> None:
    zones = ZoneSet((Zone("only", tuple(map(tuple, SQUARE))),))
    painted = zones.mask(320, 240)
    inside = _inside(SQUARE, 320, 240)
    assert painted[~inside].all(), "a pixel outside the only-zone is visible"
    assert not painted[60:100, 60:100].any(), "the inside of the only-zone is painted"


def test_bgr_and_i420_are_painted_alike() -> None:
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 255, (240, 320, 3), np.uint8)
    yuv = I420.from_bgr(bgr)
    zones = zone_set([ZoneConfig(points=SQUARE), ZoneConfig(kind="mask", points=[[0.6, 0.6], [0.9, 0.6],
                                                                                   [0.9, 0.9]])])
    zones.paint(bgr)
    zones.paint(yuv)
    m = zones.mask(320, 240)
    assert (bgr[m] == FILL_BGR).all()
    y_fill = yuv_color(FILL_BGR)[0]
    assert (yuv.y[m] == y_fill).all()
    # the chroma of every painted pixel is the fill's too: no colour of what is hidden bleeds through
    u_fill = yuv_color(FILL_BGR)[1]
    assert (yuv.u[m[::2, ::2]] == u_fill).all()
    assert np.abs(as_bgr(yuv)[m].astype(int) - FILL_BGR).max() <= 2


def test_load_zones_file_errors(tmp_path: Path) -> None:
    good = tmp_path / "z.yaml"
    good.write_text("zones:\n  - kind: only\n    points: [[0, 0], [0.5, 0], [0.5, 1]]\n")
    assert load_zones(good).zones[0].kind == "only"
    bad = tmp_path / "bad.yaml"
    bad.write_text("- points: [[0, 0], [2, 0], [1, 1]]\n")
    with pytest.raises(UserError, match=r"\[0\]\.points: point 1 \[2, 0\] is outside the picture"):
        load_zones(bad)
    with pytest.raises(UserError, match="No such file"):
        load_zones(tmp_path / "missing.yaml")


def test_redact_cli_paints_zones_on_a_video(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "in.mp4", frames=6, width=320, height=240)
    zones = tmp_path / "zones.json"
    zones.write_text(json.dumps([{"kind": "mask", "points": SQUARE}]))
    out = tmp_path / "out.mp4"
    r = run_cli("redact", clip.path, "-o", out, "--zones", zones, "--preset", "fast", "--no-plates",
                "--providers", "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr
    import av
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    assert len(frames) == 6
    inner = _inside(SQUARE, 320, 240)
    inner[:, :] &= np.pad(np.ones((236, 316), bool), 2)  # codec ringing at the zone's edge
    for f in frames:
        assert np.abs(f[inner].astype(int) - FILL_BGR).max() <= 12


class Flaky(NoFaces):
    """Finds nothing, or raises while ``failing`` is set: a detector that goes down and comes back."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = threading.Event()

    def __call__(self, images: list, refs: Any = None) -> list[Detections]:
        if self.failing.is_set():
            raise RuntimeError("injected detector failure")
        return super().__call__(images, refs)


@pytest.mark.skipif(not gst_rtsp_available(), reason="GStreamer RTSP server not installed (see .ci/run)")
def test_zone_is_painted_on_every_frame_of_a_real_stream_also_while_the_detector_fails(
        tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "cam.mp4", frames=50, width=320, height=240)
    det = Flaky()
    published: list[tuple[bool, np.ndarray]] = []  # (zone region all fill, whole frame black)
    zone_px = zone_set([ZoneConfig(points=SQUARE)]).mask(320, 240)
    y_fill = yuv_color(FILL_BGR)[0]

    def check(frame: Any, image: Any, dets: Detections) -> None:
        y = image.y if isinstance(image, I420) else as_bgr(image)[..., 1]
        filled = bool((y[zone_px] == y_fill).all()) if isinstance(image, I420) else bool(
            (np.abs(image[zone_px].astype(int) - FILL_BGR) <= 1).all())
        published.append((filled, int(np.asarray(y).max()) <= 16))

    with RtspServer(cameras={"/cam": clip.path}) as server:
        cfg = parse_config({
            "streams": [{"id": "cam", "source": {"type": "rtsp", "url": server.url("/cam"),
                                                 "open_timeout_s": 3, "read_timeout_s": 3},
                         "zones": [{"points": SQUARE, "name": "neighbour's window"}]}],
            "detection": {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"]},
            "fail_closed": {"max_latency_ms": 300},
        })
        p = Pipeline(cfg, lambda: det)
        p.start()
        try:
            p.streams["cam"].on_redacted.append(check)
            wait_for(lambda: sum(1 for f, _ in published if f) >= 10, what="10 painted frames")
            det.failing.set()
            wait_for(lambda: counter(p.metrics, "frames_blanked", stream="cam", reason="detector_error") >= 5,
                     what="frames blanked while the detector fails")
            det.failing.clear()
            n = len(published)
            wait_for(lambda: sum(1 for f, _ in published[n:] if f) >= 10, what="painted frames again")
        finally:
            p.stop()
    assert all(filled or black for filled, black in published), "a published frame showed the zone"
    assert any(black for _, black in published) and sum(f for f, _ in published) >= 20


def _call(base: str, method: str, path: str, body: Any = None, token: str | None = TOKEN
          ) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("ZONES_TEST_TOKENS", TOKEN)
    clip = make_clip(tmp_path / "face.mp4", frames=30, width=320, height=240)
    cfg = parse_config({
        "streams": [{"id": "lobby", "source": {"type": "file", "path": str(clip.path), "loop": True}}],
        "detection": {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"]},
        "auth": {"tokens_env": "ZONES_TEST_TOKENS"},
        "http": {"port": 0},
    })
    det = NoFaces()
    svc = ServiceThread(cfg, lambda: det)
    yield svc
    svc.stop()


def test_zones_api_round_trip_and_frames_follow(service: ServiceThread) -> None:
    base = service.base
    assert _call(base, "GET", "/api/streams/lobby/zones") == (200, {"zones": []})
    status, body = _call(base, "PUT", "/api/streams/lobby/zones",
                         {"zones": [{"kind": "mask", "points": SQUARE, "name": "garden"}]})
    assert status == 200, body
    assert body["zones"][0]["name"] == "garden" and body["zones"][0]["points"] == SQUARE
    assert _call(base, "GET", "/api/streams/lobby/zones")[1] == body
    status, body = _call(base, "PUT", "/api/streams/lobby/zones", {"zones": []})
    assert (status, body) == (200, {"zones": []})
    # a stream added through the API brings its zones in its definition
    status, body = _call(base, "POST", "/api/streams", {"id": "door", "source": {"type": "whip"},
                                                        "zones": [{"kind": "only", "points": SQUARE}]})
    assert status == 201, body
    assert _call(base, "GET", "/api/streams/door/zones")[1]["zones"][0]["kind"] == "only"
    status, body = _call(base, "POST", "/api/streams", {"id": "door2", "source": {"type": "whip"},
                                                        "zones": [{"points": [[0, 0], [1, 0]]}]})
    assert status == 400 and "zones[0].points: a zone needs at least 3 points" in body["details"][0], body


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"zones": [{"points": [[0, 0], [1, 1], [1, 0], [0, 1]]}]}, 400, "zones[0].points: the polygon crosses"),
    ({"zones": [{"points": [[0, 0], [3, 0], [1, 1]]}]}, 400, "outside the picture"),
    ({"zones": [{"kind": "hide", "points": SQUARE}]}, 400, "zones[0].kind"),
    ({"zones": [{"points": SQUARE}] * 33}, 400, "at most 32 zones"),
    ({"zone": []}, 400, "zone: unknown key"),
    ([SQUARE], 400, "body must be a JSON object describing the zones"),
    (b"{", 400, "not valid JSON"),
])
def test_bad_zone_requests_get_400_and_change_nothing(service: ServiceThread, body: Any, status: int,
                                                       message: str) -> None:
    base = service.base
    assert _call(base, "PUT", "/api/streams/lobby/zones", {"zones": [{"points": SQUARE}]})[0] == 200
    got, answer = _call(base, "PUT", "/api/streams/lobby/zones", body)
    assert got == status and message in answer["error"], answer
    assert len(_call(base, "GET", "/api/streams/lobby/zones")[1]["zones"]) == 1


def test_zones_of_an_unknown_stream_and_without_a_token(service: ServiceThread) -> None:
    status, body = _call(service.base, "PUT", "/api/streams/nope/zones", {"zones": []})
    assert status == 404 and "no stream 'nope'" in body["error"]
    assert _call(service.base, "GET", "/api/streams/lobby/zones", token=None)[0] == 401


# -- zones set through the API outlive a restart -------------------------------------------------
def _stream(zones: list | None = None) -> Any:
    from stream.config import StreamConfig
    return StreamConfig.model_validate({"id": "gate", "source": {"type": "whip"},
                                        "zones": [{"points": p} for p in (zones or [])]})


def test_saved_zones_come_back_unless_the_config_changed_since(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from stream.live.zone_store import ZoneStore

    store = ZoneStore(tmp_path / "zones")
    assert store.restore(_stream()).zones == []  # nothing saved
    drawn = [ZoneConfig(points=SQUARE, name="garden")]
    store.save(_stream(), drawn, configured=[], user="olga")
    assert (tmp_path / "zones" / "gate.json").stat().st_mode & 0o777 == 0o600
    assert store.restore(_stream()).zones == drawn
    # the config's own zones were edited after the API set them: the config is the newer word
    edited = [[0.5, 0.5], [0.9, 0.5], [0.9, 0.9]]
    with caplog.at_level("WARNING"):
        assert [z.points for z in store.restore(_stream([edited])).zones] == [[tuple(p) for p in edited]]
    assert "changed after zones were set through the API" in caplog.text
    assert not store.path("gate").exists() and list((tmp_path / "zones").glob("gate.json.replaced-*"))
    # a damaged file: the config's zones apply, and the log says what to do
    store.path("gate").write_text("{not json")
    with caplog.at_level("ERROR"):
        assert store.restore(_stream()).zones == []
    assert "damaged" in caplog.text and "Delete the file" in caplog.text
    store.forget("gate")
    assert not store.path("gate").exists()


def test_zones_set_through_the_api_survive_a_restart_and_go_with_the_stream(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    monkeypatch.setenv("ZONES_TEST_TOKENS", TOKEN)
    clip = make_clip(tmp_path / "face.mp4", frames=30, width=320, height=240)
    doc = {"streams": [{"id": "lobby", "source": {"type": "file", "path": str(clip.path), "loop": True}}],
           "detection": {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"]},
           "auth": {"tokens_env": "ZONES_TEST_TOKENS"}, "http": {"port": 0}}
    zones = {"zones": [{"kind": "mask", "points": SQUARE, "name": "garden"}]}
    svc = ServiceThread(parse_config(doc), NoFaces)
    try:
        assert _call(svc.base, "PUT", "/api/streams/lobby/zones", zones)[0] == 200
    finally:
        svc.stop()
    svc = ServiceThread(parse_config(doc), NoFaces)
    try:
        status, body = _call(svc.base, "GET", "/api/streams/lobby/zones")
        assert status == 200 and body["zones"][0]["name"] == "garden", body
        assert _call(svc.base, "DELETE", "/api/streams/lobby")[0] == 204
    finally:
        svc.stop()
    svc = ServiceThread(parse_config(doc), NoFaces)
    try:  # removed on purpose: the stream comes back from the config with the config's zones
        assert _call(svc.base, "GET", "/api/streams/lobby/zones") == (200, {"zones": []})
    finally:
        svc.stop()


def test_zones_that_cannot_be_saved_are_still_painted_and_the_answer_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZONES_TEST_TOKENS", TOKEN)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    clip = make_clip(tmp_path / "face.mp4", frames=30, width=320, height=240)
    cfg = parse_config({
        "streams": [{"id": "lobby", "source": {"type": "file", "path": str(clip.path), "loop": True}}],
        "detection": {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"]},
        "auth": {"tokens_env": "ZONES_TEST_TOKENS"}, "http": {"port": 0},
        "api": {"zones_dir": str(blocker / "zones")}})
    svc = ServiceThread(cfg, NoFaces)
    try:
        status, body = _call(svc.base, "PUT", "/api/streams/lobby/zones", {"zones": [{"points": SQUARE}]})
        assert status == 507 and "applied but not saved" in body["error"] and "api.zones_dir" in body["error"]
        assert len(_call(svc.base, "GET", "/api/streams/lobby/zones")[1]["zones"]) == 1
    finally:
        svc.stop()
