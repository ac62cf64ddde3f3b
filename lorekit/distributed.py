"""Data parallelism on torch.distributed, launched by torchrun: one code path for one process and for N.

    torchrun --nproc_per_node 8 -m lorekit train --recipe paper --method lore      # 8 GPUs, NCCL
    torchrun --nproc_per_node 2 -m lorekit train --device cpu ...                  # 2 CPU processes, gloo

`World.from_env()` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and joins the process group (NCCL on
CUDA, gloo on the CPU); without them it is the one-process world and every collective below is a no-op.
Each rank trains on its shard of every global batch; DistributedDataParallel averages the encoder's
gradients, `average_gradients` the others (LORE's dual network, text-tower adapters), so every rank holds
the same weights; telemetry is reduced over ranks; only rank 0 writes the run directory.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, resolve_device


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among `size` processes, and its device."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> "World":
        """The world torchrun started this process in (or the one-process world); joins its process group."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls(0, 1, resolve_device(device))
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        target = resolve_device(device)
        if target.type == "cuda":
            if local >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK={local}: only {torch.cuda.device_count()} CUDA devices are visible; "
                                  "start at most that many processes per node (torchrun --nproc_per_node)")
            target = torch.device("cuda", local)
            torch.cuda.set_device(target)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if target.type == "cuda" else "gloo", rank=rank, world_size=size,
                                    timeout=datetime.timedelta(minutes=30))
        return cls(rank, size, target)

    # ------------------------------------------------------------------ collectives (no-ops in one process)
    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (the batch size divides by the world size)."""
        n = batch.shape[0] // self.size
        return batch[self.rank * n:(self.rank + 1) * n]

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a tensor every rank holds (gloo has no AVG: a sum, then a division)."""
        if self.size > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.size
        return values

    def maximum(self, values: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sample values of every rank, concatenated in rank order (the global batch's order)."""
        if self.size == 1:
            return values
        parts = [torch.empty_like(values) for _ in range(self.size)]
        dist.all_gather(parts, values.contiguous())
        return torch.cat(parts)

    def average_gradients(self, params: nn.Module | Iterable[torch.Tensor]) -> None:
        """Average the gradients of a module (or parameters) that DistributedDataParallel does not wrap."""
        if self.size == 1:
            return
        for p in params.parameters() if isinstance(params, nn.Module) else params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.size

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's (picklable) object, on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module the update runs through: DistributedDataParallel over ranks, the module itself alone."""
        if self.size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
