"""Adam with the paper's cost-augmented gradient: H(theta) = lambda * J(theta) + grad J(theta).

The paper (Eq. 9, after Yi, Ahn & Ji 2020) feeds H instead of the plain gradient into Adam's moment
estimates, so steps grow with the current cost. lambda = 0 is exactly torch's Adam.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["CostAugmentedAdam"]


class CostAugmentedAdam(torch.optim.Adam):
    """torch.optim.Adam whose `step(loss=J)` first adds lambda * J to every gradient."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, *, cost_lambda: float = 0.0,
                 eps: float = 1e-6, weight_decay: float = 0.0, **kwargs: Any):
        if cost_lambda < 0:
            raise ValueError(f"cost_lambda must be >= 0, got {cost_lambda}")
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, **kwargs)
        self.cost_lambda = cost_lambda

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, *, loss: torch.Tensor | float | None = None) -> Any:
        if self.cost_lambda:
            if loss is None:
                raise ValueError("cost_lambda > 0 needs the batch cost: call optimizer.step(loss=loss.detach())")
            shift = self.cost_lambda * torch.as_tensor(loss).float()
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.add_(shift.to(p.grad.device, p.grad.dtype))
        return super().step(closure)
