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
from safetensors import safe_open

from resmemnet.checkpoint import read_metadata
from resmemnet.cli import main
from resmemnet.data import load_split
from resmemnet.metrics import spearman
from resmemnet.model.backbones import BackboneWeightsError
from resmemnet.model.config import ModelConfig
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.model.weights import get_weights, list_models
from resmemnet.predict import predict
from resmemnet.pretrained import DEFAULT_MODEL, bundled_file, load_model, resolve_checkpoint
from resmemnet.train.cache import CachedRows, FeatureCache, cache_key
from resmemnet.train.config import TrainConfig, load_config
from resmemnet.train.loop import predict_rows
from resmemnet.train.targets import mean_targets, subject_split_test
from tests.conftest import make_photo, shared_dataset

REPO = Path(__file__).resolve().parents[1]

needs_resmem = pytest.mark.skipif(importlib.util.find_spec("resmem") is None,
                                  reason="the default model rebuilds its backbone from the resmem package "
                                         "(pip install resmem)")


@pytest.fixture(scope="module")
def default_model() -> ResMemNet:
    return load_model()


def test_default_is_bundled_and_head_only() -> None:
    assert DEFAULT_MODEL in list_models()
    path = resolve_checkpoint()
    assert path.is_file(), f"{path} missing: rebuild it with resmemnet train --config configs/{DEFAULT_MODEL}.toml"
    meta = read_metadata(path)
    assert meta["backbone_in_file"] is False
    assert meta["config"]["backbone_weights"] == "resmem"
    assert path.stat().st_size < 10_000_000  # the head only; a full ResNet-152 would be ~120 MB in fp16


@pytest.mark.parametrize("name", list_models())
def test_registration_matches_its_file(name: str) -> None:
    weights = get_weights(name)
    meta = read_metadata(bundled_file(name))
    assert ModelConfig.from_dict(meta["config"]) == weights.arch  # keys added since (members) take their defaults
    assert meta["licence"] == weights.meta["licence"]
    assert Preprocessing.from_dict(meta["preprocessing"]) == weights.preprocessing  # the trunk's [0, 1] inputs
    assert (REPO / weights.meta["config_file"]).is_file()
    assert round(meta["test_spearman"], 3) == weights.meta["metrics"]["lnsim_held_out_spearman"]


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
    with safe_open(resolve_checkpoint(name), framework="pt") as f:  # head-only, in the configured dtype
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16" if config.head_dtype == "float16" else "F32"}
        assert not any(k.startswith("backbone.") for k in f.keys())


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_recorded_test_rho_is_the_files_on_the_held_out_features(name: str) -> None:
    """Rescore the shipped file on the cached trunk features of the 447 held-out images: same rho as recorded."""
    meta = read_metadata(resolve_checkpoint(name))
    config = load_config(REPO / meta["config_file"])
    for package in get_weights(config.model.backbone_weights).meta["package"].split(", "):
        pytest.importorskip(package)
    split = load_split("lnsim", shared_dataset("lnsim"), split=0, seed=config.seed)
    model = load_model(name)
    key = cache_key(model, split.test, 1, config.cache_dtype)
    folder = Path(config.cache_dir).expanduser() / key
    if not (folder / "meta.json").is_file():
        pytest.skip(f"no feature cache of the held-out images at {folder}: run the build command first")
    rows = CachedRows.of(FeatureCache.open(folder))
    scores, idx, _ = predict_rows(model, rows, precision="fp32")
    again = subject_split_test(split.info, [split.test.paths[i] for i in idx], scores)
    assert again["mean"] == pytest.approx(meta["test_spearman"], abs=1e-4)


@needs_resmem
def test_loads_offline_and_scores_in_unit_range(default_model: ResMemNet, tmp_path: Path) -> None:
    scores = predict([make_photo(tmp_path / "photo.jpg", size=(64, 48))], default_model)
    assert scores.shape == (1,) and 0 < scores[0] < 1


def test_missing_resmem_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "resmem" else real(n, *a))
    with pytest.raises(BackboneWeightsError, match="pip install resmem"):
        load_model()


@needs_resmem
def test_info_json_names_default_checkpoint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert Path(info["checkpoint"]) == bundled_file(DEFAULT_MODEL)
    assert {"licence", "training_data", "test_spearman"} <= set(info["metadata"])


@pytest.mark.slow
@needs_resmem
def test_ranks_held_out_lnsim_photos_like_people(default_model: ResMemNet) -> None:
    """From the image files, as users score them: held-out photos rank like the mean human score."""
    split = load_split("lnsim", shared_dataset("lnsim"), split=0, seed=0)
    paths = split.test.paths[:24]
    scores = predict(paths, default_model)
    human = mean_targets(split.info, paths)
    assert spearman(scores, human) > 0.2
