"""Memorability metrics, always computed over a whole test set (never averaged over mini-batches)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

if TYPE_CHECKING:
    from resmemnet.data.base import Split

__all__ = ["TOP_BOTTOM_N", "human_consistency", "mean_std", "mse", "pearson", "regression_metrics",
           "spearman", "split_half_consistency", "top_bottom"]

TOP_BOTTOM_N = (10, 25, 50, 100, 200)  # the rows of the paper's Tables 3 and 4


def _pair(pred: Sequence[float] | np.ndarray, true: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred, dtype=np.float64).ravel(), np.asarray(true, dtype=np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"{p.size} predictions but {t.size} targets")
    if p.size < 2:
        raise ValueError(f"Need at least 2 scored items for a correlation, got {p.size}")
    return p, t


def spearman(pred: Sequence[float] | np.ndarray, true: Sequence[float] | np.ndarray) -> float:
    """Tie-aware rank correlation (average ranks), as scipy.stats.spearmanr."""
    p, t = _pair(pred, true)
    return float(stats.spearmanr(p, t).statistic)


def pearson(pred: Sequence[float] | np.ndarray, true: Sequence[float] | np.ndarray) -> float:
    p, t = _pair(pred, true)
    return float(stats.pearsonr(p, t).statistic)


def mse(pred: Sequence[float] | np.ndarray, true: Sequence[float] | np.ndarray) -> float:
    p, t = _pair(pred, true)
    return float(np.mean((p - t) ** 2))


def regression_metrics(pred: Sequence[float] | np.ndarray, true: Sequence[float] | np.ndarray) -> dict[str, float]:
    return {"spearman": spearman(pred, true), "pearson": pearson(pred, true), "mse": mse(pred, true),
            "n": int(np.asarray(pred).size)}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation over splits."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def top_bottom(pred: Sequence[float] | np.ndarray, true: Sequence[float] | np.ndarray,
               ns: Sequence[int] = TOP_BOTTOM_N) -> list[dict[str, float | int | str]]:
    """The paper's Tables 3-4: mean predicted and mean true score of the top/bottom N by prediction.

    Ns larger than the test set are skipped; ties in prediction keep input order (stable sort).
    """
    p, t = _pair(pred, true)
    order = np.argsort(-p, kind="stable")
    rows: list[dict[str, float | int | str]] = []
    for which in ("top", "bottom"):
        for n in (ns if which == "top" else sorted(ns, reverse=True)):
            if n > p.size:
                continue
            idx = order[:n] if which == "top" else order[-n:]
            rows.append({"rank": f"{which} {n}", "n": n, "predicted": float(p[idx].mean()),
                         "true": float(t[idx].mean())})
    return rows


def human_consistency(half1: np.ndarray, half2: np.ndarray) -> dict[str, float | list[float]]:
    """Split-half human consistency: mean +- std over splits (rows) of Spearman(half 1, half 2).

    Items with no score in either half of a split (NaN, e.g. no viewer saw them) are left out of that split.
    """
    h1, h2 = np.atleast_2d(np.asarray(half1, dtype=np.float64)), np.atleast_2d(np.asarray(half2, dtype=np.float64))
    if h1.shape != h2.shape:
        raise ValueError(f"split halves differ in shape: {h1.shape} vs {h2.shape}")
    per_split = []
    for a, b in zip(h1, h2, strict=True):
        keep = ~(np.isnan(a) | np.isnan(b))
        per_split.append(spearman(a[keep], b[keep]))
    return {**mean_std(per_split), "per_split": per_split}


def split_half_consistency(split: Split) -> float | None:
    """Human consistency on this split's test images: Spearman(half 1, half 2), the ceiling for a model's rho.

    Images nobody in half 1 saw are left out. None when the dataset has no split-half scores; NaN when
    fewer than 2 test images have both halves.
    """
    if split.test_other_half is None:
        return None
    half1, half2 = np.asarray(split.test_other_half, dtype=np.float64), split.test.scores.astype(np.float64)
    if half1.shape != half2.shape:
        raise ValueError(f"{half1.size} half-1 scores for {half2.size} test images")
    both = ~np.isnan(half1)
    return spearman(half1[both], half2[both]) if both.sum() >= 2 else float("nan")
