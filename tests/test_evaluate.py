"""evaluate(): whole-set metrics, bad images reported and excluded; the report folder; `resmemnet evaluate`."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from resmemnet import create_model, save_checkpoint
from resmemnet.cli import main
from resmemnet.data import load_split
from resmemnet.data.base import ImageScoreDataset
from resmemnet.evaluate import evaluate, evaluate_splits
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.predict import predict
from resmemnet.report import write_report
from tests.conftest import make_photo
from tests.data.test_images import _png_header_only
from tests.data.test_lnsim import _tiny_lnsim


@pytest.fixture(scope="module")
def tiny_model():
    return create_model("mobilenet_v3_large", proj_dim=16, hidden_dim=8,
                        preprocessing=Preprocessing(resize=(64, 64))).eval()


@pytest.fixture
def mixed_folder(tmp_path):
    """Good images (RGB, CMYK, 16-bit) and bad ones (zero-byte, truncated, corrupt, oversized)."""
    good = [make_photo(tmp_path / f"g{i}.png", size=(40, 30), seed=i) for i in range(4)]
    Image.fromarray(np.full((30, 40, 4), 90, np.uint8), "CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50).save(tmp_path / "sixteen.png")
    good += [tmp_path / "cmyk.jpg", tmp_path / "sixteen.png"]
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(make_photo(tmp_path / "whole.jpg", size=(200, 200)).read_bytes()[:900])
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    huge = _png_header_only(tmp_path / "huge.png", 40_000, 40_000)
    bad = {tmp_path / "zero.jpg": "empty file", tmp_path / "cut.jpg": "truncated or corrupt",
           tmp_path / "corrupt.png": "not an image|corrupt", huge: "decompression-bomb guard"}
    return good, bad


def test_metrics_are_over_the_whole_set_and_bad_images_are_listed(mixed_folder, tiny_model):
    good, bad = mixed_folder
    paths = [*good[:3], *bad, *good[3:]]  # bad files in the middle: later scores must not shift
    true = np.array([0.1, 0.5, 0.5, 0.9, 0.2, 0.5, 0.7, 0.3, 0.4, 0.6])  # ties on purpose
    evaluation = evaluate(tiny_model, ImageScoreDataset(paths, true), batch_size=3, precision="fp32")
    assert evaluation.positions.tolist() == [0, 1, 2, 7, 8, 9] and evaluation.true.tolist() == pytest.approx(
        true[evaluation.positions].tolist())
    result = evaluation.to_dict(paths)
    assert (result["n_images"], result["n_scored"], result["n_failed"]) == (10, 6, 4)
    assert [f["path"] for f in result["failed"]] == [str(p) for p in bad]
    for failure, reason in zip(result["failed"], bad.values(), strict=True):
        assert re.search(reason, failure["error"])
    kept = np.r_[true[:3], true[7:]]
    predicted = predict(good, tiny_model)
    np.testing.assert_allclose([row["predicted"] for row in result["predictions"]], predicted, rtol=1e-5, atol=1e-6)
    assert [row["true"] for row in result["predictions"]] == pytest.approx(kept.tolist())
    assert result["metrics"]["spearman"] == pytest.approx(stats.spearmanr(predicted, kept).statistic, abs=1e-6)
    assert result["metrics"]["n"] == 6
    with pytest.raises(ValueError, match="Only 0 of 1 images could be scored"):
        evaluate(tiny_model, ImageScoreDataset([good[0].parent / "zero.jpg"], [0.5]))


def test_cached_rows_are_scored_like_their_images(mixed_folder, tiny_model, tmp_path):
    """The same evaluate over a feature cache's rows: the head alone, the same scores, the cache's failures."""
    from resmemnet.train.cache import CachedRows, build_feature_cache

    good, bad = mixed_folder
    paths = [*good, *list(bad)[:1]]
    data = ImageScoreDataset(paths, np.linspace(0.1, 0.9, len(paths)))
    rows = CachedRows.of(build_feature_cache(tiny_model, data, tmp_path / "cache", dtype="float32", device="cpu"))
    cached = evaluate(tiny_model, rows, data.scores, precision="fp32")
    images = evaluate(tiny_model, data, precision="fp32")
    assert cached.positions.tolist() == images.positions.tolist() == list(range(len(good)))
    np.testing.assert_allclose(cached.predicted, images.predicted, rtol=1e-4, atol=1e-5)
    assert cached.failures == images.failures and "empty file" in cached.failures[0]
    with pytest.raises(ValueError, match="against given targets"):
        evaluate(tiny_model, rows)


def test_splits_summary_has_mean_std_and_human_consistency(tmp_path, tiny_model):
    _tiny_lnsim(tmp_path)
    result = evaluate_splits(tiny_model, "lnsim", tmp_path, max_splits=3, test_fraction=0.5, batch_size=8)
    absent = [s["info"]["absent"]["test"] for s in result["splits"]]
    assert [s["n_absent"] for s in result["splits"]] == absent and result["summary"]["absent"] == sum(absent) > 0
    assert result["summary"]["failed"] == 0
    assert result["splits_evaluated"] == [0, 1, 2] and result["splits_available"] == 4
    rhos = [s["metrics"]["spearman"] for s in result["splits"]]
    assert result["summary"]["spearman"]["mean"] == pytest.approx(np.mean(rhos))
    assert result["summary"]["spearman"]["std"] == pytest.approx(np.std(rhos, ddof=1))
    humans = [s["human_consistency"] for s in result["splits"]]
    assert all(h is not None for h in humans)
    assert result["summary"]["human_consistency"]["mean"] == pytest.approx(np.mean(humans))
    one = evaluate_splits(tiny_model, "lnsim", tmp_path, splits=[3], test_fraction=0.5)
    assert one["splits_evaluated"] == [3] and one["summary"]["spearman"]["std"] == 0.0

    files = write_report(result, tmp_path / "report")
    summary = files["summary"].read_text()
    assert f"| Spearman rho | {result['summary']['spearman']['mean']:.3f} ± " in summary
    assert f"{result['summary']['human_consistency']['mean']:.3f} ±" in summary
    assert "| 1 |" in summary and "![scatter](scatter.png)" in summary
    for name in ("scatter", "top", "bottom"):
        with Image.open(files[name]) as image:
            assert image.format == "PNG" and min(image.size) > 200
    assert json.loads(files["result"].read_text())["summary"] == result["summary"]


def test_cli_evaluate_with_a_checkpoint_writes_json_and_report(tmp_path, tiny_model, capsys):
    _tiny_lnsim(tmp_path / "lnsim")
    checkpoint = save_checkpoint(tiny_model, tmp_path / "tiny.safetensors")
    assert main(["evaluate", "--dataset", "lnsim", "--root", str(tmp_path / "lnsim"), "--checkpoint",
                 str(checkpoint), "--split", "1", "--test-fraction", "0.5", "--report", str(tmp_path / "r"),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["splits_evaluated"] == [1] and result["checkpoint"] == str(checkpoint)
    assert result["splits"][0]["info"]["image_split"]["seed"] == 0
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"summary.md", "result.json", "scatter.png", "top.png",
                                                            "bottom.png"}
    assert main(["evaluate", "--dataset", "lnsim", "--root", str(tmp_path / "lnsim"), "--checkpoint",
                 str(checkpoint), "--max-splits", "2", "--test-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "split 0:" in out and "split 1:" in out and "mean over 2 split(s)" in out and "human consistency" in out
    absent = sum(load_split("lnsim", tmp_path / "lnsim", split=i, test_fraction=0.5).info["absent"]["test"]
                 for i in (0, 1))
    assert f"left out of the metrics: {absent} listed test image(s) absent from disk, 0 that failed" in out
    assert main(["evaluate", "--dataset", "lnsim", "--root", str(tmp_path / "lnsim"), "--checkpoint",
                 str(checkpoint), "--split", "9"]) == 2
    assert "splits 0..3" in capsys.readouterr().err
    assert main(["evaluate", "--dataset", "lnsim", "--root", str(tmp_path / "lnsim"), "--checkpoint",
                 str(tmp_path / "missing.safetensors")]) == 2
    assert "No checkpoint file at" in capsys.readouterr().err


def test_a_test_set_whose_only_image_is_absent_says_so(tmp_path, tiny_model, capsys):
    """Issue 21.6: it said "Only 0 of 0 images could be scored" and not that the image is absent."""
    from resmemnet.data._common import seeded_split

    _, (test,) = seeded_split(2, seed=0, split=0, test_fraction=0.5)
    names = ["a.jpg", "b.jpg"]
    make_photo(tmp_path / names[1 - test])  # the train image is there, the test image is not
    (tmp_path / "scores.csv").write_text(f"path,score\n{names[0]},0.25\n{names[1]},0.75\n")
    checkpoint = save_checkpoint(tiny_model, tmp_path / "tiny.safetensors")
    assert main(["evaluate", "--dataset", "csv", "--csv", str(tmp_path / "scores.csv"), "--root", str(tmp_path),
                 "--checkpoint", str(checkpoint), "--test-fraction", "0.5", "--workers", "0"]) == 2
    assert capsys.readouterr().err == (
        "resmemnet evaluate: error: csv split 0 has 0 test image(s) to score, and a correlation needs 2: 1 listed "
        f"test image(s) absent from disk (relative paths start at {tmp_path}; `resmemnet dataset` lists absent "
        "images)\n")
