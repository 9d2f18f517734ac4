"""What the trainer feeds on: targets, the validation carve, feature caches, and batches of images or cached rows.

Augmentation is a horizontal flip decided by a hash of (seed, epoch, image index), never by a
global RNG, so a run is the same with any number of DataLoader workers or processes, a resumed run
replays exactly, and a feature cache holding the two views (as-is and flipped) reproduces the
augmented frozen-phase training exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from resmemnet.data.base import ImageScoreDataset, Split
from resmemnet.data.decoded import DecodedImages, collate_decoded
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.model.weights import get_weights
from resmemnet.runtime import PrecisionChoice
from resmemnet.train.cache import CachedRows, FeatureCache, build_feature_cache
from resmemnet.train.config import TrainConfig
from resmemnet.train.ddp import Distributed
from resmemnet.train.head import Standardiser
from resmemnet.train.state import json_safe
from resmemnet.train.targets import distil_images, distil_rows, mean_targets, tap_column, teacher_targets
from resmemnet.train.teacher import teacher_scores

__all__ = ["Batches", "TrainData", "batches", "cache_dir", "epoch_batches", "flip_for", "model_preprocessing",
           "prepare_data", "training_metadata", "training_split", "validation_indices"]

Batches = Iterator[tuple[torch.Tensor | None, torch.Tensor, list[str]]]  # (inputs or None, targets, bad images)


def flip_for(seed: int, epoch: int, index: int) -> int:
    """1 if image `index` is flipped in `epoch`, else 0; a pure function of its arguments."""
    return hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=1).digest()[0] & 1


def model_preprocessing(config: TrainConfig) -> Preprocessing:
    """The trunk weights' own normalisation (e.g. resmem trunks take [0, 1] inputs) at `image_size` (and `crop`)."""
    weights = config.model.backbone_weights
    base = get_weights(weights).preprocessing if weights else Preprocessing()
    return replace(base, resize=(config.image_size, config.image_size),
                   crop=(config.crop, config.crop) if config.crop else None)


def cache_dir(config: TrainConfig, output: Path) -> Path:
    return Path(config.cache_dir).expanduser() if config.cache_dir else output / "feature_cache"


def validation_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions in range(n), both sorted: a seeded random `fraction` (at least 2) is held out.

    numpy's default_rng(seed) decides, so the same seed carves the same images in every run; it works
    on positions, so cached features can be carved exactly like the images they came from.
    """
    n_val = max(2, round(n * fraction))
    if n - n_val < 2:
        raise ValueError(f"Cannot carve a validation set of {n_val} from {n} training images; "
                         "lower val_fraction or use a bigger split")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def training_split(split: Split, config: TrainConfig) -> tuple[Split, np.ndarray, np.ndarray | None]:
    """The split a run trains on, its targets as the scores, with a validation set: the split's own, or the one
    carve (`validation_indices`) of train for splits that ship none, recorded in `info`.

    Also returns the kept train positions and the held-out ones (None: a shipped validation set), so cached
    rows of the whole train part are carved exactly like its images.
    """
    def targets(part: ImageScoreDataset) -> np.ndarray:
        return mean_targets(split.info, part.paths) if config.target == "mean" else part.scores

    full_train, train_targets = split.train, targets(split.train)
    if split.val is None:
        kept, held_out = validation_indices(len(full_train), config.val_fraction, config.seed)
        val = ImageScoreDataset([full_train.paths[i] for i in held_out], train_targets[held_out])
        info = {**split.info, "val_carved_fraction": config.val_fraction, "val_carve_seed": config.seed}
    else:
        kept, held_out = np.arange(len(full_train)), None
        val, info = ImageScoreDataset(split.val.paths, targets(split.val)), split.info
    train = ImageScoreDataset([full_train.paths[i] for i in kept], train_targets[kept])
    return Split(train=train, test=split.test, val=val, info=info), kept, held_out


@dataclass
class TrainData:
    """What the phases train and validate on: a dataset for image phases, cached rows for frozen ones."""

    train: ImageScoreDataset
    val: ImageScoreDataset
    train_targets: np.ndarray  # float32, one per train image (extra distillation rows come after them)
    val_targets: np.ndarray
    cached_train: CachedRows | None = None  # train images (+ distillation rows), views as the augmentation needs
    cached_val: CachedRows | None = None
    standardiser: Standardiser | None = None
    cached_gate: CachedRows | None = None  # photos unlike the train images, for a gated head's gate
    cached_rows: CachedRows | None = None  # trunk rows of the train rows, for trained phases (frozen_until)
    trunk_start: int = 0  # the first tap those phases run (0: no trunk rows)


def prepare_data(config: TrainConfig, split: Split, model: ResMemNet, output: Path, device: torch.device,
                 precision: PrecisionChoice, dist: Distributed) -> tuple[Split, TrainData]:
    """Carve validation, pick the targets (a teacher's, when the config names one), and fill the feature caches:
    pooled taps for frozen phases, trunk rows for trained phases that start after `frozen_until`.

    The cache is built over the split's own parts (train before carving, val if shipped, test), so a
    different validation carve or target reuses it; every rank waits on the same file lock.
    """
    full_train = split.train
    split, kept, held_out = training_split(split, config)
    data = TrainData(split.train, split.val, split.train.scores, split.val.scores)  # float32, as every dataset's
    build: Callable[..., FeatureCache] = partial(
        build_feature_cache, model, cache_dir=cache_dir(config, output), dtype=config.cache_dtype,
        batch_size=2 * config.batch_size, workers=config.workers, device=device, precision=precision,
        progress=config.progress and dist.is_main)
    views = 2 if config.augment == "hflip" else 1
    frozen_cached = config.cache_features and any(p.frozen for p in config.phases)
    if config.teacher:
        data = _teacher_data(config, data, cache_dir(config, output) / "teacher", precision, dist)
        if frozen_cached:
            data.cached_train = CachedRows.of(build(data.train, views=views))
            data.cached_val = CachedRows.of(build(data.val))
    if config.frozen_until and not config.frozen_throughout:
        data.trunk_start = model.backbone.stage_end(config.frozen_until)
        data.cached_rows = CachedRows.of(build(data.train, views=views, start=data.trunk_start))
    if frozen_cached and not config.teacher:
        train_cache = build(full_train, views=views)
        data.cached_train = CachedRows.of(train_cache, kept)
        data.cached_val = (CachedRows.of(train_cache, held_out) if held_out is not None else
                           CachedRows.of(build(data.val)))
        _add_distillation_rows(config, data, model, build, views)
    return split, data


def _add_distillation_rows(config: TrainConfig, data: TrainData, model: ResMemNet,
                           build: Callable[..., FeatureCache], views: int) -> None:
    """Cached rows beyond the train images (distil_csv's, distil_dirs' with a tap's targets), the gate's photos
    and the standardiser of the result."""
    assert data.cached_train is not None
    human = data.train_targets  # distillation targets are matched to the human scores' scale
    extras: list[tuple[CachedRows, np.ndarray]] = []
    if config.distil_csv:
        extra, extra_targets = distil_rows(config.distil_csv, human)
        extras.append((CachedRows.of(build(extra, views=views)), extra_targets))

    def photo_rows(folders: Sequence[str], stride: int, option: str, views: int = 1) -> CachedRows:
        """Cached taps of every `stride`-th unlabelled photo in `folders` (`option` names them in errors)."""
        paths = distil_images(folders, stride, option)
        return CachedRows.of(build(ImageScoreDataset(paths, np.zeros(len(paths), np.float32)), views=views))

    if config.distil_dirs:
        rows = photo_rows(config.distil_dirs, config.distil_stride, "distil_dirs", views)
        extras.append((rows, teacher_targets(rows, tap_column(model, config.distil_tap), human)))
    if config.gate_dirs:
        data.cached_gate = photo_rows(config.gate_dirs, config.gate_stride, "gate_dirs")
    for rows, extra_targets in extras:
        data.cached_train = data.cached_train.plus(rows)
        data.train_targets = np.concatenate([data.train_targets, extra_targets]).astype(np.float32)
    if config.standardise:
        data.standardiser = Standardiser.fit(data.cached_train)


def _teacher_data(config: TrainConfig, data: TrainData, folder: Path, precision: PrecisionChoice,
                  dist: Distributed) -> TrainData:
    """Train rows with the teacher's targets: each train image's blended with its human score, then the
    distil_dirs photos with the teacher's own. Photos the teacher could not read are left out."""
    if dist.enabled and not dist.is_main:
        raise ValueError("a teacher's scores are computed in one process: run the command once without "
                         "torchrun (its cache is reused), then under torchrun")
    photos = distil_images(config.distil_dirs, config.distil_stride) if config.distil_dirs else []
    paths = [str(p) for p in data.train.paths] + photos
    scores = teacher_scores(config.teacher, paths, folder, precision=precision.name, workers=config.workers,
                            progress=config.progress)
    n = len(data.train)
    scores[:n] = config.human_weight * data.train_targets + (1 - config.human_weight) * scores[:n]
    keep = np.flatnonzero(np.isfinite(scores))
    train = ImageScoreDataset([paths[i] for i in keep], scores[keep])
    return replace(data, train=train, train_targets=train.scores.astype(np.float32))


def training_metadata(config: TrainConfig, split: Split, data: TrainData, extra: dict[str, Any]) -> dict[str, Any]:
    """What every checkpoint of a run records: its config, split and training data, then `extra` (the CLI's
    config file and command), then the trunk weights' licence (a model inherits it) and the run's name."""
    targets = "every participant's mean score" if config.target == "mean" else "the split's training scores"
    training_data = (f"{split.info.get('dataset', 'dataset')} split {split.info.get('split', 0)} (seed "
                     f"{split.info.get('seed', config.seed)}): {len(data.train_targets)} training rows "
                     f"({len(split.train)} train images"
                     f"{', plus distillation rows' if config.distil_csv or config.distil_dirs else ''}), "
                     f"{len(data.val)} validation images; targets: {targets}")
    meta = {"train_config": config.to_dict(), "split": json_safe(split.info), "training_data": training_data, **extra}
    if config.model.backbone_weights:  # resmem's trunks: non-commercial
        meta["licence"] = get_weights(config.model.backbone_weights).meta["licence"]
    return {**meta, "name": config.name} if config.name else meta


# ---------------------------------------------------------------- batches: from images or from the cache
def batches(order: list[int], batch_size: int) -> list[list[int]]:
    """Full batches only (a trailing batch of one breaks BatchNorm in training), at least one batch."""
    full = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return full or [order]


def epoch_batches(data: TrainData, batches: list[list[int]], flip: Callable[[int], int] | None,
                  source: Literal["images", "cached", "rows"], transform: Any, workers: int, *, pin: bool) -> Batches:
    """The training rows of `batches` from `source`: decoded images, cached pooled taps or cached trunk rows."""
    if source == "images":
        return _image_batches(data.train, data.train_targets, transform, batches, flip, workers, pin)
    rows = data.cached_train if source == "cached" else data.cached_rows
    assert rows is not None, f"no {source} cache was built"
    return _cached_batches(rows, data.train_targets, batches, flip)


def _image_batches(dataset: ImageScoreDataset, targets: np.ndarray, transform: Any, batches: list[list[int]],
                   flip: Callable[[int], int] | None, workers: int, pin: bool) -> Batches:
    loader = DataLoader(DecodedImages(dataset.paths, transform, flip=flip), batch_sampler=batches,
                        num_workers=workers, collate_fn=collate_decoded, pin_memory=pin)
    for batch in loader:
        errors = [f"{item.path}: {item.error}" for item in batch.failed]
        yield batch.images, torch.from_numpy(targets[batch.indices.numpy()]), errors


def _cached_batches(rows: CachedRows, targets: np.ndarray, batches: list[list[int]],
                    flip: Callable[[int], int] | None) -> Batches:
    for batch in batches:
        idx = np.asarray(batch)[rows.valid[batch]]
        views = [flip(int(i)) for i in idx] if flip is not None else 0
        yield (rows.take(idx, views) if idx.size else None), torch.from_numpy(targets[idx]), []
