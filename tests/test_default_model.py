"""The bundled models: each file is what `resmemnet train --config configs/<name>.toml` builds, and it works offline.

The numbers are checked by rebuilding, not by trusting the file: tests/train/test_bundled_recipe.py builds the
same recipe twice on a tiny LNSIM-shaped set, and the slow test here rescores the shipped file on the cached
features of the real held-out images (when a build left them in the feature cache).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from resmemnet.checkpoint import read_metadata
from resmemnet.cli import main
from resmemnet.data import load_split
from resmemnet.evaluate import evaluate
from resmemnet.metrics import spearman
from resmemnet.model.backbones import BackboneWeightsError
from resmemnet.model.config import ModelConfig
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.model.weights import get_weights, list_models
from resmemnet.predict import predict
from resmemnet.pretrained import DEFAULT_MODEL, bundled_file, load_model, resolve_checkpoint
from resmemnet.runtime import choose_precision
from resmemnet.train.cache import CachedRows, FeatureCache, cache_key
from resmemnet.train.config import TrainConfig, load_config
from resmemnet.train.targets import mean_targets, subject_split_test
from tests.conftest import make_photo, shared_dataset

REPO = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def default_model() -> ResMemNet:
    return load_model()


def test_default_is_the_whole_small_network_in_fp16() -> None:
    """The default needs no trunk package at load time: its whole ResNet-50 is in the file, in fp16."""
    assert DEFAULT_MODEL == "resmemnet-small" and DEFAULT_MODEL in list_models()
    path = resolve_checkpoint()
    assert path.is_file(), f"{path} missing: rebuild it with resmemnet train --config configs/{DEFAULT_MODEL}.toml"
    meta = read_metadata(path)
    assert meta["backbone_in_file"] is True and meta["config"]["backbone"] == "resnet50"
    assert 40e6 < path.stat().st_size < 60e6  # ~26M parameters at 2 bytes


def test_bundled_models_are_a_name_and_a_file() -> None:
    """Everything a bundled model states comes from its file's header: pretrained.py holds no copy to drift."""
    source = (REPO / "src" / "resmemnet" / "pretrained.py").read_text()
    assert "ModelConfig(" not in source and "lnsim_held_out_spearman\": 0." not in source
    assert list_models() == ["resmemnet-large", "resmemnet-small"]
    for name in list_models():
        weights, meta = get_weights(name), read_metadata(bundled_file(name))
        assert weights.arch == ModelConfig.from_dict(meta["config"]) and weights.meta["licence"] == meta["licence"]
        assert weights.preprocessing == Preprocessing.from_dict(meta["preprocessing"])
        assert weights.meta["metrics"]["lnsim_held_out_spearman"] == round(meta["test_spearman"], 3)


@pytest.mark.parametrize("name", list_models())
def test_file_was_built_by_its_config_and_command(name: str) -> None:
    meta = read_metadata(resolve_checkpoint(name))
    config_file = f"configs/{name}.toml"
    assert meta["name"] == name and meta["config_file"] == config_file
    assert meta["command"] == (f"resmemnet train --config {config_file} --dataset lnsim --root "
                               f"../shared/datasets/lnsim --output runs/{name}")
    # the shipped file was trained with exactly the config in the repository, as the candidate that
    # validation chose (settings that leave the result alone may differ)
    config = load_config(REPO / config_file)
    if config.candidates:
        chosen = meta["chosen_candidate"]
        assert [row["candidate"] for row in meta["candidates"]] == [c.name for c in config.candidates]
        assert max(meta["candidates"], key=lambda row: row["val_spearman"])["candidate"] == chosen
        config = config.for_candidate(chosen)
    expected = config.to_dict()
    stored = TrainConfig.from_dict(meta["train_config"]).to_dict()  # options added since take their defaults
    for key in ("workers", "progress", "device"):
        expected.pop(key), stored.pop(key)
    assert stored == expected
    assert "Non-commercial" in meta["licence"] and "University of Chicago" in meta["licence"]
    assert "lnsim" in meta["training_data"] and "mean score" in meta["training_data"]
    every = meta["test"]["every_subject_split"]
    assert every["n"] == 25 and meta["test_spearman"] == every["mean"] and meta["test"]["n"] == 447
    assert meta["test_spearman"] < every["human"]  # below the human split-half ceiling
    assert meta["calibration"]["slope"] > 0
    with safe_open(resolve_checkpoint(name), framework="pt") as f:  # in the configured dtype; a frozen trunk is not
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith("num_batches_tracked")}
        assert dtypes == {"F16" if config.head_dtype == "float16" else "F32"}
        assert any(k.startswith("backbone.") for k in f.keys()) == (not config.frozen_throughout)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_recorded_test_rho_is_the_files_on_the_held_out_features(name: str) -> None:
    """Rescore the shipped file on the 447 held-out images (a frozen trunk's: their cached features): same rho."""
    meta = read_metadata(resolve_checkpoint(name))
    config = load_config(REPO / meta["config_file"])
    split = load_split("lnsim", shared_dataset("lnsim"), split=0, seed=config.seed)
    if not config.frozen_throughout:  # the trunk trained: its file holds it, so the images are scored again
        model = load_model(name)
        scored = evaluate(model, split.test, precision=meta["test_precision"], workers=2)
        again = subject_split_test(split.info, [split.test.paths[i] for i in scored.positions], scored.predicted)
        assert again["mean"] == pytest.approx(meta["test_spearman"], abs=1e-4)
        return
    for package in get_weights(config.model.backbone_weights).meta["package"].split(", "):
        pytest.importorskip(package)
    model = load_model(name)
    precision = choose_precision(config.precision, torch.device("cpu")).name  # what the build ran in
    key = cache_key(model, split.test, 1, config.cache_dtype, precision=precision)
    folder = Path(config.cache_dir).expanduser() / key
    if not (folder / "meta.json").is_file():
        pytest.skip(f"no feature cache of the held-out images at {folder}: run the build command first")
    rows = CachedRows.of(FeatureCache.open(folder))
    scored = evaluate(model, rows, split.test.scores, precision="fp32")
    again = subject_split_test(split.info, [split.test.paths[i] for i in scored.positions], scored.predicted)
    assert again["mean"] == pytest.approx(meta["test_spearman"], abs=1e-4)


def test_loads_offline_and_scores_in_unit_range(default_model: ResMemNet, tmp_path: Path) -> None:
    scores = predict([make_photo(tmp_path / "photo.jpg", size=(64, 48))], default_model)
    assert scores.shape == (1,) and 0 < scores[0] < 1


def test_missing_resmem_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "resmem" else real(n, *a))
    with pytest.raises(BackboneWeightsError, match="pip install resmem"):
        load_model("resmemnet-large")  # rebuilt from the resmem package (the default holds its whole trunk)


def test_info_json_names_default_checkpoint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert Path(info["checkpoint"]) == bundled_file(DEFAULT_MODEL)
    assert {"licence", "training_data", "test_spearman"} <= set(info["metadata"])


@pytest.mark.slow
def test_ranks_held_out_lnsim_photos_like_people(default_model: ResMemNet) -> None:
    """From the image files, as users score them: held-out photos rank like the mean human score."""
    split = load_split("lnsim", shared_dataset("lnsim"), split=0, seed=0)
    paths = split.test.paths[:24]
    scores = predict(paths, default_model)
    human = mean_targets(split.info, paths)
    assert spearman(scores, human) > 0.2
