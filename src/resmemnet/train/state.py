"""What a run keeps on disk to resume: the resume file, log.csv and bad_images.txt.

The resume file holds the weights, the optimizer, the scheduler, the fp16 loss scaler and a
`TrainState` (position, best-so-far): tensors as safetensors, the rest as JSON in its metadata,
replaced atomically. The training loop writes it every `save_every` steps and at every epoch end,
so kill -9 at any moment loses at most the steps since the last save.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from resmemnet.checkpoint import save_tensors
from resmemnet.fileio import atomic_write
from resmemnet.train.config import TrainConfig

__all__ = ["LOG_FIELDS", "RESUME_FILE", "RunResult", "Saved", "TrainState", "append_log", "config_changes",
           "json_safe", "read_log", "read_resume", "start_logs", "write_bad_images", "write_resume", "write_summary"]

RESUME_FILE = "resume.safetensors"
_RESUME_KEY = "resmemnet_resume"
LOG_FIELDS = ("epoch", "phase", "frozen", "cached", "lr_min", "lr_max", "lr_last", "train_loss", "val_spearman",
              "val_mse", "seconds", "images_per_s")
_RESUME_MAY_CHANGE = ("progress", "workers", "device")  # settings that do not change the result


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


@dataclass
class Saved:
    """A resume file, read back."""

    state: TrainState
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]


def write_resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
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
    meta = {"state": dataclasses.asdict(state), "optimizer": opt_json, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict()}
    save_tensors(tensors, path, {_RESUME_KEY: json.dumps(meta)})


def read_resume(path: Path, config: TrainConfig) -> Saved:
    """The resume file at `path`, refused unless it was written with `config` (harmless settings aside)."""
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {})[_RESUME_KEY])
    changed = config_changes(meta["state"]["config"], config)
    if changed:
        raise ValueError(f"Cannot resume {path}: the config differs in {changed}. Resume with the same config, "
                         "or start a new run in another output folder.")
    tensors = load_file(path)
    opt_state: dict[int, dict[str, Any]] = {int(pid): dict(s) for pid, s in meta["optimizer"]["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    return Saved(state=TrainState(**meta["state"]),
                 model={k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
                 optimizer={"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]},
                 scheduler=meta["scheduler"], scaler=meta["scaler"])


def config_changes(old: dict[str, Any], config: TrainConfig) -> list[str]:
    """The keys whose values differ between a run's saved config and `config`, besides harmless ones.
    A key the saved config lacks (an option added since) counts as its default."""
    new, defaults = config.to_dict(), TrainConfig().to_dict()
    return sorted(k for k in set(old) | set(new)
                  if k not in _RESUME_MAY_CHANGE and old.get(k, defaults.get(k)) != new.get(k))


def json_safe(value: Any) -> Any:
    """`value` as JSON gives it back (tuples become lists, other objects their str)."""
    return json.loads(json.dumps(value, default=str))


def start_logs(output: Path, config: TrainConfig, state: TrainState) -> tuple[list[dict[str, Any]], Any]:
    """A run starts cleanly: only once it is set up are config.json and the logs written. Returns log.csv's rows
    up to the resume point (later ones are dropped) and a TensorBoard SummaryWriter purged there too."""
    output.mkdir(parents=True, exist_ok=True)
    with atomic_write(output / "config.json") as f:
        f.write(config.to_json())
    history = read_log(output / "log.csv")[:state.log_rows] if (output / "log.csv").is_file() else []
    with open(output / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(history)
    from torch.utils.tensorboard import SummaryWriter  # the [train] extra

    return history, SummaryWriter(str(output / "tensorboard"), purge_step=state.log_rows + 1)


def write_summary(output: Path, state: TrainState, split_info: dict[str, Any]) -> None:
    """metrics.json before the test (best epoch and validation rho, the split) and the bad images met in training."""
    with atomic_write(output / "metrics.json") as f:
        json.dump({"test": None, "best_epoch": state.best_epoch, "best_val_spearman": state.best_val_spearman,
                   "split": json_safe(split_info)}, f, indent=2)
    write_bad_images(output, state.bad_images)


def read_log(path: Path) -> list[dict[str, Any]]:
    """A run's log.csv, its rows back to the values they were written from."""
    with open(path, newline="") as f:
        return [{k: v == "True" if v in ("True", "False") else (int(v) if k in ("epoch", "phase") else float(v))
                 for k, v in row.items()} for row in csv.DictReader(f)]


def append_log(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, LOG_FIELDS).writerow(row)


def write_bad_images(run_dir: Path, bad: list[str]) -> None:
    """Add `bad` to the run's bad_images.txt (one path and reason a line)."""
    path = run_dir / "bad_images.txt"
    known = set(path.read_text().splitlines()) if path.is_file() else set()
    if set(bad) - known:
        with atomic_write(path) as f:
            f.write("\n".join(sorted(known | set(bad))) + "\n")
