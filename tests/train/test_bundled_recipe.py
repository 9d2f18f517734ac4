"""The default model's recipe (configs/resmemnet-small.toml) on a tiny LNSIM-shaped dataset made here.

A tiny teacher stands in for resmemnet-large and a smaller trunk for the ResNet-50; the recipe is otherwise the
shipped one: teacher targets blended with human scores, extra photos, cached layer2 maps, two phases, candidates
chosen on validation. Built twice, it gives identical files; its test rho over every subject split is the saved
checkpoint's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from scipy.io import loadmat, savemat

from resmemnet.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from resmemnet.data import load_split
from resmemnet.metrics import spearman
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.resmemnet import create_model
from resmemnet.predict import predict
from resmemnet.train.config import load_config
from resmemnet.train.loop import train

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "resmemnet-small.toml"
SMALL = ["model.backbone_weights=none", "model.proj_dim=16", "model.hidden_dim=8", "image_size=32", "batch_size=4",
         "workers=0", "precision=fp32", "progress=false", "cache_dtype=float32", "cache_dir=''",
         "val_fraction=0.25", "name='tiny'", "phases.0.epochs=2", "phases.1.epochs=2"]


def make_lnsim(root: Path, n: int = 40, subject_splits: int = 3) -> np.ndarray:
    """Image_data/NNNN.jpg whose colour follows a hidden score, and noisy split-half hit rates of it."""
    rng = np.random.default_rng(7)
    score = rng.uniform(0.2, 0.9, n)
    (root / "Image_data").mkdir(parents=True)
    (root / "Random_splits").mkdir()
    for i, s in enumerate(score):
        pixels = np.array([255 * s, 128, 255 * (1 - s)]) + rng.normal(0, 20, (32, 32, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "Image_data" / f"{i + 1:04d}.jpg")
    for k in (1, 2):
        halves = np.clip(score + rng.normal(0, 0.05, (subject_splits, n)), 0, 1)
        savemat(root / "Random_splits" / f"subject_hrs{k}.mat", {f"subject_hrs{k}": halves})
    return score


@pytest.mark.slow
def test_bundled_recipe_builds_identical_files_twice_and_tests_every_subject_split(tmp_path):
    make_lnsim(tmp_path / "lnsim")
    torch.manual_seed(0)
    stand_in = create_model("mobilenet_v3_large", proj_dim=8, hidden_dim=4,
                            preprocessing=Preprocessing(resize=(32, 32)))
    teacher = save_checkpoint(stand_in.eval(), tmp_path / "t.safetensors")
    (tmp_path / "photos").mkdir()
    for i in range(6):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    config = load_config(CONFIG, [*SMALL, f"teacher={str(teacher)!r}", f"distil_dirs=[{str(tmp_path / 'photos')!r}]"])
    assert (config.frozen_until, config.calibrate, config.target, config.head_dtype) == ("layer2", True, "mean",
                                                                                        "float16")
    split = load_split("lnsim", tmp_path / "lnsim", split=0, seed=0)
    first = train(config, split, tmp_path / "a")
    second = train(config, split, tmp_path / "b")

    a, b = load_file(first.best_checkpoint), load_file(second.best_checkpoint)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert first.test == second.test
    assert a["head.fc.weight"].dtype == a["backbone.net.layer4.0.conv1.weight"].dtype == torch.float16
    assert first.chosen_candidate in ("human-0.5", "human-0.2", "human-0.8")

    meta = read_metadata(first.best_checkpoint)
    assert meta["name"] == "tiny" and meta["calibration"]["slope"] > 0
    # the recorded test rho is the shipped file's: recompute it from its predictions on the image files
    hrs2 = loadmat(tmp_path / "lnsim" / "Random_splits" / "subject_hrs2.mat")["subject_hrs2"]
    columns = [int(p.stem) - 1 for p in split.test.paths]
    scores = predict(split.test.paths, load_checkpoint(first.best_checkpoint))
    per_split = [spearman(scores, hrs2[s, columns]) for s in range(hrs2.shape[0])]
    assert meta["test_spearman"] == pytest.approx(np.mean(per_split), abs=1e-6)
    assert meta["test"]["every_subject_split"]["n"] == 3
    assert meta["test_spearman"] > 0.5  # the colour cue is learnable: an untrained head ranks at chance
