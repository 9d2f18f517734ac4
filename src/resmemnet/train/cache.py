"""Frozen-phase feature cache: each image's pooled taps computed once, memory-mapped from disk.

While the backbone is frozen its output never changes, so the head can train from
`model.pool_taps(image)` stored once per image instead of re-running the CNN every epoch. The rows
come from the inference core's scorer (`TorchScorer.pool`), the pass every score goes through, under
the run's device and precision; images are decoded as the training pipeline decodes them.

A partly trained trunk (`start` > 0: the blocks before tap `start` frozen) caches instead each image's
`model.trunk_rows`: the frozen taps pooled plus the last frozen block's output map, so training runs
only the blocks after it (`model.pool_rows`).

What it covers: the un-augmented centre input (view 0) and, when the run augments with flips,
the horizontally flipped input (view 1). Training picks view `flip_for(seed, epoch, index)` per
image, which is exactly what the image pipeline feeds, so cached and uncached frozen training see
the same inputs (up to the cache dtype). Any other augmentation would need its own views.

The key hashes the backbone's name and weights, the preprocessing, the views, the dtype and
the ordered image paths: change any of them and a fresh cache is built. A cache is written to a
temporary folder and renamed into place, so a killed build leaves nothing half-written, and a file
lock makes concurrent builders of the same cache (DDP ranks, parallel runs) wait for the first one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from resmemnet.checkpoint import weights_digest
from resmemnet.data.base import ImageScoreDataset
from resmemnet.data.decoded import DecodedImages, collate_decoded
from resmemnet.inference import TorchScorer
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.runtime import PrecisionChoice

__all__ = ["CachedRows", "FeatureCache", "build_feature_cache", "cache_key"]

FP32 = PrecisionChoice("fp32", "feature cache default")


@dataclass
class FeatureCache:
    """features[view, image] -> pooled taps; `valid[i]` is False for images that failed to load."""

    path: Path
    features: np.ndarray  # (views, n, dim), memory-mapped
    valid: np.ndarray
    errors: list[str]

    @classmethod
    def open(cls, path: str | Path) -> FeatureCache:
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        return cls(path, np.load(path / "features.npy", mmap_mode="r"), np.load(path / "valid.npy"), meta["errors"])

    @property
    def views(self) -> int:
        return self.features.shape[0]

    def __len__(self) -> int:
        return self.features.shape[1]

    def take(self, indices: Sequence[int] | np.ndarray, views: Sequence[int] | np.ndarray | int = 0) -> torch.Tensor:
        """(len(indices), dim) float32 features, view `views[i]` for image `indices[i]`."""
        idx = np.asarray(indices, dtype=np.int64)
        v = np.broadcast_to(np.asarray(views, dtype=np.int64), idx.shape)
        return torch.from_numpy(np.asarray(self.features[v, idx], dtype=np.float32))


@dataclass(frozen=True)
class CachedRows:
    """Rows of one or more caches addressed as 0..n-1: a carved subset, or train images + extra images."""

    parts: tuple[tuple[FeatureCache, np.ndarray], ...]

    @classmethod
    def of(cls, cache: FeatureCache, rows: np.ndarray | None = None) -> CachedRows:
        return cls(((cache, np.arange(len(cache)) if rows is None else np.asarray(rows, dtype=np.int64)),))

    def plus(self, other: CachedRows) -> CachedRows:
        return CachedRows(self.parts + other.parts)

    def __len__(self) -> int:
        return sum(len(rows) for _, rows in self.parts)

    @property
    def views(self) -> int:
        return min(cache.views for cache, _ in self.parts)

    @property
    def valid(self) -> np.ndarray:
        return np.concatenate([cache.valid[rows] for cache, rows in self.parts])

    @property
    def errors(self) -> list[str]:
        return [e for cache, _ in self.parts for e in cache.errors]

    def take(self, positions: Sequence[int] | np.ndarray, views: Sequence[int] | np.ndarray | int = 0) -> torch.Tensor:
        """(len(positions), dim) float32 features, like FeatureCache.take."""
        pos = np.asarray(positions, dtype=np.int64)
        v = np.broadcast_to(np.asarray(views, dtype=np.int64), pos.shape)
        out = None
        start = 0
        for cache, rows in self.parts:
            mine = (pos >= start) & (pos < start + len(rows))
            if mine.any():
                part = cache.take(rows[pos[mine] - start], v[mine])
                if out is None:
                    out = torch.empty((pos.size, part.shape[1]), dtype=torch.float32)
                out[torch.from_numpy(np.flatnonzero(mine))] = part
            start += len(rows)
        if out is None:
            raise IndexError(f"no cached row among positions {pos[:5].tolist()}")
        return out


def cache_key(model: ResMemNet, dataset: ImageScoreDataset, views: int, dtype: str, start: int = 0, *,
              precision: str = "fp32") -> str:
    """The folder name of a cache: what changes its rows, the precision they were computed in included."""
    parts: dict[str, object] = {
        "backbone": model.config.backbone,  # not the head: runs with other heads share the cache
        "backbone_sha256": weights_digest(model.backbone.state_dict()),
        "preprocessing": model.preprocessing.to_dict(),
        "views": views,
        "dtype": dtype,
        "precision": precision,
        "paths": [str(Path(p).resolve()) for p in dataset.paths],
    }
    if start:
        parts["trunk_rows_from"] = start
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@torch.inference_mode()
def build_feature_cache(model: ResMemNet, dataset: ImageScoreDataset, cache_dir: str | Path, *, views: int = 1,
                        dtype: str = "float16", batch_size: int = 64, workers: int = 0,
                        device: str | torch.device = "cpu", precision: PrecisionChoice | None = None,
                        progress: bool = False, start: int = 0) -> FeatureCache:
    """Pooled taps (or with `start`, trunk rows) of every image in `dataset` (view 0 as-is, view 1 flipped),
    reused when already built.

    Images are prepared with `model.preprocessing`; the dataset's own transform is ignored. Bad files
    are listed in `.errors` and marked invalid, and the build goes on.
    """
    if views not in (1, 2):
        raise ValueError(f"views must be 1 (as-is) or 2 (as-is + flipped), got {views}")
    final = Path(cache_dir) / cache_key(model, dataset, views, dtype, start, precision=(precision or FP32).name)
    if (final / "meta.json").is_file():
        return FeatureCache.open(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(final.parent / f"{final.name}.lock"):
        if not (final / "meta.json").is_file():  # the lock's previous holder may have built it
            _build(model, dataset, final, views=views, dtype=dtype, batch_size=batch_size, workers=workers,
                   device=torch.device(device), precision=precision, progress=progress, start=start)
    return FeatureCache.open(final)


def _build(model: ResMemNet, dataset: ImageScoreDataset, final: Path, *, views: int, dtype: str, batch_size: int,
           workers: int, device: torch.device, precision: PrecisionChoice | None, progress: bool, start: int) -> None:
    # The training loop's own layout (no channels_last), so cached rows are what an uncached frozen pass computes.
    scorer = TorchScorer(model, device=device, precision=(precision or FP32).name, channels_last=False)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        loader = DataLoader(DecodedImages(dataset.paths, model.preprocessing.transforms()), batch_size=batch_size,
                            num_workers=workers, collate_fn=collate_decoded)
        valid = np.zeros(len(dataset), dtype=bool)
        errors: list[str] = []
        feats = None
        for batch in tqdm(loader, desc="feature cache", unit="batch", disable=not progress):
            errors += [f"{item.path}: {item.error}" for item in batch.failed]
            if batch.images is None:
                continue
            idx = batch.indices
            for view in range(views):
                x = batch.images.flip(-1) if view else batch.images
                rows = scorer.apply(lambda b: scorer.model.trunk_rows(b, start), x) if start else scorer.pool(x)
                pooled = rows.float().cpu().numpy()
                if feats is None:
                    feats = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=dtype,
                                                      shape=(views, len(dataset), pooled.shape[1]))
                feats[view, idx.numpy()] = pooled
            valid[idx.numpy()] = True
        if feats is None:
            raise ValueError(f"No image of {len(dataset)} could be loaded for the feature cache: {errors[:3]}")
        feats.flush()
        del feats
        np.save(tmp / "valid.npy", valid)
        (tmp / "meta.json").write_text(json.dumps({"n": len(dataset), "views": views, "dtype": dtype,
                                                   "errors": errors}))
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
