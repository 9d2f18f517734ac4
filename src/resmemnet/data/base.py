"""The one dataset shape every loader returns: image paths with one score each."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from resmemnet.data.images import load_image

__all__ = ["ImageScoreDataset", "Split"]


class ImageScoreDataset(Dataset):
    """(image, score) pairs; `transform` maps a PIL image to a tensor (None returns the PIL image).

    A bad file raises ImageLoadError naming it, so a caller can report and skip it.
    """

    def __init__(self, paths: Sequence[str | Path], scores: Sequence[float] | np.ndarray,
                 transform: Callable[[Any], torch.Tensor] | None = None):
        if len(paths) != len(scores):
            raise ValueError(f"{len(paths)} paths but {len(scores)} scores")
        self.paths = [Path(p) for p in paths]
        self.scores = np.asarray(scores, dtype=np.float32)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        image = load_image(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.tensor(self.scores[index])

    def with_transform(self, transform: Callable[[Any], torch.Tensor] | None) -> ImageScoreDataset:
        return ImageScoreDataset(self.paths, self.scores, transform)


@dataclass
class Split:
    """One evaluation split: train (and optional validation) against test, plus how it was made.

    `info` records what a report must show to be reproducible (split index, seed, counts of
    absent images, the protocol used).
    """

    train: ImageScoreDataset
    test: ImageScoreDataset
    val: ImageScoreDataset | None = None
    info: dict[str, Any] = field(default_factory=dict)
