"""The training loop, read top to bottom: `train` = `_setup`, then `_train_phase` per phase, then `_finish`.

Each epoch ends with a whole-validation-set Spearman rho (model selection), a log row (CSV and
TensorBoard) and the `last` / `best` checkpoints. The resume file holds the weights, the optimizer,
the scheduler and a `TrainState` (position, best-so-far), replaced atomically every `save_every`
steps and at every epoch end, so kill -9 at any moment loses at most the steps since the last save
and `resume=True` ends exactly where an uninterrupted run would.

Determinism: the model is built after seeding; the data order is DistributedSampler's (seed,
epoch) permutation; flips are a hash of (seed, epoch, image); and the RNG (dropout) is reseeded from
(seed, global step, rank) before every step, so a resumed run needs no saved RNG blobs and DDP ranks
draw different dropout masks.

A non-finite loss, gradient or weight stops the run with an error at once; the files already
written (`last`/`best`, the resume state) hold the last finite weights.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from resmemnet.checkpoint import atomic_save_file, load_checkpoint, read_metadata, save_checkpoint
from resmemnet.data.base import ImageScoreDataset, Split
from resmemnet.data.decoded import DecodedImages, collate_decoded
from resmemnet.fileio import atomic_write
from resmemnet.inference import TorchScorer, score_paths
from resmemnet.metrics import regression_metrics
from resmemnet.model.heads import POOLED_HEADS
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.resmemnet import ResMemNet, create_model
from resmemnet.model.weights import get_weights
from resmemnet.runtime import PrecisionChoice, autocast, choose_precision, resolve_device
from resmemnet.train.cache import CachedRows, build_feature_cache
from resmemnet.train.config import TrainConfig
from resmemnet.train.data import flip_for, validation_indices
from resmemnet.train.ddp import Distributed, init_distributed
from resmemnet.train.head import Standardiser, calibrate, folded
from resmemnet.train.optim import CostAugmentedAdam
from resmemnet.train.ridge import fit_linear_ensemble
from resmemnet.train.schedule import epoch_cycle
from resmemnet.train.targets import (
    distil_images,
    distil_rows,
    mean_targets,
    subject_split_test,
    tap_column,
    teacher_targets,
)
from resmemnet.train.teacher import teacher_scores

__all__ = ["RESUME_FILE", "RunResult", "TrainState", "TrainingDiverged", "as_stored", "config_changes",
           "evaluate", "model_preprocessing", "predict_rows", "read_log", "record_test", "train"]

RESUME_FILE = "resume.safetensors"
_RESUME_KEY = "resmemnet_resume"
LOG_FIELDS = ("epoch", "phase", "frozen", "cached", "lr_min", "lr_max", "lr_last", "train_loss", "val_spearman",
              "val_mse", "seconds", "images_per_s")
_RESUME_MAY_CHANGE = ("progress", "workers", "device")  # settings that do not change the result


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or a weight stopped being finite; the files on disk keep the last finite state."""


@dataclass
class TrainState:
    """Where a run stands; saved in the resume file, so a resumed run continues from exactly here."""

    phase: int = 0  # index into config.phases
    epoch: int = 0  # epoch within the phase
    step: int = 0  # batch within the epoch
    global_step: int = 0
    best_val_spearman: float = -math.inf
    best_epoch: int = 0  # 1-based over all phases; 0 = none yet
    stale_epochs: int = 0  # epochs without a better validation rho, within the phase (early stopping)
    loss_sum: float = 0.0  # this epoch's summed per-image loss so far
    loss_count: int = 0
    log_rows: int = 0  # rows of log.csv that belong to this state
    optimizer_phase: int = -1  # the phase whose optimizer state the resume file holds
    bad_images: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


@dataclass
class RunResult:
    """What a run produced; `test` holds the best checkpoint's metrics on the split's test set."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_val_spearman: float
    test: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    bad_images: list[str] = field(default_factory=list)
    chosen_candidate: str = ""  # with candidates: the one kept (see <run_dir>/candidates.md)


def model_preprocessing(config: TrainConfig) -> Preprocessing:
    """The trunk weights' own normalisation (e.g. resmem trunks take [0, 1] inputs) at `image_size` (and `crop`)."""
    weights = config.model.backbone_weights
    base = get_weights(weights).preprocessing if weights else Preprocessing()
    return replace(base, resize=(config.image_size, config.image_size),
                   crop=(config.crop, config.crop) if config.crop else None)


class _Net(nn.Module):
    """Backbone under autocast, head in float32: the head is cheap, and a bf16 LSTM/sigmoid output has
    too few distinct values to rank images. One module, so DDP wraps the cached and uncached paths alike.
    Cached inputs are standardised first when the run standardises; cached trunk rows (`trunk_start` > 0)
    run the trunk's blocks from that tap on."""

    def __init__(self, model: ResMemNet, precision: PrecisionChoice, pooled_inputs: bool,
                 standardiser: Standardiser | None, trunk_start: int = 0):
        super().__init__()
        self.model = model
        self.precision = precision
        self.pooled_inputs = pooled_inputs
        self.standardiser = standardiser
        self.trunk_start = trunk_start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trunk_start:
            with autocast(x.device, self.precision):
                x = self.model.pool_rows(x, self.trunk_start)
        elif not self.pooled_inputs:
            with autocast(x.device, self.precision):
                x = self.model.pool_taps(x)
        elif self.standardiser is not None:
            x = self.standardiser(x)
        return self.model.forward_pooled(x.float())


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    """Full batches only (a trailing batch of one breaks BatchNorm in training), at least one batch."""
    full = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return full or [order]


def _step_seed(seed: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1024 + rank) % (2**63)


# ---------------------------------------------------------------- batches: from images or from the cache
def _image_batches(dataset: ImageScoreDataset, targets: np.ndarray, transform: Any, batches: list[list[int]],
                   flip: Any, workers: int, pin: bool) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, list[str]]]:
    loader = DataLoader(DecodedImages(dataset.paths, transform, flip=flip), batch_sampler=batches,
                        num_workers=workers, collate_fn=collate_decoded, pin_memory=pin)
    for batch in loader:
        errors = [f"{item.path}: {item.error}" for item in batch.failed]
        yield batch.images, torch.from_numpy(targets[batch.indices.numpy()]), errors


def _cached_batches(rows: CachedRows, targets: np.ndarray, batches: list[list[int]], flip: Any
                    ) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, list[str]]]:
    for batch in batches:
        idx = np.asarray(batch)[rows.valid[batch]]
        views = [flip(int(i)) for i in idx] if flip is not None else 0
        yield (rows.take(idx, views) if idx.size else None), torch.from_numpy(targets[idx]), []


@torch.inference_mode()
def predict_rows(model: ResMemNet, data: ImageScoreDataset | CachedRows, *, batch_size: int = 64, workers: int = 0,
                 device: torch.device | str = "cpu", precision: str = "fp32",
                 standardiser: Standardiser | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(scores, positions scored, errors) over a dataset or cached rows, through the inference core."""
    scorer = TorchScorer(model, device=device, precision=precision, channels_last=False)
    if isinstance(data, CachedRows):
        idx = np.flatnonzero(data.valid)
        parts = []
        for start in range(0, idx.size, batch_size):
            pooled = data.take(idx[start:start + batch_size])
            parts.append(scorer.score_pooled(standardiser(pooled) if standardiser is not None else pooled))
        return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), idx, list(data.errors)
    scores, positions, errors = [], [], []
    offset = 0
    for rows in score_paths(data.paths, scorer, batch_size=batch_size, workers=workers):
        for k, row in enumerate(rows):
            if row.score is None:
                errors.append(f"{row.path}: {row.error}")
            else:
                scores.append(row.score)
                positions.append(offset + k)
        offset += len(rows)
    return np.asarray(scores, np.float32), np.asarray(positions, np.int64), errors


def evaluate(model: ResMemNet, data: ImageScoreDataset | CachedRows, scores: np.ndarray, *, batch_size: int = 64,
             workers: int = 0, device: torch.device | str = "cpu", precision: str = "fp32",
             standardiser: Standardiser | None = None) -> tuple[dict[str, float], list[str]]:
    """Metrics over the whole set (never averaged over batches) and the images that failed to load."""
    pred, idx, errors = predict_rows(model, data, batch_size=batch_size, workers=workers, device=device,
                                     precision=precision, standardiser=standardiser)
    if not idx.size:
        raise ValueError(f"No image of {len(scores)} could be scored: {errors[:3]}")
    return regression_metrics(pred, scores[idx]), errors


# ---------------------------------------------------------------- resume state: safetensors + JSON, atomic
def _write_resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                  state: TrainState, *, backbone: bool) -> None:
    """Tensors (weights, Adam moments) as safetensors; the TrainState and the rest as JSON in the same file.

    `backbone=False` leaves the backbone out: frozen in every phase, it never changes and is rebuilt with the model.
    """
    tensors = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()
               if backbone or not k.startswith("backbone.")}
    opt = optimizer.state_dict()
    opt_json: dict[str, Any] = {"param_groups": opt["param_groups"], "state": {}}
    for pid, param_state in opt["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().clone().contiguous()
            else:
                opt_json["state"].setdefault(str(pid), {})[name] = value
    meta = {"state": json.loads(state.to_json()), "optimizer": opt_json, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict()}
    atomic_save_file(tensors, path, {_RESUME_KEY: json.dumps(meta)})


@dataclass
class _Saved:
    """A resume file, read back."""

    state: TrainState
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]


def _read_resume(path: Path) -> _Saved:
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {})[_RESUME_KEY])
    tensors = load_file(path)
    opt_state: dict[int, dict[str, Any]] = {int(pid): dict(s) for pid, s in meta["optimizer"]["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    return _Saved(state=TrainState(**meta["state"]),
                  model={k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
                  optimizer={"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]},
                  scheduler=meta["scheduler"], scaler=meta["scaler"])


def config_changes(old: dict[str, Any], config: TrainConfig) -> list[str]:
    """The keys whose values differ between a run's saved config and `config`, besides harmless ones.
    A key the saved config lacks (an option added since) counts as its default."""
    new, defaults = config.to_dict(), TrainConfig().to_dict()
    return sorted(k for k in set(old) | set(new)
                  if k not in _RESUME_MAY_CHANGE and old.get(k, defaults.get(k)) != new.get(k))


def _check_resumable(saved: _Saved, config: TrainConfig, path: Path) -> None:
    changed = config_changes(saved.state.config, config)
    if changed:
        raise ValueError(f"Cannot resume {path}: the config differs in {changed}. Resume with the same config, "
                         "or start a new run in another output folder.")


def read_log(path: Path) -> list[dict[str, Any]]:
    """A run's log.csv, its rows back to the values they were written from."""
    with open(path, newline="") as f:
        return [{k: v == "True" if v in ("True", "False") else (int(v) if k in ("epoch", "phase") else float(v))
                 for k, v in row.items()} for row in csv.DictReader(f)]


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _finite_weights(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------- the run's fixed parts
@dataclass
class _Data:
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


@dataclass
class _Run:
    config: TrainConfig
    split: Split  # with a validation set (carved from train when the split has none)
    output: Path
    dist: Distributed
    device: torch.device
    precision: PrecisionChoice
    scaler: torch.amp.GradScaler
    model: ResMemNet
    with_backbone: bool  # False: checkpoints hold only what trains (the trunk comes from its offline source)
    data: _Data
    state: TrainState
    saved: _Saved | None
    sampler: DistributedSampler
    batches_per_epoch: int
    history: list[dict[str, Any]]
    writer: Any  # TensorBoard SummaryWriter on rank 0

    @property
    def resume_path(self) -> Path:
        return self.output / RESUME_FILE

    def checkpoint(self, name: str, metadata: dict[str, Any]) -> Path:
        """Save the model as the user will load it (standardisation folded into the projections)."""
        with folded(self.model, self.data.standardiser):
            return save_checkpoint(self.model, self.output / name, metadata=metadata,
                                   include_backbone=self.with_backbone)


def _cache_dir(config: TrainConfig, output: Path) -> Path:
    return Path(config.cache_dir).expanduser() if config.cache_dir else output / "feature_cache"


def _prepare_data(config: TrainConfig, split: Split, model: ResMemNet, output: Path, device: torch.device,
                  precision: PrecisionChoice, dist: Distributed) -> tuple[Split, _Data]:
    """Carve validation, pick the targets (a teacher's, when the config names one), and fill the feature caches:
    pooled taps for frozen phases, trunk rows for trained phases that start after `frozen_until`.

    The cache is built over the split's own parts (train before carving, val if shipped, test), so a
    different validation carve or target reuses it; every rank waits on the same file lock.
    """
    full_train = split.train
    train_targets = mean_targets(split.info, full_train.paths) if config.target == "mean" else full_train.scores
    if split.val is None:
        kept, held_out = validation_indices(len(full_train), config.val_fraction, config.seed)
        val_ds = ImageScoreDataset([full_train.paths[i] for i in held_out], train_targets[held_out])
        info = {**split.info, "val_carved_fraction": config.val_fraction, "val_carve_seed": config.seed}
    else:
        kept, held_out = np.arange(len(full_train)), None
        val_targets = mean_targets(split.info, split.val.paths) if config.target == "mean" else split.val.scores
        val_ds = ImageScoreDataset(split.val.paths, val_targets)
        info = split.info
    train_ds = ImageScoreDataset([full_train.paths[i] for i in kept], train_targets[kept])
    split = Split(train=train_ds, test=split.test, val=val_ds, info=info)
    data = _Data(train_ds, val_ds, train_ds.scores.astype(np.float32), val_ds.scores.astype(np.float32))
    kwargs = {"dtype": config.cache_dtype, "batch_size": 2 * config.batch_size, "workers": config.workers,
              "device": device, "precision": precision, "progress": config.progress and dist.is_main}
    cache_dir = _cache_dir(config, output)
    views = 2 if config.augment == "hflip" else 1
    frozen_cached = config.cache_features and any(p.frozen for p in config.phases)
    if config.teacher:
        data = _teacher_data(config, data, cache_dir / "teacher", precision, dist)
        if frozen_cached:
            data.cached_train = CachedRows.of(build_feature_cache(model, data.train, cache_dir, views=views, **kwargs))
            data.cached_val = CachedRows.of(build_feature_cache(model, data.val, cache_dir, **kwargs))
    if config.frozen_until and not config.frozen_throughout:
        data.trunk_start = model.backbone.stage_end(config.frozen_until)
        data.cached_rows = CachedRows.of(build_feature_cache(model, data.train, cache_dir, views=views,
                                                             start=data.trunk_start, **kwargs))
    if config.teacher or not frozen_cached:
        return split, data

    train_cache = build_feature_cache(model, full_train, cache_dir, views=views, **kwargs)
    data.cached_train = CachedRows.of(train_cache, kept)
    data.cached_val = (CachedRows.of(train_cache, held_out) if held_out is not None else
                       CachedRows.of(build_feature_cache(model, val_ds, cache_dir, **kwargs)))
    human = data.train_targets  # distillation targets are matched to the human scores' scale
    extras: list[tuple[CachedRows, np.ndarray]] = []
    if config.distil_csv:
        extra, extra_targets = distil_rows(config.distil_csv, human)
        extras.append((CachedRows.of(build_feature_cache(model, extra, cache_dir, views=views, **kwargs)),
                       extra_targets))
    def photo_rows(folders: Sequence[str], stride: int, option: str, views: int = 1) -> CachedRows:
        """Cached taps of every `stride`-th unlabelled photo in `folders` (`option` names them in errors)."""
        paths = distil_images(folders, stride, option)
        photos = ImageScoreDataset(paths, np.zeros(len(paths), np.float32))
        return CachedRows.of(build_feature_cache(model, photos, cache_dir, views=views, **kwargs))

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
    return split, data


def _teacher_data(config: TrainConfig, data: _Data, cache_dir: Path, precision: PrecisionChoice,
                  dist: Distributed) -> _Data:
    """Train rows with the teacher's targets: each train image's blended with its human score, then the
    distil_dirs photos with the teacher's own. Photos the teacher could not read are left out."""
    if dist.enabled and not dist.is_main:
        raise ValueError("a teacher's scores are computed in one process: run the command once without "
                         "torchrun (its cache is reused), then under torchrun")
    photos = distil_images(config.distil_dirs, config.distil_stride) if config.distil_dirs else []
    paths = [str(p) for p in data.train.paths] + photos
    scores = teacher_scores(config.teacher, paths, cache_dir, precision=precision.name, workers=config.workers,
                            progress=config.progress)
    n = len(data.train)
    scores[:n] = config.human_weight * data.train_targets + (1 - config.human_weight) * scores[:n]
    keep = np.flatnonzero(np.isfinite(scores))
    train = ImageScoreDataset([paths[i] for i in keep], scores[keep])
    return replace(data, train=train, train_targets=train.scores.astype(np.float32))


def _setup(config: TrainConfig, split: Split, output: Path, resume: bool, metadata: dict[str, Any]) -> _Run:
    """Processes, device, precision, resume state, data (and feature caches), model; then config.json and logs."""
    wants_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    dist = init_distributed("cuda" if wants_cuda else "cpu")
    device = resolve_device(config.device, local_rank=dist.local_rank)
    precision = choose_precision(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")
    saved = None
    if resume and (output / RESUME_FILE).is_file():
        saved = _read_resume(output / RESUME_FILE)
        _check_resumable(saved, config, output / RESUME_FILE)
    elif not resume and (output / RESUME_FILE).exists():
        raise ValueError(f"{output} already holds a run; pass --resume to continue it, or choose a new output folder")

    preprocessing = model_preprocessing(config)
    torch.manual_seed(config.seed)
    model = create_model(config.model, preprocessing=preprocessing).to(device)
    if config.channels_last:  # the convolutions only: the head's weights run fastest as they are
        model.backbone.to(memory_format=torch.channels_last)
    split, data = _prepare_data(config, split, model, output, device, precision, dist)
    if saved:
        model.load_state_dict(saved.model, strict=not config.frozen_throughout)
    targets = "every participant's mean score" if config.target == "mean" else "the split's training scores"
    training_data = (f"{split.info.get('dataset', 'dataset')} split {split.info.get('split', 0)} (seed "
                     f"{split.info.get('seed', config.seed)}): {len(data.train_targets)} training rows "
                     f"({len(split.train)} train images"
                     f"{', plus distillation rows' if config.distil_csv or config.distil_dirs else ''}), "
                     f"{len(split.val)} validation images; targets: {targets}")
    model.metadata.update(train_config=config.to_dict(), split=_json_safe(split.info), training_data=training_data,
                          **metadata)
    offline = False
    if config.model.backbone_weights:  # a model inherits its trunk weights' licence (resmem: non-commercial)
        weights = get_weights(config.model.backbone_weights)
        model.metadata["licence"] = weights.meta["licence"]
        offline = bool(weights.meta["offline"])
    if config.name:
        model.metadata["name"] = config.name
    sampler = DistributedSampler(range(len(data.train_targets)), num_replicas=dist.world_size, rank=dist.rank,
                                 shuffle=True, seed=config.seed)
    state = saved.state if saved else TrainState(config=config.to_dict())

    # The run starts cleanly: only now config.json and the logs are written (rank 0).
    history: list[dict[str, Any]] = []
    writer = None
    if dist.is_main:
        output.mkdir(parents=True, exist_ok=True)
        with atomic_write(output / "config.json") as f:
            f.write(config.to_json())
        log_path = output / "log.csv"
        if log_path.is_file():  # rows beyond the resume point are dropped; TensorBoard purges them too
            history = read_log(log_path)[:state.log_rows]
        with open(log_path, "w", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writeheader()
            csv.DictWriter(f, LOG_FIELDS).writerows(history)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output / "tensorboard"), purge_step=state.log_rows + 1)
    # A backbone that never trains and comes from a named offline source is rebuilt at load time:
    # checkpoints then hold only the head (a few MB instead of a ResNet-152's 240).
    return _Run(config, split, output, dist, device, precision, scaler, model,
                with_backbone=not (offline and config.frozen_throughout), data=data, state=state, saved=saved,
                sampler=sampler, batches_per_epoch=len(_batches(list(range(len(sampler))), config.batch_size)),
                history=history, writer=writer)


# ---------------------------------------------------------------- one phase: epochs of steps
def _train_phase(run: _Run, phase_idx: int, epoch_offset: int) -> None:
    config, state, model, dist = run.config, run.state, run.model, run.dist
    phase = config.phases[phase_idx]
    if phase.frozen:
        model.freeze_backbone()
    else:
        model.unfreeze_backbone()
    trunk_start = 0 if phase.frozen else run.data.trunk_start
    if trunk_start:  # the blocks before trunk_start are cached: they neither run nor train
        for tap in model.backbone.taps[:trunk_start]:
            model.backbone.net.get_submodule(tap).requires_grad_(False)
        for name, module in model.backbone.net.named_children():
            if not name.startswith("layer"):  # the stem
                module.requires_grad_(False)
    model.train()
    cached = phase.frozen and run.data.cached_train is not None
    # A fresh optimizer per phase: the trainable set (and the paper's LR range) changes between phases.
    optimizer = CostAugmentedAdam([p for p in model.parameters() if p.requires_grad], lr=phase.lr_min,
                                  cost_lambda=config.cost_lambda, eps=config.adam_eps,
                                  weight_decay=config.weight_decay)
    scheduler = epoch_cycle(optimizer, phase, run.batches_per_epoch)
    if run.saved and state.optimizer_phase == phase_idx:
        optimizer.load_state_dict(run.saved.optimizer)
        scheduler.load_state_dict(run.saved.scheduler)
        run.scaler.load_state_dict(run.saved.scaler)
    net: nn.Module = _Net(model, run.precision, pooled_inputs=cached, standardiser=run.data.standardiser,
                          trunk_start=trunk_start)
    if dist.enabled:
        net = DistributedDataParallel(net, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                                      broadcast_buffers=not phase.frozen)
    if (state.phase, state.epoch, state.step) == (phase_idx, 0, 0):
        state.stale_epochs = 0  # early stopping counts within a phase
    first_epoch = state.epoch if phase_idx == state.phase else 0
    with _one_thread(cached and run.device.type == "cpu"):
        for epoch in range(first_epoch, phase.epochs):
            seconds, images = _train_epoch(run, net, optimizer, scheduler, phase_idx, epoch, epoch_offset + epoch,
                                           cached, trunk_start)
            if _end_epoch(run, phase_idx, epoch, epoch_offset + epoch, cached, scheduler.get_last_lr()[0], seconds,
                          images, optimizer, scheduler):
                break


@contextlib.contextmanager
def _one_thread(enabled: bool) -> Iterator[None]:
    """One intra-op thread for the head alone: its ops are too small to share, and on a busy 2-core CPU a
    second spinning OpenMP thread made a ResNet-152 head step 140x slower (8.2 s against 0.059 s)."""
    before = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_epoch(run: _Run, net: nn.Module, optimizer: CostAugmentedAdam, scheduler: Any, phase_idx: int,
                 epoch: int, global_epoch: int, cached: bool, trunk_start: int) -> tuple[float, int]:
    """One pass over the training batches; returns (seconds, images seen by this rank)."""
    config, state, dist, data = run.config, run.state, run.dist, run.data
    run.sampler.set_epoch(global_epoch)
    batches = _batches(list(run.sampler), config.batch_size)
    start = state.step if (phase_idx, epoch) == (state.phase, state.epoch) else 0
    if start == 0:
        state.loss_sum, state.loss_count = 0.0, 0
    flip = partial(flip_for, config.seed, global_epoch) if config.augment == "hflip" else None
    if cached or trunk_start:
        rows = data.cached_train if cached else data.cached_rows
        source = _cached_batches(rows, data.train_targets, batches[start:], flip)
    else:
        source = _image_batches(data.train, data.train_targets, run.model.preprocessing.transforms(), batches[start:],
                                flip, config.workers, run.device.type == "cuda")
    bar = tqdm(total=len(batches), initial=start, disable=not (config.progress and dist.is_main),
               desc=f"epoch {global_epoch + 1}/{config.total_epochs} "
                    f"({'cached' if cached else 'trunk rows' if trunk_start else 'images'})",
               unit="batch", leave=False)
    t0 = time.perf_counter()
    images_seen = 0
    params = [p for p in run.model.parameters() if p.requires_grad]
    for step, (x, y, errors) in enumerate(source, start):
        if errors:  # listed once, however many epochs meet them
            state.bad_images = sorted(set(state.bad_images) | set(errors))
        torch.manual_seed(_step_seed(config.seed, state.global_step, dist.rank))
        if x is not None:
            x, y = x.to(run.device, non_blocking=True), y.to(run.device)
            if not cached and not trunk_start and config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = F.mse_loss(net(x), y)
            where = f"epoch {global_epoch + 1}, step {step + 1}"
            if not torch.isfinite(loss):
                raise _diverged(run, f"the loss is {loss.item()} at {where}")
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            if not run.scaler.is_enabled():  # with fp16 loss scaling, the scaler itself skips non-finite steps
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                if not torch.isfinite(norm):
                    raise _diverged(run, f"a gradient is {norm.item()} at {where}")
            run.scaler.step(optimizer, loss=loss.detach())
            run.scaler.update()
            state.loss_sum += loss.item() * len(y)
            state.loss_count += len(y)
            images_seen += len(y)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        scheduler.step()
        state.global_step += 1
        state.phase, state.epoch, state.step, state.optimizer_phase = phase_idx, epoch, step + 1, phase_idx
        bar.update(1)
        if dist.is_main and state.global_step % config.save_every == 0:
            if not _finite_weights(run.model):
                raise _diverged(run, f"a weight is not finite after epoch {global_epoch + 1}, step {step + 1}")
            _write_resume(run.resume_path, run.model, optimizer, scheduler, run.scaler, state,
                          backbone=not config.frozen_throughout)
    bar.close()
    return time.perf_counter() - t0, images_seen


def _diverged(run: _Run, what: str) -> TrainingDiverged:
    kept = (f"{run.output / 'last.safetensors'} holds the last finite epoch"
            if (run.output / "last.safetensors").exists() else "no checkpoint was written")
    return TrainingDiverged(f"Training stopped: {what}; {kept}. Lower the learning rates (phases.N.lr_max) or "
                            "check the training scores for NaN/inf.")


def _end_epoch(run: _Run, phase_idx: int, epoch: int, global_epoch: int, cached: bool, lr_last: float,
               seconds: float, images_seen: int, optimizer: CostAugmentedAdam, scheduler: Any) -> bool:
    """Validation rho (rank 0), log row, checkpoints, resume state; True when early stopping ends the phase."""
    config, state, dist, data = run.config, run.state, run.dist, run.data
    phase = config.phases[phase_idx]
    loss_sum, loss_count = dist.sum(state.loss_sum, state.loss_count)
    if not _finite_weights(run.model):
        raise _diverged(run, f"a weight is not finite at the end of epoch {global_epoch + 1}")
    val = None
    if dist.is_main:
        val, _ = evaluate(run.model, data.cached_val if cached else data.val, data.val_targets,
                          batch_size=2 * config.batch_size, workers=config.workers, device=run.device,
                          precision=run.precision.name, standardiser=data.standardiser if cached else None)
    val = dist.broadcast(val)
    rho = val["spearman"]
    # The first epoch always gives a `best` checkpoint, even if its rho is undefined (constant predictions).
    improved = state.best_epoch == 0 or (not math.isnan(rho) and rho > state.best_val_spearman)
    if improved:
        state.best_val_spearman = -math.inf if math.isnan(rho) else rho
        state.best_epoch, state.stale_epochs = global_epoch + 1, 0
    else:
        state.stale_epochs += 1
    row = {"epoch": global_epoch + 1, "phase": phase_idx + 1, "frozen": phase.frozen, "cached": cached,
           "lr_min": phase.lr_min, "lr_max": phase.lr_max, "lr_last": lr_last,
           "train_loss": loss_sum / max(loss_count, 1), "val_spearman": rho, "val_mse": val["mse"],
           "seconds": round(seconds, 3), "images_per_s": round(images_seen * dist.world_size / max(seconds, 1e-9), 1)}
    stop = bool(config.early_stopping) and state.stale_epochs >= config.early_stopping
    last_epoch_of_phase = epoch + 1 == phase.epochs or stop
    state.phase = phase_idx + 1 if last_epoch_of_phase else phase_idx
    state.epoch = 0 if last_epoch_of_phase else epoch + 1
    state.step, state.log_rows = 0, state.log_rows + 1
    if dist.is_main:
        run.history.append(row)
        with open(run.output / "log.csv", "a", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writerow(row)
        for key in ("train_loss", "val_spearman", "val_mse", "lr_last", "images_per_s"):
            run.writer.add_scalar(key, row[key], global_epoch + 1)
        run.writer.flush()
        meta = {"epoch": global_epoch + 1, "phase": phase_idx + 1, "val_spearman": rho}
        run.checkpoint("last.safetensors", meta)
        if improved:
            run.checkpoint("best.safetensors", meta)
        _write_resume(run.resume_path, run.model, optimizer, scheduler, run.scaler, state,
                      backbone=not config.frozen_throughout)
        tqdm.write(f"epoch {global_epoch + 1}: loss {row['train_loss']:.5f}  val rho {rho:.4f}"
                   f"{'  (best)' if improved else ''}", file=sys.stderr)
    return stop


def _fit_closed_form(run: _Run) -> None:
    """A pooled-input head's one "epoch": fitted in closed form on the cached rows (resmemnet.train.ridge).

    Deterministic given the cache and writes no resume state: a resumed run simply fits again.
    """
    config, state, data = run.config, run.state, run.data
    t0 = time.perf_counter()
    if run.dist.is_main:
        report = fit_linear_ensemble(run.model, data.cached_train, data.train_targets, labelled=len(data.train),
                                     distil_weight=config.distil_weight, alphas=config.ridge_alphas,
                                     groups=config.ensemble_groups, seed=config.seed,
                                     fallback_groups=config.fallback_groups, gate_rows=data.cached_gate,
                                     gate_groups=config.gate_groups, gate_c=config.gate_c)
        if not _finite_weights(run.model):
            raise _diverged(run, "the closed-form fit gave non-finite weights")
        val, _ = evaluate(run.model, data.cached_val, data.val_targets, batch_size=2 * config.batch_size,
                          device=run.device, precision=run.precision.name)
        seconds = time.perf_counter() - t0
        row = {"epoch": 1, "phase": 1, "frozen": True, "cached": True, "lr_min": 0.0, "lr_max": 0.0, "lr_last": 0.0,
               "train_loss": float("nan"), "val_spearman": val["spearman"], "val_mse": val["mse"],
               "seconds": round(seconds, 3), "images_per_s": round(len(data.train_targets) / max(seconds, 1e-9), 1)}
        run.history.append(row)
        with open(run.output / "log.csv", "a", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writerow(row)
        meta = {"epoch": 1, "phase": 1, "val_spearman": val["spearman"], "fit": report}
        run.checkpoint("last.safetensors", meta)
        run.checkpoint("best.safetensors", meta)
        state.best_val_spearman, state.best_epoch = val["spearman"], 1
        tqdm.write(f"closed-form fit: val rho {val['spearman']:.4f} ({seconds:.0f} s)", file=sys.stderr)
    state.phase, state.log_rows = 1, state.log_rows + 1
    best = run.dist.broadcast((state.best_val_spearman, state.best_epoch))
    state.best_val_spearman, state.best_epoch = best


# ---------------------------------------------------------------- finish: calibrate, store, test
def _finish(run: _Run, test: bool) -> RunResult:
    """The best checkpoint, calibrated and stored as configured (rank 0), then scored on the test set if `test`."""
    config, state, dist = run.config, run.state, run.dist
    test_data: ImageScoreDataset | CachedRows | None = None
    if test and config.frozen_throughout and run.data.cached_train is not None:  # every rank waits on the cache
        test_data = _cached_test(run.model, run.split.test, config, run.output, run.device, run.precision)
    metrics = None
    if dist.is_main:
        run.writer.close()
        _store_best(run)
        with atomic_write(run.output / "metrics.json") as f:
            json.dump({"test": None, "best_epoch": state.best_epoch, "best_val_spearman": state.best_val_spearman,
                       "split": _json_safe(run.split.info)}, f, indent=2)
        _write_bad_images(run.output, state.bad_images)
        if test:
            metrics = record_test(config, run.split, run.output, test_data=test_data, device=run.device,
                                  precision=run.precision)
    metrics = dist.broadcast(metrics) if test else None
    return RunResult(run.output, run.output / "best.safetensors", run.output / "last.safetensors", state.best_epoch,
                     state.best_val_spearman, metrics or {}, run.history, state.bad_images)


def _cached_test(model: ResMemNet, test: ImageScoreDataset, config: TrainConfig, output: Path,
                 device: torch.device, precision: PrecisionChoice) -> CachedRows:
    return CachedRows.of(build_feature_cache(
        model, test, _cache_dir(config, output), dtype=config.cache_dtype, batch_size=2 * config.batch_size,
        workers=config.workers, device=device, precision=precision,
        progress=config.progress and int(os.environ.get("RANK", "0")) == 0))


def _store_best(run: _Run) -> None:
    """Calibrate and cast the best checkpoint once; `finished` in its metadata says it was (resume-safe)."""
    config = run.config
    best_path = run.output / "best.safetensors"
    if read_metadata(best_path).get("finished"):
        return
    best = load_checkpoint(best_path).to(run.device)
    extra: dict[str, Any] = {"finished": True}
    if config.calibrate:
        # the cached taps are the trunk's only while it never trains
        val = run.data.cached_val if config.frozen_throughout and run.data.cached_val is not None else run.data.val
        pred, idx, _ = predict_rows(best, val, batch_size=2 * config.batch_size, workers=config.workers,
                                    device=run.device, precision=run.precision.name)
        extra["calibration"] = calibrate(best, pred, run.data.val_targets[idx])
    save_checkpoint(as_stored(best, config), best_path, metadata=extra, include_backbone=run.with_backbone)


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


def _write_bad_images(run_dir: Path, bad: list[str]) -> None:
    """Add `bad` to the run's bad_images.txt (one path and reason a line)."""
    path = run_dir / "bad_images.txt"
    known = set(path.read_text().splitlines()) if path.is_file() else set()
    if set(bad) - known:
        with atomic_write(path) as f:
            f.write("\n".join(sorted(known | set(bad))) + "\n")


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
        test_data = (_cached_test(scored, split.test, config, run_dir, device, precision)
                     if config.frozen_throughout and config.cache_features else split.test)
    pred, idx, test_errors = predict_rows(scored, test_data, batch_size=2 * config.batch_size,
                                          workers=config.workers, device=device, precision=precision.name)
    if not idx.size:
        raise ValueError(f"No test image of {len(split.test)} could be scored: {test_errors[:3]}")
    test = {**regression_metrics(pred, split.test.scores[idx]), "bad_images": len(test_errors)}
    if config.test_protocol == "every_subject_split":
        test["every_subject_split"] = subject_split_test(split.info, [split.test.paths[i] for i in idx], pred)
    test_spearman = test["every_subject_split"]["mean"] if "every_subject_split" in test else test["spearman"]
    save_checkpoint(as_stored(scored, config), best_path, metadata={"test": test, "test_spearman": test_spearman,
                                                                 "test_precision": precision.name},
                    include_backbone=read_metadata(best_path)["backbone_in_file"])
    _write_bad_images(run_dir, test_errors)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    with atomic_write(metrics_path) as f:
        json.dump({**metrics, "test": test}, f, indent=2)
    return test


def train(config: TrainConfig, split: Split, output: str | Path, *, resume: bool = False,
          metadata: dict[str, Any] | None = None, test: bool = True) -> RunResult:
    """Train with `config` on `split`, writing the run folder `output`; returns the best model's test metrics.

    `metadata` goes into every checkpoint (the CLI records the config file and the exact command).
    `test=False` leaves the test set unscored (record_test scores it later). A config with candidates
    trains each and keeps the best on validation (resmemnet.train.choose).

    >>> result = train(load_config("configs/paper.toml"), load_split("lnsim", root, split=0), "runs/lnsim0")
    >>> result.best_checkpoint, result.test["spearman"]
    """
    if config.candidates:
        from resmemnet.train.choose import choose_candidate  # choose calls train for each candidate

        return choose_candidate(config, split, output, resume=resume, metadata=metadata)
    run = _setup(config, split, Path(output), resume, metadata or {})
    if config.model.head in POOLED_HEADS:
        _fit_closed_form(run)
        return _finish(run, test)
    epoch_offset = 0
    for phase_idx, phase in enumerate(config.phases):
        if phase_idx >= run.state.phase and phase.epochs:
            _train_phase(run, phase_idx, epoch_offset)
        epoch_offset += phase.epochs
    return _finish(run, test)

