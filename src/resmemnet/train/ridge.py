"""Closed-form training of the ensemble heads: one ridge regression per expert group, bootstrap members.

On LNSIM, a linear read-out of frozen trunk features beats the paper's LSTM head trained on the same
features, and averaging separately fitted experts beats one ridge on their concatenation, because
each expert gets its own amount of shrinkage (MODEL_CARD.md lists the validation numbers). So, on the
cached pooled taps of the training rows (labelled images, then any distillation rows):

1. Standardise each group's features with the training rows' (weighted) statistics.
2. Choose each group's penalty from `alphas` by exact leave-one-out error on the labelled rows
   (scikit-learn's RidgeCV, whose efficient leave-one-out gives every row's prediction).
3. Divide each group by the spread of its leave-one-out predictions and average the groups, so every
   expert weighs the same whatever its number of features.
4. Map that average onto the targets' logit by least squares on the leave-one-out predictions.
5. Members: the same fit (scikit-learn's Ridge) on `members` seeded bootstrap resamples of the rows,
   penalties fixed; their spread is the score's uncertainty.
6. Fold all of it into the head's one Linear(sum(channels), members): the checkpoint is a plain model.

A `gated-ensemble` head gets a second read-out (the fallback: other expert groups, fitted the same way)
and a gate, a logistic regression that tells the labelled images from other photos (`gate_dirs`). On
LNSIM the gate lets the best in-domain experts score outdoor scenes while photos of other kinds lean on
experts that keep resmem's general knowledge (MODEL_CARD.md has the validation numbers).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from resmemnet.metrics import spearman
from resmemnet.model.heads import GatedEnsemble
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
    """One group's standardisation, penalty and scale, and the training rows' standardised features."""

    name: str
    columns: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    features: np.ndarray  # float64: scikit-learn's ridge solvers work in float64
    alpha: float = 0.0
    loo: np.ndarray = field(default_factory=lambda: np.empty(0))  # leave-one-out predictions, labelled rows
    scale: float = 1.0
    loo_rho: float = float("nan")


def fit_linear_ensemble(model: ResMemNet, rows: CachedRows, targets: np.ndarray, *, labelled: int,
                        distil_weight: float = 1.0, alphas: Sequence[float] = DEFAULT_ALPHAS,
                        groups: Sequence[str] = (), seed: int = 0, fallback_groups: Sequence[str] = (),
                        gate_rows: CachedRows | None = None, gate_groups: Sequence[str] = (),
                        gate_c: float = 0.01) -> dict[str, Any]:
    """Fit `model.head` (a LinearEnsemble or GatedEnsemble) in place on `rows` (the first `labelled` are human-scored).

    A GatedEnsemble also needs `fallback_groups` (its second read-out, fitted the same way on the same rows)
    and `gate_rows`: photos unlike the training images, which its gate learns to tell from the labelled
    rows by logistic regression (penalty 1/gate_c) on the `gate_groups` features.
    Returns what was chosen (per group: penalty, leave-one-out rho, scale) for the checkpoint metadata.
    """
    if importlib.util.find_spec("sklearn") is None:
        raise ImportError(f"head {model.config.head!r} is fitted with scikit-learn: pip install 'resmemnet[train]'")
    available = group_columns(model)
    gated = isinstance(model.head, GatedEnsemble)
    chosen = list(groups) or list(available)
    named = {"ensemble_groups": chosen, "fallback_groups": list(fallback_groups), "gate_groups": list(gate_groups)}
    for option, names in named.items():
        unknown = sorted(set(names) - set(available))
        if unknown:
            raise ValueError(f"{option} {unknown} are not tap groups of backbone {model.config.backbone!r}; "
                             f"it has {sorted(available)}")
    if gated and not (fallback_groups and gate_groups and gate_rows is not None):
        raise ValueError("head 'gated-ensemble' needs fallback_groups, gate_groups and gate photos (gate_dirs)")
    if gate_rows is not None and gate_rows.valid.sum() < 10:
        raise ValueError(f"The gate needs at least 10 readable photos in gate_dirs, got {int(gate_rows.valid.sum())}")
    if not gated and (fallback_groups or gate_groups or gate_rows is not None):
        raise ValueError(f"fallback_groups, gate_groups and gate photos need head 'gated-ensemble', "
                         f"not {model.config.head!r}")
    valid = np.flatnonzero(rows.valid)
    is_labelled = valid < labelled
    if is_labelled.sum() < 10:
        raise ValueError(f"A ridge ensemble needs at least 10 labelled training images, got {int(is_labelled.sum())}")
    x = rows.take(valid).numpy()
    p = np.clip(targets[valid], _EPS, 1 - _EPS)
    y = np.log(p / (1 - p))  # the logit
    w = np.where(is_labelled, 1.0, distil_weight)
    experts: dict[str, _Expert] = {}  # standardised once, shared by both read-outs of a gated head
    for name in dict.fromkeys([*chosen, *fallback_groups]):
        experts[name] = _standardised(name, available[name], x, w)
        _choose_alpha(experts[name], y - np.average(y, weights=w), w, is_labelled, alphas)
    fit = _Readout(experts, y, w, is_labelled, model.config.members, seed)
    report: dict[str, Any] = {
        "method": "per-group ridge (leave-one-out penalty), groups averaged after scaling, bootstrap members",
        **fit.into(model.head.fc, chosen),
        "rows": {"labelled": int(is_labelled.sum()), "distillation": int((~is_labelled).sum()),
                 "distil_weight": distil_weight},
        "members": model.config.members, "seed": seed}
    if gated:
        assert gate_rows is not None
        report["fallback"] = fit.into(model.head.fallback, list(fallback_groups))
        report["gate"] = _fit_gate(model.head.gate, x[is_labelled], gate_rows,
                                   np.concatenate([available[g] for g in gate_groups]), gate_c)
    return report


@dataclass
class _Readout:
    """Fits one read-out (a Linear with one output per member) as the average of some of the experts."""

    experts: dict[str, _Expert]
    y: np.ndarray
    w: np.ndarray
    is_labelled: np.ndarray
    members: int
    seed: int

    def into(self, fc: torch.nn.Linear, names: Sequence[str]) -> dict[str, Any]:
        y, w, is_labelled = self.y, self.w, self.is_labelled
        y_mean = float(np.average(y, weights=w))
        experts = [self.experts[name] for name in names]
        combined = np.mean([e.loo / e.scale for e in experts], axis=0)
        slope, intercept = np.polyfit(combined, y[is_labelled] - y_mean, 1)
        if not slope > 0:
            raise ValueError("The experts' average ranks the training images backwards (slope "
                             f"{slope:.3g}); check the targets and the tap groups")
        weight = np.zeros((self.members, fc.in_features))
        bias = np.full(self.members, y_mean + intercept)
        for k in range(self.members):
            counts = np.bincount(np.random.default_rng([self.seed, k]).integers(0, len(w), len(w)), minlength=len(w))
            for expert in experts:
                beta, offset = _member(expert, y, w * counts)
                factor = slope / (len(experts) * expert.scale)
                weight[k, expert.columns] = factor * beta / expert.std
                bias[k] += factor * (offset - beta @ (expert.mean / expert.std) - y_mean)
        with torch.no_grad():
            fc.weight.copy_(torch.from_numpy(weight).to(fc.weight))
            fc.bias.copy_(torch.from_numpy(bias).to(fc.bias))
        return {"groups": {e.name: {"alpha": e.alpha, "loo_spearman": round(e.loo_rho, 4), "features": len(e.columns),
                                    "scale": e.scale} for e in experts},
                "leave_one_out_spearman": round(spearman(combined, y[is_labelled]), 4),
                "logit_map": {"centre": y_mean, "slope": float(slope), "intercept": float(intercept)}}


def _fit_gate(gate: torch.nn.Linear, labelled: np.ndarray, others: CachedRows, columns: np.ndarray,
              c: float) -> dict[str, Any]:
    """Logistic regression, labelled rows (1) against the other photos (0), classes balanced; folded into `gate`."""
    from sklearn.linear_model import LogisticRegression
    negatives = others.take(np.flatnonzero(others.valid)).numpy()[:, columns]
    z = np.concatenate([labelled[:, columns], negatives]).astype(np.float64)
    label = np.r_[np.ones(len(labelled)), np.zeros(len(negatives))]
    mean, std = z.mean(axis=0), z.std(axis=0) + _EPS
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit((z - mean) / std, label)
    coef = clf.coef_[0] / std
    weight = np.zeros(gate.in_features)
    weight[columns] = coef
    with torch.no_grad():
        gate.weight.copy_(torch.from_numpy(weight[None]).to(gate.weight))
        gate.bias.fill_(float(clf.intercept_[0] - coef @ mean))
    g = clf.predict_proba((z - mean) / std)[:, 1]
    return {"method": "logistic regression, training images vs gate photos, balanced classes", "c": c,
            "features": len(columns), "photos": len(negatives),
            "mean_gate": {"training_images": float(g[label == 1].mean()), "gate_photos": float(g[label == 0].mean())}}


def _standardised(name: str, columns: np.ndarray, x: np.ndarray, w: np.ndarray) -> _Expert:
    xg = x[:, columns].astype(np.float64)
    mean = np.average(xg, axis=0, weights=w)
    std = np.sqrt(np.average((xg - mean) ** 2, axis=0, weights=w)) + _EPS
    return _Expert(name, columns, mean, std, (xg - mean) / std)


def _choose_alpha(expert: _Expert, centred: np.ndarray, w: np.ndarray, is_labelled: np.ndarray,
                  alphas: Sequence[float]) -> None:
    """Set expert.alpha by leave-one-out error on the labelled rows, and its leave-one-out predictions there."""
    from sklearn.linear_model import RidgeCV

    def labelled_error(_: Any, predictions: np.ndarray, y: np.ndarray, **weights: Any) -> float:
        """A scorer (higher is better) of the labelled rows alone, whose weights are all 1."""
        return -float(np.mean((predictions[is_labelled] - y[is_labelled]) ** 2))

    search = RidgeCV(alphas=alphas, scoring=labelled_error, store_cv_results=True)
    search.fit(expert.features, centred, sample_weight=w)
    expert.alpha = float(search.alpha_)
    expert.loo = search.cv_results_[is_labelled, list(alphas).index(search.alpha_)]
    expert.scale = float(expert.loo.std()) or 1.0
    expert.loo_rho = spearman(expert.loo, centred[is_labelled])


def _member(expert: _Expert, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
    """Weighted ridge on the rows with w > 0: (beta on standardised features, offset): x @ beta + offset."""
    from sklearn.linear_model import Ridge

    rows = np.flatnonzero(w > 0)
    fit = Ridge(alpha=expert.alpha).fit(expert.features[rows], y[rows], sample_weight=w[rows])
    return fit.coef_, float(fit.intercept_)
