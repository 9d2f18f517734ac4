"""LNSIM (Lu et al., IEEE TIP 2020): outdoor natural scenes with split-half human scores.

Layout: `<root>/Image_data/NNNN.jpg` and `<root>/Random_splits/subject_hrs{1,2}.mat` (25 x N each; column
i is image i+1). LNSIM ships no image train/test files, so the image split is made here, seeded by
(seed, split), and recorded in `Split.info`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.io import loadmat

from resmemnet.data._common import (
    Transform,
    check_split,
    present_mask,
    seeded_split,
    seeded_split_info,
    split_half_description,
    split_half_split,
)
from resmemnet.data.base import Split

__all__ = ["OPTIONS", "describe", "load_split", "num_splits"]

OPTIONS: tuple[str, ...] = ()


def _halves(root: Path) -> tuple[np.ndarray, np.ndarray]:
    halves = []
    for k in (1, 2):
        path = root / "Random_splits" / f"subject_hrs{k}.mat"
        if not path.is_file():
            raise FileNotFoundError(f"LNSIM score file {path} not found; --root must be the LNSIM folder holding "
                                    "Image_data/ and Random_splits/")
        data = loadmat(path)
        if f"subject_hrs{k}" not in data:
            raise ValueError(f"{path} has no variable subject_hrs{k} (found: {', '.join(sorted(data))})")
        halves.append(np.asarray(data[f"subject_hrs{k}"], dtype=np.float64))
    if halves[0].shape != halves[1].shape or halves[0].ndim != 2:
        raise ValueError(f"subject_hrs1 {halves[0].shape} and subject_hrs2 {halves[1].shape} must be the same "
                         "splits x images matrix")
    return halves[0], halves[1]


def _paths(root: Path, n: int) -> list[Path]:
    return [root / "Image_data" / f"{i:04d}.jpg" for i in range(1, n + 1)]


def num_splits(root: str | Path) -> int:
    return int(_halves(Path(root))[0].shape[0])


def load_split(root: str | Path, *, split: int = 0, seed: int = 0, test_fraction: float = 0.2,
               transform: Transform = None) -> Split:
    root = Path(root)
    hrs1, hrs2 = _halves(root)
    check_split(split, hrs1.shape[0], "LNSIM")
    paths = _paths(root, hrs1.shape[1])
    train_idx, test_idx = seeded_split(len(paths), seed=seed, split=split, test_fraction=test_fraction)
    info = {"dataset": "lnsim", "root": str(root), "seed": seed,
            "image_split": seeded_split_info(seed, split, test_fraction, train_idx, test_idx)}
    return split_half_split(paths, present_mask(paths), hrs1, hrs2, train_idx, test_idx, split=split,
                            transform=transform, info=info)


def describe(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    hrs1, hrs2 = _halves(root)
    paths = _paths(root, hrs1.shape[1])
    extra = {"image_split": "made in code: numpy default_rng([seed, split]), test_fraction of all listed images"}
    return split_half_description("lnsim", paths, present_mask(paths), hrs1, hrs2, extra)
