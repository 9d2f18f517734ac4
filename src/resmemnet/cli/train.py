"""`resmemnet train`: one split, or every split with baselines (--all-splits); torchrun-compatible.

Every bundled model is built by this command with its config (configs/<name>.toml); each
checkpoint records the config file and the exact command that made it.
"""

from __future__ import annotations

import argparse
import os
import shlex

from resmemnet.cli import COMMANDS
from resmemnet.train.crossval import METHODS, run_crossval


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=COMMANDS["train"],
                       description="Values apply in order: TrainConfig defaults, --config FILE, --set KEY=VALUE. "
                                   "Bundled models: --config configs/<name>.toml --dataset lnsim "
                                   "--root ../shared/datasets/lnsim.")
    p.add_argument("--config", help="TOML config file, e.g. configs/paper.toml")
    p.add_argument("--dataset", required=True, help="dataset name (e.g. lnsim, lamem, synthetic)")
    p.add_argument("--root", required=True, help="dataset folder (for csv: the folder relative paths start from)")
    p.add_argument("--csv", help="csv: the table of image path and score (as for `resmemnet evaluate`)")
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


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (what a checkpoint records)."""
    words = ["resmemnet", "train"]
    if args.config:
        words += ["--config", args.config]
    words += ["--dataset", args.dataset, *(["--csv", args.csv] if args.csv else []), "--root", args.root]
    if args.split:
        words += ["--split", str(args.split)]
    words += ["--output", args.output]
    for override in args.overrides:
        words += ["--set", override]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    from resmemnet.train.ddp import shutdown_distributed

    try:
        return _train(args)
    finally:
        shutdown_distributed()


def _train(args: argparse.Namespace) -> int:
    from resmemnet.data import load_split, num_splits
    from resmemnet.train.config import load_config
    from resmemnet.train.loop import train

    config = load_config(args.config, args.overrides)
    options = {"csv": args.csv} if args.csv else {}  # the dataset says which options it takes
    if args.all_splits:
        if args.splits is not None and args.splits < 1:
            raise ValueError(f"--splits must be at least 1, got {args.splits}")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods:
            raise ValueError(f"--methods is empty; choose from {','.join(METHODS)}")
        splits = range(args.splits or num_splits(args.dataset, args.root, **options))
        result = run_crossval(config, args.dataset, args.root, args.output, splits=splits, methods=methods,
                              resume=args.resume, **options)
        print(result.table, end="")
        return 0
    split = load_split(args.dataset, args.root, split=args.split, seed=config.seed, **options)
    result = train(config, split, args.output, resume=args.resume,
                   metadata={"config_file": args.config or "", "command": command_line(args)})
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 reports
        test = result.test
        every = test.get("every_subject_split")
        extra = f"; vs half-2 of every subject split {every['mean']:.4f} +- {every['std']:.4f}" if every else ""
        print(f"best epoch {result.best_epoch}: val rho {result.best_val_spearman:.4f}; test rho "
              f"{test['spearman']:.4f} (n={test['n']}){extra}; best checkpoint {result.best_checkpoint}")
        if result.chosen_candidate:
            print(f"chosen by validation rho: candidate {result.chosen_candidate!r} of {len(config.candidates)} "
                  f"(table: {result.run_dir / 'candidates.md'})")
    return 0
