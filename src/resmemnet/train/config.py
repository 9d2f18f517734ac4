"""One TrainConfig: defaults < config file (TOML) < `--set` overrides, checked strictly by pydantic.

The defaults are the paper's recipe ("Training settings and results"): batch 24, 224x224, MSE with
L2 weight decay 1e-4, Adam (eps 1e-6) with an optional cost-augmented gradient, and three phases
with a triangular learning rate cycle inside every epoch. Unknown keys, wrong types (no silent
conversions: 2.5 is no batch size, 1 is no bool), non-finite numbers and absurd sizes fail with
one line naming the key.

The options after the paper's recipe build the bundled models (configs/resmemnet-lnsim-*.toml):
standardised cached inputs folded into the projections, all-participant mean targets, a
calibrated and fp16-stored head, and the split-half test against every subject split.

`candidates` lists recipes to choose from: each is the config with its own dotted overrides, trained
on the same train/validation carve; the one with the best validation Spearman rho is kept
(resmemnet.train.choose).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import tomllib
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from resmemnet.checkpoint import MAX_INPUT_SIDE
from resmemnet.model.heads import POOLED_HEADS
from resmemnet.model.resmemnet import ModelConfig
from resmemnet.train.ridge import DEFAULT_ALPHAS

__all__ = ["AUGMENTATIONS", "PAPER_PHASES", "Candidate", "PhaseConfig", "TrainConfig", "load_config",
           "parse_override"]

AUGMENTATIONS = ("none", "hflip")
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_IMAGE_SIZE = MAX_INPUT_SIDE  # what a checkpoint may declare: a run never writes a file loading refuses
MAX_LR = 10.0

_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # ints are accepted, strings and inf/nan not


class PhaseConfig(BaseModel):
    """A run of epochs with one learning-rate range; `frozen` keeps the backbone fixed (and cacheable)."""

    model_config = _STRICT

    epochs: Annotated[StrictInt, Field(ge=0, le=MAX_EPOCHS)]
    lr_min: Annotated[Float, Field(gt=0, le=MAX_LR)]
    lr_max: Annotated[Float, Field(gt=0, le=MAX_LR)]
    frozen: StrictBool = False

    @pydantic.model_validator(mode="after")
    def _ordered(self) -> PhaseConfig:
        if self.lr_min > self.lr_max:
            raise ValueError(f"needs lr_min <= lr_max, got {self.lr_min} > {self.lr_max}")
        return self


class Candidate(BaseModel):
    """A recipe to try: the config with `set` applied (dotted overrides, as for `--set`)."""

    model_config = _STRICT

    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]  # also its run folder
    set: Annotated[tuple[StrictStr, ...], Field(max_length=100, strict=False)] = ()


# What validation means: a candidate may not change it, or the candidates' rhos would not compare.
_SAME_FOR_EVERY_CANDIDATE = ("seed", "val_fraction", "target", "candidates")

PAPER_PHASES = (
    PhaseConfig(epochs=10, lr_min=1e-3, lr_max=1e-2, frozen=True),
    PhaseConfig(epochs=15, lr_min=1e-4, lr_max=1e-3),
    PhaseConfig(epochs=15, lr_min=1e-5, lr_max=1e-4),
)

# The [model] table is checked against ModelConfig's own fields (strict types, no unknown keys);
# ModelConfig then checks names and ranges itself.
_ModelTable = pydantic.create_model(
    "model", __config__=ConfigDict(extra="forbid", strict=True, allow_inf_nan=False),
    **{f.name: (f.type if f.type != "float" else Float, f.default) for f in dataclasses.fields(ModelConfig)})


class TrainConfig(BaseModel):
    """Every setting of a training run; saved in the run directory and in each checkpoint's metadata."""

    model_config = _STRICT

    model: ModelConfig = Field(default_factory=ModelConfig)
    phases: Annotated[tuple[PhaseConfig, ...], Field(min_length=1, max_length=100, strict=False)] = PAPER_PHASES
    seed: Annotated[StrictInt, Field(ge=0, lt=2**32)] = 0
    batch_size: Annotated[StrictInt, Field(ge=1, le=MAX_BATCH)] = 24
    image_size: Annotated[StrictInt, Field(ge=16, le=MAX_IMAGE_SIZE)] = 224
    crop: Annotated[StrictInt, Field(ge=0, le=MAX_IMAGE_SIZE)] = 0  # a centre crop after resizing; 0 = none
    weight_decay: Annotated[Float, Field(ge=0, le=1)] = 1e-4
    adam_eps: Annotated[Float, Field(gt=0, le=1)] = 1e-6
    cost_lambda: Annotated[Float, Field(ge=0, le=100)] = 0.0  # H = lambda * J + grad J (paper Eq. 9); 0: Adam
    augment: Literal["none", "hflip"] = "hflip"  # random horizontal flip, decided per (seed, epoch, image)
    val_fraction: Annotated[Float, Field(gt=0, lt=1)] = 0.1  # carved (seeded) out of train when a split has none
    early_stopping: Annotated[StrictInt, Field(ge=0, le=MAX_EPOCHS)] = 0  # stale epochs that end a phase; 0 = off
    cache_features: StrictBool = True  # frozen phases train the head from cached pooled taps
    cache_dir: StrictStr = ""  # "" = <output>/feature_cache; "~" is expanded
    cache_dtype: Literal["float16", "float32"] = "float16"
    workers: Annotated[StrictInt, Field(ge=0, le=256)] = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # resmemnet.runtime.choose_precision
    channels_last: StrictBool = True
    device: StrictStr = "auto"
    save_every: Annotated[StrictInt, Field(ge=1)] = 50  # write resume state every N steps (and at epoch ends)
    progress: StrictBool = True
    # ---- what the bundled models use (see the module docstring)
    standardise: StrictBool = False  # train on (taps - mean) / std of the train taps; folded into the 1x1 convs
    target: Literal["split", "mean"] = "split"  # "mean": every participant's mean score (split-half datasets)
    test_protocol: Literal["split", "every_subject_split"] = "split"  # the latter: mean rho vs half-2 of each
    calibrate: StrictBool = False  # fit sigmoid(a * logit + c) on validation, folded into the head
    head_dtype: Literal["float32", "float16"] = "float32"  # storage of projection + head in the final best file
    distil_csv: StrictStr = ""  # path,score CSV of extra (unlabelled) training images, e.g. resmem's scores
    distil_dirs: Annotated[tuple[StrictStr, ...], Field(max_length=100, strict=False)] = ()  # unlabelled folders
    distil_stride: Annotated[StrictInt, Field(ge=1, le=1000)] = 1  # every Nth photo of each folder (sorted)
    distil_tap: StrictStr = ""  # the backbone tap whose value is the teacher's score, e.g. "resmem.score"
    distil_weight: Annotated[Float, Field(gt=0, le=100)] = 1.0  # a distillation row's weight (ridge heads)
    teacher: StrictStr = ""  # a bundled model or checkpoint whose scores are the targets (resmemnet.train.teacher)
    human_weight: Annotated[Float, Field(ge=0, le=1)] = 0.5  # with a teacher: the human score's share in a
    # labelled image's target (the rest is the teacher's); distil_dirs photos take the teacher's score
    frozen_until: Literal["", "layer1", "layer2", "layer3"] = ""  # trained phases train only the blocks after
    # this stage, from cached maps of its output (a ResNet's stem and early stages stay as initialised)
    ensemble_groups: Annotated[tuple[StrictStr, ...], Field(max_length=100, strict=False)] = ()  # () = every group
    fallback_groups: Annotated[tuple[StrictStr, ...], Field(max_length=100, strict=False)] = ()  # gated-ensemble
    gate_groups: Annotated[tuple[StrictStr, ...], Field(max_length=100, strict=False)] = ()  # the gate's features
    gate_dirs: Annotated[tuple[StrictStr, ...], Field(max_length=100, strict=False)] = ()  # photos unlike the train set
    gate_stride: Annotated[StrictInt, Field(ge=1, le=1000)] = 1  # every Nth photo of each gate folder (sorted)
    gate_c: Annotated[Float, Field(gt=0, le=1e6)] = 0.01  # the gate's inverse L2 penalty (logistic regression)
    ridge_alphas: Annotated[tuple[Annotated[Float, Field(gt=0, le=1e12)], ...],
                            Field(min_length=1, max_length=100, strict=False)] = DEFAULT_ALPHAS
    name: StrictStr = ""  # the model's name, written into its checkpoints' metadata
    candidates: Annotated[tuple[Candidate, ...], Field(max_length=100, strict=False)] = ()  # best validation wins

    @pydantic.field_validator("model", mode="before")
    @classmethod
    def _model_table(cls, value: Any) -> ModelConfig:
        if isinstance(value, ModelConfig):
            return value
        if isinstance(value, dict) and value.get("backbone_weights") in ("none", "null"):
            value = {**value, "backbone_weights": None}  # TOML has no null: `--set model.backbone_weights=none`
        return ModelConfig(**_ModelTable.model_validate(value).model_dump())

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.total_epochs < 1:
            raise ValueError("every phase has 0 epochs: nothing would train; give a phase epochs >= 1")
        all_frozen_cached = self.cache_features and all(p.frozen for p in self.phases)
        if self.standardise and not all_frozen_cached:
            raise ValueError("standardise=true needs every phase frozen and cache_features=true "
                             "(the statistics come from the cached taps of a fixed backbone)")
        if self.distil_csv and not all_frozen_cached:
            raise ValueError("distil_csv needs every phase frozen and cache_features=true")
        if self.teacher:
            if self.distil_tap or self.distil_csv or self.model.head in POOLED_HEADS or self.standardise:
                raise ValueError("teacher gives every target itself: leave distil_tap and distil_csv empty, and "
                                 "train a head by gradient steps (not a pooled head) without standardise")
        elif bool(self.distil_dirs) != bool(self.distil_tap):
            raise ValueError("distil_dirs needs a source of targets: distil_tap (a backbone tap such as "
                             "'resmem.score' whose value becomes their target) or teacher (a model's scores)")
        if self.distil_dirs and not self.teacher and not all_frozen_cached:
            raise ValueError("distil_dirs with distil_tap needs every phase frozen and cache_features=true")
        if self.frozen_until and (not self.cache_features or self.crop):
            raise ValueError("frozen_until trains from cached maps: it needs cache_features=true and square "
                             "inputs without a crop (crop=0)")
        if self.model.head in POOLED_HEADS:
            if not all_frozen_cached or self.total_epochs != 1 or self.standardise or self.augment != "none":
                raise ValueError(f"head {self.model.head!r} is fitted in closed form on cached features: give one "
                                 "frozen phase of 1 epoch, cache_features=true, standardise=false, augment='none'")
        elif self.ensemble_groups:
            raise ValueError(f"ensemble_groups needs an ensemble head, not {self.model.head!r}")
        gate_options = [bool(self.fallback_groups), bool(self.gate_groups), bool(self.gate_dirs)]
        if self.model.head == "gated-ensemble" and not all(gate_options):
            raise ValueError("head 'gated-ensemble' needs fallback_groups, gate_groups and gate_dirs (folders of "
                             "photos unlike the training images, for its gate)")
        if self.model.head != "gated-ensemble" and any(gate_options):
            raise ValueError(f"fallback_groups, gate_groups and gate_dirs need head 'gated-ensemble', "
                             f"not {self.model.head!r}")
        if self.crop > self.image_size:
            raise ValueError(f"crop {self.crop} is larger than image_size {self.image_size}: the centre crop is "
                             "taken from the resized image")
        if self.calibrate and self.model.output != "sigmoid":
            raise ValueError("calibrate=true needs model.output='sigmoid'")
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"candidates need distinct names, got {names}")
        for candidate in self.candidates:
            self.for_candidate(candidate.name)  # every override is checked now, not after the first run
        return self

    def for_candidate(self, name: str) -> TrainConfig:
        """The config that candidate `name` trains with: this one, its overrides applied, no candidates."""
        candidate = next((c for c in self.candidates if c.name == name), None)
        if candidate is None:
            raise ValueError(f"No candidate {name!r}; this config has {[c.name for c in self.candidates]}")
        data = {**self.to_dict(), "candidates": []}
        try:
            for text in candidate.set:
                path, value = parse_override(text)
                if path[0] in _SAME_FOR_EVERY_CANDIDATE:
                    raise ValueError(f"{text!r} changes {path[0]}, which every candidate shares (they are "
                                     "compared on one validation carve); set it outside [[candidates]]")
                _apply(data, path, value)
            return TrainConfig.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"candidate {name!r}: {str(exc).removeprefix('Invalid config: ')}") from None

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    @property
    def frozen_throughout(self) -> bool:
        """The backbone never trains: its features can be cached for every phase and for the test."""
        return all(p.frozen for p in self.phases)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes` applied, checked like any config."""
        try:
            return type(self).model_validate({**dict(self), **changes})
        except ValidationError as exc:
            raise ValueError(_describe(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        return {**self.model_dump(mode="json", exclude={"model"}), "model": self.model.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from plain data (TOML/JSON), every key and type checked; errors are one line."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    """pydantic's report as one line: 'phases.0.lr_max: Input should be a finite number (got inf)'.

    A list whose items failed is also reported too short, counted without them ("Tuple should have at
    least 1 item"); that follows from the item's error, so only the item's is shown.
    """
    errors = exc.errors()
    failed_inside = {err["loc"][:i] for err in errors for i in range(1, len(err["loc"]))}
    parts = []
    for err in errors:
        if err["type"] == "too_short" and err["loc"] in failed_inside:
            continue
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"Unknown config key {where!r}")
            continue
        message = err["msg"].removeprefix("Value error, ")
        shown = err.get("input")
        got = "" if isinstance(shown, dict) or err["type"].startswith("value_error") else f" (got {shown!r})"
        parts.append(f"{where}: {message}{got}" if where else message)
    return "Invalid config: " + "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.backbone=resnet50' or 'phases.0.epochs=2' -> (path, value); values are TOML, else strings."""
    if "=" not in text:
        raise ValueError(f"Override {text!r} must look like key=value (e.g. batch_size=32, model.head=last)")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    path = key.strip().split(".")
    if not all(path):
        raise ValueError(f"Override {text!r} has an empty key part; use dotted keys like model.head=last")
    return path, value


def _apply(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set data[path] = value; a missing table, a bad list index or a scalar in the way fail by name."""
    target: Any = data
    for i, part in enumerate(path):
        where = ".".join(path[:i + 1])
        last = i == len(path) - 1
        if isinstance(target, list):
            if not part.isdigit() or int(part) >= len(target):
                raise ValueError(f"Cannot override {'.'.join(path)}: {'.'.join(path[:i])} has {len(target)} "
                                 f"entries (indices 0..{len(target) - 1}), not {part!r}")
            if last:
                target[int(part)] = value
            target = target[int(part)]
        elif isinstance(target, dict):
            if last:
                target[part] = value  # an unknown key is reported by validation, with the valid ones
            elif part not in target:
                raise ValueError(f"Cannot override {'.'.join(path)}: {where} does not exist")
            target = target.get(part)
        else:
            raise ValueError(f"Cannot override {'.'.join(path)}: {'.'.join(path[:i])} is a value "
                             f"({target!r}), not a table or list")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the TOML file at `path`, then `key=value` overrides; the result is fully checked."""
    data = TrainConfig().to_dict()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file not found: {path}")
        try:
            file_data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from None
        model = file_data.pop("model", {})
        if not isinstance(model, dict):
            raise ValueError(f"{path}: [model] must be a table")
        data.update(file_data)
        data["model"] = {**data["model"], **model}
    for text in overrides:
        key, value = parse_override(text)
        _apply(data, key, value)
    return TrainConfig.from_dict(data)
