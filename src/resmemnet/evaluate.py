"""Evaluating a model on a memorability test set, and over a dataset's splits (mean +- std).

Metrics are computed once over the whole test set, never averaged over mini-batches. Files that
cannot be decoded are listed with their reason and left out of the metrics.
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
from resmemnet.metrics import mean_std, regression_metrics, top_bottom
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.predict import iter_predictions

__all__ = ["evaluate", "evaluate_splits"]


def evaluate(model: ResMemNet, dataset: ImageScoreDataset, *, batch_size: int = 32, workers: int = 0,
             device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """Score every image of `dataset` and compare with its true scores.

    Returns metrics (Spearman, Pearson, MSE, n), the paper's top/bottom table, one row per scored image
    (path, true, predicted) and the files that failed (path, error).
    """
    rows = iter_predictions(dataset.paths, model, batch_size=batch_size, workers=workers, device=device)
    items, failed = [], []
    for row, true in tqdm(zip(rows, dataset.scores.tolist(), strict=True), total=len(dataset), disable=not progress,
                          desc="scoring", unit="img"):
        if row.error:
            failed.append({"path": row.path, "error": row.error})
        else:
            items.append({"path": row.path, "true": true, "predicted": row.score})
    if len(items) < 2:
        raise ValueError(f"Only {len(items)} of {len(dataset)} images could be scored; a correlation needs 2. "
                         f"First failures: {failed[:3]}")
    predicted = np.asarray([i["predicted"] for i in items])
    true = np.asarray([i["true"] for i in items])
    return {"n_images": len(dataset), "n_scored": len(items), "n_failed": len(failed), "failed": failed,
            "metrics": regression_metrics(predicted, true), "top_bottom": top_bottom(predicted, true),
            "predictions": items}


def evaluate_splits(model: ResMemNet, name: str, root: str | Path, *, splits: Sequence[int] | None = None,
                    max_splits: int | None = None, seed: int = 0, test_fraction: float = 0.2, batch_size: int = 32,
                    workers: int = 0, device: str | torch.device = "cpu", progress: bool = False,
                    **options: Any) -> dict[str, Any]:
    """Evaluate on the test set of each split (all of them unless `splits`/`max_splits` say otherwise).

    The summary has mean +- std over splits of each metric, and of the human split-half consistency on
    the same test images where the dataset has split-half scores.
    """
    available = num_splits(name, root, **options)
    chosen = list(range(available)) if splits is None else list(splits)
    if max_splits is not None:
        if max_splits < 1:
            raise ValueError(f"max_splits must be at least 1, got {max_splits}")
        chosen = chosen[:max_splits]
    per_split = []
    for index in chosen:
        split = load_split(name, root, split=index, seed=seed, test_fraction=test_fraction, **options)
        result = evaluate(model, split.test, batch_size=batch_size, workers=workers, device=device,
                          progress=progress)
        per_split.append({"split": index, "info": split.info, **result})
    summary = {key: mean_std([s["metrics"][key] for s in per_split]) for key in ("spearman", "pearson", "mse")}
    human = [s["info"]["human_consistency"] for s in per_split if "human_consistency" in s["info"]]
    summary["human_consistency"] = mean_std(human) if human else None
    return {"dataset": name, "root": str(root), "seed": seed, "test_fraction": test_fraction,
            "options": {k: str(v) for k, v in options.items() if v is not None}, "splits_available": available,
            "splits_evaluated": chosen, "model": model.describe(), "summary": summary, "splits": per_split}
