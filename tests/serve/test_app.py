import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from resmemnet import predict
from resmemnet.serve import ServeSettings, create_app
from tests.conftest import make_big_png
from tests.serve.conftest import photo_bytes

FP32 = ServeSettings(precision="fp32")  # to compare with the library's exact fp32 scores


@pytest.fixture(scope="module")
def client(tiny_model):
    with TestClient(create_app(tiny_model, FP32)) as c:
        yield c


def _files(*blobs: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in blobs]


def test_predict_scores_match_the_library_and_are_ranked(client, tiny_model):
    blobs = [photo_bytes(i) for i in range(3)]
    r = client.post("/v1/predict", files=_files(*((f"p{i}.jpg", b) for i, b in enumerate(blobs))))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["p0.jpg", "p1.jpg", "p2.jpg"]
    scores = np.array([x["score"] for x in results])
    expected = predict([Image.open(io.BytesIO(b)) for b in blobs], tiny_model)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert [x["rank"] for x in results] == list(np.argsort(np.argsort(-expected)) + 1)
    assert all(x["error"] is None and x["score_std"] is None for x in results)  # one model: no spread


def test_an_ensemble_model_returns_each_scores_spread():
    from resmemnet import Preprocessing, create_model

    ensemble = create_model("mobilenet_v3_large", head="linear-ensemble", members=4,
                            preprocessing=Preprocessing(resize=(64, 64))).eval()
    torch.nn.init.normal_(ensemble.head.fc.weight, std=0.01)
    blobs = [photo_bytes(i) for i in range(2)]
    with TestClient(create_app(ensemble, FP32)) as c:
        r = c.post("/v1/predict", files=_files(("a.jpg", blobs[0]), ("cut.jpg", blobs[1][:100]), ("b.jpg", blobs[1])))
    results = r.json()["results"]
    scores, spread = predict([Image.open(io.BytesIO(b)) for b in blobs], ensemble, return_std=True)
    np.testing.assert_allclose([results[0]["score_std"], results[2]["score_std"]], spread, rtol=1e-4)
    np.testing.assert_allclose([results[0]["score"], results[2]["score"]], scores, atol=1e-5)
    assert results[1]["score"] is None and results[1]["score_std"] is None


def test_type_is_sniffed_from_content_not_name(client):
    png_named_jpg = ("holiday.jpg", photo_bytes(0, fmt="PNG"))
    r = client.post("/v1/predict", files=[("files", (*png_named_jpg, "text/plain"))])
    assert r.status_code == 200 and 0 <= r.json()["results"][0]["score"] <= 1
    r = client.post("/v1/predict", files=_files(("notes.jpg", b"this is a text file, not a photo")))
    assert r.status_code == 422
    assert "notes.jpg" in r.json()["detail"] and "not an image" in r.json()["detail"]


def test_a_bad_file_among_good_ones_gets_an_error_row(client):
    r = client.post("/v1/predict", files=_files(("a.jpg", photo_bytes(1)), ("cut.jpg", photo_bytes(2)[:200]),
                                                ("empty.png", b""), ("b.jpg", photo_bytes(3))))
    assert r.status_code == 200
    rows = r.json()["results"]
    assert [x["score"] is None for x in rows] == [False, True, True, False]
    assert "truncated" in rows[1]["error"] and "empty" in rows[2]["error"]
    assert sorted(x["rank"] for x in rows if x["rank"]) == [1, 2] and rows[1]["rank"] is None


def test_filenames_are_echoed_never_opened(client):
    r = client.post("/v1/predict", files=_files(("../../etc/passwd", photo_bytes(0)), ("/dev/zero", b"x")))
    rows = r.json()["results"]
    assert rows[0]["filename"] == "../../etc/passwd" and rows[0]["score"] is not None
    assert rows[1]["error"] == "not an image, or an unsupported format"


def test_malformed_requests_get_4xx_json(client):
    for response in (client.post("/v1/predict"),
                     client.post("/v1/predict", data={"files": "not a file"}),
                     client.post("/v1/predict", files=_files(("a.jpg", b""))),
                     client.post("/v1/predict", content=b"{}", headers={"content-type": "application/json"}),
                     client.post("/v1/explain?format=gif", files=_files(("a.jpg", photo_bytes(0))))):
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/json" and response.json()["detail"]
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}


def test_upload_limits_are_configurable(tiny_model):
    settings = ServeSettings(max_files=2, max_file_bytes=4000, max_pixels=100 * 100)
    with TestClient(create_app(tiny_model, settings)) as c:
        small = photo_bytes(0, size=(40, 30))
        r = c.post("/v1/predict", files=_files(*[("x.jpg", small)] * 3))
        assert r.status_code == 422 and "3 files uploaded; the limit is 2" in r.json()["detail"]
        r = c.post("/v1/predict", files=_files(("small.jpg", small), ("big.png", b"0" * 4001)))
        assert r.status_code == 413 and "big.png: over the limit of 4,000 bytes" in r.json()["detail"]
        r = c.post("/v1/predict", files=_files(("x.jpg", b"0" * 40_000), ("y.jpg", b"0" * 40_000)))
        assert r.status_code == 413 and "Request body" in r.json()["detail"]  # refused from Content-Length
        r = c.post("/v1/predict", content=iter([b"--x\r\n"]), headers={"content-type": "multipart/form-data; "
                                                                                        "boundary=x"})
        assert r.status_code == 411 and "Content-Length" in r.json()["detail"]


def test_decompression_bomb_is_refused(tiny_model):
    # 4000 x 4000 flat pixels compress to a few kB but would decode to 16 MP.
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 50_000
    with TestClient(create_app(tiny_model, ServeSettings(max_pixels=1_000_000))) as c:
        r = c.post("/v1/predict", files=_files(("bomb.png", buffer.getvalue())))
    assert r.status_code == 422
    assert "bomb.png" in r.json()["detail"] and "decompression-bomb guard" in r.json()["detail"]


def test_explain_json_gives_scores_overlays_and_heatmaps(client, tiny_model):
    blobs = [photo_bytes(i, size=(96, 72)) for i in (4, 5)]
    r = client.post("/v1/explain", files=_files(("a.jpg", blobs[0]), ("bad.gif", b"GIF89a"), ("b.jpg", blobs[1])))
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert rows[1]["error"] and rows[1]["overlay_png"] is None
    expected = predict([Image.open(io.BytesIO(b)) for b in blobs], tiny_model)
    np.testing.assert_allclose([rows[0]["score"], rows[2]["score"]], expected, atol=1e-4)
    for row in (rows[0], rows[2]):
        overlay = Image.open(io.BytesIO(base64.b64decode(row["overlay_png"])))
        heat = Image.open(io.BytesIO(base64.b64decode(row["heatmap_png"])))
        assert overlay.format == heat.format == "PNG"
        assert overlay.size == heat.size == (96, 72) and overlay.mode == "RGB" and heat.mode == "L"


def test_explain_png_returns_one_overlay(client):
    r = client.post("/v1/explain?format=png", files=_files(("a.jpg", photo_bytes(6, size=(2000, 1000)))))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert 0 <= float(r.headers["x-memorability-score"]) <= 1
    assert max(Image.open(io.BytesIO(r.content)).size) <= ServeSettings().overlay_max_side
    r = client.post("/v1/explain?format=png", files=_files(("a.jpg", photo_bytes(0)), ("b.jpg", photo_bytes(1))))
    assert r.status_code == 422 and "format=json" in r.json()["detail"]
    r = client.post("/v1/explain?format=png", files=_files(("a.txt", b"hello")))
    assert r.status_code == 422 and "a.txt" in r.json()["detail"]


def test_model_card_health_and_page(client, tiny_model):
    card = client.get("/v1/model").json()
    assert card["backbone"] == "mobilenet_v3_large" and card["projection"] == 16
    assert card["metadata"]["description"] == "tiny untrained test model"
    assert card["limits"]["max_files"] == ServeSettings().max_files
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").status_code == 200
    for name in ("index.html", "..%2F__init__.py", "%2E%2E%2Fapp.py"):
        assert client.get(f"/static/{name}").status_code == 404
    assert client.get("/docs").status_code == 200 and "/v1/predict" in client.get("/openapi.json").text


def test_concurrent_requests_share_model_calls(tiny_model):
    # A long batching window makes the merge certain; the scores must not depend on who shared a batch.
    app = create_app(tiny_model, ServeSettings(max_batch=8, max_wait_ms=300, precision="fp32"))
    blobs = [photo_bytes(i) for i in range(8)]

    async def post_all() -> list[float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            responses = await asyncio.gather(*(c.post("/v1/predict", files=_files(("x.jpg", b))) for b in blobs))
        return [r.json()["results"][0]["score"] for r in responses]

    scores = asyncio.run(post_all())
    np.testing.assert_allclose(scores, predict([Image.open(io.BytesIO(b)) for b in blobs], tiny_model), atol=1e-5)
    sizes = list(app.state.batchers["predict"].batch_sizes)
    assert sum(sizes) == 8 and max(sizes) > 1, sizes


def test_a_full_queue_answers_503_with_retry_after(tiny_model):
    with TestClient(create_app(tiny_model, ServeSettings(max_queue=1))) as c:
        r = c.post("/v1/predict", files=_files(("a.jpg", photo_bytes(0)), ("b.jpg", photo_bytes(1))))
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "retry" in r.json()["detail"]


def test_ranks_put_the_highest_score_first_and_ties_share_a_rank():
    from resmemnet.serve.app import _ranks

    assert _ranks([0.2, None, 0.9, 0.2, 0.5]) == [3, None, 1, 3, 2]
    assert _ranks([None, None]) == [None, None]


def test_a_nan_score_is_an_error_for_that_image_never_null_with_a_rank(tiny_model, monkeypatch):
    """Issue 21.3: the server answered 200 with "score": null, "rank": -9223372036854775808."""
    import dataclasses

    import resmemnet.serve.app as app_module

    real_predict, real_explain = app_module.predict, app_module.explain_batch

    def nan_second(*args, **kwargs):
        scores, spread = real_predict(*args, **kwargs)
        scores[1] = np.nan
        return scores, spread

    def nan_explained(*args, **kwargs):
        return [dataclasses.replace(e, score=float("nan")) for e in real_explain(*args, **kwargs)]

    monkeypatch.setattr(app_module, "predict", nan_second)
    monkeypatch.setattr(app_module, "explain_batch", nan_explained)
    with TestClient(create_app(tiny_model)) as c:
        scored = c.post("/v1/predict", files=_files(*((f"p{i}.jpg", photo_bytes(i)) for i in range(3))))
        explained = c.post("/v1/explain", files=_files(("a.jpg", photo_bytes(4))))
        png = c.post("/v1/explain?format=png", files=_files(("a.jpg", photo_bytes(4))))
    assert scored.status_code == 200
    rows = scored.json()["results"]
    assert [(x["score"] is None, x["rank"], x["error"]) for x in rows] == [
        (False, rows[0]["rank"], None), (True, None, "model produced NaN"), (False, rows[2]["rank"], None)]
    assert sorted([rows[0]["rank"], rows[2]["rank"]]) == [1, 2]
    (row,) = explained.json()["results"]
    assert (row["score"], row["rank"], row["error"], row["overlay_png"]) == (None, None, "model produced NaN", None)
    assert png.status_code == 500 and png.json()["detail"].startswith("a.jpg: model produced NaN")


def test_max_pixels_over_pillows_own_limit_admits_a_large_scan(tiny_model, tmp_path, monkeypatch):
    """Issue 21.4: `serve --max-pixels 300000000` could not admit a 14000x14000 scan (Pillow's 179 MP refused it)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    scan = make_big_png(tmp_path / "scan.png", 14_000).read_bytes()
    with TestClient(create_app(tiny_model, ServeSettings(max_pixels=300_000_000))) as c:
        r = c.post("/v1/predict", files=_files(("scan.png", scan)))
    assert r.status_code == 200, r.text
    assert 0 <= r.json()["results"][0]["score"] <= 1


def test_the_server_follows_the_precision_policy_and_says_so_as_info_does(tiny_model, tiny_checkpoint, capsys):
    from resmemnet.cli import main
    from resmemnet.inference import precision_for

    with TestClient(create_app(tiny_model)) as c:  # the default: the CLI's policy, not the library's fp32
        card = c.get("/v1/model").json()
        r = c.post("/v1/predict", files=_files(("a.jpg", photo_bytes(7))))
    policy = precision_for("auto")
    assert (card["precision"], card["precision_reason"]) == (policy.name, policy.reason)
    assert main(["info", "--checkpoint", str(tiny_checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["precision"] == {"name": card["precision"], "reason": card["precision_reason"]}
    expected = predict(Image.open(io.BytesIO(photo_bytes(7))), tiny_model, precision="auto")
    np.testing.assert_allclose(r.json()["results"][0]["score"], expected, atol=1e-6)
    with TestClient(create_app(tiny_model, ServeSettings(precision="fp32", device="cpu"))) as c:
        card = c.get("/v1/model").json()
    assert (card["precision"], card["precision_reason"], card["device"]) == ("fp32", "requested", "cpu")


def test_one_scorer_is_built_at_start_up_and_serves_every_batch(tiny_model, monkeypatch):
    from resmemnet.inference import TorchScorer

    built = []
    real_init = TorchScorer.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(TorchScorer, "__init__", counting_init)
    app = create_app(tiny_model, ServeSettings(max_batch=2))
    assert built == [app.state.scorer]
    with TestClient(app) as c:
        for _ in range(2):
            assert c.post("/v1/predict", files=_files(*((f"{i}.jpg", photo_bytes(i)) for i in range(3)))).is_success
            assert c.post("/v1/explain", files=_files(("a.jpg", photo_bytes(0)))).is_success
    assert built == [app.state.scorer]  # no scorer per micro-batch: its set-up and precision are the server's
    assert sum(app.state.batchers["predict"].batch_sizes) == 6
