"""Backbones: torchvision trunks that return the output of every block, in depth order.

Each builder wraps a torchvision model and names its tap points (every residual block for
ResNets, every inverted-residual / MBConv block for the mobile nets). Classifier layers are
dropped so that no parameter goes unused (DistributedDataParallel rejects unused ones).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from resmemnet.model.registry import Registry

__all__ = ["BACKBONES", "WEIGHT_SOURCES", "Backbone", "BackboneWeightsError", "create_backbone"]

BACKBONES: Registry[Backbone] = Registry("backbone")
# Offline weight sources beyond torchvision's enums, e.g. a backbone bundled in a pip package.
# Each maps (backbone name) -> state dict for the torchvision model.
WEIGHT_SOURCES: Registry[dict[str, torch.Tensor]] = Registry("weight source")


class BackboneWeightsError(RuntimeError):
    """Backbone weights could not be obtained; the message says what to do instead."""


class Backbone(nn.Module):
    """A torchvision trunk run stem-first, collecting each tapped block's output.

    `net` keeps torchvision's module names so that torchvision state dicts load unchanged.
    """

    def __init__(self, name: str, net: nn.Module, stem: list[str], taps: list[str], cam_layer: str):
        super().__init__()
        self.name = name
        self.net = net
        self.stem = list(stem)
        self.taps = list(taps)
        self.cam_layer = cam_layer
        self.tap_channels = self._probe_channels()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        for name in self.stem:
            x = self.net.get_submodule(name)(x)
        outputs = []
        for name in self.taps:
            x = self.net.get_submodule(name)(x)
            outputs.append(x)
        return outputs

    def _probe_channels(self) -> list[int]:
        # A tiny dry run is the one way that works for every family; eval() keeps BN stats intact.
        was_training = self.training
        self.eval()
        with torch.no_grad():
            channels = [t.shape[1] for t in self(torch.zeros(1, 3, 64, 64))]
        self.train(was_training)
        return channels


def create_backbone(name: str, *, weights: str | None = None, weights_path: str | Path | None = None) -> Backbone:
    """Build a registered backbone.

    >>> create_backbone("resnet50")                       # random init
    >>> create_backbone("resnet50", weights="IMAGENET1K_V2")  # torchvision download
    >>> create_backbone("resnet50", weights_path="resnet50.safetensors")  # local file
    """
    return BACKBONES.get(name)(weights=weights, weights_path=weights_path)


def _torchvision_net(arch: str, weights: str | None, weights_path: str | Path | None) -> nn.Module:
    if weights is not None and weights_path is not None:
        raise ValueError("Pass either weights (a name) or weights_path (a local file), not both")
    if weights is not None and weights in WEIGHT_SOURCES:
        net = torchvision.models.get_model(arch, weights=None)
        _load_into(net, WEIGHT_SOURCES.get(weights)(arch), source=f"weight source {weights!r}")
        return net
    if weights is not None:
        enum = torchvision.models.get_model_weights(arch)
        try:
            weights_enum = enum[weights]
        except KeyError:
            choices = [w.name for w in enum] + WEIGHT_SOURCES.names()
            raise ValueError(f"Unknown weights {weights!r} for {arch}; available: {', '.join(choices)}") from None
        try:
            return torchvision.models.get_model(arch, weights=weights_enum)
        except (URLError, OSError, RuntimeError) as exc:
            raise BackboneWeightsError(
                f"Could not download torchvision weights {arch}.{weights} from {weights_enum.url} ({exc}). "
                "This machine looks offline. Download that file on a machine with internet and pass it with "
                "weights_path=... (CLI: --backbone-weights-path), or use weights=None, or use a trained "
                "resmemnet checkpoint."
            ) from exc
    net = torchvision.models.get_model(arch, weights=None)
    if weights_path is not None:
        _load_into(net, _read_state_dict(Path(weights_path)), source=str(weights_path))
    return net


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"Backbone weights file not found: {path}")
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


_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def _load_into(net: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a trunk state dict; classifier weights may be present or absent, nothing else may differ."""
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(_CLASSIFIER_PREFIXES)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(_CLASSIFIER_PREFIXES)]
    if missing or unexpected:
        raise BackboneWeightsError(
            f"Weights from {source} do not fit this backbone: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _resnet(arch: str, blocks: tuple[int, ...]) -> Callable[..., Backbone]:
    def build(*, weights: str | None = None, weights_path: str | Path | None = None) -> Backbone:
        net = _torchvision_net(arch, weights, weights_path)
        net.fc = nn.Identity()
        net.avgpool = nn.Identity()
        taps = [f"layer{stage + 1}.{i}" for stage, n in enumerate(blocks) for i in range(n)]
        return Backbone(arch, net, ["conv1", "bn1", "relu", "maxpool"], taps, cam_layer=taps[-1])

    return build


def _sequential_features(arch: str, tap_indices: Callable[[nn.Sequential], list[str]]) -> Callable[..., Backbone]:
    def build(*, weights: str | None = None, weights_path: str | Path | None = None) -> Backbone:
        net = _torchvision_net(arch, weights, weights_path)
        net.classifier = nn.Identity()
        net.avgpool = nn.Identity()
        taps = tap_indices(net.features)
        return Backbone(arch, net, ["features.0"], taps, cam_layer=taps[-1])

    return build


def _each_child(features: nn.Sequential) -> list[str]:
    # MobileNetV3: features[1:-1] are inverted-residual blocks, features[-1] the last 1x1 conv.
    return [f"features.{i}" for i in range(1, len(features))]


def _each_mbconv(features: nn.Sequential) -> list[str]:
    # EfficientNet: features[1:-1] are stages of MBConv blocks, features[-1] the last 1x1 conv.
    taps = [f"features.{i}.{j}" for i in range(1, len(features) - 1) for j in range(len(features[i]))]
    return [*taps, f"features.{len(features) - 1}"]


for _arch, _blocks in {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    "resnext50_32x4d": (3, 4, 6, 3),
}.items():
    BACKBONES.register(_arch)(_resnet(_arch, _blocks))
BACKBONES.register("mobilenet_v3_large")(_sequential_features("mobilenet_v3_large", _each_child))
BACKBONES.register("efficientnet_b0")(_sequential_features("efficientnet_b0", _each_mbconv))
