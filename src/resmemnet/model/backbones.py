"""Backbones: torchvision trunks that return the output of every block, in depth order.

Each builder wraps a torchvision model and names its tap points (every residual block for
ResNets, every inverted-residual / MBConv block for the mobile nets). Classifier layers are
dropped so that no parameter goes unused (DistributedDataParallel rejects unused ones).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torchvision
from torch import nn

from resmemnet.model.registry import Registry

__all__ = ["BACKBONES", "Backbone", "BackboneWeightsError", "create_backbone"]

BACKBONES: Registry[Backbone] = Registry("backbone")


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

    def load_trunk(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Load a torchvision state dict; classifier weights may be present or absent, nothing else may differ."""
        result = self.net.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(_CLASSIFIER_PREFIXES)]
        unexpected = [k for k in result.unexpected_keys if not k.startswith(_CLASSIFIER_PREFIXES)]
        if missing or unexpected:
            raise BackboneWeightsError(f"Weights from {source} do not fit the {self.name} backbone: "
                                       f"missing {missing[:5]}, unexpected {unexpected[:5]}")

    def _probe_channels(self) -> list[int]:
        # A tiny dry run is the one way that works for every family; eval() keeps BN stats intact.
        was_training = self.training
        self.eval()
        with torch.no_grad():
            channels = [t.shape[1] for t in self(torch.zeros(1, 3, 64, 64))]
        self.train(was_training)
        return channels


def create_backbone(name: str) -> Backbone:
    """Build a registered backbone, randomly initialised; weights load afterwards (`Backbone.load_trunk`).

    >>> create_backbone("resnet50").load_trunk(get_weights("IMAGENET1K_V2").get_state_dict("resnet50"), "x")
    """
    return BACKBONES.get(name)()


_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def _resnet(arch: str, blocks: tuple[int, ...]) -> Callable[..., Backbone]:
    def build() -> Backbone:
        net = torchvision.models.get_model(arch, weights=None)
        net.fc = nn.Identity()
        net.avgpool = nn.Identity()
        taps = [f"layer{stage + 1}.{i}" for stage, n in enumerate(blocks) for i in range(n)]
        return Backbone(arch, net, ["conv1", "bn1", "relu", "maxpool"], taps, cam_layer=taps[-1])

    return build


def _sequential_features(arch: str, tap_indices: Callable[[nn.Sequential], list[str]]) -> Callable[..., Backbone]:
    def build() -> Backbone:
        net = torchvision.models.get_model(arch, weights=None)
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
