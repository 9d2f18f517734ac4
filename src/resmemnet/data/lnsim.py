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
    check_split,
    check_split_halves,
    present_mask,
    seeded_split,
    seeded_split_info,
    split_half_description,
    split_half_split,
)
from resmemnet.data.base import Split

__all__ = ["OPTIONS", "describe", "load_split", "num_splits", "split_half_scores"]

OPTIONS: tuple[str, ...] = ()


def split_half_scores(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """LNSIM's split-half hit rates (hrs1, hrs2): two splits x images matrices, column i is image i + 1.

    Row s holds the hit rates from the two random halves of the participants in subject split s: the
    split-half protocol trains on hrs1 and tests against hrs2, and their mean is the all-participant
    score. NaN means nobody in that half saw the image.
    """
    root = Path(root)
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
    check_split_halves(halves[0], halves[1], root / "Random_splits")
    return halves[0], halves[1]


def _paths(root: Path, n: int) -> list[Path]:
    return [root / "Image_data" / f"{i:04d}.jpg" for i in range(1, n + 1)]


def num_splits(root: str | Path) -> int:
    return int(split_half_scores(Path(root))[0].shape[0])


def load_split(root: str | Path, *, split: int = 0, seed: int = 0, test_fraction: float = 0.2) -> Split:
    root = Path(root)
    hrs1, hrs2 = split_half_scores(root)
    check_split(split, hrs1.shape[0], "LNSIM")
    paths = _paths(root, hrs1.shape[1])
    train_idx, test_idx = seeded_split(len(paths), seed=seed, split=split, test_fraction=test_fraction)
    info = {"dataset": "lnsim", "root": str(root), "seed": seed,
            "image_split": seeded_split_info(seed, split, test_fraction, train_idx, test_idx)}
    return split_half_split(paths, present_mask(paths), hrs1, hrs2, train_idx, test_idx, split=split,
                            info=info)


def describe(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    hrs1, hrs2 = split_half_scores(root)
    paths = _paths(root, hrs1.shape[1])
    extra = {"image_split": "made in code: numpy default_rng([seed, split]), test_fraction of all listed images"}
    return split_half_description("lnsim", paths, present_mask(paths), hrs1, hrs2, extra)
