"""What the trainer feeds on: a seeded validation carve and per-image flips (splits: resmemnet.data.load_split).

Augmentation is a horizontal flip decided by a hash of (seed, epoch, image index), never by a
global RNG, so a run is the same with any number of DataLoader workers or processes, a resumed run
replays exactly, and a feature cache holding the two views (as-is and flipped) reproduces the
augmented frozen-phase training exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np

from resmemnet.data.base import ImageScoreDataset, Split

__all__ = ["carve_validation", "flip_for", "validation_indices", "with_validation"]


def flip_for(seed: int, epoch: int, index: int) -> int:
    """1 if image `index` is flipped in `epoch`, else 0; a pure function of its arguments."""
    return hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=1).digest()[0] & 1


def validation_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions in range(n), both sorted: a seeded random `fraction` (at least 2) is held out.

    numpy's default_rng(seed) decides, so the same seed carves the same images in every run; it works
    on positions, so cached features can be carved exactly like the images they came from.
    """
    n_val = max(2, round(n * fraction))
    if n - n_val < 2:
        raise ValueError(f"Cannot carve a validation set of {n_val} from {n} training images; "
                         "lower val_fraction or use a bigger split")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def carve_validation(train: ImageScoreDataset, fraction: float, seed: int
                     ) -> tuple[ImageScoreDataset, ImageScoreDataset]:
    """A seeded random `fraction` of train becomes validation (for splits that ship none)."""
    kept, held_out = validation_indices(len(train), fraction, seed)
    pick = lambda idx: ImageScoreDataset([train.paths[i] for i in idx], train.scores[idx],  # noqa: E731
                                         train.transform)
    return pick(kept), pick(held_out)


def with_validation(split: Split, fraction: float, seed: int) -> Split:
    """The split itself if it has a validation set, else one with a seeded carve out of train."""
    if split.val is not None:
        return split
    train, val = carve_validation(split.train, fraction, seed)
    return replace(split, train=train, val=val, info={**split.info, "val_carved_fraction": fraction,
                                                      "val_carve_seed": seed})

