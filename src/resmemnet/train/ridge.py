"""Closed-form training of the `linear-ensemble` head: one ridge regression per expert group, bootstrap members.

On LNSIM, a linear read-out of frozen trunk features beats the paper's LSTM head trained on the same
features, and averaging separately fitted experts beats one ridge on their concatenation, because
each expert gets its own amount of shrinkage (MODEL_CARD.md lists the validation numbers). So, on the
cached pooled taps of the training rows (labelled images, then any distillation rows):

1. Standardise each group's features with the training rows' (weighted) statistics.
2. Choose each group's penalty from `alphas` by exact leave-one-out error on the labelled rows: the
   kernel form with an unpenalised intercept needs one eigendecomposition per group.
3. Divide each group by the spread of its leave-one-out predictions and average the groups, so every
   expert weighs the same whatever its number of features.
4. Map that average onto the targets' logit by least squares on the leave-one-out predictions.
5. Members: the same fit on `members` seeded bootstrap resamples of the rows, penalties fixed; their
   spread is the score's uncertainty.
6. Fold all of it into the head's one Linear(sum(channels), members): the checkpoint is a plain model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from resmemnet.metrics import spearman
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.train.cache import CachedRows

__all__ = ["DEFAULT_ALPHAS", "fit_linear_ensemble", "group_columns"]

DEFAULT_ALPHAS = (1.0, 10.0, 100.0, 1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6)
_EPS = 1e-3  # targets are clipped into [eps, 1 - eps] before the logit; feature stds get this floor


def group_columns(model: ResMemNet) -> dict[str, np.ndarray]:
    """Each expert group's columns in the pooled taps (one group, `all`, for a single-trunk backbone)."""
    names = getattr(model.backbone, "tap_groups", ["all"] * len(model.tap_channels))
    edges = np.cumsum([0, *model.tap_channels])
    columns: dict[str, list[np.ndarray]] = {}
    for name, start, stop in zip(names, edges[:-1], edges[1:], strict=True):
        columns.setdefault(name, []).append(np.arange(start, stop))
    return {name: np.concatenate(parts) for name, parts in columns.items()}


@dataclass
class _Expert:
    """One group's standardisation, penalty and scale, and its kernel over the training rows."""

    name: str
    columns: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    features: np.ndarray  # the training rows' standardised features (float32)
    gram: np.ndarray  # features @ features.T (float64)
    alpha: float = 0.0
    scale: float = 1.0
    loo_rho: float = float("nan")


def fit_linear_ensemble(model: ResMemNet, rows: CachedRows, targets: np.ndarray, *, labelled: int,
                        distil_weight: float = 1.0, alphas: Sequence[float] = DEFAULT_ALPHAS,
                        groups: Sequence[str] = (), seed: int = 0) -> dict[str, Any]:
    """Fit `model.head` (a LinearEnsemble) in place on `rows` (the first `labelled` are human-scored).

    Returns what was chosen (per group: penalty, leave-one-out rho, scale) for the checkpoint metadata.
    """
    available = group_columns(model)
    chosen = list(groups) or list(available)
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(f"ensemble_groups {unknown} are not tap groups of backbone {model.config.backbone!r}; "
                         f"it has {sorted(available)}")
    valid = np.flatnonzero(rows.valid)
    is_labelled = valid < labelled
    if is_labelled.sum() < 10:
        raise ValueError(f"A ridge ensemble needs at least 10 labelled training images, got {int(is_labelled.sum())}")
    x = rows.take(valid).numpy()
    p = np.clip(targets[valid], _EPS, 1 - _EPS)
    y = np.log(p / (1 - p))  # the logit
    w = np.where(is_labelled, 1.0, distil_weight)
    y_mean = float(np.average(y, weights=w))

    experts = [_standardised(name, available[name], x, w) for name in chosen]
    loo = []
    for expert in experts:
        prediction = _choose_alpha(expert, y - y_mean, w, is_labelled, alphas)
        expert.scale = float(prediction.std()) or 1.0
        expert.loo_rho = spearman(prediction, y[is_labelled])
        loo.append(prediction / expert.scale)
    combined = np.mean(loo, axis=0)
    slope, intercept = np.polyfit(combined, y[is_labelled] - y_mean, 1)
    if not slope > 0:
        raise ValueError("The experts' average ranks the training images backwards (slope "
                         f"{slope:.3g}); check the targets and the tap groups")

    members = model.config.members
    weight = np.zeros((members, x.shape[1]))
    bias = np.full(members, y_mean + intercept)
    for k in range(members):
        counts = np.bincount(np.random.default_rng([seed, k]).integers(0, len(valid), len(valid)),
                             minlength=len(valid))
        for expert in experts:
            beta, offset = _member(expert, y, w * counts)
            factor = slope / (len(experts) * expert.scale)
            weight[k, expert.columns] = factor * beta / expert.std
            bias[k] += factor * (offset - beta @ (expert.mean / expert.std) - y_mean)
    fc = model.head.fc
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(weight).to(fc.weight))
        fc.bias.copy_(torch.from_numpy(bias).to(fc.bias))
    return {"method": "per-group ridge (leave-one-out penalty), groups averaged after scaling, bootstrap members",
            "groups": {e.name: {"alpha": e.alpha, "loo_spearman": round(e.loo_rho, 4), "features": len(e.columns),
                                "scale": e.scale} for e in experts},
            "leave_one_out_spearman": round(spearman(combined, y[is_labelled]), 4),
            "logit_map": {"centre": y_mean, "slope": float(slope), "intercept": float(intercept)},
            "rows": {"labelled": int(is_labelled.sum()), "distillation": int((~is_labelled).sum()),
                     "distil_weight": distil_weight},
            "members": members, "seed": seed}


def _standardised(name: str, columns: np.ndarray, x: np.ndarray, w: np.ndarray) -> _Expert:
    xg = x[:, columns].astype(np.float64)
    mean = np.average(xg, axis=0, weights=w)
    std = np.sqrt(np.average((xg - mean) ** 2, axis=0, weights=w)) + _EPS
    a = ((xg - mean) / std).astype(np.float32)
    return _Expert(name, columns, mean, std, a, (a @ a.T).astype(np.float64))


def _choose_alpha(expert: _Expert, centred: np.ndarray, w: np.ndarray, is_labelled: np.ndarray,
                  alphas: Sequence[float]) -> np.ndarray:
    """Set expert.alpha by leave-one-out error on the labelled rows; returns their leave-one-out predictions."""
    root = np.sqrt(w)
    lam, vec = np.linalg.eigh(root[:, None] * expert.gram * root[None, :])
    lam = np.clip(lam, 0, None)
    b = root * centred
    projected = vec.T @ b
    best: tuple[float, float, np.ndarray] | None = None
    for alpha in alphas:
        shrink = lam / (lam + alpha)
        hat = (vec**2 * shrink).sum(axis=1) + w / w.sum()  # + the unpenalised intercept's share
        residual = (b - vec @ (shrink * projected)) / (1 - hat)
        error = float(np.mean(residual[is_labelled] ** 2))
        if best is None or error < best[0]:
            best = (error, alpha, (b - residual)[is_labelled])
    assert best is not None
    expert.alpha = best[1]
    return best[2]


def _member(expert: _Expert, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
    """Weighted ridge on the rows with w > 0: (beta on standardised features, offset): x @ beta + offset."""
    rows = np.flatnonzero(w > 0)
    wr = w[rows] / w[rows].sum()
    gram = expert.gram[np.ix_(rows, rows)]
    g_u = gram @ wr  # centre the kernel at the weighted mean of these rows
    centred = gram - g_u[:, None] - g_u[None, :] + wr @ g_u
    root = np.sqrt(w[rows])
    y_mean = float(wr @ y[rows])
    coef = np.linalg.solve(root[:, None] * centred * root[None, :] + expert.alpha * np.eye(rows.size),
                           root * (y[rows] - y_mean))
    dual = np.zeros(len(w))
    dual[rows] = root * coef
    weights = np.zeros(len(w))
    weights[rows] = wr
    # float32 products: a float64 operand would copy the (rows x features) matrix to float64
    centre = (weights.astype(np.float32) @ expert.features).astype(np.float64)  # the rows' weighted mean
    beta = (dual.astype(np.float32) @ expert.features).astype(np.float64) - centre * dual.sum()
    return beta, y_mean - float(centre @ beta)
