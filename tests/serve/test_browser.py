"""End to end: Debian's Chromium, driven headless by Playwright, against a live server.

The browser runs under the server's Content-Security-Policy, so any violation fails the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from resmemnet.serve import create_app
from tests.conftest import SHARED_DATASETS
from tests.serve.conftest import photo_bytes, running_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS_ENV = "RESMEMNET_TEST_ARTIFACTS"  # where screenshots are kept (default: the test's tmp folder)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)")]


@pytest.fixture
def live_server(tiny_model):
    """uvicorn on a free loopback port, in a background thread, for the test's duration."""
    with running_server({}, create_app(tiny_model)) as (host, port):
        yield f"http://{host}:{port}"


def _two_photos(tmp_path: Path) -> list[Path]:
    """Two real photos (BSDS500) when the shared data is present, else two generated ones."""
    real = sorted((SHARED_DATASETS / "bsds500").glob("test/*.jpg"))[:2]
    if len(real) == 2:
        return real
    paths = [tmp_path / f"generated{i}.jpg" for i in range(2)]
    for i, path in enumerate(paths):
        path.write_bytes(photo_bytes(i, size=(320, 240)))
    return paths


def _csp_violations(page) -> list[str]:
    """Console messages in which the browser reports a Content-Security-Policy violation (filled as they come)."""
    violations: list[str] = []
    page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    return violations


def test_upload_two_photos_and_see_them_ranked_with_heatmaps(live_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    photos = _two_photos(tmp_path)
    artifacts = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=1)  # a phone
            violations = _csp_violations(page)
            page.goto(live_server)
            page.wait_for_function("() => document.getElementById('model').textContent.length > 0")
            page.set_input_files("#files", [str(p) for p in photos])
            page.wait_for_function("() => document.querySelectorAll('#results .result').length === 2", timeout=60_000)
            page.wait_for_function("() => [...document.querySelectorAll('#results img')]"
                                   ".every(img => img.complete && img.naturalWidth > 0)")
            cards = page.locator("#results .result")
            names = cards.locator(".name").all_inner_texts()
            shown = [float(t) for t in cards.locator(".score").all_inner_texts()]
            exact = [float(s) for s in cards.evaluate_all("cards => cards.map(c => c.dataset.score)")]
            assert sorted(names) == sorted(p.name for p in photos)
            # The page's order must be the server's: score both photos through the API and compare.
            api = httpx.post(f"{live_server}/v1/predict", files=[("files", (p.name, p.read_bytes())) for p in photos])
            by_name = {r["filename"]: r["score"] for r in api.json()["results"]}
            assert exact == pytest.approx([by_name[n] for n in names], abs=1e-4)
            assert exact[0] > exact[1], "cards must be ranked, most memorable first"
            assert shown == pytest.approx(exact, abs=5e-4) and cards.locator(".rank").all_inner_texts() == ["#1", "#2"]
            heatmaps = cards.locator("img.heatmap")
            assert heatmaps.count() == 2
            assert all(src.startswith("data:image/png;base64,") for src in
                       heatmaps.evaluate_all("imgs => imgs.map(i => i.src)"))
            assert page.locator("#errors li").count() == 0
            page.screenshot(path=artifacts / "serve_phone.png", full_page=True)

            page.set_input_files("#files", files=[{"name": "notes.jpg", "mimeType": "image/jpeg",
                                                   "buffer": b"not really a photo"}])
            page.wait_for_function("() => document.querySelectorAll('#errors li').length === 1")
            assert "notes.jpg" in page.locator("#errors li").inner_text()
            assert cards.count() == 2  # an upload error leaves earlier results in place

            page.set_viewport_size({"width": 1200, "height": 900})
            page.screenshot(path=artifacts / "serve_desktop.png", full_page=True)
            assert violations == []
        finally:
            browser.close()


def test_api_docs_render_with_the_network_off(live_server, tmp_path):
    """Every request to a host other than the server is aborted: the docs must need none."""
    sync_api = pytest.importorskip("playwright.sync_api")
    artifacts = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    blocked: list[str] = []

    def local_only(route) -> None:
        if route.request.url.startswith(live_server):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            violations = _csp_violations(page)
            page.route("**/*", local_only)
            page.goto(live_server + "/docs")
            page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
            assert "/v1/predict" in page.content()
            page.screenshot(path=artifacts / "serve_docs.png")
            assert blocked == [] and violations == []
        finally:
            browser.close()
