"""Head training: the module a training step runs, and the options that end folded into the weights (input
standardisation and output calibration).

Both leave a plain ResMemNet behind, so a checkpoint needs nothing but itself to score raw images:

- standardise: the pooled taps' scales differ by orders of magnitude between blocks, and Adam on raw
  taps learned a worse head (LNSIM validation rho 0.503 against 0.568 standardised). The head trains on
  (taps - mean) / std of the training rows; `folded` rewrites the 1x1 projections exactly, since
  conv(W, b) applied to (p - mean) / std == conv(W / std, b - W (mean / std)) applied to p.
- calibrate: an MSE-trained head shrinks towards the mean; sigmoid(a * logit + c), fitted on
  validation images, restores the human scale and is folded into the last linear layer (a > 0, so the
  ranking is unchanged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from resmemnet.model.heads import LinearEnsemble
from resmemnet.model.resmemnet import ResMemNet
from resmemnet.runtime import PrecisionChoice, autocast
from resmemnet.train.cache import CachedRows

__all__ = ["Standardiser", "TrainingNet", "calibrate", "folded"]

STD_FLOOR = 1e-3  # added to every feature's std: constant taps (e.g. after a ReLU) must not divide by ~0


class Standardiser(nn.Module):
    """(pooled - mean) / std with statistics of the training rows; not a parameter, never saved by itself."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float(), persistent=False)
        self.register_buffer("std", std.float(), persistent=False)

    @classmethod
    def fit(cls, rows: CachedRows, chunk: int = 256) -> Standardiser:
        """Per-feature mean and std over the valid rows (every cached view), accumulated in float64."""
        idx = np.flatnonzero(rows.valid)
        total = sq = None
        count = 0
        for view in range(rows.views):
            for start in range(0, idx.size, chunk):
                x = rows.take(idx[start:start + chunk], view).double()
                total = x.sum(0) if total is None else total + x.sum(0)
                sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
                count += x.shape[0]
        if total is None:
            raise ValueError("Cannot standardise: no training image has cached features")
        mean = total / count
        std = (sq / count - mean * mean).clamp_min(0).sqrt() + STD_FLOOR
        return cls(mean, std)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return (pooled.float() - self.mean.to(pooled.device)) / self.std.to(pooled.device)


@contextlib.contextmanager
def folded(model: ResMemNet, standardiser: Standardiser | None) -> Iterator[ResMemNet]:
    """Inside the block, `model` takes raw taps (the standardisation folded into its projections).

    The trained weights come back bit for bit afterwards (copies, not an inverse fold), so training
    and resuming continue exactly.
    """
    if standardiser is None:
        yield model
        return
    convs = model.projection.convs
    originals = [(conv.weight.detach().clone(), conv.bias.detach().clone()) for conv in convs]
    try:
        with torch.no_grad():
            for conv, m, s in zip(convs, standardiser.mean.split(model.tap_channels),
                                  standardiser.std.split(model.tap_channels), strict=True):
                m, s = m.to(conv.weight), s.to(conv.weight)
                conv.bias -= conv.weight.flatten(1) @ (m / s)
                conv.weight /= s[None, :, None, None]
        yield model
    finally:
        with torch.no_grad():
            for conv, (weight, bias) in zip(convs, originals, strict=True):
                conv.weight.copy_(weight)
                conv.bias.copy_(bias)


def calibrate(model: ResMemNet, predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Fit sigmoid(a * logit(p) + c) to `targets` by least squares (LBFGS) and fold a, c into the head's read-outs."""
    raw = torch.logit(torch.from_numpy(np.asarray(predictions)).double(), eps=1e-6)
    target = torch.from_numpy(np.asarray(targets)).double()
    a = torch.ones((), dtype=torch.float64, requires_grad=True)
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, c], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((torch.sigmoid(a * raw + c) - target) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    slope, intercept = a.item(), c.item()
    if not slope > 0:
        raise ValueError(f"calibration slope {slope:.3f} is not positive: the head ranks validation images "
                         "backwards; train longer or set calibrate=false")
    readouts = model.head.readouts() if isinstance(model.head, LinearEnsemble) else [model.head.fc]
    with torch.no_grad():
        for fc in readouts:  # a gated head mixes its read-outs with weights that sum to 1: scale each alike
            fc.weight.mul_(slope)
            fc.bias.mul_(slope).add_(intercept)
    return {"method": "sigmoid(a * logit + c) fitted on the validation images, folded into the head's read-outs",
            "slope": slope, "intercept": intercept, "images": int(target.numel())}


class TrainingNet(nn.Module):
    """What a training step runs: the backbone under autocast, the head in float32 (it is cheap, and a bf16
    LSTM/sigmoid output has too few distinct values to rank images). One module, so DDP wraps the cached and
    uncached paths alike. Cached inputs are standardised first when the run standardises; cached trunk rows
    (`trunk_start` > 0) run the trunk's blocks from that tap on."""

    def __init__(self, model: ResMemNet, precision: PrecisionChoice, pooled_inputs: bool,
                 standardiser: Standardiser | None, trunk_start: int = 0):
        super().__init__()
        self.model = model
        self.precision = precision
        self.pooled_inputs = pooled_inputs
        self.standardiser = standardiser
        self.trunk_start = trunk_start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trunk_start:
            with autocast(x.device, self.precision):
                x = self.model.pool_rows(x, self.trunk_start)
        elif not self.pooled_inputs:
            with autocast(x.device, self.precision):
                x = self.model.pool_taps(x)
        elif self.standardiser is not None:
            x = self.standardiser(x)
        return self.model.forward_pooled(x.float())
