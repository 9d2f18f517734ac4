"""Frozen-phase feature cache: each image's pooled taps computed once, memory-mapped from disk.

While the backbone is frozen its output never changes, so the head can train from
`model.pool_taps(image)` stored once per image instead of re-running the CNN every epoch.

What it covers: the un-augmented centre input (view 0) and, when the run augments with flips,
the horizontally flipped input (view 1). Training picks view `flip_for(seed, epoch, index)` per
image, which is exactly what the image pipeline feeds, so cached and uncached frozen training see
the same inputs (up to the cache dtype). Any other augmentation would need its own views.

The key hashes the backbone's name and weights, the preprocessing, the views, the dtype and
the ordered image paths: change any of them and a fresh cache is built. A cache is written to a
temporary folder and renamed into place, so a killed build leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from resmemnet.checkpoint import weights_digest
from resmemnet.data.base import ImageScoreDataset
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.train.data import SafeImages, collate_safe

__all__ = ["FeatureCache", "build_feature_cache", "cache_key"]


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


def cache_key(model: ResMemNet, dataset: ImageScoreDataset, views: int, dtype: str) -> str:
    parts = {
        "backbone": model.config.backbone,  # not the head: runs with other heads share the cache
        "backbone_sha256": weights_digest(model.backbone.state_dict()),
        "preprocessing": model.preprocessing.to_dict(),
        "views": views,
        "dtype": dtype,
        "paths": [str(Path(p).resolve()) for p in dataset.paths],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@torch.inference_mode()
def build_feature_cache(model: ResMemNet, dataset: ImageScoreDataset, cache_dir: str | Path, *, views: int = 1,
                        dtype: str = "float16", batch_size: int = 64, workers: int = 0,
                        device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
                        progress: bool = False) -> FeatureCache:
    """Pooled taps of every image in `dataset` (view 0 as-is, view 1 flipped), reused when already built.

    Images are prepared with `model.preprocessing`; the dataset's own transform is ignored. Bad files
    are listed in `.errors` and marked invalid, and the build goes on.
    """
    if views not in (1, 2):
        raise ValueError(f"views must be 1 (as-is) or 2 (as-is + flipped), got {views}")
    final = Path(cache_dir) / cache_key(model, dataset, views, dtype)
    if (final / "meta.json").is_file():
        return FeatureCache.open(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        device = torch.device(device)
        was_training = model.training
        model.eval()
        loader = DataLoader(SafeImages(dataset, model.preprocessing.transforms()), batch_size=batch_size,
                            num_workers=workers, collate_fn=collate_safe)
        valid = np.zeros(len(dataset), dtype=bool)
        errors: list[str] = []
        feats = None
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        for idx, images, _, errs in tqdm(loader, desc="feature cache", unit="batch", disable=not progress):
            errors += errs
            if images is None:
                continue
            images = images.to(device)
            for view in range(views):
                x = images.flip(-1) if view else images
                with autocast:
                    pooled = model.pool_taps(x).float().cpu().numpy()
                if feats is None:
                    feats = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=dtype,
                                                      shape=(views, len(dataset), pooled.shape[1]))
                feats[view, idx.numpy()] = pooled
            valid[idx.numpy()] = True
        model.train(was_training)
        if feats is None:
            raise ValueError(f"No image of {len(dataset)} could be loaded for the feature cache: {errors[:3]}")
        feats.flush()
        del feats
        np.save(tmp / "valid.npy", valid)
        (tmp / "meta.json").write_text(json.dumps({"n": len(dataset), "views": views, "dtype": dtype,
                                                   "errors": errors}))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first; theirs is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return FeatureCache.open(final)
