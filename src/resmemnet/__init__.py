"""resmemnet: predict, explain and train image memorability models (ResMem-Net, PeerJ CS 2021).

The public names load on first use (PEP 562), so `import resmemnet` (and the CLI's start-up)
costs no torch, torchvision or Grad-CAM import until something needs them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointError": "resmemnet.checkpoint",
    "load_checkpoint": "resmemnet.checkpoint",
    "read_metadata": "resmemnet.checkpoint",
    "save_checkpoint": "resmemnet.checkpoint",
    "ImageLoadError": "resmemnet.data.images",
    "load_image": "resmemnet.data.images",
    "Explanation": "resmemnet.explain",
    "explain": "resmemnet.explain",
    "BACKBONES": "resmemnet.model.backbones",
    "BackboneWeightsError": "resmemnet.model.backbones",
    "HEADS": "resmemnet.model.heads",
    "Preprocessing": "resmemnet.model.preprocessing",
    "ModelConfig": "resmemnet.model.resmemnet",
    "ResMemNet": "resmemnet.model.resmemnet",
    "create_model": "resmemnet.model.resmemnet",
    "Weights": "resmemnet.model.weights",
    "get_weights": "resmemnet.model.weights",
    "list_models": "resmemnet.model.weights",
    "list_weights": "resmemnet.model.weights",
    "predict": "resmemnet.predict",
    "load_model": "resmemnet.pretrained",
}

__all__ = [
    "BACKBONES",
    "HEADS",
    "BackboneWeightsError",
    "CheckpointError",
    "Explanation",
    "ImageLoadError",
    "ModelConfig",
    "Preprocessing",
    "ResMemNet",
    "Weights",
    "__version__",
    "create_model",
    "explain",
    "get_weights",
    "list_models",
    "list_weights",
    "load_checkpoint",
    "load_image",
    "load_model",
    "predict",
    "read_metadata",
    "save_checkpoint",
]

if TYPE_CHECKING:
    from resmemnet.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
    from resmemnet.data.images import ImageLoadError, load_image
    from resmemnet.explain import Explanation, explain
    from resmemnet.model.backbones import BACKBONES, BackboneWeightsError
    from resmemnet.model.heads import HEADS
    from resmemnet.model.preprocessing import Preprocessing
    from resmemnet.model.resmemnet import ModelConfig, ResMemNet, create_model
    from resmemnet.model.weights import Weights, get_weights, list_models, list_weights
    from resmemnet.predict import predict
    from resmemnet.pretrained import load_model


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'resmemnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """`resmemnet.predict` and `resmemnet.explain` are functions that live in submodules of the same names.

    Loading such a submodule (`from resmemnet.predict import predict`, anywhere) makes Python set the
    package attribute to the submodule, which would then hide the function; this keeps the function.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
