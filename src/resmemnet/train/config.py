"""One TrainConfig: defaults < config file (TOML) < CLI overrides; unknown keys and wrong types fail.

The defaults are the paper's recipe ("Training settings and results"): batch 24, 224x224, MSE with
L2 weight decay 1e-4, Adam (eps 1e-6) with an optional cost-augmented gradient, and three phases
with a triangular learning rate cycle inside every epoch.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from resmemnet.model.resmemnet import ModelConfig

__all__ = ["AUGMENTATIONS", "PhaseConfig", "TrainConfig", "load_config", "parse_override"]

AUGMENTATIONS = ("none", "hflip")
AMP_MODES = ("auto", "off", "bf16", "fp16")


@dataclass(frozen=True)
class PhaseConfig:
    """A run of epochs with one learning-rate range; `frozen` keeps the backbone fixed (and cacheable)."""

    epochs: int
    lr_min: float
    lr_max: float
    frozen: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"phase epochs must be >= 0, got {self.epochs}")
        if not 0 < self.lr_min <= self.lr_max:
            raise ValueError(f"phase needs 0 < lr_min <= lr_max, got {self.lr_min}, {self.lr_max}")


PAPER_PHASES = (
    PhaseConfig(epochs=10, lr_min=1e-3, lr_max=1e-2, frozen=True),
    PhaseConfig(epochs=15, lr_min=1e-4, lr_max=1e-3),
    PhaseConfig(epochs=15, lr_min=1e-5, lr_max=1e-4),
)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; saved in the run directory and in each checkpoint's metadata."""

    model: ModelConfig = field(default_factory=ModelConfig)
    phases: tuple[PhaseConfig, ...] = PAPER_PHASES
    seed: int = 0
    batch_size: int = 24
    image_size: int = 224
    weight_decay: float = 1e-4
    adam_eps: float = 1e-6
    cost_lambda: float = 0.0  # H = lambda * J + grad J (paper Eq. 9); 0 gives plain Adam
    augment: str = "hflip"  # random horizontal flip, decided per (seed, epoch, image)
    val_fraction: float = 0.1  # carved (seeded) out of train when a split has no validation set
    early_stopping: int = 0  # end a phase after this many epochs without a better val rho; 0 = off
    cache_features: bool = True  # frozen phases train the head from cached pooled taps
    cache_dir: str = ""  # "" = <output>/feature_cache
    cache_dtype: str = "float16"
    workers: int = 2
    amp: str = "auto"  # auto: bf16 on CPUs with avx512_bf16/amx and on bf16 GPUs, fp16 on older GPUs
    channels_last: bool = True
    device: str = "auto"
    save_every: int = 50  # write resume state every N steps (and at every epoch end)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.image_size < 16:
            raise ValueError(f"batch_size must be >= 1 and image_size >= 16, got {self.batch_size}, {self.image_size}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"Unknown augment {self.augment!r}; available: {', '.join(AUGMENTATIONS)}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"Unknown amp {self.amp!r}; available: {', '.join(AMP_MODES)}")
        if self.cache_dtype not in ("float16", "float32"):
            raise ValueError(f"cache_dtype must be float16 or float32, got {self.cache_dtype!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.save_every < 1 or self.early_stopping < 0 or self.workers < 0:
            raise ValueError("save_every must be >= 1; early_stopping and workers must be >= 0")
        if not self.phases:
            raise ValueError("Need at least one phase")

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["phases"] = [asdict(p) for p in self.phases]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from plain data, checking every key and type (TOML/JSON tables for model and phases)."""
        return _build(cls, data, "")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"Unknown config key(s) {[where + k for k in unknown]}; valid keys: {sorted(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}{k}") for k, v in data.items()})


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the field type; ints may stand for floats, nothing else is converted."""
    origin = typing.get_origin(hint)
    if hint in (ModelConfig, PhaseConfig):
        return _build(hint, value, f"{key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {type(value).__name__}")
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if type(None) in options and (value is None or value in ("none", "null")):
            return None  # TOML has no null: `--set model.backbone_weights=none` clears an optional key
        for option in options:
            if option is not type(None):
                try:
                    return _coerce(value, option, key)
                except ValueError:
                    continue
        raise ValueError(f"{key} must be one of {options}, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.backbone=resnet50' or 'phases.0.epochs=2' -> (path, value); values are TOML, else strings."""
    if "=" not in text:
        raise ValueError(f"Override {text!r} must look like key=value (e.g. batch_size=32, model.head=last)")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _apply(data: dict[str, Any], path: list[str], value: Any) -> None:
    target: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = target[int(part)] if isinstance(target, list) else target.get(part)
        if nxt is None:
            raise ValueError(f"Cannot override {'.'.join(path)}: {'.'.join(path[:i + 1])} does not exist")
        target = nxt
    if isinstance(target, list):
        target[int(path[-1])] = value
    else:
        target[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the TOML file at `path`, then `key=value` overrides; the result is fully checked."""
    data = TrainConfig().to_dict()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file not found: {path}")
        try:
            file_data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from exc
        model = file_data.pop("model", {})
        if not isinstance(model, dict):
            raise ValueError(f"{path}: [model] must be a table")
        data.update(file_data)
        data["model"] = {**data["model"], **model}
    for text in overrides:
        key, value = parse_override(text)
        _apply(data, key, value)
    return TrainConfig.from_dict(data)
