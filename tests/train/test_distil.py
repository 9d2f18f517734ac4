"""Distillation from a teacher's scores, with a partly trained trunk read from cached maps (resmemnet-small)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from resmemnet.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.resmemnet import create_model
from resmemnet.predict import predict
from resmemnet.train.config import load_config
from resmemnet.train.loop import train
from resmemnet.train.teacher import teacher_cache_file, teacher_scores
from tests.train.conftest import tiny_config


@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    """A tiny model standing in for resmemnet-large: its scores are the student's targets."""
    torch.manual_seed(1)
    model = create_model("mobilenet_v3_large", proj_dim=8, hidden_dim=4, preprocessing=Preprocessing(resize=(32, 32)))
    return save_checkpoint(model.eval(), tmp_path / "teacher.safetensors")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Unlabelled photos, one of them corrupt."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_trunk_rows_restart_the_trunk_exactly():
    """Cached rows (frozen taps pooled + the last frozen map) give every pooled tap, as the whole trunk does."""
    model = create_model("resnet50").eval()
    images = torch.rand(2, 3, 64, 64)
    start = model.backbone.stage_end("layer2")
    assert start == 7  # layer1 (3 blocks) + layer2 (4 blocks)
    with torch.no_grad():
        assert torch.allclose(model.pool_rows(model.trunk_rows(images, start), start), model.pool_taps(images),
                              atol=1e-5)
    with pytest.raises(ValueError, match="not a stage before the last"):
        model.backbone.stage_end("layer4")
    with pytest.raises(ValueError, match="only ResNets"):
        create_model("mobilenet_v3_large").backbone.stage_end("layer1")


def test_teacher_scores_are_its_predictions_and_computed_once(teacher, photos, tmp_path):
    paths = [*sorted(str(p) for p in photos.glob("p*.png")), str(photos / "broken.png")]
    scores = teacher_scores(str(teacher), paths, tmp_path / "cache", precision="fp32", workers=0)
    assert np.allclose(scores[:-1], predict(paths[:-1], load_checkpoint(teacher)), atol=1e-6)
    assert np.isnan(scores[-1])  # an unreadable photo has no target
    cache = teacher_cache_file(str(teacher), tmp_path / "cache", "fp32")
    before = cache.stat().st_mtime_ns
    again = teacher_scores(str(teacher), paths[2:], tmp_path / "cache", precision="fp32", workers=0)
    assert cache.stat().st_mtime_ns == before  # nothing new: nothing scored
    assert np.array_equal(again, scores[2:], equal_nan=True)


def test_student_trains_its_later_blocks_from_cached_maps_on_teacher_targets(tiny_split, teacher, photos, tmp_path):
    config = tiny_config("model.backbone=resnet50", f"teacher={str(teacher)!r}", "human_weight=0.25",
                         f"distil_dirs=[{str(photos)!r}]", "frozen_until='layer2'", "augment='hflip'",
                         "head_dtype='float16'",
                         "phases=[{epochs=1, lr_min=1e-3, lr_max=1e-2, frozen=true}, "
                         "{epochs=2, lr_min=1e-4, lr_max=1e-3}]")
    result = train(config, tiny_split, tmp_path / "run")
    log = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [r["cached"] for r in log] == ["True", "False", "False"]
    torch.manual_seed(config.seed)  # the run's initial weights
    start = create_model(config.model, preprocessing=Preprocessing(resize=(32, 32))).state_dict()
    last = load_checkpoint(result.last_checkpoint).state_dict()
    prefix = ("backbone.net.conv1.", "backbone.net.bn1.", "backbone.net.layer1.", "backbone.net.layer2.")
    frozen = [k for k in start if k.startswith(prefix)]
    trained = [k for k in start if k.startswith("backbone.net.layer4.") and k.endswith("conv1.weight")]
    assert frozen and trained
    assert all(torch.equal(last[k], start[k]) for k in frozen)  # the cached blocks never change
    assert all(not torch.allclose(last[k], start[k]) for k in trained)
    with safe_open(result.best_checkpoint, "pt") as f:  # the shipped file: the whole network in fp16
        assert {f.get_slice(k).get_dtype() for k in f.keys() if "num_batches" not in k} == {"F16"}
    meta = read_metadata(result.best_checkpoint)
    assert meta["backbone_in_file"] is True and meta["train_config"]["teacher"] == str(teacher)
    # the train rows: the 25 carved-in train images (targets blended) and the 7 readable photos (teacher's)
    assert "plus distillation rows" in meta["training_data"]


def test_teacher_config_is_checked():
    with pytest.raises(ValueError, match="teacher gives every target"):
        load_config(None, ["teacher='resmemnet-large'", "distil_tap='resmem.score'", "distil_dirs=['x']"])
    with pytest.raises(ValueError, match="distil_dirs needs a source of targets"):
        load_config(None, ["distil_dirs=['x']"])
    with pytest.raises(ValueError, match="human_weight"):
        load_config(None, ["teacher='resmemnet-large'", "human_weight=1.5"])
    with pytest.raises(ValueError, match="square inputs without a crop"):
        load_config(None, ["frozen_until='layer2'", "crop=24"])
