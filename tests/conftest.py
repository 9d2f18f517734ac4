"""Shared fixtures: small images made on the fly, and the path to ../shared/datasets when present."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    """The real dataset folder, or skip the test with the reason."""
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"real dataset {name!r} not present at {path}")
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_photo(path: Path, size: tuple[int, int] = (48, 40), seed: int = 0, fmt: str | None = None) -> Path:
    """A random RGB image written to `path` (format from the suffix unless given)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    for i in range(6):
        make_photo(tmp_path / f"img{i}.jpg", seed=i)
    return tmp_path


def write_png(path: Path, width: int, height: int, idat: bytes, *, colour_type: int = 2) -> Path:
    """An 8-bit PNG written chunk by chunk (colour type 0: grey, 2: RGB), for sizes Pillow would need
    gigabytes to encode and for headers that lie about the data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def make_big_png(path: Path, side: int) -> Path:
    """A side x side greyscale PNG (a repeating gradient), compressed row by row: 14000^2 pixels in ~1 MB and ~1 s."""
    row = b"\0" + (bytes(range(256)) * (side // 256 + 1))[:side]  # filter byte 0, then the pixels
    deflate = zlib.compressobj(9)
    return write_png(path, side, side, b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush(),
                     colour_type=0)
