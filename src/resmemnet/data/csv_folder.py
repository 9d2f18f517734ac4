"""Users' own data: a CSV of image path and score; relative paths are taken from `root`."""

from __future__ import annotations

import csv as csv_module
import os
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

__all__ = ["OPTIONS", "describe", "load_split", "num_splits"]

OPTIONS = ("csv", "path_column", "score_column")


def _read(root: Path, csv: str | Path | None, path_column: str, score_column: str) -> tuple[list[Path], np.ndarray]:
    """Every row's path (from `root`) and score; a bad score or a path listed twice stops with file and line."""
    if csv is None:
        raise ValueError("The csv dataset needs the table's path: csv=PATH (CLI: --csv PATH), with columns "
                         f"{path_column},{score_column}")
    table = Path(csv)
    if not table.is_file():
        raise FileNotFoundError(f"CSV file {table} not found")
    paths, scores, seen, absolute_root = [], [], {}, os.path.abspath(root)
    with open(table, newline="", encoding="utf-8-sig") as f:
        reader = csv_module.DictReader(f)
        missing = [c for c in (path_column, score_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{table} lacks column(s) {', '.join(missing)}; it has: "
                             f"{', '.join(reader.fieldnames or []) or 'no header'} (choose with --path-column, "
                             "--score-column)")
        for row in reader:
            line = reader.line_num
            scores.append(finite_score(row[score_column], table=table, line=line, column=score_column))
            if not (row[path_column] or "").strip():
                raise ScoreFileError(table, line, f"{path_column} is empty; give the image's path")
            check_unique(seen, os.path.join(absolute_root, row[path_column]), table=table, line=line)
            paths.append(root / row[path_column])  # an absolute path stays as it is
    if not paths:
        raise ValueError(f"{table} has a header but no rows")
    return paths, np.asarray(scores, dtype=np.float64)


def num_splits(root: str | Path, **options: Any) -> int:
    return 1


def load_split(root: str | Path, *, split: int = 0, seed: int = 0, test_fraction: float = 0.2,
               csv: str | Path | None = None, path_column: str = "path",
               score_column: str = "score") -> Split:
    """A seeded train/test split; test_fraction=1.0 puts every image in the test set (evaluation only)."""
    check_split(split, 1, "csv")
    root = Path(root)
    paths, scores = _read(root, csv, path_column, score_column)
    return table_split(paths, scores, split=split, seed=seed, test_fraction=test_fraction,
                       info={"dataset": "csv", "root": str(root), "csv": str(csv), "score_column": score_column})


def describe(root: str | Path, *, csv: str | Path | None = None, path_column: str = "path",
             score_column: str = "score") -> dict[str, Any]:
    paths, scores = _read(Path(root), csv, path_column, score_column)
    return table_description("csv", paths, scores, {"csv": str(csv), "score_column": score_column})
