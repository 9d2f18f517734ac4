"""Preprocessing travels with the weights: one dataclass, carried by every weights object and checkpoint.

It imports no torch or torchvision until `transforms()` is called, so a checkpoint's metadata is
checked without them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torchvision.transforms import v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "MAX_SIDE", "UNNORMALISED", "Preprocessing"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_SIDE = 4096  # a checkpoint asking for larger inputs is damaged or hostile, not a real model
# The values of torchvision's InterpolationMode (tests/model check they still match).
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a given set of weights.

    The paper resizes to 224x224 without cropping, so the whole photo is scored; `crop`
    (a centre crop after resizing) is there for weights trained that way.
    """

    resize: tuple[int, int] = (224, 224)
    crop: tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("resize", "crop", "mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))  # JSON round-trips give lists
        for name in ("resize", "crop"):
            size = getattr(self, name)
            if size is not None and (len(size) != 2 or not all(1 <= s <= MAX_SIDE for s in size)):
                raise ValueError(f"{name} must be (height, width) with sizes in 1..{MAX_SIDE}, got {size}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(math.isfinite(v) for v in self.mean + self.std):
            raise ValueError(f"mean and std need 3 finite values each, got {self.mean}, {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"std values must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"{self.interpolation!r} is not a valid InterpolationMode; "
                             f"choose from {', '.join(INTERPOLATIONS)}")

    @property
    def input_size(self) -> tuple[int, int]:
        return self.crop or self.resize

    def transforms(self) -> v2.Compose:
        """PIL image -> normalised float tensor (3, H, W), for inference and evaluation."""
        import torch
        from torchvision.transforms import InterpolationMode, v2

        steps: list[Any] = [v2.Resize(self.resize, InterpolationMode(self.interpolation), antialias=True)]
        if self.crop is not None:
            steps.append(v2.CenterCrop(self.crop))
        steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        return v2.Compose(steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(**data)


# Trunks trained on ToTensor() output directly ([0, 1], no mean/std), like the resmem packages'.
UNNORMALISED = Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
