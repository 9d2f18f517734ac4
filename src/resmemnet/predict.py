"""Scoring images with a model; preprocessing always comes from the model's checkpoint."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from resmemnet.data.images import ImageLoadError, load_image
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.pretrained import load_model

__all__ = ["PredictInput", "Prediction", "iter_predictions", "predict"]

PredictInput = str | PathLike[str] | Image.Image | torch.Tensor


@dataclass(frozen=True)
class Prediction:
    """One row of a scoring job: a score, or the reason the file could not be scored."""

    path: str
    score: float | None
    error: str = ""


def _to_tensor(item: PredictInput, model: ResMemNet) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] != 3:
            raise ValueError(f"A tensor input must be one preprocessed image (3, H, W), got {tuple(item.shape)}")
        return item
    if isinstance(item, Image.Image):
        image = item.convert("RGB")
    elif isinstance(item, (str, PathLike)):
        image = load_image(item, min_size=model.preprocessing.input_size)
    else:
        raise TypeError(f"Cannot score a {type(item).__name__}; pass paths, PIL images or (3, H, W) tensors")
    return model.preprocessing.transforms()(image)


def _resolve(model: ResMemNet | str | PathLike[str] | None) -> ResMemNet:
    return model if isinstance(model, ResMemNet) else load_model(model)


@torch.inference_mode()
def predict(inputs: PredictInput | Sequence[PredictInput], model: ResMemNet | str | PathLike[str] | None = None, *,
            batch_size: int = 32, device: str | torch.device = "cpu") -> np.ndarray:
    """Memorability scores in input order, as a float array of shape (n,).

    `inputs` may be paths, PIL images or preprocessed (3, H, W) tensors (a (B, 3, H, W) batch too).
    `model` is a loaded model, a checkpoint path or a bundled name; None means the bundled default.
    A bad image raises ImageLoadError naming it; `iter_predictions` reports it as a row instead.
    """
    model = _resolve(model)
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
        inputs = list(inputs)
    elif isinstance(inputs, (str, PathLike, Image.Image, torch.Tensor)):
        inputs = [inputs]
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    model = model.eval().to(device)
    scores: list[np.ndarray] = []
    for start in range(0, len(inputs), batch_size):
        batch = torch.stack([_to_tensor(x, model) for x in inputs[start:start + batch_size]]).to(device)
        scores.append(model(batch).float().cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)


class _DecodedFiles(Dataset):
    """Decodes in DataLoader workers; a bad file becomes an error string, never an exception."""

    def __init__(self, paths: Sequence[str | Path], model: ResMemNet):
        self.paths = [str(p) for p in paths]
        self.transform = model.preprocessing.transforms()
        self.min_size = model.preprocessing.input_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str]:
        path = self.paths[index]
        try:
            return path, self.transform(load_image(path, min_size=self.min_size)), ""
        except ImageLoadError as exc:
            return path, None, exc.reason


def _collate(items: list[tuple[str, torch.Tensor | None, str]]) -> list[tuple[str, torch.Tensor | None, str]]:
    return items


@torch.inference_mode()
def iter_predictions(paths: Sequence[str | Path], model: ResMemNet | str | PathLike[str] | None = None, *,
                     batch_size: int = 32, workers: int = 0, device: str | torch.device = "cpu",
                     ) -> Iterator[Prediction]:
    """Stream one Prediction per path, in input order; bad files give error rows and the run goes on.

    Memory stays bounded (one batch in flight per worker) whatever the number of paths.
    """
    model = _resolve(model).eval().to(device)
    loader = DataLoader(_DecodedFiles(paths, model), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate)
    for items in loader:
        good = [(p, t) for p, t, _ in items if t is not None]
        scores: dict[str, float] = {}
        if good:
            # Tensors of different sizes cannot share a batch; Preprocessing always resizes to one size.
            batch = torch.stack([t for _, t in good]).to(device)
            scores = {p: float(s) for (p, _), s in zip(good, model(batch).float().cpu(), strict=True)}
        for path, tensor, error in items:
            yield Prediction(path, scores[path], "") if tensor is not None else Prediction(path, None, error)
