"""What the trainer feeds on: splits (real or synthetic), a seeded validation carve, and safe decoding.

Augmentation is a horizontal flip decided by a hash of (seed, epoch, image index), never by a
global RNG, so a run is the same with any number of DataLoader workers or processes, a resumed run
replays exactly, and a feature cache holding the two views (as-is and flipped) reproduces the
augmented frozen-phase training exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from resmemnet import data
from resmemnet.data.base import ImageScoreDataset, Split
from resmemnet.data.images import ImageLoadError

__all__ = ["SafeImages", "carve_validation", "collate_safe", "count_splits", "flip_for", "load_split",
           "synthetic_split", "with_validation"]


def flip_for(seed: int, epoch: int, index: int) -> int:
    """1 if image `index` is flipped in `epoch`, else 0; a pure function of its arguments."""
    return hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=1).digest()[0] & 1


class SafeImages(Dataset):
    """(index, tensor or None, score, error) rows: a bad file becomes an error row, never an exception."""

    def __init__(self, dataset: ImageScoreDataset, transform: Callable[[Any], torch.Tensor], *,
                 flip: Callable[[int], int] | None = None):
        self.dataset = dataset.with_transform(transform)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, float, str]:
        try:
            image, score = self.dataset[index]
        except ImageLoadError as exc:
            return index, None, float(self.dataset.scores[index]), f"{exc.source}: {exc.reason}"
        if self.flip is not None and self.flip(index):
            image = image.flip(-1)
        return index, image, float(score), ""


def collate_safe(rows: list[tuple[int, torch.Tensor | None, float, str]]
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[str]]:
    """-> (indices of good rows, stacked images or None, their scores, error messages of bad rows)."""
    good = [r for r in rows if r[1] is not None]
    errors = [r[3] for r in rows if r[1] is None]
    images = torch.stack([r[1] for r in good]) if good else None
    return (torch.tensor([r[0] for r in good], dtype=torch.long), images,
            torch.tensor([r[2] for r in good], dtype=torch.float32), errors)


def carve_validation(train: ImageScoreDataset, fraction: float, seed: int
                     ) -> tuple[ImageScoreDataset, ImageScoreDataset]:
    """A seeded random `fraction` of train becomes validation (for splits that ship none)."""
    n_val = max(2, round(len(train) * fraction))
    if len(train) - n_val < 2:
        raise ValueError(f"Cannot carve a validation set of {n_val} from {len(train)} training images; "
                         "lower val_fraction or use a bigger split")
    order = np.random.default_rng(seed).permutation(len(train))
    pick = lambda idx: ImageScoreDataset([train.paths[i] for i in idx], train.scores[idx])  # noqa: E731
    return pick(np.sort(order[n_val:])), pick(np.sort(order[:n_val]))


def synthetic_split(root: str | Path, *, split: int = 0, seed: int = 0, n: int = 48, size: int = 32) -> Split:
    """Small learnable data for tests and smoke runs: brightness + a colour cue sets the score.

    The images are written to `root` once (deterministic); the split (`split` index) shuffles them
    70/15/15 into train/val/test.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.2, 0.9, n).astype(np.float32)
    paths = []
    for i, s in enumerate(scores):
        path = root / f"syn_{seed}_{size}_{i:04d}.png"
        if not path.exists():
            noise = rng.normal(0, 20, (size, size, 3))
            base = np.array([255 * s, 128, 255 * (1 - s)])
            Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    order = np.random.default_rng([seed, split]).permutation(n)
    n_tr, n_va = int(0.7 * n), int(0.15 * n)
    pick = lambda idx: ImageScoreDataset([paths[i] for i in idx], scores[idx])  # noqa: E731
    return Split(pick(order[:n_tr]), pick(order[n_tr + n_va:]), pick(order[n_tr:n_tr + n_va]),
                 info={"dataset": "synthetic", "split": split, "seed": seed, "n": n})


def load_split(name: str, root: str | Path, *, split: int = 0, seed: int = 0, **kwargs: Any) -> Split:
    """`synthetic` here; every real dataset through resmemnet.data.load_split."""
    if name == "synthetic":
        return synthetic_split(root, split=split, seed=seed, **kwargs)
    return data.load_split(name, root, split=split, seed=seed, **kwargs)


def count_splits(name: str, root: str | Path) -> int:
    """How many splits a dataset defines (LaMem 5, LNSIM 25, ...); `synthetic` has 5."""
    return 5 if name == "synthetic" else data.num_splits(name, root)


def with_validation(split: Split, fraction: float, seed: int) -> Split:
    """The split itself if it has a validation set, else one with a seeded carve out of train."""
    if split.val is not None:
        return split
    train, val = carve_validation(split.train, fraction, seed)
    return replace(split, train=train, val=val, info={**split.info, "val_carved_fraction": fraction,
                                                      "val_carve_seed": seed})

