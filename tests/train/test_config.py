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


# Every documented bad input of `resmemnet train --set`: one ValueError naming the key, never a traceback.
BAD_OVERRIDES = [
    (["batch_size=2.5"], r"batch_size: Input should be a valid integer \(got 2.5\)"),
    (["lr=1"], "Unknown config key 'lr'"),
    (["model.depth=3"], "Unknown config key 'model.depth'"),
    (["augment=mixup"], "augment: Input should be 'none' or 'hflip'"),
    (["phases.0.epochs=\"ten\""], "phases.0.epochs: Input should be a valid integer"),
    (["phases.0.frozen=1"], "phases.0.frozen: Input should be a valid boolean"),
    (["batch_size"], "key=value"),
    (["phases.0.lr_max=inf"], r"phases.0.lr_max: Input should be a finite number \(got inf\)"),
    (["weight_decay=nan"], "weight_decay: Input should be a finite number"),
    (["phases.99.epochs=1"], r"phases has 3 entries \(indices 0..2\), not '99'"),
    (["phases.x.epochs=1"], "phases has 3 entries"),
    (["batch_size.x=1"], r"batch_size is a value \(24\), not a table or list"),
    (["nope.x=1"], "nope does not exist"),
    (["batch_size=-3"], "batch_size: Input should be greater than or equal to 1"),
    (["batch_size=100000000"], "batch_size: Input should be less than or equal to 65536"),
    (["image_size=1000000"], "image_size: Input should be less than or equal to 1024"),
    (["image_size=64", "crop=96"], "crop 96 is larger than image_size 64"),
    (["model.proj_dim=1000000"], "proj_dim must be an integer in 1..4096"),
    (["phases.0.epochs=0", "phases.1.epochs=0", "phases.2.epochs=0"], "every phase has 0 epochs"),
    (["phases=[]"], "phases: Tuple should have at least 1 item"),
    (["phases.0.lr_min=0.5"], "needs lr_min <= lr_max"),
    (["phases.0.lr_min=0"], "phases.0.lr_min: Input should be greater than 0"),
    (["val_fraction=1"], "val_fraction: Input should be less than 1"),
    (["precision=fp8"], "precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
    (["standardise=true"], "standardise=true needs every phase frozen"),
    (["model.backbone=vgg"], "Unknown backbone 'vgg'"),
    (["..=1"], "empty key part"),
    (["phases=[{epochs=1}]"], "phases.0.lr_min: Field required; phases.0.lr_max: Field required"),
    (["model.members=4"], "members > 1 needs head 'linear-ensemble' or 'gated-ensemble'"),
    (["model.members=100000"], "members must be an integer in 1..256"),
    (["model.head='linear-ensemble'"], "is fitted in closed form on cached features: give one frozen phase"),
    (["ensemble_groups=['all']"], "ensemble_groups needs an ensemble head"),
    (["gate_dirs=['x']"], "gate_dirs need head 'gated-ensemble', not 'lstm'"),
    (["model.head='gated-ensemble'", "augment='none'", "phases=[{epochs=1, lr_min=1e-3, lr_max=1e-3, frozen=true}]",
      "fallback_groups=['all']"], "head 'gated-ensemble' needs fallback_groups, gate_groups and gate_dirs"),
    (["gate_c=0"], "gate_c: Input should be greater than 0"),
    (["distil_dirs=['x']"], "distil_dirs needs a source of targets"),
    (["ridge_alphas=[]"], "ridge_alphas: Tuple should have at least 1 item"),
    (["ridge_alphas=[-1.0]"], "ridge_alphas.0: Input should be greater than 0"),
    (["crop=-1"], "crop: Input should be greater than or equal to 0"),
]


@pytest.mark.parametrize(("override", "message"), BAD_OVERRIDES)
def test_bad_values_fail_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message) as info:
        load_config(None, override)
    assert "\n" not in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = = 3")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(bad)


def test_configs_are_json_without_infinity(tmp_path):
    for path in CONFIGS.glob("*.toml"):
        c = load_config(path)
        assert "Infinity" not in c.to_json() and "NaN" not in c.to_json()
    c = load_config(CONFIGS / "resmemnet-small.toml")
    assert (c.teacher, c.frozen_until, c.calibrate, c.target, c.head_dtype) == (
        "resmemnet-large", "layer2", True, "mean", "float16")


def test_round_trip_through_dict():
    c = load_config(None, ["phases=[{epochs=1, lr_min=0.1, lr_max=0.2, frozen=true}]", "cost_lambda=0.5"])
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert c.phases == (PhaseConfig(epochs=1, lr_min=0.1, lr_max=0.2, frozen=True),)
