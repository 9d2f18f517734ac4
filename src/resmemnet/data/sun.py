"""SUN memorability (Isola et al., CVPR 2011 release), read from its MATLAB files.

- `Data/Image data/target_images.mat`: `img`, uint8 H x W x 3 x N (N = 2400; the first 2,222 are the targets).
- `Data/Experiment data/sorted_target_data.mat`: `sorted_target_data`, per image hits, misses,
  false_alarms, correct_rejections.
- `Data/Random splits/{image_train_indices,image_test_indices,subject_hrs1,subject_hrs2}.mat`: 25 splits;
  indices are 1-based, hit rates are 25 x 2222 from two random halves of the participants.

The images exist only inside the .mat file, so loading a split writes them once as PNGs to `images_dir`
(default `<root>/Data/Image data/target_images/`); descriptions never need them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.io import loadmat, whosmat

from resmemnet.data._common import (
    check_split,
    check_split_halves,
    present_mask,
    score_stats,
    split_half_description,
    split_half_split,
)
from resmemnet.data.base import Split

__all__ = ["OPTIONS", "describe", "load_split", "num_splits", "split_half_scores"]

OPTIONS = ("images_dir",)
SPLITS_DIR = Path("Data") / "Random splits"
IMAGES_MAT = Path("Data") / "Image data" / "target_images.mat"
TARGETS_MAT = Path("Data") / "Experiment data" / "sorted_target_data.mat"


def _variable(root: Path, relative: Path, name: str, **kwargs: Any) -> Any:
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(f"SUN file {path} not found; --root must be the folder holding Data/ from the "
                                "Isola et al. release")
    data = loadmat(path, **kwargs)
    if name not in data:
        raise ValueError(f"{path} has no variable {name!r} (found: {', '.join(k for k in data if k[0] != '_')})")
    return data[name]


def split_half_scores(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """SUN's split-half hit rates (hrs1, hrs2): two 25 x 2222 matrices, column i is target image i + 1.

    NaN means nobody in that half of the participants saw the image (0/0 in MATLAB).
    """
    root = Path(root)
    hrs1, hrs2 = (np.asarray(_variable(root, SPLITS_DIR / f"{n}.mat", n), dtype=np.float64)
                  for n in ("subject_hrs1", "subject_hrs2"))
    check_split_halves(hrs1, hrs2, root / SPLITS_DIR)
    return hrs1, hrs2


def _indices(root: Path, name: str, n_splits: int, n_images: int) -> np.ndarray:
    """A splits x k matrix of 0-based image indices from the 1-based MATLAB file."""
    index = np.asarray(_variable(root, SPLITS_DIR / f"{name}.mat", name))
    if index.ndim != 2 or index.shape[0] != n_splits:
        raise ValueError(f"{name} has shape {index.shape}; expected {n_splits} rows, one per split")
    if index.min() < 1 or index.max() > n_images:
        raise ValueError(f"{name} must hold 1-based image indices in 1..{n_images}; found {index.min()}..{index.max()}")
    return index.astype(np.int64) - 1


def _extract_images(root: Path, images_dir: Path, n: int) -> list[Path]:
    """Write target images 1..n as NNNN.png once (atomically, so an interrupted run leaves no half file)."""
    paths = [images_dir / f"{i:04d}.png" for i in range(1, n + 1)]
    if present_mask(paths).all():
        return paths
    images = _variable(root, IMAGES_MAT, "img")
    if images.ndim != 4 or images.shape[2] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{root / IMAGES_MAT}: img must be uint8 H x W x 3 x N, got {images.dtype} {images.shape}")
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(paths[: images.shape[3]]):
            if not path.exists():
                fd, tmp = tempfile.mkstemp(suffix=".png", dir=images_dir)
                with os.fdopen(fd, "wb") as f:
                    Image.fromarray(np.ascontiguousarray(images[:, :, :, i])).save(f, format="PNG")
                os.replace(tmp, path)
    except PermissionError as exc:
        raise PermissionError(f"Cannot write the SUN images to {images_dir} ({exc.strerror}); pass a writable "
                              "images_dir (CLI: --images-dir DIR)") from exc
    return paths


def num_splits(root: str | Path, **options: Any) -> int:
    return int(split_half_scores(Path(root))[0].shape[0])


def load_split(root: str | Path, *, split: int = 0, seed: int = 0, test_fraction: float = 0.2,
               images_dir: str | Path | None = None) -> Split:
    """The official split `split` (0-based row of the split files); `seed`/`test_fraction` do not apply."""
    root = Path(root)
    hrs1, hrs2 = split_half_scores(root)
    n_splits, n_images = hrs1.shape
    check_split(split, n_splits, "SUN")
    train_idx = _indices(root, "image_train_indices", n_splits, n_images)[split]
    test_idx = _indices(root, "image_test_indices", n_splits, n_images)[split]
    folder = Path(images_dir) if images_dir is not None else root / IMAGES_MAT.parent / "target_images"
    paths = _extract_images(root, folder, n_images)
    info = {"dataset": "sun", "root": str(root), "seed": seed, "images_dir": str(folder),
            "split_files": str(root / SPLITS_DIR)}
    return split_half_split(paths, present_mask(paths), hrs1, hrs2, train_idx, test_idx, split=split,
                            info=info)


def describe(root: str | Path, *, images_dir: str | Path | None = None) -> dict[str, Any]:
    """Hit rates per image from the experiment data; 'present' means stored in target_images.mat."""
    root = Path(root)
    hrs1, hrs2 = split_half_scores(root)
    n_splits, n_images = hrs1.shape
    train = _indices(root, "image_train_indices", n_splits, n_images)
    test = _indices(root, "image_test_indices", n_splits, n_images)
    targets = np.atleast_1d(_variable(root, TARGETS_MAT, "sorted_target_data", squeeze_me=True,
                                      struct_as_record=False))[:n_images]
    hits = np.asarray([t.hits for t in targets], dtype=np.float64)
    misses = np.asarray([t.misses for t in targets], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        hit_rate = hits / (hits + misses)
    shapes = {name: shape for name, shape, _ in whosmat(root / IMAGES_MAT)} if (root / IMAGES_MAT).is_file() else {}
    stored = shapes["img"][-1] if len(shapes.get("img", ())) == 4 else 0  # read from the header, not the pixels
    present = np.arange(n_images) < stored
    paths = [Path(f"{i:04d}") for i in range(1, n_images + 1)]
    extra = {"train": int(train.shape[1]), "test": int(test.shape[1]), "image_split": "official (1-based files)"}
    description = split_half_description("sun", paths, present, hrs1, hrs2, extra)
    description["hit_rate"] = score_stats(hit_rate)  # from all participants, hits / (hits + misses)
    return description
