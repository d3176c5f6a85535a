"""Data parallelism under torchrun: one process per device, DDP, rank 0 alone writes.

torchrun (`python -m torch.distributed.run`) sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; without
them this is a single process (rank 0 of 1) and nothing here touches torch.distributed. The backend is NCCL for
CUDA devices (each process takes cuda:LOCAL_RANK) and gloo on CPU.
The loss of a step is the mean over every trained token of the global batch (all ranks, all micro-batches):
`all_sum` adds the token counts and loss sums over the ranks; DDP averages gradients over the ranks, so each rank
scales its loss sum by world_size / global_tokens (loop.py).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False  # by us (so close() tears it down)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (float64 on the wire; a no-op for one process)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._wire())
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (e.g. one rank got Ctrl-C)."""
        return self.all_sum([1.0 if flag else 0.0])[0] > 0 if self.active else flag

    def agree(self, problem: str | None) -> str | None:
        """The first rank's problem (by rank order) on every rank, so all stop together instead of some waiting
        forever in the next collective."""
        if not self.active:
            return problem
        gathered: list = [None] * self.world_size
        tdist.all_gather_object(gathered, problem)
        return next((p for p in gathered if p), None)

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def wrap(self, module: torch.nn.Module, find_unused: bool) -> torch.nn.Module:
        """DDP around module (a no-op for one process)."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=find_unused)

    def close(self) -> None:
        if self.initialized and tdist.is_initialized():
            tdist.destroy_process_group()

    def _wire(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def setup(device: str) -> Dist:
    """Read torchrun's environment; initialise the process group when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if world <= 1:
        return Dist(device=dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"device {device!r}: data-parallel runs (torchrun) use cuda or cpu")
    initialized = False
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        initialized = True
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev, initialized=initialized)
