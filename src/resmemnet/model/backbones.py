"""Backbones: torchvision trunks that return every block's output, globally average-pooled, in depth order.

Each builder names a torchvision model's tap points (every residual block for ResNets, every
inverted-residual / MBConv block for the mobile nets) and torchvision's feature extractor
(`create_feature_extractor`, torch.fx) rewrites the model to return exactly those outputs, each
pooled inside the graph (`pooled_outputs`): a block's map is freed as soon as the next block has
read it, so memory holds one block's activations rather than every block's. The tapped blocks stay
leaf modules of the traced graph: each is still called as a module under its torchvision name
(`layer4.2`), so forward hooks (Grad-CAM's, `Backbone.map_at`) see its map and state dicts load
unchanged. Everything after the last tap (pooling, classifier) is pruned from the graph, so no
parameter goes unused (DistributedDataParallel rejects unused ones).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch
import torchvision
from torch import fx, nn
from torchvision.models.feature_extraction import create_feature_extractor

from resmemnet.model.registry import Registry

__all__ = ["BACKBONES", "Backbone", "BackboneWeightsError", "create_backbone", "pooled_outputs"]

BACKBONES: Registry[Callable[[], Backbone]] = Registry("backbone")


class BackboneWeightsError(RuntimeError):
    """Backbone weights could not be obtained; the message says what to do instead."""


def pooled_outputs(extractor: fx.GraphModule, names: Collection[str]) -> fx.GraphModule:
    """`extractor` (a `create_feature_extractor` module) with its outputs in `names` averaged over H and W.

    torch.fx frees each value after its last use, so a map the graph no longer returns lives only until
    the next block and its mean have read it. The new module shares the extractor's submodules, and
    hence its parameters and state-dict names.
    """
    graph = fx.Graph()
    outputs = dict(graph.graph_copy(extractor.graph, {}))
    for name in names:
        with graph.inserting_after(outputs[name]):  # right after the block, so the map's last use is here
            outputs[name] = graph.call_method("mean", (outputs[name], (2, 3)))
    graph.output(outputs)
    return fx.GraphModule(extractor, graph, class_name=type(extractor).__name__)


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
        extractor = create_feature_extractor(net, return_nodes=self.taps, tracer_kwargs={"leaf_modules": blocks})
        self.net = pooled_outputs(extractor, self.taps)
        self.cam_layer = cam_layer
        self.tap_channels, self.tap_strides = self._probe()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(batch, channels) pooled outputs of the tapped blocks, in depth order."""
        outputs = self.net(x)
        return [outputs[tap] for tap in self.taps]

    def map_at(self, x: torch.Tensor, index: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The pooled outputs of taps[:index + 1], and the output map of taps[index] (a forward hook's catch)."""
        caught: list[torch.Tensor] = []
        hook = self.net.get_submodule(self.taps[index]).register_forward_hook(lambda _m, _a, out: caught.append(out))
        try:
            pooled = self(x)[:index + 1]
        finally:
            hook.remove()
        return pooled, caught[0]

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
        """The pooled outputs of taps[start:], given the output map of taps[start - 1] (see `stage_end`)."""
        outputs = []
        for tap in self.taps[start:]:
            x = self.net.get_submodule(tap)(x)
            outputs.append(x.mean(dim=(2, 3)))
        return outputs

    def load_trunk(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Load a torchvision state dict; classifier weights may be present or absent, nothing else may differ."""
        result = self.net.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(_CLASSIFIER_PREFIXES)]
        unexpected = [k for k in result.unexpected_keys if not k.startswith(_CLASSIFIER_PREFIXES)]
        if missing or unexpected:
            raise BackboneWeightsError(f"Weights from {source} do not fit the {self.name} backbone: "
                                       f"missing {missing[:5]}, unexpected {unexpected[:5]}")

    def _probe(self) -> tuple[list[int], list[int]]:
        """Each tap's channels and stride (input side / map side): a tiny dry run is the one way that works for
        every family; eval() keeps BN stats intact."""
        was_training = self.training
        self.eval()
        sides: list[int] = []
        hooks = [self.net.get_submodule(tap).register_forward_hook(lambda _m, _a, out: sides.append(out.shape[-1]))
                 for tap in self.taps]
        try:
            with torch.no_grad():
                channels = [t.shape[1] for t in self(torch.zeros(1, 3, _PROBE_SIDE, _PROBE_SIDE))]
        finally:
            for hook in hooks:
                hook.remove()
        self.train(was_training)
        return channels, [_PROBE_SIDE // side for side in sides]


def create_backbone(name: str) -> Backbone:
    """Build a registered backbone, randomly initialised; weights load afterwards (`Backbone.load_trunk`).

    >>> create_backbone("resnet50").load_trunk(get_weights("IMAGENET1K_V2").get_state_dict("resnet50"), "x")
    """
    return BACKBONES.get(name)()


_CLASSIFIER_PREFIXES = ("fc.", "classifier.")
_PROBE_SIDE = 64


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
