"""The training loop, read top to bottom: `train` = `_setup`, then `_train_phase` per phase, then `_finish`.

Each epoch ends with a whole-validation-set Spearman rho (model selection), a log row (CSV and
TensorBoard), the `last` / `best` checkpoints and the resume state (resmemnet.train.state), which
is also saved every `save_every` steps, so `resume=True` ends exactly where an uninterrupted run
would. Data preparation and the feature caches are resmemnet.train.data's; calibrating, storing and
testing the best checkpoint are resmemnet.train.finish's.

Determinism: the model is built after seeding; the data order is DistributedSampler's (seed,
epoch) permutation; flips are a hash of (seed, epoch, image); and the RNG (dropout) is reseeded from
(seed, global step, rank) before every step, so a resumed run needs no saved RNG blobs and DDP ranks
draw different dropout masks.

A non-finite loss, gradient or weight stops the run with an error at once; the files already
written (`last`/`best`, the resume state) hold the last finite weights.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from resmemnet.checkpoint import save_checkpoint
from resmemnet.data.base import Split
from resmemnet.model.heads import POOLED_HEADS
from resmemnet.model.resmemnet import ResMemNet, create_model
from resmemnet.model.weights import get_weights
from resmemnet.runtime import PrecisionChoice, choose_precision, resolve_device
from resmemnet.train.config import TrainConfig
from resmemnet.train.data import (
    TrainData,
    batches,
    epoch_batches,
    flip_for,
    model_preprocessing,
    prepare_data,
    training_metadata,
)
from resmemnet.train.ddp import Distributed, init_distributed
from resmemnet.train.finish import cached_test, evaluate_run, record_test, store_best
from resmemnet.train.head import TrainingNet, folded
from resmemnet.train.optim import CostAugmentedAdam
from resmemnet.train.ridge import fit_linear_ensemble
from resmemnet.train.schedule import epoch_cycle
from resmemnet.train.state import (
    RESUME_FILE,
    RunResult,
    Saved,
    TrainState,
    append_log,
    read_resume,
    start_logs,
    write_resume,
    write_summary,
)

__all__ = ["TrainingDiverged", "train"]


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or a weight stopped being finite; the files on disk keep the last finite state."""


def _step_seed(seed: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1024 + rank) % (2**63)


def _finite_weights(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------- setup: the run's fixed parts
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
    data: TrainData
    state: TrainState
    saved: Saved | None
    sampler: DistributedSampler
    batches_per_epoch: int
    history: list[dict[str, Any]]
    writer: Any  # TensorBoard SummaryWriter on rank 0

    def checkpoint(self, name: str, metadata: dict[str, Any]) -> Path:
        """Save the model as the user will load it (standardisation folded into the projections)."""
        with folded(self.model, self.data.standardiser):
            return save_checkpoint(self.model, self.output / name, metadata=metadata,
                                   include_backbone=self.with_backbone)

    def log(self, row: dict[str, Any]) -> None:
        """A row of log.csv, also in the history and in TensorBoard."""
        self.history.append(row)
        append_log(self.output / "log.csv", row)
        for key in ("train_loss", "val_spearman", "val_mse", "lr_last", "images_per_s"):
            self.writer.add_scalar(key, row[key], row["epoch"])
        self.writer.flush()

    def save_resume(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        write_resume(self.output / RESUME_FILE, self.model, optimizer, scheduler, self.scaler, self.state,
                     backbone=not self.config.frozen_throughout)


def _setup(config: TrainConfig, split: Split, output: Path, resume: bool, metadata: dict[str, Any]) -> _Run:
    """Processes, device, precision, resume state, data (and feature caches), model; then config.json and logs."""
    wants_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    dist = init_distributed("cuda" if wants_cuda else "cpu")
    device = resolve_device(config.device, local_rank=dist.local_rank)
    precision = choose_precision(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")
    saved = None
    if resume and (output / RESUME_FILE).is_file():
        saved = read_resume(output / RESUME_FILE, config)
    elif not resume and (output / RESUME_FILE).exists():
        raise ValueError(f"{output} already holds a run; pass --resume to continue it, or choose a new output folder")

    torch.manual_seed(config.seed)
    model = create_model(config.model, preprocessing=model_preprocessing(config)).to(device)
    if config.channels_last:  # the convolutions only: the head's weights run fastest as they are
        model.backbone.to(memory_format=torch.channels_last)
    split, data = prepare_data(config, split, model, output, device, precision, dist)
    if saved:
        model.load_state_dict(saved.model, strict=not config.frozen_throughout)
    model.metadata.update(training_metadata(config, split, data, metadata))
    sampler = DistributedSampler(range(len(data.train_targets)), num_replicas=dist.world_size, rank=dist.rank,
                                 shuffle=True, seed=config.seed)
    state = saved.state if saved else TrainState(config=config.to_dict())

    history, writer = start_logs(output, config, state) if dist.is_main else ([], None)  # the run starts cleanly
    # A backbone that never trains and comes from a named offline source is rebuilt at load time:
    # checkpoints then hold only the head (a few MB instead of a ResNet-152's 240).
    trunk = config.model.backbone_weights
    with_backbone = not (config.frozen_throughout and trunk and get_weights(trunk).meta["offline"])
    return _Run(config, split, output, dist, device, precision, scaler, model, with_backbone, data, state, saved,
                sampler=sampler, batches_per_epoch=len(batches(list(range(len(sampler))), config.batch_size)),
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
    net: nn.Module = TrainingNet(model, run.precision, pooled_inputs=cached, standardiser=run.data.standardiser,
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
    steps = batches(list(run.sampler), config.batch_size)
    start = state.step if (phase_idx, epoch) == (state.phase, state.epoch) else 0
    if start == 0:
        state.loss_sum, state.loss_count = 0.0, 0
    flip = partial(flip_for, config.seed, global_epoch) if config.augment == "hflip" else None
    source = epoch_batches(data, steps[start:], flip, "cached" if cached else "rows" if trunk_start else "images",
                           run.model.preprocessing.transforms(), config.workers, pin=run.device.type == "cuda")
    bar = tqdm(total=len(steps), initial=start, disable=not (config.progress and dist.is_main),
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
            run.save_resume(optimizer, scheduler)
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
        val = evaluate_run(run.model, data.cached_val if cached else data.val, data.val_targets, config, run.device,
                           run.precision, data.standardiser if cached else None).metrics
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
        run.log(row)
        meta = {"epoch": global_epoch + 1, "phase": phase_idx + 1, "val_spearman": rho}
        run.checkpoint("last.safetensors", meta)
        if improved:
            run.checkpoint("best.safetensors", meta)
        run.save_resume(optimizer, scheduler)
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
        val = evaluate_run(run.model, data.cached_val, data.val_targets, config, run.device, run.precision).metrics
        seconds = time.perf_counter() - t0
        row = {"epoch": 1, "phase": 1, "frozen": True, "cached": True, "lr_min": 0.0, "lr_max": 0.0, "lr_last": 0.0,
               "train_loss": float("nan"), "val_spearman": val["spearman"], "val_mse": val["mse"],
               "seconds": round(seconds, 3), "images_per_s": round(len(data.train_targets) / max(seconds, 1e-9), 1)}
        run.log(row)
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
    test_data = None
    if test and config.frozen_throughout and run.data.cached_train is not None:  # every rank waits on the cache
        test_data = cached_test(run.model, run.split.test, config, run.output, run.device, run.precision)
    metrics = None
    if dist.is_main:
        run.writer.close()
        val = run.data.cached_val if config.frozen_throughout and run.data.cached_val is not None else run.data.val
        store_best(run.output / "best.safetensors", config, val, run.data.val_targets,  # the cached taps are the
                   include_backbone=run.with_backbone, device=run.device, precision=run.precision)  # trunk's if frozen
        write_summary(run.output, state, run.split.info)
        if test:
            metrics = record_test(config, run.split, run.output, test_data=test_data, device=run.device,
                                  precision=run.precision)
    metrics = dist.broadcast(metrics) if test else None
    return RunResult(run.output, run.output / "best.safetensors", run.output / "last.safetensors", state.best_epoch,
                     state.best_val_spearman, metrics or {}, run.history, state.bad_images)


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

