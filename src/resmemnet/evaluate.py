"""Evaluating a model on a memorability set, and over a dataset's splits (mean +- std).

One `evaluate` serves `resmemnet evaluate`, validation and calibration during training, and a run's
test record: it scores images (through the inference core) or a feature cache's rows, and returns
one `Evaluation`. Metrics are computed once over the whole set, never averaged over mini-batches.
Files that cannot be decoded (or that the model scores NaN) are listed with their reason and left
out of the metrics; images the dataset lists but that are absent from disk are counted from the
split's `info["absent"]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from resmemnet.data import load_split, num_splits
from resmemnet.data.base import ImageScoreDataset
from resmemnet.inference import MAX_BATCH, Scorer, TorchScorer, score_paths
from resmemnet.metrics import mean_std, regression_metrics, split_half_consistency, top_bottom
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.predict import as_scorer

if TYPE_CHECKING:
    from resmemnet.train.cache import CachedRows

__all__ = ["Evaluation", "evaluate", "evaluate_splits"]


@dataclass(frozen=True)
class Evaluation:
    """A model on one set: what it scored (positions in the set, predictions, true scores) and what failed."""

    n_items: int
    positions: np.ndarray  # int64, ascending: the scored items' indices in the evaluated set
    predicted: np.ndarray  # float32, one per scored item
    true: np.ndarray  # float32, one per scored item
    failed: list[tuple[str, str]]  # (path, reason) of each item that could not be scored

    @property
    def metrics(self) -> dict[str, float]:
        """Spearman, Pearson, MSE and n over every scored item at once."""
        return regression_metrics(self.predicted, self.true)

    @property
    def failures(self) -> list[str]:
        """`path: reason` lines, as a run's bad_images.txt lists them."""
        return [f"{path}: {reason}" for path, reason in self.failed]

    def to_dict(self, paths: Sequence[str | Path]) -> dict[str, Any]:
        """The JSON form `resmemnet evaluate` prints and reports: counts, metrics, the paper's top/bottom
        table, one row per scored image (path, true, predicted) and the failures; `paths` are the set's."""
        return {"n_images": self.n_items, "n_scored": int(self.positions.size), "n_failed": len(self.failed),
                "failed": [{"path": path, "error": reason} for path, reason in self.failed],
                "metrics": self.metrics, "top_bottom": top_bottom(self.predicted, self.true),
                "predictions": [{"path": str(paths[i]), "true": t, "predicted": p} for i, t, p in
                                zip(self.positions.tolist(), self.true.tolist(), self.predicted.tolist(), strict=True)]}


def evaluate(model: ResMemNet | Scorer, data: ImageScoreDataset | CachedRows, targets: np.ndarray | None = None, *,
             batch_size: int | None = None, workers: int = 0, device: str | torch.device = "auto",
             precision: str = "auto", standardiser: Callable[[torch.Tensor], torch.Tensor] | None = None,
             progress: bool = False) -> Evaluation:
    """Score every item of `data` and set it against `targets` (default: a dataset's own scores).

    `data` is an image dataset, or cached pooled taps (resmemnet.train.cache) scored by a TorchScorer's
    head alone, after `standardiser` where the run standardised its cached inputs. Fewer than 2 scored
    items raise a ValueError naming the first failures: a correlation needs 2.
    """
    scorer = as_scorer(model, device=device, precision=precision)
    if isinstance(data, ImageScoreDataset):
        predicted, positions, failed = _score_images(scorer, data, batch_size, workers, progress)
        targets = data.scores if targets is None else targets
    else:
        if targets is None or not isinstance(scorer, TorchScorer):
            raise ValueError("Cached rows are scored by a TorchScorer's head against given targets")
        predicted, positions, failed = _score_rows(scorer, data, batch_size, standardiser)
    if positions.size < 2:
        first = "; ".join(f"{path}: {reason}" for path, reason in failed[:3])
        raise ValueError(f"Only {positions.size} of {len(data)} images could be scored, and a correlation "
                         f"needs 2" + (f"; first failures: {first}" if first else ""))
    return Evaluation(len(data), positions, predicted, np.asarray(targets, np.float32)[positions], failed)


def _score_images(scorer: Scorer, dataset: ImageScoreDataset, batch_size: int | None, workers: int,
                  progress: bool) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    scores: list[float] = []
    positions: list[int] = []
    failed: list[tuple[str, str]] = []
    offset = 0  # rows come back in dataset order
    with tqdm(total=len(dataset), disable=not progress, desc="scoring", unit="img") as bar:
        for rows in score_paths(dataset.paths, scorer, batch_size=batch_size, workers=workers):
            for k, row in enumerate(rows):
                if row.score is None:
                    failed.append((row.path, row.error))
                else:
                    scores.append(row.score)
                    positions.append(offset + k)
            offset += len(rows)
            bar.update(len(rows))
    return np.asarray(scores, np.float32), np.asarray(positions, np.int64), failed


@torch.inference_mode()
def _score_rows(scorer: TorchScorer, rows: CachedRows, batch_size: int | None,
                standardiser: Callable[[torch.Tensor], torch.Tensor] | None
                ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    positions = np.flatnonzero(rows.valid)
    parts = []
    batch_size = batch_size or MAX_BATCH  # pooled rows hold no image activations
    for start in range(0, positions.size, batch_size):
        pooled = rows.take(positions[start:start + batch_size])
        parts.append(scorer.score_pooled(standardiser(pooled) if standardiser is not None else pooled))
    failed = [(path, reason) for path, _, reason in (e.partition(": ") for e in rows.errors)]
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), positions, failed


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
                    max_splits: int | None = None, seed: int = 0, test_fraction: float = 0.2,
                    batch_size: int | None = None, workers: int = 0, device: str | torch.device = "auto",
                    precision: str = "auto", progress: bool = False, **options: Any) -> dict[str, Any]:
    """Evaluate on the test set of each split (all of them unless `splits`/`max_splits` say otherwise).

    The summary has mean +- std over splits of each metric, and of the human split-half consistency on
    the same test images where the dataset has split-half scores, and the test images absent from disk
    and failed to decode, summed over splits.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    available = num_splits(name, root, **options)
    chosen = list(range(available)) if splits is None else list(splits)
    if max_splits is not None:
        if max_splits < 1:
            raise ValueError(f"max_splits must be at least 1, got {max_splits}")
        chosen = chosen[:max_splits]
    scorer = as_scorer(model, device=device, precision=precision)
    per_split = []
    for index in chosen:
        split = load_split(name, root, split=index, seed=seed, test_fraction=test_fraction, **options)
        _check_test_set(name, index, split.test, split.info, root)
        result = evaluate(scorer, split.test, batch_size=batch_size, workers=workers, progress=progress)
        per_split.append({"split": index, "info": split.info, "human_consistency": split_half_consistency(split),
                          "n_absent": int(split.info.get("absent", {}).get("test", 0)),
                          **result.to_dict(split.test.paths)})
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
