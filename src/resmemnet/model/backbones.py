"""Backbones: torchvision trunks that return the output of every block, in depth order.

Each builder names a torchvision model's tap points (every residual block for ResNets, every
inverted-residual / MBConv block for the mobile nets) and torchvision's feature extractor
(`create_feature_extractor`, torch.fx) rewrites the model to return exactly those outputs. The
tapped blocks stay leaf modules of the traced graph: each is still called as a module under its
torchvision name (`layer4.2`), so forward hooks (Grad-CAM) fire on it and state dicts load unchanged.
Everything after the last tap (pooling, classifier) is pruned from the graph, so no parameter goes
unused (DistributedDataParallel rejects unused ones).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from resmemnet.model.registry import Registry

__all__ = ["BACKBONES", "Backbone", "BackboneWeightsError", "create_backbone"]

BACKBONES: Registry[Backbone] = Registry("backbone")


class BackboneWeightsError(RuntimeError):
    """Backbone weights could not be obtained; the message says what to do instead."""


class Backbone(nn.Module):
    """A torchvision trunk traced to return each tapped block's output, in depth order.

    `net` keeps torchvision's module names (reach a block by `net.get_submodule("layer4.2")`; the
    traced graph holds plain modules where torchvision had containers, so `net.layer4[2]` fails).
    """

    def __init__(self, name: str, net: nn.Module, taps: list[str], cam_layer: str):
        super().__init__()
        self.name = name
        self.taps = list(taps)
        # Every tapped block's class is a leaf: traced as one call, not inlined into its layers.
        blocks = list(dict.fromkeys(type(net.get_submodule(tap)) for tap in self.taps))
        self.net = create_feature_extractor(net, return_nodes=self.taps, tracer_kwargs={"leaf_modules": blocks})
        self.cam_layer = cam_layer
        self.tap_channels = self._probe_channels()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.net(x)
        return [outputs[tap] for tap in self.taps]

    def stage_end(self, stage: str) -> int:
        """How many taps lie in the stages up to `stage` (e.g. "layer2"): the frozen part of a partly trained trunk.

        Only trunks whose taps form a chain of blocks (ResNets: the input of each block is the output of the
        one before) can restart from a tap's output; others are refused.
        """
        if not all(tap.startswith("layer") for tap in self.taps):
            raise ValueError(f"Backbone {self.name!r} cannot restart from a stage's output (only ResNets' blocks "
                             "form a chain); use a ResNet backbone or frozen_until=''")
        stages = [tap.split(".")[0] for tap in self.taps]
        names = list(dict.fromkeys(stages))
        if stage not in names[:-1]:
            raise ValueError(f"{stage!r} is not a stage before the last of {self.name} (stages: {', '.join(names)})")
        return max(i for i, s in enumerate(stages) if s == stage) + 1

    def forward_from(self, x: torch.Tensor, start: int) -> list[torch.Tensor]:
        """The outputs of taps[start:], given the output of taps[start - 1] (see `stage_end`)."""
        outputs = []
        for tap in self.taps[start:]:
            x = self.net.get_submodule(tap)(x)
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
        taps = [f"layer{stage + 1}.{i}" for stage, n in enumerate(blocks) for i in range(n)]
        return Backbone(arch, net, taps, cam_layer=taps[-1])

    return build


def _sequential_features(arch: str, tap_indices: Callable[[nn.Sequential], list[str]]) -> Callable[..., Backbone]:
    def build() -> Backbone:
        net = torchvision.models.get_model(arch, weights=None)
        taps = tap_indices(net.features)
        return Backbone(arch, net, taps, cam_layer=taps[-1])

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

# Backbones defined in their own modules register on import, so every lookup of BACKBONES sees them.
from resmemnet.model import experts as _experts  # noqa: E402, F401
