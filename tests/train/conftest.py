"""Tiny settings shared by the trainer tests: a small mobilenet on 32x32 synthetic images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resmemnet.data import load_split
from resmemnet.data.base import Split
from resmemnet.train.config import TrainConfig, load_config

TINY = ["model.backbone=mobilenet_v3_large", "model.proj_dim=16", "model.hidden_dim=8", "image_size=32",
        "batch_size=4", "workers=0", "precision=fp32", "progress=false", "cache_dtype=float32"]


def tiny_config(*overrides: str) -> TrainConfig:
    return load_config(None, [*TINY, *overrides])


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP threads make tiny runs 5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def syn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture
def tiny_split(syn_root: Path) -> Split:
    return load_split("synthetic", syn_root, n=32, size=32)
