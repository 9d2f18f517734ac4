"""A tiny saved-and-reloaded model and photo bytes, shared by the server tests."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
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


@contextlib.contextmanager
def running_server(config_kwargs: dict, app: object) -> Iterator[tuple[str, int]]:
    """uvicorn serving `app` on a free loopback port in a background thread; yields (host, port)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config_kwargs))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
