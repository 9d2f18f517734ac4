"""`predict()`: memorability scores for paths, PIL images or tensors, in one call.

Preprocessing always comes from the model's checkpoint; the scoring itself is the inference core's
(`resmemnet.inference`). Batch jobs over folders, with error rows and resume, are `resmemnet.jobs`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from os import PathLike

import numpy as np
import torch
from PIL import Image

from resmemnet.data.images import load_image
from resmemnet.inference import ScoreArray, Scorer, TorchScorer
from resmemnet.model.preprocessing import Preprocessing
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.pretrained import load_model

__all__ = ["ModelLike", "PredictInput", "as_scorer", "predict", "preprocess"]

PredictInput = str | PathLike[str] | Image.Image | torch.Tensor
ModelLike = ResMemNet | str | PathLike[str] | None


def preprocess(item: PredictInput, preprocessing: Preprocessing,
               transform: Callable[[Image.Image], torch.Tensor] | None = None) -> torch.Tensor:
    """The network's (3, H, W) input for one item: a file decoded as `score_paths` decodes it (JPEGs at a reduced
    scale that still covers the input size), a PIL image as it is, a tensor unchanged (already preprocessed).

    `transform` is `preprocessing.transforms()`, passed in when preprocessing many items (it is built once).
    """
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] != 3:
            raise ValueError(f"A tensor input must be one preprocessed image (3, H, W), got {tuple(item.shape)}")
        return item
    if isinstance(item, Image.Image):
        image = item.convert("RGB")
    elif isinstance(item, (str, PathLike)):
        image = load_image(item, min_size=preprocessing.input_size)
    else:
        raise TypeError(f"Cannot score a {type(item).__name__}; pass paths, PIL images or (3, H, W) tensors")
    return (transform or preprocessing.transforms())(image)


def as_scorer(model: ModelLike | Scorer, *, device: str | torch.device = "auto", precision: str = "fp32") -> Scorer:
    """`model` itself when it is a Scorer, else a TorchScorer of the loaded model, a checkpoint or a bundled name
    (None: the bundled default). A given model is left as it was; a loaded one is the scorer's to convert."""
    if isinstance(model, Scorer):
        return model
    if isinstance(model, ResMemNet):
        return TorchScorer(model, device=device, precision=precision)
    return TorchScorer(load_model(model), device=device, precision=precision, inplace=True)


def predict(inputs: PredictInput | Sequence[PredictInput], model: ModelLike | Scorer = None, *,
            batch_size: int | None = None, device: str | torch.device = "auto", precision: str = "fp32",
            return_std: bool = False) -> ScoreArray | tuple[ScoreArray, ScoreArray]:
    """Memorability scores in input order, as a float32 array of shape (n,).

    `return_std=True` also returns each score's standard deviation over an ensemble's members
    (`resmemnet-large`); it is NaN for a single model, which measures no spread.

    `inputs` may be paths, PIL images or preprocessed (3, H, W) tensors (a (B, 3, H, W) batch too).
    `model` is a loaded model, a checkpoint path, a bundled name or a Scorer (whose own device and
    precision then apply); None means the bundled default. A library call gives exact fp32 scores unless
    asked otherwise; `precision="auto"` is the CLI's rule (resmemnet.runtime: bf16 where a CPU computes it natively).
    A bad image raises ImageLoadError naming it; `resmemnet.inference.score_paths` reports it as a row instead.
    Without a `batch_size`, batches fit the scorer's memory budget (`Scorer.batch_size_for`).
    """
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
        inputs = list(inputs)
    elif isinstance(inputs, (str, PathLike, Image.Image, torch.Tensor)):
        inputs = [inputs]
    scorer = as_scorer(model, device=device, precision=precision)
    batch_size = scorer.batch_size_for() if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    transform = scorer.preprocessing.transforms()  # built once per call, not once per image
    scores: list[np.ndarray] = [np.zeros(0, dtype=np.float32)]
    spreads: list[np.ndarray] = [np.zeros(0, dtype=np.float32)]
    for start in range(0, len(inputs), batch_size):
        batch = torch.stack([preprocess(x, scorer.preprocessing, transform) for x in inputs[start:start + batch_size]])
        score, spread = scorer.score_with_spread(batch)
        scores.append(score)
        spreads.append(np.full(len(score), np.nan, dtype=np.float32) if spread is None else spread)
    return (np.concatenate(scores), np.concatenate(spreads)) if return_std else np.concatenate(scores)
