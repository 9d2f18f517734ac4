"""Small learnable data for tests and smoke runs: brightness and a colour cue set each image's score.

The images are written under `root` once (deterministic for a seed and size), named
`syn_<seed>_<size>_NNNN.png`; split index `split` shuffles them 70/15/15 into train/val/test with
numpy's default_rng([seed, split]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from resmemnet.data._common import check_split, part_counts, present_mask, subset, table_description
from resmemnet.data.base import Split

__all__ = ["NUM_SPLITS", "OPTIONS", "describe", "load_split", "num_splits"]

OPTIONS = ("n", "size")
NUM_SPLITS = 5
DESCRIBED_SEED = 0  # describe() shows the image set of this seed


def _scores(seed: int, n: int) -> tuple[np.random.Generator, np.ndarray]:
    """The scores of seed's images, and the generator that then draws their pixel noise."""
    rng = np.random.default_rng(seed)
    return rng, rng.uniform(0.2, 0.9, n).astype(np.float32)


def _paths(root: Path, seed: int, n: int, size: int) -> list[Path]:
    return [root / f"syn_{seed}_{size}_{i:04d}.png" for i in range(n)]


def _write_images(root: Path, seed: int, n: int, size: int) -> tuple[list[Path], np.ndarray]:
    """Each image is a colour from red (score 0.9) to blue (0.2) plus noise; only missing files are written."""
    root.mkdir(parents=True, exist_ok=True)
    rng, scores = _scores(seed, n)
    paths = _paths(root, seed, n, size)
    for path, s in zip(paths, scores, strict=True):
        if not path.exists():
            noise = rng.normal(0, 20, (size, size, 3))
            base = np.array([255 * s, 128, 255 * (1 - s)])
            Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)
    return paths, scores


def num_splits(root: str | Path, **options: Any) -> int:
    return NUM_SPLITS


def load_split(root: str | Path, *, split: int = 0, seed: int = 0, test_fraction: float = 0.2,
               n: int = 48, size: int = 32) -> Split:
    """Train/val/test of `n` images of `size` x `size` pixels; `test_fraction` does not apply (70/15/15)."""
    check_split(split, NUM_SPLITS, "synthetic")
    if n < 7:
        raise ValueError(f"synthetic needs n >= 7 images for a 70/15/15 split with 2 test images, got n={n}")
    paths, scores = _write_images(Path(root), seed, n, size)
    order = np.random.default_rng([seed, split]).permutation(n)
    n_train, n_val = int(0.7 * n), int(0.15 * n)
    present = present_mask(paths)
    parts = {"train": subset(paths, scores, order[:n_train], present),
             "val": subset(paths, scores, order[n_train:n_train + n_val], present),
             "test": subset(paths, scores, order[n_train + n_val:], present)}
    return Split(train=parts["train"].dataset, test=parts["test"].dataset, val=parts["val"].dataset,
                 info={"dataset": "synthetic", "root": str(root), "split": split, "seed": seed, "n": n, "size": size,
                       "protocol": "synthetic: default_rng([seed, split]) permutation, 70/15/15 train/val/test",
                       **part_counts(parts)})


def describe(root: str | Path, *, n: int = 48, size: int = 32) -> dict[str, Any]:
    """The image set of seed 0 (other seeds write other images); describing writes nothing."""
    _, scores = _scores(DESCRIBED_SEED, n)
    return {**table_description("synthetic", _paths(Path(root), DESCRIBED_SEED, n, size), scores.astype(np.float64),
                                {"seed": DESCRIBED_SEED, "n": n, "size": size}),
            "splits": {"count": NUM_SPLITS, "image_split": "made in code: numpy default_rng([seed, split]), "
                                                           "70/15/15 train/val/test"}}
