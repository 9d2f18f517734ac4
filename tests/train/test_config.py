from __future__ import annotations

from pathlib import Path

import pytest

from resmemnet.train.config import PAPER_PHASES, PhaseConfig, TrainConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_are_the_papers_recipe():
    c = TrainConfig()
    assert (c.batch_size, c.image_size, c.weight_decay, c.adam_eps, c.cost_lambda) == (24, 224, 1e-4, 1e-6, 0.0)
    assert [(p.epochs, p.lr_min, p.lr_max, p.frozen) for p in c.phases] == [
        (10, 1e-3, 1e-2, True), (15, 1e-4, 1e-3, False), (15, 1e-5, 1e-4, False)]
    assert c.total_epochs == 40


def test_paper_toml_matches_defaults_except_weights():
    c = load_config(CONFIGS / "paper.toml")
    assert c.phases == PAPER_PHASES
    assert c.model.backbone == "resnet50" and c.model.backbone_weights == "IMAGENET1K_V1"


def test_cli_overrides_beat_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('batch_size = 8\nseed = 3\n[model]\nhead = "bilstm"\n')
    c = load_config(path, ["batch_size=16", "model.proj_dim=32", "phases.1.epochs=2", "model.backbone_weights=none"])
    assert (c.batch_size, c.seed, c.model.head, c.model.proj_dim, c.phases[1].epochs) == (16, 3, "bilstm", 32, 2)
    assert c.model.backbone_weights is None
    assert c.weight_decay == 1e-4  # untouched keys keep their defaults


@pytest.mark.parametrize(("override", "message"), [
    (["batch_size=2.5"], "batch_size must be int"),
    (["lr=1"], "Unknown config key"),
    (["model.depth=3"], "Unknown config key"),
    (["augment=mixup"], "available: none, hflip"),
    (["phases.0.epochs=\"ten\""], "epochs must be int"),
    (["phases.0.frozen=1"], "frozen must be bool"),
    (["batch_size"], "key=value"),
])
def test_bad_values_fail_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = = 3")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(bad)


def test_round_trip_through_dict():
    c = load_config(None, ["phases=[{epochs=1, lr_min=0.1, lr_max=0.2, frozen=true}]", "cost_lambda=0.5"])
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert c.phases == (PhaseConfig(1, 0.1, 0.2, True),)
