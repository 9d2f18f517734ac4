"""LaMem (Khosla et al., ICCV 2015): `<root>/images/NNNNNNNN.jpg` and the official split files.

`<root>/splits/{train,val,test}_{1..5}.txt` hold one `name score` per line, space separated. Split index
s (0-based, as everywhere in resmemnet) reads the files numbered s + 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from resmemnet.data._common import Transform, check_split, presence, present_mask, score_stats, subset
from resmemnet.data.base import ImageScoreDataset, Split

__all__ = ["OPTIONS", "describe", "load_split", "num_splits", "read_split_file"]

OPTIONS: tuple[str, ...] = ()
PARTS = ("train", "val", "test")


def read_split_file(path: Path) -> tuple[list[str], np.ndarray]:
    """(names, scores) from one split file; a malformed line is an error naming file and line."""
    names, scores = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 2:
                    raise ValueError
                scores.append(float(fields[1]))
            except ValueError:
                raise ValueError(f"{path}:{number}: expected 'NAME SCORE', got {line.strip()!r}") from None
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


def _part(root: Path, part: str, number: int, transform: Transform) -> tuple[ImageScoreDataset, int] | None:
    path = root / "splits" / f"{part}_{number}.txt"
    if not path.is_file():
        return None
    names, scores = read_split_file(path)
    paths = [root / "images" / name for name in names]
    dataset, absent, _ = subset(paths, scores, np.arange(len(paths)), present_mask(paths), transform)
    return dataset, absent


def load_split(root: str | Path, *, split: int = 0, seed: int = 0, test_fraction: float = 0.2,
               transform: Transform = None) -> Split:
    """The official split `split` + 1; `seed` and `test_fraction` do not apply (the split files decide)."""
    root = Path(root)
    numbers = _split_numbers(root)
    check_split(split, len(numbers), "LaMem")
    number = numbers[split]
    parts = {part: _part(root, part, number, transform) for part in PARTS}
    if not len(parts["train"][0]) + len(parts["test"][0]):
        raise FileNotFoundError(f"None of the images listed in {root / 'splits'} are in {root / 'images'}; "
                                "download LaMem's images into that folder")
    info = {"dataset": "lamem", "root": str(root), "split": split, "seed": seed,
            "split_files": [f"{part}_{number}.txt" for part in PARTS if parts[part] is not None],
            "protocol": f"official LaMem split {number}: train/val/test files",
            "counts": {part: len(value[0]) for part, value in parts.items() if value is not None},
            "absent": {part: value[1] for part, value in parts.items() if value is not None}}
    # no val file, or none of its images on disk: None, so a trainer carves its own validation set
    val = parts["val"][0] if parts["val"] is not None and len(parts["val"][0]) else None
    return Split(train=parts["train"][0], test=parts["test"][0], val=val, info=info)


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
