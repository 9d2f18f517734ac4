"""The paper's per-epoch learning-rate cycle, as torch's CyclicLR.

Each epoch the rate rises linearly from lr_min to lr_max over the first half of its batches and
falls back over the second half ("Learning rate and one cycle learning policy"); a cycle of exactly
one epoch's batches repeats it every epoch. The scheduler steps once per batch.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CyclicLR

from resmemnet.train.config import PhaseConfig

__all__ = ["epoch_cycle"]


def epoch_cycle(optimizer: torch.optim.Optimizer, phase: PhaseConfig, batches_per_epoch: int) -> CyclicLR:
    if batches_per_epoch < 1:
        raise ValueError(f"An epoch needs at least one batch, got {batches_per_epoch}")
    return CyclicLR(optimizer, base_lr=phase.lr_min, max_lr=phase.lr_max, step_size_up=batches_per_epoch / 2,
                    mode="triangular", cycle_momentum=False)
