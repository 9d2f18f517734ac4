"""LaMem (Khosla et al., ICCV 2015): `<root>/images/NNNNNNNN.jpg` and the official split files.

`<root>/splits/{train,val,test}_{1..5}.txt` hold one `name score` per line, space separated. Split index
s (0-based, as everywhere in resmemnet) reads the files numbered s + 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from resmemnet.data._common import (
    check_split,
    check_unique,
    finite_score,
    part_counts,
    presence,
    present_mask,
    score_stats,
    subset,
)
from resmemnet.data.base import ScoreFileError, Split

__all__ = ["OPTIONS", "describe", "load_split", "num_splits", "read_split_file"]

OPTIONS: tuple[str, ...] = ()
PARTS = ("train", "val", "test")


def read_split_file(path: Path) -> tuple[list[str], np.ndarray]:
    """(names, scores) from one split file; a malformed line, a non-finite score or a name listed twice is a
    ScoreFileError naming file and line."""
    names, scores, seen = [], [], {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ScoreFileError(path, number, f"expected 'NAME SCORE', got {line.strip()!r}")
            scores.append(finite_score(fields[1], table=path, line=number, column="score"))
            check_unique(seen, fields[0], table=path, line=number)
            names.append(fields[0])
    return names, np.asarray(scores, dtype=np.float64)


def _split_numbers(root: Path) -> list[int]:
    folder = root / "splits"
    if not folder.is_dir():
        raise FileNotFoundError(f"LaMem split folder {folder} not found; --root must hold images/ and splits/")
    numbers = sorted(int(p.stem.split("_")[1]) for p in folder.glob("train_*.txt") if p.stem.split("_")[1].isdigit())
    numbers = [n for n in numbers if (folder / f"test_{n}.txt").is_file()]
    if not numbers:
        raise FileNotFoundError(f"No train_N.txt with a matching test_N.txt in {folder}")
    return numbers


def num_splits(root: str | Path) -> int:
    return len(_split_numbers(Path(root)))


def _read_parts(root: Path, number: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """Names and scores of each part of split `number` that has a file; an image in two parts is an error."""
    files = {part: root / "splits" / f"{part}_{number}.txt" for part in PARTS}
    parts = {part: read_split_file(path) for part, path in files.items() if path.is_file()}
    owner: dict[str, str] = {}
    for part, (names, _) in parts.items():
        for name in names:
            if name in owner:
                raise ScoreFileError(files[part], _line_of(files[part], name), f"{name} is also in "
                                     f"{files[owner[name]].name}; an image belongs to one part of a split")
            owner[name] = part
    return parts


def _line_of(path: Path, name: str) -> int:
    """The line of `path` that lists `name` (looked up only to report an error)."""
    with open(path, encoding="utf-8") as f:
        return next(number for number, line in enumerate(f, 1) if line.split()[:1] == [name])


def load_split(root: str | Path, *, split: int = 0, seed: int = 0, test_fraction: float = 0.2) -> Split:
    """The official split `split` + 1; `seed` and `test_fraction` do not apply (the split files decide)."""
    root = Path(root)
    numbers = _split_numbers(root)
    check_split(split, len(numbers), "LaMem")
    number = numbers[split]
    parts = {}
    for part, (names, scores) in _read_parts(root, number).items():
        paths = [root / "images" / name for name in names]
        parts[part] = subset(paths, scores, np.arange(len(paths)), present_mask(paths))
    if not len(parts["train"].dataset) + len(parts["test"].dataset):
        raise FileNotFoundError(f"None of the images listed in {root / 'splits'} are in {root / 'images'}; "
                                "download LaMem's images into that folder")
    info = {"dataset": "lamem", "root": str(root), "split": split, "seed": seed,
            "split_files": [f"{part}_{number}.txt" for part in parts],
            "protocol": f"official LaMem split {number}: train/val/test files", **part_counts(parts)}
    # no val file, or none of its images on disk: None, so a trainer carves its own validation set
    val = parts["val"].dataset if "val" in parts and len(parts["val"].dataset) else None
    return Split(train=parts["train"].dataset, test=parts["test"].dataset, val=val, info=info)


def describe(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    sizes, scores = [], {}
    for number in _split_numbers(root):
        row: dict[str, Any] = {"split": number - 1}
        for part in PARTS:
            path = root / "splits" / f"{part}_{number}.txt"
            if path.is_file():
                names, values = read_split_file(path)
                row[part] = len(names)
                scores.update(zip(names, values.tolist(), strict=True))
        sizes.append(row)
    paths = [root / "images" / name for name in scores]
    present = present_mask(paths)
    return {"dataset": "lamem", "images": presence(paths, present),
            "splits": {"count": len(sizes), "sizes": sizes,
                       "sizes_are": "lines per split file (images listed; absent ones are skipped when loading)"},
            "scores": score_stats(np.asarray(list(scores.values()))), "human_consistency": None}
