"""End to end: Debian's Chromium, driven headless by Playwright, against a live server.

The browser runs under the server's Content-Security-Policy, so any violation fails the test.
The batch tests also write the page's screenshots into docs/ (web-desktop.png, web-phone.png).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from resmemnet import Preprocessing, create_model, load_model, save_checkpoint
from resmemnet.inference import Prediction
from resmemnet.jobs import FIELDS, SPREAD_FIELD, RowWriter, _csv_escape
from resmemnet.serve import create_app
from resmemnet.serve.app import ServeSettings
from tests.conftest import SHARED_DATASETS
from tests.serve.conftest import photo_bytes, running_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--font-render-hinting=none"]
ARTIFACTS_ENV = "RESMEMNET_TEST_ARTIFACTS"  # where screenshots are kept (default: the test's tmp folder)
DOCS = Path(__file__).resolve().parents[2] / "docs"  # the README's screenshots, remade by every run
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
TRAINING_DATA = "synthetic split 0 (seed 0): 24 training rows (24 train images), 8 validation images"
SETTLED = "() => document.body.dataset.pending === '0' && !document.getElementById('status').textContent.includes('…')"
WAIT_MS = 180_000  # generous: the test machine's two cores may be busy

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)")]


@pytest.fixture
def live_server(tiny_model):
    """uvicorn on a free loopback port, in a background thread, for the test's duration."""
    with running_server({}, create_app(tiny_model)) as (host, port):
        yield f"http://{host}:{port}"


@pytest.fixture(scope="module")
def ensemble_model(tmp_path_factory):
    """A tiny 4-member ensemble whose members mostly agree: scores spread over 0.3-0.8 and each has a
    score_std, so some neighbours are too close to call and some are not. Saved and reloaded like the
    server's, with the training-data line a trained checkpoint carries."""
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_large", head="linear-ensemble", members=4,
                         preprocessing=Preprocessing(resize=(64, 64))).eval()
    with torch.no_grad():
        shared = torch.randn(1, model.head.fc.in_features) * 2.0
        model.head.fc.weight.copy_(shared + torch.randn_like(model.head.fc.weight) * 0.1)
    path = save_checkpoint(model, tmp_path_factory.mktemp("ensemble") / "ensemble.safetensors",
                           metadata={"name": "tiny-ensemble", "training_data": TRAINING_DATA,
                                     "split": {"dataset": "synthetic"}})
    return load_model(path)


@pytest.fixture
def ensemble_server(ensemble_model):
    # One image per model call, so the page's chunks and the test's single request give bit-equal scores.
    with running_server({}, create_app(ensemble_model, ServeSettings(max_batch=1))) as (host, port):
        yield f"http://{host}:{port}"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def _two_photos(tmp_path: Path) -> list[Path]:
    """Two real photos (BSDS500) when the shared data is present, else two generated ones."""
    real = sorted((SHARED_DATASETS / "bsds500").glob("test/*.jpg"))[:2]
    if len(real) == 2:
        return real
    paths = [tmp_path / f"generated{i}.jpg" for i in range(2)]
    for i, path in enumerate(paths):
        path.write_bytes(photo_bytes(i, size=(320, 240)))
    return paths


def _scene(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A flat-coloured 'photo': a gradient sky and a few shapes (small PNG screenshots, unlike noise)."""
    rng = np.random.default_rng(100 + seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (y * rng.uniform(0.5, 1.5) + x * rng.uniform(-0.5, 0.5))[..., None].clip(0, 1)
    image = Image.fromarray((top * (1 - t) + bottom * t).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
        box = [int(x0), int(y0), int(x0 + rng.integers(15, w // 2)), int(y0 + rng.integers(15, h // 2))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def _batch(folder: Path) -> list[Path]:
    """12 photos, the second of them a truncated JPEG (so it fails in the first chunk)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(12):
        buffer = io.BytesIO()
        _scene(i).save(buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
        name = "broken.jpg" if i == 1 else f"scene{i:02d}.jpg"
        paths.append(folder / name)
        paths[-1].write_bytes(data[:300] if i == 1 else data)
    return paths


def _csp_violations(page) -> list[str]:
    """Console messages in which the browser reports a Content-Security-Policy violation (filled as they come)."""
    violations: list[str] = []
    page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    return violations


def _open(browser, url: str, viewport: dict[str, int]):
    page = browser.new_page(viewport=viewport, device_scale_factor=1, reduced_motion="reduce")
    violations = _csp_violations(page)
    page.goto(url)
    page.wait_for_function("() => document.getElementById('context').textContent.length > 0")
    return page, violations


def _api_rows(url: str, paths: list[Path]) -> list[dict]:
    response = httpx.post(f"{url}/v1/predict", files=[("files", (p.name, p.read_bytes())) for p in paths],
                          timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def _cli_output(api_rows: list[dict], fmt: str, spread: bool) -> str:
    """What `resmemnet predict` writes for these rows: the page's downloads must be byte-equal."""
    stream = io.StringIO()
    writer = RowWriter(stream, fmt, fields=(*FIELDS, SPREAD_FIELD) if spread else FIELDS)
    writer.write([Prediction(r["filename"], r["score"], r["error"] or "", r["score_std"]) for r in api_rows])
    writer.finish()
    return stream.getvalue()


def _download(page, selector: str) -> tuple[str, str]:
    with page.expect_download() as info:
        page.click(selector)
    download = info.value
    return download.suggested_filename, Path(download.path()).read_bytes().decode()  # keeps \r\n


def _wait_for_visible_heatmaps(page) -> None:
    """Heatmaps load for cards on screen only; wait until those that started have arrived."""
    page.wait_for_function(SETTLED, timeout=WAIT_MS)
    page.wait_for_function("() => [...document.querySelectorAll('#results img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")


def _save_screenshot(page, name: str, *, full_page: bool) -> Path:
    """A PNG for docs/: quantised to 256 colours without dithering, so it is small and the same every run."""
    raw = Image.open(io.BytesIO(page.screenshot(full_page=full_page, animations="disabled", caret="hide")))
    DOCS.mkdir(exist_ok=True)
    path = DOCS / name
    raw.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True)
    return path


def test_upload_two_photos_and_see_them_ranked_with_heatmaps(live_server, browser, tmp_path):
    photos = _two_photos(tmp_path)
    artifacts = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport=PHONE, device_scale_factor=1)
    violations = _csp_violations(page)
    page.goto(live_server)
    page.wait_for_function("() => document.getElementById('model').textContent.length > 0")
    page.set_input_files("#files", [str(p) for p in photos])
    page.wait_for_function("() => document.querySelectorAll('#results .result').length === 2", timeout=60_000)
    page.wait_for_function("() => document.querySelectorAll('#results img.heatmap').length === 2",
                           timeout=WAIT_MS)
    _wait_for_visible_heatmaps(page)
    cards = page.locator("#results .result")
    names = cards.locator(".name").all_inner_texts()
    shown = [float(t) for t in cards.locator(".score").all_inner_texts()]
    exact = [float(s) for s in cards.evaluate_all("cards => cards.map(c => c.dataset.score)")]
    assert sorted(names) == sorted(p.name for p in photos)
    # The page's order must be the server's: score both photos through the API and compare.
    api = _api_rows(live_server, photos)
    by_name = {r["filename"]: r["score"] for r in api}
    assert exact == pytest.approx([by_name[n] for n in names], abs=1e-4)
    assert exact[0] > exact[1], "cards must be ranked, most memorable first"
    assert shown == pytest.approx(exact, abs=5e-4) and cards.locator(".rank").all_inner_texts() == ["#1", "#2"]
    heatmaps = cards.locator("img.heatmap")
    assert heatmaps.count() == 2
    assert all(src.startswith("data:image/png;base64,") for src in
               heatmaps.evaluate_all("imgs => imgs.map(i => i.src)"))
    assert page.locator("#errors li").count() == 0
    # A single model gives no score_std: no range, no ±, no "too close to call", no score_std column.
    assert page.locator(".range, .std, .result.is-close").count() == 0
    _, text = _download(page, "#download-csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(FIELDS) and [r[0] for r in rows[1:]] == [p.name for p in photos]
    assert [float(r[1]) for r in rows[1:]] == pytest.approx([by_name[p.name] for p in photos], abs=1e-6)
    page.screenshot(path=artifacts / "serve_phone.png", full_page=True)

    page.set_input_files("#files", files=[{"name": "notes.jpg", "mimeType": "image/jpeg",
                                           "buffer": b"not really a photo"}])
    page.wait_for_function("() => document.querySelectorAll('#errors li').length === 1")
    assert "notes.jpg" in page.locator("#errors li").inner_text()
    assert "not an image" in page.locator("#errors li").inner_text()  # the server's own reason
    assert cards.count() == 2  # an upload error leaves earlier results in place

    page.set_viewport_size({"width": 1200, "height": 900})
    page.screenshot(path=artifacts / "serve_desktop.png", full_page=True)
    assert violations == []
    page.close()


def test_a_batch_of_twelve_is_ranked_with_ranges_and_downloads_match_the_api(ensemble_server, browser, tmp_path):
    paths = _batch(tmp_path / "batch")
    page, violations = _open(browser, ensemble_server, DESKTOP)
    # Record the progress line as it changes, and what it said when the bad file's error appeared.
    page.evaluate("""() => {
        window.statuses = [];
        window.errorSeenAt = null;
        // Each record's added text: several changes in one task arrive as one callback.
        new MutationObserver((records) => records.forEach((r) => r.addedNodes.forEach(
                (n) => window.statuses.push(n.textContent))))
            .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true});
        new MutationObserver(() => { window.errorSeenAt ??= document.getElementById('status').textContent; })
            .observe(document.getElementById('errors'), {childList: true});
    }""")
    page.set_input_files("#files", [str(p) for p in paths])
    page.wait_for_function(SETTLED, timeout=WAIT_MS)

    statuses = page.evaluate("window.statuses")
    assert "0 of 12 scored…" in statuses and "12 of 12 scored…" in statuses
    assert any(s in statuses for s in ("4 of 12 scored…", "8 of 12 scored…")), statuses  # progress in between
    seen = re.fullmatch(r"(\d+) of 12 scored…", page.evaluate("window.errorSeenAt") or "")
    assert seen and int(seen[1]) <= 4, "the bad file must show as its chunk returns, before the batch ends"
    assert page.locator("#status").inner_text() == "11 images scored, most memorable first; 1 could not be scored"

    cards = page.locator("#results .result")
    assert cards.count() == 11
    assert cards.locator(".rank").all_inner_texts() == [f"#{i}" for i in range(1, 12)]
    errors = page.locator("#errors li").all_inner_texts()
    assert len(errors) == 1 and errors[0].startswith("broken.jpg: ")

    api = _api_rows(ensemble_server, paths)
    by_name = {r["filename"]: r for r in api}
    data = cards.evaluate_all("cs => cs.map(c => [c.dataset.name, +c.dataset.score, +c.dataset.std, "
                              "c.classList.contains('is-close'), c.querySelector('.std').textContent, "
                              "c.querySelector('.range').style.left, c.querySelector('.range').style.width])")
    scores = [d[1] for d in data]
    assert scores == sorted(scores, reverse=True)
    assert [d[1] for d in data] == [by_name[d[0]]["score"] for d in data]
    assert [d[2] for d in data] == [by_name[d[0]]["score_std"] for d in data]
    for _, score, std, _, text, left, width in data:  # the range drawn on the bar is score ± std
        assert text == f"± {std:.3f}"
        lo, hi = max(0.0, score - std), min(1.0, score + std)
        assert float(left.rstrip("%")) == pytest.approx(100 * lo, abs=0.01)
        assert float(width.rstrip("%")) == pytest.approx(100 * (hi - lo), abs=0.01)
    overlaps = [a[1] - a[2] <= b[1] + b[2] for a, b in itertools.pairwise(data)]
    close = [(i > 0 and overlaps[i - 1]) or (i < len(overlaps) and overlaps[i]) for i in range(len(data))]
    assert [d[3] for d in data] == close
    assert any(close) and not all(close), "the test model should give both kinds of neighbours"
    first_close = close.index(True)
    assert "too close to call with #" in cards.nth(first_close).locator(".close").inner_text()

    context = page.locator("#context").inner_text()
    assert TRAINING_DATA in context and "synthetic test images" in context and "one kind of photo" in context

    name, text = _download(page, "#download-csv")
    assert name == "resmemnet-scores.csv"
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 12 and [r["path"] for r in rows] == [p.name for p in paths]  # upload order, like predict
    assert [float(r["score"]) if r["score"] else None for r in rows] == [r["score"] for r in api]
    assert text == _cli_output(api, "csv", spread=True)  # byte for byte what `resmemnet predict` writes
    name, text = _download(page, "#download-json")
    assert name == "resmemnet-scores.json"
    assert text == _cli_output(api, "json", spread=True)
    assert [r["score"] for r in json.loads(text)] == [r["score"] for r in api]

    _wait_for_visible_heatmaps(page)
    assert page.locator("#results img.heatmap").count() >= 1
    shot = _save_screenshot(page, "web-desktop.png", full_page=False)
    assert shot.stat().st_size < 300_000
    assert violations == []
    page.close()


def test_the_compact_view_sorts_and_fits_a_phone(ensemble_server, browser, tmp_path):
    paths = _batch(tmp_path / "batch")
    page, violations = _open(browser, ensemble_server, PHONE)
    page.set_input_files("#files", [str(p) for p in paths])
    page.wait_for_function(SETTLED, timeout=WAIT_MS)
    page.click("#view-table")
    assert page.locator("#results").is_hidden() and page.locator("#table").is_visible()
    assert page.locator("#view-table").get_attribute("aria-pressed") == "true"
    table = page.locator("#table-body tr")
    assert table.count() == 11 and table.locator("img.thumb").count() == 11

    def column() -> list[float]:
        return [float(s) for s in table.evaluate_all("rs => rs.map(r => r.dataset.score)")]

    assert column() == sorted(column(), reverse=True)  # by rank first
    assert table.locator(".rank").all_inner_texts() == [str(i) for i in range(1, 12)]
    page.click("#table th[data-key=score] button")  # score, highest first
    assert column() == sorted(column(), reverse=True)
    assert page.locator("#table th[data-key=score]").get_attribute("aria-sort") == "descending"
    page.click("#table th[data-key=score] button")  # again: lowest first
    assert column() == sorted(column())
    assert page.locator("#table th[data-key=score]").get_attribute("aria-sort") == "ascending"
    assert table.locator(".rank").all_inner_texts() == [str(i) for i in range(11, 0, -1)]
    page.click("#table th[data-key=name] button")
    names = table.evaluate_all("rs => rs.map(r => r.dataset.name)")
    assert names == sorted(names)

    # Nothing wider than the phone: the page never scrolls sideways.
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.click("#table th[data-key=rank] button")
    page.wait_for_function("() => [...document.querySelectorAll('#table img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")
    shot = _save_screenshot(page, "web-phone.png", full_page=True)
    assert shot.stat().st_size < 300_000

    page.click("#view-cards")
    assert page.locator("#results").is_visible() and page.locator("#table-wrap").is_hidden()
    assert violations == []
    page.close()


def test_keyboard_alone_reaches_the_file_picker_and_the_downloads(ensemble_server, browser, tmp_path):
    paths = _batch(tmp_path / "batch")
    page, violations = _open(browser, ensemble_server, DESKTOP)

    def tab_to(element_id: str, limit: int = 15) -> None:
        for _ in range(limit):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == element_id:
                return
        pytest.fail(f"Tab never reached #{element_id}")

    tab_to("files")
    # The file input is visually hidden; its drop zone shows the focus instead.
    assert page.evaluate("getComputedStyle(document.getElementById('drop')).outlineStyle") == "solid"
    assert page.locator("label[for=files]").count() == 1
    # Whether Enter or Space opens the native picker of a focused file input differs between Chromium builds and
    # runs (headless); what the page owns is that the keyboard reaches it, so the files are given to it here.
    page.set_input_files("#files", [str(p) for p in paths])
    page.wait_for_function(SETTLED, timeout=WAIT_MS)
    assert page.locator("#results .result").count() == 11

    tab_to("view-table")
    page.keyboard.press("Enter")
    assert page.locator("#table").is_visible()
    tab_to("download-csv")
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"  # focus is visible
    with page.expect_download() as csv_download:
        page.keyboard.press("Enter")
    assert len(Path(csv_download.value.path()).read_text().splitlines()) == 13  # header + 12 rows
    tab_to("download-json", limit=1)
    with page.expect_download() as json_download:
        page.keyboard.press("Enter")
    assert len(json.loads(Path(json_download.value.path()).read_text())) == 12
    for selector in ("#files", "#download-csv", "#download-json", "#view-cards", "#view-table", "#clear"):
        label = page.evaluate(f"(e => e.labels?.[0]?.textContent || e.getAttribute('aria-label') || e.textContent)"
                              f"(document.querySelector('{selector}'))")
        assert label.strip(), f"{selector} has no accessible name"
    assert violations == []
    page.close()


def test_download_cells_are_written_as_the_cli_writes_them(live_server, browser):
    """Python's float repr, the CSV formula guard and quoting, and json.dumps' ASCII escapes, done in JS."""
    page, violations = _open(browser, live_server, DESKTOP)
    numbers = [0.0, 1.0, 0.5, 1 / 3, 0.1 + 0.2, 1e-4, 9.99e-5, 1.5e-5, 1e-7, 2.5e-10, 0.8160315752029419]
    assert page.evaluate("xs => xs.map(pyFloat)", numbers) == [repr(x) for x in numbers]
    texts = ["a.jpg", "=cmd.jpg", "+1.jpg", "-x.jpg", "@me.jpg", "\tt.jpg", "'q.jpg", 'say "hi", ok.jpg',
             "two\nlines.jpg", "café ☕ 😀.jpg"]
    cells = page.evaluate("ts => ts.map(t => csvCell(csvEscape(t)))", texts)
    expected = io.StringIO()
    csv.writer(expected).writerow([_csv_escape(t) for t in texts])
    assert ",".join(cells) + "\r\n" == expected.getvalue()
    assert page.evaluate("ts => ts.map(pyJson)", texts) == [json.dumps(t) for t in texts]
    assert violations == []
    page.close()


def test_api_docs_render_with_the_network_off(live_server, browser, tmp_path):
    """Every request to a host other than the server is aborted: the docs must need none."""
    artifacts = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    blocked: list[str] = []

    def local_only(route) -> None:
        if route.request.url.startswith(live_server):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    violations = _csp_violations(page)
    page.route("**/*", local_only)
    page.goto(live_server + "/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
    assert "/v1/predict" in page.content()
    page.screenshot(path=artifacts / "serve_docs.png")
    assert blocked == [] and violations == []
    page.close()
