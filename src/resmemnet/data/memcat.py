"""MemCat (Goetschalckx & Wagemans 2019): `memcat_image_data.csv`, columns read by header name.

Images live at `<root>/<category>/<subcategory>/<image_file>`. The score is memorability with false-alarm
correction by default; `score_column="memorability_wo_fa_correction"` picks the uncorrected one.
"""

from __future__ import annotations

import csv as csv_module
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from resmemnet.data._common import (
    check_split,
    check_unique,
    finite_score,
    table_description,
    table_split,
)
from resmemnet.data.base import ScoreFileError, Split

__all__ = ["OPTIONS", "SCORE_COLUMNS", "describe", "load_split", "num_splits"]

OPTIONS = ("score_column", "csv")
SCORE_COLUMNS = ("memorability_w_fa_correction", "memorability_wo_fa_correction")
CSV_NAME = "memcat_image_data.csv"


def _read(root: Path, score_column: str, csv_path: str | Path | None) -> tuple[list[Path], np.ndarray, Counter]:
    """Every row's image path, score and category; a bad score or a repeated image stops with file and line."""
    if score_column not in SCORE_COLUMNS:
        raise ValueError(f"Unknown MemCat score column {score_column!r}; choose one of: {', '.join(SCORE_COLUMNS)}")
    path = Path(csv_path) if csv_path is not None else root / CSV_NAME
    if not path.is_file():
        raise FileNotFoundError(f"MemCat table {path} not found; put {CSV_NAME} in --root or pass its path (--csv)")
    paths, scores, categories, seen, absolute_root = [], [], Counter(), {}, os.path.abspath(root)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv_module.DictReader(f)
        needed = ("image_file", "category", "subcategory", score_column)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks column(s) {', '.join(missing)}; "
                             f"it has: {', '.join(reader.fieldnames or [])}")
        for row in reader:
            line = reader.line_num
            scores.append(finite_score(row[score_column], table=path, line=line, column=score_column))
            folders = (row["category"], row["subcategory"], row["image_file"])
            if not all(folders):
                raise ScoreFileError(path, line, "category, subcategory or image_file is empty; give all three")
            check_unique(seen, os.path.join(absolute_root, *folders), table=path, line=line)
            paths.append(root.joinpath(*folders))
            categories[row["category"]] += 1
    return paths, np.asarray(scores, dtype=np.float64), categories


def num_splits(root: str | Path, **options: Any) -> int:
    return 1


def load_split(root: str | Path, *, split: int = 0, seed: int = 0, test_fraction: float = 0.2,
               score_column: str = SCORE_COLUMNS[0], csv: str | Path | None = None,
               ) -> Split:
    """A seeded train/test split (MemCat has no official one); vary `seed` for repeated splits."""
    check_split(split, 1, "MemCat")
    root = Path(root)
    paths, scores, _ = _read(root, score_column, csv)
    return table_split(paths, scores, split=split, seed=seed, test_fraction=test_fraction,
                       info={"dataset": "memcat", "root": str(root), "score_column": score_column})


def describe(root: str | Path, *, score_column: str = SCORE_COLUMNS[0], csv: str | Path | None = None,
             ) -> dict[str, Any]:
    paths, scores, categories = _read(Path(root), score_column, csv)
    return table_description("memcat", paths, scores, {"score_column": score_column,
                                                        "categories": dict(sorted(categories.items()))})
