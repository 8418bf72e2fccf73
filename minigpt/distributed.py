"""Data-parallel training across processes started by `torchrun`.

`torchrun --nproc_per_node=N -m minigpt train ...` starts N copies of the
same command with RANK, WORLD_SIZE and LOCAL_RANK in their environment. Each
copy trains on different batches; DistributedDataParallel averages the
gradients, so every copy holds the same weights after every step. gloo
carries the gradients between CPU processes, nccl between GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, evaluates and writes checkpoints."""
        return self.rank == 0

    def any(self, *flags: bool, device: torch.device) -> list[bool]:
        """For each flag, whether any process raised it: every process takes the same decision."""
        if not self.enabled:
            return list(flags)
        tensor = torch.tensor([float(f) for f in flags], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [bool(v) for v in tensor.tolist()]


def join(device_name: str) -> tuple[ProcessGroup, str]:
    """Join the process group torchrun describes (if any); returns it and the device this process uses."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    else:
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return ProcessGroup(rank, world_size, local_rank), device_name


def leave(group: ProcessGroup, together: bool = True) -> None:
    """Leave the process group; `together` waits for every process first (when all are known to get here),
    since one tearing down its connections while another still holds its own can abort either at exit."""
    if group.enabled and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
