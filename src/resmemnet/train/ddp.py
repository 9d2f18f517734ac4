"""torchrun-compatible distributed setup: one process per device, configured by environment variables.

`torchrun --nproc-per-node N -m resmemnet train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; a plain
`python` run has none of them and stays single-process. gloo on CPUs, nccl on GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Distributed", "init_distributed", "shutdown_distributed"]


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs, shows progress, evaluates and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        """Each value summed over ranks (e.g. per-rank loss totals, for a log line covering all data)."""
        if not self.enabled:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total)
        return total.tolist()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (e.g. an evaluation result only rank 0 computed)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device_type: str) -> Distributed:
    """Join the process group torchrun describes (idempotent), or return the single-process setup."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        # Rank 0 alone builds feature caches and evaluates while the others wait: allow hours, not minutes.
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timedelta(hours=3))
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed() -> None:
    """Leave the process group once the process's work is done: left open, gloo's threads can abort the exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
