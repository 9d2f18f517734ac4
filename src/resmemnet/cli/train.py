"""`resmemnet train`: one split, or every split with baselines (--all-splits); torchrun-compatible."""

from __future__ import annotations

import argparse
import os

from resmemnet.train.config import load_config
from resmemnet.train.crossval import METHODS, run_crossval
from resmemnet.train.data import count_splits, load_split
from resmemnet.train.loop import train


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (the paper's recipe by default) or cross-validate it",
                       description="Values apply in order: TrainConfig defaults, --config FILE, --set KEY=VALUE.")
    p.add_argument("--config", help="TOML config file, e.g. configs/paper.toml")
    p.add_argument("--dataset", required=True, help="dataset name (e.g. lnsim, lamem, synthetic)")
    p.add_argument("--root", required=True, help="dataset folder")
    p.add_argument("--split", type=int, default=0, help="split index (default 0)")
    p.add_argument("--output", required=True, help="run folder: config, log.csv, tensorboard/, checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last saved step")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set batch_size=32 --set model.head=last "
                        "--set phases.0.epochs=2 (repeatable)")
    p.add_argument("--all-splits", action="store_true",
                   help="cross-validate: train and test on every split, with baselines, and write results.md")
    p.add_argument("--splits", type=int, help="with --all-splits: how many splits, from 0 (default: all the "
                                              "dataset defines: 5 for LaMem, 25 for LNSIM)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"with --all-splits: comma-separated subset of {','.join(METHODS)}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.all_splits:
        splits = range(args.splits or count_splits(args.dataset, args.root))
        result = run_crossval(config, args.dataset, args.root, args.output, splits=splits,
                              methods=[m.strip() for m in args.methods.split(",") if m.strip()], resume=args.resume)
        print(result.table, end="")
        return 0
    result = train(config, load_split(args.dataset, args.root, split=args.split, seed=config.seed), args.output,
                   resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 reports
        print(f"best epoch {result.best_epoch}: val rho {result.best_val_spearman:.4f}; test rho "
              f"{result.test['spearman']:.4f} (n={result.test['n']}); best checkpoint {result.best_checkpoint}")
    return 0
