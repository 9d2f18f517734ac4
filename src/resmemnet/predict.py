"""Scoring images with a model; preprocessing always comes from the model's checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import numpy as np
import torch
from PIL import Image

from resmemnet.data.images import load_image
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.pretrained import load_model

__all__ = ["PredictInput", "predict"]

PredictInput = str | PathLike[str] | Image.Image | torch.Tensor


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


@torch.inference_mode()
def predict(inputs: PredictInput | Sequence[PredictInput], model: ResMemNet | str | PathLike[str] | None = None, *,
            batch_size: int = 32, device: str | torch.device = "cpu") -> np.ndarray:
    """Memorability scores in input order, as a float array of shape (n,).

    `inputs` may be paths, PIL images or preprocessed (3, H, W) tensors (a (B, 3, H, W) batch too).
    `model` is a loaded model, a checkpoint path or a bundled name; None means the bundled default.
    A bad image raises ImageLoadError naming it; `resmemnet predict` turns those into error rows.
    """
    if not isinstance(model, ResMemNet):
        model = load_model(model)
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
