"""The control-room page in real Chromium (Debian's, driven by Playwright); Chromium as a WHIP publisher.

Skipped only when Chromium or Playwright is missing; .ci/run installs both, so CI runs these.
Screenshots land in tests/artifacts/ (git-ignored) for a person to look at. The page's Content
Security Policy forbids eval, which Playwright's string predicates use, so test pages bypass it.
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import TESTS, make_clip
from live_helpers import ServiceThread, wait_for

from stream.config import parse_config
from stream.detect.yunet import YuNet

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = TESTS / "artifacts"
TOKEN = "browser-token-0123456789abcdef"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
         "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
         "--autoplay-policy=no-user-gesture-required"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="apt-get install chromium")





@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServiceThread]:
    monkeypatch.setenv("BROWSER_TEST_TOKENS", TOKEN)
    clip = make_clip(tmp_path / "face.mp4", frames=50, width=320, height=240)
    cfg = parse_config({
        "streams": [{"id": "lobby", "source": {"type": "file", "path": str(clip.path), "loop": True}},
                    {"id": "bodycam", "source": {"type": "whip"}}],
        "detection": {"preset": "fast", "plates": False, "heads": False, "providers": ["cpu"]},
        "auth": {"tokens_env": "BROWSER_TEST_TOKENS"},
        "http": {"port": 0},
    })
    svc = ServiceThread(cfg)
    yield svc
    svc.stop()


@pytest.fixture
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def new_page(browser: object) -> object:
    return browser.new_context(bypass_csp=True).new_page()


def grab(page: object, selector: str) -> np.ndarray:
    """The video element's current picture, through a canvas, as BGR."""
    data = page.evaluate("""(sel) => {
        const v = document.querySelector(sel);
        const c = document.createElement('canvas');
        c.width = v.videoWidth; c.height = v.videoHeight;
        c.getContext('2d').drawImage(v, 0, 0);
        return c.toDataURL('image/png');
    }""", selector)
    png = base64.b64decode(data.split(",", 1)[1])
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


def test_viewer_page_plays_the_redacted_stream(service: ServiceThread, browser: object) -> None:
    page = new_page(browser)
    page.goto(f"{service.base}/#token={TOKEN}")
    video = '[data-stream="lobby"] video'
    page.wait_for_function(f"document.querySelector('{video}') && "
                           f"document.querySelector('{video}').videoWidth > 0", timeout=30_000)
    size = page.evaluate(f"[document.querySelector('{video}').videoWidth, "
                         f"document.querySelector('{video}').videoHeight]")
    assert size == [320, 240]
    # the token handed over in the link is kept for the tab and gone from the address bar and history
    assert TOKEN not in page.url and page.evaluate("location.hash") == ""
    assert page.evaluate("sessionStorage.getItem('stream-redact-token')") == TOKEN
    t0 = page.evaluate(f"document.querySelector('{video}').currentTime")
    page.wait_for_function(f"document.querySelector('{video}').currentTime > {t0} + 1", timeout=20_000)
    yunet = YuNet(threshold=0.6, providers=("cpu",))
    for _ in range(5):
        frame = grab(page, video)
        assert frame.shape == (240, 320, 3)
        assert frame.std() > 5, "the page shows a picture, not a blank frame"
        assert len(yunet([frame])[0]) == 0, "a face is visible in the browser"
        t = page.evaluate(f"document.querySelector('{video}').currentTime")
        page.wait_for_function(f"document.querySelector('{video}').currentTime > {t} + 0.2",
                               timeout=10_000)  # the next sample is another moment of the clip
    page.wait_for_function("document.querySelector('[data-stream=\"lobby\"] .state').textContent === 'up'",
                           timeout=10_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "control-room.png"))


def test_viewer_page_asks_for_a_token(service: ServiceThread, browser: object) -> None:
    page = new_page(browser)
    page.goto(f"{service.base}/")
    page.wait_for_function("document.getElementById('message').textContent.includes('not authorised')",
                           timeout=10_000)
    assert page.locator("#grid video").count() == 0
    page.fill("#token", TOKEN)
    page.click("#login button")
    page.wait_for_function("document.querySelectorAll('#grid video').length === 2", timeout=10_000)


def test_chromium_publishes_over_whip(service: ServiceThread, browser: object) -> None:
    page = new_page(browser)
    page.goto(f"{service.base}/static/style.css")  # same origin as the API, no page script running
    status = page.evaluate("""async (token) => {
        const stream = await navigator.mediaDevices.getUserMedia({video: {width: 320, height: 240}});
        const pc = new RTCPeerConnection({iceServers: []});
        stream.getTracks().forEach((t) => pc.addTrack(t, stream));
        await pc.setLocalDescription(await pc.createOffer());
        await new Promise((ok) => {
            if (pc.iceGatheringState === 'complete') return ok();
            pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && ok();
            setTimeout(ok, 3000);
        });
        const r = await fetch('/whip/bodycam', {method: 'POST', body: pc.localDescription.sdp,
            headers: {'Content-Type': 'application/sdp', 'Authorization': 'Bearer ' + token}});
        if (r.status !== 201) return r.status + ' ' + await r.text();
        await pc.setRemoteDescription({type: 'answer', sdp: await r.text()});
        window.publisher = pc;
        return r.status;
    }""", TOKEN)
    assert status == 201
    import urllib.request

    def frames_in() -> float:
        req = urllib.request.Request(service.base + "/metrics")
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith('stream_redact_frames_in_total{stream="bodycam"}'):
                return float(line.split()[-1])
        return 0.0

    wait_for(lambda: frames_in() > 30, timeout=30, what="frames from the Chromium publisher")
    viewer = new_page(browser)
    viewer.goto(f"{service.base}/#token={TOKEN}")
    sel = '[data-stream="bodycam"] video'
    viewer.wait_for_function(f"document.querySelector('{sel}') && "
                             f"document.querySelector('{sel}').videoWidth > 0", timeout=30_000)


def test_zone_editor_draws_saves_and_the_zone_appears_in_the_played_video(service: ServiceThread,
                                                                          browser: object) -> None:
    from stream.core.zones import FILL_BGR

    square = [(0.1, 0.1), (0.45, 0.1), (0.45, 0.6), (0.1, 0.6)]
    page = new_page(browser)
    page.goto(f"{service.base}/#token={TOKEN}")
    tile = '[data-stream="lobby"]'
    video = f"{tile} video"
    page.wait_for_function(f"document.querySelector('{video}') && "
                           f"document.querySelector('{video}').videoWidth > 0", timeout=30_000)
    page.click(f"{tile} .zones-btn")
    page.wait_for_function(f"document.querySelector('{tile} .zone-status').textContent.includes('no zones')",
                           timeout=10_000)
    box = page.locator(f"{tile} .zone-layer").bounding_box()
    for fx, fy in square:
        page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
    page.click(f"{tile} .zone-finish")
    page.click(f"{tile} .zone-save")
    page.wait_for_function(f"document.querySelector('{tile} .zone-status').textContent.includes('saved: 1')",
                           timeout=10_000)
    assert page.locator(f"{tile} .zone-layer polygon.mask").count() == 1
    import json
    import urllib.request
    req = urllib.request.Request(service.base + "/api/streams/lobby/zones",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        zones = json.loads(r.read())["zones"]
    assert len(zones) == 1 and zones[0]["kind"] == "mask"
    assert np.abs(np.array(zones[0]["points"]) - np.array(square)).max() < 0.01

    def painted() -> bool:  # the picture inside the zone (away from its edge) is the zone's flat fill
        frame = grab(page, video).astype(int)
        inner = frame[int(0.15 * 240):int(0.55 * 240), int(0.15 * 320):int(0.4 * 320)]
        return bool(np.abs(inner - FILL_BGR).max() <= 16) and frame.std() > 5

    wait_for(painted, timeout=20, what="the saved zone painted in the video the browser plays")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "zone-editor.png"))
