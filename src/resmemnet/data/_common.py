"""Helpers every format module shares: score and path checks, presence, seeded image splits, split halves."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from resmemnet.data.base import ImageScoreDataset, ScoreFileError, Split
from resmemnet.metrics import human_consistency, split_half_consistency

ABSENT_EXAMPLES = 5  # how many absent file names a description lists


def finite_score(text: str | None, *, table: Path, line: int, column: str) -> float:
    """The score written in `text`; a non-number, NaN or inf is a ScoreFileError naming table and line.

    A NaN row would otherwise vanish and an inf one would turn every metric into inf.
    """
    try:
        value = float(text)  # type: ignore[arg-type]  # None (a short row) is reported below
    except (TypeError, ValueError):
        raise ScoreFileError(table, line, f"{column} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ScoreFileError(table, line, f"{column} is {text!r}, not a finite number; give the image a real "
                                          "score or remove its row")
    return value


def check_unique(seen: dict[str, int], path: str, *, table: Path, line: int) -> None:
    """Record image `path` (absolute, or a name in the one folder a table lists) as listed on `line`.

    A second row for the same image (after normalising `./a.jpg`, `b/../a.jpg`) is a ScoreFileError:
    it would score that image twice, maybe on both sides of a train/test split.
    """
    key = os.path.normpath(path)
    if key in seen:
        raise ScoreFileError(table, line, f"{key} is listed again (first on line {seen[key]}); keep one row "
                                          "per image")
    seen[key] = line


def check_split_halves(hrs1: np.ndarray, hrs2: np.ndarray, source: Path) -> None:
    """Both halves must be one splits x images matrix; NaN (nobody in that half saw the image) is allowed."""
    if hrs1.shape != hrs2.shape or hrs1.ndim != 2:
        raise ValueError(f"{source}: subject_hrs1 {hrs1.shape} and subject_hrs2 {hrs2.shape} must be the same "
                         "splits x images matrix")
    for k, half in ((1, hrs1), (2, hrs2)):
        bad = np.argwhere(np.isinf(half))
        if bad.size:
            s, i = bad[0]
            raise ValueError(f"{source}: subject_hrs{k} has {len(bad)} infinite hit rate(s), first at split "
                             f"{s + 1}, image {i + 1}; a hit rate lies in [0, 1] (NaN for an image nobody saw)")


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


class Subset(NamedTuple):
    """The usable images of one part (train, val or test) and what was left out of it."""

    dataset: ImageScoreDataset
    kept: np.ndarray  # listing indices of the dataset's images, in order
    absent: int  # listed, not on disk
    unscored: int  # on disk, no score (NaN: nobody saw it)


def subset(paths: Sequence[Path], scores: np.ndarray, index: np.ndarray, present: np.ndarray) -> Subset:
    """The images at `index` that exist and have a score.

    Items are dropped, never re-indexed, so each path keeps its own score.
    """
    index = np.asarray(index, dtype=np.int64)
    here = present[index]
    scored = ~np.isnan(scores[index])
    keep = index[here & scored]
    dataset = ImageScoreDataset([paths[i] for i in keep], scores[keep])
    return Subset(dataset, keep, int((~here).sum()), int((here & ~scored).sum()))


def part_counts(parts: dict[str, Subset]) -> dict[str, dict[str, int]]:
    """The `counts`, `absent` and `unscored` entries of Split.info, one number per part."""
    return {"counts": {name: len(part.dataset) for name, part in parts.items()},
            "absent": {name: part.absent for name, part in parts.items()},
            "unscored": {name: part.unscored for name, part in parts.items()}}


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
                     train_idx: np.ndarray, test_idx: np.ndarray, *, split: int, info: dict[str, Any]) -> Split:
    """Isola et al.'s protocol: train on half-1 scores of the train images, test on half-2 scores of the test images.

    The test images' half-1 scores go with the split (`test_other_half`) for human consistency.
    """
    parts = {"train": subset(paths, hrs1[split], train_idx, present),
             "test": subset(paths, hrs2[split], test_idx, present)}
    info = {**info, "split": split,
            "protocol": "split-half: train on half-1 scores of train images, test on half-2 scores of test images",
            **part_counts(parts)}
    result = Split(train=parts["train"].dataset, test=parts["test"].dataset, info=info,
                   test_other_half=hrs1[split, parts["test"].kept])
    # Kept for callers that read it from info; resmemnet.metrics.split_half_consistency(split) is the source.
    result.info.update(human_consistency=split_half_consistency(result),
                       human_consistency_over="Spearman(half 1, half 2) on this split's test images")
    return result


def split_half_description(name: str, paths: Sequence[Path], present: np.ndarray, hrs1: np.ndarray,
                           hrs2: np.ndarray, extra: dict[str, Any]) -> dict[str, Any]:
    """What `resmemnet dataset` shows for a split-half set; consistency is over the images present."""
    consistency = human_consistency(hrs1[:, present], hrs2[:, present])
    halves = np.stack([hrs1, hrs2])
    seen = ~np.isnan(halves).all(axis=(0, 1))  # scored in at least one half of one split
    mean_scores = np.full(len(paths), np.nan)
    mean_scores[seen] = np.nanmean(halves[:, :, seen], axis=(0, 1))  # per image, over both halves and all splits
    return {"dataset": name, "images": presence(paths, present), "splits": {"count": int(hrs1.shape[0]), **extra},
            "scores": score_stats(mean_scores[present]),
            "scores_are": "per-image mean of the half-1 and half-2 hit rates over all splits",
            "unscored": {"half1": int(np.isnan(hrs1[:, present]).sum()),
                         "half2": int(np.isnan(hrs2[:, present]).sum()),
                         "never": int((present & ~seen).sum())},
            "unscored_are": "(split, image) entries of images present that nobody in that half saw; never: "
                            "images present with no score in any split",
            "human_consistency": {key: consistency[key] for key in ("mean", "std", "n")},
            "human_consistency_over": "mean over splits of Spearman(half 1, half 2) on the images present"}


def table_split(paths: Sequence[Path], scores: np.ndarray, *, split: int, seed: int, test_fraction: float,
                info: dict[str, Any]) -> Split:
    """A seeded train/test split of a score table with no official splits (MemCat, users' CSVs)."""
    present = present_mask(paths)
    if not present.any():
        raise FileNotFoundError(f"None of the {len(paths)} listed images exist (first expected at {paths[0]}); "
                                "check --root")
    train_idx, test_idx = seeded_split(len(paths), seed=seed, split=split, test_fraction=test_fraction)
    parts = {"train": subset(paths, scores, train_idx, present),
             "test": subset(paths, scores, test_idx, present)}
    return Split(train=parts["train"].dataset, test=parts["test"].dataset, info={
        **info, "split": split, "seed": seed, "protocol": "seeded random train/test split (no official splits)",
        "image_split": seeded_split_info(seed, split, test_fraction, train_idx, test_idx), **part_counts(parts)})


def table_description(name: str, paths: Sequence[Path], scores: np.ndarray, extra: dict[str, Any]) -> dict[str, Any]:
    present = present_mask(paths)
    return {"dataset": name, "images": presence(paths, present),
            "splits": {"count": 1, "image_split": "made in code: numpy default_rng([seed, split]), test_fraction "
                                                  "of all listed images"},
            "scores": score_stats(scores), "scores_present": score_stats(scores[present]), **extra,
            "human_consistency": None}
