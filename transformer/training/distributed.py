"""Data parallelism through PyTorch's own engine: ``torchrun --nproc_per_node=N -m transformer train ...``.

Every rank draws the same global batch (same seed, same step) and trains on its slice, so N processes
with batch B follow the same trajectory as one process with batch B. DDP (NCCL on GPUs, gloo on CPUs)
by default; ``--fsdp`` shards parameters, gradients and optimizer state over the ranks
(``torch.distributed.fsdp.fully_shard``) for models that do not fit one device.

``--context-parallel C`` (``context_parallel_group``): groups of C consecutive ranks split every sequence of
their batch slice (ring attention over the group); the world is W / C data-parallel replicas of such groups.
Each rank's loss is the mean over its own tokens and DDP/FSDP average the gradients over the whole world,
which is exactly the gradient of the global mean: a rank's backward already holds the share of every token of
its group that flows through its activations (the ring returns dK/dV to their owners), so the group's sum
divided by C is the group's mean, and averaging over the W / C groups is data parallelism.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (nothing to do in a single process);
    returns the ranks and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), torch.device(device)
    info = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "cuda":
        torch.cuda.set_device(info.local_rank)
        dev = torch.device("cuda", info.local_rank)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return info, dev


@dataclass
class ContextParallel:
    """This rank's place in the context-parallel layout: its ring (group of ``size`` consecutive ranks, its
    ``rank`` in it) and the data-parallel slice of the batch its group trains on (``dp_rank`` of ``dp_size``)."""

    size: int = 1
    rank: int = 0
    group: dist.ProcessGroup | None = None
    dp_rank: int = 0
    dp_size: int = 1


def context_parallel_group(info: Dist, size: int) -> ContextParallel:
    """Split the world into rings of ``size`` consecutive ranks (every rank creates every group, as
    ``new_group`` requires); ``size`` 1 is plain data parallelism."""
    if size == 1:
        return ContextParallel(dp_rank=info.rank, dp_size=info.world_size)
    if info.world_size % size:
        raise ValueError(f"--context-parallel {size} must divide the number of processes ({info.world_size}): "
                         f"launch with torchrun --nproc_per_node=a multiple of {size}")
    own = None
    for first in range(0, info.world_size, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= info.rank < first + size:
            own = group
    return ContextParallel(size, info.rank % size, own, info.rank // size, info.world_size // size)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, info: Dist, device: torch.device, fsdp: bool) -> nn.Module:
    """DDP, FSDP (each block its own shard unit, then the root), or the model itself in one process."""
    if fsdp:
        if not info.enabled:
            raise ValueError("--fsdp needs several processes: launch with torchrun --nproc_per_node=N")
        from torch.distributed.fsdp import fully_shard

        from ..layers import DecoderBlock, EncoderBlock
        for block in [m for m in model.modules() if isinstance(m, (EncoderBlock, DecoderBlock))]:
            fully_shard(block)
        fully_shard(model)
        return model
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def broadcast(objects: list, info: Dist) -> list:
    """Rank 0's list of picklable objects, on every rank."""
    if info.enabled:
        dist.broadcast_object_list(objects, src=0)
    return objects


def mean(value: float, info: Dist, device: torch.device) -> float:
    """The average of a per-rank number over all ranks."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / info.world_size
