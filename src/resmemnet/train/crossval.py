"""Cross-validation over a dataset's splits, with baselines, written as the paper's results table.

For each split: ResMem-Net trained with the config, the same run with the `last` head (final block
only, MemNet-like), and a scikit-learn ridge regression on the frozen backbone's pooled taps
(standing in for the paper's Table 5 'traditional' methods). Each cell is the test Spearman rho of
that split; the last row is mean +- std over splits (resmemnet.metrics.mean_std).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resmemnet.data import load_split
from resmemnet.metrics import mean_std, regression_metrics
from resmemnet.model.resmemnet import create_model
from resmemnet.runtime import choose_precision, resolve_device
from resmemnet.train.cache import build_feature_cache
from resmemnet.train.config import TrainConfig
from resmemnet.train.data import model_preprocessing
from resmemnet.train.loop import train

__all__ = ["METHODS", "CrossValResult", "ridge_baseline", "run_crossval"]

METHODS = ("resmemnet", "last", "ridge")
_TITLES = {"resmemnet": "ResMem-Net", "last": "last head", "ridge": "ridge on pooled taps"}


@dataclass
class CrossValResult:
    rows: list[dict[str, Any]]  # one per (split, method): test spearman, pearson, mse, n
    summary: dict[str, dict[str, float]]  # method -> mean/std/n of test spearman
    table: str  # markdown, as written to results.md


def ridge_baseline(config: TrainConfig, split: Any, cache_dir: str | Path) -> dict[str, float]:
    """RidgeCV on the frozen (initial) backbone's pooled taps: the 'traditional' feature baseline."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    torch.manual_seed(config.seed)  # the same initial backbone as the trained run: its caches are reused
    device = resolve_device(config.device)
    model = create_model(config.model, preprocessing=model_preprocessing(config)).to(device)
    kwargs = {"dtype": config.cache_dtype, "batch_size": 2 * config.batch_size, "workers": config.workers,
              "device": device, "precision": choose_precision(config.precision, device),
              "progress": config.progress}
    train_cache = build_feature_cache(model, split.train, cache_dir,
                                      views=2 if config.augment == "hflip" else 1, **kwargs)
    test_cache = build_feature_cache(model, split.test, cache_dir, **kwargs)
    train_idx, test_idx = np.flatnonzero(train_cache.valid), np.flatnonzero(test_cache.valid)
    regressor = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 5, 13)))
    regressor.fit(train_cache.take(train_idx).numpy(), split.train.scores[train_idx])
    pred = regressor.predict(test_cache.take(test_idx).numpy())
    return regression_metrics(pred, split.test.scores[test_idx])


def _table(rows: list[dict[str, Any]], methods: Sequence[str], summary: dict[str, dict[str, float]]) -> str:
    lines = ["| split | " + " | ".join(_TITLES[m] for m in methods) + " |",
             "|---" * (len(methods) + 1) + "|"]
    for s in sorted({r["split"] for r in rows}):
        cells = {r["method"]: r["spearman"] for r in rows if r["split"] == s}
        lines.append(f"| {s} | " + " | ".join(f"{cells[m]:.3f}" for m in methods) + " |")
    lines.append("| mean +- std | " + " | ".join(f"{summary[m]['mean']:.3f} +- {summary[m]['std']:.3f}"
                                               for m in methods) + " |")
    return "\n".join(lines) + "\n"


def run_crossval(config: TrainConfig, dataset: str, root: str | Path, output: str | Path, *,
                 splits: Sequence[int] = range(5), methods: Sequence[str] = METHODS, resume: bool = False,
                 **split_kwargs: Any) -> CrossValResult:
    """Train and test every method on every split; writes results.csv, results.md and results.json."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    output = Path(output)
    # One cache folder for all splits and methods: the same images under the same backbone are cached once.
    config = config if config.cache_dir else config.replace(cache_dir=str(output / "feature_cache"))
    rows: list[dict[str, Any]] = []
    for s in splits:
        split = load_split(dataset, root, split=s, seed=config.seed, **split_kwargs)
        for method in methods:
            if method == "ridge":
                metrics = ridge_baseline(config, split, config.cache_dir)
            else:
                run_config = config if method == "resmemnet" else config.replace(
                    model=replace(config.model, head="last"))
                run_dir = output / f"split{s}" / method
                metrics = train(run_config, split, run_dir, resume=resume and run_dir.exists()).test
            rows.append({"split": s, "method": method, **{k: metrics[k] for k in ("spearman", "pearson", "mse", "n")}})
    summary = {m: mean_std([r["spearman"] for r in rows if r["method"] == m]) for m in methods}
    table = _table(rows, methods, summary)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["split", "method", "spearman", "pearson", "mse", "n"])
        writer.writeheader()
        writer.writerows(rows)
    (output / "results.md").write_text(table)
    (output / "results.json").write_text(json.dumps({"dataset": dataset, "splits": list(splits), "rows": rows,
                                                     "summary": summary, "config": config.to_dict()}, indent=2))
    return CrossValResult(rows, summary, table)
