"""A tiny saved-and-reloaded model and photo bytes, shared by the server tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resmemnet import Preprocessing, ResMemNet, create_model, load_model, save_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = create_model("mobilenet_v3_large", proj_dim=16, hidden_dim=8, preprocessing=Preprocessing(resize=(64, 64)))
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp("serve") / "tiny.safetensors",
                           metadata={"description": "tiny untrained test model"})


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path) -> ResMemNet:
    """Loaded the way the server loads it, so the model card carries the checkpoint metadata."""
    return load_model(tiny_checkpoint)


def photo_bytes(seed: int, size: tuple[int, int] = (80, 60), fmt: str = "JPEG") -> bytes:
    """A smooth random image (a blurred gradient plus noise), encoded in memory."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([(x * rng.uniform(1, 4) + y * rng.uniform(0, 3)) % 256 for _ in range(3)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()
