"""`resmemnet dataset`: what a dataset folder holds (images found and absent, splits, scores, human consistency)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from resmemnet.cli import COMMANDS
from resmemnet.data import DATASET_NAMES, describe_dataset


def add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that name a dataset; shared with `resmemnet evaluate`."""
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES, help="dataset format")
    p.add_argument("--root", required=True, help="dataset folder (for csv: the folder relative paths start from)")
    p.add_argument("--csv", help="csv: the table of image path and score; memcat: the CSV if not in --root")
    p.add_argument("--score-column", help="memcat: memorability_w_fa_correction (default) or "
                                          "memorability_wo_fa_correction; csv: the score column (default: score)")
    p.add_argument("--path-column", help="csv: the image path column (default: path)")
    p.add_argument("--images-dir", help="sun: writable folder for the images extracted from target_images.mat")


def dataset_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options the user gave; the loader says which ones a dataset does not take."""
    given = {"csv": args.csv, "score_column": args.score_column, "path_column": args.path_column,
             "images_dir": args.images_dir}
    return {key: value for key, value in given.items() if value is not None}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help=COMMANDS["dataset"])
    add_dataset_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _stats(stats: dict[str, Any]) -> str:
    if not stats.get("n"):
        return "none"
    return (f"n={stats['n']:,} mean={stats['mean']:.3f} std={stats['std']:.3f} "
            f"min={stats['min']:.3f} median={stats['median']:.3f} max={stats['max']:.3f}")


def run(args: argparse.Namespace) -> int:
    info = describe_dataset(args.dataset, args.root, **dataset_options(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    images, splits = info["images"], info["splits"]
    print(f"dataset: {info['dataset']} at {info['root']}")
    print(f"images: {images['present']:,} present, {images['absent']:,} absent of {images['listed']:,} listed"
          + (f" (e.g. {', '.join(images['absent_examples'])})" if images["absent"] else ""))
    print(f"splits: {splits['count']}")
    for row in splits.get("sizes", []):
        print("  split {split}: ".format(**row) + ", ".join(f"{k} {v:,}" for k, v in row.items() if k != "split"))
    for key in ("train", "test", "image_split"):
        if key in splits:
            print(f"  {key}: {splits[key]}")
    print(f"scores: {_stats(info['scores'])}")
    if "unscored" in info:  # split halves: NaN where nobody in that half saw the image
        unscored = info["unscored"]
        print(f"unscored (nobody saw it): {unscored['half1']:,} image-splits in half 1, {unscored['half2']:,} in "
              f"half 2; {unscored['never']:,} images never scored")
    human = info.get("human_consistency")
    print("human consistency: " + (f"{human['mean']:.3f} ± {human['std']:.3f} over {human['n']} splits"
                                   if human else "n/a (no split-half scores)"))
    return 0
