"""ResMem-Net: every residual block of a CNN, pooled and projected, read in depth order by an LSTM.

image -> backbone blocks A_1..A_n -> GAP (inside the backbone's graph) -> 1x1 conv (proj_dim) -> LayerNorm -> dropout
      -> sequence (batch, n, proj_dim) -> head (LSTM by default) -> linear -> score

A pooled-input head (`linear-ensemble`) reads the GAP outputs directly, with no projection, and
gives `members` scores per image: their mean is the score, their spread its uncertainty.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resmemnet.model.backbones import create_backbone
from resmemnet.model.config import MAX_DIM, ModelConfig
from resmemnet.model.heads import POOLED_HEADS, create_head
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.weights import Weights, file_weights, list_weights, trunk_weights

__all__ = ["MAX_DIM", "ModelConfig", "ResMemNet", "create_model"]  # ModelConfig lives in model/config.py


class TapProjection(nn.Module):
    """GAP then a 1x1 convolution per tap, as in the paper, plus LayerNorm and dropout."""

    def __init__(self, channels: list[int], proj_dim: int, dropout: float):
        super().__init__()
        self.channels = list(channels)
        self.convs = nn.ModuleList(nn.Conv2d(c, proj_dim, kernel_size=1) for c in channels)
        self.norm = nn.LayerNorm(proj_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(batch, sum(channels)) pooled taps -> (batch, taps, proj_dim) sequence."""
        if pooled.shape[1] != sum(self.channels):
            raise ValueError(f"Expected {sum(self.channels)} pooled features per image, got {pooled.shape[1]}")
        parts = pooled.split(self.channels, dim=1)
        # A 1x1 conv on a 1x1 map is a matrix product; F.linear on the same weights is ~10x faster on CPUs.
        projected = [F.linear(p, conv.weight.flatten(1), conv.bias) for conv, p in zip(self.convs, parts, strict=True)]
        seq = torch.stack(projected, dim=1)
        return self.dropout(self.norm(seq))


class ResMemNet(nn.Module):
    """The full network. `forward_pooled` lets a frozen-backbone run train from cached features."""

    def __init__(self, config: ModelConfig, *, preprocessing: Preprocessing | None = None):
        """Builds the architecture only (random init, no I/O); `create_model` loads weights afterwards."""
        super().__init__()
        self.config = config
        self.preprocessing = preprocessing or Preprocessing()
        self.metadata: dict[str, Any] = {}
        self.backbone = create_backbone(config.backbone)
        channels = self.backbone.tap_channels
        pooled_head = config.head in POOLED_HEADS
        self.projection = None if pooled_head else TapProjection(channels, config.proj_dim, config.dropout)
        self.head = create_head(config.head, in_dim=sum(channels) if pooled_head else config.proj_dim,
                                seq_len=len(channels), hidden_dim=config.hidden_dim, dropout=config.dropout,
                                peephole=config.peephole, members=config.members)

    @property
    def tap_channels(self) -> list[int]:
        return self.backbone.tap_channels

    def activation_bytes(self, size: tuple[int, int]) -> int:
        """A bound on one image's activations in an inference pass on (height, width) inputs.

        Taps are pooled as they are produced, so the peak is the largest block's working set: its input,
        inner maps and output, counted as four fp32 copies of its output map.
        """
        height, width = size
        return max(16 * c * math.ceil(height / s) * math.ceil(width / s)
                   for c, s in zip(self.tap_channels, self.backbone.tap_strides, strict=True))

    @property
    def cam_layer(self) -> str:
        """Default Grad-CAM target: the last backbone stage, by its name in this module."""
        traced = getattr(self.backbone, "net", None) is not None  # a Backbone: torchvision names sit under net
        return f"backbone.{'net.' if traced else ''}{self.backbone.cam_layer}"

    def pool_taps(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> (batch, sum(channels)) globally average-pooled block outputs (what a cache stores)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected images of shape (batch, 3, H, W), got {tuple(images.shape)}")
        return torch.cat(self.backbone(images), dim=1)

    def trunk_rows(self, images: torch.Tensor, start: int) -> torch.Tensor:
        """Images -> (batch, pooled taps[:start] + flattened output map of taps[start - 1]): what a partly
        trained trunk caches, so training runs only the blocks from `start` on (`pool_rows`)."""
        pooled, last = self.backbone.map_at(images, start - 1)
        return torch.cat([*pooled, last.flatten(1)], dim=1)

    def pool_rows(self, rows: torch.Tensor, start: int) -> torch.Tensor:
        """`trunk_rows` output -> every tap pooled (as `pool_taps` gives), running the blocks from `start` on."""
        width = sum(self.tap_channels[:start])
        channels = self.tap_channels[start - 1]
        side = math.isqrt((rows.shape[1] - width) // channels)
        if width + channels * side * side != rows.shape[1]:
            raise ValueError(f"Rows of {rows.shape[1]} values are not {width} pooled features plus a square "
                             f"{channels}-channel map")
        x = rows[:, width:].reshape(-1, channels, side, side).contiguous(memory_format=torch.channels_last)
        tail = self.backbone.forward_from(x, start)
        return torch.cat([rows[:, :width].to(tail[0].dtype), *tail], dim=1)

    def forward_members(self, pooled: torch.Tensor) -> torch.Tensor:
        """(batch, members) scores from pooled taps; one member unless the head is an ensemble."""
        pooled = pooled.float()
        raw = self.head(pooled if self.projection is None else self.projection(pooled))
        raw = raw if raw.ndim == 2 else raw[:, None]
        return torch.sigmoid(raw) if self.config.output == "sigmoid" else raw

    def forward_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.forward_members(pooled).mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_pooled(self.pool_taps(images))

    def freeze_backbone(self) -> None:
        """Stop backbone training; its BatchNorm stays in eval mode (statistics frozen too)."""
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self._backbone_frozen = True

    def unfreeze_backbone(self) -> None:
        self.backbone.requires_grad_(True)
        self._backbone_frozen = False
        self.backbone.train(self.training)

    @property
    def backbone_frozen(self) -> bool:
        return getattr(self, "_backbone_frozen", False)

    def train(self, mode: bool = True) -> ResMemNet:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def describe(self) -> dict[str, Any]:
        """What `resmemnet info` prints."""
        return {
            "architecture": "ResMem-Net" if self.projection is not None else f"{self.config.members}-member ensemble",
            "backbone": self.config.backbone,
            "head": self.config.head,
            "taps": len(self.tap_channels),
            "tap_names": self.backbone.taps,
            "tap_channels": self.tap_channels,
            "projection": self.config.proj_dim if self.projection is not None else None,
            "parameters": self.num_parameters(),
            "config": self.config.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
        }


def create_model(name_or_config: str | ModelConfig = "resnet50", *, weights: str | Weights | os.PathLike | None = None,
                 preprocessing: Preprocessing | None = None, **overrides: Any) -> ResMemNet:
    """The one constructor: a backbone name (or a full config) plus overrides; the trunk's weights load after.

    `weights` names trunk weights (`list_weights()`), or is a `Weights` object or a local file path;
    by default `config.backbone_weights` is used. Preprocessing defaults to the weights' own.

    >>> create_model("resnet50", head="bilstm", proj_dim=256)
    >>> create_model("resnet152", weights="resmem")                  # offline, from the resmem package
    >>> create_model("resnet50", weights=Path("resnet50.safetensors"))  # a local torchvision state dict
    >>> create_model(ModelConfig(backbone="efficientnet_b0", head="transformer"))
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}  # unset CLI flags keep defaults
    if isinstance(weights, os.PathLike):
        weights = file_weights(weights)  # a path is no portable name: config.backbone_weights stays as it is
    elif isinstance(weights, str):
        overrides["backbone_weights"], weights = weights, None
    elif isinstance(weights, Weights):
        if weights.kind != "trunk":
            raise ValueError(f"{weights.name!r} is a bundled model; use resmemnet.load_model({weights.name!r})")
        if weights.name in list_weights():
            overrides["backbone_weights"] = weights.name
    if isinstance(name_or_config, ModelConfig):
        config = ModelConfig(**{**name_or_config.to_dict(), **overrides})
    else:
        config = ModelConfig(backbone=name_or_config, **overrides)
    if weights is None and config.backbone_weights is not None:
        weights = trunk_weights(config.backbone_weights, config.backbone)
    model = ResMemNet(config, preprocessing=preprocessing or (weights.preprocessing if weights else None))
    if weights is not None:
        model.backbone.load_trunk(weights.get_state_dict(config.backbone), source=f"weights {weights.name!r}")
    return model
