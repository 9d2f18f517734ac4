"""The one decoding dataset: image files -> preprocessed tensors, where a bad file is a row, not an exception.

predict, evaluate, the training loop, its feature cache and train-time evaluation all read images
through `DecodedImages` in DataLoader workers, so a corrupt, truncated, missing or huge file is
reported the same way everywhere and never stops a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch
from torch.utils.data import Dataset

from resmemnet.data.images import ImageLoadError, ImageSource, load_image

__all__ = ["DecodedBatch", "DecodedImages", "DecodedItem", "collate_decoded"]


@dataclass(frozen=True)
class DecodedItem:
    """One file: its tensor, or the reason it could not be used."""

    index: int
    path: str
    image: torch.Tensor | None
    error: str = ""


@dataclass(frozen=True)
class DecodedBatch:
    """The good items of a batch stacked, and the bad ones listed."""

    indices: torch.Tensor  # (n_good,) positions in the dataset of the stacked images
    paths: list[str]  # paths of the stacked images, in the same order
    images: torch.Tensor | None  # (n_good, 3, H, W), or None when every item failed
    failed: list[DecodedItem]  # the items that could not be decoded (image None, error set)

    @property
    def items(self) -> int:
        return len(self.paths) + len(self.failed)


class DecodedImages(Dataset):
    """Decode `paths` with `transform`; item i is a `DecodedItem` (never raises for a bad file).

    `min_size` (height, width) lets JPEG decoding skip detail the transform would discard.
    `flip(i) -> 0/1` mirrors item i horizontally (training augmentation decided per image, not by a global RNG).
    `reader(path)` gives what to decode for a path that is not a local file (a URI's bytes); it raises
    ImageLoadError for one it cannot read.
    """

    def __init__(self, paths: Sequence[str | PathLike[str]], transform: Callable[[Any], torch.Tensor], *,
                 min_size: tuple[int, int] | None = None, flip: Callable[[int], int] | None = None,
                 reader: Callable[[str], ImageSource] | None = None):
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.min_size = min_size
        self.flip = flip
        self.reader = reader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> DecodedItem:
        path = self.paths[index]
        try:
            source = path if self.reader is None else self.reader(path)
            image = self.transform(load_image(source, min_size=self.min_size))
        except ImageLoadError as exc:
            return DecodedItem(index, path, None, exc.reason)
        if self.flip is not None and self.flip(index):
            image = image.flip(-1)
        return DecodedItem(index, path, image)


def collate_decoded(items: list[DecodedItem]) -> DecodedBatch:
    """DataLoader collate_fn for `DecodedImages`: stack the good items, list the bad ones."""
    good = [item for item in items if item.image is not None]
    return DecodedBatch(indices=torch.tensor([item.index for item in good], dtype=torch.long),
                        paths=[item.path for item in good],
                        images=torch.stack([item.image for item in good]) if good else None,
                        failed=[item for item in items if item.image is None])
