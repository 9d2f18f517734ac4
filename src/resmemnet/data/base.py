"""The one dataset shape every loader returns: image paths with one score each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ImageScoreDataset", "ScoreFileError", "Split"]


class ScoreFileError(ValueError):
    """A row of a score table that cannot be used (not a number, not finite, a duplicate path).

    The message is one line, `FILE:LINE: problem`, so the CLI prints it as it is.
    """

    def __init__(self, path: str | Path, line: int, problem: str):
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = Path(path), line, problem


class ImageScoreDataset:
    """Image paths with one score each; images are decoded where they are scored (resmemnet.data.decoded).

    Every score must be finite: one NaN or inf would make every metric over the set NaN or inf.
    """

    def __init__(self, paths: Sequence[str | Path], scores: Sequence[float] | np.ndarray):
        if len(paths) != len(scores):
            raise ValueError(f"{len(paths)} paths but {len(scores)} scores")
        self.paths = [Path(p) for p in paths]
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf and is reported below
            self.scores = np.asarray(scores, dtype=np.float32)
        bad = np.flatnonzero(~np.isfinite(self.scores))
        if bad.size:
            raise ValueError(f"{bad.size} of {len(paths)} scores are not finite, e.g. {self.paths[bad[0]]}: "
                             f"{self.scores[bad[0]]}; leave unscored images out of the dataset")

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Split:
    """One evaluation split: train (and optional validation) against test, plus how it was made.

    `info` records what a report must show to be reproducible: split index, seed, the protocol, and
    per part (train/val/test) the images used (`counts`), listed but absent from disk (`absent`) and
    listed but without a score (`unscored`). For split-half datasets (LNSIM, SUN) the test scores are
    half 2 and `test_other_half` holds the same images' half-1 scores (NaN where nobody in half 1 saw
    one), so an evaluation can put human consistency beside the model's rho
    (resmemnet.metrics.split_half_consistency); it is None for datasets with one score per image.
    """

    train: ImageScoreDataset
    test: ImageScoreDataset
    val: ImageScoreDataset | None = None
    info: dict[str, Any] = field(default_factory=dict)
    test_other_half: np.ndarray | None = None
