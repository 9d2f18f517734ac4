from __future__ import annotations

import pytest
import torch

from resmemnet.train.config import PhaseConfig
from resmemnet.train.optim import CostAugmentedAdam
from resmemnet.train.schedule import epoch_cycle


def _run(opt_factory, steps=5, shift=0.0):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(7))
    x = torch.randn(7)
    opt = opt_factory([w])
    for _ in range(steps):
        loss = ((w * x).sum() - 1.0) ** 2
        opt.zero_grad()
        loss.backward()
        if shift:
            w.grad.add_(shift * loss.detach())
            opt.step()
        else:
            opt.step(loss=loss.detach()) if isinstance(opt, CostAugmentedAdam) else opt.step()
    return w.detach()


def test_lambda_zero_is_plain_adam():
    ours = _run(lambda p: CostAugmentedAdam(p, lr=0.1, eps=1e-6, weight_decay=1e-4))
    torchs = _run(lambda p: torch.optim.Adam(p, lr=0.1, eps=1e-6, weight_decay=1e-4))
    assert torch.equal(ours, torchs)


def test_cost_augmented_gradient_feeds_lambda_j_plus_grad_into_adam():
    ours = _run(lambda p: CostAugmentedAdam(p, lr=0.1, cost_lambda=0.3))
    by_hand = _run(lambda p: torch.optim.Adam(p, lr=0.1, eps=1e-6), shift=0.3)
    plain = _run(lambda p: torch.optim.Adam(p, lr=0.1, eps=1e-6))
    torch.testing.assert_close(ours, by_hand)
    assert not torch.allclose(ours, plain)


def test_cost_augmented_needs_the_loss():
    w = torch.nn.Parameter(torch.ones(2))
    opt = CostAugmentedAdam([w], cost_lambda=0.1)
    w.sum().backward()
    with pytest.raises(ValueError, match=r"step\(loss="):
        opt.step()
    with pytest.raises(ValueError, match="cost_lambda"):
        CostAugmentedAdam([w], cost_lambda=-1)


def test_lr_is_a_triangle_repeated_every_epoch():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([w])
    sched = epoch_cycle(opt, PhaseConfig(epochs=2, lr_min=1e-3, lr_max=1e-2), batches_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    epoch = [1e-3 + (1e-2 - 1e-3) * min(b, 10 - b) / 5 for b in range(10)]
    assert lrs == pytest.approx(epoch + epoch)
    assert max(lrs) == pytest.approx(1e-2) and lrs[10] == pytest.approx(1e-3)
