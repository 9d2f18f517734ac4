"""After the epochs: the best checkpoint calibrated and stored as configured, then scored on the test set.

Both steps are resume-safe: `finished` in the best checkpoint's metadata says it was already
calibrated and cast, and the test record is written into the checkpoint and metrics.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resmemnet.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from resmemnet.data.base import ImageScoreDataset, Split
from resmemnet.evaluate import Evaluation, evaluate
from resmemnet.fileio import atomic_write
from resmemnet.inference import TorchScorer
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.runtime import PrecisionChoice, choose_precision, resolve_device
from resmemnet.train.cache import CachedRows, build_feature_cache
from resmemnet.train.config import TrainConfig
from resmemnet.train.data import cache_dir
from resmemnet.train.head import Standardiser, calibrate
from resmemnet.train.state import write_bad_images
from resmemnet.train.targets import subject_split_test

__all__ = ["as_stored", "cached_test", "evaluate_run", "record_test", "store_best"]


def evaluate_run(model: ResMemNet, data: ImageScoreDataset | CachedRows, targets: np.ndarray, config: TrainConfig,
                 device: torch.device, precision: PrecisionChoice,
                 standardiser: Standardiser | None = None) -> Evaluation:
    """resmemnet.evaluate with a run's settings, on the model as it is (its inputs in the default memory format)."""
    scorer = TorchScorer(model, device=device, precision=precision.name, channels_last=False)
    return evaluate(scorer, data, targets, batch_size=2 * config.batch_size, workers=config.workers,
                    standardiser=standardiser)


def as_stored(model: ResMemNet, config: TrainConfig) -> ResMemNet:
    """The model in its storage dtype: fp16 halves the file; loading casts back to float32. A trunk that
    trained is stored too, so it is halved as well; a frozen one comes from its offline source."""
    if config.head_dtype == "float16":
        if model.projection is not None:
            model.projection.half()
        model.head.half()
        if not config.frozen_throughout:
            model.backbone.half()
    return model


def store_best(best_path: Path, config: TrainConfig, val: ImageScoreDataset | CachedRows, val_targets: np.ndarray,
               *, include_backbone: bool, device: torch.device, precision: PrecisionChoice) -> None:
    """Calibrate on `val` and cast the best checkpoint once; `finished` in its metadata says it was (resume-safe)."""
    if read_metadata(best_path).get("finished"):
        return
    best = load_checkpoint(best_path).to(device)
    extra: dict[str, Any] = {"finished": True}
    if config.calibrate:
        scored = evaluate_run(best, val, val_targets, config, device, precision)
        extra["calibration"] = calibrate(best, scored.predicted, scored.true)
    save_checkpoint(as_stored(best, config), best_path, metadata=extra, include_backbone=include_backbone)


def cached_test(model: ResMemNet, test: ImageScoreDataset, config: TrainConfig, output: Path,
                device: torch.device, precision: PrecisionChoice) -> CachedRows:
    """The test images' cached taps under `model`'s trunk (frozen throughout: the trained run's trunk)."""
    return CachedRows.of(build_feature_cache(
        model, test, cache_dir(config, output), dtype=config.cache_dtype, batch_size=2 * config.batch_size,
        workers=config.workers, device=device, precision=precision,
        progress=config.progress and int(os.environ.get("RANK", "0")) == 0))


def record_test(config: TrainConfig, split: Split, run_dir: str | Path, *,
                test_data: ImageScoreDataset | CachedRows | None = None, device: torch.device | str | None = None,
                precision: PrecisionChoice | None = None) -> dict[str, Any]:
    """Score a finished run's best checkpoint on the split's test set, as users will load it, and record the
    metrics in the checkpoint and in metrics.json. `test_data` defaults to the images (or, for a frozen
    cached run, their cached features)."""
    run_dir = Path(run_dir)
    best_path = run_dir / "best.safetensors"
    device = resolve_device(config.device) if device is None else torch.device(device)
    precision = precision or choose_precision(config.precision, device)
    scored = load_checkpoint(best_path).to(device)
    if test_data is None:
        test_data = (cached_test(scored, split.test, config, run_dir, device, precision)
                     if config.frozen_throughout and config.cache_features else split.test)
    result = evaluate_run(scored, test_data, split.test.scores, config, device, precision)
    test = {**result.metrics, "bad_images": len(result.failed)}
    if config.test_protocol == "every_subject_split":
        test["every_subject_split"] = subject_split_test(split.info, [split.test.paths[i] for i in result.positions],
                                                         result.predicted)
    test_spearman = test["every_subject_split"]["mean"] if "every_subject_split" in test else test["spearman"]
    save_checkpoint(as_stored(scored, config), best_path, metadata={"test": test, "test_spearman": test_spearman,
                                                                 "test_precision": precision.name},
                    include_backbone=read_metadata(best_path)["backbone_in_file"])
    write_bad_images(run_dir, result.failures)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    with atomic_write(metrics_path) as f:
        json.dump({**metrics, "test": test}, f, indent=2)
    return test
