"""torch.distributed set-up for runs under `torchrun`: one process per device, DDP on top.

`torchrun --nproc_per_node N` sets RANK / WORLD_SIZE / LOCAL_RANK; with them, `setup` joins the
process group (NCCL on CUDA, gloo on CPU) and says which device this rank uses. Without them the
run is a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def setup(device: str | None = None) -> Dist:
    """The process group (joined once) and this rank's device; `device` None: CUDA when available."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world == 1:
        return Dist(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=dist.get_rank(), world_size=world, device=torch.device(f"cuda:{local}" if use_cuda else "cpu"))
