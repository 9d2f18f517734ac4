"""Evaluating a model on a memorability test set, and over a dataset's splits (mean +- std).

Metrics are computed once over the whole test set, never averaged over mini-batches. Files that
cannot be decoded (or that the model scores NaN) are listed with their reason and left out of the
metrics; images the dataset lists but that are absent from disk are counted from the split's
`info["absent"]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from resmemnet.data import load_split, num_splits
from resmemnet.data.base import ImageScoreDataset
from resmemnet.inference import Scorer, TorchScorer, score_paths
from resmemnet.metrics import mean_std, regression_metrics, split_half_consistency, top_bottom
from resmemnet.model.resmemnet import ResMemNet

__all__ = ["evaluate", "evaluate_splits"]


def _scorer(model: ResMemNet | Scorer, device: str | torch.device, precision: str) -> Scorer:
    return model if isinstance(model, Scorer) else TorchScorer(model, device=device, precision=precision)


def evaluate(model: ResMemNet | Scorer, dataset: ImageScoreDataset, *, batch_size: int = 32, workers: int = 0,
             device: str | torch.device = "auto", precision: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Score every image of `dataset` and compare with its true scores.

    Returns metrics (Spearman, Pearson, MSE, n), the paper's top/bottom table, one row per scored image
    (path, true, predicted) and the files that failed to decode (path, error).
    """
    scorer = _scorer(model, device, precision)
    true_scores = iter(dataset.scores.tolist())  # rows come back in dataset order
    items, failed = [], []
    with tqdm(total=len(dataset), disable=not progress, desc="scoring", unit="img") as bar:
        for rows in score_paths(dataset.paths, scorer, batch_size=batch_size, workers=workers):
            for row, true in zip(rows, true_scores, strict=False):
                if row.error:
                    failed.append({"path": row.path, "error": row.error})
                else:
                    items.append({"path": row.path, "true": true, "predicted": row.score})
            bar.update(len(rows))
    if len(items) < 2:
        first = "; ".join(f"{f['path']}: {f['error']}" for f in failed[:3])
        raise ValueError(f"Only {len(items)} of {len(dataset)} images could be scored, and a correlation "
                         f"needs 2" + (f"; first failures: {first}" if first else ""))
    predicted = np.asarray([i["predicted"] for i in items])
    true = np.asarray([i["true"] for i in items])
    return {"n_images": len(dataset), "n_scored": len(items), "n_failed": len(failed), "failed": failed,
            "metrics": regression_metrics(predicted, true), "top_bottom": top_bottom(predicted, true),
            "predictions": items}


def _check_test_set(name: str, index: int, test: ImageScoreDataset, info: dict[str, Any], root: str | Path) -> None:
    """Fewer than 2 test images to score: say why (absent from disk, or without a score) before scoring any."""
    if len(test) >= 2:
        return
    absent, unscored = info.get("absent", {}).get("test", 0), info.get("unscored", {}).get("test", 0)
    reasons = [f"{absent} listed test image(s) absent from disk (relative paths start at {root}; `resmemnet dataset` "
               "lists absent images)"] if absent else []
    reasons += [f"{unscored} test image(s) without a score"] if unscored else []
    raise ValueError(f"{name} split {index} has {len(test)} test image(s) to score, and a correlation needs 2"
                     + (": " + "; ".join(reasons) if reasons else "; use a larger test_fraction"))


def evaluate_splits(model: ResMemNet | Scorer, name: str, root: str | Path, *, splits: Sequence[int] | None = None,
                    max_splits: int | None = None, seed: int = 0, test_fraction: float = 0.2, batch_size: int = 32,
                    workers: int = 0, device: str | torch.device = "auto", precision: str = "auto",
                    progress: bool = False, **options: Any) -> dict[str, Any]:
    """Evaluate on the test set of each split (all of them unless `splits`/`max_splits` say otherwise).

    The summary has mean +- std over splits of each metric, and of the human split-half consistency on
    the same test images where the dataset has split-half scores, and the test images absent from disk
    and failed to decode, summed over splits.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    available = num_splits(name, root, **options)
    chosen = list(range(available)) if splits is None else list(splits)
    if max_splits is not None:
        if max_splits < 1:
            raise ValueError(f"max_splits must be at least 1, got {max_splits}")
        chosen = chosen[:max_splits]
    scorer = _scorer(model, device, precision)
    per_split = []
    for index in chosen:
        split = load_split(name, root, split=index, seed=seed, test_fraction=test_fraction, **options)
        _check_test_set(name, index, split.test, split.info, root)
        result = evaluate(scorer, split.test, batch_size=batch_size, workers=workers, progress=progress)
        per_split.append({"split": index, "info": split.info, "human_consistency": split_half_consistency(split),
                          "n_absent": int(split.info.get("absent", {}).get("test", 0)), **result})
    summary: dict[str, Any] = {key: mean_std([s["metrics"][key] for s in per_split])
                               for key in ("spearman", "pearson", "mse")}
    human = [s["human_consistency"] for s in per_split if s["human_consistency"] is not None]
    summary["human_consistency"] = mean_std(human) if human else None
    summary["absent"] = sum(s["n_absent"] for s in per_split)
    summary["failed"] = sum(s["n_failed"] for s in per_split)
    described = scorer.model.describe() if isinstance(scorer, TorchScorer) else {"backend": type(scorer).__name__}
    return {"dataset": name, "root": str(root), "seed": seed, "test_fraction": test_fraction,
            "options": {k: str(v) for k, v in options.items() if v is not None}, "splits_available": available,
            "splits_evaluated": chosen, "model": described, "summary": summary, "splits": per_split}
