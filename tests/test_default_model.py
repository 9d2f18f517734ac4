"""The bundled default model: shipped file, its metadata, loading offline, and its scores on real photos."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from resmemnet.checkpoint import read_metadata
from resmemnet.cli import main
from resmemnet.metrics import spearman
from resmemnet.model.backbones import BackboneWeightsError
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.predict import predict
from resmemnet.pretrained import BUNDLED, DEFAULT_MODEL, load_model, resolve_checkpoint
from tests.conftest import make_photo, shared_dataset

needs_resmem = pytest.mark.skipif(importlib.util.find_spec("resmem") is None,
                                  reason="the default model rebuilds its backbone from the resmem package "
                                         "(pip install resmem)")


@pytest.fixture(scope="module")
def default_model() -> ResMemNet:
    return load_model()


def test_default_is_bundled_and_head_only() -> None:
    assert DEFAULT_MODEL in BUNDLED
    path = resolve_checkpoint()
    assert path.is_file(), f"{path} missing: run scripts/build_default_model.py"
    meta = read_metadata(path)
    assert meta["backbone_in_file"] is False
    assert meta["config"]["backbone_weights"] == "resmem"
    assert path.stat().st_size < 10_000_000  # the head only; a full ResNet-152 would be ~120 MB in fp16


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_metadata_states_licence_data_and_test_rho(name: str) -> None:
    meta = read_metadata(resolve_checkpoint(name))
    assert meta["name"] == name and meta["backbone_in_file"] is False
    assert "Non-commercial" in meta["licence"] and "University of Chicago" in meta["licence"]
    assert "LNSIM" in meta["training_data"]
    held_out = meta["results"]["held_out_split_half"]
    assert meta["test_spearman"] > held_out["resmem"]["mean"] + 0.05  # clearly beats resmem, same test images
    assert meta["test_spearman"] < held_out["human"]["mean"]
    assert meta["preprocessing"]["mean"] == [0.0, 0.0, 0.0]  # the resmem trunk takes [0, 1] inputs


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
    assert Path(info["checkpoint"]).name == BUNDLED[DEFAULT_MODEL]
    assert {"licence", "training_data", "test_spearman"} <= set(info["metadata"])


@needs_resmem
def test_reproduces_its_reference_scores_on_lnsim(default_model: ResMemNet) -> None:
    """Held-out LNSIM photos scored at build time score the same from the files with the installed resmem."""
    root = shared_dataset("lnsim").parent
    reference = read_metadata(resolve_checkpoint())["reference_scores"]
    n = 8  # of the 24 recorded: enough to catch a changed trunk, preprocessing or head, cheap on a CPU
    scores = predict([root / name for name in reference["images"][:n]], default_model)
    np.testing.assert_allclose(scores, reference["scores"][:n], atol=0.01)


def test_reference_scores_rank_like_people() -> None:
    reference = read_metadata(resolve_checkpoint())["reference_scores"]
    assert spearman(reference["scores"], reference["human"]) > 0.2
