"""Memorability datasets: one module per format, one entry point (`load_split`) for all of them.

>>> split = load_split("lnsim", "../shared/datasets/lnsim", split=3, seed=0)
>>> split.train.paths[:2], split.test.scores[:2], split.info["absent"], split.info["unscored"]
>>> resmemnet.metrics.split_half_consistency(split)   # the human ceiling on the same test images

A score table with a non-number, NaN or inf score or an image listed twice raises ScoreFileError
(a ValueError) naming file and line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

from resmemnet.data.base import ImageScoreDataset, ScoreFileError, Split
from resmemnet.model.registry import Registry

__all__ = ["DATASETS", "DATASET_NAMES", "ImageScoreDataset", "ScoreFileError", "Split", "describe_dataset",
           "load_split", "num_splits"]

# Each format's module is imported when first used: `resmemnet dataset --help` needs only the names.
DATASETS: Registry[Callable[[], ModuleType]] = Registry("dataset")
for _name, _module_name in (("lamem", "lamem"), ("sun", "sun"), ("lnsim", "lnsim"), ("memcat", "memcat"),
                            ("csv", "csv_folder"), ("synthetic", "synthetic")):
    DATASETS.register(_name)(partial(importlib.import_module, f"resmemnet.data.{_module_name}"))
DATASET_NAMES = tuple(DATASETS.names())


def _module(name: str, options: dict[str, Any]) -> ModuleType:
    module = DATASETS.get(name)()
    unknown = sorted(set(options) - set(module.OPTIONS))
    if unknown:
        valid = ", ".join(module.OPTIONS) or "none"
        raise ValueError(f"Dataset {name!r} does not take option(s) {', '.join(unknown)}; valid options: {valid}")
    return module


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in options.items() if value is not None}  # unset CLI flags keep defaults


def load_split(name: str, root: str | Path, *, split: int = 0, seed: int = 0, test_fraction: float = 0.2,
               **options: Any) -> Split:
    """Split `split` of dataset `name` under `root`: train/test (and val for LaMem) ImageScoreDatasets.

    Official splits are used where the dataset has them (LaMem, SUN); otherwise a seeded split is made,
    recorded in `info`. Images absent on disk are skipped and counted per part in `info["absent"]`,
    images without a score (split halves nobody saw) in `info["unscored"]`.
    """
    options = _given(options)
    return _module(name, options).load_split(Path(root), split=split, seed=seed, test_fraction=test_fraction,
                                             **options)


def num_splits(name: str, root: str | Path, **options: Any) -> int:
    """How many splits dataset `name` defines (LaMem 5, LNSIM and SUN 25, MemCat and csv 1, synthetic 5)."""
    options = _given(options)
    return _module(name, options).num_splits(Path(root), **options)


def describe_dataset(name: str, root: str | Path, **options: Any) -> dict[str, Any]:
    """Images found and absent, split sizes, score statistics, human consistency where the data has it."""
    options = _given(options)
    return {"root": str(root), **_module(name, options).describe(Path(root), **options)}
