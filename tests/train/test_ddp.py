from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resmemnet.checkpoint import load_checkpoint
from resmemnet.data import load_split
from resmemnet.train.loop import train
from tests.train.conftest import TINY, tiny_config

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
RESMEMNET = str(Path(sys.executable).with_name("resmemnet"))
FROZEN = "{epochs=2, lr_min=1e-3, lr_max=1e-2, frozen=true}"


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_process_with_twice_the_batch(syn_root, tmp_path):
    """DistributedSampler splits each global batch across ranks and DDP averages the gradients, so the
    frozen phase (no dropout, deterministic flips) matches one process with batch 2 x 4 exactly."""
    overrides = [*TINY, "model.dropout=0.0", f"phases=[{FROZEN}, {{epochs=1, lr_min=1e-4, lr_max=1e-3}}]"]
    args = [TORCHRUN, "--standalone", "--nproc-per-node", "2", RESMEMNET, "train", "--dataset", "synthetic",
            "--root", str(syn_root), "--output", str(tmp_path / "ddp")]
    for o in overrides:
        args += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test rho") == 1  # only rank 0 reports

    single = train(tiny_config("model.dropout=0.0", "batch_size=8", f"phases=[{FROZEN}]"),
                   load_split("synthetic", syn_root, n=48), tmp_path / "single")
    ddp_log = list(csv.DictReader(open(tmp_path / "ddp" / "log.csv")))
    assert [r["cached"] for r in ddp_log] == ["True", "True", "False"]
    for ours, ref in zip(ddp_log[:2], single.history, strict=True):
        assert float(ours["train_loss"]) == pytest.approx(float(ref["train_loss"]), rel=1e-5)
        # Validation MSE is a smooth function of every head weight: equal to 1e-5 means the same weights.
        # (Not rho: an untrained trunk's near-tied predictions swap ranks on float summation order.)
        assert float(ours["val_mse"]) == pytest.approx(float(ref["val_mse"]), rel=1e-5)
    # the unfrozen epoch then trained the whole network under DDP, and only rank 0 wrote files
    assert load_checkpoint(tmp_path / "ddp" / "last.safetensors").metadata["epoch"] == 3
    assert sorted(p.name for p in (tmp_path / "ddp").glob("*.safetensors")) == [
        "best.safetensors", "last.safetensors", "resume.safetensors"]


def test_shutdown_leaves_the_process_group(tmp_path):
    import torch.distributed as dist

    from resmemnet.train.ddp import shutdown_distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    shutdown_distributed()
    assert not dist.is_initialized()
    shutdown_distributed()  # a second call (or one without a group) is a no-op
