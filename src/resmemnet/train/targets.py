"""Training targets and test scores beyond a split's own: all-participant means, every subject split, distillation.

A split-half dataset (LNSIM) scores each image in 25 random halvings of its participants. A split
holds one of them (train on half-1, test on half-2 of subject split s). The bundled models instead
train on every participant's mean score and are tested against half-2 of every subject split, so
their test rho does not depend on one halving. Distillation adds unlabelled images with another
model's scores (e.g. resmem's), rescaled to the training targets' mean and spread, as extra rows.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from resmemnet.data import lnsim
from resmemnet.data.base import ImageScoreDataset
from resmemnet.metrics import mean_std, spearman

if TYPE_CHECKING:  # annotations only: this module needs neither torch nor the model
    from resmemnet.model.resmemnet import ResMemNet
    from resmemnet.train.cache import CachedRows

__all__ = ["distil_images", "distil_rows", "mean_targets", "split_half_matrices", "subject_split_test", "tap_column",
           "teacher_targets"]


def split_half_matrices(info: dict[str, Any], paths: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    """(hrs1, hrs2) of `paths` (subject splits x images) for a split of a split-half dataset."""
    if info.get("dataset") != "lnsim" or "root" not in info:
        raise ValueError(f"target='mean' and test_protocol='every_subject_split' need LNSIM's per-subject-split "
                         f"scores; dataset {info.get('dataset')!r} has none (use the defaults, 'split')")
    hrs1, hrs2 = lnsim.split_half_scores(info["root"])
    columns = np.array([int(Path(p).stem) - 1 for p in paths])  # Image_data/NNNN.jpg is column NNNN - 1
    return hrs1[:, columns], hrs2[:, columns]


def mean_targets(info: dict[str, Any], paths: Sequence[str | Path]) -> np.ndarray:
    """Every participant's score of each image: the mean of both halves, averaged over the subject splits."""
    hrs1, hrs2 = split_half_matrices(info, paths)
    scores = np.nanmean((hrs1 + hrs2) / 2, axis=0)
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} image(s) have no score in any subject split")
    return scores.astype(np.float32)


def subject_split_test(info: dict[str, Any], paths: Sequence[str | Path], predictions: np.ndarray
                       ) -> dict[str, float]:
    """mean +- std over subject splits s of Spearman(predictions, half-2 scores of split s), with the human ceiling."""
    hrs1, hrs2 = split_half_matrices(info, paths)
    ours, human = [], []
    for s in range(hrs2.shape[0]):
        seen = ~np.isnan(hrs1[s]) & ~np.isnan(hrs2[s])
        ours.append(spearman(predictions[seen], hrs2[s, seen]))
        human.append(spearman(hrs1[s, seen], hrs2[s, seen]))
    return {**mean_std(ours), "human": mean_std(human)["mean"], "per_split": ours}


def _moment_matched(values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Another model's scores with their ranking kept and the human targets' mean and standard deviation."""
    return targets.mean() + targets.std() * (values - values.mean()) / values.std()


def distil_rows(csv_path: str | Path, targets: np.ndarray) -> tuple[ImageScoreDataset, np.ndarray]:
    """Extra training images and their scores from a `path,score` CSV, moment-matched to `targets`.

    Relative paths are taken from the CSV's folder. Another model's scores have their own scale; the
    rescaled ones keep its ranking with the human targets' mean and standard deviation.
    """
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise FileNotFoundError(f"distil_csv {csv_path} not found; give a path,score CSV of extra images")
    paths, scores = [], []
    with open(csv_path, newline="") as f:
        for line, row in enumerate(csv.reader(f), 1):
            if line == 1 and row[:2] == ["path", "score"]:
                continue
            try:
                score = float(row[1])
            except (IndexError, ValueError):
                raise ValueError(f"{csv_path}, line {line}: expected path,score, got {row!r}") from None
            if not np.isfinite(score):
                raise ValueError(f"{csv_path}, line {line}: score {row[1]!r} is not a finite number")
            path = Path(row[0]).expanduser()
            paths.append(path if path.is_absolute() else csv_path.parent / path)
            scores.append(score)
    values = np.asarray(scores, dtype=np.float64)
    if values.size < 2 or values.std() == 0:
        raise ValueError(f"{csv_path}: distillation needs at least two rows with different scores")
    matched = _moment_matched(values, targets)
    return ImageScoreDataset(paths, matched), matched.astype(np.float32)


def distil_images(folders: Sequence[str | Path], stride: int = 1, option: str = "distil_dirs") -> list[str]:
    """Every `stride`-th image (sorted) of each folder, searched recursively: unlabelled photos to train on.

    The photos in between are never trained on, so they can check agreement out of domain. `option`
    names the config key in errors (distil_dirs, gate_dirs).
    """
    from resmemnet.jobs import scan_images  # the one folder scan (extensions, links, warnings)

    paths: list[str] = []
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"{option}: {folder} is not a folder")
        found = scan_images([folder], recursive=True).paths
        if not found:
            raise ValueError(f"{option}: {folder} holds no images")
        paths += [str(p) for p in found[::stride]]
    return paths


def tap_column(model: ResMemNet, tap: str) -> int:
    """The pooled-feature column of a one-channel backbone tap (e.g. `resmem.score`, a teacher's score)."""
    taps = list(model.backbone.taps)
    if tap not in taps:
        raise ValueError(f"distil_tap {tap!r} is not a tap of backbone {model.config.backbone!r}; "
                         f"one-channel taps: {[t for t, c in zip(taps, model.tap_channels, strict=True) if c == 1]}")
    index = taps.index(tap)
    if model.tap_channels[index] != 1:
        raise ValueError(f"distil_tap {tap!r} has {model.tap_channels[index]} channels; it must hold one score")
    return int(sum(model.tap_channels[:index]))


def teacher_targets(rows: CachedRows, column: int, targets: np.ndarray) -> np.ndarray:
    """The teacher's scores in `column` of cached rows, moment-matched to the human `targets` (like distil_rows).

    Rows that failed to load get NaN; they are never trained on (rows.valid is False there).
    """
    valid = np.flatnonzero(rows.valid)
    if valid.size < 2:
        raise ValueError("distil_dirs: fewer than two distillation photos could be loaded")
    teacher = rows.take(valid)[:, column].double().numpy()
    if teacher.std() == 0:
        raise ValueError("distil_tap gives the same score on every distillation photo")
    out = np.full(len(rows), np.nan)
    out[valid] = _moment_matched(teacher, targets)
    return out.astype(np.float32)
