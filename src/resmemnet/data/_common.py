"""Helpers every format module shares: presence checks, seeded image splits, the split-half protocol."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resmemnet.data.base import ImageScoreDataset, Split
from resmemnet.metrics import human_consistency, spearman

Transform = Callable[[Any], Any] | None

ABSENT_EXAMPLES = 5  # how many absent file names a description lists


def present_mask(paths: Sequence[Path]) -> np.ndarray:
    """Which listed images exist on disk (one directory listing per folder, not one stat per file)."""
    listings: dict[Path, set[str]] = {}
    mask = np.zeros(len(paths), dtype=bool)
    for i, path in enumerate(paths):
        folder = path.parent
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
        mask[i] = path.name in listings[folder]
    return mask


def subset(paths: Sequence[Path], scores: np.ndarray, index: np.ndarray, present: np.ndarray,
           transform: Transform) -> tuple[ImageScoreDataset, int, int]:
    """The images at `index` that exist and have a score; also returns (absent, unscored) counts.

    Items are dropped, never re-indexed, so each path keeps its own score.
    """
    index = np.asarray(index, dtype=np.int64)
    here = present[index]
    scored = ~np.isnan(scores[index])
    keep = index[here & scored]
    dataset = ImageScoreDataset([paths[i] for i in keep], scores[keep], transform)
    return dataset, int((~here).sum()), int((here & ~scored).sum())


def seeded_split(n: int, *, seed: int, split: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """A reproducible train/test partition of range(n), from numpy's default_rng([seed, split]).

    It is made over every listed item (present or not), so the split of an image never depends on which
    other images happen to be on disk.
    """
    if not 0.0 < test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in (0, 1], got {test_fraction}")
    order = np.random.default_rng([seed, split]).permutation(n)
    n_test = max(1, round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def seeded_split_info(seed: int, split: int, test_fraction: float, train: np.ndarray, test: np.ndarray) -> dict:
    return {"method": "numpy.random.default_rng([seed, split]).permutation over all listed images",
            "seed": seed, "split": split, "test_fraction": test_fraction,
            "train_indices": (train + 1).tolist(), "test_indices": (test + 1).tolist(), "indices_base": 1}


def check_split(split: int, count: int, name: str) -> None:
    if not 0 <= split < count:
        raise ValueError(f"{name} has splits 0..{count - 1}; got split={split}")


def score_stats(scores: np.ndarray) -> dict[str, float | int]:
    s = np.asarray(scores, dtype=np.float64)
    s = s[~np.isnan(s)]
    if s.size == 0:
        return {"n": 0}
    return {"n": int(s.size), "mean": float(s.mean()), "std": float(s.std(ddof=1)) if s.size > 1 else 0.0,
            "min": float(s.min()), "median": float(np.median(s)), "max": float(s.max())}


def presence(paths: Sequence[Path], present: np.ndarray) -> dict[str, Any]:
    absent = [paths[i].name for i in np.flatnonzero(~present)[:ABSENT_EXAMPLES]]
    return {"listed": len(paths), "present": int(present.sum()), "absent": int((~present).sum()),
            "absent_examples": absent}


def split_half_split(paths: Sequence[Path], present: np.ndarray, hrs1: np.ndarray, hrs2: np.ndarray,
                     train_idx: np.ndarray, test_idx: np.ndarray, *, split: int, transform: Transform,
                     info: dict[str, Any]) -> Split:
    """Isola et al.'s protocol: train on half-1 scores of the train images, test on half-2 scores of the test images.

    `info` gains the absent/unscored counts and the human consistency on this split's usable test images.
    """
    train, train_absent, train_unscored = subset(paths, hrs1[split], train_idx, present, transform)
    test, test_absent, test_unscored = subset(paths, hrs2[split], test_idx, present, transform)
    usable = np.asarray([i for i in test_idx if present[i] and not np.isnan(hrs1[split, i])
                         and not np.isnan(hrs2[split, i])], dtype=np.int64)
    consistency = spearman(hrs1[split, usable], hrs2[split, usable]) if usable.size >= 2 else float("nan")
    info = {**info, "split": split,
            "protocol": "split-half: train on half-1 scores of train images, test on half-2 scores of test images",
            "counts": {"train": len(train), "test": len(test)},
            "absent": {"train": train_absent, "test": test_absent},
            "unscored": {"train": train_unscored, "test": test_unscored},
            "human_consistency": consistency,
            "human_consistency_over": "Spearman(half 1, half 2) on this split's test images"}
    return Split(train=train, test=test, info=info)


def split_half_description(name: str, paths: Sequence[Path], present: np.ndarray, hrs1: np.ndarray,
                           hrs2: np.ndarray, extra: dict[str, Any]) -> dict[str, Any]:
    """What `resmemnet dataset` shows for a split-half set; consistency is over the images present."""
    consistency = human_consistency(hrs1[:, present], hrs2[:, present])
    mean_scores = np.nanmean(np.stack([hrs1, hrs2]), axis=(0, 1))  # per image, over both halves and all splits
    return {"dataset": name, "images": presence(paths, present), "splits": {"count": int(hrs1.shape[0]), **extra},
            "scores": score_stats(mean_scores[present]),
            "scores_are": "per-image mean of the half-1 and half-2 hit rates over all splits",
            "human_consistency": {key: consistency[key] for key in ("mean", "std", "n")},
            "human_consistency_over": "mean over splits of Spearman(half 1, half 2) on the images present"}


def table_split(paths: Sequence[Path], scores: np.ndarray, *, split: int, seed: int, test_fraction: float,
                transform: Transform, info: dict[str, Any]) -> Split:
    """A seeded train/test split of a score table with no official splits (MemCat, users' CSVs)."""
    present = present_mask(paths)
    if not present.any():
        raise FileNotFoundError(f"None of the {len(paths)} listed images exist (first expected at {paths[0]}); "
                                "check --root")
    train_idx, test_idx = seeded_split(len(paths), seed=seed, split=split, test_fraction=test_fraction)
    train, train_absent, train_unscored = subset(paths, scores, train_idx, present, transform)
    test, test_absent, test_unscored = subset(paths, scores, test_idx, present, transform)
    return Split(train=train, test=test, info={
        **info, "split": split, "seed": seed, "protocol": "seeded random train/test split (no official splits)",
        "image_split": seeded_split_info(seed, split, test_fraction, train_idx, test_idx),
        "counts": {"train": len(train), "test": len(test)},
        "absent": {"train": train_absent, "test": test_absent},
        "unscored": {"train": train_unscored, "test": test_unscored}})


def table_description(name: str, paths: Sequence[Path], scores: np.ndarray, extra: dict[str, Any]) -> dict[str, Any]:
    present = present_mask(paths)
    return {"dataset": name, "images": presence(paths, present),
            "splits": {"count": 1, "image_split": "made in code: numpy default_rng([seed, split]), test_fraction "
                                                  "of all listed images"},
            "scores": score_stats(scores), "scores_present": score_stats(scores[present]), **extra,
            "human_consistency": None}
