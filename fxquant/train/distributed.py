"""torch.distributed for QAT: one process per rank under ``torchrun`` (gloo on CPU, nccl on
GPU). Outside torchrun (no ``WORLD_SIZE`` in the environment, or 1) everything here is a
single-process no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fxquant.train.config import TrainError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    started_here: bool = False  # this module initialised the process group (and ends it)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch_size: int) -> tuple[int, int]:
        """This rank's rows ``[lo, hi)`` of a global batch (equal, disjoint slices)."""
        if batch_size % self.size:
            raise TrainError(f"--batch-size {batch_size} is not divisible by the {self.size} "
                             f"ranks; give a multiple of {self.size}")
        per = batch_size // self.size
        return self.rank * per, (self.rank + 1) * per

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Wait for every rank, then end the process group (when this module started it).
        Release DDP-wrapped models first (``QATTrainer.release``)."""
        if self.started_here and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def setup(device: str | None = None) -> World:
    """The world this process is in, on ``device`` (default: CUDA when available, one GPU
    per rank by ``LOCAL_RANK``, else the CPU): under torchrun (``WORLD_SIZE`` > 1) the
    process group is initialised (nccl on CUDA, gloo on the CPU) unless it already is."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if device not in (None, "cpu", "cuda"):
        raise TrainError(f"device {device!r} is invalid; valid: cpu, cuda")
    if use_cuda and not torch.cuda.is_available():
        raise TrainError("device 'cuda' was asked for but torch sees no CUDA device")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    where = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(where)
    if size <= 1:
        return World(0, 1, where, False)
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        started = True
    return World(dist.get_rank(), dist.get_world_size(), where, started)
